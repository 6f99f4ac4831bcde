"""``vertstudy bench study``: what does the platform cost per trial?

``trials`` identical short trials (the real network at smoke scale, a fixed number of epochs on
the same phantoms, a random ``loss.balance_b`` that does not change the compute) run twice,
side by side in one invocation:

- **plain**: Optuna alone in this process, ``study.optimize(n_jobs=concurrency)``; each trial
  calls the trainer and the held-out evaluation directly (no Ray, no W&B, no checkpoints
  reported, no tables);
- **platform**: ``run_study`` on a local Ray cluster started beforehand (its start-up time is
  reported apart): the trial adapter, Tune checkpoints, W&B offline runs, Optuna storage and
  the Parquet tables after every trial;
- **bare Tune**: then, on the same cluster, the same trials as a bare Tune search: a function
  trainable that trains, evaluates and reports each epoch's record, ``tune.uniform`` over B,
  one CPU per trial, actors reused; no checkpoints, callbacks, Optuna, W&B or tables. This is
  the floor of any Tune-based platform: Ray starts a new worker process for each trial actor
  (it never gives an actor a process that ran tasks or was pre-started), which imports
  ray.tune and torch before the trial starts.

This process imports ray.tune (through :mod:`vertstudy.study.runner`) before any side is
timed, so no side's time includes it (about 1.2 s in a fresh process, as ``study run`` pays).

``overhead_per_trial_s`` = (platform - plain) wall time x concurrency / trials: the extra
seconds each trial costs a worker slot; ``bare_tune_overhead_per_trial_s`` is the same for
bare Tune, and ``vertstudy_overhead_per_trial_s`` (platform - bare Tune) what vertstudy adds
to Tune.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from vertstudy.bench import B_ONLY, format_figures, local_ray, smoke_study, work_folder

#: the range every side draws B from: the platform's search space (B does not change a trial's compute)
_B_RANGE = (B_ONLY["loss.balance_b"]["low"], B_ONLY["loss.balance_b"]["high"])


def _one_trial(spec, data, balance_b: float, work: Path, on_epoch=None) -> float:
    """What every side's trial does: train the smoke network with ``loss.balance_b``, label the
    held-out CTs; returns the best epoch's ``val_loc_error_mm``. ``on_epoch``: the trainer's."""
    import torch

    from vertstudy.infer.evaluate import whole_ct_figures
    from vertstudy.study.space import trial_config
    from vertstudy.study.trial import evaluate_held_out
    from vertstudy.train.trainer import train

    torch.set_num_threads(1)
    cfg = trial_config(spec, {"loss.balance_b": balance_b})
    out = Path(tempfile.mkdtemp(dir=work))
    result = train(cfg, data.cases("train"), data.cases("val"), out, whole_ct=whole_ct_figures, on_epoch=on_epoch)
    evaluate_held_out(result.best_checkpoint, data, "cpu")
    return float(result.best_metrics.get("val_loc_error_mm", float("nan")))


def _plain_optuna(spec, data, concurrency: int, work: Path) -> float:
    """Wall seconds of the same trials through Optuna alone, ``concurrency`` threads."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)

    def objective(trial) -> float:
        return _one_trial(spec, data, trial.suggest_float("loss.balance_b", *_B_RANGE), work)

    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    t0 = time.perf_counter()
    study.optimize(objective, n_trials=spec.num_samples, n_jobs=concurrency)
    return time.perf_counter() - t0


def _bare_tune_trial(config: dict, spec=None, data=None, work: str = "") -> None:
    """One bare-Tune trial (module docstring): the plain side's work, each epoch reported."""
    from ray import tune

    _one_trial(spec, data, config["loss.balance_b"], Path(work), on_epoch=lambda record: tune.report(record))


def _bare_tune(spec, data, concurrency: int, work: Path) -> tuple[float, int]:
    """Wall seconds of the same trials as a bare Tune search (module docstring), and how many completed."""
    from ray import tune

    t0 = time.perf_counter()  # the Tuner's construction too, as the platform's time includes its own
    trainable = tune.with_resources(tune.with_parameters(_bare_tune_trial, spec=spec, data=data, work=str(work)),
                                    {"cpu": 1})
    tuner = tune.Tuner(
        trainable,
        param_space={"loss.balance_b": tune.uniform(*_B_RANGE)},
        tune_config=tune.TuneConfig(num_samples=spec.num_samples, max_concurrent_trials=concurrency, reuse_actors=True),
        run_config=tune.RunConfig(storage_path=str(work / "bare-tune"), name="bare", verbose=0),
    )
    results = tuner.fit()
    seconds = time.perf_counter() - t0
    return seconds, sum(r.error is None for r in results)


def bench_study(
    trials: int = 8, concurrency: int = 2, epochs: int = 4, wandb: str = "offline", workdir: Path | None = None,
    progress: bool = True,
) -> dict:
    """Figures of the module docstring (names carry units)."""
    from vertstudy.study.dataset import materialize
    from vertstudy.study.runner import run_study

    with work_folder(workdir, "vs-bench-", "/tmp") as work:
        stamp = time.strftime("%H%M%S")
        spec = smoke_study(work / "st", f"bench-{stamp}", "bench study", trials=trials, epochs=epochs,
                           concurrency=concurrency, wandb=wandb)
        data = materialize(spec.data, spec.base_config, work / "st", progress=progress)  # not timed
        plain_s = _plain_optuna(spec, data, concurrency, work)

        with local_ray(work, concurrency) as ray_init_s:
            t0 = time.perf_counter()
            result = run_study(spec, progress=progress)
            platform_s = time.perf_counter() - t0
            if progress:
                print("[bench study] the same trials as a bare Tune search ...", file=sys.stderr, flush=True)
            bare_s, bare_completed = _bare_tune(spec, data, concurrency, work)
        return {
            "trials": trials,
            "concurrency": concurrency,
            "epochs_per_trial": epochs,
            "trials_completed": result.counts.get("completed", 0),
            "bare_tune_trials_completed": bare_completed,
            "plain_optuna_s": plain_s,
            "platform_s": platform_s,
            "bare_tune_s": bare_s,
            "platform_to_plain_ratio": platform_s / plain_s,
            "overhead_per_trial_s": (platform_s - plain_s) * concurrency / trials,
            "bare_tune_overhead_per_trial_s": (bare_s - plain_s) * concurrency / trials,
            "vertstudy_overhead_per_trial_s": (platform_s - bare_s) * concurrency / trials,
            "ray_local_start_s": ray_init_s,
        }


def format_table(figures: dict) -> str:
    return format_figures("vertstudy bench study", figures)
