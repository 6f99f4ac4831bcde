"""The report's pooled figures count identification by both rules from the vertebra rows."""

from __future__ import annotations

import math

import pandas as pd

from vertstudy.report.stats import estimates, pooled


def rows(case: str, key: str, identified: list[bool], verse: list[bool]) -> pd.DataFrame:
    n = len(identified)
    return pd.DataFrame({"case": case, "key": key, "in_truth": [True] * n, "predicted": [True] * n,
                         "error_mm": [1.0 + i for i in range(n)], "identified": identified,
                         "identified_verse": verse})


def test_the_verse_rate_is_pooled_and_resampled_apart_from_the_papers():
    # two cases of one trial where the rules differ: paper 3/4 and 1/4, VerSe 2/4 and 4/4
    df = pd.concat([rows("a", "t1", [True, True, True, False], [True, True, False, False]),
                    rows("b", "t1", [True, False, False, False], [True, True, True, True]),
                    rows("a", "t2", [True, True, False, False], [True, False, False, False])], ignore_index=True)
    p = pooled(df)
    assert p["id_rate"] == 6 / 12 and p["id_rate_verse"] == 7 / 12
    e = estimates(df)
    assert e["id_rate_verse"].value == 7 / 12
    per_trial = [6 / 8, 1 / 4]  # t1: 6 of 8 by VerSe, t2: 1 of 4
    assert math.isclose(e["id_rate_verse"].seed_sd, pd.Series(per_trial).std(ddof=1))
    lo, hi = e["id_rate_verse"].ci95
    assert 0 <= lo <= 7 / 12 <= hi <= 1 and lo < hi


def test_rows_without_the_verse_column_leave_it_undefined():
    old = rows("a", "t1", [True, False], [True, True]).drop(columns="identified_verse")
    p = pooled(old)
    assert p["id_rate"] == 0.5 and math.isnan(p["id_rate_verse"])
    assert all(math.isnan(v) for v in estimates(old)["id_rate_verse"].ci95)
