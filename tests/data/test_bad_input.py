"""Bad-input corpus: every bad file gives an ``InputError`` whose message names the file and the problem.

Each case is real files on disk, read through the public API (``discover``/``read_case``/``read_any``).
"""

from __future__ import annotations

import gzip
import json
import math
import re
import tempfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.paths import SHARED_DATA
from tests.synth import AXIS_PERMUTATIONS, signed_permutation
from vertstudy.anatomy import INDEX
from vertstudy.data.case import Landmark
from vertstudy.data.formats import discover, read_any, read_case, verse
from vertstudy.errors import InputError

REAL_CT = SHARED_DATA / "totalseg-example" / "ct.nii.gz"


def small_image(pixel=sitk.sitkInt16) -> sitk.Image:
    image = sitk.Image(16, 16, 16, pixel)
    image.SetSpacing((1.5, 1.5, 2.0))
    image.SetOrigin((-10.0, 5.0, 100.0))
    return image


def inside(image: sitk.Image, index=(8.0, 8.0, 8.0)) -> tuple[float, float, float]:
    return tuple(image.TransformContinuousIndexToPhysicalPoint(index))


def raises_naming(path: Path, problem: str, call, *args):
    """Assert ``call(*args)`` raises InputError naming ``path`` and matching ``problem`` (regex)."""
    with pytest.raises(InputError) as info:
        call(*args)
    message = str(info.value)
    assert str(path) in message, message
    assert info.value.path == str(path)
    assert re.search(problem, message), message
    assert "\n" not in message  # one line for the CLI
    return message


def read_folder(root: Path):
    refs = discover(root)
    assert len(refs) == 1
    return read_case(refs[0])


def mha_with_spacing(path: Path, spacing: str) -> Path:
    """A MetaImage written by hand (SimpleITK refuses to write such a spacing)."""
    header = (
        "ObjectType = Image\nNDims = 3\nDimSize = 4 4 4\nElementType = MET_SHORT\n"
        f"ElementSpacing = {spacing}\nElementDataFile = LOCAL\n"
    )
    path.write_bytes(header.encode() + np.zeros(64, dtype=np.int16).tobytes())
    return path


# --- images ----------------------------------------------------------------------------------------


def test_missing_image_file(tmp_path):
    raises_naming(tmp_path / "absent.nii.gz", "file not found", read_any, tmp_path / "absent.nii.gz")


def test_lml_without_image_is_a_bad_case(tmp_path):
    (tmp_path / "c9.lml").write_text("#LML\n1\tL1\t1\t2\t3\n")
    raises_naming(tmp_path / "c9.nii.gz", "file not found", read_folder, tmp_path)


def test_empty_image_file(tmp_path):
    path = tmp_path / "empty.nii.gz"
    path.write_bytes(b"")
    raises_naming(path, "file is empty", read_any, path)


def test_truncated_nifti(tmp_path):
    path = tmp_path / "half.nii.gz"
    data = REAL_CT.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    raises_naming(path, "truncated", read_any, path)


def test_truncated_uncompressed_nifti(tmp_path):
    path = tmp_path / "half.nii"
    data = gzip.decompress(REAL_CT.read_bytes())
    path.write_bytes(data[: len(data) // 2])
    raises_naming(path, r"NIfTI file is truncated: holds 2760304 of the 5520608 bytes", read_any, path)


def test_text_file_named_nifti(tmp_path):
    path = tmp_path / "notes.nii.gz"
    path.write_text("this is not an image\n")
    raises_naming(path, "cannot be read as an image", read_any, path)


def test_two_d_image(tmp_path):
    path = tmp_path / "slice.nii.gz"
    sitk.WriteImage(sitk.Image(32, 32, sitk.sitkInt16), str(path))
    raises_naming(path, "2-D", read_any, path)


def test_nan_voxels(tmp_path):
    image = small_image(sitk.sitkFloat32)
    image[3, 4, 5] = math.nan
    path = tmp_path / "nan.nrrd"
    sitk.WriteImage(image, str(path))
    raises_naming(path, "NaN", read_any, path)


@pytest.mark.parametrize("name, pixel", [("nan.nii.gz", sitk.sitkFloat32), ("nan.nii", sitk.sitkFloat64),
                                         ("inf.nii.gz", sitk.sitkFloat64)])
def test_non_finite_voxels_in_a_nifti_are_found_in_the_file_itself(tmp_path, name, pixel):
    """SimpleITK's NIfTI reader reads NaN and inf voxels as 0 (checked here, so the test fails
    loudly if a SimpleITK release stops doing so); read_any finds them in the file's bytes."""
    image = small_image(pixel)
    image[3, 4, 5] = math.nan if name.startswith("nan") else math.inf
    image[0, 0, 0] = -math.inf
    path = tmp_path / name
    sitk.WriteImage(image, str(path))
    back = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    assert np.isfinite(back).all() and back[5, 4, 3] == 0.0
    message = raises_naming(path, "NaN or infinite", read_any, path)
    assert "has 2 NaN or infinite voxels" in message


def test_a_clean_float_nifti_still_reads(tmp_path):
    image = small_image(sitk.sitkFloat32) - 1000.0
    path = tmp_path / "clean.nii.gz"
    sitk.WriteImage(image, str(path))
    assert read_any(path).image.GetSize() == (16, 16, 16)


def test_zero_spacing(tmp_path):
    path = mha_with_spacing(tmp_path / "zero.mha", "0 1 1")
    raises_naming(path, r"spacing .*not positive", read_any, path)


def test_negative_spacing(tmp_path):
    """SimpleITK itself reads a negative spacing as a flipped direction; we refuse it."""
    path = mha_with_spacing(tmp_path / "negative.mha", "1 -2.5 1")
    assert sitk.ReadImage(str(path)).GetSpacing() == (1.0, 2.5, 1.0)  # what SimpleITK does
    raises_naming(path, r"spacing \(1.0, -2.5, 1.0\).*not positive", read_any, path)


def test_empty_dicom_folder_through_generic(tmp_path):
    folder = tmp_path / "series"
    folder.mkdir()
    (folder / "junk.dcm").write_text("not dicom")
    raises_naming(folder, "DICOM", read_any, folder)


# --- missing landmark files ---------------------------------------------------------------------


def test_csi_image_without_lml_is_reported_not_skipped(tmp_path):
    sitk.WriteImage(small_image(), str(tmp_path / "c1.nii.gz"))
    sitk.WriteImage(small_image(), str(tmp_path / "c2.nii.gz"))
    (tmp_path / "c2.lml").write_text(f"#LML\n1\tL1\t{' '.join(map(str, inside(small_image())))}\n")
    refs = discover(tmp_path)
    assert [(r.case_id, r.landmarks is None) for r in refs] == [("c1", True), ("c2", False)]
    raises_naming(tmp_path / "c1.nii.gz", r"no landmark file: expected c1\.lml", read_case, refs[0])


def test_verse_image_without_ctd_is_reported(tmp_path):
    sitk.WriteImage(small_image(), str(tmp_path / "sub-x1_ct.nii.gz"))
    raises_naming(
        tmp_path / "sub-x1_ct.nii.gz", r"no centroid file: expected sub-x1_seg-subreg_ctd\.json", read_folder, tmp_path
    )


def test_explicit_landmark_file_missing(tmp_path):
    sitk.WriteImage(small_image(), str(tmp_path / "a.nii.gz"))
    raises_naming(tmp_path / "a.json", "landmark file not found", read_any, tmp_path / "a.nii.gz", tmp_path / "a.json")


# --- landmark files: one builder per (format, problem) ----------------------------------------------


GARBAGE = bytes(range(256)) * 4  # what a binary file (or a corrupted copy) holds
LATIN1_LML = "#LML caf\xe9 convention=lps\n1\tL1\t8.0\t20.0\t108.0\n".encode("latin-1")


def bytes_file(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def lml_raw(tmp_path: Path, text: str) -> Path:
    sitk.WriteImage(small_image(), str(tmp_path / "k.nii.gz"))
    (tmp_path / "k.lml").write_text(text)
    return tmp_path / "k.lml"


def lml_case(tmp_path: Path, body: str) -> Path:
    return lml_raw(tmp_path, "#LML vertstudy convention=lps\n" + body)


def ctd_raw(tmp_path: Path, text: str) -> Path:
    sitk.WriteImage(small_image(), str(tmp_path / "sub-k_ct.nii.gz"))
    path = tmp_path / "sub-k_seg-subreg_ctd.json"
    path.write_text(text)
    return path


def ctd_case(tmp_path: Path, entries) -> Path:
    return ctd_raw(tmp_path, json.dumps(entries))


def json_case(tmp_path: Path, entries) -> Path:
    sitk.WriteImage(small_image(), str(tmp_path / "k.nrrd"))
    path = tmp_path / "k.json"
    path.write_text(json.dumps(entries))
    return path


def csv_case(tmp_path: Path, text: str) -> Path:
    sitk.WriteImage(small_image(), str(tmp_path / "k.mha"))
    path = tmp_path / "k.csv"
    path.write_text(text)
    return path


def tags_case(tmp_path: Path, text: str) -> Path:
    lml_case(tmp_path, f"1\tL1\t{xyz(P)}\n")
    (tmp_path / "k.tags.json").write_text(text)
    return tmp_path / "k.tags.json"


P = inside(small_image())
Q = inside(small_image(), (4.0, 4.0, 4.0))
FAR = (500.0, 500.0, 500.0)
V = {"X": 8.0, "Y": 8.0, "Z": 8.0}
DIR = {"direction": ["L", "P", "S"]}


def xyz(p):
    return "\t".join(str(v) for v in p)


CORPUS = {
    # malformed landmark line / entry
    "lml malformed line": (
        lambda t: lml_case(t, f"1\tL1\t{xyz(P)}\n2\tL2\t1.0\tabc\t3.0\n"),
        r"line 3: malformed.*expected",
    ),
    "lml too few fields": (lambda t: lml_case(t, "1\tL1\t1.0\t2.0\n"), r"line 2: malformed"),
    "lml empty": (lambda t: lml_raw(t, ""), "landmark file is empty"),
    "lml blank lines only": (lambda t: lml_raw(t, "\n  \n"), "landmark file is empty"),
    "lml unknown convention": (
        lambda t: lml_raw(t, "#LML convention=vox\n"),
        r"line 1: unknown coordinate convention 'vox'",
    ),
    "ctd not a list": (lambda t: ctd_case(t, {"label": 1}), "not a VerSe centroid file"),
    "ctd bad direction": (lambda t: ctd_case(t, [{"direction": ["P", "I", "P"]}]), "not valid axis codes"),
    "ctd malformed entry": (lambda t: ctd_case(t, [DIR, {"label": 20, "X": 1.0}]), r"entry 1: malformed centroid"),
    "ctd invalid json": (lambda t: ctd_raw(t, '[{"direction": '), "invalid JSON at line 1"),
    "ctd empty": (lambda t: ctd_raw(t, ""), "file is empty"),
    "json malformed entry": (lambda t: json_case(t, [{"label": "L1", "x": 1.0}]), r"entry 0: .*has no coordinates"),
    "json bad number": (lambda t: json_case(t, [{"label": "L1", "x": "a", "y": 1, "z": 2}]), "not numbers"),
    "json wrong shape": (lambda t: json_case(t, {"points": []}), "not a centroid file"),
    "csv bad header": (lambda t: csv_case(t, "name,a,b,c\nL1,1,2,3\n"), r"line 1: header .*lacks label,x,y,z"),
    "csv short row": (
        lambda t: csv_case(t, f"label,x,y,z\nL1,{','.join(map(str, P))}\nL2,1\n"),
        r"line 3: malformed row",
    ),
    # unknown label
    "lml unknown label": (
        lambda t: lml_case(t, f"1\tL7_center\t{xyz(P)}\n"),
        r"line 2: unknown label 'L7_center'.*accepted: C1",
    ),
    "ctd unknown label": (
        lambda t: ctd_case(t, [DIR, {"label": 29, **V}]),
        r"entry 1: unknown label 29.*accepted VerSe labels",
    ),
    "json unknown label": (
        lambda t: json_case(t, [{"label": "X1", "x": P[0], "y": P[1], "z": P[2]}]),
        r"entry 0: unknown label 'X1'.*accepted",
    ),
    "csv unknown label": (
        lambda t: csv_case(t, f"label,x,y,z\nQ5,{','.join(map(str, P))}\n"),
        r"line 2: unknown label 'Q5'",
    ),
    # duplicate label
    "lml duplicate": (lambda t: lml_case(t, f"1\tL1\t{xyz(P)}\n2\tL1_center\t{xyz(Q)}\n"), "duplicate label 'L1'"),
    "lml duplicate extra": (lambda t: lml_case(t, f"1\tL6\t{xyz(P)}\n2\tL6\t{xyz(Q)}\n"), "duplicate label 'L6'"),
    "ctd duplicate": (lambda t: ctd_case(t, [DIR, {"label": 20, **V}, {"label": 20, **V}]), "duplicate label 'L1'"),
    "json duplicate": (lambda t: json_case(t, [{"label": "S1", "xyz_lps_mm": list(P)}] * 2), "duplicate label 'S1'"),
    "csv duplicate": (
        lambda t: csv_case(t, "label,x,y,z\n" + f"T12,{','.join(map(str, P))}\n" * 2),
        "duplicate label 'T12'",
    ),
    # landmark outside the image
    "lml outside": (lambda t: lml_case(t, f"1\tL1\t{xyz(FAR)}\n"), r"landmark L1 .*outside the image"),
    "ctd outside": (
        lambda t: ctd_case(t, [DIR, {"label": 20, "X": 8.0, "Y": 40.0, "Z": 8.0}]),
        r"landmark L1 .*outside",
    ),
    "json outside": (
        lambda t: json_case(t, [{"label": "L2", "x": FAR[0], "y": FAR[1], "z": FAR[2]}]),
        r"landmark L2 .*outside",
    ),
    "csv outside": (lambda t: csv_case(t, f"label,x,y,z\nL3,{P[0]},{P[1]},-900\n"), r"landmark L3 .*outside"),
    # tags file
    "tags not an object": (lambda t: tags_case(t, "[1]"), "tags file must hold a JSON object"),
    # unreadable as text, or no landmark at all: an error, never a case without landmarks
    "lml binary garbage": (lambda t: bytes_file(lml_raw(t, ""), GARBAGE), "landmark file is binary"),
    "lml latin-1": (lambda t: bytes_file(lml_raw(t, ""), LATIN1_LML), r"not UTF-8 text \(byte 8"),
    "lml header only": (lambda t: lml_case(t, "\n\n"), "holds no landmark line"),
    "ctd binary garbage": (lambda t: bytes_file(ctd_raw(t, ""), GARBAGE), "file is binary"),
    "json binary garbage": (lambda t: bytes_file(json_case(t, []), GARBAGE), "file is binary"),
    "csv binary garbage": (lambda t: bytes_file(csv_case(t, ""), GARBAGE), "file is binary"),
}


@pytest.mark.parametrize("name", list(CORPUS))
def test_bad_landmark_files(tmp_path, name):
    build, problem = CORPUS[name]
    path = build(tmp_path)
    raises_naming(path, problem, read_folder, tmp_path)


def test_undeclared_lml_outside_under_every_convention(tmp_path):
    sitk.WriteImage(small_image(), str(tmp_path / "u.nii.gz"))
    (tmp_path / "u.lml").write_text(f"header\n1\tL1\t{xyz(P)}\n2\tL2\t{xyz(FAR)}\n")
    message = raises_naming(
        tmp_path / "u.lml", "no coordinate convention puts every landmark inside", read_folder, tmp_path
    )
    for convention in ("index_mm", "lps", "ras"):
        assert re.search(f"{convention}: L[12] at LPS", message), message


def test_extras_are_counted_not_relabelled(tmp_path):
    lml_case(tmp_path, f"1\tL5\t{xyz(P)}\n2\tL6\t{xyz(Q)}\n3\tT13\t{xyz(Q)}\n4\tCo\t{xyz(Q)}\n")
    case = read_folder(tmp_path)
    assert case.labels() == ["L5"] and dict(case.extra_labels) == {"L6": 1, "T13": 1, "Co": 1}


# --- property: VerSe ctd write -> read under random orientations and spacings -------------------------

@st.composite
def oriented_images(draw):
    perm = draw(st.sampled_from(AXIS_PERMUTATIONS))
    direction = signed_permutation(perm, draw(st.tuples(*[st.sampled_from([-1.0, 1.0])] * 3)))
    size = draw(st.tuples(*[st.integers(3, 24)] * 3))
    spacing = draw(st.tuples(*[st.floats(0.25, 6.0)] * 3))
    origin = draw(st.tuples(*[st.floats(-500.0, 500.0)] * 3))
    image = sitk.Image(*size, sitk.sitkUInt8)
    image.SetDirection(direction.ravel().tolist())
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    fractions = draw(st.lists(st.tuples(*[st.floats(0.0, 1.0)] * 3), min_size=1, max_size=5))
    codes = draw(st.permutations(["R", "A", "S"]))
    flips = draw(st.tuples(*[st.booleans()] * 3))
    target = tuple({"R": "L", "A": "P", "S": "I"}[c] if f else c for c, f in zip(codes, flips))
    return image, fractions, target


@settings(max_examples=30, deadline=None)
@given(oriented_images())
def test_verse_ctd_round_trip_random_orientations(args):
    image, fractions, target = args
    size = np.array(image.GetSize()) - 1
    names = ["C1", "C5", "T3", "L2", "S1"][: len(fractions)]
    landmarks = [
        Landmark(INDEX[n], tuple(image.TransformContinuousIndexToPhysicalPoint(tuple(np.array(f) * size))))
        for n, f in zip(names, fractions)
    ]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "sub-p_seg-subreg_ctd.json"
        path.write_text(verse.ctd_text(landmarks, image))
        back, extra = verse.read_ctd(path, image)
        np.testing.assert_allclose([lm.xyz_mm for lm in back], [lm.xyz_mm for lm in landmarks], atol=1e-4)
        # Written in other axis codes, checked against SimpleITK's own reorientation.
        oriented = sitk.DICOMOrient(image, "".join(target))
        entries = [{"direction": list(target)}]
        for lm in landmarks:
            index = image.TransformPhysicalPointToContinuousIndex(lm.xyz_mm)
            x, y, z = verse.index_to_ctd(index, target, image)
            np.testing.assert_allclose(
                oriented.TransformContinuousIndexToPhysicalPoint((x, y, z)), lm.xyz_mm, atol=1e-6
            )
            entries.append({"label": verse.NAME_TO_VERSE[lm.name], "X": x, "Y": y, "Z": z})
        path.write_text(json.dumps(entries))
        back, _ = verse.read_ctd(path, image)
        np.testing.assert_allclose([lm.xyz_mm for lm in back], [lm.xyz_mm for lm in landmarks], atol=1e-6)
