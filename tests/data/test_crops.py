"""Crops along the spine: targets on the blobs, borders, padding, augmentation, determinism, loader."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.synth import blob_image
from vertstudy.anatomy import NUM_CLASSES
from vertstudy.config import AugmentConfig, CropConfig
from vertstudy.data.case import Case, Landmark
from vertstudy.data.crops import (
    Augment,
    CropDataset,
    crop_targets,
    extract_crop,
    make_crop,
    make_loader,
    point_on_curve,
    rotation_matrix,
    sample_crop_origin,
    spine_curve,
    transform_points,
    validation_origins,
    warp_crop,
    warp_crop_reference,
)

# A small anisotropic, y-flipped CT: 60 x 50 x 70 voxels (x, y, z) of 1.0 x 1.25 x 2.5 mm, so the
# canonical 2 mm volume is 88 x 32 x 30 (z, y, x). Blobs of 1500 HU on soft tissue (0 HU) stand in
# for vertebrae; classes with a gap (T7 missing) to check the spine is ordered by class.
CLASSES = [16, 17, 18, 19, 20, 14, 13]  # T10 T11 T12 L1 L2 T8 T7, deliberately unsorted
SMALL = (24, 16, 16)


def _index_points() -> list[tuple[float, float, float]]:
    """Continuous (x, y, z) indices of the blobs: a gently curved column along z, caudal class last."""
    zs = {13: 61.5, 14: 53.0, 16: 44.2, 17: 35.0, 18: 26.3, 19: 17.0, 20: 8.4}
    return [(30.0 + 5 * math.sin(zs[c] / 15), 24.0 + 4 * math.cos(zs[c] / 20), zs[c]) for c in CLASSES]


@pytest.fixture(scope="module")
def entry(tmp_path_factory, cache_entry_writer):
    root = tmp_path_factory.mktemp("crops")
    ref = sitk.Image([60, 50, 70], sitk.sitkInt16)
    ref.SetSpacing((1.0, 1.25, 2.5))
    ref.SetOrigin((-30.0, 40.0, 100.0))
    ref.SetDirection((1, 0, 0, 0, -1, 0, 0, 0, 1))
    points = [ref.TransformContinuousIndexToPhysicalPoint(p) for p in _index_points()]
    image = blob_image(
        size_xyz=(60, 50, 70),
        spacing_xyz=(1.0, 1.25, 2.5),
        origin_xyz=(-30.0, 40.0, 100.0),
        direction=(1, 0, 0, 0, -1, 0, 0, 0, 1),
        points_mm=points,
        sigma_mm=3.5,
        background_hu=0.0,
        blob_hu=1500.0,
    )
    path = root / "blobs.nii.gz"
    sitk.WriteImage(image, str(path), True)
    landmarks = sorted((Landmark(c, p) for c, p in zip(CLASSES, points)), key=lambda lm: lm.index)
    case = Case("blobs", sitk.ReadImage(str(path)), landmarks, [path], "generic")
    entry = cache_entry_writer(case, root / "entry")
    assert entry.geometry.shape_zyx == (88, 32, 30)
    return entry


def _peak_near(image: np.ndarray, c: np.ndarray, radius: int = 3) -> np.ndarray:
    """(3,) voxel of the brightest value within ``radius`` voxels of point ``c`` (z, y, x)."""
    centre = np.floor(np.asarray(c) + 0.5).astype(int)
    lo = np.maximum(centre - radius, 0)
    hi = np.minimum(centre + radius + 1, image.shape)
    window = image[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
    return lo + np.array(np.unravel_index(np.argmax(window), window.shape))


def _assert_targets_on_blobs(image: np.ndarray, present: np.ndarray, coords: np.ndarray, bright: float) -> int:
    """Every present target has its blob's brightest voxel within 1 voxel; returns how many were present."""
    for n in np.flatnonzero(present):
        peak = _peak_near(image, coords[n])
        assert np.abs(peak - coords[n]).max() <= 1.0, (n, peak, coords[n])
        assert image[tuple(peak)] > bright, (n, image[tuple(peak)])
    return int(present.sum())


def _bright(entry) -> float:
    vol = np.asarray(entry.volume(), dtype=np.float32)
    return 0.5 * float(vol.max())


# -- targets and cutting ---------------------------------------------------------------------
def test_entry_centroids_are_the_blobs(entry):
    vol = np.asarray(entry.volume(), dtype=np.float32)
    for zyx in entry.zyx_vox:
        assert np.abs(_peak_near(vol, zyx) - zyx).max() <= 1.0


def test_spine_curve_is_ordered_by_class(entry):
    curve = spine_curve(entry.indices, entry.zyx_vox)
    order = np.argsort(entry.indices)
    np.testing.assert_array_equal(curve, entry.zyx_vox[order])
    assert np.all(np.diff(curve[:, 0]) < 0)  # cranial (high z) to caudal
    np.testing.assert_allclose(point_on_curve(curve, 0.0), curve[0])
    np.testing.assert_allclose(point_on_curve(curve, 1.0), curve[-1])


def test_random_crops_have_targets_on_blobs(entry):
    vol = entry.volume()
    bright = _bright(entry)
    counts = []
    for i in range(40):
        rng = np.random.default_rng([7, i])
        origin = sample_crop_origin(entry, SMALL, jitter_vox=4.0, rng=rng)
        assert origin.shape == (3,) and origin.dtype == np.int64
        image = extract_crop(vol, origin, SMALL, entry.pad_value)
        present, coords = crop_targets(entry.indices, entry.zyx_vox, origin, SMALL)
        assert image.shape == SMALL and image.dtype == np.float32
        assert present.shape == (NUM_CLASSES,) and coords.shape == (NUM_CLASSES, 3)
        assert present.dtype == np.float32 and coords.dtype == np.float32
        np.testing.assert_array_equal(coords[present == 0], 0.0)
        assert set(np.flatnonzero(present)) <= set(entry.indices.tolist())
        counts.append(_assert_targets_on_blobs(image, present, coords, bright))
    assert max(counts) >= 2  # multi-label: several vertebrae per crop


def test_present_flags_at_crop_borders():
    size = (10, 12, 14)
    origin = np.array([5, -3, 100])
    eps = 1e-6
    rel = np.array(
        [
            [0.0, 0.0, 0.0],  # first voxel centre: inside
            [-eps, 5.0, 5.0],  # just before the first centre on z: outside
            [9.0 + 0.99, 11.5, 13.99],  # inside, less than `size` on every axis
            [5.0, 12.0, 5.0],  # exactly `size` on y: outside
            [5.0, 5.0, 14.0 - eps],  # just inside on x
            [5.0, 5.0, -0.5],  # half a voxel before on x: outside
        ]
    )
    indices = np.array([0, 1, 2, 3, 4, 5])
    present, coords = crop_targets(indices, origin + rel, origin, size)
    np.testing.assert_array_equal(present[:6], [1, 0, 1, 0, 1, 0])
    np.testing.assert_array_equal(present[6:], 0)
    np.testing.assert_allclose(coords[[0, 2, 4]], rel[[0, 2, 4]], atol=1e-5)
    np.testing.assert_array_equal(coords[[1, 3, 5]], 0.0)


def test_padding_where_the_crop_leaves_the_volume(entry):
    vol = np.asarray(entry.volume(), dtype=np.float32)
    size = (104, 80, 80)  # larger than the 88 x 32 x 30 volume on every axis
    origin = np.array([-10, -25, -20])
    crop = extract_crop(entry.volume(), origin, size, entry.pad_value)
    assert crop.shape == size and crop.dtype == np.float32
    inner = tuple(slice(-o, -o + n) for o, n in zip(origin, vol.shape))
    np.testing.assert_array_equal(crop[inner], vol)
    outside = np.ones(size, bool)
    outside[inner] = False
    np.testing.assert_array_equal(crop[outside], np.float32(entry.pad_value))
    assert entry.pad_value < np.median(vol)  # air is darker than the soft tissue of this image
    # a crop entirely outside: all padding, no vertebra
    far = extract_crop(entry.volume(), (200, 0, 0), SMALL, entry.pad_value)
    np.testing.assert_array_equal(far, np.float32(entry.pad_value))
    present, _ = crop_targets(entry.indices, entry.zyx_vox, (200, 0, 0), SMALL)
    assert present.sum() == 0


def test_extract_crop_returns_a_copy():
    vol = np.zeros((10, 10, 10), np.float32)
    crop = extract_crop(vol, (2, 2, 2), (4, 4, 4), -1.0)
    crop += 5
    assert vol.max() == 0


@settings(max_examples=25, deadline=None)
@given(
    origin=st.tuples(*[st.integers(-25, 30)] * 3),
    size=st.tuples(*[st.integers(8, 20)] * 3),
    seed=st.integers(0, 2**31),
)
def test_targets_and_extraction_agree(origin, size, seed):
    rng = np.random.default_rng(seed)
    shape = (21, 17, 23)
    vol = rng.permutation(np.prod(shape)).reshape(shape).astype(np.float32)  # every voxel distinct
    pad = -7.0
    n = 12
    indices = rng.choice(NUM_CLASSES, size=n, replace=False)
    zyx = rng.uniform(-30, 50, size=(n, 3))
    zyx[:4] = np.asarray(origin) + rng.uniform(0, 1, (4, 3)) * np.asarray(size)  # some surely inside
    crop = extract_crop(vol, origin, size, pad)
    padded = np.pad(vol, 80, constant_values=pad)
    o = np.asarray(origin) + 80
    np.testing.assert_array_equal(crop, padded[o[0] : o[0] + size[0], o[1] : o[1] + size[1], o[2] : o[2] + size[2]])
    present, coords = crop_targets(indices, zyx, origin, size)
    rel = zyx - np.asarray(origin)
    inside = ((rel >= 0) & (rel < np.asarray(size))).all(axis=1)
    np.testing.assert_array_equal(present[indices], inside.astype(np.float32))
    assert present.sum() == inside.sum() and inside[:4].all()
    for n_, p in zip(indices[inside], zyx[inside]):
        q = np.floor(coords[n_]).astype(int)
        v = np.floor(p).astype(int)
        expected = vol[tuple(v)] if ((v >= 0) & (v < shape)).all() else pad
        assert crop[tuple(q)] == expected


# -- augmentation ----------------------------------------------------------------------------
def _blob_volume(shape, centre, sigma=1.2, pad=0.0) -> np.ndarray:
    grids = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    r2 = sum((g - c) ** 2 for g, c in zip(grids, centre))
    return (10.0 * np.exp(-r2 / (2 * sigma**2)) + pad).astype(np.float32)


def test_rotation_by_90_degrees_moves_x_to_y():
    # Output offset q - h samples the source at R (q - h); a blob 6 voxels along +x of the crop
    # centre appears 6 voxels along +y after a +90 degree turn about z.
    size = (17, 17, 17)
    matrix = rotation_matrix([math.pi / 2, 0, 0])
    np.testing.assert_allclose(matrix, [[1, 0, 0], [0, 0, -1], [0, 1, 0]], atol=1e-12)
    vol = _blob_volume((30, 30, 30), (12, 12, 18))
    origin = np.array([4, 4, 4])  # crop centre h = 8 -> volume (12, 12, 12)
    q = transform_points(np.array([[12.0, 12.0, 18.0]]), origin, size, matrix)[0]
    np.testing.assert_allclose(q, [8, 14, 8], atol=1e-9)
    crop = warp_crop(vol, origin, size, 0.0, matrix)
    np.testing.assert_array_equal(np.unravel_index(np.argmax(crop), size), [8, 14, 8])
    # about x the (z, y) plane turns: the blob on the x axis stays where it is
    crop_x = warp_crop(vol, origin, size, 0.0, rotation_matrix([0, 0, math.pi / 2]))
    np.testing.assert_array_equal(np.unravel_index(np.argmax(crop_x), size), [8, 8, 14])
    # about y the (z, x) plane turns: +x -> +z
    q_y = transform_points(np.array([[12.0, 12.0, 18.0]]), origin, size, rotation_matrix([0, math.pi / 2, 0]))[0]
    np.testing.assert_allclose(q_y, [14, 8, 8], atol=1e-9)
    crop_y = warp_crop(vol, origin, size, 0.0, rotation_matrix([0, math.pi / 2, 0]))
    np.testing.assert_array_equal(np.unravel_index(np.argmax(crop_y), size), [14, 8, 8])


def test_zoom_doubles_offsets_from_the_centre():
    size = (21, 21, 21)  # h = 10
    vol = _blob_volume((40, 40, 40), (17, 22, 21), sigma=1.0)
    origin = np.array([10, 10, 10])  # centre (20, 20, 20); blob offset (-3, 2, 1)
    matrix = np.eye(3) / 2.0  # zoom 2
    q = transform_points(np.array([[17.0, 22.0, 21.0]]), origin, size, matrix)[0]
    np.testing.assert_allclose(q, [4, 14, 12], atol=1e-9)
    crop = warp_crop(vol, origin, size, 0.0, matrix)
    np.testing.assert_array_equal(np.unravel_index(np.argmax(crop), size), [4, 14, 12])
    # zoom 1/2: the offset halves, (-1.5, 1, 0.5) -> between voxels, the peak within half a voxel
    crop = warp_crop(vol, origin, size, 0.0, np.eye(3) * 2.0)
    peak = np.array(np.unravel_index(np.argmax(crop), size))
    q = transform_points(np.array([[17.0, 22.0, 21.0]]), origin, size, np.eye(3) * 2.0)[0]
    np.testing.assert_allclose(q, [8.5, 11, 10.5])
    assert np.abs(peak - q).max() <= 0.5


def test_fast_warp_matches_the_affine_grid_reference():
    rng = np.random.default_rng(3)
    vol = rng.standard_normal((50, 44, 46)).astype(np.float16)  # rough as noise: the hardest case
    for _ in range(4):
        matrix = rotation_matrix(np.deg2rad(rng.uniform(-30, 30, 3))) / rng.uniform(0.7, 1.3)
        origin = rng.integers(-20, 30, 3)  # some crops leave the volume
        size = (24, 20, 18)
        fast = warp_crop(vol, origin, size, -3.0, matrix)
        ref = warp_crop_reference(vol, origin, size, -3.0, matrix)
        assert fast.shape == ref.shape == size and fast.dtype == np.float32
        np.testing.assert_allclose(fast, ref, atol=2e-2, rtol=0)
        assert np.abs(fast - ref).mean() < 1e-3
    # the identity warp is the plain crop
    np.testing.assert_allclose(
        warp_crop(vol, (3, -4, 5), (24, 20, 18), -3.0, np.eye(3)),
        extract_crop(vol, (3, -4, 5), (24, 20, 18), -3.0),
        atol=1e-3,
    )


def test_augmented_crops_keep_targets_on_blobs(entry):
    crop = CropConfig(crop_size=(32, 24, 24), jitter_mm=8.0, crops_per_case=24)
    aug = AugmentConfig(rotate_deg=25.0, scale=0.2, intensity_scale=0.1, intensity_shift=0.1)
    ds = CropDataset([entry], crop, aug, seed=11)
    bright = 0.5 * _bright(entry)
    moved = 0
    for i in range(len(ds)):
        item = ds[i]
        image, present, coords = item["image"][0].numpy(), item["present"].numpy(), item["coords"].numpy()
        _assert_targets_on_blobs(image, present, coords, bright)
        plain_present, plain_coords = crop_targets(entry.indices, entry.zyx_vox, item["origin"].numpy(), crop.crop_size)
        both = (present > 0) & (plain_present > 0)
        moved += int((np.abs(coords[both] - plain_coords[both]) > 0.5).any())
    assert moved > len(ds) // 2  # the targets really moved with the image


def test_intensity_augmentation_scales_and_shifts(entry):
    origin = np.array([30, 7, 7])
    plain, p0, c0 = make_crop(entry.volume(), entry.indices, entry.zyx_vox, origin, SMALL, entry.pad_value)
    aug = Augment(matrix=np.eye(3), gain=1.1, shift=-0.05)
    image, p1, c1 = make_crop(entry.volume(), entry.indices, entry.zyx_vox, origin, SMALL, entry.pad_value, aug)
    np.testing.assert_allclose(image, plain * 1.1 - 0.05, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(p0, p1)
    np.testing.assert_array_equal(c0, c1)


# -- dataset and loader ----------------------------------------------------------------------
def _dataset(entry, seed=5, train=True, **crop):
    cfg = CropConfig(**{"crop_size": SMALL, "jitter_mm": 10.0, "crops_per_case": 4, **crop})
    return CropDataset([entry, entry], cfg, AugmentConfig(), seed=seed, train=train)


def _same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in ("image", "present", "coords", "origin")) and a["case"] == b["case"]


def test_dataset_items(entry):
    ds = _dataset(entry)
    assert len(ds) == 8
    item = ds[5]
    assert item["image"].shape == (1, *SMALL) and item["image"].dtype == torch.float32
    assert item["present"].shape == (26,) and item["present"].dtype == torch.float32
    assert item["coords"].shape == (26, 3) and item["coords"].dtype == torch.float32
    assert item["origin"].shape == (3,) and item["origin"].dtype == torch.int64
    assert item["case"] == "blobs"
    with pytest.raises(IndexError):
        ds[8]


def test_dataset_is_deterministic(entry):
    a, b = _dataset(entry), _dataset(entry)
    for i in range(len(a)):
        assert _same(a[i], b[i])
    assert _same(a[3], a[(0, 3)])  # a plain index draws the current epoch
    assert not _same(a[3], a[2])
    a.set_epoch(1)
    assert not _same(a[3], b[3])  # a new epoch, new crops
    assert _same(a[3], b[(1, 3)])
    assert not _same(_dataset(entry, seed=6)[3], b[3])


def test_validation_crops_are_fixed_and_on_the_spine(entry):
    ds = _dataset(entry, train=False)
    first = [ds[i] for i in range(len(ds))]
    ds.set_epoch(3)
    assert all(_same(x, ds[i]) for i, x in enumerate(first))
    origins = validation_origins(entry, SMALL, 4)
    curve = spine_curve(entry.indices, entry.zyx_vox)
    h = (np.asarray(SMALL) - 1) / 2
    for k in range(4):
        np.testing.assert_array_equal(first[k]["origin"].numpy(), origins[k])
        assert np.abs(origins[k] + h - point_on_curve(curve, (k + 0.5) / 4)).max() <= 0.5
        assert first[k]["present"].sum() >= 1


def test_dataset_pickles_without_volumes(entry):
    ds = _dataset(entry)
    ds[0]
    assert ds._volumes  # the memory map is open here ...
    blob = pickle.dumps(ds)
    assert len(blob) < 20_000  # ... but not pickled
    copy = pickle.loads(blob)
    assert not copy._volumes
    assert _same(copy[0], ds[0])


def test_case_without_centroids_gives_empty_crops(entry):
    import dataclasses

    empty = dataclasses.replace(entry, indices=entry.indices[:0], zyx_vox=entry.zyx_vox[:0])
    ds = CropDataset([empty], CropConfig(crop_size=SMALL, crops_per_case=2), AugmentConfig(), seed=0)
    for i in range(2):
        assert ds[i]["present"].sum() == 0
        assert torch.isfinite(ds[i]["image"]).all()


def _epochs(loader, ds, epochs=(0, 1)):
    out = []
    for e in epochs:
        ds.set_epoch(e)
        out.append(list(loader))
    return out


def test_loader_batches_and_worker_independence(entry):
    ds0 = _dataset(entry)
    ds2 = _dataset(entry)
    batches0 = _epochs(make_loader(ds0, batch_size=3, workers=0), ds0)
    batches2 = _epochs(make_loader(ds2, batch_size=3, workers=2), ds2)
    b = batches0[0][0]
    assert b["image"].shape == (3, 1, *SMALL) and b["image"].dtype == torch.float32
    assert b["present"].shape == (3, 26) and b["present"].dtype == torch.float32
    assert b["coords"].shape == (3, 26, 3) and b["coords"].dtype == torch.float32
    assert b["origin"].shape == (3, 3) and b["origin"].dtype == torch.int64
    assert b["case"] == ["blobs"] * 3
    assert [len(e) for e in batches0] == [3, 3]  # 8 crops in batches of 3
    for e0, e2 in zip(batches0, batches2):
        for x, y in zip(e0, e2):
            assert _same(x, y)  # same crops, same order, whatever the worker count
    # set_epoch reaches the persistent workers: epoch 1 is not epoch 0
    assert not torch.equal(batches2[0][0]["origin"], batches2[1][0]["origin"])
    # and the shuffled order is a permutation of the epoch's items
    order = torch.cat([x["origin"] for x in batches0[1]])
    plain = torch.stack([ds0[(1, i)]["origin"] for i in range(len(ds0))])
    assert sorted(map(tuple, order.tolist())) == sorted(map(tuple, plain.tolist()))


def test_validation_loader_keeps_order(entry):
    ds = _dataset(entry, train=False)
    batches = list(make_loader(ds, batch_size=4, workers=0))
    np.testing.assert_array_equal(
        torch.cat([b["origin"] for b in batches]).numpy(), np.stack([ds[i]["origin"].numpy() for i in range(8)])
    )


def test_crops_placed_anywhere_keep_the_spine_crops_of_the_paper_setting(entry):
    """``anywhere_fraction`` draws from a stream of its own: at 0 every crop is the paper's
    spine crop (the same as before the option existed), at 0.5 about half move, and the
    others stay exactly where the paper setting puts them."""
    paper, half, every = _dataset(entry, anywhere_fraction=0.0), _dataset(entry, anywhere_fraction=0.5), \
        _dataset(entry, anywhere_fraction=1.0)
    jitter_vox = 10.0 / entry.geometry.spacing_mm
    moved = 0
    for epoch in range(6):
        for i in range(len(paper)):
            origin, _ = paper.origin_and_augment(epoch, i)
            expected = sample_crop_origin(entry, SMALL, jitter_vox, np.random.default_rng([5, epoch, i]))
            assert (origin == expected).all()
            other, _ = half.origin_and_augment(epoch, i)
            moved += int(not (other == origin).all())
            anywhere, _ = every.origin_and_augment(epoch, i)
            centre = anywhere + (np.asarray(SMALL) - 1) / 2
            assert ((centre >= -1) & (centre <= np.asarray(entry.geometry.shape_zyx))).all()
    assert 0.3 * 48 < moved < 0.7 * 48


def test_crops_anywhere_cover_the_volume_and_often_hold_no_vertebra(entry):
    ds = _dataset(entry, anywhere_fraction=1.0)
    centres, empty = [], 0
    for epoch in range(10):
        for i in range(len(ds)):
            origin, _ = ds.origin_and_augment(epoch, i)
            centres.append(origin + (np.asarray(SMALL) - 1) / 2)
            empty += int(ds[(epoch, i)]["present"].sum() == 0)
    centres = np.array(centres)
    shape = np.asarray(entry.geometry.shape_zyx)
    assert (centres.min(axis=0) < 0.2 * shape).all() and (centres.max(axis=0) > 0.8 * shape).all()
    assert empty > 0
