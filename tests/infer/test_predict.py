"""``predict``: real image files and a real (tiny, untrained) checkpoint, end to end.

The checkpoint's threshold is low (0.05) so the untrained network's ~0.5 probabilities vote and
every class is predicted somewhere; the tests check the files, not the accuracy.
"""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from tests.infer.test_inference import tiny_config
from tests.synth import blob_image, signed_permutation, write_generic_case
from vertstudy.checkpoint import CHECKPOINT_FORMAT, save_checkpoint
from vertstudy.config import InferConfig
from vertstudy.data.formats.verse import axis_codes, read_ctd
from vertstudy.errors import InputError, VertstudyError
from vertstudy.infer.predict import SLICER_SCHEMA, predict
from vertstudy.model.network import build_model

# The parts of the 3D Slicer markups schema v1.0.3 (Slicer/Slicer,
# Modules/Loadable/Markups/Resources/Schema/markups-schema-v1.0.3.json) a fiducial file uses.
MARKUPS_SCHEMA = {
    "type": "object",
    "required": ["@schema", "markups"],
    "properties": {
        "@schema": {"type": "string"},
        "markups": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["type"],
                "properties": {
                    "type": {"enum": ["Fiducial", "Line", "Angle", "Curve", "ClosedCurve", "Plane", "ROI"]},
                    "name": {"type": "string"},
                    "coordinateSystem": {"enum": ["LPS", "RAS"]},
                    "coordinateUnits": {"enum": ["mm", "um"]},
                    "locked": {"type": "boolean"},
                    "fixedNumberOfControlPoints": {"type": "boolean"},
                    "labelFormat": {"type": "string"},
                    "controlPoints": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "properties": {
                                "id": {"type": "string"},
                                "label": {"type": "string"},
                                "description": {"type": "string"},
                                "associatedNodeID": {"type": "string"},
                                "position": {"type": "array", "items": {"type": "number"}, "minItems": 3,
                                             "maxItems": 3},
                                "orientation": {"type": "array", "items": {"type": "number"}, "minItems": 9,
                                                "maxItems": 9},
                                "selected": {"type": "boolean"},
                                "locked": {"type": "boolean"},
                                "visibility": {"type": "boolean"},
                                "positionStatus": {"enum": ["undefined", "preview", "defined"]},
                            },
                        },
                    },
                    "display": {
                        "type": "object",
                        "properties": {
                            "visibility": {"type": "boolean"},
                            "opacity": {"type": "number", "minimum": 0, "maximum": 1},
                            "color": {"type": "array", "items": {"type": "number", "minimum": 0, "maximum": 1},
                                      "minItems": 3, "maxItems": 3},
                            "pointLabelsVisibility": {"type": "boolean"},
                            "glyphType": {"type": "string"},
                        },
                    },
                },
            },
        },
    },
}

# Inside the image of the ``ct`` fixture: x 20..48.8, y 5..80, z 230..290 mm (LPS).
TRUTH_MM = {"L3": (30.0, 40.0, 280.0), "L4": (32.0, 42.0, 262.0), "L5": (34.0, 45.0, 245.0)}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    cfg = tiny_config()
    torch.manual_seed(0)
    model = build_model(cfg.model)
    path = tmp_path_factory.mktemp("ckpt") / "best.pt"
    save_checkpoint(path, {"format": CHECKPOINT_FORMAT, "model": model.state_dict(), "config": cfg.model_dump()})
    return path


@pytest.fixture(scope="module")
def ct(tmp_path_factory) -> Path:
    """A CT whose voxel axes are permuted and flipped (PIR-like), with three blobs and their truth."""
    direction = signed_permutation((1, 2, 0), (-1, -1, 1)).ravel()
    image = blob_image(size_xyz=(30, 40, 24), spacing_xyz=(2.5, 1.5, 1.2), origin_xyz=(20.0, 80.0, 290.0),
                       direction=tuple(direction), points_mm=list(TRUTH_MM.values()))
    assert axis_codes(image) != ("L", "P", "S")
    folder = tmp_path_factory.mktemp("ct")
    return write_generic_case(folder, "case7", image, TRUTH_MM)


def test_verse_output_reads_back_to_the_same_lps_points(ct, checkpoint, tmp_path):
    out = tmp_path / "case7_ctd.json"
    summary = predict(ct, checkpoint, out, fmt="verse")
    entries = json.loads(out.read_text(encoding="utf-8"))
    image = sitk.ReadImage(str(ct))
    assert entries[0] == {"direction": list(axis_codes(image))}
    assert summary["n_predicted"] > 0 and summary["tiles"] >= 1
    landmarks, extra = read_ctd(out, image)
    assert not extra
    predicted = {v["name"]: v for v in summary["vertebrae"]}
    written = {lm.name: lm.xyz_mm for lm in landmarks}
    assert set(written) == set(predicted) - {"S2"}
    assert summary["not_written"] == (["S2"] if "S2" in predicted else [])
    for name, xyz in written.items():
        np.testing.assert_allclose(xyz, predicted[name]["xyz_mm"], atol=0.01)
    for entry in entries[1:]:  # the extension keys: LPS mm as written, what readers ignore
        np.testing.assert_allclose(entry["xyz_lps_mm"], written[entry["name"]], atol=0.01)
        assert 0 < entry["probability"] < 1 and entry["votes"] >= 1
    json.dumps(summary)  # the summary is plain JSON


def test_slicer_markups_structure(ct, checkpoint, tmp_path):
    out = tmp_path / "case7.mrk.json"
    summary = predict(ct, checkpoint, out, fmt="slicer")
    doc = json.loads(out.read_text(encoding="utf-8"))
    jsonschema.validate(doc, MARKUPS_SCHEMA)
    assert doc["@schema"] == SLICER_SCHEMA and "markups-schema-v1.0.3.json" in doc["@schema"]
    (markup,) = doc["markups"]
    assert markup["type"] == "Fiducial" and markup["coordinateSystem"] == "LPS"
    points = markup["controlPoints"]
    assert [p["label"] for p in points] == summary["predicted"]
    assert len({p["id"] for p in points}) == len(points)
    for p, v in zip(points, summary["vertebrae"]):
        np.testing.assert_allclose(p["position"], v["xyz_mm"], atol=1e-3)


def test_png_with_truth_has_errors(ct, checkpoint, tmp_path):
    out, png = tmp_path / "pred.json", tmp_path / "views" / "pred.png"
    truth = ct.with_name("case7.json")
    summary = predict(ct, checkpoint, out, png=png, truth=truth,
                      infer=InferConfig(stride=(8, 8, 8), threshold=0.05, min_votes=1, decoder="kmeans"))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert summary["n_truth"] == 3
    assert set(summary["errors_mm"]) <= set(TRUTH_MM)
    assert set(summary["errors_mm"]) == set(TRUTH_MM) & set(summary["predicted"])
    for name, err in summary["errors_mm"].items():
        assert err >= 0
        pred = np.array(next(v["xyz_mm"] for v in summary["vertebrae"] if v["name"] == name))
        assert err == pytest.approx(np.linalg.norm(pred - np.array(TRUTH_MM[name])), abs=1e-3)
    assert 0.0 <= summary["id_rate"] <= 1.0


def test_own_verse_output_as_truth_gives_zero_error(ct, checkpoint, tmp_path):
    first = tmp_path / "first_ctd.json"
    predict(ct, checkpoint, first)
    summary = predict(ct, checkpoint, tmp_path / "again.json", png=tmp_path / "again.png", truth=first)
    assert summary["errors_mm"] and max(summary["errors_mm"].values()) < 0.01
    assert summary["id_rate"] == pytest.approx(1.0)


def test_dicom_folder_input(checkpoint, tmp_path):
    image = blob_image(size_xyz=(24, 20, 16), spacing_xyz=(2.0, 2.0, 3.0), points_mm=[(-10.0, 30.0, 270.0)])
    folder = tmp_path / "dicom"
    folder.mkdir()
    image = sitk.Cast(image, sitk.sitkInt16)
    for k in range(image.GetSize()[2]):
        sl = image[:, :, k]
        writer = sitk.ImageFileWriter()
        writer.KeepOriginalImageUIDOn()
        for tag, value in (("0020|000e", "1.2.3.4.5"), ("0020|0013", str(k + 1)), ("0008|0060", "CT"),
                           ("0020|0032", "\\".join(str(v) for v in image.TransformIndexToPhysicalPoint((0, 0, k)))),
                           ("0020|0037", "1\\0\\0\\0\\1\\0"), ("0028|0030", "2.0\\2.0"), ("0018|0050", "3.0")):
            sl.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"slice{k:03d}.dcm"))
        writer.Execute(sl)
    summary = predict(folder, checkpoint, tmp_path / "dcm_ctd.json")
    assert summary["case_id"] == "dicom" and summary["n_predicted"] > 0


# -- bad input: one error naming the file, nothing written --------------------------------------
def _no_outputs(folder: Path) -> None:
    assert sorted(p.name for p in folder.iterdir()) == [], "no output, not even a temporary file"


def test_missing_image(checkpoint, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(InputError, match="nope.nii.gz"):
        predict(tmp_path / "nope.nii.gz", checkpoint, out / "p.json", png=out / "p.png")
    _no_outputs(out)


def test_unreadable_image(checkpoint, tmp_path):
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"\x1f\x8b this is not a NIfTI file")
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(InputError, match="broken.nii.gz"):
        predict(bad, checkpoint, out / "p.json")
    _no_outputs(out)


def test_missing_checkpoint(ct, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(InputError, match="missing.pt.*not found"):
        predict(ct, tmp_path / "missing.pt", out / "p.json")
    _no_outputs(out)


@pytest.mark.parametrize("kind", ["text", "foreign-torch", "wrong-config"])
def test_not_a_vertstudy_checkpoint(ct, tmp_path, kind):
    bad = tmp_path / f"{kind}.pt"
    if kind == "text":
        bad.write_text("hello, I am not a checkpoint\n")
    elif kind == "foreign-torch":
        torch.save({"state_dict": {"w": torch.zeros(2)}}, bad)
    else:  # right format tag, weights of another architecture
        cfg = tiny_config()
        torch.save({"format": CHECKPOINT_FORMAT, "model": {"w": torch.zeros(2)}, "config": cfg.model_dump()}, bad)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(InputError, match=f"{kind}.pt") as info:
        predict(ct, bad, out / "p.json")
    assert "\n" not in str(info.value)  # one line
    _no_outputs(out)


def test_bad_format(ct, checkpoint, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(VertstudyError, match="'csv'.*verse, slicer"):
        predict(ct, checkpoint, out / "p.json", fmt="csv")
    _no_outputs(out)


def test_output_path_is_a_folder(ct, checkpoint, tmp_path):
    with pytest.raises(InputError, match="is a folder"):
        predict(ct, checkpoint, tmp_path)


def test_bad_truth_file(ct, checkpoint, tmp_path):
    truth = tmp_path / "truth.json"
    truth.write_text('[{"label": "L9", "x": 0, "y": 0, "z": 0}]')
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(InputError, match="truth.json"):
        predict(ct, checkpoint, out / "p.json", png=out / "p.png", truth=truth)
    _no_outputs(out)
