"""Golden-value tests of vertstudy.train.metrics (paper III-C; vertstudy.study.schema, Metrics), by hand."""

from __future__ import annotations

import math
from dataclasses import asdict

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vertstudy.anatomy import NUM_CLASSES, REGIONS
from vertstudy.train.metrics import (
    VertebraRow,
    crop_metrics,
    match_case,
    mean_average_precision,
    per_class_average_precision,
    summarize,
)

C1, T1, T2, T3, T4, L1, S1 = 0, 7, 8, 9, 10, 19, 24


def p(*xyz):
    return np.array(xyz, dtype=float)


# One case exercising every rule (points in mm):
#   T1  truth (0,0,0),   pred (0,4,3):   error 5 (3-4-5); closest prediction -> identified
#   T2  truth (0,0,30),  pred (0,25,30): error 25 >= 20 -> not identified, though it is the closest
#       (T1 pred is sqrt(4^2 + 27^2) = 27.29 away, T4 pred 33)
#   T3  truth (0,0,60),  pred (0,0,68):  error 8, but T4's pred (0,0,63) is only 3 away -> stolen
#   T4  not in truth,    pred (0,0,63):  extra prediction
#   L1  truth (0,0,200), no prediction -> not identified, no error
#   S1  truth (0,0,300), pred (0,6,308): error 10 (6-8-10) -> identified
#   C1  not in truth,    pred (0,0,-500): far-away extra prediction, harmless
TRUTH = {T1: p(0, 0, 0), T2: p(0, 0, 30), T3: p(0, 0, 60), L1: p(0, 0, 200), S1: p(0, 0, 300)}
PRED = {T1: p(0, 4, 3), T2: p(0, 25, 30), T3: p(0, 0, 68), T4: p(0, 0, 63), S1: p(0, 6, 308), C1: p(0, 0, -500)}


def test_match_case_rows():
    rows = match_case(PRED, TRUTH)
    assert [r.label for r in rows] == list(range(NUM_CLASSES))
    by = {r.label: r for r in rows}
    # the last flag is the VerSe rule: T3's own prediction is the one closest to T3's truth among
    # the truths in both (T4 is not in the truth), so VerSe counts T3 where the paper does not
    assert by[T1] == VertebraRow(T1, "thoracic", True, True, 5.0, True, True)
    assert by[T2] == VertebraRow(T2, "thoracic", True, True, 25.0, False, False)
    assert by[T3] == VertebraRow(T3, "thoracic", True, True, 8.0, False, True)
    assert by[S1] == VertebraRow(S1, "sacral", True, True, 10.0, True, True)
    assert by[L1].in_truth and not by[L1].predicted and math.isnan(by[L1].error_mm) and not by[L1].identified
    assert by[T4].predicted and not by[T4].in_truth and math.isnan(by[T4].error_mm) and not by[T4].identified
    untouched = by[20]
    assert not (untouched.in_truth or untouched.predicted or untouched.identified)
    assert untouched.region == "lumbar"


def test_summarize_golden():
    # errors of matched (in truth and predicted): T1 5, T2 25, T3 8, S1 10 -> mean 48/4 = 12
    # std (ddof 0): deviations -7, 13, -4, -2 -> (49 + 169 + 16 + 4) / 4 = 59.5 -> sqrt(59.5) = 7.7136
    # identified T1, S1 of 5 in truth -> 0.4; predicted C1, T1, T2, T3, T4, S1 = 6; matched 4
    s = summarize(match_case(PRED, TRUTH))
    assert s["loc_error_mm_mean"] == pytest.approx(12.0)
    assert s["loc_error_mm_std"] == pytest.approx(math.sqrt(59.5))
    assert s["id_rate"] == pytest.approx(0.4)
    assert s["id_rate_verse"] == pytest.approx(0.6)  # T1, T3, S1 of 5 (see test_match_case_rows)
    assert (s["n_truth"], s["n_predicted"], s["n_matched"]) == (5, 6, 4)


def test_summarize_per_region():
    s = summarize(match_case(PRED, TRUTH))
    # thoracic: truth T1 T2 T3, identified T1 -> 1/3; errors 5, 25, 8 -> 38/3; predicted T1..T4 = 4
    assert s["id_rate_thoracic"] == pytest.approx(1 / 3)
    assert s["loc_error_mm_mean_thoracic"] == pytest.approx(38 / 3)
    assert (s["n_truth_thoracic"], s["n_predicted_thoracic"], s["n_matched_thoracic"]) == (3, 4, 3)
    # lumbar: L1 in truth, never predicted -> id 0/1, no error to average
    assert s["id_rate_lumbar"] == 0.0
    assert math.isnan(s["loc_error_mm_mean_lumbar"]) and math.isnan(s["loc_error_mm_std_lumbar"])
    # sacral: S1 identified, error 10, std 0
    assert (s["id_rate_sacral"], s["loc_error_mm_mean_sacral"], s["loc_error_mm_std_sacral"]) == (1.0, 10.0, 0.0)
    # cervical: nothing in truth -> NaN id rate; C1 predicted anyway
    assert math.isnan(s["id_rate_cervical"]) and s["n_predicted_cervical"] == 1
    for region in REGIONS:
        for key in ("loc_error_mm_mean", "loc_error_mm_std", "id_rate", "n_truth", "n_predicted", "n_matched"):
            assert f"{key}_{region}" in s


def test_summarize_pools_cases_and_accepts_records():
    # second case: L1 truth (0,0,0), pred (0,0,2) -> error 2, identified
    # pooled errors 5, 25, 8, 10, 2 -> 50/5 = 10; identified 3 of 6
    rows = match_case(PRED, TRUTH) + match_case({L1: p(0, 0, 2)}, {L1: p(0, 0, 0)})
    s = summarize(rows)
    assert s["loc_error_mm_mean"] == pytest.approx(10.0)
    assert s["id_rate"] == pytest.approx(0.5)
    assert s["id_rate_lumbar"] == pytest.approx(0.5)  # L1 of case 1 missed, of case 2 identified
    records = summarize([asdict(r) for r in rows])
    assert records.keys() == s.keys()
    np.testing.assert_equal(list(records.values()), list(s.values()))


def test_identification_radius_is_strict_and_ties_go_to_the_own_class():
    # own prediction exactly 20 mm away: paper "less than 20mm" -> not identified; 19.99 -> identified
    assert not match_case({T1: p(0, 0, 20)}, {T1: p(0, 0, 0)})[T1].identified
    assert match_case({T1: p(0, 0, 19.99)}, {T1: p(0, 0, 0)})[T1].identified
    # T2's prediction exactly as close as T1's own (both 5 mm) -> still identified
    rows = match_case({T1: p(0, 0, 5), T2: p(0, 0, -5)}, {T1: p(0, 0, 0)})
    assert rows[T1].identified


def test_verse_rule_differs_from_the_paper_both_ways():
    # T1's prediction is nearer T2's truth than its own: the paper looks from T1's truth (its own
    # prediction is the nearest, 6 mm) and counts it; VerSe looks from the prediction and does not
    rows = match_case({T1: p(0, 0, 6), T2: p(0, 0, 30)}, {T1: p(0, 0, 0), T2: p(0, 0, 10)})
    assert rows[T1].identified and not rows[T1].identified_verse
    # a stray prediction of a class not in the truth steals nothing under VerSe (T3 of the golden case)
    rows = match_case({T1: p(0, 0, 8), T2: p(0, 0, 2)}, {T1: p(0, 0, 0)})
    assert not rows[T1].identified and rows[T1].identified_verse
    # radius: VerSe counts exactly 20 mm (it drops > 20), the paper needs less than 20
    rows = match_case({T1: p(0, 0, 20)}, {T1: p(0, 0, 0)})
    assert not rows[T1].identified and rows[T1].identified_verse
    # a tie between two truths goes to the lower class index (numpy's argmin in get_hits)
    rows = match_case({T1: p(0, 0, -30), T2: p(0, 0, 5)}, {T1: p(0, 0, 0), T2: p(0, 0, 10)})
    assert rows[T2].identified and not rows[T2].identified_verse


def _verse_reference(pred: dict, truth: dict, radius: float = 20.0) -> set[int]:
    """get_hits as its docstring and code read, one vertebra at a time."""
    both = sorted(set(pred) & set(truth))
    hits = set()
    for k in both:
        d = [float(np.linalg.norm(pred[k] - truth[j])) for j in both]
        if both[int(np.argmin(d))] == k and float(np.linalg.norm(pred[k] - truth[k])) <= radius:
            hits.add(k)
    return hits


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 10_000))
def test_verse_rule_matches_a_plain_reference(seed):
    rng = np.random.default_rng(seed)
    truth = {k: p(0, 0, 30.0 * k) for k in sorted(rng.choice(NUM_CLASSES, rng.integers(0, 8), replace=False))}
    pred = {k: p(*rng.normal(0, 15, 3)) + p(0, 0, 30.0 * k + rng.choice([0, 0, 30, -30]))
            for k in sorted(rng.choice(NUM_CLASSES, rng.integers(0, 8), replace=False))}
    rows = match_case(pred, truth)
    assert {r.label for r in rows if r.identified_verse} == _verse_reference(pred, truth)


def test_tables_without_the_verse_column_still_summarize():
    records = [{k: v for k, v in asdict(r).items() if k != "identified_verse"} for r in match_case(PRED, TRUTH)]
    s = summarize(records)
    assert "id_rate_verse" not in s and s["id_rate"] == pytest.approx(0.4)


def test_no_predictions_at_all():
    s = summarize(match_case({}, TRUTH))
    assert s["id_rate"] == 0.0 and s["n_predicted"] == 0
    assert math.isnan(s["loc_error_mm_mean"])


def test_match_case_rejects_bad_input():
    with pytest.raises(ValueError, match="pred: class index"):
        match_case({26: p(0, 0, 0)}, {})
    with pytest.raises(ValueError, match="truth: class 3 point"):
        match_case({}, {3: np.zeros(2)})


# --- mAP ------------------------------------------------------------------------------------


def _map_case():
    """4 samples. Class 0: positives at scores 0.9 and 0.3 (negatives 0.8, 0.1);
    class 1: single positive ranked first; class 7: single positive ranked last; others: none."""
    probs = np.full((4, NUM_CLASSES), 0.5)
    present = np.zeros((4, NUM_CLASSES))
    probs[:, 0], present[:, 0] = [0.9, 0.8, 0.3, 0.1], [1, 0, 1, 0]
    probs[:, 1], present[:, 1] = [0.2, 0.6, 0.4, 0.1], [0, 1, 0, 0]
    probs[:, 7], present[:, 7] = [0.7, 0.6, 0.5, 0.4], [0, 0, 0, 1]
    return probs, present


def test_average_precision_hand_case():
    # class 0, by descending score P N P N: precision 1 at recall 1/2, 2/3 at recall 1
    #   AP = 1/2 * 1 + 1/2 * 2/3 = 5/6
    # class 1: the positive first -> 1;  class 7: the positive fourth -> precision 1/4 at recall 1 -> 1/4
    # every other class has no positive -> NaN, left out of the mean
    # mAP = (5/6 + 1 + 1/4) / 3 = 25/36 = 0.69444
    probs, present = _map_case()
    ap = per_class_average_precision(probs, present)
    np.testing.assert_allclose(ap[[0, 1, 7]], [5 / 6, 1.0, 0.25])
    assert np.isnan(np.delete(ap, [0, 1, 7])).all()
    assert mean_average_precision(probs, present) == pytest.approx(25 / 36)


def test_map_without_any_positive_is_nan():
    assert math.isnan(mean_average_precision(np.full((3, NUM_CLASSES), 0.5), np.zeros((3, NUM_CLASSES))))


# --- crop-level metrics -----------------------------------------------------------------------


def _crops():
    """Two crops at 2 mm spacing (voxel coordinates z, y, x).

    crop 0: T1 at (10,10,10) predicted (10,10,13): 3 vox = 6 mm
            T2 at (20,10,10) predicted (20,14,10): 4 vox = 8 mm
            T3 (absent) predicted at (20,11,10): 1 vox = 2 mm from T2's truth
    crop 1: L1 at (30,30,30) predicted (30,30,42): 12 vox = 24 mm
    every other class predicted at (100,100,100), > 300 mm from any truth.
    """
    pred = np.full((2, NUM_CLASSES, 3), 100.0)
    true = np.zeros((2, NUM_CLASSES, 3))
    present = np.zeros((2, NUM_CLASSES))
    true[0, T1], pred[0, T1], present[0, T1] = (10, 10, 10), (10, 10, 13), 1
    true[0, T2], pred[0, T2], present[0, T2] = (20, 10, 10), (20, 14, 10), 1
    pred[0, T3] = (20, 11, 10)
    true[1, L1], pred[1, L1], present[1, L1] = (30, 30, 30), (30, 30, 42), 1
    probs = np.full((2, NUM_CLASSES), 0.1)
    probs[0, T1], probs[0, T2], probs[0, T3], probs[0, L1] = 0.9, 0.8, 0.2, 0.75
    probs[1, L1] = 0.7
    return pred, true, present, probs


def test_crop_metrics_without_probs():
    # loc error over the 3 present: (6 + 8 + 24) / 3 = 38/3
    # all 26 classes count as predicted: T1 identified (6 mm; next closest T3 pred sqrt(10^2+1)*2 = 20.1 mm);
    # T2 stolen by T3's coordinate (2 mm < 8 mm); L1 24 mm >= 20 -> 1/3
    pred, true, present, _ = _crops()
    m = crop_metrics(pred, true, present, None, spacing_mm=2.0)
    assert m["loc_error_mm"] == pytest.approx(38 / 3)
    assert m["id_rate"] == pytest.approx(1 / 3)
    assert math.isnan(m["map"])
    assert m["loc_error_mm_thoracic"] == pytest.approx(7.0)  # (6 + 8) / 2
    assert m["id_rate_thoracic"] == pytest.approx(0.5)
    assert (m["loc_error_mm_lumbar"], m["id_rate_lumbar"]) == (pytest.approx(24.0), 0.0)
    assert math.isnan(m["loc_error_mm_cervical"]) and math.isnan(m["id_rate_cervical"])


def test_crop_metrics_with_probs():
    # T3's prob 0.2 <= 0.5 -> not a predicted class, so T2 is identified (8 mm): id 2/3
    # loc error ignores probs: 38/3
    # mAP: T1 (0.9 pos vs 0.1) 1, T2 (0.8 vs 0.1) 1, L1 (positive 0.7 ranked below crop 0's 0.75) 1/2
    #   -> (1 + 1 + 1/2) / 3 = 5/6; thoracic 1, lumbar 1/2
    pred, true, present, probs = _crops()
    m = crop_metrics(pred, true, present, probs, spacing_mm=2.0)
    assert m["loc_error_mm"] == pytest.approx(38 / 3)
    assert m["id_rate"] == pytest.approx(2 / 3)
    assert m["map"] == pytest.approx(5 / 6)
    assert (m["map_thoracic"], m["map_lumbar"]) == (pytest.approx(1.0), pytest.approx(0.5))
    assert math.isnan(m["map_cervical"])


def test_crop_metrics_own_class_below_threshold_is_not_identified():
    pred, true, present, probs = _crops()
    probs[0, T1] = 0.4  # T1's coordinate is right (6 mm) but the class is not predicted
    m = crop_metrics(pred, true, present, probs, spacing_mm=2.0)
    assert m["id_rate"] == pytest.approx(1 / 3)  # only T2 left


def test_crop_metrics_anisotropic_spacing():
    # spacing (z, y, x) = (1, 2, 3) mm; offset (1, 1, 1) vox -> sqrt(1 + 4 + 9) = sqrt(14) mm
    pred, true, present = np.zeros((1, NUM_CLASSES, 3)), np.zeros((1, NUM_CLASSES, 3)), np.zeros((1, NUM_CLASSES))
    pred[0, L1], present[0, L1] = (1, 1, 1), 1
    m = crop_metrics(pred, true, present, None, spacing_mm=(1.0, 2.0, 3.0))
    assert m["loc_error_mm"] == pytest.approx(math.sqrt(14))


# --- properties -------------------------------------------------------------------------------

_point = st.tuples(*[st.floats(-60, 60, allow_nan=False)] * 3).map(np.array)
_points = st.dictionaries(st.integers(0, NUM_CLASSES - 1), _point, max_size=8)


@settings(max_examples=60, deadline=None)
@given(pred=_points, truth=_points)
def test_identification_properties(pred, truth):
    rows = match_case(pred, truth)
    s = summarize(rows)
    if truth:
        assert 0.0 <= s["id_rate"] <= 1.0
    else:
        assert math.isnan(s["id_rate"])
    for r in rows:
        if r.identified:
            assert r.in_truth and r.predicted and r.error_mm < 20.0


@settings(max_examples=60, deadline=None)
@given(pred=_points, truth=_points, seed=st.integers(0, 2**32 - 1), shift=_point)
def test_relabelling_and_moving_consistently_changes_nothing_pooled(pred, truth, seed, shift):
    perm = np.random.default_rng(seed).permutation(NUM_CLASSES)
    base = summarize(match_case(pred, truth))
    moved = summarize(
        match_case(
            {int(perm[k]): v + shift for k, v in pred.items()}, {int(perm[k]): v + shift for k, v in truth.items()}
        )
    )
    for key in ("id_rate", "loc_error_mm_mean", "loc_error_mm_std", "n_truth", "n_predicted", "n_matched"):
        np.testing.assert_allclose(moved[key], base[key], rtol=1e-9, atol=1e-9)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), with_probs=st.booleans())
def test_crop_metrics_ranges(seed, with_probs):
    rng = np.random.default_rng(seed)
    n = 3
    pred, true = rng.uniform(0, 20, (n, NUM_CLASSES, 3)), rng.uniform(0, 20, (n, NUM_CLASSES, 3))
    present = rng.random((n, NUM_CLASSES)) < 0.3
    present[0, 0] = True
    probs = rng.random((n, NUM_CLASSES)) if with_probs else None
    m = crop_metrics(pred, true, present, probs, spacing_mm=2.0)
    assert 0.0 <= m["id_rate"] <= 1.0
    assert m["loc_error_mm"] >= 0.0
    if with_probs:
        assert 0.0 <= m["map"] <= 1.0
