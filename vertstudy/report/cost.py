"""What the studies cost: trial wall time, CPU and GPU hours, and the best error against compute.

Per study: trials by status; total trial wall time (h) = sum of ``wall_s`` / 3600; CPU hours =
sum(``wall_s`` x ``resources_cpu``) / 3600 and GPU hours likewise with ``resources_gpu`` (the
resources each trial held, so a trial sharing half a GPU counts half); NaN when the tables
predate the ``resources_*`` columns. The *progress* series orders the trials by ``started_at``
(trial id when absent) and gives, after each trial, the cumulative compute (GPU hours when the
study used GPUs, else CPU hours, else wall hours) and the best error reached so far: the
held-out whole-CT ``test_loc_error_mm_mean`` (mm) of completed trials, or the validation
``best_val_loc_error_mm`` when no trial has a held-out figure.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from vertstudy.report.ablation import status_counts
from vertstudy.report.load import start_order
from vertstudy.report.stats import clean


def study_cost(trials: pd.DataFrame, study: str) -> dict:
    """The figures of the module docstring for ``study`` (``series`` holds the progress lists)."""
    t = trials[trials["study"] == study]
    wall = t["wall_s"].astype(float).fillna(0.0)
    cpu_h = float((wall * t["resources_cpu"].astype(float)).sum() / 3600) if t["resources_cpu"].notna().all() \
        and len(t) else math.nan
    gpu_h = float((wall * t["resources_gpu"].astype(float)).sum() / 3600) if t["resources_gpu"].notna().all() \
        and len(t) else math.nan
    order, by_start = start_order(t)
    ordered_by = "start time" if by_start else "trial id"
    if math.isfinite(gpu_h) and gpu_h > 0:
        unit, spent = "GPU hours", order["wall_s"].astype(float).fillna(0) * order["resources_gpu"].astype(float)
    elif math.isfinite(cpu_h):
        unit, spent = "CPU hours", order["wall_s"].astype(float).fillna(0) * order["resources_cpu"].astype(float)
    else:
        unit, spent = "trial wall hours", order["wall_s"].astype(float).fillna(0)
    test = order["test_loc_error_mm_mean"].astype(float).where(order["status"] == "completed")
    if test.notna().any():
        error, error_kind = test, "held-out"
    else:
        error, error_kind = order["best_val_loc_error_mm"].astype(float).where(
            order["status"].isin(("completed", "pruned"))), "validation"
    best = np.fmin.accumulate(error.fillna(np.inf).to_numpy()) if len(order) else np.array([])
    best = np.where(np.isinf(best), np.nan, best)
    return {
        "study": study, "counts": status_counts(t), "trials": len(t), "wall_h": float(wall.sum() / 3600),
        "cpu_h": cpu_h, "gpu_h": gpu_h, "mean_trial_s": float(wall.mean()) if len(t) else math.nan,
        "series": {"compute": (np.cumsum(spent.to_numpy()) / 3600).tolist(), "best_error_mm": best.tolist(),
                   "unit": unit, "error_kind": error_kind, "ordered_by": ordered_by},
        "best_error_mm": clean(np.nanmin(best)) if np.isfinite(best).any() else None,
    }


def cost_json(c: dict) -> dict:
    return {k: (clean(v) if isinstance(v, float) else v) for k, v in c.items() if k != "series"} | {
        "compute_unit": c["series"]["unit"], "error_kind": c["series"]["error_kind"]}
