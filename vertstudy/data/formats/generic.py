"""Generic format: any single image SimpleITK reads, or a DICOM series folder, with centroids
in ITK/LPS millimetres from JSON or CSV.

Images: NIfTI (``.nii``, ``.nii.gz``), NRRD (``.nrrd``, ``.nhdr``), MetaImage (``.mha``,
``.mhd``), or a folder holding one DICOM series (the largest series is read; ``Case.fmt`` is
then ``"dicom"``).

Centroids, (x, y, z) ITK/LPS physical mm, as SimpleITK reports points:
    JSON, either a list ``[{"label": "L1", "x": .., "y": .., "z": ..}, ...]`` or an object
    ``{"centroids": [{"label": "S1", "xyz_lps_mm": [x, y, z]}, ...]}`` (the form of
    TotalSegmentator-derived files; other keys such as ``index_xyz`` are ignored). Entries of
    either form may use either way of giving the point.
    CSV with the header ``label,x,y,z`` (case-insensitive; other columns ignored).
Labels are names (``L1``, ``T12_center``...); L6, T13 and Co are counted in ``extra_labels``.

Which centroid file belongs to an image (first found wins):
    image file ``<stem>.<ext>``: ``<stem>.json``, ``<stem>.csv``, ``<stem>_centroids.json``,
    ``<stem>_centroids.csv`` beside it; then ``centroids.json`` / ``centroids.csv`` beside it when
    it is the only image in its folder.
    DICOM folder ``D``: ``D.json``, ``D.csv`` beside it; then ``centroids.json`` /
    ``centroids.csv`` inside it.
An image without a centroid file is read with no landmarks (prediction input). Optional tags:
``<stem>.tags.json`` beside the image (DICOM: ``D.tags.json`` beside it or ``tags.json`` inside).
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

from vertstudy.anatomy import EXTRA_NAMES, NAMES, parse_name
from vertstudy.data.case import Case, make_landmarks
from vertstudy.data.formats import CaseRef, finish_case, is_hidden, landmark_text, load_json, load_tags, unique_ids
from vertstudy.data.io import has_image_suffix, read_image, strip_image_suffix
from vertstudy.errors import InputError

FMT = "generic"
_ACCEPTED = f"accepted: {', '.join(NAMES)}, extras {', '.join(EXTRA_NAMES)} (optional suffix like '_center')"
_JSON_EXPECTED = (
    'expected a list of {"label": "L1", "x": .., "y": .., "z": ..} or '
    '{"centroids": [{"label": "L1", "xyz_lps_mm": [x, y, z]}, ...]}'
)
_CENTROID_FILES = ("centroids.json", "centroids.csv")

Point = tuple[float, float, float]


# --- discovery ---------------------------------------------------------------------------------


def is_dicom_folder(folder: Path, probe: int = 20) -> bool:
    """True when ``folder`` directly holds DICOM files (``.dcm`` or the ``DICM`` preamble)."""
    if not folder.is_dir():
        return False
    checked = 0
    for path in folder.iterdir():
        if not path.is_file() or path.name.startswith("."):
            continue
        if path.suffix.lower() == ".dcm":
            return True
        if path.suffix.lower() in ("", ".ima"):
            with path.open("rb") as f:
                if f.read(132)[128:132] == b"DICM":
                    return True
        checked += 1
        if checked >= probe:
            break
    return False


def _images_in(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and has_image_suffix(p)]


def find_centroids(image: Path) -> Path | None:
    """The centroid file of an image file or DICOM folder by the rules above, or ``None``."""
    image = Path(image)
    if image.is_dir():
        names = [image.parent / f"{image.name}{ext}" for ext in (".json", ".csv")]
        names += [image / n for n in _CENTROID_FILES]
    else:
        stem = strip_image_suffix(image.name)
        names = [image.with_name(f"{stem}{s}") for s in (".json", ".csv", "_centroids.json", "_centroids.csv")]
        if image.parent.is_dir() and len(_images_in(image.parent)) == 1:
            names += [image.with_name(n) for n in _CENTROID_FILES]
    return next((p for p in names if p.is_file()), None)


def _find_tags(image: Path) -> Path | None:
    if image.is_dir():
        names = [image.parent / f"{image.name}.tags.json", image / "tags.json"]
    else:
        names = [image.with_name(f"{strip_image_suffix(image.name)}.tags.json")]
    return next((p for p in names if p.is_file()), None)


def _case_id(image: Path) -> str:
    return image.name if image.is_dir() else strip_image_suffix(image.name)


def ref_for(image: Path) -> CaseRef:
    """The case of one image file or DICOM folder, with its centroid and tags files if present."""
    image = Path(image)
    return CaseRef(_case_id(image), FMT, image, find_centroids(image), _find_tags(image))


def _candidates(root: Path) -> list[Path]:
    found = []
    dicom_dirs = [root] if is_dicom_folder(root) else []
    dicom_dirs += [d for d in sorted(root.rglob("*")) if d.is_dir() and not is_hidden(d, root) and is_dicom_folder(d)]
    found += dicom_dirs
    for path in sorted(root.rglob("*")):
        if path.is_file() and has_image_suffix(path) and not is_hidden(path, root):
            if not any(d in path.parents for d in dicom_dirs):
                found.append(path)
    return found


def looks_like(root: Path) -> bool:
    """True when ``root`` holds an image file or a DICOM series folder."""
    return bool(_candidates(root))


def discover(root: Path) -> list[CaseRef]:
    """Every image file and DICOM folder under ``root``, with its centroids if present."""
    root = Path(root)
    images = _candidates(root)
    ids = unique_ids([(_case_id(p), p) for p in images], root)
    refs = [CaseRef(case_id, FMT, p, find_centroids(p), _find_tags(p)) for case_id, p in zip(ids, images)]
    return sorted(refs, key=lambda r: r.case_id)


# --- reading -----------------------------------------------------------------------------------


def _name(raw, path: Path, where: str) -> str:
    name = parse_name(raw) if isinstance(raw, str) else None
    if name is None:
        raise InputError(path, f"{where}: unknown label {raw!r}; {_ACCEPTED}")
    return name


def _point(values, path: Path, where: str, expected: str) -> Point:
    try:
        xyz = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise InputError(path, f"{where}: coordinates {values!r} are not numbers; {expected}") from None
    if len(xyz) != 3 or not all(math.isfinite(v) for v in xyz):
        raise InputError(path, f"{where}: coordinates {values!r} are not three finite numbers; {expected}")
    return xyz  # type: ignore[return-value]


def parse_centroids_json(path: Path) -> list[tuple[str, Point]]:
    """(canonical name, LPS (x, y, z) mm) points of a centroid JSON file."""
    data = load_json(path)
    entries = data.get("centroids") if isinstance(data, dict) else data
    if not isinstance(entries, list):
        raise InputError(path, f"not a centroid file; {_JSON_EXPECTED}")
    out = []
    for k, entry in enumerate(entries):
        where = f"entry {k}"
        if not isinstance(entry, dict) or "label" not in entry:
            raise InputError(path, f"{where}: malformed centroid {entry!r}; {_JSON_EXPECTED}")
        if "xyz_lps_mm" in entry:
            values = entry["xyz_lps_mm"]
        elif {"x", "y", "z"} <= set(entry):
            values = [entry["x"], entry["y"], entry["z"]]
        else:
            raise InputError(path, f"{where}: centroid {entry!r} has no coordinates; {_JSON_EXPECTED}")
        out.append((_name(entry["label"], path, where), _point(values, path, where, _JSON_EXPECTED)))
    return out


def parse_centroids_csv(path: Path) -> list[tuple[str, Point]]:
    """(canonical name, LPS (x, y, z) mm) points of a centroid CSV file with header ``label,x,y,z``."""
    expected = "expected a CSV with header 'label,x,y,z' and one row per vertebra, e.g. 'L1,12.5,-40.0,210.3'"
    text = landmark_text(path, expected.removeprefix("expected "))
    reader = csv.reader(text.splitlines())
    header = [h.strip().lower() for h in next(reader)]
    if not {"label", "x", "y", "z"} <= set(header):
        raise InputError(path, f"line 1: header {','.join(header)!r} lacks label,x,y,z; {expected}")
    col = {h: header.index(h) for h in ("label", "x", "y", "z")}
    out = []
    for row in reader:
        where = f"line {reader.line_num}"
        if not any(cell.strip() for cell in row):
            continue
        if len(row) < len(header):
            raise InputError(path, f"{where}: malformed row {','.join(row)!r}; {expected}")
        name = _name(row[col["label"]].strip(), path, where)
        out.append((name, _point([row[col[a]] for a in "xyz"], path, where, expected)))
    return out


def read_centroids(path: Path) -> list[tuple[str, Point]]:
    """Points of a JSON or CSV centroid file (by suffix)."""
    path = Path(path)
    if not path.exists():
        raise InputError(path, "centroid file not found")
    if path.stat().st_size == 0:
        raise InputError(path, "centroid file is empty")
    if path.suffix.lower() == ".csv":
        return parse_centroids_csv(path)
    if path.suffix.lower() == ".json":
        return parse_centroids_json(path)
    raise InputError(path, "unknown centroid file type; accepted: .json or .csv")


def read_case(ref: CaseRef) -> Case:
    """Read the image (file or DICOM folder) and, if ``ref.landmarks``, its centroids."""
    image = read_image(ref.image)
    named = read_centroids(ref.landmarks) if ref.landmarks is not None else []
    landmarks, extra = make_landmarks(named, ref.landmarks or ref.image)
    fmt = "dicom" if Path(ref.image).is_dir() else FMT
    return finish_case(ref, image, landmarks, extra, load_tags(ref.tags), fmt=fmt)
