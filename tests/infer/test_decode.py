"""The sequence decoder (:mod:`vertstudy.infer.decoders`) on votes with a known answer.

Synthetic spines: vertebrae along canonical -z (index increasing toward the head, so C1 has the
largest z) at realistic spacings; each vertebra is seen by several tiles whose votes scatter a
few mm around its centroid. The decoder must pick one centroid per class near the truth, drop
outlier clusters that the spacing prior makes implausible, leave out classes with no evidence,
and agree with the per-class K-means on clean votes.
"""

from __future__ import annotations

import numpy as np
import pytest

from vertstudy.anatomy import NUM_CLASSES
from vertstudy.config import InferConfig
from vertstudy.infer.decoders import best_chain, decode_sequence, decode_votes, tiles_containing
from vertstudy.infer.tiling import TileOutputs
from vertstudy.infer.votes import Votes, cluster_all
from vertstudy.model.prior import SpinePrior, fit_spine_prior, population_prior

STEP = np.array([-25.0, 3.0, 0.0])  # canonical (z, y, x) mm from one class to the next


def spine(first: int, last: int, start=(600.0, 100.0, 100.0)) -> dict[int, np.ndarray]:
    """``{class: (3,) mm}`` of a straight spine of classes ``first..last``."""
    return {k: np.asarray(start) + (k - first) * STEP for k in range(first, last + 1)}


def training_prior(n: int = 12, seed: int = 0) -> SpinePrior:
    rng = np.random.default_rng(seed)
    cases = []
    for _ in range(n):
        pts = spine(0, NUM_CLASSES - 1)
        noisy = {k: p + rng.normal(0, 1.5, 3) for k, p in pts.items()}
        cases.append((np.array(sorted(noisy)), np.stack([noisy[k] for k in sorted(noisy)])))
    return fit_spine_prior(cases)


def votes_for(truth: dict[int, np.ndarray], per_class: int = 6, noise_mm: float = 2.0, seed: int = 0):
    rng = np.random.default_rng(seed)
    classes, points, weights = [], [], []
    for k, p in truth.items():
        for _ in range(per_class):
            classes.append(k)
            points.append(p + rng.normal(0, noise_mm, 3))
            weights.append(0.9)
    return np.array(classes), np.array(points), np.array(weights)


def seen_everywhere(per_class: int = 6):
    return lambda pts: np.full(len(pts), per_class)


def test_fit_spine_prior_mean_variance_and_unseen_pairs():
    a = (np.array([0, 1, 2]), np.array([[0.0, 0, 0], [-20, 1, 0], [-42, 2, 0]]))
    b = (np.array([0, 1]), np.array([[10.0, 0, 0], [-12, 3, 0]]))
    prior = fit_spine_prior([a, b])
    np.testing.assert_allclose(prior.mean[0], [-21.0, 2.0, 0.0])
    np.testing.assert_allclose(prior.var[0], [4.0, 4.0, 4.0])  # (1, 1, 0) floored at 4 mm^2
    np.testing.assert_allclose(prior.mean[1], [-22.0, 1.0, 0.0])
    assert prior.count.tolist()[:3] == [2, 1, 0]
    assert prior.var[2, 0] == 400.0  # never seen: median mean, wide variance
    mean, var = prior.between(noise_mm=0.0)
    np.testing.assert_allclose(mean[0, 2], prior.mean[0] + prior.mean[1])
    np.testing.assert_allclose(var[0, 2], prior.var[0] + prior.var[1])
    assert np.isnan(mean[2, 0]).all() and np.isnan(mean[1, 1]).all()
    restored = SpinePrior.from_state(prior.to_state())
    np.testing.assert_array_equal(restored.mean, prior.mean)
    with pytest.raises(ValueError, match="consecutive"):
        fit_spine_prior([(np.array([0, 2]), np.zeros((2, 3)))])


def test_population_prior_runs_head_to_feet_at_real_spacings():
    prior = population_prior()
    assert prior.count[:23].min() > 50  # C1..L5 from the shipped real spines
    assert (prior.mean[:23, 0] < 0).all()  # canonical z grows toward the head
    lengths = np.linalg.norm(prior.mean[:23], axis=1)
    assert 10 < lengths.min() and lengths.max() < 45  # mm between adjacent centroids


def test_clean_votes_decode_to_the_truth_like_kmeans():
    truth = spine(5, 16)
    classes, points, weights = votes_for(truth)
    decoded = decode_sequence(classes, points, weights, seen_everywhere(), training_prior(), 10.0, 0.15, 0.05)
    assert sorted(decoded) == sorted(truth)
    for k, d in decoded.items():
        assert np.linalg.norm(d.centre_mm - truth[k]) < 3.0
        assert d.votes == 6 and d.outliers == 0 and d.score == pytest.approx(0.9)
    km = cluster_all(Votes(classes, points, weights), min_votes=1, merge_vox=10.0)
    for k in truth:
        np.testing.assert_allclose(decoded[k].centre_mm, km[k].centre_zyx, atol=1e-9)


def test_an_outlier_cluster_is_dropped_by_the_spacing_prior_even_when_heavier():
    truth = spine(5, 16)
    classes, points, weights = votes_for(truth)
    # class 9 also gets a heavier cluster on vertebra 12's position (tiles that mistook it)
    wrong = truth[12] + np.random.default_rng(1).normal(0, 2.0, (8, 3))
    classes = np.concatenate([classes, np.full(8, 9)])
    points = np.concatenate([points, wrong])
    weights = np.concatenate([weights, np.full(8, 0.95)])
    decoded = decode_sequence(classes, points, weights, seen_everywhere(8), training_prior(), 10.0, 0.15, 0.05)
    assert np.linalg.norm(decoded[9].centre_mm - truth[9]) < 3.0
    assert np.linalg.norm(decoded[12].centre_mm - truth[12]) < 3.0
    assert decoded[9].outliers == 8
    km = cluster_all(Votes(classes, points, weights), min_votes=1, merge_vox=10.0)
    assert np.linalg.norm(km[9].centre_zyx - truth[12]) < 3.0  # the paper's 2-means keeps the heavier one


def test_missing_levels_are_left_out_and_the_rest_keep_their_labels():
    truth = {k: p for k, p in spine(3, 14).items() if k not in (8, 9)}
    classes, points, weights = votes_for(truth)
    decoded = decode_sequence(classes, points, weights, seen_everywhere(), training_prior(), 10.0, 0.15, 0.05)
    assert sorted(decoded) == sorted(truth)


def test_a_shifted_minority_label_is_outvoted_along_the_spine():
    truth = spine(10, 20)
    classes, points, weights = votes_for(truth)
    # two of vertebra 15's six votes say 16: the chain keeps 15 there and 16 at its own place
    idx = np.nonzero(classes == 15)[0][:2]
    classes[idx] = 16
    decoded = decode_sequence(classes, points, weights, seen_everywhere(), training_prior(), 10.0, 0.15, 0.05)
    for k in truth:
        assert np.linalg.norm(decoded[k].centre_mm - truth[k]) < 3.5, k


def test_weak_evidence_and_no_votes_predict_nothing():
    prior = training_prior()
    assert decode_sequence(np.zeros(0, np.int64), np.zeros((0, 3)), np.zeros(0), seen_everywhere(), prior,
                           10.0, 0.15, 0.05) == {}
    classes, points, weights = votes_for(spine(5, 8), per_class=1)
    # one vote among 20 tiles that see the point: score 0.045 < 0.15
    assert decode_sequence(classes, points, weights, seen_everywhere(20), prior, 10.0, 0.15, 0.05) == {}


def test_best_chain_uses_a_candidate_once_and_increasing_classes():
    cands = np.array([[0.0, 0, 0], [-25.0, 3, 0]])
    scores = np.zeros((2, NUM_CLASSES))
    scores[0, 4] = scores[0, 5] = 0.9  # candidate 0 looks like 4 or 5
    scores[1, 5] = 0.8
    chain = best_chain(cands, scores, training_prior(), 0.15, 0.05)
    assert chain == [(0, 4), (1, 5)]


def test_tiles_containing_counts_boxes():
    origins = np.array([[0, 0, 0], [4, 0, 0], [100, 0, 0]])
    counts = tiles_containing(np.array([[5.0, 1, 1], [1.0, 1, 1], [50.0, 1, 1]]), origins, (8, 8, 8))
    assert counts.tolist() == [2, 1, 0]


def test_decode_votes_sequence_in_voxels_matches_decode_sequence_in_mm():
    spacing = 4.0
    truth = spine(5, 12, start=(400.0, 60.0, 60.0))
    classes, points, weights = votes_for(truth)
    votes = Votes(classes, points / spacing, weights)
    origins = np.array([[z, 0, 0] for z in range(0, 160, 8)], dtype=np.int64)
    tiles = TileOutputs(origins, np.zeros((len(origins), NUM_CLASSES, 3)), np.zeros((len(origins), NUM_CLASSES)))
    prior = training_prior()
    got = decode_votes(votes, tiles, (48, 32, 32), InferConfig(decoder="sequence"), spacing, prior)
    assert sorted(got) == sorted(truth)
    for k, r in got.items():
        assert np.linalg.norm(r.centre_zyx * spacing - truth[k]) < 3.0
        assert r.probability == pytest.approx(min(1.0, 6 * 0.9 / 6), abs=0.2)


def test_the_sequence_centroid_leans_on_central_votes_and_its_labels_do_not_change():
    """``infer.centre_weight``: each class's votes near a tile face (low centrality) are off by
    6 mm along z; weighted by centrality the centroids move towards the truth, while the chosen
    classes and label scores stay those of the probabilities."""
    spacing = 4.0
    truth = spine(5, 12, start=(400.0, 60.0, 60.0))
    classes, points, weights = votes_for(truth, noise_mm=0.5)
    edge = np.zeros(len(classes), dtype=bool)
    edge[::3] = True  # a third of the votes lie near a face, pulled 6 mm off
    points = points + np.where(edge[:, None], [6.0, 0.0, 0.0], 0.0)
    depth = np.where(edge, 0.05, 1.0)
    origins = np.array([[z, 0, 0] for z in range(0, 160, 8)], dtype=np.int64)
    tiles = TileOutputs(origins, np.zeros((len(origins), NUM_CLASSES, 3)), np.zeros((len(origins), NUM_CLASSES)))
    votes = Votes(classes, points / spacing, weights, depth)
    prior = training_prior()
    plain = decode_votes(votes, tiles, (48, 32, 32), InferConfig(centre_weight=0.0), spacing, prior)
    central = decode_votes(votes, tiles, (48, 32, 32), InferConfig(centre_weight=1.0), spacing, prior)
    assert sorted(plain) == sorted(central) == sorted(truth)
    for k in truth:
        off_plain = np.linalg.norm(plain[k].centre_zyx * spacing - truth[k])
        off_central = np.linalg.norm(central[k].centre_zyx * spacing - truth[k])
        assert off_central < off_plain - 1.0
        assert central[k].probability == plain[k].probability and central[k].votes == plain[k].votes
