"""Where the chosen configuration fails: figures by phantom condition, and the worst cases.

- **Conditions**: the held-out cases carry condition tags (phantoms: ``fov`` short/long field of
  view, ``metal`` implants, ``curvature`` normal/scoliosis/kyphosis, ``noise`` level) as string
  columns of ``vertebrae.parquet``. For each tag present and each of its values, the pooled
  identification rate and localization error (mm) of the chosen configuration's rows on the
  cases with that value, and the mean-position baseline's on the same cases.
- **Worst cases** (the failure gallery, paper Fig. 9): per (trial, case) of the chosen
  configuration, the case's identification rate (lowest first), ties by the higher mean
  localization error (mm; a case where nothing was located, error undefined, ranks worst), then
  by case and trial; each case appears once (with its worst
  trial), ``GALLERY`` cases in all.
"""

from __future__ import annotations

import math

import pandas as pd

from vertstudy.report.stats import clean, pooled

CONDITIONS = ("fov", "metal", "curvature", "noise")
GALLERY = 4


def condition_table(rows: pd.DataFrame, base: pd.DataFrame) -> list[dict]:
    """``[{tag, value, n_cases, n_vertebrae, id_rate, loc_error_mm_mean, baseline_id_rate,
    baseline_loc_error_mm_mean}]`` for every condition tag in ``rows`` (module docstring)."""
    out = []
    for tag in CONDITIONS:
        if tag not in rows.columns:
            continue
        values = rows[tag].fillna("").astype(str)
        for value in sorted(values.unique()):
            mine = rows[values == value]
            p = pooled(mine)
            theirs = base[base["case"].isin(set(mine["case"]))] if len(base) else base
            b = pooled(theirs) if len(theirs) else {"id_rate": math.nan, "loc_error_mm_mean": math.nan}
            out.append({"tag": tag, "value": value or "(none)", "n_cases": int(mine["case"].nunique()),
                        "n_vertebrae": p["n_truth"], "id_rate": clean(p["id_rate"]),
                        "loc_error_mm_mean": clean(p["loc_error_mm_mean"]),
                        "baseline_id_rate": clean(b["id_rate"]),
                        "baseline_loc_error_mm_mean": clean(b["loc_error_mm_mean"])})
    return out


def worst_cases(rows: pd.DataFrame, n: int = GALLERY) -> list[dict]:
    """The ``n`` worst held-out cases of ``rows`` (module docstring): ``[{key, study, trial_id,
    case, id_rate, loc_error_mm_mean, n_truth, n_identified, conditions}]``."""
    found = []
    for (key, case), g in rows.groupby(["key", "case"], sort=True):
        p = pooled(g)
        if p["n_truth"] == 0:
            continue
        found.append({
            "key": key, "study": str(g["study"].iloc[0]), "trial_id": str(g["trial_id"].iloc[0]), "case": case,
            "id_rate": p["id_rate"], "loc_error_mm_mean": p["loc_error_mm_mean"], "n_truth": p["n_truth"],
            "n_identified": int((g["identified"] & g["in_truth"]).sum()),
            "conditions": {t: str(g[t].iloc[0]) for t in CONDITIONS if t in g.columns},
        })

    def order(c):
        err = c["loc_error_mm_mean"]
        return (c["id_rate"], -(err if math.isfinite(err) else math.inf), c["case"], c["key"])

    out, seen = [], set()
    for c in sorted(found, key=order):
        if c["case"] not in seen:
            seen.add(c["case"])
            out.append(c)
    return out[:n]
