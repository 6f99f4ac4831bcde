"""Running a study on a Ray cluster: the Tuner is built here, in one place.

``run_study`` checks everything first (storage writable, study not already there), prepares the
data once, then runs Ray Tune with the trial adapter (:mod:`vertstudy.study.trial`), Optuna
(persistent storage in the study directory, so ``optuna-dashboard sqlite:///<dir>/optuna.db``
opens it) or a grid, ASHA, a concurrency limit, checkpoints (the newest k kept; a trial that ended
for good keeps no ``last.pt``: :func:`drop_training_state`) and trial retries.
After every trial ends, its rows are added to the Parquet tables (what it adds, written
atomically: :mod:`vertstudy.study.refresh`); when the study ends they are checked against Ray's
results and compacted. ``resume_study`` continues an interrupted study from its directory.

Study directory ``<storage>/<name>/``::

    study.json       the validated study (what resume and export read)
    defaults.json    every config field's default when the study began: a default changed since
                     is pinned to its old value when the study is resumed or extended
    split.json       the cache entries of the train / val / test cases
    trials.parquet epochs.parquet vertebrae.parquet baseline.parquet
    parts/           while it runs: epochs and vertebrae rows per ended trial (schema.PARTS)
    optuna.db        Optuna's storage (Optuna searches)
    ray/<trial_id>/  Ray's trial directories: params.json, result.json, checkpoint_*/
    wandb/           W&B offline runs (one per trial, the study's own, reports'; ``wandb sync`` uploads them)

When every trial has ended (``study run``, and again after each ``study resume``), the study's
own W&B run logs the final trials table (:func:`track_study`).
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vertstudy.config import Config, flat_config
from vertstudy.errors import ConfigError, StorageError
from vertstudy.study import storage
from vertstudy.study.compat import StagingTurn, realign_search, replace_callbacks
from vertstudy.study.dataset import StudyData, materialize
from vertstudy.study.refresh import TableRefresh, sync_tables
from vertstudy.study.results import EXPERIMENT, experiment_dir, experiment_states
from vertstudy.study.schema import STATUS_HEADINGS, to_table
from vertstudy.study.search import open_optuna_storage, optuna_storage_url, scheduler, search_algorithm
from vertstudy.study.spec import StudySpec, total_trials, validate_spec
from vertstudy.study.tables import build_tables, write_table, write_tables
from vertstudy.study.tracking import WandbSettings, log_study


@dataclass
class StudyResult:
    """What a run or resume ended with."""

    study_dir: str
    counts: dict[str, int] = field(default_factory=dict)  # trials per status
    best: dict[str, Any] = field(default_factory=dict)  # the best ended trial's row
    baseline: dict[str, float] = field(default_factory=dict)
    wall_s: float = 0.0
    interrupted: bool = False
    freed_bytes: int = 0  # the resume state (last.pt) of ended trials deleted at the end (drop_training_state)


def study_dir_of(spec: StudySpec) -> str:
    return storage.uri_join(spec.storage, spec.name)


def _git_sha() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def _meta(spec: StudySpec) -> dict[str, Any]:
    """Provenance every ``trials.parquet`` row carries, and whether trials log to W&B."""
    from vertstudy import __version__

    one = not spec.search.multi_objective  # a multi-objective search has no single metric
    return {"vertstudy_version": __version__, "git_sha": _git_sha(), "wandb": spec.wandb.mode != "disabled",
            "cpus": float(spec.resources.cpus), "gpus": float(spec.resources.gpus),
            "search_metric": spec.search.metric if one else "", "search_mode": spec.search.mode if one else ""}


def _work_dir(spec: StudySpec) -> Path:
    """Local directory for phantoms and the default cache: the storage itself when it is local."""
    if storage.is_local(spec.storage):
        return storage.local_path(spec.storage)
    return Path.home() / ".cache" / "vertstudy"


def wandb_settings(spec: StudySpec, study_dir: str) -> WandbSettings:
    """The study's W&B mode, project and entity; runs are written under the study directory when it is local."""
    wdir = storage.local_path(study_dir) if storage.is_local(study_dir) else None
    return WandbSettings(mode=spec.wandb.mode, project=spec.wandb.project, entity=spec.wandb.entity, dir=wdir)


def trial_dirname(trial) -> str:
    """Trial directories are named by trial id (the tables' key)."""
    return str(trial.trial_id)


def _ensure_ray(address: str | None) -> None:
    import ray

    if ray.is_initialized():
        return
    if address:
        try:
            ray.init(address=address, log_to_driver=False)
        except Exception as exc:  # unreachable, wrong token, version mismatch: one line, no traceback
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            raise ConfigError(
                f"--address {address}: cannot connect to the Ray cluster ({first}); is it running, and do "
                "RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH name its token?"
            ) from None
    else:  # an embedded local cluster; cap the object store (it claims 30% of RAM by default)
        ray.init(include_dashboard=False, log_to_driver=False, object_store_memory=256 * 1024 * 1024)


def _quiet_ray() -> None:
    # (Tune's settings that only the environment carries, e.g. a 1 s experiment-state save, are
    # set by the process's entry point: vertstudy.study.compat.driver_environment.)
    for name in ("ray.tune", "ray.train", "ray.air"):
        logging.getLogger(name).setLevel(logging.ERROR)
    storage.quiet_missing_deletes()  # a checkpoint already gone is not an error
    for name in ("ray.tune.execution.tune_controller", "ray.tune.execution.experiment_state"):
        logger = logging.getLogger(name)  # a failed trial, a failed save of Ray's state (a full disk)
        if not any(isinstance(f, _OneLineTrialErrors) for f in logger.filters):
            logger.addFilter(_OneLineTrialErrors())


class _OneLineTrialErrors(logging.Filter):
    """A failed trial (an exception in it, or its node died) is logged by Tune with a full
    traceback; keep one line: which trial and the exception's own message. Its retry, the
    tables' ``message`` column and Ray's result files keep the whole story."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            if isinstance(exc, FileNotFoundError) and "Error handling checkpoint" in str(record.msg):
                # a resumed trial's restored state names a checkpoint deleted since (num_to_keep):
                # Ray registered the new one before it failed to delete the old; nothing is lost
                return False
            first = (str(exc).strip().splitlines() or [""])[0][:300]
            then = " (retried if retries remain)" if "tune_controller" in record.name else ""
            record.msg = f"{record.getMessage().rstrip(': ')}: {type(exc).__name__}: {first}{then}"
            record.args, record.exc_info, record.exc_text = (), None, None
        return True


def _trainable(spec: StudySpec, data: StudyData, study_dir: str):
    from ray import tune

    from vertstudy.study.trial import TrialSetup, run_trial

    setup = TrialSetup(spec=spec, data=data)
    return tune.with_resources(
        tune.with_parameters(run_trial, setup=setup), {"cpu": spec.resources.cpus, "gpu": spec.resources.gpus}
    )


def _callbacks(spec: StudySpec, study_dir: str, meta: dict, progress: bool, extra: tuple = ()) -> list:
    from ray.tune.logger import JsonLoggerCallback

    from vertstudy.study.live import LiveTable, TablesCallback, TrackingCallback

    # the JSON logger writes each trial's result.json, which the tables are rebuilt from; Tune's
    # other default loggers are off by default (vertstudy.study.compat.driver_environment)
    tables = TablesCallback(TableRefresh(spec, study_dir, meta))
    tracking = TrackingCallback(spec, wandb_settings(spec, study_dir))  # the trials' W&B runs; before the tables
    return [tracking, tables, *([LiveTable(spec)] if progress else []), *extra, JsonLoggerCallback()]


def _fit(tuner, turn: StagingTurn, spec: StudySpec, study_dir: str, meta: dict, t0: float, discard: bool = False
         ) -> StudyResult:
    """``tuner.fit()``, then the tables. ``turn``: the :class:`StagingTurn` among the tuner's
    callbacks (this driver's turn to name its staging folder on this host)."""
    interrupted = False
    try:
        with turn:
            tuner.fit()
    except KeyboardInterrupt:
        interrupted = True
    except Exception as exc:
        full = storage_full_reason(exc)
        if full is None:
            raise
        raise StorageError(  # Optuna's database or Ray's state could not be written: stop, resumable
            f"{study_dir}: the storage is full ({full}); every trial that ended is kept: free space, then "
            f"`vertstudy study resume {study_dir}`"
        ) from None
    if discard:  # a killed driver's last trial may have been started after our first look
        discard_unrecorded_trials(study_dir)
    try:
        statuses = sync_tables(spec, study_dir, meta)  # every ended trial once, the parts compacted
    except OSError as exc:  # a full disk: Ray's results are intact, the tables can be rebuilt
        raise StorageError(
            f"{study_dir}: could not write the study tables ({exc.strerror or exc}); the trials' results are kept: "
            f"free space, then `vertstudy study resume {study_dir}`"
        ) from None
    # Tune handles Ctrl-C itself (it saves its state and returns): fewer ended trials than the
    # study has means it was interrupted, and its running Optuna trials continue on resume
    interrupted = interrupted or len(statuses) < total_trials(spec)
    freed = 0
    if not interrupted:
        reconcile_optuna(spec, study_dir)
        freed = drop_training_state(study_dir, statuses)
    result = summarize_study(spec, study_dir, statuses.values(), time.perf_counter() - t0, interrupted)
    result.freed_bytes = freed
    if not interrupted:
        track_study(spec, study_dir, result)
    return result


def _tuner(spec: StudySpec, data: StudyData, study_dir: str, meta: dict, progress: bool, extra: tuple = ()):
    from ray import tune

    from vertstudy.study.space import grid_space

    one_metric = not spec.search.multi_objective
    metric = spec.search.metric if one_metric else None
    mode = spec.search.mode if one_metric else None
    storage_path, storage_fs = storage.ray_storage(study_dir)
    search_alg, max_concurrent = search_algorithm(spec, study_dir)
    return tune.Tuner(
        _trainable(spec, data, study_dir),
        param_space=grid_space(spec) if spec.search.is_grid else {},
        tune_config=tune.TuneConfig(
            metric=metric, mode=mode, search_alg=search_alg, scheduler=scheduler(spec, study_dir),
            num_samples=spec.num_samples, max_concurrent_trials=max_concurrent, reuse_actors=True,
            trial_dirname_creator=trial_dirname, trial_name_creator=trial_dirname,
        ),
        run_config=tune.RunConfig(
            name=EXPERIMENT, storage_path=storage_path, storage_filesystem=storage_fs, verbose=0,
            callbacks=_callbacks(spec, study_dir, meta, progress, extra),
            failure_config=tune.FailureConfig(max_failures=spec.max_retries),
            # the newest checkpoints, not the best-scoring: every checkpoint carries the trial's own
            # best.pt, a resume needs the latest and a corrupt latest falls back to the one before
            # (ranking by score kept the k best plus the latest: one more 13 MB last.pt per trial)
            checkpoint_config=tune.CheckpointConfig(num_to_keep=spec.keep_checkpoints),
        ),
    )


def drop_training_state(study_dir: str, statuses: dict[str, str]) -> int:
    """Delete ``last.pt`` from every checkpoint Ray kept of the trials that ended for good
    (``statuses``: ``{trial_id: status}``; every status but ``error``); returns the bytes freed.

    ``last.pt`` is the state only a resume needs (weights, Adam's moments, scheduler and RNG
    states): two thirds of a checkpoint, most of it the LSTMs' optimizer state. A completed,
    diverged or pruned trial is never resumed (a study resume restarts only errored and
    unfinished trials); its ``best.pt``, final report and held-out rows stay, in both kept
    checkpoints. Called when every trial of the study has ended, so no trial is still writing
    or restoring; an errored trial keeps its ``last.pt`` for ``study resume``. A file that cannot
    be deleted is left (one warning line): the study's results do not depend on it."""
    import pyarrow.fs as pafs

    fs, base = storage.resolve(experiment_dir(study_dir))
    freed = 0
    for trial_id, status in sorted(statuses.items()):
        if status == "error":
            continue
        try:
            infos = fs.get_file_info(pafs.FileSelector(storage.join(base, trial_id), recursive=True,
                                                        allow_not_found=True))
        except OSError:
            continue
        for info in infos:
            if info.type != pafs.FileType.File or info.base_name != "last.pt" or "/checkpoint_" not in info.path:
                continue
            try:
                fs.delete_file(info.path)
            except OSError as exc:
                logging.getLogger(__name__).warning("%s: could not delete (%s); it only costs space",
                                                    info.path, exc.strerror or exc)
                continue
            freed += info.size or 0
    return freed


def storage_full_reason(exc: BaseException) -> str | None:
    """The message of the full-disk error (ENOSPC, EDQUOT, SQLite's "database or disk is full")
    behind ``exc`` or any exception it was raised from; ``None`` when there is none."""
    import errno

    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return exc.strerror or str(exc)
        text = str(exc)
        for sign in ("No space left on device", "database or disk is full", "Disk quota exceeded"):
            if sign in text:
                return sign
        exc = exc.__cause__ or exc.__context__
    return None


def write_baseline(spec: StudySpec, study_dir: str, data: StudyData) -> dict[str, float]:
    """``baseline.parquet``: the mean-position baseline on the held-out cases (trained on the
    train + validation cases), and ``cases.parquet``: sagittal / coronal views of the held-out
    cases for the reports' failure gallery; returns the baseline's summary."""
    from vertstudy.infer.evaluate import baseline_case_rows
    from vertstudy.study.dataset import case_view_row
    from vertstudy.study.schema import held_out_rows
    from vertstudy.train.metrics import summarize

    test = data.cases("test")
    per_case = baseline_case_rows(data.cases("train") + data.cases("val"), test)
    rows = [{"study": spec.name, "trial_id": "baseline", **r} for r in held_out_rows(per_case)]
    write_table(study_dir, "baseline", to_table(rows, "baseline"))
    write_table(study_dir, "cases", to_table([case_view_row(c) for c in test], "cases"))
    return {k: float(v) for k, v in summarize([r for _, rs in per_case for r in rs]).items()}


def prepare_study(spec: StudySpec, progress: bool = True) -> tuple[str, StudyData]:
    """Every check that can fail before a trial starts, then the data; returns (study dir, data)."""
    study_dir = study_dir_of(spec)
    storage.check_writable(spec.storage)
    if storage.exists(storage.uri_join(study_dir, EXPERIMENT)) or storage.exists(storage.uri_join(study_dir,
                                                                                                   "study.json")):
        raise ConfigError(
            f"storage: {study_dir} already holds study {spec.name!r}; continue it with `vertstudy study resume "
            f"{study_dir}`, or give another name or --storage"
        )
    if not spec.search.is_grid:
        optuna_storage_url(spec, study_dir)
    shared = spec.data.shared_cache or (storage.uri_join(spec.storage, "_cache") if not storage.is_local(spec.storage)
                                        else None)
    data = materialize(spec.data, spec.base_config, _work_dir(spec), progress=progress, shared=shared)
    fs, path = storage.resolve(study_dir)
    fs.create_dir(path, recursive=True)  # only now: a study that fails its checks leaves no directory
    storage.write_text(storage.uri_join(study_dir, "split.json"), data.to_json())
    storage.write_text(storage.uri_join(study_dir, DEFAULTS_FILE), json.dumps(flat_config(Config()), indent=1))
    storage.write_text(storage.uri_join(study_dir, "study.json"), spec.model_dump_json(indent=1))
    return study_dir, data


def run_study(spec: StudySpec, address: str | None = None, progress: bool = True, callbacks: tuple = ()
              ) -> StudyResult:
    """Run a validated study from scratch (see the module docstring). ``callbacks``: extra Tune
    callbacks (benchmarks use them to time events)."""
    from vertstudy.study.lease import DriverLease, claim_optuna_study

    t0 = time.perf_counter()
    _quiet_ray()
    storage.check_writable(spec.storage)
    with DriverLease(study_dir_of(spec), spec.name):  # one live driver per study, refused before Ray speaks
        if not storage.exists(storage.uri_join(study_dir_of(spec), "study.json")):  # (else prepare_study refuses)
            claim_optuna_study(spec, study_dir_of(spec), fresh=True)  # another directory's Optuna study: refused
        if address:  # a cluster that cannot be reached fails before the study directory exists
            _ensure_ray(address)
        study_dir, data = prepare_study(spec, progress=progress)
        write_baseline(spec, study_dir, data)
        meta = _meta(spec)
        _ensure_ray(address)
        write_tables(study_dir, build_tables(spec.name, [], meta))
        turn = StagingTurn()
        return _fit(_tuner(spec, data, study_dir, meta, progress, (turn, *callbacks)), turn, spec, study_dir, meta, t0)


def load_study_dir(study_dir: str, pin_defaults: bool = True) -> tuple[StudySpec, StudyData]:
    """The study and split saved in a study directory; ``ConfigError`` if it is not one.
    ``pin_defaults``: the study's config also sets every default changed since the study began
    to its old value (:func:`changed_defaults`), as its trials trained; off, it is the study's
    own settings only (what a study file is compared with)."""

    path = storage.uri_join(study_dir, "study.json")
    if not storage.exists(path):
        raise ConfigError(f"{study_dir}: not a study directory (no study.json); give <storage>/<study name>")
    raw = json.loads(storage.read_text(path))
    if isinstance(raw, dict) and isinstance(raw.get("search"), dict) and "reproducible" not in raw["search"]:
        raw["search"]["reproducible"] = False  # saved before search.reproducible: it ran Tune's way
    if pin_defaults and isinstance(raw, dict) and isinstance(raw.get("config", {}), dict):
        raw["config"] = {**changed_defaults(study_dir, raw.get("config", {})), **raw.get("config", {})}
    spec = validate_spec(raw, path)
    data = StudyData.from_json(storage.read_text(storage.uri_join(study_dir, "split.json")))
    return spec, data


#: the study directory's record of every config field's default when the study began
DEFAULTS_FILE = "defaults.json"

#: config fields added after ``defaults.json`` began to be written, each with the value that keeps
#: the behaviour from before it existed (what :func:`changed_defaults` pins for an older study)
ADDED_FIELDS: dict[str, Any] = {
    "infer.tiles_per_crop": 2,  # tiles every half crop
    "infer.centre_weight": 0.0,  # centroids weighted by probability alone
    "infer.kmeans_threshold": None,  # K-means with infer.threshold
    "infer.kmeans_centre_weight": None,  # and infer.centre_weight
    "train.whole_ct_tiles_per_crop": 0,  # whole-CT validations tiled as infer.stride
}


def changed_defaults(study_dir: str, config: dict[str, Any]) -> dict[str, Any]:
    """``{field: its default when the study began}`` for every field whose default has changed
    since and that the study's ``config`` does not set: study.json keeps only the study's own
    settings, so without these a resumed or extended study would train its later trials with
    today's defaults; a field added since (:data:`ADDED_FIELDS`) is pinned to the value that
    behaves as the code did then. Empty for a study begun before ``defaults.json`` was written
    (its defaults are not known; it trains with today's)."""
    path = storage.uri_join(study_dir, DEFAULTS_FILE)
    if not storage.exists(path):
        return {}
    try:
        saved = json.loads(storage.read_text(path))
    except ValueError as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc}); restore it or delete it to resume with "
                          "today's defaults") from None
    if not isinstance(saved, dict):
        raise ConfigError(f"{path}: must map config fields to values, got {type(saved).__name__}")
    today = flat_config(Config())
    pins = {k: v for k, v in saved.items() if k in today and k not in config and today[k] != v}
    # a field added since the study began: the value under which the code behaves as it did then
    pins.update({k: v for k, v in ADDED_FIELDS.items() if k not in saved and k not in config and today[k] != v})
    return pins


def resume_study(study_dir: str, address: str | None = None, progress: bool = True) -> StudyResult:
    """Continue an interrupted study: ended trials are kept, unfinished ones continue from their
    latest checkpoint, errored ones are retried, and new trials are sampled up to ``num_samples``.
    ``ConfigError`` while another driver of the study is alive (:mod:`vertstudy.study.lease`)."""
    from vertstudy.study.lease import DriverLease, claim_optuna_study

    study_dir = storage.canonical(study_dir)
    spec, data = load_study_dir(study_dir)
    with DriverLease(study_dir, spec.name):  # refuses while the study's driver is alive
        claim_optuna_study(spec, study_dir, fresh=False)  # and while another directory holds its Optuna study
        return _resume(study_dir, spec, data, address, progress)


def _resume(study_dir: str, spec: StudySpec, data: StudyData, address: str | None, progress: bool) -> StudyResult:
    from ray import tune

    t0 = time.perf_counter()
    exp = experiment_dir(study_dir)
    meta = _meta(spec)
    _quiet_ray()
    _ensure_ray(address)
    discard_unrecorded_trials(study_dir)
    repair_lost_checkpoints(study_dir)
    if not storage.exists(storage.uri_join(study_dir, "cases.parquet")):  # killed before run_study wrote them
        write_baseline(spec, study_dir, data)
    sync_tables(spec, study_dir, meta)  # trials the stopped driver saw end but did not write; compacted
    turn = StagingTurn()
    exp_path, exp_fs = storage.ray_storage(exp)
    if not tune.Tuner.can_restore(exp_path, storage_filesystem=exp_fs):
        # killed before Ray saved its first state: nothing ran yet, start the trials afresh
        return _fit(_tuner(spec, data, study_dir, meta, progress, (turn,)), turn, spec, study_dir, meta, t0)
    from vertstudy.study.space import grid_space

    tuner = tune.Tuner.restore(
        exp_path, trainable=_trainable(spec, data, study_dir), resume_unfinished=True, resume_errored=True,
        param_space=grid_space(spec) if spec.search.is_grid else {}, storage_filesystem=exp_fs,
    )
    # the restored run config carries the callbacks pickled by the killed driver: use fresh ones
    replace_callbacks(tuner, _callbacks(spec, study_dir, meta, progress, (turn,)))
    if spec.search.reproducible:  # the searcher's saved state may be older or newer than Ray's
        realign_search(tuner, experiment_states(study_dir), study_dir)
    return _fit(tuner, turn, spec, study_dir, meta, t0, discard=True)


def discard_unrecorded_trials(study_dir: str) -> list[str]:
    """Move trial directories that Ray's saved state does not know to ``ray/.discarded/``.

    A driver killed right after starting a trial, before Ray saved its state, leaves a trial
    directory that no resume will continue (Ray samples a new trial in its place, and its
    Optuna trial is marked FAIL when the study ends). Moving it aside keeps every table row a
    trial Ray knows; nothing is deleted from the storage (a folder discarded twice keeps both
    copies). Its local copy in the killed driver's staging folder, when this host has one, is
    deleted: see below. Returns the discarded trial ids."""
    import shutil

    import pyarrow.fs as pafs

    from vertstudy.study.compat import driver_staging_dir
    from vertstudy.study.results import newest_state, trial_dirs, trial_statuses

    state = newest_state(study_dir)
    known = trial_statuses(state)
    fs, base = storage.resolve(experiment_dir(study_dir))
    discarded = [tid for tid in trial_dirs(study_dir) if tid not in known]
    if discarded:
        fs.create_dir(storage.join(base, ".discarded"), recursive=True)
    for tid in discarded:
        aside = storage.join(base, ".discarded", tid)
        if fs.get_file_info(aside).type != pafs.FileType.NotFound:  # discarded before: keep both
            aside = f"{aside}-{int(time.time() * 1000)}"
        fs.move(storage.join(base, tid), aside)
    # the killed driver's local copies of trials Ray does not know (some never reached the
    # storage), in its staging folder, which a resumed driver on this host reuses: left there, Ray
    # would upload them into the storage again, and a trial asked again under its id (stable ids)
    # would find its folder taken and write to '<id>_<4 hex>' instead
    staging = driver_staging_dir(state)
    if staging is not None and staging.is_dir():
        for folder in staging.iterdir():
            if folder.is_dir() and not folder.name.startswith(".") and folder.name not in known:
                shutil.rmtree(folder, ignore_errors=True)
    return discarded


def repair_lost_checkpoints(study_dir: str) -> list[tuple[str, str, str]]:
    """Before Tune restores the study: its saved experiment state stops naming checkpoints that
    are gone from the storage (deleted by ``num_to_keep`` after the killed driver's last save,
    :func:`vertstudy.study.compat.forget_lost_checkpoints`), so those trials replay from an
    older kept checkpoint or from epoch 1 instead of failing. The state file is rewritten
    atomically, only when something changed. Returns what changed, each also said on stderr."""
    import pyarrow.fs as pafs

    from vertstudy.study.compat import forget_lost_checkpoints
    from vertstudy.study.results import newest_state_file, read_state

    fs, path = newest_state_file(study_dir)
    if path is None:
        return []
    state = read_state(fs, path)
    trials = path.rsplit("/", 1)[0]

    def exists(trial_id: str, name: str) -> bool:
        return fs.get_file_info(storage.join(trials, trial_id, name)).type != pafs.FileType.NotFound

    changed = forget_lost_checkpoints(state, exists)
    if changed:
        text = json.dumps(state).encode("utf-8")

        def write(f, tmp: str) -> None:
            with f.open_output_stream(tmp) as out:
                out.write(text)

        storage.write_atomic(storage.uri_join(experiment_dir(study_dir), path.rsplit("/", 1)[-1]), write)
        for trial_id, lost, now in changed:
            then = f"resumes from {now}" if now else "starts again from epoch 1"
            print(f"vertstudy: trial {trial_id}: its {lost} is gone from the storage (Ray deleted it after the "
                  f"driver's last save); it {then} and replays the epochs since", file=sys.stderr, flush=True)
    return changed


def reconcile_optuna(spec: StudySpec, study_dir: str) -> int:
    """Once every trial has ended: mark Optuna trials still RUNNING as FAIL. They were sampled by
    a driver killed before Ray saved the trial they belonged to, so no Ray trial will ever report
    them. Returns how many. Nothing for grid studies."""
    if spec.search.is_grid:
        return 0
    import optuna

    try:
        study = optuna.load_study(study_name=spec.name, storage=open_optuna_storage(spec, study_dir))
    except KeyError:
        return 0
    stale = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.RUNNING]
    for t in stale:
        study.tell(t.number, state=optuna.trial.TrialState.FAIL)
    return len(stale)


def summarize_study(spec: StudySpec, study_dir: str, statuses, wall_s: float, interrupted: bool) -> StudyResult:
    """``statuses``: the status of every ended trial."""
    from vertstudy.study.objective import metric_objective
    from vertstudy.study.tables import read_table

    counts: dict[str, int] = {}
    for status in statuses:
        counts[status] = counts.get(status, 0) + 1
    rows = read_table(study_dir, "trials").to_pylist()
    metric = spec.search.metric
    objective = metric_objective(metric, spec.search.mode)  # the report ranks by the same rule
    scored = [r for r in rows if r.get("status") == "completed" and r.get(f"best_{metric}") is not None
              and r[f"best_{metric}"] == r[f"best_{metric}"]]
    best = min(scored, key=lambda r: (*objective.row_key(r), r["trial_id"])) if scored else {}
    return StudyResult(study_dir, counts, best, baseline_summary(study_dir), wall_s, interrupted)


def track_study(spec: StudySpec, study_dir: str, result: StudyResult) -> str | None:
    """The study's own W&B run (:func:`vertstudy.study.tracking.log_study`): the study spec as config, the final
    ``trials.parquet`` as the table ``trials``, and in the summary the best trial, its searched metric and held-out
    figures, and the number of trials in all (``n_trials``) and by status (``n_completed``...). Returns its id;
    None when W&B is disabled or failed (one warning line: the study still ends normally)."""
    from vertstudy.study.schema import STATUSES
    from vertstudy.study.tables import read_table

    rows = read_table(study_dir, "trials").to_pylist()
    best, metric = result.best, spec.search.metric
    summary: dict[str, Any] = {"n_trials": len(rows), **{f"n_{s}": 0 for s in STATUSES},
                               **{f"n_{s}": n for s, n in result.counts.items()}}
    if best:
        summary |= {"best_trial": best["trial_id"], "search_metric": metric, f"best_{metric}": best.get(
            f"best_{metric}"), **{f"best_trial_{k}": best.get(k) for k in ("test_id_rate", "test_loc_error_mm_mean",
                                                                           "test_id_rate_verse")}}
    return log_study(wandb_settings(spec, study_dir), spec.name, spec.model_dump(mode="json"), rows,
                     list(spec.space), summary)


def baseline_summary(study_dir: str) -> dict[str, float]:
    """The summary of ``baseline.parquet`` (empty if the study has none)."""
    from vertstudy.study.tables import read_table
    from vertstudy.train.metrics import summarize

    base = read_table(study_dir, "baseline").to_pylist()
    return {k: float(v) for k, v in summarize(base).items()} if base else {}


def export_tables(study_dir: str) -> dict[str, str]:
    """``study export``: rebuild the three tables from Ray's results in the study directory;
    returns ``{trial_id: status}`` of the ended trials."""
    study_dir = storage.canonical(study_dir)
    spec, _ = load_study_dir(study_dir)
    return sync_tables(spec, study_dir, _meta(spec), rebuild=True)


def study_status(study_dir: str) -> tuple[StudySpec, list[dict[str, Any]], dict[str, float]]:
    """(study, one row per trial: ended trials from ``trials.parquet``, then trials still pending
    or running per Ray's saved state, each with its sampled values by parameter name; baseline
    summary). Parameters a trial did not sample (inactive conditionals) are absent."""
    import json

    from vertstudy.study.results import experiment_states, read_trial
    from vertstudy.study.tables import read_table

    study_dir = storage.canonical(study_dir)
    spec, _ = load_study_dir(study_dir)
    rows = []
    for r in read_table(study_dir, "trials").to_pylist():
        row = {k: r.get(k) for k in STATUS_HEADINGS}
        row.update(json.loads(r.get("params") or "{}"))
        rows.append(row)
    ended = {r["trial_id"] for r in rows}
    for trial_id, state in sorted(experiment_states(study_dir).items()):
        if trial_id in ended:
            continue
        params, results = read_trial(study_dir, trial_id)
        last = results[-1] if results else {}
        rows.append({"trial_id": trial_id, "status": state.lower(), "epochs": last.get("epoch"), **params})
    return spec, rows, baseline_summary(study_dir)
