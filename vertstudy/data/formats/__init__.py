"""Readers and writers of the input formats, behind one API.

Formats (``FORMATS``):

- ``csi2014``: ``<id>.nii[.gz]`` + ``<id>.lml`` (CSI 2014 / SpineWeb); see :mod:`.csi2014` for the
  ``.lml`` coordinate conventions (``lps``, ``ras``, ``index_mm``) and how an undeclared file is
  resolved.
- ``verse``: VerSe 2019/2020 BIDS names, ``*_ct.nii.gz`` + ``*_ctd.json`` (points in voxel units of
  the image reoriented to the file's axis codes); see :mod:`.verse`.
- ``generic``: any single image SimpleITK reads (NIfTI, NRRD, MHA) or a DICOM series folder, with
  centroids in LPS mm from JSON or CSV; see :mod:`.generic`.

Every reader returns a :class:`~vertstudy.data.case.Case` whose landmarks are ITK/LPS physical
points in mm, (x, y, z) order, each checked to lie inside the image. Every failure is an
:class:`~vertstudy.errors.InputError` naming the file.

A :class:`CaseRef` is what discovery finds: the files of one case, not yet read. A case whose
landmark file is missing (``landmarks is None``) is still listed by ``csi2014`` and ``verse``
discovery, so the missing file is reported as a bad case by :func:`read_case` instead of being
skipped silently; the ``generic`` reader returns such a case with no landmarks (prediction input).
"""

from __future__ import annotations

import importlib
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from vertstudy.data.case import Case, Landmark
from vertstudy.data.io import check_points_inside
from vertstudy.errors import InputError

FORMATS: tuple[str, ...] = ("csi2014", "verse", "generic")


@dataclass(frozen=True)
class CaseRef:
    """The files of one case as discovery found them.

    Attributes:
        case_id: stable identifier (file stem or subject id), unique within one discovery.
        fmt: the format that reads it, one of ``FORMATS``.
        image: image file, or DICOM series folder (``generic``).
        landmarks: landmark file, or ``None`` when none was found.
        tags: optional ``tags`` JSON file (an object of string values), or ``None``.
    """

    case_id: str
    fmt: str
    image: Path
    landmarks: Path | None
    tags: Path | None = None


def _module(fmt: str):
    if fmt not in FORMATS:
        raise InputError(None, f"unknown format {fmt!r}; accepted: {', '.join(FORMATS)} or 'auto'")
    return importlib.import_module(f"vertstudy.data.formats.{fmt}")


def discover(root: str | Path, fmt: str = "auto") -> list[CaseRef]:
    """List the cases under ``root`` (searched recursively), sorted by case id.

    ``fmt="auto"`` detects the format: ``verse`` if the folder holds ``*_ctd.json`` or
    ``*_ct.nii[.gz]`` files, else ``csi2014`` if it holds ``*.lml`` files, else ``generic`` if it
    holds any image or DICOM series. Raises ``InputError`` naming ``root`` when it is missing or
    holds no case.
    """
    root = Path(root)
    if not root.exists():
        raise InputError(root, "folder not found")
    if not root.is_dir():
        raise InputError(root, "not a folder; discover() needs a data set folder (use read_any for one image)")
    if fmt == "auto":
        fmt = _detect(root)
    refs = _module(fmt).discover(root)
    if not refs:
        raise InputError(root, f"no {fmt} case found in this folder")
    return refs


def _detect(root: Path) -> str:
    from vertstudy.data.formats import csi2014, generic, verse

    for name, module in (("verse", verse), ("csi2014", csi2014), ("generic", generic)):
        if module.looks_like(root):
            return name
    raise InputError(
        root,
        "holds no case of a known format; expected CSI 2014 (<id>.nii.gz + <id>.lml), VerSe "
        "(*_ct.nii.gz + *_ctd.json), or images (NIfTI, NRRD, MHA, DICOM series) with centroids JSON/CSV",
    )


def read_case(ref: CaseRef) -> Case:
    """Read one discovered case with the reader of ``ref.fmt``."""
    return _module(ref.fmt).read_case(ref)


def read_any(path: str | Path, landmarks: str | Path | None = None) -> Case:
    """Read one image file or DICOM series folder given directly (``data show``, ``predict``).

    The landmark file is ``landmarks`` when given (its format is recognised from its name and
    content: ``.lml`` -> csi2014, a JSON list starting with ``{"direction": ...}`` -> verse,
    other JSON/CSV -> generic); otherwise it is found by the rules of the formats, tried in the
    order verse, csi2014, generic. When none exists the case has no landmarks.
    """
    from vertstudy.data.formats import csi2014, generic, verse

    path = Path(path)
    if not path.exists():
        raise InputError(path, "file not found")
    if landmarks is not None:
        landmarks = Path(landmarks)
        if not landmarks.exists():
            raise InputError(landmarks, "landmark file not found")
        fmt = sniff_landmark_format(landmarks)
        ref = _module(fmt).ref_for(path)
        ref = CaseRef(ref.case_id, fmt, path, landmarks, ref.tags)
        return read_case(ref)
    for module in (verse, csi2014):
        ref = module.ref_for(path)
        if ref.landmarks is not None:
            return module.read_case(ref)
    return generic.read_case(generic.ref_for(path))


def sniff_landmark_format(path: Path) -> str:
    """Format of a landmark file from its name and content (``csi2014``, ``verse``, ``generic``)."""
    name = path.name.lower()
    if name.endswith(".lml"):
        return "csi2014"
    if name.endswith(".csv"):
        return "generic"
    if name.endswith(".json"):
        data = load_json(path)
        if isinstance(data, list) and data and isinstance(data[0], dict) and "direction" in data[0]:
            return "verse"
        return "generic"
    raise InputError(path, "unknown landmark file type; accepted: .lml (CSI 2014), *_ctd.json (VerSe), .json or .csv")


# --- helpers shared by the readers -------------------------------------------------------------


def landmark_text(path: Path, expected: str, kind: str = "file") -> str:
    """The text of a landmark, tags or JSON file: UTF-8 (a BOM is dropped). ``InputError`` naming
    the file when it is missing, empty, binary (NUL bytes) or not UTF-8, rather than reading
    garbage as a file with no landmarks. ``expected``: what the file should hold, for the message;
    ``kind``: what the messages call the file."""
    if not path.exists():
        raise InputError(path, f"{kind} not found")
    data = path.read_bytes()
    if b"\x00" in data:
        raise InputError(path, f"{kind} is binary (it holds NUL bytes), not text; expected UTF-8 text: {expected}")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InputError(path, f"{kind} is not UTF-8 text (byte {exc.start}: {data[exc.start:exc.start + 1]!r}); "
                         f"expected UTF-8 text: {expected}") from None
    if not text.strip():
        raise InputError(path, f"{kind} is empty; expected {expected}")
    return text


def load_json(path: Path):
    """Parse a JSON file; ``InputError`` naming it when missing, empty, not UTF-8 text or invalid."""
    text = landmark_text(path, "JSON")
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(path, f"invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None


def load_tags(path: Path | None) -> dict[str, str]:
    """Read a tags file: a JSON object whose values become strings. ``None`` -> ``{}``."""
    if path is None:
        return {}
    data = load_json(path)
    if not isinstance(data, dict):
        raise InputError(path, f"tags file must hold a JSON object of strings, got {type(data).__name__}")
    return {str(k): str(v) for k, v in data.items()}


def tags_json(tags: dict[str, str]) -> str:
    """Serialise tags for writing (sorted keys, stable text)."""
    return json.dumps({str(k): str(v) for k, v in tags.items()}, indent=1, sort_keys=True) + "\n"


def finish_case(
    ref: CaseRef,
    image: sitk.Image,
    landmarks: list[Landmark],
    extra: Counter,
    tags: dict[str, str],
    fmt: str | None = None,
) -> Case:
    """Check every landmark lies inside ``image`` and assemble the :class:`Case`."""
    if landmarks:
        points = np.array([lm.xyz_mm for lm in landmarks], dtype=np.float64)
        check_points_inside(image, points, [lm.name for lm in landmarks], ref.landmarks or ref.image)
    sources = [p for p in (ref.image, ref.landmarks, ref.tags) if p is not None]
    return Case(
        case_id=ref.case_id,
        image=image,
        landmarks=landmarks,
        sources=sources,
        fmt=fmt or ref.fmt,
        extra_labels=extra,
        tags=tags,
    )


def unique_ids(items: list[tuple[str, Path]], root: Path) -> list[str]:
    """Case ids for (id, path) pairs: the id itself when unique, else prefixed by the folders of
    ``path`` relative to ``root`` joined with ``__`` (so ids stay usable as file names)."""
    counts = Counter(case_id for case_id, _ in items)
    out = []
    for case_id, path in items:
        if counts[case_id] > 1:
            try:
                parts = path.parent.relative_to(root).parts
            except ValueError:
                parts = path.parent.parts[-1:]
            case_id = "__".join([*parts, case_id]) if parts else case_id
        out.append(case_id)
    return out


def is_hidden(path: Path, root: Path) -> bool:
    """True when ``path`` or a folder between ``root`` and it starts with a dot (temporary files)."""
    try:
        parts = path.relative_to(root).parts
    except ValueError:
        parts = (path.name,)
    return any(p.startswith(".") for p in parts)


def check_case_id(case_id: str) -> str:
    """A case id usable as a file name: non-empty, no path separators."""
    if not case_id or "/" in case_id or "\\" in case_id or case_id in (".", ".."):
        raise InputError(None, f"case id {case_id!r} cannot be used as a file name")
    return case_id
