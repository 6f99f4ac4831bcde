"""What ``study run`` prints about a search once it ends: every trial in the order it was
sampled (status, epochs, its best searched figure, the values it was given), how many trials
the scheduler stopped and at which epochs, and the parameter importances the report shows
(:func:`vertstudy.report.search.importances`). Read from ``trials.parquet`` only; it lives in
the report stage because it uses the report's importances and names (a study module may not
import a later stage)."""

from __future__ import annotations

import json
import math
from typing import Any

from vertstudy.study.spec import StudySpec


def search_rows(spec: StudySpec, study_dir: str) -> list[dict[str, Any]]:
    """One row per ended trial, in trial-id order (the sampling order of a reproducible study):
    ``trial``, ``status``, ``epochs``, the best value of the searched metric and every sampled
    parameter by its short name (``-`` when not sampled)."""
    from vertstudy.report.search import short_name
    from vertstudy.study.tables import read_table

    metric = spec.search.metric
    rows = []
    for r in read_table(study_dir, "trials").to_pylist():
        params = json.loads(r.get("params") or "{}")
        row = {"trial": r["trial_id"], "status": r.get("status"), "epochs": r.get("epochs"),
               f"best {metric}": r.get(f"best_{metric}"),
               "held-out id rate": r.get("test_id_rate"), "held-out mm": r.get("test_loc_error_mm_mean")}
        row.update({short_name(p): params.get(p, "-") for p in spec.space})
        rows.append(row)
    return rows


def search_lines(spec: StudySpec, study_dir: str) -> list[str]:
    """The sentences under the table: start-up trials and TPE, what ASHA stopped, importances."""
    from vertstudy.report.search import importances
    from vertstudy.study.search import tpe_settings
    from vertstudy.study.tables import read_table

    trials = read_table(study_dir, "trials").to_pandas()
    lines = []
    n = len(trials)
    if spec.search.algorithm in ("optuna-tpe", "optuna-multi"):
        startup = tpe_settings(spec)["n_startup_trials"]
        lines.append(f"search: {n} trials; the first {min(startup, n)} drawn at random, the other "
                     f"{max(0, n - startup)} by TPE" + (" (reproducible: search.reproducible)"
                                                        if spec.search.reproducible else ""))
    if "status" in trials and len(trials):
        pruned = trials[trials["status"] == "pruned"]
        if spec.scheduler.kind == "asha":
            at = ", ".join(f"{int(e)}: {c}" for e, c in sorted(pruned["epochs"].value_counts().items()))
            lines.append(f"ASHA stopped {len(pruned)} of {n} trials" + (f" (after epoch: trials {at})" if at else ""))
        imp, _, note = importances(trials)
        if imp is None and len(pruned):  # ASHA stopped most trials: rank the pruned ones too
            imp, _, also = importances(trials.assign(status=trials["status"].replace({"pruned": "completed"})))
            if imp:
                note = also.replace("completed trials", "completed and pruned trials (a pruned trial's figure is "
                                    "the best it reached before ASHA stopped it)")
        if imp:
            lines.append("importances: " + ", ".join(f"{k.rsplit('.', 1)[-1]} {v:.2f}" for k, v in imp.items())
                         + f" ({note})")
        else:
            lines.append(note)
    return lines


def fmt(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return "" if value is None else str(value)


def table_lines(rows: list[dict[str, Any]]) -> list[str]:
    """``rows`` as plain aligned text, a heading line first (ASCII: what a pipe or log takes)."""
    if not rows:
        return []
    heads = list(rows[0])
    cells = [[fmt(r.get(h)) for h in heads] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(heads)]
    return ["  ".join(x.ljust(w) for x, w in zip(line, widths)).rstrip() for line in [heads, *cells]]
