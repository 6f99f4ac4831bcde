"""``vertstudy predict``: label the vertebrae of one CT with a trained checkpoint.

:func:`predict` reads an image file or a DICOM series folder, preprocesses it with the
checkpoint's own preprocessing, runs whole-CT inference (:mod:`vertstudy.infer`,
paper III-B) and writes the centroids in the original image's space:

- ``fmt="verse"`` (default): a VerSe ctd JSON list. The first entry is the image's own axis
  codes, ``{"direction": ["L", "P", "S"]}`` (nibabel style, see :mod:`vertstudy.data.formats.verse`),
  then one entry per vertebra ``{"label": VerSe label, "X", "Y", "Z"}`` in voxel units of the
  image in those codes, i.e. its continuous voxel index. Each entry also carries extra keys that
  VerSe readers (ours, and the VerSe repository's ``load_centroids``) ignore: ``"name"``
  (``"L1"``), ``"xyz_lps_mm"`` (ITK/LPS mm), ``"probability"`` (mean class probability of its
  votes, ``null`` for a loc-only model) and ``"votes"``. **S2 has no VerSe label** (26 is the
  whole sacrum, read back as S1), so a predicted S2 is not written to this format; the summary
  lists it under ``not_written``. Use ``fmt="slicer"`` to keep it.
- ``fmt="slicer"``: a 3D Slicer markups fiducial file (``.mrk.json``, schema v1.0.3),
  ``coordinateSystem`` LPS, one control point per vertebra labelled with its name and positioned
  in LPS mm, so it opens in Slicer over the CT. Every class, S2 included, is written.
- ``png``: sagittal and coronal views like the paper's Fig. 8/9, predicted centroids red; with
  ``truth`` (any landmark file the readers accept) the true centroids blue, each predicted label
  followed by its error in mm and each missed truth marked "missed".

Every output is written atomically, and nothing is written until inference has succeeded.
Bad input (missing or unreadable image, missing or foreign checkpoint, bad format, bad truth
file) raises :class:`~vertstudy.errors.InputError` / :class:`~vertstudy.errors.VertstudyError`
naming the file; the CLI turns it into one line and exit code 2.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from vertstudy.anatomy import NAMES
from vertstudy.atomic import atomic_write_text
from vertstudy.config import InferConfig
from vertstudy.data.case import Case
from vertstudy.data.io import read_image, strip_image_suffix
from vertstudy.errors import InputError, VertstudyError
from vertstudy.model.load import load_checkpoint_model

OUTPUT_FORMATS: tuple[str, ...] = ("verse", "slicer")

SLICER_SCHEMA = (
    "https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/Markups/Resources/Schema/"
    "markups-schema-v1.0.3.json#"
)


# Slicer writes this per-point orientation (identity in RAS, expressed in LPS) for fiducials.
_SLICER_ORIENTATION = [-1.0, -0.0, -0.0, -0.0, -1.0, -0.0, 0.0, 0.0, 1.0]


# -- inputs ----------------------------------------------------------------------------------
def check_format(fmt: str) -> str:
    if fmt not in OUTPUT_FORMATS:
        raise VertstudyError(f"--format {fmt!r} is not an output format; accepted: {', '.join(OUTPUT_FORMATS)}")
    return fmt


def check_output_path(path: Path, what: str) -> Path:
    """``path`` must not be an existing folder (its parent is created when written)."""
    path = Path(path)
    if path.is_dir():
        raise InputError(path, f"is a folder; {what} must be a file name")
    return path


def read_image_case(image: Path, truth: Path | None = None) -> Case:
    """The case to label: the image alone, or with ``truth`` read by the landmark readers.

    Without ``truth`` no landmark file is looked for, so a bad one lying beside the image cannot
    stop a prediction.
    """
    image = Path(image)
    if truth is not None:
        from vertstudy.data.formats import read_any

        return read_any(image, truth)
    sitk_image = read_image(image)
    case_id = image.name if image.is_dir() else strip_image_suffix(image.name)
    return Case(case_id=case_id, image=sitk_image, landmarks=[], sources=[image],
                fmt="dicom" if image.is_dir() else "generic")


# -- outputs ---------------------------------------------------------------------------------
def _opt_round(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(float(value), digits)


def verse_ctd_entries(prediction, image: sitk.Image) -> tuple[list[dict], list[str]]:
    """VerSe ctd entries of ``prediction`` for ``image`` and the names left out (S2).

    Points are the continuous voxel index of ``image`` in its own axis codes (see module doc).
    """
    from vertstudy.data.formats.verse import NAME_TO_VERSE, axis_codes, index_to_ctd

    codes = axis_codes(image)
    entries: list[dict] = [{"direction": list(codes)}]
    left_out: list[str] = []
    for v in prediction.vertebrae:
        label = NAME_TO_VERSE.get(v.name)
        if label is None or v.name == "S2":
            left_out.append(v.name)
            continue
        xyz = index_to_ctd(v.index_xyz, codes, image)
        entries.append({
            "label": int(label),
            "X": round(xyz[0], 6),
            "Y": round(xyz[1], 6),
            "Z": round(xyz[2], 6),
            "name": v.name,
            "xyz_lps_mm": [round(c, 4) for c in v.xyz_mm],
            "probability": _opt_round(v.probability),
            "votes": int(v.votes),
        })
    return entries, left_out


def slicer_markups(prediction, name: str = "vertebrae") -> dict:
    """A 3D Slicer markups fiducial document (schema v1.0.3) of ``prediction``, LPS mm."""
    points = []
    for k, v in enumerate(prediction.vertebrae, start=1):
        prob = "n/a (loc-only model)" if v.probability is None else f"{v.probability:.3f}"
        points.append({
            "id": str(k),
            "label": v.name,
            "description": f"vertstudy: probability {prob}, {v.votes} votes",
            "associatedNodeID": "",
            "position": [float(c) for c in v.xyz_mm],
            "orientation": list(_SLICER_ORIENTATION),
            "selected": True,
            "locked": False,
            "visibility": True,
            "positionStatus": "defined",
        })
    return {
        "@schema": SLICER_SCHEMA,
        "markups": [{
            "type": "Fiducial",
            "name": name,
            "coordinateSystem": "LPS",
            "coordinateUnits": "mm",
            "locked": False,
            "fixedNumberOfControlPoints": False,
            "labelFormat": "%N-%d",
            "lastUsedControlPointNumber": len(points),
            "controlPoints": points,
            "measurements": [],
            "display": {
                "visibility": True,
                "opacity": 1.0,
                "color": [1.0, 0.19, 0.19],
                "selectedColor": [1.0, 0.19, 0.19],
                "propertiesLabelVisibility": False,
                "pointLabelsVisibility": True,
                "textScale": 3.0,
                "glyphType": "Sphere3D",
                "glyphScale": 2.0,
                "glyphSize": 5.0,
                "useGlyphScale": True,
            },
        }],
    }


def truth_errors(prediction, case: Case) -> tuple[dict[str, float], dict]:
    """Per-class error (mm) of the predicted classes that are in the truth, and the paper's
    figures (:func:`vertstudy.train.metrics.summarize`) for this case."""
    from vertstudy.train.metrics import match_case, summarize

    truth = {lm.index: np.asarray(lm.xyz_mm, dtype=np.float64) for lm in case.landmarks}
    pred = {v.index: np.asarray(v.xyz_mm, dtype=np.float64) for v in prediction.vertebrae}
    rows = match_case(pred, truth)
    errors = {NAMES[r.label]: round(r.error_mm, 3) for r in rows if r.in_truth and r.predicted}
    return errors, summarize(rows)


def render_prediction_png(prediction, png: Path, title: str, case: Case | None = None,
                          errors: dict[str, float] | None = None) -> Path:
    """Sagittal + coronal views (paper Fig. 8/9) on the canonical volume in HU: predicted red,
    labelled ``"L1 3.2 mm"`` when ``errors`` has the class; truth of ``case`` blue."""
    from vertstudy.data.show import render_case_views

    prepared = prediction.prepared
    volume_hu = prepared.volume * np.float32(prepared.hu_std) + np.float32(prepared.hu_mean)
    pts = np.array([v.zyx_vox for v in prediction.vertebrae], dtype=np.float64).reshape(-1, 3)
    errors = errors or {}
    names = [f"{v.name} {errors[v.name]:.1f} mm" if v.name in errors else v.name for v in prediction.vertebrae]
    truth_zyx = truth_names = None
    if case is not None and case.landmarks:
        truth_zyx = prepared.zyx_vox
        predicted = {v.index for v in prediction.vertebrae}
        truth_names = [NAMES[i] if int(i) in predicted else f"{NAMES[i]} missed" for i in prepared.indices]
    spacing = (prepared.geometry.spacing_mm,) * 3
    return render_case_views(volume_hu, spacing, pts, names, png, title, truth_zyx, truth_names)


# -- the command -----------------------------------------------------------------------------
def predict(
    image: Path,
    checkpoint: Path,
    out: Path,
    png: Path | None = None,
    fmt: str = "verse",
    truth: Path | None = None,
    device: str = "auto",
    infer: InferConfig | None = None,
) -> dict:
    """Label the vertebrae of ``image`` with ``checkpoint``; write ``out`` (and ``png``).

    Args:
        image: image file (NIfTI, NRRD, MHA) or DICOM series folder.
        checkpoint: a checkpoint written by the trainer (``best.pt`` / ``last.pt``).
        out: output JSON file (``fmt="verse"``: ``*_ctd.json``; ``"slicer"``: ``*.mrk.json``).
        png: optional picture (sagittal + coronal views, predicted centroids red).
        fmt: ``"verse"`` or ``"slicer"`` (see the module docstring).
        truth: optional landmark file of the same image (``.lml``, VerSe ctd, JSON/CSV in LPS
            mm): the picture shows it in blue and the summary gets the errors.
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
        infer: tiling stride, batch size, threshold and ``min_votes``; default: the
            checkpoint's own ``cfg.infer``.

    Returns a JSON-serialisable summary: the files, ``case_id``, ``tiles``, ``votes``,
    ``seconds``, ``predicted`` (names), ``vertebrae`` (per class: ``name``, ``xyz_mm`` LPS,
    ``index_xyz`` original continuous voxel index, ``probability``, ``votes``), ``not_written``
    (classes the format cannot hold), and with ``truth``: ``errors_mm`` per class and the paper's
    figures (``loc_error_mm_mean``, ``loc_error_mm_std``, ``id_rate``, ``n_truth``, ``n_matched``).
    """
    from vertstudy.infer.whole import predict_case

    t0 = time.perf_counter()
    fmt = check_format(fmt)
    out = check_output_path(Path(out), "--out")
    png = None if png is None else check_output_path(Path(png), "--png")
    image = Path(image)
    if not image.exists():
        raise InputError(image, "image not found; expected an image file (NIfTI, NRRD, MHA) or a DICOM series folder")
    from vertstudy.model.prior import load_spine_prior

    model, cfg = load_checkpoint_model(Path(checkpoint), device)
    case = read_image_case(image, None if truth is None else Path(truth))
    prediction = predict_case(model, cfg, case, infer, load_spine_prior(Path(checkpoint)))

    summary = _summary(image, checkpoint, out, fmt, png, case, prediction)
    if fmt == "verse":
        entries, left_out = verse_ctd_entries(prediction, case.image)
        text = json.dumps(entries) + "\n"
        summary["not_written"] = left_out
    else:
        text = json.dumps(slicer_markups(prediction, name=f"{case.case_id} vertebrae"), indent=1) + "\n"

    errors: dict[str, float] = {}
    if truth is not None:
        errors, figures = truth_errors(prediction, case)
        summary["truth"] = str(truth)
        summary["errors_mm"] = errors
        for key in ("loc_error_mm_mean", "loc_error_mm_std", "id_rate", "n_truth", "n_matched"):
            summary[key] = figures[key]
    if png is not None:
        title = f"{case.case_id}: {len(prediction.vertebrae)} predicted (red)"
        if truth is not None:
            mean = summary["loc_error_mm_mean"]
            mean_text = "n/a" if math.isnan(mean) else f"{mean:.1f} mm"
            title += f", truth blue; mean error {mean_text}, id rate {summary['id_rate']:.2f}"
        render_prediction_png(prediction, png, title, case if truth is not None else None, errors)
    atomic_write_text(out, text)
    summary["seconds"] = round(time.perf_counter() - t0, 3)
    return summary


def _summary(image: Path, checkpoint: Path, out: Path, fmt: str, png: Path | None, case: Case, prediction) -> dict:
    """The JSON-serialisable summary of one prediction (see :func:`predict`), before truth and timing."""
    return {
        "image": str(image),
        "checkpoint": str(checkpoint),
        "out": str(out),
        "format": fmt,
        "png": None if png is None else str(png),
        "case_id": case.case_id,
        "tiles": prediction.tiles,
        "votes": prediction.votes,
        "loc_only_model": prediction.loc_only,
        "predicted": [v.name for v in prediction.vertebrae],
        "n_predicted": len(prediction.vertebrae),
        "vertebrae": [
            {
                "name": v.name,
                "xyz_mm": [round(c, 4) for c in v.xyz_mm],
                "index_xyz": [round(c, 4) for c in v.index_xyz],
                "probability": _opt_round(v.probability),
                "votes": v.votes,
            }
            for v in prediction.vertebrae
        ],
        "not_written": [],
    }


def format_summary(summary: dict) -> str:
    """A few readable lines of a :func:`predict` summary (for the CLI)."""
    lines = [
        f"{summary['case_id']}: {summary['n_predicted']} vertebrae predicted "
        f"({', '.join(summary['predicted']) or 'none'}) from {summary['tiles']} tiles "
        f"in {summary['seconds']:.1f} s",
        f"wrote {summary['out']} ({summary['format']})" + (f" and {summary['png']}" if summary["png"] else ""),
    ]
    if summary["not_written"]:
        lines.append(f"not in the {summary['format']} file (no label in that format): "
                     f"{', '.join(summary['not_written'])}")
    if "errors_mm" in summary:
        mean = summary["loc_error_mm_mean"]
        lines.append(
            f"vs truth: {summary['n_matched']}/{summary['n_truth']} matched, mean error "
            f"{'n/a' if math.isnan(mean) else f'{mean:.1f} mm'}, id rate {summary['id_rate']:.2f}"
        )
    return "\n".join(lines)
