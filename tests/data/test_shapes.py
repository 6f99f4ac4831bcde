"""The shipped spine-shape table and centreline sampling."""

from __future__ import annotations

import gzip
from importlib import resources

import numpy as np
import pytest

from tests.paths import SHARED_DATA
from vertstudy.anatomy import INDEX, NUM_CLASSES
from vertstudy.data.shapes import SHAPES_RESOURCE, build_shape_table, load_shapes, sample_centreline

SOURCE_CSV = SHARED_DATA / "spine-keypoints" / "bodies.csv"


@pytest.fixture(scope="module")
def shapes():
    return load_shapes()


def test_table_is_shipped_in_the_package_with_its_license():
    res = resources.files("vertstudy.data").joinpath("resources")
    assert res.joinpath(SHAPES_RESOURCE).is_file()
    assert "ShareAlike 4.0" in res.joinpath("LICENSE-spine-shapes.txt").read_text(encoding="utf-8")
    readme = res.joinpath("README.md").read_text(encoding="utf-8")
    assert "CC BY-SA 4.0" in readme and "ImFusionGmbH/VID-vertebra-identification-dataset" in readme
    assert len(res.joinpath(SHAPES_RESOURCE).read_bytes()) < 300_000  # compact


def test_table_counts(shapes):
    assert shapes.n_spines == 1884
    assert int(shapes.present().sum()) == 16692
    counts = shapes.level_counts()
    assert counts["C1"] == 55 and counts["L1"] == 1828 and counts["L5"] == 1674
    assert max(counts, key=counts.get) == "L1"  # mostly T10-L5
    assert set(shapes.sources) == {"verse19", "verse20", "COLONOG", "Pancreas-CT"}


def test_table_rows_are_relative_contiguous_and_rounded(shapes):
    present = shapes.present()
    for s in range(0, shapes.n_spines, 97):
        idx = np.flatnonzero(present[s])
        assert len(idx) >= 2 and idx[-1] - idx[0] + 1 == len(idx)  # no gaps
        pts = shapes.points[s, idx]
        np.testing.assert_allclose(pts.mean(axis=0), 0.0, atol=0.1)  # relative to the spine's mean
        np.testing.assert_allclose(pts * 10, np.round(pts * 10), atol=1e-6)  # 0.1 mm


def test_population_steps_are_plausible(shapes):
    lengths = shapes.mean_step_lengths()
    assert 14 < lengths[INDEX["C4"]] < 20  # cervical ~15-18 mm
    assert 19 < lengths[INDEX["T2"]] < 24
    assert 32 < lengths[INDEX["L3"]] < 40  # lumbar ~35 mm
    steps = shapes.mean_steps()
    assert (steps[:, 2] < 0).all()  # each next level lies below (LPS +z superior)
    # Sagittal curves: thoracic kyphosis turns the steps from posterior (+y) to anterior (-y).
    assert steps[INDEX["T2"], 1] > 0 and steps[INDEX["T11"], 1] < 0 and steps[INDEX["L4"], 1] > 0


def test_sample_centreline_is_full_real_and_deterministic(shapes):
    a, spine, scale = sample_centreline(np.random.default_rng(5), shapes)
    b, *_ = sample_centreline(np.random.default_rng(5), shapes)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (NUM_CLASSES, 3) and np.isfinite(a).all()
    assert 0.8 <= scale <= 1.25
    assert (np.diff(a[:, 2]) < 0).all()
    steps = np.linalg.norm(np.diff(a, axis=0), axis=1)
    assert (steps > 10).all() and (steps < 50).all()
    # The real spine's own levels keep their real relative positions.
    real = shapes.points[spine]
    have = np.flatnonzero(~np.isnan(real[:, 0]))
    np.testing.assert_allclose(np.diff(a[have], axis=0), np.diff(real[have], axis=0), atol=1e-9)
    # The sacrum: S1 below and behind L5 (~35-40 mm), S2 below and behind S1 (~25 mm).
    l5s1 = a[INDEX["S1"]] - a[INDEX["L5"]]
    s1s2 = a[INDEX["S2"]] - a[INDEX["S1"]]
    assert l5s1[1] > 0 and l5s1[2] < 0 and 28 < np.linalg.norm(l5s1) * (1 / scale) < 42
    assert s1s2[1] > 0 and s1s2[2] < 0 and 20 < np.linalg.norm(s1s2) * (1 / scale) < 30


def test_cervical_extrapolation_has_literature_spacing(shapes):
    lumbar_only = int(np.flatnonzero(shapes.present()[:, INDEX["L1"]] & ~shapes.present()[:, INDEX["T6"]])[0])
    pts, _, scale = sample_centreline(np.random.default_rng(1), shapes, spine=lumbar_only)
    cervical = np.linalg.norm(np.diff(pts[INDEX["C3"]:INDEX["C7"] + 1], axis=0), axis=1) / scale
    assert (cervical > 12).all() and (cervical < 22).all()


@pytest.mark.skipif(not SOURCE_CSV.exists(), reason="source bodies.csv not available")
def test_table_is_rebuilt_byte_for_byte(tmp_path):
    counts = build_shape_table(SOURCE_CSV, tmp_path / "t.csv.gz")
    assert counts == {"spines_in": 1947, "spines_kept": 1884, "rows": 16692}
    shipped = resources.files("vertstudy.data").joinpath("resources", SHAPES_RESOURCE).read_bytes()
    assert gzip.decompress((tmp_path / "t.csv.gz").read_bytes()) == gzip.decompress(shipped)
    assert (tmp_path / "t.csv.gz").read_bytes() == shipped
