"""The search algorithm and the trial scheduler of a study.

Optuna searches (TPE, random, multi-objective) run through Ray's ``OptunaSearch`` with a
persistent storage; grids use Tune's own grid expansion; ASHA stops weak trials by epoch.

Optuna's storage is ``search.optuna_storage``: an SQLAlchemy URL (a server database such as
``postgresql://vertstudy@db-host/optuna`` for many writers on a cluster) or ``journal:<path>``
(Optuna's JournalStorage in a file, which Optuna supports on a shared file system); by default
SQLite in the study directory, for one machine. The URL never carries a password: Ray pickles
the search algorithm, storage URL included, into the study directory, and the URL is saved in
``study.json``. PostgreSQL's client library takes the password from ``PGPASSWORD`` (or
``~/.pgpass``) in the environment, which a cluster fills from a secret.
"""

from __future__ import annotations

from ray.tune.search.optuna import OptunaSearch

from vertstudy.errors import ConfigError
from vertstudy.study import storage
from vertstudy.study.compat import mark_completed
from vertstudy.study.spec import StudySpec


class ResumableOptunaSearch(OptunaSearch):
    """``OptunaSearch`` that survives a driver killed between telling Optuna a trial's result
    and saving its own state: on resume, Ray may rerun a trial whose Optuna trial is already
    COMPLETE in the storage; its further results are ignored instead of failing the study."""

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        import optuna

        try:
            super().on_trial_result(trial_id, result)
        except optuna.exceptions.UpdateFinishedTrialError:
            mark_completed(self, trial_id)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        """A trial that ended without its final report was stopped by the scheduler (ASHA): it is
        PRUNED in Optuna, keeping the intermediate values it reported, not COMPLETE with its
        early value (TPE would learn from truncated curves as if they were finished)."""
        if not error and result is not None and result.get("phase") != "final":
            result = None  # Ray's OptunaSearch tells PRUNED for a trial that ended without a value
        super().on_trial_complete(trial_id, result, error)


def open_optuna_storage(spec: StudySpec, study_dir: str):
    """The Optuna storage object of a study (see the module docstring)."""
    import optuna

    url = optuna_storage_url(spec, study_dir)
    try:
        if url.startswith("journal:"):
            from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

            path = url[len("journal:"):]
            return optuna.storages.JournalStorage(JournalFileBackend(path, lock_obj=JournalFileOpenLock(path)))
        return optuna.storages.RDBStorage(url)
    except Exception as exc:
        raise ConfigError(f"search.optuna_storage: cannot open {url!r} ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0][:200] if str(exc) else ''}); {ACCEPTED}") from None


ACCEPTED = ("accepted: an SQLAlchemy URL without a password (sqlite:///path, postgresql://user@host/db) "
            "or journal:<path>")


def check_optuna_url(url: str, where: str = "search.optuna_storage") -> str:
    """``url`` if it is a storage URL vertstudy accepts; a password in it is refused (masked)."""
    if url.startswith("journal:"):
        if not url[len("journal:"):].strip():
            raise ConfigError(f"{where}: 'journal:' needs a file path, e.g. journal:/shared/optuna.log")
        return url
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except ArgumentError:
        raise ConfigError(f"{where}: {url!r} is not a storage URL; {ACCEPTED}") from None
    if parsed.password:
        masked = parsed.render_as_string(hide_password=True)
        raise ConfigError(f"{where}: {masked} carries a password, which would be saved with the study; leave it out "
                          "and set PGPASSWORD (or ~/.pgpass) in the environment instead")
    return url


def optuna_storage_url(spec: StudySpec, study_dir: str) -> str:
    """The study's Optuna storage URL as written (``${NAME}`` not expanded)."""
    if spec.search.optuna_storage:
        return check_optuna_url(spec.search.optuna_storage)
    if not storage.is_local(study_dir):
        raise ConfigError(
            f"search.optuna_storage: not set, and storage {spec.storage!r} is not a local directory; "
            "give a database URL (e.g. postgresql://host/db) or journal:<shared path> for Optuna"
        )
    return f"sqlite:///{storage.local_path(study_dir) / 'optuna.db'}"


def searcher(spec: StudySpec, study_dir: str):
    """Tune's search algorithm (None for grid: Tune's own grid expansion)."""
    if spec.search.is_grid:
        return None
    import optuna

    from vertstudy.study.space import define_by_run

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    store = open_optuna_storage(spec, study_dir)
    seed = spec.search.seed
    if spec.search.algorithm == "random":
        sampler, metric, mode = optuna.samplers.RandomSampler(seed=seed), spec.search.metric, spec.search.mode
    elif spec.search.multi_objective:
        sampler = optuna.samplers.TPESampler(seed=seed, **tpe_settings(spec))
        metric, mode = list(spec.search.metrics), list(spec.search.modes)
    else:
        sampler = optuna.samplers.TPESampler(seed=seed, **tpe_settings(spec))
        metric, mode = spec.search.metric, spec.search.mode
    return ResumableOptunaSearch(
        space=define_by_run(spec), metric=metric, mode=mode, sampler=sampler, study_name=spec.name, storage=store
    )


def tpe_settings(spec: StudySpec) -> dict:
    """TPE's ``n_startup_trials`` (random trials before it models: ``search.startup_trials``, by
    default a third of ``num_samples``, 2 to 10; Optuna's own default, 10, would leave a small
    study random) and ``constant_liar`` (``search.constant_liar``, by default on when trials
    run at once, so parallel trials do not all sample the same point)."""
    startup = spec.search.startup_trials or max(2, min(10, spec.num_samples // 3))
    liar = spec.search.constant_liar if spec.search.constant_liar is not None else spec.concurrency > 1
    return {"n_startup_trials": int(startup), "constant_liar": bool(liar)}


def scheduler(spec: StudySpec):
    if spec.scheduler.kind == "none":
        return None
    from ray.tune.schedulers import ASHAScheduler

    # max_t beyond the last epoch: ASHA stops a trial that reaches max_t, which would cut off
    # its final report (evaluation on the held-out cases); trials end by themselves instead.
    epochs = spec.base_config.train.epochs
    return ASHAScheduler(
        time_attr="epoch", max_t=max(epochs, spec.scheduler.grace_period) + 1,
        grace_period=spec.scheduler.grace_period,
        reduction_factor=spec.scheduler.reduction_factor,
    )


