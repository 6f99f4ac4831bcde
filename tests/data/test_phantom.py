"""The spine phantom generator: determinism, anatomy in the voxels, conditions, tags, writing."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from pydantic import ValidationError

from vertstudy.anatomy import INDEX, NAMES
from vertstudy.data.io import check_points_inside
from vertstudy.data.phantom import PhantomConfig, generate_case, write_phantoms
from vertstudy.data.shapes import load_shapes
from vertstudy.errors import ConfigError

FINE = {"shape_zyx": (200, 150, 150), "spacing_xyz_mm": (1.0, 1.0, 1.0)}  # 1 mm, small: fast
QUIET = {"p_noise_high": 0.0, "p_metal": 0.0}


@pytest.fixture(scope="module")
def shapes():
    return load_shapes()


def _array(case) -> np.ndarray:
    return sitk.GetArrayFromImage(case.image)


def _ball(case, arr: np.ndarray, xyz, radius_mm: float) -> np.ndarray:
    """HU of the voxels within ``radius_mm`` of the LPS point ``xyz``."""
    idx = np.array(case.image.TransformPhysicalPointToContinuousIndex(tuple(float(v) for v in xyz)))[::-1]
    sp = np.array(case.image.GetSpacing())[::-1]
    lo = np.maximum(np.floor(idx - radius_mm / sp).astype(int), 0)
    hi = np.minimum(np.ceil(idx + radius_mm / sp).astype(int) + 1, arr.shape)
    grids = np.meshgrid(*[np.arange(a, b) for a, b in zip(lo, hi)], indexing="ij")
    dist = np.sqrt(sum(((g - i) * s) ** 2 for g, i, s in zip(grids, idx, sp)))
    return arr[tuple(grids)][dist <= radius_mm]


def _lateral_residual(points: np.ndarray) -> float:
    """Range (mm) of the centroids' x about a straight line x(z)."""
    design = np.c_[points[:, 2], np.ones(len(points))]
    coef, *_ = np.linalg.lstsq(design, points[:, 0], rcond=None)
    r = points[:, 0] - design @ coef
    return float(r.max() - r.min())


# --- determinism ---------------------------------------------------------------------------------


def test_same_index_seed_config_gives_identical_case(shapes):
    cfg = PhantomConfig(p_metal=1.0)
    a = generate_case(3, 11, cfg, shapes)
    generate_case(4, 11, cfg, shapes)  # another case in between changes nothing
    b = generate_case(3, 11, cfg, shapes)
    np.testing.assert_array_equal(_array(a), _array(b))
    np.testing.assert_array_equal(a.points_mm(), b.points_mm())
    assert a.tags == b.tags and a.case_id == b.case_id == "phantom-0011-00003"
    assert a.image.GetOrigin() == b.image.GetOrigin() and a.image.GetDirection() == b.image.GetDirection()


def test_different_seeds_and_indices_differ(shapes):
    cases = [generate_case(i, s, PhantomConfig(), shapes) for s, i in ((0, 0), (1, 0), (0, 1))]
    for a, b in ((cases[0], cases[1]), (cases[0], cases[2])):
        assert a.image.GetSize() != b.image.GetSize() or not np.array_equal(_array(a), _array(b))
        assert a.points_mm().shape != b.points_mm().shape or not np.allclose(a.points_mm(), b.points_mm())


# --- the case and its tags -----------------------------------------------------------------------


def test_case_contract_and_tags(shapes):
    for i in range(6):
        case = generate_case(i, 2, PhantomConfig(p_flipped=0.5), shapes)
        assert case.fmt == "phantom" and case.sources == [] and case.image.GetPixelID() == sitk.sitkInt16
        assert case.landmarks, "every case has labels"
        idx = [lm.index for lm in case.landmarks]
        assert idx == sorted(idx) and idx == list(range(idx[0], idx[-1] + 1))  # a run of levels
        check_points_inside(case.image, case.points_mm(), case.labels(), case.case_id)
        t = case.tags
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in t.items())
        assert t["fov"] in {"full", "long", "short"} and t["metal"] in {"yes", "no"}
        assert t["curvature"] in {"normal", "scoliosis", "kyphosis"} and t["noise"] in {"low", "high"}
        assert t["first_level"] == case.labels()[0] and t["last_level"] == case.labels()[-1]
        n = len(case.landmarks)
        assert t["fov"] == ("full" if n == 26 else "short" if n <= 4 else "long")
        spacing = case.image.GetSpacing()
        assert t["spacing"] == "x".join(f"{s:.2f}" for s in spacing)
        direction = np.array(case.image.GetDirection()).reshape(3, 3)
        expected = np.diag([-1, -1, 1]) if t["direction"] == "flipped" else np.eye(3)
        np.testing.assert_array_equal(direction, expected)
        assert any(abs(o) > 50 for o in case.image.GetOrigin())  # scanner-like origin


def test_position_in_volume_is_not_fixed(shapes):
    firsts, l1_index = set(), []
    for i in range(10):
        case = generate_case(i, 4, PhantomConfig(p_flipped=0.0), shapes)
        firsts.add(case.tags["first_level"])
        for lm in case.landmarks:
            if lm.index == INDEX["T12"] or lm.index == INDEX["L1"]:
                size = np.array(case.image.GetSize(), dtype=float)
                l1_index.append(np.array(case.image.TransformPhysicalPointToContinuousIndex(lm.xyz_mm)) / size)
                break
    assert len(firsts) >= 4
    rel = np.array(l1_index)
    assert rel[:, 0].std() > 0.02 and rel[:, 2].std() > 0.04  # in-plane and along z


# --- anatomy in the voxels -----------------------------------------------------------------------


def test_centroids_lie_on_cancellous_bone_brighter_than_discs(shapes):
    cfg = PhantomConfig(**FINE, **QUIET)
    checked = 0
    for i in range(6):
        case = generate_case(i, 1, cfg, shapes)
        arr = _array(case)
        pts, names = case.points_mm(), case.labels()
        bone = [float(_ball(case, arr, p, 1.5).mean()) for p in pts]
        assert all(100 < b < 600 for b in bone), dict(zip(names, np.round(bone)))
        for k in range(len(pts) - 1):
            if (names[k], names[k + 1]) in (("C1", "C2"), ("S1", "S2")):
                continue  # no disc: atlanto-axial joint, fused sacrum
            disc = float(_ball(case, arr, (pts[k] + pts[k + 1]) / 2, 1.5).mean())
            assert disc < min(bone[k], bone[k + 1]), (names[k], disc, bone[k], bone[k + 1])
            checked += 1
    assert checked >= 20


def test_vertebral_bodies_grow_from_cervical_to_lumbar(shapes):
    case = generate_case(0, 3, PhantomConfig(p_fov_full=1.0, p_scoliosis=0.0, p_flipped=0.0, **QUIET), shapes)
    arr = _array(case).astype(np.float32)
    width = {}
    for lm in case.landmarks:
        k, j, x = np.round(case.image.TransformPhysicalPointToContinuousIndex(lm.xyz_mm)[::-1]).astype(int)
        row = np.median(arr[k, j - 1:j + 2, :], axis=0)
        lo = hi = x
        while lo > 0 and row[lo - 1] > 100:
            lo -= 1
        while hi < len(row) - 1 and row[hi + 1] > 100:
            hi += 1
        width[lm.name] = (hi - lo + 1) * case.image.GetSpacing()[0]
    cervical = np.mean([width[n] for n in ("C3", "C4", "C5", "C6")])
    thoracic = np.mean([width[n] for n in ("T4", "T5", "T6", "T7")])
    lumbar = np.mean([width[n] for n in ("L1", "L2", "L3", "L4")])
    assert cervical < thoracic < lumbar and lumbar > 1.7 * cervical, width


# --- conditions ----------------------------------------------------------------------------------


def test_metal_forced_on_and_off(shapes):
    on = generate_case(5, 6, PhantomConfig(p_metal=1.0), shapes)
    off = generate_case(5, 6, PhantomConfig(p_metal=0.0), shapes)
    assert on.tags["metal"] == "yes" and on.tags["metal_levels"]
    assert off.tags["metal"] == "no" and off.tags["metal_levels"] == ""
    a_on, a_off = _array(on), _array(off)
    assert (a_on >= 2500).sum() > 50 and a_off.max() < 2000
    assert set(on.tags["metal_levels"].split(",")) <= set(on.labels())
    # Streaks: metal changes many voxels of the slices it is in, far from the screws too.
    changed = np.abs(a_on.astype(np.int32) - a_off) > 100
    assert changed.sum() > 20 * (a_on >= 2500).sum()
    np.testing.assert_array_equal(on.points_mm(), off.points_mm())  # same case otherwise


def test_field_of_view_forced(shapes):
    for i in range(4):
        short = generate_case(i, 7, PhantomConfig(p_fov_full=0.0, p_fov_short=1.0), shapes)
        assert short.tags["fov"] == "short" and 2 <= len(short.landmarks) <= 4
        longv = generate_case(i, 7, PhantomConfig(p_fov_full=0.0, p_fov_short=0.0), shapes)
        assert longv.tags["fov"] == "long" and 5 <= len(longv.landmarks) <= 25
    full = generate_case(0, 7, PhantomConfig(p_fov_full=1.0), shapes)
    assert full.tags["fov"] == "full" and full.labels() == list(NAMES)
    assert full.tags["first_level"] == "C1" and full.tags["last_level"] == "S2"


def test_curvature_forced(shapes):
    base = {"p_fov_full": 1.0}
    for i in range(3):
        normal = generate_case(i, 8, PhantomConfig(p_scoliosis=0.0, p_kyphosis=0.0, **base), shapes)
        scol = generate_case(i, 8, PhantomConfig(p_scoliosis=1.0, **base), shapes)
        kyph = generate_case(i, 8, PhantomConfig(p_scoliosis=0.0, p_kyphosis=1.0, **base), shapes)
        assert (normal.tags["curvature"], scol.tags["curvature"], kyph.tags["curvature"]) == (
            "normal", "scoliosis", "kyphosis")
        amp = float(scol.tags["curve_mm"])
        assert 10 <= amp <= 50
        # The same spine (placed elsewhere in the volume), bent sideways by about the amplitude.
        lateral = scol.points_mm()[:, 0] - normal.points_mm()[:, 0]
        assert np.ptp(lateral) > 0.6 * amp
        assert _lateral_residual(scol.points_mm()) > _lateral_residual(normal.points_mm()) - 1.0
        # Kyphosis pushes the thoracic centroids back (+y) relative to the same spine.
        back = kyph.points_mm()[:, 1] - normal.points_mm()[:, 1]
        back -= back[INDEX["C1"]]
        assert INDEX["T3"] <= int(np.argmax(back)) <= INDEX["L1"]
        assert back.max() > 10 and back.max() - back[INDEX["S2"]] > 10


def test_noise_forced(shapes):
    def air_noise(case):
        """Std (HU) of neighbour differences in unclipped air (-1023..-900 HU)."""
        arr = _array(case).astype(np.float32)
        air = (arr > -1024) & (arr < -900)
        both = air[:, :, 1:] & air[:, :, :-1]
        return float(np.diff(arr, axis=2)[both].std())

    low = generate_case(2, 9, PhantomConfig(p_noise_high=0.0, p_metal=0.0), shapes)
    high = generate_case(2, 9, PhantomConfig(p_noise_high=1.0, p_metal=0.0), shapes)
    assert low.tags["noise"] == "low" and high.tags["noise"] == "high"
    assert air_noise(high) > 2.0 * air_noise(low)


def test_resolution_presets_and_size_override(shapes):
    coarse = generate_case(1, 10, PhantomConfig(resolution="coarse", p_fov_full=0.0), shapes)
    sx, sy, sz = coarse.image.GetSpacing()
    assert 1.5 <= sx == sy <= 2.5 and 2.0 <= sz <= 4.0 and coarse.tags["resolution"] == "coarse"
    clinical = generate_case(1, 10, PhantomConfig(resolution="clinical", p_fov_full=0.0, p_fov_short=1.0), shapes)
    sx, sy, sz = clinical.image.GetSpacing()
    assert 0.6 <= sx == sy <= 1.0 and 1.0 <= sz <= 3.0 and clinical.image.GetSize()[:2] == (512, 512)
    forced = generate_case(0, 10, PhantomConfig(shape_zyx=(40, 64, 48), spacing_xyz_mm=(2.0, 2.5, 3.0)), shapes)
    assert forced.image.GetSize() == (48, 64, 40) and forced.image.GetSpacing() == (2.0, 2.5, 3.0)
    assert forced.tags["spacing"] == "2.00x2.50x3.00" and forced.tags["resolution"] == "custom"


def test_config_is_validated():
    with pytest.raises(ConfigError, match="shape_zyx"):
        PhantomConfig(shape_zyx=(10, 10, 10))
    with pytest.raises(ValidationError):
        PhantomConfig(p_metal=1.5)
    with pytest.raises(ValidationError):
        PhantomConfig(p_mteal=0.5)
    with pytest.raises(ConfigError, match="index"):
        generate_case(-1, 0)


# --- writing -------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["csi2014", "verse"])
def test_write_then_read_back(tmp_path, fmt, shapes):
    formats = pytest.importorskip("vertstudy.data.formats")
    pytest.importorskip(f"vertstudy.data.formats.{fmt}")
    cfg = PhantomConfig(p_flipped=0.5)
    paths = write_phantoms(tmp_path, 3, 12, fmt=fmt, config=cfg, workers=2 if fmt == "verse" else 1, progress=False)
    assert paths and all(p.exists() for p in paths)
    assert not [p for p in tmp_path.rglob(".*")]  # no temporary files left
    refs = formats.discover(tmp_path, fmt)
    assert len(refs) == 3
    for ref in refs:
        case = formats.read_case(ref)
        index = int(case.case_id.split("-")[-1])
        truth = generate_case(index, 12, cfg, shapes)
        assert case.case_id == truth.case_id
        # VerSe has no S2 label: its writer leaves S2 out.
        keep = [k for k, lm in enumerate(truth.landmarks) if fmt != "verse" or lm.name != "S2"]
        assert case.labels() == [truth.labels()[k] for k in keep]
        np.testing.assert_allclose(case.points_mm(), truth.points_mm()[keep], atol=0.01)
        np.testing.assert_array_equal(_array(case), _array(truth))
        for key in ("fov", "metal", "curvature", "noise", "spacing", "first_level", "last_level"):
            assert case.tags[key] == truth.tags[key]


def test_write_rejects_unknown_format(tmp_path):
    with pytest.raises(ConfigError, match="csi2014"):
        write_phantoms(tmp_path, 1, 0, fmt="dicom", progress=False)
