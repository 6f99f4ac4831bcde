"""Does the paper's direction hold on these data, and how sure can we be? One answer per table.

The paper's claims, and only those (its other rows are other methods):

- **Table I**: integral regression has the lowest localization error of the three heads
  (compared with the heat map and with fully connected regression, each);
- **Table II**: the Bi-LSTM raises the classification mAP;
- **Table III**: the classification branch raises the identification rate;
- **Table IV**: in every region, the chosen configuration identifies more vertebrae and errs
  less than the mean-position baseline.

Each claim is one or more *comparisons*, "row A is better than row B in figure F" (lower for
errors, higher for rates and mAP). For a comparison:

- ``difference``: F(A) - F(B), each the table's pooled figure (fractions for rates, mm for
  errors);
- ``seeds``: the trials of A and B paired by seed (``cfg.seed``), and in how many pairs A's own
  figure is the better one (the baseline has no seed: each of A's trials is compared with it);
- ``ci95``: a paired bootstrap 95% interval of the difference over the held-out cases both rows
  hold: the cases are resampled together (``stats.RESAMPLES`` times, ``stats.SEED``), every
  trial's rows of a drawn case go into its row's figure, as in :mod:`vertstudy.report.stats`.
  Table II's mAP has no per-case rows, so no interval.

The verdict of a comparison:

- ``holds``: the difference favours the paper, and the interval lies wholly on its side (no
  interval, as for mAP: every one of at least two seed pairs favours it);
- ``not sure``: the difference favours the paper, but the interval reaches zero or the other
  side (or the seeds disagree, or there is one pair only);
- ``does not hold``: the difference is zero or favours the other row; ``the opposite is sure``
  is added when the interval lies wholly on the other side.

A claim of several comparisons takes the weakest: ``does not hold`` if any does not, else
``not sure`` if any is, else ``holds``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from vertstudy.report.stats import RESAMPLES, SEED, case_sums, clean, draws, figure_of, interval, pooled

HOLDS, NOT_SURE, DOES_NOT_HOLD = "holds", "not sure", "does not hold"
_ORDER = {HOLDS: 0, NOT_SURE: 1, DOES_NOT_HOLD: 2}


@dataclass
class Comparison:
    """"``better`` beats ``worse`` in ``figure``" and what the data say about it."""

    better: str  # row label the paper claims better
    worse: str
    figure: str  # "loc_error_mm_mean" | "id_rate" | "map"
    lower_is_better: bool
    difference: float  # figure(better) - figure(worse)
    ci95: tuple[float, float] = (math.nan, math.nan)
    seed_wins: int = 0  # pairs in which ``better``'s trial is better
    seed_pairs: int = 0
    verdict: str = ""
    opposite_sure: bool = False

    def to_json(self) -> dict:
        return {"better": self.better, "worse": self.worse, "figure": self.figure,
                "lower_is_better": self.lower_is_better, "difference": clean(self.difference),
                "ci95": [clean(v) for v in self.ci95], "seed_wins": self.seed_wins, "seed_pairs": self.seed_pairs,
                "verdict": self.verdict, "opposite_sure": self.opposite_sure}


@dataclass
class Direction:
    """The paper's claim for one table and the verdict on it."""

    claim: str
    verdict: str
    comparisons: list[Comparison] = field(default_factory=list)
    region: dict[str, str] = field(default_factory=dict)  # Table IV: verdict per region

    def to_json(self) -> dict:
        return {"claim": self.claim, "verdict": self.verdict,
                "comparisons": [c.to_json() for c in self.comparisons], **({"regions": self.region}
                                                                           if self.region else {})}


def _favours(c: Comparison, value: float) -> int:
    """+1 when ``value`` (a difference) favours the paper's side, -1 the other, 0 neither / NaN."""
    if not math.isfinite(value) or value == 0:
        return 0
    good = value < 0 if c.lower_is_better else value > 0
    return 1 if good else -1


def judge(c: Comparison) -> Comparison:
    """Fill ``verdict`` and ``opposite_sure`` of ``c`` (module docstring)."""
    side = _favours(c, c.difference)
    lo, hi = c.ci95
    has_ci = math.isfinite(lo) and math.isfinite(hi)
    ci_sides = {_favours(c, lo), _favours(c, hi)} if has_ci else set()
    if side <= 0:
        c.verdict = DOES_NOT_HOLD
        c.opposite_sure = side < 0 and has_ci and ci_sides == {-1}
    elif has_ci:
        c.verdict = HOLDS if ci_sides == {1} else NOT_SURE
    else:
        c.verdict = HOLDS if c.seed_pairs >= 2 and c.seed_wins == c.seed_pairs else NOT_SURE
    return c


def weakest(verdicts) -> str:
    verdicts = list(verdicts)
    return max(verdicts, key=_ORDER.__getitem__) if verdicts else ""


def paired_bootstrap(a: pd.DataFrame, b: pd.DataFrame, figure: str, resamples: int = RESAMPLES,
                     seed: int = SEED) -> tuple[float, float]:
    """95% interval of figure(a) - figure(b) over the held-out cases both row sets hold, resampled
    together (vertebra rows with a ``case`` column; see :mod:`vertstudy.report.stats`)."""
    cases = sorted(set(a["case"]) & set(b["case"]))
    if not cases:
        return math.nan, math.nan
    idx = draws(len(cases), resamples, seed)
    resampled = [case_sums(rows, cases)[idx].sum(axis=1) for rows in (a, b)]
    return interval(figure_of(resampled[0], figure) - figure_of(resampled[1], figure))


def _seed_of(trials: pd.DataFrame) -> dict[str, object]:
    col = "cfg.seed" if "cfg.seed" in trials else "seed"
    return dict(zip(trials["key"], trials[col])) if col in trials else {}


def _pair_by_seed(c: Comparison, trials: pd.DataFrame, better: dict[str, float], worse: dict[str, float]
                  ) -> Comparison:
    """Count in ``c`` the seed pairs and those ``c.better`` wins; ``better`` / ``worse``: each
    row's per-trial figure by trial key. Returns ``c`` judged."""
    seeds = _seed_of(trials)
    a = {seeds.get(k): v for k, v in better.items()}
    b = {seeds.get(k): v for k, v in worse.items()}
    for s in sorted(set(a) & set(b) - {None}, key=str):
        c.seed_pairs += 1
        c.seed_wins += _favours(c, a[s] - b[s]) > 0
    return judge(c)


def _per_trial(rows: pd.DataFrame, figure: str) -> dict[str, float]:
    return {key: pooled(g)[figure] for key, g in rows.groupby("key", sort=True)}


def compare_rows(vertebrae: pd.DataFrame, trials: pd.DataFrame, better: dict, worse: dict, figure: str,
                 lower_is_better: bool) -> Comparison:
    """A :class:`Comparison` of two table rows (``label`` and ``trials`` keys) on held-out vertebra rows."""
    ra = vertebrae[vertebrae["key"].isin(better["trials"])]
    rb = vertebrae[vertebrae["key"].isin(worse["trials"])]
    c = Comparison(better["label"], worse["label"], figure, lower_is_better,
                   pooled(ra)[figure] - pooled(rb)[figure], paired_bootstrap(ra, rb, figure))
    return _pair_by_seed(c, trials, _per_trial(ra, figure), _per_trial(rb, figure))


def compare_map(trials: pd.DataFrame, better: dict, worse: dict) -> Comparison:
    """Table II: the trials' ``best_val_map`` (no per-case rows), paired by seed."""
    maps = dict(zip(trials["key"], trials["best_val_map"].astype(float)))
    fa = {k: maps[k] for k in better["trials"] if k in maps}
    fb = {k: maps[k] for k in worse["trials"] if k in maps}
    c = Comparison(better["label"], worse["label"], "map", False,
                   float(np.mean(list(fa.values()))) - float(np.mean(list(fb.values()))) if fa and fb else math.nan)
    return _pair_by_seed(c, trials, fa, fb)


def compare_baseline(mine: pd.DataFrame, base: pd.DataFrame, label: str, figure: str, lower_is_better: bool
                     ) -> Comparison:
    """Table IV: the chosen configuration's rows ``mine`` against the baseline's ``base``; each
    of its trials is one "pair" against the (seedless) baseline."""
    fb = pooled(base)[figure]
    c = Comparison(f"chosen, {label}", "baseline", figure, lower_is_better, pooled(mine)[figure] - fb,
                   paired_bootstrap(mine, base, figure))
    for fa in _per_trial(mine, figure).values():
        c.seed_pairs += 1
        c.seed_wins += _favours(c, fa - fb) > 0
    return judge(c)


CLAIMS = {
    "table1": "integral regression has the lowest localization error of the three heads",
    "table2": "the Bi-LSTM raises the classification mAP",
    "table3": "the classification branch raises the identification rate",
    "table4": "in every region, the chosen configuration identifies more vertebrae and errs less than the "
              "mean-position baseline",
}


def table_direction(result, vertebrae: pd.DataFrame, trials: pd.DataFrame, baseline: pd.DataFrame | None = None
                    ) -> Direction | None:
    """The :class:`Direction` of a filled table (``result``: a ``TableResult`` of
    :mod:`vertstudy.report.ablation`); None when the rows the claim compares are not all there.
    ``baseline``: Table IV's baseline rows on the table's held-out cases."""
    rows = {r["value"]: r for r in result.rows}
    comps: list[Comparison] = []
    if result.key == "table1":
        if "integral" not in rows or not {"heatmap", "fc"} & set(rows):
            return None
        comps = [compare_rows(vertebrae, trials, rows["integral"], rows[other], "loc_error_mm_mean", True)
                 for other in ("heatmap", "fc") if other in rows]
    elif result.key == "table2":
        if not {"bilstm", "none-lstm"} <= set(rows):
            return None
        comps = [compare_map(trials, rows["bilstm"], rows["none-lstm"])]
    elif result.key == "table3":
        if not {"loc", "loc+cls"} <= set(rows):
            return None
        comps = [compare_rows(vertebrae, trials, rows["loc+cls"], rows["loc"], "id_rate", False)]
    elif result.key == "table4":
        if not result.rows or baseline is None or not len(baseline):
            return None
        mine_all = vertebrae[vertebrae["key"].isin(result.trials)]
        regions = {}
        for r in result.rows:
            region = r["value"]
            mine = mine_all if region == "all" else mine_all[mine_all["region"] == region]
            base = baseline if region == "all" else baseline[baseline["region"] == region]
            if not len(mine) or not len(base):
                continue
            pair = [compare_baseline(mine, base, region, "id_rate", False),
                    compare_baseline(mine, base, region, "loc_error_mm_mean", True)]
            regions[region] = weakest(c.verdict for c in pair)
            comps += pair
        if not comps:
            return None
        return Direction(CLAIMS["table4"], weakest(v for k, v in regions.items() if k != "all") or regions["all"],
                         comps, regions)
    else:
        return None
    return Direction(CLAIMS[result.key], weakest(c.verdict for c in comps), comps)


def _figure_text(c: Comparison, value: float) -> str:
    if c.figure == "loc_error_mm_mean":
        return f"{value:+.1f} mm"
    return f"{100 * value:+.1f} points"


def comparison_text(c: Comparison) -> str:
    """One sentence fragment: the difference, its interval, the seeds, the verdict."""
    name = {"loc_error_mm_mean": "mean error", "id_rate": "id. rate", "map": "mAP"}[c.figure]
    lo, hi = c.ci95
    ci = (f" [95% interval over cases {_figure_text(c, lo)} to {_figure_text(c, hi)}]"
          if math.isfinite(lo) and math.isfinite(hi) else " (no interval over cases)")
    diff = _figure_text(c, c.difference) if math.isfinite(c.difference) else "undefined"
    unit = "trial(s), one per seed" if c.worse == "baseline" else "seed(s)"
    seeds = f"; better in {c.seed_wins} of {c.seed_pairs} {unit}" if c.seed_pairs else ""
    verdict = c.verdict + ("; the opposite is sure" if c.opposite_sure else "")
    return f"{c.better} - {c.worse}, {name}: {diff}{ci}{seeds}: {verdict}"


def verdict_text(d: Direction) -> str:
    """The verdict with what is sure against the paper, e.g. ``does not hold (the opposite is sure
    against Heat map + argmax)``."""
    against = [c.worse for c in d.comparisons if c.opposite_sure]
    return d.verdict + (f" (the opposite is sure against {', '.join(dict.fromkeys(against))})" if against else "")


def direction_text(d: Direction) -> str:
    """The paragraph under a table: the claim, the verdict, each comparison."""
    answer = {HOLDS: "Yes", NOT_SURE: "Not sure", DOES_NOT_HOLD: "No"}[d.verdict]
    here = "these data lean its way, but not surely" if d.verdict == NOT_SURE else f"on these data it {d.verdict}"
    head = f"**Does the paper's direction hold here?** {answer}: the paper finds that {d.claim}; {here}"
    regions = ""
    if d.region:
        regions = " By region: " + ", ".join(f"{k} {v}" for k, v in d.region.items()) + "."
    return f"{head}.{regions} " + "; ".join(comparison_text(c) for c in d.comparisons) + "."
