"""A study's search space as Optuna's define-by-run function (conditional spaces included) or as
a Tune grid, and the decoding of a trial's sampled values back into config values.

Choice values that Optuna cannot store (e.g. a crop size ``[48, 32, 32]``) are sampled by their
label (``"48x32x32"``, see :func:`vertstudy.study.spec.choice_label`) and decoded here.
"""

from __future__ import annotations

from typing import Any

from vertstudy.config import Config, load_config, with_derived_stride
from vertstudy.errors import ConfigError
from vertstudy.study.spec import StudySpec, choice_label, trial_seeds


def _active(when: dict[str, Any] | None, chosen: dict[str, Any]) -> bool:
    for cond, wanted in (when or {}).items():
        allowed = wanted if isinstance(wanted, list) else [wanted]
        if cond not in chosen or chosen[cond] not in allowed:
            return False
    return True


class DefineByRun:
    """``space(optuna_trial)``: suggests every active parameter in file order; a parameter with
    ``when`` is only suggested when its condition holds (Optuna records only what was suggested).
    A class, not a closure: Ray pickles the searcher with its experiment state."""

    def __init__(self, spec: StudySpec):
        self.params = dict(spec.space)

    def __call__(self, trial) -> None:
        chosen: dict[str, Any] = {}
        for name, p in self.params.items():
            if not _active(p.when, chosen):
                continue
            if p.type == "choice":
                labels = [choice_label(v) for v in p.values]
                label = trial.suggest_categorical(name, labels)
                chosen[name] = p.values[labels.index(label)]
            elif p.type == "int":
                chosen[name] = trial.suggest_int(name, int(p.low), int(p.high), step=p.step or 1)
            else:
                chosen[name] = trial.suggest_float(name, p.low, p.high, log=p.type == "logfloat")
        return None


def define_by_run(spec: StudySpec) -> DefineByRun:
    """Optuna's define-by-run space function of ``spec`` (see :class:`DefineByRun`)."""
    return DefineByRun(spec)


def grid_space(spec: StudySpec) -> dict[str, Any]:
    """Tune's ``param_space`` of a grid study: every choice parameter (by label), and ``seed``
    over :func:`trial_seeds` when ``repeats > 1``."""
    from ray import tune

    space: dict[str, Any] = {
        name: tune.grid_search([choice_label(v) for v in p.values]) for name, p in spec.space.items()
    }
    if spec.repeats > 1:
        space["seed"] = tune.grid_search(trial_seeds(spec))
    return space


def decode(spec: StudySpec, sampled: dict[str, Any]) -> dict[str, Any]:
    """Config values (dotted names) of a trial's sampled ``{name: value or label}``."""
    values: dict[str, Any] = {}
    for name, value in sampled.items():
        p = spec.space.get(name)
        if name == "seed" and p is None:
            values["seed"] = int(value)
        elif p is None:
            raise ConfigError(f"trial config: {name!r} is not a parameter of study {spec.name!r}")
        elif p.type == "choice":
            labels = [choice_label(v) for v in p.values]
            if value not in labels:
                raise ConfigError(f"trial config: {name}={value!r} is not one of {labels}")
            values[name] = p.values[labels.index(value)]
        elif p.type == "int":
            values[name] = int(value)
        else:
            values[name] = float(value)
    return values


def trial_config(spec: StudySpec, params: dict[str, Any]) -> Config:
    """The trial's config: the study's defaults, then the sampled values. Unless the study sets
    ``infer.stride``, it is derived from the trial's crop (``infer.tiles_per_crop`` tiles per crop
    length, :func:`vertstudy.config.with_derived_stride`). On a trial without a GPU an ``auto`` device
    means the CPU (never a GPU that Ray did not assign)."""
    values = {**spec.config, **decode(spec, params)}
    cfg = load_config(values, where=f"study {spec.name}: trial config")
    if "infer.stride" not in values:
        cfg = with_derived_stride(cfg)
    update: dict[str, Any] = {}
    if spec.resources.gpus == 0 and cfg.train.device == "auto":
        update["train"] = cfg.train.model_copy(update={"device": "cpu"})
    return cfg.model_copy(update=update) if update else cfg
