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


def _prepared_ids(root, cache, for_prediction: bool = False) -> list[str]:
    """Case ids of the data set ``data prepare`` made of ``root`` in ``cache`` (read back from the cache)."""
    from vertstudy.data.prepare import prepare_dataset

    result = prepare_dataset(root, cache, workers=1, progress=False, for_prediction=for_prediction)
    assert result.hits == len(result.cases)  # all prepared by the command already
    return sorted(c.case_id for c in result.cases)


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


def test_a_training_set_whose_landmark_files_are_missing_is_refused_unless_for_prediction(tmp_path, capsys):
    """--format auto reads CTs without landmark files as the generic format with no landmarks:
    for training each is a bad case (skipped with its reason, or the first one stops --strict);
    --for-prediction prepares them."""
    data = tmp_path / "data"
    data.mkdir()
    for name in ("a", "b"):
        sitk.WriteImage(small_image(), str(data / f"{name}.nii.gz"))
    _good_case(data)
    assert _prepare(data, tmp_path / "strict", "--strict") == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "has no landmarks (no landmark file was found" in err
    assert "a.nii.gz" in err and "--for-prediction" in err
    assert _prepare(data, tmp_path / "lenient") == 0
    out = capsys.readouterr().out
    skipped = [line for line in out.splitlines() if line.startswith("skipped ")]
    assert len(skipped) == 2 and all("has no landmarks" in line for line in skipped), out
    assert "cases skipped" in out
    assert _prepared_ids(data, tmp_path / "lenient") == ["good"]  # refused cases are not in the data set
    assert _prepare(data, tmp_path / "predict", "--for-prediction") == 0
    assert _prepared_ids(data, tmp_path / "predict", for_prediction=True) == ["a", "b", "good"]
    # a centroid file that lists no vertebra is refused the same way
    (data / "a.json").write_text("[]", encoding="utf-8")
    assert _prepare(data, tmp_path / "strict2", "--strict") == 2
    assert "a.json lists none" in capsys.readouterr().err
