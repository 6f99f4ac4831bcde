"""Contract suite: one synthetic case written in every format; every reader returns the same case.

Also the real data: the TotalSegmentator CT with its centroids (generic reader), the VerSe
verse004 mask with its ctd file, and the CSI 2014 ``.lml`` coordinate conventions.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from tests.paths import SHARED_DATA
from vertstudy.anatomy import INDEX
from vertstudy.data.case import Case, Landmark
from vertstudy.data.formats import CaseRef, csi2014, discover, generic, read_any, read_case, verse
from vertstudy.errors import InputError

DATA = SHARED_DATA

# --- the synthetic case --------------------------------------------------------------------------

SIZE = (40, 48, 56)
SPACING = (0.8, 1.2, 2.0)
ORIGIN = (12.5, -30.25, 80.0)
# Voxel x -> anterior, voxel y -> right, voxel z -> inferior (codes "ARI"); a proper rotation
# (det +1) so a DICOM series (slice normal = row x column) reads back with the same voxel order.
DIRECTION = (0.0, -1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, -1.0)
# Class landmarks and extras at continuous voxel indices (x, y, z), spread along the long axis.
CLASS_INDEX = {
    "T12": (20.3, 24.6, 6.2),
    "L1": (21.1, 23.9, 13.7),
    "L2": (22.4, 22.5, 20.1),
    "L3": (23.0, 21.2, 26.9),
    "L4": (22.2, 20.8, 33.4),
    "L5": (20.9, 21.5, 40.0),
    "S1": (18.7, 22.9, 46.5),
}
EXTRA_INDEX = {"T13": (19.5, 25.0, 2.1), "L6": (17.9, 24.1, 51.8)}


def make_image() -> sitk.Image:
    """int16 HU image, -1000 background with +1000 cubes (3 voxels) at the class landmarks."""
    arr = np.full(SIZE[::-1], -1000, dtype=np.int16)  # (z, y, x)
    for i, (x, y, z) in enumerate(CLASS_INDEX.values()):
        zi, yi, xi = round(z), round(y), round(x)
        arr[zi - 1 : zi + 2, yi - 1 : yi + 2, xi - 1 : xi + 2] = 1000 + 10 * i
    image = sitk.GetImageFromArray(arr)
    image.SetSpacing(SPACING)
    image.SetOrigin(ORIGIN)
    image.SetDirection(DIRECTION)
    return image


def lps(image: sitk.Image, index) -> tuple[float, float, float]:
    return tuple(image.TransformContinuousIndexToPhysicalPoint(tuple(float(v) for v in index)))


def make_case() -> Case:
    image = make_image()
    landmarks = sorted(
        (Landmark(INDEX[name], lps(image, idx)) for name, idx in CLASS_INDEX.items()), key=lambda lm: lm.index
    )
    return Case("synth01", image, landmarks, sources=[], fmt="test", tags={"fov": "lumbar", "noise": "low"})


def extra_points(image: sitk.Image) -> dict[str, tuple[float, float, float]]:
    return {name: lps(image, idx) for name, idx in EXTRA_INDEX.items()}


def all_points(case: Case) -> list[tuple[str, tuple[float, float, float]]]:
    return [(lm.name, lm.xyz_mm) for lm in case.landmarks] + list(extra_points(case.image).items())


# --- writers of every format (extras appended by hand: Case keeps only their counts) -------------


def write_csi(case: Case, out: Path) -> Path:
    paths = csi2014.write_case(case, out)
    lml = paths[1]
    with lml.open("a") as f:
        for name, (x, y, z) in extra_points(case.image).items():
            f.write(f"0\t{name}\t{x:.6f}\t{y:.6f}\t{z:.6f}\n")
    return paths[0]


def write_verse(case: Case, out: Path) -> Path:
    paths = verse.write_case(case, out)
    ctd = json.loads(paths[1].read_text(encoding="utf-8"))
    for name, p in extra_points(case.image).items():
        x, y, z = case.image.TransformPhysicalPointToContinuousIndex(p)
        ctd.append({"label": verse.NAME_TO_VERSE[name], "X": x, "Y": y, "Z": z})
    paths[1].write_text(json.dumps(ctd))
    return paths[0]


def write_json_list(points, path: Path) -> None:
    path.write_text(json.dumps([{"label": n, "x": p[0], "y": p[1], "z": p[2]} for n, p in points]))


def write_json_centroids(points, path: Path) -> None:
    path.write_text(json.dumps({"centroids": [{"label": n, "xyz_lps_mm": list(p)} for n, p in points]}))


def write_csv(points, path: Path) -> None:
    path.write_text("label,x,y,z\n" + "".join(f"{n},{p[0]!r},{p[1]!r},{p[2]!r}\n" for n, p in points))


def write_generic(suffix: str, writer, centroid_name: str):
    def write(case: Case, out: Path) -> Path:
        out.mkdir(parents=True, exist_ok=True)
        image = out / f"{case.case_id}{suffix}"
        sitk.WriteImage(case.image, str(image), True)
        writer(all_points(case), out / centroid_name.format(id=case.case_id))
        return image

    return write


def write_dicom_series(image: sitk.Image, folder: Path) -> None:
    """One file per slice along voxel z, with the tags GDCM needs to rebuild the geometry."""
    folder.mkdir(parents=True)
    d = image.GetDirection()
    uid = "1.2.826.0.1.3680043.2.1125.1.20240101"
    series = [
        ("0008|0060", "CT"),
        ("0008|0008", "DERIVED\\SECONDARY"),
        ("0020|000d", uid + ".1"),
        ("0020|000e", uid + ".2"),
        ("0020|0037", "\\".join(str(v) for v in (d[0], d[3], d[6], d[1], d[4], d[7]))),
        ("0018|0050", str(image.GetSpacing()[2])),
        ("0018|0088", str(image.GetSpacing()[2])),
        ("0028|1052", "0"),
        ("0028|1053", "1"),
        ("0028|1054", "HU"),
    ]
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(image.GetSize()[2]):
        slice_ = image[:, :, k]
        for tag, value in series:
            slice_.SetMetaData(tag, value)
        slice_.SetMetaData("0008|0018", f"{uid}.3.{k}")
        slice_.SetMetaData("0020|0032", "\\".join(str(v) for v in image.TransformIndexToPhysicalPoint((0, 0, k))))
        slice_.SetMetaData("0020|0013", str(k + 1))
        writer.SetFileName(str(folder / f"slice{k:03d}.dcm"))
        writer.Execute(slice_)


def write_dicom(case: Case, out: Path) -> Path:
    folder = out / case.case_id
    write_dicom_series(case.image, folder)
    write_json_list(all_points(case), out / f"{case.case_id}.json")
    return folder


# variant -> (writer, format discovery must detect, Case.fmt, point tolerance mm)
VARIANTS = {
    "csi2014": (write_csi, "csi2014", "csi2014", 0.01),
    "verse": (write_verse, "verse", "verse", 0.01),
    "nifti+json": (write_generic(".nii.gz", write_json_list, "{id}.json"), "generic", "generic", 0.01),
    "nrrd+csv": (write_generic(".nrrd", write_csv, "{id}.csv"), "generic", "generic", 0.01),
    "mha+centroids.json": (
        write_generic(".mha", write_json_centroids, "{id}_centroids.json"),
        "generic",
        "generic",
        0.01,
    ),
    "dicom+json": (write_dicom, "generic", "dicom", 0.02),
}


@pytest.fixture(scope="module")
def expected() -> Case:
    return make_case()


@pytest.fixture(scope="module", params=list(VARIANTS))
def written(request, tmp_path_factory, expected):
    writer, fmt, case_fmt, tol = VARIANTS[request.param]
    out = tmp_path_factory.mktemp(request.param.replace("+", "_").replace(".", "_"))
    image_path = writer(expected, out)
    return out, image_path, fmt, case_fmt, tol


def assert_same_case(case: Case, expected: Case, case_fmt: str, tol: float) -> None:
    assert case.fmt == case_fmt
    assert case.labels() == expected.labels()
    np.testing.assert_allclose(case.points_mm(), expected.points_mm(), atol=tol)
    assert case.extra_labels == Counter({"T13": 1, "L6": 1})
    got, ref = case.image, expected.image
    assert got.GetSize() == ref.GetSize()
    np.testing.assert_allclose(got.GetSpacing(), ref.GetSpacing(), atol=1e-5)
    np.testing.assert_allclose(got.GetOrigin(), ref.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(got.GetDirection(), ref.GetDirection(), atol=1e-6)
    np.testing.assert_array_equal(
        sitk.GetArrayViewFromImage(got).astype(np.float64), sitk.GetArrayViewFromImage(ref).astype(np.float64)
    )
    assert all(Path(p).exists() for p in case.sources)


def test_discover_and_read_case(written, expected):
    out, image_path, fmt, case_fmt, tol = written
    refs = discover(out)
    assert [r.fmt for r in refs] == [fmt]
    assert refs[0].image == image_path
    case = read_case(refs[0])
    assert_same_case(case, expected, case_fmt, tol)
    assert refs[0].landmarks in case.sources


def test_read_any_finds_landmarks(written, expected):
    _, image_path, _, case_fmt, tol = written
    assert_same_case(read_any(image_path), expected, case_fmt, tol)


def test_writers_keep_tags(written, expected):
    out, image_path, fmt, _, _ = written
    case = read_case(discover(out, fmt)[0])
    if fmt in ("csi2014", "verse"):
        for key, value in expected.tags.items():
            assert case.tags[key] == value
        assert case.case_id == expected.case_id
    if fmt == "csi2014":
        assert case.tags["lml_convention"] == "lps"
        assert case.tags["lml_convention_source"] == "declared"


def test_read_any_without_landmarks_returns_empty_case(tmp_path, expected):
    image = tmp_path / "scan.nrrd"
    sitk.WriteImage(expected.image, str(image))
    case = read_any(image)
    assert case.landmarks == [] and case.extra_labels == Counter() and case.sources == [image]


def test_read_any_with_explicit_landmarks(tmp_path, expected):
    image = tmp_path / "scan.nii.gz"
    sitk.WriteImage(expected.image, str(image))
    lml = tmp_path / "elsewhere.lml"
    lml.write_text(csi2014.lml_text([(lm.name, lm.xyz_mm) for lm in expected.landmarks], expected.image))
    case = read_any(image, landmarks=lml)
    assert case.fmt == "csi2014" and case.labels() == expected.labels()
    np.testing.assert_allclose(case.points_mm(), expected.points_mm(), atol=0.01)


def test_dicom_centroids_inside_folder(tmp_path, expected):
    folder = tmp_path / "series"
    write_dicom_series(expected.image, folder)
    write_csv(all_points(expected), folder / "centroids.csv")
    case = read_any(folder)
    assert case.fmt == "dicom" and case.labels() == expected.labels()
    np.testing.assert_allclose(case.points_mm(), expected.points_mm(), atol=0.02)


def test_verse_writer_leaves_out_s2(tmp_path, expected):
    s2 = Landmark(INDEX["S2"], lps(expected.image, (18.0, 23.0, 50.0)))
    case = Case("withs2", expected.image, [*expected.landmarks, s2], [], "test")
    verse.write_case(case, tmp_path)
    back = read_case(discover(tmp_path)[0])
    assert "S2" not in back.labels() and back.labels() == expected.labels()


def test_verse_2020_names_and_split_folders(tmp_path, expected):
    """VerSe 2020 ``sub-gl003_dir-ax`` names, image in rawdata/, ctd (plain ``_ctd.json``) in derivatives/."""
    raw, der = tmp_path / "rawdata" / "sub-gl003", tmp_path / "derivatives" / "sub-gl003"
    raw.mkdir(parents=True)
    der.mkdir(parents=True)
    sitk.WriteImage(expected.image, str(raw / "sub-gl003_dir-ax_ct.nii.gz"))
    (der / "sub-gl003_dir-ax_ctd.json").write_text(verse.ctd_text(expected.landmarks, expected.image))
    refs = discover(tmp_path)
    assert [(r.case_id, r.fmt) for r in refs] == [("gl003_dir-ax", "verse")]
    case = read_case(refs[0])
    np.testing.assert_allclose(case.points_mm(), expected.points_mm(), atol=0.01)


# --- real data -----------------------------------------------------------------------------------


def test_totalsegmentator_example_generic():
    ct, centroids = DATA / "totalseg-example" / "ct.nii.gz", DATA / "totalseg-example" / "centroids.json"
    case = read_any(ct)
    assert case.fmt == "generic" and case.sources == [ct, centroids]
    entries = json.loads(centroids.read_text(encoding="utf-8"))["centroids"]
    by_name = {lm.name: lm for lm in case.landmarks}
    assert sorted(by_name) == sorted(e["label"] for e in entries)
    for e in entries:
        lm = by_name[e["label"]]
        np.testing.assert_allclose(lm.xyz_mm, e["xyz_lps_mm"], atol=1e-6)
        index = case.image.TransformPhysicalPointToContinuousIndex(lm.xyz_mm)
        np.testing.assert_allclose(index, e["index_xyz"], atol=0.01)


def test_verse004_ctd_matches_mask_centroids():
    """ctd points (vertebral bodies) vs mask label centroids (whole vertebra, incl. posterior
    elements): close along L-R and S-I, posterior by up to ~25 mm along A-P."""
    folder = DATA / "verse004"
    mask = sitk.ReadImage(str(folder / "sub-verse004_seg-vert_msk.nii.gz"))
    landmarks, extra = verse.read_ctd(folder / "sub-verse004_seg-subreg_ctd.json", mask)
    assert [lm.name for lm in landmarks] == ["T9", "T10", "T11", "T12", "L1", "L2", "L3", "L4", "L5"]
    assert extra == Counter()
    arr = sitk.GetArrayViewFromImage(mask)
    for lm in landmarks:
        zyx = np.argwhere(arr == lm.index + 1).mean(axis=0)
        centre = np.array(mask.TransformContinuousIndexToPhysicalPoint(tuple(float(v) for v in zyx[::-1])))
        dx, dy, dz = centre - np.array(lm.xyz_mm)  # LPS: x L-R, y A-P (+ posterior), z S-I
        assert abs(dx) < 4.0 and abs(dz) < 6.0, (lm.name, dx, dy, dz)
        assert -3.0 < dy < 25.0, (lm.name, dx, dy, dz)


def test_verse004_folder_without_ct_is_a_bad_case():
    refs = discover(DATA / "verse004")
    assert [(r.case_id, r.fmt) for r in refs] == [("verse004", "verse")]
    with pytest.raises(InputError, match="sub-verse004_ct.nii.gz: file not found"):
        read_case(refs[0])


def test_verse_ctd_axis_mapping_matches_sitk_reorientation(expected):
    """Independent oracle: reorient the image with SimpleITK to the ctd's axis codes and map the
    voxel coordinates there; the reader's permutation/flip must give the same physical point."""
    image = expected.image
    for codes in (("P", "I", "R"), ("L", "P", "S"), ("R", "A", "S"), ("S", "L", "A")):
        oriented = sitk.DICOMOrient(image, "".join(codes))
        xyz = (3.25, 7.5, 11.75)
        via_reader = image.TransformContinuousIndexToPhysicalPoint(verse.ctd_to_index(xyz, codes, image))
        np.testing.assert_allclose(via_reader, oriented.TransformContinuousIndexToPhysicalPoint(xyz), atol=1e-9)


# --- CSI 2014 .lml conventions -------------------------------------------------------------------


@pytest.fixture()
def csi_undeclared(tmp_path, expected):
    """A CSI case whose .lml has no declaration and is written in the index_mm convention."""
    image = tmp_path / "case7.nii.gz"
    sitk.WriteImage(expected.image, str(image))
    points = [(lm.name, lm.xyz_mm) for lm in expected.landmarks]
    (tmp_path / "case7.lml").write_text(csi2014.lml_text(points, expected.image, "index_mm", declare=False))
    return tmp_path, image


def test_lml_undeclared_resolves_index_mm(csi_undeclared, expected):
    folder, _ = csi_undeclared
    # The image is placed so that its index_mm box and its physical box do not overlap.
    case = read_case(discover(folder)[0])
    assert case.tags["lml_convention"] == "index_mm"
    assert case.tags["lml_convention_source"] == "auto"
    assert case.tags["lml_convention_candidates"] == "index_mm"
    np.testing.assert_allclose(case.points_mm(), expected.points_mm(), atol=0.01)


def test_lml_declaration_is_honoured(csi_undeclared, expected):
    folder, _ = csi_undeclared
    lml = folder / "case7.lml"
    points = [(lm.name, lm.xyz_mm) for lm in expected.landmarks]
    lml.write_text(csi2014.lml_text(points, expected.image, "ras", declare=True))
    case = read_case(discover(folder)[0])
    assert case.tags["lml_convention"] == "ras" and case.tags["lml_convention_source"] == "declared"
    np.testing.assert_allclose(case.points_mm(), expected.points_mm(), atol=0.01)
    # Declared index_mm values read as lps lie outside the image: the declaration is not second-guessed.
    text = csi2014.lml_text(points, expected.image, "index_mm", declare=False)
    lml.write_text(text.replace("#LML landmarks", "#LML convention=lps"))
    with pytest.raises(InputError, match="case7.lml.*outside the image"):
        read_case(discover(folder)[0])


def test_lml_undeclared_prefers_index_mm_then_lps(tmp_path):
    """Identity geometry at the origin: index_mm and lps coincide, both are candidates."""
    image = sitk.Image(20, 20, 20, sitk.sitkInt16)
    sitk.WriteImage(image, str(tmp_path / "a.nii.gz"))
    (tmp_path / "a.lml").write_text("header\n1\tL1\t5\t5\t5\n")
    case = read_case(discover(tmp_path)[0])
    assert case.tags["lml_convention"] == "index_mm"
    assert case.tags["lml_convention_candidates"] == "index_mm,lps"


def test_lml_tolerates_blank_lines_whitespace_and_suffixes(tmp_path, expected):
    sitk.WriteImage(expected.image, str(tmp_path / "b.nii"))
    p = expected.landmarks[0].xyz_mm
    (tmp_path / "b.lml").write_text(f"#LML convention=lps\n\n1\tT12_center\t{p[0]}\t{p[1]}\t{p[2]}   \n\n  \n")
    ref = discover(tmp_path)[0]
    assert ref == CaseRef("b", "csi2014", tmp_path / "b.nii", tmp_path / "b.lml", None)
    assert read_case(ref).labels() == ["T12"]


def test_auto_detection_messages(tmp_path):
    with pytest.raises(InputError, match="nowhere: folder not found"):
        discover(tmp_path / "nowhere")
    (tmp_path / "notes.txt").write_text("nothing here")
    with pytest.raises(InputError, match=f"{tmp_path}: holds no case of a known format"):
        discover(tmp_path)


def test_generic_case_ids_are_unique(tmp_path, expected):
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        sitk.WriteImage(expected.image, str(tmp_path / sub / "ct.nrrd"))
    assert [r.case_id for r in generic.discover(tmp_path)] == ["a__ct", "b__ct"]


def test_copy_of_real_ct_discovered_by_folder(tmp_path):
    """The TotalSegmentator folder layout (ct.nii.gz + centroids.json) is found by discovery."""
    shutil.copytree(DATA / "totalseg-example", tmp_path / "ts")
    refs = discover(tmp_path)
    assert [(r.case_id, r.fmt, r.landmarks.name) for r in refs] == [("ct", "generic", "centroids.json")]
