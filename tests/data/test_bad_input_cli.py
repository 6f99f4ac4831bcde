"""Bad input end to end through `vertstudy data prepare`: one line, exit 2, nothing half-written, rest kept."""

from __future__ import annotations

import math

import pytest
import SimpleITK as sitk

from tests.data.test_bad_input import CORPUS, REAL_CT, mha_with_spacing, small_image
from tests.synth import blob_image, write_generic_case
from vertstudy.cli import main


def _truncated(t):
    data = REAL_CT.read_bytes()
    (t / "half.nii.gz").write_bytes(data[: len(data) // 2])
    (t / "half.json").write_text("[]")
    return t / "half.nii.gz"


def _nan(t):
    image = small_image(sitk.sitkFloat32)
    image[3, 4, 5] = math.nan
    sitk.WriteImage(image, str(t / "nan.nrrd"))
    (t / "nan.json").write_text("[]")
    return t / "nan.nrrd"


def _zero_spacing(t):
    (t / "zero.json").write_text("[]")
    return mha_with_spacing(t / "zero.mha", "0 1 1")


IMAGE_CASES = {"truncated": _truncated, "nan voxels": _nan, "zero spacing": _zero_spacing}
LANDMARK_CASES = ["lml malformed line", "lml unknown label", "lml duplicate", "lml outside"]


def _prepare(root, cache, *extra):
    return main(["data", "prepare", "--root", str(root), "--cache", str(cache), "--workers", "1", "--quiet", *extra])


def _entries(cache):
    return [p for p in (cache / "cases").glob("*/*")] if (cache / "cases").exists() else []


def _good_case(folder):
    image = blob_image(points_mm=[(-5.0, 30.0, 290.0)])
    write_generic_case(folder, "good", image, {"L1": (-5.0, 30.0, 290.0)})


@pytest.mark.parametrize("name", [*IMAGE_CASES, *LANDMARK_CASES])
def test_prepare_reports_bad_case_and_strict_stops(tmp_path, capsys, name):
    data = tmp_path / "data"
    data.mkdir()
    bad = IMAGE_CASES[name](data) if name in IMAGE_CASES else CORPUS[name][0](data)
    if name in IMAGE_CASES:
        _good_case(data)  # generic folder: a good case beside the bad one
    # strict: one line naming the bad file, exit 2, no entry for it, no temporary folders
    assert _prepare(data, tmp_path / "strict", "--strict") == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: ") and str(bad) in err
    assert not [p for p in _entries(tmp_path / "strict") if p.name.startswith(".")]
    # not strict: the bad case is reported with its reason; any good case is prepared
    code = _prepare(data, tmp_path / "lenient")
    out = capsys.readouterr()
    if name in IMAGE_CASES:
        assert code == 0 and len(_entries(tmp_path / "lenient")) == 1
        assert "skipped" in out.out and bad.name in out.out
    else:  # the only case was bad: nothing could be prepared
        assert code == 2 and "no case" in out.err and len(_entries(tmp_path / "lenient")) == 0
