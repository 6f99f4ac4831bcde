"""``vertstudy bench study``: what does the platform cost per trial?

``trials`` identical short trials (the real network at smoke scale, a fixed number of epochs on
the same phantoms, a random ``loss.balance_b`` that does not change the compute) run twice,
side by side in one invocation:

- **plain**: Optuna alone in this process, ``study.optimize(n_jobs=concurrency)``; each trial
  calls the trainer and the held-out evaluation directly (no Ray, no W&B, no checkpoints
  reported, no tables);
- **platform**: ``run_study`` on a local Ray cluster started beforehand (its start-up time is
  reported apart): the trial adapter, Tune checkpoints, W&B offline runs, Optuna storage and
  the Parquet tables after every trial.

``overhead_per_trial_s`` = (platform - plain) wall time x concurrency / trials: the extra
seconds each trial costs a worker slot.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from vertstudy.bench import format_figures, local_ray, smoke_study, work_folder


def _plain_optuna(spec, data, concurrency: int, work: Path) -> float:
    """Wall seconds of the same trials through Optuna alone, ``concurrency`` threads."""
    import optuna
    import torch

    from vertstudy.infer.evaluate import whole_ct_figures
    from vertstudy.study.space import trial_config
    from vertstudy.study.trial import evaluate_held_out
    from vertstudy.train.trainer import train

    torch.set_num_threads(1)
    train_cases, val_cases = data.cases("train"), data.cases("val")
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    def objective(trial) -> float:
        cfg = trial_config(spec, {"loss.balance_b": trial.suggest_float("loss.balance_b", 2.0, 4.0)})
        out = Path(tempfile.mkdtemp(dir=work))
        result = train(cfg, train_cases, val_cases, out, whole_ct=whole_ct_figures)
        evaluate_held_out(result.best_checkpoint, data, "cpu")
        return float(result.best_metrics.get("val_loc_error_mm", float("nan")))

    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    t0 = time.perf_counter()
    study.optimize(objective, n_trials=spec.num_samples, n_jobs=concurrency)
    return time.perf_counter() - t0


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
        return {
            "trials": trials,
            "concurrency": concurrency,
            "epochs_per_trial": epochs,
            "trials_completed": result.counts.get("completed", 0),
            "plain_optuna_s": plain_s,
            "platform_s": platform_s,
            "platform_to_plain_ratio": platform_s / plain_s,
            "overhead_per_trial_s": (platform_s - plain_s) * concurrency / trials,
            "ray_local_start_s": ray_init_s,
        }


def format_table(figures: dict) -> str:
    return format_figures("vertstudy bench study", figures)
