"""The search summary of one study: best trials, parameter importances, history, curves.

Everything comes from ``trials.parquet`` (``params``: the JSON of what the search sampled;
``best_val_*``: the best epoch's validation figures) and ``epochs.parquet``.

- **Objective** (ranking): the study's own search metric, as ``study run`` ranks it, ties by the
  other figure of the same kind (see :mod:`vertstudy.study.objective`); tables without a
  recorded metric rank by the crop-level validation identification rate ``best_val_id_rate``,
  ties by the lower ``best_val_loc_error_mm`` (mm). Completed and pruned trials are ranked (a
  pruned trial has validation figures up to where it stopped); failed and diverged trials are
  not.
- **Importances**: Optuna's fANOVA (``FanovaImportanceEvaluator(seed=0)``) on an in-memory
  study rebuilt from the completed trials alone: each sampled numeric parameter becomes a
  ``FloatDistribution`` (``IntDistribution`` when every value is whole) over its observed range,
  on a linear scale (the report's search ranges span well under a decade of their own scale;
  fANOVA splits on ranks, so a log scale would change little); text values become a
  ``CategoricalDistribution``. The target is ``best_val_id_rate`` when it varies between trials,
  else ``best_val_loc_error_mm``. Optuna uses the parameters every completed trial has, so
  conditional parameters (a schedule kind's own) drop out. Skipped with fewer than 3 completed
  trials or 2 varying parameters.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from vertstudy.report.load import start_order
from vertstudy.study.objective import Objective, default_objective, study_objective

#: searched parameters drawn first (the issue's B, lambda, LR schedule, crop size), by dotted name
PREFERRED = ("loss.balance_b", "loss.reg_lambda", "train.lr", "train.schedule.kind", "data.crop.crop_size")
SHORT = {"loss.balance_b": "B", "loss.reg_lambda": "lambda", "train.lr": "lr", "train.schedule.kind": "schedule",
         "data.crop.crop_size": "crop (voxels)"}
RANKED_STATUSES = ("completed", "pruned")
TOP = 5


def short_name(param: str) -> str:
    """A plot label for a dotted parameter name."""
    return SHORT.get(param, param.rsplit(".", 1)[-1])


def sampled(trials: pd.DataFrame) -> pd.DataFrame:
    """One column per sampled parameter (``params`` JSON), NaN where a trial did not sample it;
    columns ordered :data:`PREFERRED` first, then by name."""
    rows = [json.loads(p) if p else {} for p in trials["params"]] if len(trials) else []
    names = sorted({k for r in rows for k in r}, key=lambda k: (PREFERRED.index(k) if k in PREFERRED else 99, k))
    return pd.DataFrame([[r.get(n, math.nan) for n in names] for r in rows], columns=names, index=trials.index,
                        dtype=object)


def objective_order(trials: pd.DataFrame, objective: Objective | None = None) -> pd.DataFrame:
    """The ranked trials (module docstring), best first; ``objective``: default the crop-level one."""
    objective = objective or default_objective()
    ok = trials[trials["status"].isin(RANKED_STATUSES)]
    ok = objective.order_key(ok)
    ok = ok[(ok["_o1"] < math.inf) | (ok["_o2"] < math.inf)]
    return ok.sort_values(["_o1", "_o2", "key"], kind="mergesort").drop(columns=["_o1", "_o2"])


def _distribution(values: list):
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    numbers = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if len(numbers) == len(values):
        lo, hi = min(numbers), max(numbers)
        if all(float(v).is_integer() for v in numbers) and all(isinstance(v, int) for v in numbers):
            return IntDistribution(int(lo), int(hi)), int
        return FloatDistribution(float(lo), float(hi)), float
    return CategoricalDistribution(sorted({str(v) for v in values})), str


def importances(trials: pd.DataFrame) -> tuple[dict[str, float] | None, str | None, str]:
    """(``{param: importance}`` summing to 1, highest first, or None; the target column; a
    sentence saying what was done or why it was skipped)."""
    done = trials[trials["status"] == "completed"]
    params = sampled(done)
    rate = done["best_val_id_rate"].astype(float)
    target = "best_val_id_rate" if rate.dropna().nunique() > 1 else "best_val_loc_error_mm"
    done = done[done[target].astype(float).notna()]
    params = params.loc[done.index]
    varying = [p for p in params.columns if params[p].dropna().map(str).nunique() > 1]
    if len(done) < 3 or len(varying) < 2:
        why = (f"{len(done)} completed trial(s) with a validation figure" if len(done) < 3 else
               f"{len(varying)} searched parameter(s) that vary")
        return None, None, f"Parameter importances skipped: {why} (fANOVA needs 3 trials and 2 parameters)."
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    dists = {}
    for p in varying:
        dists[p] = _distribution([v for v in params[p] if not (isinstance(v, float) and math.isnan(v))])
    study = optuna.create_study(direction="maximize" if target == "best_val_id_rate" else "minimize")
    for idx in done.index:
        present = {p: params.at[idx, p] for p in varying
                   if not (isinstance(params.at[idx, p], float) and math.isnan(params.at[idx, p]))}
        study.add_trial(optuna.trial.create_trial(
            params={p: dists[p][1](v) for p, v in present.items()},
            distributions={p: dists[p][0] for p in present},
            value=float(done.at[idx, target]),
        ))
    try:
        found = optuna.importance.get_param_importances(
            study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0))
    except (RuntimeError, ValueError) as exc:  # e.g. no parameter common to every trial
        return None, None, f"Parameter importances skipped: Optuna could not compute them ({exc})."
    if not found:
        return None, None, "Parameter importances skipped: no parameter was sampled by every completed trial."
    ordered = dict(sorted(((k, float(v)) for k, v in found.items()), key=lambda kv: (-kv[1], kv[0])))
    what = "validation identification rate" if target == "best_val_id_rate" else "validation localization error"
    return ordered, target, (f"fANOVA importances (Optuna, seed 0) of the {what} over {len(done)} completed "
                             "trials; parameters sampled by every completed trial.")


@dataclass
class SearchSummary:
    """One study's search summary."""

    study: str
    params: list[str]
    ranked: pd.DataFrame  # trials best first, with one column per sampled parameter
    importances: dict[str, float] | None
    importance_target: str | None
    importance_note: str
    history: pd.DataFrame  # every trial in start order (column "order"), with sampled parameters
    order_note: str
    top_keys: list[str] = field(default_factory=list)
    objective: Objective = field(default_factory=default_objective)

    def to_json(self) -> dict:
        def cell(v):
            return v if isinstance(v, (str, bool)) else None if v is None else (
                float(v) if isinstance(v, (int, float, np.number)) and math.isfinite(float(v)) else None)

        o = self.objective
        best = [{"trial": r["key"], "status": r["status"], "best_val_id_rate": cell(r["best_val_id_rate"]),
                 "best_val_loc_error_mm": cell(r["best_val_loc_error_mm"]),
                 **{c: cell(r[c]) for c in (o.column, o.tie, o.rate, o.error) if c in r},
                 "test_id_rate": cell(r["test_id_rate"]), "test_loc_error_mm_mean": cell(r["test_loc_error_mm_mean"]),
                 "params": json.loads(r["params"])} for _, r in self.ranked.head(TOP).iterrows()]
        return {"params": self.params, "objective": o.describe(), "best": best, "importances": self.importances,
                "importance_target": self.importance_target, "ranked_trials": len(self.ranked)}


def search_summary(trials: pd.DataFrame, study: str) -> SearchSummary:
    """The summary of ``study``'s rows of ``trials``."""
    mine = trials[trials["study"] == study]
    params = sampled(mine)
    mine = pd.concat([mine, params.add_prefix("param:")], axis=1)
    objective = study_objective(mine)
    ranked = objective_order(mine, objective)
    imp, target, note = importances(trials[trials["study"] == study])
    history, by_start = start_order(mine)
    order_note = ("in the order the trials started" if by_start
                  else "in trial-id order (these tables have no start times)")
    history = history.assign(order=np.arange(1, len(history) + 1))
    return SearchSummary(study, list(params.columns), ranked, imp, target, note, history, order_note,
                         list(ranked["key"].head(TOP)), objective)
