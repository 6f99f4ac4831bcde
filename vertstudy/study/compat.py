"""Every place vertstudy leans on a Ray internal, in one module.

Ray Tune's public API does not cover three things a study needs; each is wrapped here, and
``tests/study/test_compat.py`` checks the behaviour each wrapper assumes, so a Ray upgrade that
changes it fails there, loudly, instead of mixing studies or dropping callbacks in the field.

- **The driver's staging folder.** Tune stages a driver's experiment files (the JSON logger's
  ``result.json``, W&B's offline runs, the searcher's state) in
  ``<Ray session dir>/artifacts/<timestamp>/<experiment name>/driver_artifacts`` and copies that
  folder to the study's storage. The timestamp has one-second resolution and every study's
  experiment is named ``ray``, so two drivers on one host that build their Tuner in the same
  second share one staging folder, and each copies the other's trials into its own study.
  :class:`StagingTurn` makes the drivers on one host start at least a second apart.
- **The callbacks of a restored Tuner.** ``Tuner.restore`` keeps the run config pickled by the
  killed driver, callbacks included; :func:`replace_callbacks` puts fresh ones in.
- **Tune settings only the environment carries**: :func:`driver_environment`.
- **A session folder of one's own** (:func:`init_local_ray`) and **another cluster's token**
  (:func:`reload_auth_token`), for benchmarks and tests.
- **A finished Optuna trial's late results.** See
  :class:`vertstudy.study.search.ResumableOptunaSearch`, which uses :func:`mark_completed`.
- **Trial ids of one's own** (reproducible studies, :mod:`vertstudy.study.ordered`): Tune draws
  them at random; :func:`stable_search_generator` and :func:`stable_variant_generator` name the
  trials ``<prefix><number>`` instead, for Optuna searches and grids.
- **Checkpoints Ray's saved state names but the storage lost**: Tune deletes a trial's
  checkpoints beyond ``num_to_keep`` as soon as a newer one registers, but saves its experiment
  state only now and then; a driver killed in between leaves a state that names deleted
  checkpoints, and Tune's restore of such a trial fails. :func:`forget_lost_checkpoints`.
- **Letting a held trial go on**: a scheduler that answered a result with ``NOOP`` (the trial's
  thread stays blocked in its report) lets it train on with :func:`continue_training`.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Mapping
from pathlib import Path


def session_artifacts_dir() -> Path:
    """``<Ray session dir>/artifacts`` on this host: the parent of every driver's staging folder
    (Ray must be initialized). Ray's own ``_get_ray_train_session_dir``."""
    from ray.train.constants import _get_ray_train_session_dir

    return Path(_get_ray_train_session_dir())


def driver_staging_dir(state: dict) -> Path | None:
    """The local staging folder (``<session>/artifacts/<timestamp>/<experiment>/driver_artifacts``)
    of the driver that saved Ray's experiment state ``state`` (its JSON), which a driver resuming
    on this host reuses; ``None`` when the state names none. Read from the first trial's
    pickled ``StorageContext`` (Ray must be initialized)."""
    import json

    from ray import cloudpickle

    try:
        entry = state["trial_data"][0]
        trial = json.loads(entry[0]) if isinstance(entry, list) else entry
        context = cloudpickle.loads(bytes.fromhex(trial["storage"]["value"]))
        return Path(context.experiment_driver_staging_path)
    except Exception:  # no trial yet, or another Ray's layout: nothing to clean
        return None


def staging_stamp() -> str:
    """The timestamp Tune puts in a new driver's staging folder, at this moment."""
    from ray.tune.utils.util import date_str

    return date_str()


def __getattr__(name: str):
    # StagingTurn subclasses Tune's Callback: built on first use, so importing this module (the
    # CLI does, for driver_environment) does not import Ray
    if name == "StagingTurn":
        return _staging_turn_class()
    if name == "StableIdSearchGenerator":
        return _stable_search_generator_class()
    raise AttributeError(name)


@functools.lru_cache(maxsize=1)
def _staging_turn_class():
    from ray.tune import Callback

    class StagingTurn(Callback):
        """Hold this around ``Tuner.fit()`` and pass it to Tune as a callback: drivers on one host
        take turns under a file lock in the session's artifacts folder, each waiting until the
        staging timestamp differs from the previous driver's, until Tune has named its staging folder
        (Tune's controller calls its callbacks' ``setup`` right after). So no two drivers share a
        staging folder; it costs at most a second per driver, and only when drivers start together."""

        _lock = None

        def __enter__(self):
            from filelock import FileLock

            artifacts = session_artifacts_dir()
            artifacts.mkdir(parents=True, exist_ok=True)
            self._last = artifacts / ".vertstudy-last-staging"
            self._lock = FileLock(str(artifacts / ".vertstudy-staging.lock"))
            self._lock.acquire()
            last = self._last.read_text(encoding="utf-8").strip() if self._last.exists() else ""
            while staging_stamp() == last:
                time.sleep(0.05)
            return self

        def setup(self, *args, **info) -> None:
            self._end_turn()

        def __exit__(self, *exc) -> None:
            self._end_turn()

        def _end_turn(self) -> None:
            if self._lock is not None:
                try:
                    self._last.write_text(staging_stamp(), encoding="utf-8")
                finally:
                    self._lock.release()
                    self._lock = None

        def __getstate__(self) -> dict:  # Tune pickles its callbacks; a held lock stays here
            return {}

    StagingTurn.__module__, StagingTurn.__qualname__ = __name__, "StagingTurn"  # picklable by name
    return StagingTurn


def driver_environment(current: Mapping[str, str]) -> dict[str, str]:
    """Tune settings that only the environment carries, for a process that drives studies, given
    its ``current`` environment: what to set in it. Its entry point (the CLI's ``main``, the test
    session) sets them, since nothing below it touches the environment. The 1 s save always (a
    resume relies on it); the others only where the user has not set them.

    Ray's experiment state is saved every second (Tune's default is about 10 s), so a resumed
    study reruns at most the last second's finished trials, and those only re-report their
    final result (``trial.FINAL``). Not 0: Ray rewrites its local state file while the previous
    copy to the storage may still be reading it, and back-to-back saves tear that copy. Tune's
    warning about slow state syncs, and its newer console output, are off (vertstudy prints its
    own progress). Tune's automatic CSV and TensorBoard loggers are off: the study's tables and
    W&B hold what they would, the driver would import TensorBoardX (and with it torch, seconds)
    for them, and every result would be written twice more. Tune's JSON logger, whose
    ``result.json`` the tables are rebuilt from, is passed explicitly by the runner.
    ``TUNE_DISABLE_AUTO_CALLBACK_LOGGERS=0`` in the environment brings the others back."""
    defaults = {"TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0", "RAY_AIR_NEW_OUTPUT": "0",
                "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1"}
    return {"TUNE_GLOBAL_CHECKPOINT_S": "1", **{k: v for k, v in defaults.items() if k not in current}}


def init_local_ray(cpus: int, temp_dir: Path, object_store_mb: int) -> None:
    """Start an embedded Ray of ``cpus`` CPUs whose session lives under ``temp_dir`` (Ray's
    ``_temp_dir``: benchmarks and tests keep their sockets in a short folder of their own)."""
    import ray

    ray.init(num_cpus=cpus, _temp_dir=str(temp_dir), include_dashboard=False, log_to_driver=False,
             object_store_memory=object_store_mb * 1024 * 1024)


def reload_auth_token() -> None:
    """Make this process's Ray read its token again from ``RAY_AUTH_TOKEN_PATH`` (one process
    that talks to several clusters, each with its own token), as Ray's own token set-up does."""
    from ray._raylet import AuthenticationTokenLoader, Config

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


def replace_callbacks(tuner, callbacks: list) -> None:
    """Give a restored ``Tuner`` this driver's callbacks instead of the pickled ones."""
    tuner._local_tuner.get_run_config().callbacks = callbacks


def realign_search(tuner, known: dict[str, str], study_dir: str) -> None:
    """Have a restored ``Tuner``'s stable-id search generator (:func:`stable_search_generator`)
    realign its restored state with ``known`` (``{trial id: Ray status}``, the experiment state
    Ray restores) once Ray has restored it; nothing for other search algorithms."""
    search_alg = tuner._local_tuner._tune_config.search_alg
    if hasattr(search_alg, "realign_with"):
        search_alg.realign_with = (dict(known), study_dir)


def mark_completed(searcher, trial_id: str) -> None:
    """Tell Ray's ``OptunaSearch`` that ``trial_id``'s Optuna trial is finished, so it ignores the
    trial's further results."""
    searcher._completed_trials.add(trial_id)


def stable_variant_generator(prefix: str, max_concurrent: int):
    """Tune's grid expansion (``BasicVariantGenerator``) naming its trials ``<prefix><00000>``,
    ``<prefix><00001>``, ... in grid order instead of behind a random prefix (Ray's
    ``_uuid_prefix``, which its saved state carries to a resumed driver)."""
    from ray.tune.search import BasicVariantGenerator

    generator = BasicVariantGenerator(max_concurrent=max_concurrent)
    generator._uuid_prefix = prefix
    return generator


def stable_search_generator(searcher, prefix: str):
    """Tune's ``SearchGenerator`` around ``searcher`` naming trial ``n`` (0, 1, ...: the order
    in which the searcher gave them) ``<prefix><n, 5 digits>`` instead of a random id. Its
    counter is in Ray's saved state, so a resumed driver goes on with the next number."""
    return _stable_search_generator_class()(searcher, prefix)


@functools.lru_cache(maxsize=1)
def _stable_search_generator_class():
    from ray.tune.experiment import Trial
    from ray.tune.search import SearchGenerator

    class StableIdSearchGenerator(SearchGenerator):
        """``SearchGenerator.create_trial_if_possible`` draws the id with ``Trial.generate_id()``
        before asking the searcher; for that one call it returns the trial's stable id."""

        #: ``({trial id: Ray status}, study dir)`` of the trials a resumed driver restores: set
        #: before ``fit``, used once the saved state is restored (:meth:`restore_from_dir`)
        realign_with = None

        def __init__(self, searcher, prefix: str):
            super().__init__(searcher)
            self.id_prefix = prefix

        def restore_from_dir(self, dirpath: str):
            """Ray's restore, then the counter, the concurrency limiter's live trials and the
            searcher made to agree with the Ray trials restored beside them (Ray uploads the files
            separately: a driver killed meanwhile leaves them at different points)."""
            super().restore_from_dir(dirpath)
            if self.realign_with is None:
                return
            known, study_dir = self.realign_with
            self.realign_with = None
            limiter, searcher = self.searcher, self.searcher
            while hasattr(searcher, "searcher"):
                searcher = searcher.searcher
            if hasattr(searcher, "realign"):
                searcher.realign(known, study_dir)
            self._counter = len(known)  # the next trial: the first one Ray does not know
            self._finished = False
            if hasattr(limiter, "live_trials"):
                ended = {t for t, status in known.items() if status in ("TERMINATED", "ERROR")}
                live = {t for t in limiter.live_trials if t in known} | {t for t in known if t not in ended}
                limiter.live_trials, limiter.num_unfinished_live_trials = live, len(live)

        def next_trial_id(self) -> str:
            return f"{self.id_prefix}{self._counter:05d}"

        def create_trial_if_possible(self, experiment_spec):
            fixed, original = self.next_trial_id(), Trial.__dict__["generate_id"]
            Trial.generate_id = classmethod(lambda cls: fixed)
            try:
                return super().create_trial_if_possible(experiment_spec)
            finally:
                Trial.generate_id = original

    StableIdSearchGenerator.__module__ = __name__
    StableIdSearchGenerator.__qualname__ = "StableIdSearchGenerator"  # picklable by name
    return StableIdSearchGenerator


def forget_lost_checkpoints(state: dict, exists) -> list[tuple[str, str, str]]:
    """Make Ray's saved experiment state ``state`` (its parsed JSON, changed in place) name only
    checkpoints that are still there. ``exists(trial_id, name)``: whether the trial's checkpoint
    folder ``name`` (``checkpoint_NNNNNN``) is on the storage.

    A trial whose latest recorded checkpoint is gone resumes from the newest one of its recorded
    checkpoints that is left, or, when none is, from the start: either way it replays the epochs
    the state lacks, so its scheduler sees every report again (a newer folder on the storage is
    not used: the killed driver may have stopped the trial at it, and the state does not say).
    Returns ``(trial id, lost checkpoint, the one it resumes from or '')`` per trial changed."""
    import json

    from ray.tune.trainable.metadata import _TrainingRunMetadata

    changed = []
    for entry in state.get("trial_data", []):
        if not (isinstance(entry, list) and len(entry) == 2):
            continue
        trial_id = str(json.loads(entry[0]).get("trial_id", ""))
        metadata = _TrainingRunMetadata.from_json_state(entry[1])
        manager = metadata.checkpoint_manager
        latest = getattr(manager, "_latest_checkpoint_result", None)
        if latest is None or latest.checkpoint is None:
            continue

        def name(result) -> str:
            return result.checkpoint.path.rstrip("/").rsplit("/", 1)[-1]

        if exists(trial_id, name(latest)):
            continue
        kept = [r for r in manager._checkpoint_results if r.checkpoint is not None and exists(trial_id, name(r))]
        manager._checkpoint_results = kept
        manager._latest_checkpoint_result = max(kept, key=name) if kept else None
        metadata.checkpoint_manager = manager  # (re-set: the metadata caches its JSON)
        entry[1] = metadata.get_json_state()
        changed.append((trial_id, name(latest), name(manager._latest_checkpoint_result) if kept else ""))
    return changed


def continue_training(controller, trial) -> None:
    """Let a trial whose last result its scheduler answered with ``NOOP`` train on (Tune's
    controller schedules its next ``train``; the scheduler hooks get the controller wrapped)."""
    getattr(controller, "_tune_controller", controller)._schedule_trial_train(trial)
