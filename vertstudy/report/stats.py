"""The numbers behind every table: pooled figures, spread over seeds, bootstrap intervals.

For a set of vertebra rows (one per trial x held-out case x class; :mod:`vertstudy.study.schema`, "Metrics"):

- ``id_rate``: identified / vertebrae in the truth, a fraction in [0, 1] (the paper's rule);
- ``id_rate_verse``: the same by the VerSe benchmark's rule (``identified_verse``); NaN for
  tables written before that column existed;
- ``loc_error_mm_mean`` / ``loc_error_mm_std``: mean and population std (ddof 0, as
  :func:`vertstudy.train.metrics.summarize`) in mm of ``error_mm`` over the rows in the truth
  and predicted.

An :class:`Estimate` of a table row carries the *pooled* figure over all the row's rows, the
spread over seeds (sample std, ddof 1, of the same figure computed per trial; NaN with fewer
than two trials) and a bootstrap 95% interval over held-out cases: the cases (by case id,
pooling every trial's rows of a case) are resampled with replacement ``RESAMPLES`` times with
``numpy.random.default_rng(SEED)`` and the pooled figure recomputed; the interval is the 2.5th
and 97.5th percentile (resamples with nothing to average are skipped).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from vertstudy.anatomy import REGIONS as ANATOMY_REGIONS

METRICS = ("id_rate", "loc_error_mm_mean", "loc_error_mm_std", "id_rate_verse")
RESAMPLES = 1000
SEED = 0
REGIONS = tuple(ANATOMY_REGIONS)  # cervical, thoracic, lumbar, sacral


@dataclass(frozen=True)
class Estimate:
    """One figure of a table row: ``value`` (pooled), ``seed_sd`` (std over trials / seeds,
    NaN unless >= 2), ``ci95`` (bootstrap over cases; (NaN, NaN) when not applicable)."""

    value: float
    seed_sd: float = math.nan
    ci95: tuple[float, float] = (math.nan, math.nan)

    def to_json(self) -> dict:
        return {"value": clean(self.value), "seed_sd": clean(self.seed_sd), "ci95": [clean(v) for v in self.ci95]}


def clean(value):
    """A JSON-safe number: NaN / inf -> None, numpy scalars -> Python."""
    if value is None:
        return None
    if isinstance(value, (np.integer,)):
        return int(value)
    value = float(value)
    return value if math.isfinite(value) else None


def _sums(rows: pd.DataFrame) -> np.ndarray:
    """``(6,)`` [n_truth, n_identified, n_matched, sum error, sum error^2, n_identified_verse] of
    ``rows`` (the last NaN when the rows have no ``identified_verse``)."""
    truth = rows["in_truth"].to_numpy(bool)
    matched = truth & rows["predicted"].to_numpy(bool)
    err = rows["error_mm"].to_numpy(float)[matched]
    verse = ((rows["identified_verse"].to_numpy(bool) & truth).sum() if "identified_verse" in rows
             else math.nan)
    return np.array([truth.sum(), (rows["identified"].to_numpy(bool) & truth).sum(), matched.sum(),
                     err.sum(), (err ** 2).sum(), verse], dtype=float)


def _from_sums(s: np.ndarray) -> np.ndarray:
    """``(..., 4)`` [id_rate, mean, std, id_rate_verse] (the order of :data:`METRICS`) from
    ``(..., 6)`` sums (NaN where undefined)."""
    s = np.asarray(s, dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        rate = np.where(s[..., 0] > 0, s[..., 1] / s[..., 0], np.nan)
        mean = np.where(s[..., 2] > 0, s[..., 3] / s[..., 2], np.nan)
        var = np.where(s[..., 2] > 0, s[..., 4] / s[..., 2] - mean ** 2, np.nan)
        verse = np.where(s[..., 0] > 0, s[..., 5] / s[..., 0], np.nan)
    return np.stack([rate, mean, np.sqrt(np.clip(var, 0, None)), verse], axis=-1)


def pooled(rows: pd.DataFrame) -> dict[str, float]:
    """``{id_rate, loc_error_mm_mean, loc_error_mm_std, id_rate_verse, n_truth, n_matched}`` of ``rows``."""
    s = _sums(rows)
    rate, mean, std, verse = _from_sums(s)
    if s[2] > 0:  # exact, not from sums: the same figure summarize() gives
        err = rows["error_mm"].to_numpy(float)[rows["in_truth"].to_numpy(bool) & rows["predicted"].to_numpy(bool)]
        mean, std = float(err.mean()), float(err.std())
    return {"id_rate": float(rate), "loc_error_mm_mean": float(mean), "loc_error_mm_std": float(std),
            "id_rate_verse": float(verse), "n_truth": int(s[0]), "n_matched": int(s[2])}


def case_sums(rows: pd.DataFrame, cases) -> np.ndarray:
    """``(len(cases), 6)``: the :func:`_sums` of ``rows``' rows of each case in ``cases``, in that
    order (every case must have rows)."""
    groups = dict(tuple(rows.groupby("case", sort=True)))
    return np.stack([_sums(groups[c]) for c in cases])


def draws(n_cases: int, resamples: int = RESAMPLES, seed: int = SEED) -> np.ndarray:
    """``(resamples, n_cases)`` case indices drawn with replacement, the same for the same arguments."""
    return np.random.default_rng(seed).integers(0, n_cases, size=(resamples, n_cases))


def figure_of(sums: np.ndarray, metric: str) -> np.ndarray:
    """``metric`` (one of :data:`METRICS`) from ``(..., 6)`` sums."""
    return _from_sums(sums)[..., METRICS.index(metric)]


def interval(values: np.ndarray) -> tuple[float, float]:
    """2.5th and 97.5th percentile of the finite ``values``; (NaN, NaN) when there are none."""
    finite = values[np.isfinite(values)]
    return (float(np.percentile(finite, 2.5)), float(np.percentile(finite, 97.5))) if finite.size else \
        (math.nan, math.nan)


def bootstrap(rows: pd.DataFrame, resamples: int = RESAMPLES, seed: int = SEED) -> dict[str, tuple[float, float]]:
    """Bootstrap 95% interval over cases of each of :data:`METRICS` (see the module docstring)."""
    if not len(rows):
        return {m: (math.nan, math.nan) for m in METRICS}
    cases = sorted(rows["case"].unique())
    resampled = case_sums(rows, cases)[draws(len(cases), resamples, seed)].sum(axis=1)  # (resamples, 6)
    return {metric: interval(figure_of(resampled, metric)) for metric in METRICS}


def seed_spread(values) -> float:
    """Sample std (ddof 1) of the finite per-trial ``values``; NaN with fewer than two."""
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=float)
    return float(v.std(ddof=1)) if v.size >= 2 else math.nan


def estimates(rows: pd.DataFrame) -> dict:
    """A table row's figures from its vertebra rows (column ``key`` names the trial):
    ``{metric: Estimate}`` for :data:`METRICS` plus counts ``n_trials``, ``n_cases``,
    ``n_vertebrae`` (in the truth) and ``n_matched``."""
    total = pooled(rows)
    ci = bootstrap(rows)
    per_trial = [pooled(g) for _, g in rows.groupby("key", sort=True)] if len(rows) else []
    out: dict = {m: Estimate(total[m], seed_spread([t[m] for t in per_trial]), ci[m]) for m in METRICS}
    out.update(n_trials=len(per_trial), n_cases=int(rows["case"].nunique()) if len(rows) else 0,
               n_vertebrae=total["n_truth"], n_matched=total["n_matched"])
    return out


def estimates_json(figures: dict) -> dict:
    return {k: (v.to_json() if isinstance(v, Estimate) else clean(v) if isinstance(v, float) else v)
            for k, v in figures.items()}
