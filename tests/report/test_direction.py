"""Does the paper's direction hold: the verdict rule, the paired bootstrap checked against an
independent computation, and the verdicts the report of the fixture studies gives."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from vertstudy.report.direction import (
    DOES_NOT_HOLD,
    HOLDS,
    NOT_SURE,
    Comparison,
    compare_map,
    compare_rows,
    judge,
    paired_bootstrap,
)


def verdict(difference, ci=(math.nan, math.nan), lower=True, wins=0, pairs=0):
    c = judge(Comparison("A", "B", "loc_error_mm_mean" if lower else "id_rate", lower, difference, ci, wins, pairs))
    return c.verdict, c.opposite_sure


def test_the_verdict_rule():
    # lower is better (errors): a negative difference favours the paper
    assert verdict(-5.0, (-8.0, -1.0)) == (HOLDS, False)
    assert verdict(-5.0, (-8.0, 2.0)) == (NOT_SURE, False)
    assert verdict(-5.0, (-8.0, 0.0)) == (NOT_SURE, False)  # an interval reaching zero is not sure
    assert verdict(5.0, (1.0, 8.0)) == (DOES_NOT_HOLD, True)
    assert verdict(5.0, (-1.0, 8.0)) == (DOES_NOT_HOLD, False)
    assert verdict(0.0, (-1.0, 1.0)) == (DOES_NOT_HOLD, False)
    assert verdict(math.nan) == (DOES_NOT_HOLD, False)
    # higher is better (rates)
    assert verdict(0.1, (0.02, 0.2), lower=False) == (HOLDS, False)
    assert verdict(-0.1, (-0.2, -0.02), lower=False) == (DOES_NOT_HOLD, True)
    # no interval (mAP): every one of at least two seed pairs must agree
    assert verdict(0.1, lower=False, wins=3, pairs=3) == (HOLDS, False)
    assert verdict(0.1, lower=False, wins=2, pairs=3) == (NOT_SURE, False)
    assert verdict(0.1, lower=False, wins=1, pairs=1) == (NOT_SURE, False)


def rows_of(key, case_rows):
    """Vertebra rows of trial ``key``: ``case_rows`` = {case: [(identified, error_mm or None)]}."""
    out = []
    for case, vertebrae in case_rows.items():
        for label, (ident, err) in enumerate(vertebrae):
            out.append({"key": key, "case": case, "label": label, "in_truth": True, "predicted": err is not None,
                        "identified": ident, "identified_verse": ident,
                        "error_mm": float("nan") if err is None else float(err), "region": "thoracic"})
    return pd.DataFrame(out)


def independent_paired_interval(a, b, figure, resamples=1000, seed=0):
    """The paired case bootstrap written plainly with pandas: the same draws, figures recomputed
    from the drawn rows themselves."""
    cases = sorted(set(a["case"]) & set(b["case"]))
    idx = np.random.default_rng(seed).integers(0, len(cases), size=(resamples, len(cases)))

    def fig(rows):
        if figure == "id_rate":
            return rows["identified"].sum() / rows["in_truth"].sum()
        return rows.loc[rows["predicted"], "error_mm"].mean()

    diffs = []
    for draw in idx:
        picked = [cases[i] for i in draw]
        ra = pd.concat([a[a["case"] == c] for c in picked])
        rb = pd.concat([b[b["case"] == c] for c in picked])
        diffs.append(fig(ra) - fig(rb))
    return float(np.percentile(diffs, 2.5)), float(np.percentile(diffs, 97.5))


def test_paired_bootstrap_matches_an_independent_computation():
    rng = np.random.default_rng(7)
    cases = [f"c{i}" for i in range(6)]

    def trial(key, p, scale):
        return rows_of(key, {c: [(bool(rng.random() < p), float(rng.gamma(2.0, scale)) if rng.random() < 0.9
                                  else None) for _ in range(5)] for c in cases})

    a = pd.concat([trial("a0", 0.8, 2.0), trial("a1", 0.7, 3.0)])
    b = pd.concat([trial("b0", 0.5, 5.0), trial("b1", 0.6, 4.0)]).query("case != 'c5'")  # one case b lacks
    for figure in ("id_rate", "loc_error_mm_mean"):
        got = paired_bootstrap(a, b, figure, resamples=200)
        want = independent_paired_interval(a, b, figure, resamples=200)
        assert np.allclose(got, want), (figure, got, want)
    # a sure difference: A identifies everything, B nothing, in every case
    sure_a = rows_of("a", {c: [(True, 1.0)] * 3 for c in cases})
    sure_b = rows_of("b", {c: [(False, 30.0)] * 3 for c in cases})
    assert paired_bootstrap(sure_a, sure_b, "id_rate") == (1.0, 1.0)
    assert paired_bootstrap(sure_a, sure_b, "loc_error_mm_mean") == (-29.0, -29.0)
    assert all(math.isnan(v) for v in paired_bootstrap(sure_a, sure_b.assign(case="other"), "id_rate"))


def test_rows_compared_by_seed_and_map_without_interval():
    cases = ["c0", "c1", "c2"]
    vertebrae = pd.concat([
        rows_of("i0", {c: [(True, 2.0)] * 4 for c in cases}),
        rows_of("i1", {c: [(True, 9.0)] * 4 for c in cases}),  # seed 1: integral worse than heatmap's 5 mm
        rows_of("h0", {c: [(True, 5.0)] * 4 for c in cases}),
        rows_of("h1", {c: [(True, 5.0)] * 4 for c in cases}),
    ])
    trials = pd.DataFrame({"key": ["i0", "i1", "h0", "h1"], "cfg.seed": [0, 1, 0, 1],
                           "best_val_map": [0.9, 0.8, 0.7, 0.85]})
    integral = {"label": "Integral", "trials": ["i0", "i1"]}
    heatmap = {"label": "Heat map", "trials": ["h0", "h1"]}
    c = compare_rows(vertebrae, trials, integral, heatmap, "loc_error_mm_mean", True)
    assert math.isclose(c.difference, 5.5 - 5.0) and c.ci95 == (0.5, 0.5) and c.opposite_sure
    assert (c.seed_wins, c.seed_pairs) == (1, 2)
    assert c.verdict == DOES_NOT_HOLD  # pooled 5.5 mm against 5.0 mm
    m = compare_map(trials, {"label": "Bi-LSTM", "trials": ["i0", "i1"]}, {"label": "none", "trials": ["h0", "h1"]})
    assert math.isclose(m.difference, 0.85 - 0.775) and (m.seed_wins, m.seed_pairs) == (1, 2)
    assert m.verdict == NOT_SURE and math.isnan(m.ci95[0])


def test_the_report_says_whether_each_direction_holds(report_json, report_dir):
    """The fixture studies fill Tables I-IV: each carries its claim's comparisons, whose
    differences are the differences of the table's own figures, and the markdown says it."""
    tables = {t["number"]: t for t in report_json["tables"].values()}
    t1 = tables["I"]
    d1 = t1["direction"]
    rows = {r["value"]: r["figures"] for r in t1["rows"]}
    (c,) = [c for c in d1["comparisons"] if c["worse"] == "Fully connected regression"]
    assert math.isclose(c["difference"], rows["integral"]["loc_error_mm_mean"]["value"]
                        - rows["fc"]["loc_error_mm_mean"]["value"], rel_tol=1e-9)
    assert c["ci95"][0] <= c["difference"] <= c["ci95"][1]
    assert d1["verdict"] in (HOLDS, NOT_SURE, DOES_NOT_HOLD)
    t3 = tables["III"]["direction"]
    rows3 = {r["value"]: r["figures"] for r in tables["III"]["rows"]}
    assert math.isclose(t3["comparisons"][0]["difference"],
                        rows3["loc+cls"]["id_rate"]["value"] - rows3["loc"]["id_rate"]["value"], abs_tol=1e-12)
    t2 = tables["II"]["direction"]
    assert t2["comparisons"][0]["figure"] == "map" and t2["comparisons"][0]["ci95"] == [None, None]
    t4 = tables["IV"]["direction"]
    assert set(t4["regions"]) <= {"all", "cervical", "thoracic", "lumbar", "sacral"} and "all" in t4["regions"]
    assert tables["V"].get("direction") is None  # ours, not a claim of the paper
    md = (report_dir / "report.md").read_text(encoding="utf-8")
    assert md.count("**Does the paper's direction hold here?**") == 4
    for number, t in (("I", d1), ("II", t2), ("III", t3), ("IV", t4)):
        assert f"- Table {number}: " in md and f"**{t['verdict']}" in md
