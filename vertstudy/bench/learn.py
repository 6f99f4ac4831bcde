"""``vertstudy bench learn``: does a CPU-sized network learn to label whole CTs within minutes?

Writes ``train_cases + test_cases`` coarse phantoms (default preset: mixed field of view,
metal, curvature, noise) and prepares them at ``spacing_mm``. The first ``train_cases`` are the
training pool, of which the last ``val_cases`` are the validation cases of the trainer (its
plateau schedule and ``best.pt``); the last ``test_cases`` are held out. A network of width
``width`` (paper's LSTM) trains with the real trainer for a time budget: one epoch is timed,
then the run resumes from its checkpoint up to the number of epochs that fits ``minutes``.

The held-out cases are then labelled on the *whole* CT by :mod:`vertstudy.train.inference`
(tiles at half a crop's stride, votes, K-means) with ``best.pt``, and scored with
:func:`vertstudy.train.metrics.match_case` / ``summarize`` in canonical millimetres
(``zyx_vox * spacing_mm``; the mapping to the scanner's space is a rigid one per case, so the
distances are the same). Baseline: every class present in a held-out case is predicted at
that class's mean canonical position (mm) over the training pool's cases that contain it.
"""

from __future__ import annotations

import math
import shutil
import tempfile
import time
from pathlib import Path

import torch

from vertstudy.bench import format_figures, prepared_phantoms
from vertstudy.config import Config
from vertstudy.data.cache import CachedCase
from vertstudy.train.evaluate import baseline_case_rows, checkpoint_case_rows


def learn_config(
    width: float, crop_size: tuple[int, int, int], spacing_mm: float, lr: float, workers: int, seed: int
) -> Config:
    """Paper defaults but for width, crop (inference stride: half the crop), spacing, lr and workers."""
    return Config.model_validate(
        {
            "model": {"width": width},
            "data": {"prep": {"spacing_mm": spacing_mm}, "crop": {"crop_size": crop_size}},
            "train": {"lr": lr, "workers": workers, "epochs": 1},
            "infer": {"stride": tuple(max(1, c // 2) for c in crop_size)},
            "seed": seed,
        }
    )


def baseline_rows(train: list[CachedCase], test: list[CachedCase]) -> list:
    """Rows of the mean-position baseline on ``test``."""
    return [r for _, rows in baseline_case_rows(train, test) for r in rows]


def whole_ct_rows(checkpoint: Path, test: list[CachedCase]) -> tuple[list, float]:
    """Rows of the whole-CT predictions of ``checkpoint`` on ``test``, and seconds per case."""
    per_case, seconds = checkpoint_case_rows(checkpoint, test)
    return [r for _, rows in per_case for r in rows], seconds


def _train_for(cfg: Config, train: list, val: list, out: Path, minutes: float, max_epochs: int, progress: bool):
    """Train one epoch, then resume up to the epochs that fit ``minutes`` in total."""
    from vertstudy.train.trainer import train as run

    t0 = time.perf_counter()
    first = run(cfg, train, val, out, progress=progress)
    if first.status != "completed":
        return first, time.perf_counter() - t0
    per_epoch = first.history[0]["wall_s"]  # training + validation, without set-up and checkpoints
    epochs = int(min(max_epochs, max(2, math.floor(minutes * 60.0 / per_epoch))))
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"epochs": epochs})})
    result = run(cfg, train, val, out, resume=first.last_checkpoint, progress=progress)
    return result, time.perf_counter() - t0


def bench_learn(
    train_cases: int = 24,
    val_cases: int = 4,
    test_cases: int = 6,
    minutes: float = 8.0,
    max_epochs: int = 200,
    width: float = 0.25,
    crop_size: tuple[int, int, int] = (48, 32, 32),
    spacing_mm: float = 4.0,
    lr: float = 0.003,
    workers: int = 1,
    threads: int | None = 1,
    seed: int = 0,
    workdir: Path | None = None,
    progress: bool = True,
) -> dict:
    """Train for about ``minutes`` and score whole-CT labelling of held-out phantoms against the
    mean-position baseline; returns the figures (names carry units).

    Defaults: 48 x 32 x 32 crops at 4 mm (192 x 128 x 128 mm, close to the paper's 208 x 160 x
    160 mm field of view), width 0.25, lr 0.003. ``threads``: torch intra-op threads during the
    run (see ``bench train``).
    """
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    own = workdir is None
    work = Path(tempfile.mkdtemp(prefix="vertstudy-bench-learn-")) if own else Path(workdir)
    try:
        cases = prepared_phantoms(work, train_cases + test_cases, seed, spacing_mm, progress)
        pool, test = cases[:train_cases], cases[train_cases:]
        train, val = pool[: train_cases - val_cases], pool[train_cases - val_cases :]
        cfg = learn_config(width, crop_size, spacing_mm, lr, workers, seed)
        shutil.rmtree(work / "run", ignore_errors=True)
        result, train_s = _train_for(cfg, train, val, work / "run", minutes, max_epochs, progress)
        figures = _figures(cfg, result, train_s, len(train), len(val), len(test))
        if result.best_checkpoint is None:
            return figures
        from vertstudy.train.metrics import summarize

        rows, infer_s = whole_ct_rows(result.best_checkpoint, test)
        net, base = summarize(rows), summarize(baseline_rows(pool, test))
        figures.update(
            {
                "test_loc_error_mm": net["loc_error_mm_mean"],
                "test_loc_error_std_mm": net["loc_error_mm_std"],
                "test_id_rate": net["id_rate"],
                "test_vertebrae_in_truth": net["n_truth"],
                "test_vertebrae_predicted": net["n_predicted"],
                "test_vertebrae_matched": net["n_matched"],
                "baseline_loc_error_mm": base["loc_error_mm_mean"],
                "baseline_loc_error_std_mm": base["loc_error_mm_std"],
                "baseline_id_rate": base["id_rate"],
                "infer_s_per_case": infer_s,
            }
        )
        return figures
    finally:
        torch.set_num_threads(previous)
        if own:
            shutil.rmtree(work, ignore_errors=True)


def _figures(cfg: Config, result, train_s: float, n_train: int, n_val: int, n_test: int) -> dict:
    best = result.best_metrics
    crops = result.epochs * n_train * cfg.data.crop.crops_per_case
    return {
        "config": f"width {cfg.model.width:g}, crop {'x'.join(map(str, cfg.data.crop.crop_size))} at "
        f"{cfg.data.prep.spacing_mm:g} mm, lr {cfg.train.lr:g}, batch {cfg.train.batch_size}",
        "cases_train_val_test": f"{n_train}/{n_val}/{n_test}",
        "status": result.status,
        "epochs": result.epochs,
        "train_crops": crops,
        "train_s": train_s,
        "best_epoch": result.best_epoch if result.best_epoch is not None else -1,
        "first_epoch_loss": result.history[0]["loss"] if result.history else math.nan,
        "last_epoch_loss": result.history[-1]["loss"] if result.history else math.nan,
        "best_val_loss": best.get("val_loss", math.nan),
        "best_val_crop_loc_error_mm": best.get("val_loc_error_mm", math.nan),
        "best_val_crop_id_rate": best.get("val_id_rate", math.nan),
        "best_val_crop_map": best.get("val_map", math.nan),
    }


def format_table(figures: dict) -> str:
    return format_figures("vertstudy bench learn", figures)
