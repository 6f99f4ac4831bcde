"""``vertstudy bench learn``: does a CPU-sized network learn to label whole CTs within minutes?

Writes ``train_cases + test_cases`` coarse phantoms (default preset: mixed field of view,
metal, curvature, noise) and prepares them at ``spacing_mm``. The first ``train_cases`` are the
training pool, of which the last ``val_cases`` are the validation cases of the trainer (its
plateau schedule and ``best.pt``); the last ``test_cases`` are held out. A network of width
``width`` (paper's LSTM) trains with the real trainer for a time budget: one epoch is timed,
then the run resumes from its checkpoint up to the number of epochs that fits ``minutes``.

The held-out cases are then labelled on the *whole* CT by :mod:`vertstudy.infer`
(tiles at half a crop's stride, votes, K-means) with ``best.pt``, and scored with
:func:`vertstudy.train.metrics.match_case` / ``summarize`` in canonical millimetres
(``zyx_vox * spacing_mm``; the mapping to the scanner's space is a rigid one per case, so the
distances are the same). Baseline: every class present in a held-out case is predicted at
that class's mean canonical position (mm) over the training pool's cases that contain it.
"""

from __future__ import annotations

import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from vertstudy.bench import format_figures, prepared_phantoms, work_folder
from vertstudy.config import Config
from vertstudy.data.cache import CachedCase
from vertstudy.infer.evaluate import baseline_case_rows, checkpoint_case_rows


def learn_config(
    width: float, crop_size: tuple[int, int, int], spacing_mm: float, lr: float, workers: int, seed: int,
    overrides: dict | None = None,
) -> Config:
    """The defaults but for width, crop (inference stride: half the crop), spacing, lr and workers,
    then ``overrides`` (dotted field names, e.g. ``{"loss.map_reg": "none"}``), validated."""
    from vertstudy.config import load_config

    return load_config(
        {
            "model.width": width,
            "data.prep.spacing_mm": spacing_mm,
            "data.crop.crop_size": crop_size,
            "train.lr": lr,
            "train.workers": workers,
            "train.epochs": 1,
            "infer.stride": tuple(max(1, c // 2) for c in crop_size),
            "seed": seed,
            **(overrides or {}),
        },
        where="bench learn --set",
    )


def baseline_rows(train: list[CachedCase], test: list[CachedCase]) -> list:
    """Rows of the mean-position baseline on ``test``."""
    return [r for _, rows in baseline_case_rows(train, test) for r in rows]


def whole_ct_rows(checkpoint: Path, test: list[CachedCase]) -> tuple[list, float]:
    """Rows of the whole-CT predictions of ``checkpoint`` on ``test``, and seconds per case."""
    per_case, seconds = checkpoint_case_rows(checkpoint, test)
    return [r for _, rows in per_case for r in rows], seconds


def _train_for(cfg: Config, train: list, val: list, out: Path, minutes: float | None, max_epochs: int,
               progress: bool, crops: int | None = None):
    """Train one epoch, then resume up to the epochs that fit ``minutes`` in total; or, with
    ``crops``, exactly the epochs that show at least that many training crops."""
    from vertstudy.infer.evaluate import whole_ct_figures
    from vertstudy.train.trainer import train as run

    t0 = time.perf_counter()
    if crops is not None:
        per_epoch = len(train) * cfg.data.crop.crops_per_case
        epochs = max(1, math.ceil(crops / per_epoch))
        cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"epochs": epochs})})
        return run(cfg, train, val, out, progress=progress, whole_ct=whole_ct_figures), time.perf_counter() - t0
    first = run(cfg, train, val, out, progress=progress, whole_ct=whole_ct_figures)
    if first.status != "completed":
        return first, time.perf_counter() - t0
    per_epoch = first.history[0]["wall_s"]  # training + validation, without set-up and checkpoints
    epochs = int(min(max_epochs, max(2, math.floor(minutes * 60.0 / per_epoch))))
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"epochs": epochs})})
    result = run(cfg, train, val, out, resume=first.last_checkpoint, progress=progress, whole_ct=whole_ct_figures)
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
    crops: int | None = None,
    overrides: dict | None = None,
) -> dict:
    """Train for about ``minutes`` and score whole-CT labelling of held-out phantoms against the
    mean-position baseline; returns the figures (names carry units).

    Defaults: 48 x 32 x 32 crops at 4 mm (192 x 128 x 128 mm, close to the paper's 208 x 160 x
    160 mm field of view), width 0.25, lr 0.003. ``threads``: torch intra-op threads during the
    run (see ``bench train``). ``crops``: train on a fixed number of crops instead of a time
    budget (runs then do not depend on the machine's speed). ``overrides``: further config
    fields (dotted names), for ablations.

    The held-out figures come from :func:`vertstudy.infer.diagnose.diagnose` on ``best.pt``:
    ``test_id_rate`` / ``test_loc_error_mm`` / ``test_false_per_case`` for the configured decoder,
    the same with a ``_kmeans`` and ``_sequence`` suffix for each decoder, and the whole
    decomposition under ``diag_``.
    """
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        with work_folder(workdir, "vertstudy-bench-learn-") as work:
            cases = prepared_phantoms(work, train_cases + test_cases, seed, spacing_mm, progress)
            pool, test = cases[:train_cases], cases[train_cases:]
            train, val = pool[: train_cases - val_cases], pool[train_cases - val_cases :]
            cfg = learn_config(width, crop_size, spacing_mm, lr, workers, seed, overrides)
            shutil.rmtree(work / "run", ignore_errors=True)
            result, train_s = _train_for(cfg, train, val, work / "run", minutes, max_epochs, progress, crops)
            figures = _figures(cfg, result, train_s, len(train), len(val), len(test))
            if result.best_checkpoint is not None:
                figures.update(held_out_figures(result.best_checkpoint, pool, test))
            return figures
    finally:
        torch.set_num_threads(previous)


def held_out_figures(checkpoint: Path, pool: list[CachedCase], test: list[CachedCase]) -> dict:
    """Whole-CT figures of ``checkpoint`` on ``test`` for every decoder, its decomposition, and
    the mean-position baseline fitted on ``pool``."""
    from vertstudy.infer.diagnose import diagnose
    from vertstudy.model.load import load_model
    from vertstudy.model.prior import load_spine_prior
    from vertstudy.train.metrics import summarize

    model, cfg = load_model(checkpoint)
    t0 = time.perf_counter()
    diag = diagnose(model, cfg, test, load_spine_prior(checkpoint))
    diag_s = time.perf_counter() - t0
    base = summarize(baseline_rows(pool, test))
    out = {}
    for dec in ("kmeans", "sequence"):
        if f"shipped_{dec}_id_rate" in diag:
            for key in ("id_rate", "loc_error_mm", "false_per_case"):
                out[f"test_{key}_{dec}"] = diag[f"shipped_{dec}_{key}"]
    chosen = cfg.infer.decoder if f"test_id_rate_{cfg.infer.decoder}" in out else "kmeans"
    _, infer_s = whole_ct_rows(checkpoint, test[:1])  # the time of plain inference, on one case
    out.update({
        "decoder": chosen,
        "test_id_rate": out[f"test_id_rate_{chosen}"],
        "test_loc_error_mm": out[f"test_loc_error_mm_{chosen}"],
        "test_false_per_case": out[f"test_false_per_case_{chosen}"],
        "test_vertebrae_in_truth": sum(int(np.asarray(c.indices).size) for c in test),
        "baseline_loc_error_mm": base["loc_error_mm_mean"],
        "baseline_loc_error_std_mm": base["loc_error_mm_std"],
        "baseline_id_rate": base["id_rate"],
        "infer_s_per_case": infer_s,
        "diagnose_s": diag_s,
        **{f"diag_{k}": v for k, v in diag.items()},
    })
    return out


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
