"""Whole-CT inference: tiling, votes, K-means clustering, and a real tiny network on a phantom.

Votes are checked without a trained model by feeding :func:`collect_votes` the outputs a
perfect network would give for a known volume (the true centroids in each tile's coordinates),
plus wrong votes; the clustering must recover the truth. A real (untrained, tiny) network then
runs end to end on a small phantom, to check shapes and the mapping to physical space.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vertstudy.anatomy import NUM_CLASSES
from vertstudy.config import Config, InferConfig
from vertstudy.data.phantom import PhantomConfig, generate_case
from vertstudy.errors import ConfigError
from vertstudy.infer.tiling import axis_origins, tile_origins
from vertstudy.infer.votes import Votes, centrality, choose_cluster, cluster_all, cluster_votes, collect_votes
from vertstudy.infer.whole import predict_case, predict_volume
from vertstudy.model.network import build_model


def tiny_config(**infer) -> Config:
    """A network small enough for CPU tests, at 4 mm so phantom volumes stay small."""
    infer = {"stride": (8, 8, 8), "batch_size": 4, "threshold": 0.05, "min_votes": 1, **infer}
    return Config.model_validate({
        "data": {"prep": {"spacing_mm": 4.0}, "crop": {"crop_size": (16, 16, 16)}},
        "model": {"width": 0.25, "lstm_hidden": 8, "lstm_layers": 1},
        "infer": infer,
    })


# -- tiling ----------------------------------------------------------------------------------
@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 300), c=st.integers(1, 120), frac=st.floats(0.01, 1.0))
def test_axis_origins_cover_every_voxel_and_last_is_flush(n, c, frac):
    s = max(1, int(round(c * frac)))
    origins = axis_origins(n, c, s)
    assert (np.diff(origins) > 0).all()
    covered = np.zeros(n, dtype=bool)
    for o in origins:
        covered[max(o, 0) : min(o + c, n)] = True
    assert covered.all()
    if n > c:
        assert origins[0] == 0 and origins[-1] == n - c  # flush with both ends, never outside
        assert (np.diff(origins) <= s).all()
        assert len(origins) == -(-(n - c) // s) + 1
    else:
        assert len(origins) == 1 and -((c - n) // 2) == origins[0] <= 0  # centred, padded
        assert origins[0] + c >= n


def test_tile_origins_cover_a_volume():
    shape, crop, stride = (37, 20, 9), (16, 8, 16), (7, 8, 4)
    origins = tile_origins(shape, crop, stride)
    assert origins.shape == (len(axis_origins(37, 16, 7)) * len(axis_origins(20, 8, 8)) * 1, 3)
    count = np.zeros(shape, dtype=int)
    for o in origins:
        lo = np.maximum(o, 0)
        hi = np.minimum(o + np.array(crop), shape)
        count[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] += 1
    assert count.min() >= 1
    assert origins[:, 0].max() + crop[0] == shape[0] and origins[:, 1].max() + crop[1] == shape[1]
    assert (origins[:, 2] == -3).all()  # x (9 voxels) is shorter than the crop (16): centred


def test_stride_larger_than_the_crop_is_refused():
    with pytest.raises(ConfigError, match="infer.stride"):
        tile_origins((100, 50, 50), (32, 24, 24), (16, 25, 12))


# -- votes -----------------------------------------------------------------------------------
def test_collect_votes_threshold_inside_and_mapping():
    crop = (16, 8, 8)
    coords = np.full((2, NUM_CLASSES, 3), 3.0)
    coords[0, 1] = (15.9, 7.5, 0.0)  # inside (upper bound is exclusive)
    coords[0, 2] = (16.0, 1.0, 1.0)  # outside along z
    coords[0, 3] = (-0.1, 1.0, 1.0)  # outside
    coords[0, 4] = np.nan
    probs = np.zeros((2, NUM_CLASSES))
    probs[0, [0, 1, 2, 3, 4]] = 0.9
    probs[1, 5] = 0.5  # exactly at the threshold: votes
    probs[1, 6] = 0.49
    origins = np.array([[10, 0, -2], [0, 5, 5]])
    votes = collect_votes(coords, probs, origins, crop, threshold=0.5)
    assert votes.classes.tolist() == [0, 1, 5]
    np.testing.assert_allclose(votes.points_zyx, [[13, 3, 1], [25.9, 7.5, -2], [3, 8, 8]])
    np.testing.assert_allclose(votes.weights, [0.9, 0.9, 0.5])
    # A volume of (20, 20, 20): the vote at x = -2 lies outside it (in the padding).
    inside = collect_votes(coords, probs, origins, crop, threshold=0.5, volume_shape=(30, 20, 20))
    assert inside.classes.tolist() == [0, 5]


def test_collect_votes_loc_only_every_inside_class_votes_with_weight_one():
    coords = np.full((1, NUM_CLASSES, 3), 2.0)
    coords[0, 7] = (-1.0, 0.0, 0.0)
    votes = collect_votes(coords, None, np.zeros((1, 3)), (8, 8, 8), threshold=0.99)
    assert votes.classes.tolist() == [k for k in range(NUM_CLASSES) if k != 7]
    assert (votes.weights == 1.0).all()


# -- clustering golden cases ------------------------------------------------------------------
def _cloud(centre, n, spread, seed):
    rng = np.random.default_rng(seed)
    return np.asarray(centre, dtype=np.float64) + rng.uniform(-spread, spread, size=(n, 3))


def test_one_tight_cluster_gives_its_weighted_mean():
    pts = _cloud((40, 20, 30), 8, 1.0, 0)
    w = np.linspace(0.5, 1.0, 8)
    centre = cluster_votes(pts, w, merge_vox=5.0)
    np.testing.assert_allclose(centre, (pts * w[:, None]).sum(0) / w.sum())


def test_distant_outlier_cluster_is_dropped():
    good = _cloud((40, 20, 30), 8, 1.0, 1)
    bad = _cloud((58, 20, 30), 3, 1.0, 2)  # a neighbour 18 voxels (36 mm) away, mistaken for this class
    pts = np.concatenate([good, bad])
    w = np.concatenate([np.full(8, 0.9), np.full(3, 0.8)])
    keep = choose_cluster(pts, w, merge_vox=5.0)
    assert keep.tolist() == [True] * 8 + [False] * 3
    np.testing.assert_allclose(cluster_votes(pts, w, merge_vox=5.0), good.mean(0))


def test_heavier_cluster_wins_even_with_fewer_votes():
    a = _cloud((10, 10, 10), 3, 0.5, 3)  # 3 confident votes
    b = _cloud((40, 10, 10), 5, 0.5, 4)  # 5 unsure ones
    pts = np.concatenate([a, b])
    w = np.concatenate([np.full(3, 0.95), np.full(5, 0.5)])  # 2.85 > 2.5
    np.testing.assert_allclose(cluster_votes(pts, w, merge_vox=5.0), a.mean(0))


def test_two_nearby_sub_clusters_are_merged():
    a = _cloud((40, 20, 30), 6, 0.3, 5)
    b = _cloud((43, 20, 30), 4, 0.3, 6)  # 3 voxels = 6 mm apart at 2 mm: the same vertebra
    pts = np.concatenate([a, b])
    w = np.ones(len(pts))
    assert choose_cluster(pts, w, merge_vox=5.0).all()
    np.testing.assert_allclose(cluster_votes(pts, w, merge_vox=5.0), pts.mean(0))


def test_min_votes_is_respected_after_dropping_outliers():
    good = _cloud((40, 20, 30), 3, 0.5, 7)
    bad = _cloud((70, 20, 30), 2, 0.5, 8)
    pts = np.concatenate([good, bad])
    w = np.full(5, 0.9)
    assert cluster_votes(pts, w, min_votes=3, merge_vox=5.0) is not None
    assert cluster_votes(pts, w, min_votes=4, merge_vox=5.0) is None  # 5 votes, but only 3 kept
    assert cluster_votes(np.zeros((0, 3)), np.zeros(0)) is None
    single = cluster_votes(np.array([[1.0, 2.0, 3.0]]), np.array([0.7]))
    np.testing.assert_allclose(single, [1, 2, 3])
    dup = cluster_votes(np.tile([[1.0, 2.0, 3.0]], (4, 1)), np.full(4, 0.7), min_votes=4)
    np.testing.assert_allclose(dup, [1, 2, 3])


def test_clustering_is_deterministic():
    rng = np.random.default_rng(9)
    pts = np.concatenate([rng.normal((40, 20, 30), 2.0, (20, 3)), rng.normal((52, 22, 30), 3.0, (9, 3))])
    w = rng.uniform(0.5, 1.0, len(pts))
    first = [cluster_votes(pts, w, merge_vox=5.0) for _ in range(3)]
    masks = [choose_cluster(pts, w, merge_vox=5.0) for _ in range(3)]
    for c, m in zip(first[1:], masks[1:]):
        np.testing.assert_array_equal(c, first[0])
        np.testing.assert_array_equal(m, masks[0])


# -- votes of a perfect network on a known volume ----------------------------------------------
def test_votes_of_a_perfect_network_recover_the_truth():
    """Truth centroids in a (90, 40, 50) volume; each tile gets the outputs a perfect network would
    give (the centroids inside it, in crop voxels, probability 0.9; the others probability 0.05),
    plus in some tiles a confident wrong vote (a neighbour's position for class 10)."""
    shape, crop, stride = (90, 40, 50), (32, 24, 24), (16, 12, 12)
    truth = {k: np.array([8.0 + 4.3 * (k - 5), 20.0 + 0.1 * k, 25.0 - 0.2 * k]) for k in range(5, 23)}
    origins = tile_origins(shape, crop, stride)
    coords = np.zeros((len(origins), NUM_CLASSES, 3))
    probs = np.full((len(origins), NUM_CLASSES), 0.05)
    rng = np.random.default_rng(0)
    for t, o in enumerate(origins):
        for k, p in truth.items():
            c = p - o + rng.normal(0, 0.3, 3)  # small scatter of the localisation
            coords[t, k] = c
            if ((c >= 0) & (c < crop)).all():
                probs[t, k] = 0.9
        if t % 3 == 0:  # a shift like paper Fig. 9B: class 10 placed on class 14
            c = truth[14] - o
            if ((c >= 0) & (c < crop)).all():
                coords[t, 10], probs[t, 10] = c, 0.6
    votes = collect_votes(coords, probs, origins, crop, threshold=0.5, volume_shape=shape)
    result = cluster_all(votes, min_votes=2, merge_vox=5.0)
    assert set(result) == set(truth)
    for k, r in result.items():
        assert np.linalg.norm(r.centre_zyx - truth[k]) < 0.5, k
        assert r.probability == pytest.approx(0.9)
    assert result[10].outliers > 0


# -- a real tiny network ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_model():
    cfg = tiny_config()
    torch.manual_seed(0)
    return build_model(cfg.model).eval(), cfg


@pytest.fixture(scope="module")
def small_phantom():
    config = PhantomConfig.fixed_grid(size_xyz=(40, 40, 56), spacing_xyz=(3.0, 3.0, 4.0))
    return generate_case(1, 0, config)


def test_predict_volume_returns_centroids_inside_the_volume(tiny_model):
    model, cfg = tiny_model
    volume = np.random.default_rng(0).normal(size=(40, 13, 20)).astype(np.float32)  # y, x below the crop
    centroids = predict_volume(model, volume, -1.0, cfg.data.crop.crop_size, cfg.infer, device="cpu",
                               spacing_mm=4.0)
    assert centroids, "threshold 0.05 on an untrained model: every class should vote"
    for k, c in centroids.items():
        assert 0 <= k < NUM_CLASSES and c.shape == (3,)
        assert ((c >= -0.5) & (c <= np.array(volume.shape) - 0.5)).all()


def test_predict_case_maps_to_lps_and_original_index(tiny_model, small_phantom):
    model, cfg = tiny_model
    # the paper decoder: an untrained model votes everywhere, which the sequence decoder rightly rejects
    pred = predict_case(model, cfg, small_phantom,
                        InferConfig(stride=(8, 8, 8), threshold=0.05, min_votes=2, decoder="kmeans",
                                    kmeans_threshold=None))
    assert pred.vertebrae and pred.tiles > 1 and pred.votes >= len(pred.vertebrae)
    assert [v.index for v in pred.vertebrae] == sorted(v.index for v in pred.vertebrae)
    image, geo = small_phantom.image, pred.geometry
    for v in pred.vertebrae:
        assert v.votes >= 2
        np.testing.assert_allclose(v.xyz_mm, geo.canonical_to_physical(np.array(v.zyx_vox))[0], atol=1e-9)
        np.testing.assert_allclose(v.index_xyz, image.TransformPhysicalPointToContinuousIndex(v.xyz_mm), atol=1e-6)
        size = np.array(image.GetSize())
        assert ((np.array(v.index_xyz) >= -0.5 - 1e-6) & (np.array(v.index_xyz) <= size - 0.5 + 1e-6)).all()
        assert 0.0 < v.probability < 1.0


def test_loc_only_model_votes_every_class():
    cfg = Config.model_validate({**tiny_config().model_dump(), "model": {"width": 0.25, "tasks": "loc"}})
    torch.manual_seed(0)
    model = build_model(cfg.model)
    volume = np.zeros((24, 16, 16), dtype=np.float32)
    # the paper's decoder on every tile (this volume is all "air", which inference would skip)
    infer = cfg.infer.model_copy(update={"decoder": "kmeans", "skip_empty_tiles": False})
    centroids = predict_volume(model, volume, 0.0, cfg.data.crop.crop_size, infer, spacing_mm=4.0)
    assert len(centroids) == NUM_CLASSES  # no classifier: every class is "found"
    skipped = predict_volume(model, volume, 0.0, cfg.data.crop.crop_size,
                             infer.model_copy(update={"skip_empty_tiles": True}), spacing_mm=4.0)
    assert skipped == {}  # every tile without body skipped: nothing to vote


def test_centrality_is_one_at_the_centre_and_falls_towards_every_face():
    crop = (16, 8, 8)
    assert centrality(np.array([7.5, 3.5, 3.5]), crop) == pytest.approx(1.0)
    # the outermost voxel: 0.5 voxel from the face, over half the tile, on that axis only
    assert centrality(np.array([0.0, 3.5, 3.5]), crop) == pytest.approx(0.5 / 8)
    assert centrality(np.array([15.0, 3.5, 3.5]), crop) == pytest.approx(0.5 / 8)
    assert centrality(np.array([7.5, 0.0, 7.0]), crop) == pytest.approx((0.5 / 4) ** 2)
    line = centrality(np.stack([np.array([z, 3.5, 3.5]) for z in np.arange(0.0, 7.6, 0.5)]), crop)
    assert np.all(np.diff(line) > 0)  # deeper is more central, up to the centre


def test_votes_carry_centrality_and_position_weights_only_move_centroids():
    crop = (16, 8, 8)
    coords = np.full((2, NUM_CLASSES, 3), 3.5)
    coords[0, 4] = (7.5, 3.5, 3.5)  # tile 0 sees class 4 at its centre
    coords[1, 4] = (1.0, 3.5, 3.5)  # tile 1 near its lower z face
    probs = np.zeros((2, NUM_CLASSES))
    probs[:, 4] = 0.9
    origins = np.array([[0, 0, 0], [10, 0, 0]])  # votes at z = 7.5 and z = 11
    votes = collect_votes(coords, probs, origins, crop, threshold=0.5)
    np.testing.assert_allclose(votes.centrality, centrality(coords[[0, 1], 4], crop))
    np.testing.assert_allclose(votes.position_weights(0.0), votes.weights)
    plain = cluster_all(votes, 1, merge_vox=5.0)[4]
    central = cluster_all(votes, 1, merge_vox=5.0, centre_weight=2.0)[4]
    assert plain.centre_zyx[0] == pytest.approx(9.25)
    assert 7.5 < central.centre_zyx[0] < 8.0  # pulled towards the central vote
    assert central.weight == plain.weight and central.probability == plain.probability
    both = Votes.concat([votes, Votes(np.array([4]), np.array([[0.0, 0, 0]]), np.array([0.5]))])
    assert both.centrality.tolist() == [*votes.centrality.tolist(), 1.0]  # unrecorded: 1


def test_votes_concat_and_of_class():
    a = Votes(np.array([1, 2]), np.array([[0.0, 0, 0], [1, 1, 1]]), np.array([0.5, 0.6]))
    b = Votes(np.array([2]), np.array([[2.0, 2, 2]]), np.array([0.7]))
    both = Votes.concat([a, b, Votes.empty()])
    pts, w = both.of_class(2)
    assert len(both) == 3 and pts.tolist() == [[1, 1, 1], [2, 2, 2]] and w.tolist() == [0.6, 0.7]


def test_whole_ct_validation_tiles_at_half_a_crop_unless_told_otherwise():
    from vertstudy.config import load_config
    from vertstudy.infer.evaluate import validation_infer

    cfg = load_config({"data.crop.crop_size": (48, 32, 32), "infer.stride": (12, 8, 8)})
    assert validation_infer(cfg).stride == (24, 16, 16) and cfg.infer.stride == (12, 8, 8)
    same = load_config({"data.crop.crop_size": (48, 32, 32), "infer.stride": (12, 8, 8),
                        "train.whole_ct_tiles_per_crop": 0})
    assert validation_infer(same) == same.infer


def test_the_kmeans_decoder_keeps_its_own_vote_threshold_and_centre_weight():
    """``infer.kmeans_threshold`` / ``kmeans_centre_weight``: K-means clusters only the votes at
    least that likely (here 6 votes of probability 0.6, far from the spine, outweigh 3 of 0.95 at
    0.5 but are dropped at 0.9) and weights its centroids by that power of centrality; null
    fields fall back to ``infer.threshold`` / ``centre_weight``, and the sequence decoder is not
    affected."""
    from vertstudy.infer.decoders import decode_votes
    from vertstudy.infer.tiling import TileOutputs

    good = np.array([[40.0, 20, 20], [41.0, 20, 20], [40.5, 21, 20]])
    stray = np.array([[40.0, 60, 60], [40.0, 61, 60], [41.0, 60, 61], [40.5, 60, 60], [40, 60, 61], [41, 61, 60]])
    votes = Votes(np.full(9, 4), np.vstack([good, stray]), np.array([0.95] * 3 + [0.6] * 6),
                  np.array([1.0, 0.5, 0.5, 1, 1, 1, 1, 1, 1]))
    tiles = TileOutputs(np.zeros((1, 3), np.int64), np.zeros((1, NUM_CLASSES, 3)), np.zeros((1, NUM_CLASSES)))
    paper = InferConfig(decoder="kmeans", kmeans_threshold=None, kmeans_centre_weight=None, centre_weight=0.0)
    own = InferConfig(decoder="kmeans", kmeans_threshold=0.9, kmeans_centre_weight=8.0, centre_weight=0.0)
    at_paper = decode_votes(votes, tiles, (48, 32, 32), paper, 4.0)[4]
    at_own = decode_votes(votes, tiles, (48, 32, 32), own, 4.0)[4]
    assert at_paper.centre_zyx[1] > 50  # the stray cluster outweighs the spine's
    assert at_own.votes == 3 and at_own.centre_zyx[1] < 21
    assert at_own.centre_zyx[0] == pytest.approx(40.0, abs=0.01)  # the central vote dominates (1 vs 0.5^8)
    assert Votes.at_least(votes, None) is votes and len(votes.at_least(0.9)) == 3
    assert InferConfig().kmeans_threshold == 0.9 and InferConfig().kmeans_centre_weight == 8.0
