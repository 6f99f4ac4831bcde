"""The search algorithm and the trial scheduler of a study.

Optuna searches (TPE, random, multi-objective) run through Ray's ``OptunaSearch`` with a
persistent storage; grids use Tune's own grid expansion; ASHA stops weak trials by epoch.
"""

from __future__ import annotations

from ray.tune.search.optuna import OptunaSearch

from vertstudy.config import load_config
from vertstudy.errors import ConfigError
from vertstudy.study import storage
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
            self._completed_trials.add(trial_id)


def optuna_storage_url(spec: StudySpec, study_dir: str) -> str:
    if spec.search.optuna_storage:
        return spec.search.optuna_storage
    if not storage.is_local(study_dir):
        raise ConfigError(
            f"search.optuna_storage: not set, and storage {spec.storage!r} is not a local directory; "
            "give a database URL (e.g. postgresql://host/db) for Optuna"
        )
    return f"sqlite:///{storage.local_path(study_dir) / 'optuna.db'}"


def searcher(spec: StudySpec, study_dir: str):
    """Tune's search algorithm (None for grid: Tune's own grid expansion)."""
    if spec.search.algorithm == "grid":
        return None
    import optuna

    from vertstudy.study.space import define_by_run

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    store = optuna.storages.RDBStorage(optuna_storage_url(spec, study_dir))
    seed = spec.search.seed
    if spec.search.algorithm == "random":
        sampler, metric, mode = optuna.samplers.RandomSampler(seed=seed), spec.search.metric, spec.search.mode
    elif spec.search.algorithm == "optuna-multi":
        sampler = optuna.samplers.TPESampler(seed=seed)
        metric, mode = list(spec.search.metrics), list(spec.search.modes)
    else:
        sampler, metric, mode = optuna.samplers.TPESampler(seed=seed), spec.search.metric, spec.search.mode
    return ResumableOptunaSearch(
        space=define_by_run(spec), metric=metric, mode=mode, sampler=sampler, study_name=spec.name, storage=store
    )


def scheduler(spec: StudySpec):
    if spec.scheduler.kind == "none":
        return None
    from ray.tune.schedulers import ASHAScheduler

    # max_t beyond the last epoch: ASHA stops a trial that reaches max_t, which would cut off
    # its final report (evaluation on the held-out cases); trials end by themselves instead.
    epochs = load_config(spec.config).train.epochs
    return ASHAScheduler(
        time_attr="epoch", max_t=max(epochs, spec.scheduler.grace_period) + 1,
        grace_period=spec.scheduler.grace_period,
        reduction_factor=spec.scheduler.reduction_factor,
    )


