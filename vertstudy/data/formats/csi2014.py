"""CSI 2014 / SpineWeb format: ``<id>.nii[.gz]`` beside ``<id>.lml``.

Files:
    ``<id>.nii`` or ``<id>.nii.gz``: the CT in HU.
    ``<id>.lml``: a header line, then one landmark per line, tab-separated
    ``id  name  x  y  z`` (``id`` is ignored; ``name`` like ``T12`` or ``T12_center``; ``x y z`` in
    mm). Blank lines, ``#`` comment lines and trailing whitespace are tolerated; any other line
    that is not five fields with three numbers is an error naming the file and line.
    ``<id>.tags.json`` (optional): the case's tags, a JSON object of strings.

Coordinate conventions of the ``.lml`` points (x, y, z), ``CONVENTIONS``:
    ``lps``: ITK/LPS physical millimetres, as SimpleITK reports them.
    ``ras``: RAS physical millimetres: LPS with x and y negated.
    ``index_mm``: continuous voxel index times spacing, along the image's own index axes
    (x = i * sx, y = j * sy, z = k * sz); origin and direction are ignored. This is what
    Glocker's tools used for the original CSI 2014 data, as far as we know.

The convention of real CSI 2014 files is not documented with the data, so it is handled
explicitly: a header line may declare it, e.g. ``#LML vertstudy convention=lps`` (our writer
always declares ``lps``). A file without a declaration is resolved against the image geometry:
the conventions under which every point lies inside the image are candidates, preferred in the
order ``index_mm``, ``lps``, ``ras``; when none fits, ``InputError`` names the file and, per
convention, the first point outside the image. The convention used is recorded in
``case.tags["lml_convention"]``, how it was chosen in ``case.tags["lml_convention_source"]``
(``declared`` or ``auto``) and, for ``auto``, all candidates in
``case.tags["lml_convention_candidates"]`` (comma-separated), so an ambiguous resolution is visible.

Discovery: every ``.nii[.gz]`` and every ``.lml`` under the root (recursively, hidden files
skipped), paired by stem within a folder. An image without ``.lml`` (or an ``.lml`` without
image) is still listed, and reading it raises ``InputError``: a bad case, never skipped silently.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from vertstudy.anatomy import EXTRA_NAMES, INDEX, NAMES, parse_name
from vertstudy.atomic import atomic_write_text
from vertstudy.data.case import Case, Landmark, make_landmarks
from vertstudy.data.formats import (
    CaseRef,
    check_case_id,
    finish_case,
    is_hidden,
    landmark_text,
    load_tags,
    tags_json,
    unique_ids,
)
from vertstudy.data.io import read_image, write_image
from vertstudy.errors import InputError

FMT = "csi2014"
CONVENTIONS: tuple[str, ...] = ("index_mm", "lps", "ras")  # in order of preference
_DECL_RE = re.compile(r"convention\s*=\s*([A-Za-z_]+)")
_NII = (".nii.gz", ".nii")
_EXPECTED_LINE = "'<id><TAB><name><TAB><x><TAB><y><TAB><z>', e.g. '20\\tL1_center\\t12.5\\t-40.0\\t210.3'"
_ACCEPTED = f"accepted: {', '.join(NAMES)}, extras {', '.join(EXTRA_NAMES)} (optional suffix like '_center')"

Point = tuple[float, float, float]


# --- discovery ---------------------------------------------------------------------------------


def _nii_stem(path: Path) -> str | None:
    name = path.name
    for suffix in _NII:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return None


def looks_like(root: Path) -> bool:
    """True when ``root`` holds at least one ``.lml`` file."""
    return any(not is_hidden(p, root) for p in root.rglob("*.lml"))


def ref_for(image: Path) -> CaseRef:
    """The case of one image file: its ``<id>.lml`` and ``<id>.tags.json`` beside it, if present."""
    image = Path(image)
    stem = _nii_stem(image) or image.stem
    lml = image.with_name(f"{stem}.lml")
    tags = image.with_name(f"{stem}.tags.json")
    return CaseRef(stem, FMT, image, lml if lml.is_file() else None, tags if tags.is_file() else None)


def discover(root: Path) -> list[CaseRef]:
    """All cases under ``root``, sorted by case id; unpaired files are listed, see module doc."""
    root = Path(root)
    by_key: dict[tuple[Path, str], dict[str, Path]] = {}
    for path in sorted(root.rglob("*")):
        if not path.is_file() or is_hidden(path, root):
            continue
        stem = _nii_stem(path)
        kind = "image"
        if stem is None and path.suffix.lower() == ".lml":
            stem, kind = path.stem, "lml"
        if stem is None:
            continue
        entry = by_key.setdefault((path.parent, stem), {})
        if kind in entry:  # both <id>.nii and <id>.nii.gz: ambiguous
            raise InputError(path, f"two images for case {stem!r} ({entry[kind].name} and {path.name}); keep one")
        entry[kind] = path
    keys = sorted(by_key)
    ids = unique_ids([(stem, folder / stem) for folder, stem in keys], root)
    refs = []
    for case_id, (folder, stem) in zip(ids, keys):
        entry = by_key[(folder, stem)]
        image = entry.get("image", folder / f"{stem}.nii.gz")
        tags = folder / f"{stem}.tags.json"
        refs.append(CaseRef(case_id, FMT, image, entry.get("lml"), tags if tags.is_file() else None))
    return sorted(refs, key=lambda r: r.case_id)


# --- reading -----------------------------------------------------------------------------------


def parse_lml(path: Path) -> tuple[str | None, list[tuple[int, str, Point]]]:
    """Parse an ``.lml`` file without interpreting coordinates.

    Returns ``(declared convention or None, [(line number, canonical name, (x, y, z)), ...])``.
    Raises ``InputError`` naming the file and line on a malformed line, an unknown label or an
    unknown declared convention.
    """
    path = Path(path)
    text = landmark_text(path, "a header line and one landmark per line", "landmark file")
    convention: str | None = None
    points: list[tuple[int, str, Point]] = []
    first = True
    for line_no, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line:
            continue
        is_first, first = first, False
        fields = _fields(line)
        if line.startswith("#") or (is_first and fields is None):
            convention = _declared(line, path, line_no) or convention
            continue
        if fields is None:
            raise InputError(
                path, f"line {line_no}: malformed landmark line {raw.rstrip()!r}; expected {_EXPECTED_LINE}"
            )
        raw_name, xyz = fields
        name = parse_name(raw_name)
        if name is None:
            raise InputError(path, f"line {line_no}: unknown label {raw_name!r}; {_ACCEPTED}")
        points.append((line_no, name, xyz))
    if not points:
        raise InputError(path, f"landmark file holds no landmark line; expected one per line after the header: "
                         f"{_EXPECTED_LINE}")
    return convention, points


def _fields(line: str) -> tuple[str, Point] | None:
    parts = [p.strip() for p in line.split("\t")]
    if len(parts) != 5:
        parts = line.split()
    if len(parts) != 5:
        return None
    try:
        xyz = tuple(float(v) for v in parts[2:])
    except ValueError:
        return None
    if not all(np.isfinite(xyz)):
        return None
    return parts[1], xyz  # type: ignore[return-value]


def _declared(line: str, path: Path, line_no: int) -> str | None:
    m = _DECL_RE.search(line)
    if not m:
        return None
    convention = m.group(1).lower()
    if convention not in CONVENTIONS:
        raise InputError(
            path, f"line {line_no}: unknown coordinate convention {convention!r}; accepted: {', '.join(CONVENTIONS)}"
        )
    return convention


def to_lps(xyz: Point, convention: str, image: sitk.Image) -> Point:
    """One ``.lml`` point (x, y, z) under ``convention`` -> ITK/LPS physical (x, y, z) mm."""
    x, y, z = (float(v) for v in xyz)
    if convention == "lps":
        return (x, y, z)
    if convention == "ras":
        return (-x, -y, z)
    if convention == "index_mm":
        sx, sy, sz = image.GetSpacing()
        return tuple(image.TransformContinuousIndexToPhysicalPoint((x / sx, y / sy, z / sz)))  # type: ignore[return-value]
    raise ValueError(f"unknown convention {convention!r}")


def from_lps(xyz_mm: Point, convention: str, image: sitk.Image) -> Point:
    """Inverse of :func:`to_lps`: ITK/LPS (x, y, z) mm -> ``.lml`` (x, y, z) under ``convention``."""
    x, y, z = (float(v) for v in xyz_mm)
    if convention == "lps":
        return (x, y, z)
    if convention == "ras":
        return (-x, -y, z)
    if convention == "index_mm":
        idx = image.TransformPhysicalPointToContinuousIndex((x, y, z))
        return tuple(float(i * s) for i, s in zip(idx, image.GetSpacing()))  # type: ignore[return-value]
    raise ValueError(f"unknown convention {convention!r}")


def _fmt(values) -> str:
    return "(" + ", ".join(f"{float(v):.1f}" for v in values) + ")"


def _first_outside(image: sitk.Image, points: list[tuple[str, Point]]) -> str | None:
    size = np.array(image.GetSize(), dtype=np.float64)
    for name, p in points:
        idx = np.array(image.TransformPhysicalPointToContinuousIndex(p))
        if (idx < -0.5).any() or (idx > size - 0.5).any():
            return f"{name} at LPS {_fmt(p)} mm (voxel {_fmt(idx)})"
    return None


def resolve_convention(
    path: Path, declared: str | None, named: list[tuple[str, Point]], image: sitk.Image
) -> tuple[str, list[str]]:
    """The convention to use and the candidates (conventions under which all points are inside).

    A declared convention is used as is (points are then checked like any reader's).
    """
    if declared is not None:
        return declared, [declared]
    candidates, reasons = [], []
    for convention in CONVENTIONS:
        outside = _first_outside(image, [(n, to_lps(p, convention, image)) for n, p in named])
        if outside is None:
            candidates.append(convention)
        else:
            reasons.append(f"{convention}: {outside}")
    if not candidates:
        raise InputError(
            path,
            f"no coordinate convention puts every landmark inside the image of size {image.GetSize()} "
            f"(first point outside per convention: {'; '.join(reasons)}); declare one in the header, "
            f"e.g. '#LML convention=lps' (accepted: {', '.join(CONVENTIONS)})",
        )
    return candidates[0], candidates


def read_lml(path: Path, image: sitk.Image) -> tuple[list[Landmark], Counter, dict[str, str]]:
    """Landmarks (LPS mm), extra-label counts and convention tags of an ``.lml`` for ``image``."""
    path = Path(path)
    declared, parsed = parse_lml(path)
    named = [(name, xyz) for _, name, xyz in parsed]
    convention, candidates = resolve_convention(path, declared, named, image)
    lps = [(name, to_lps(xyz, convention, image)) for name, xyz in named]
    landmarks, extra = make_landmarks(lps, path)
    tags = {
        "lml_convention": convention,
        "lml_convention_source": "declared" if declared else "auto",
    }
    if not declared:
        tags["lml_convention_candidates"] = ",".join(candidates)
    return landmarks, extra, tags


def read_case(ref: CaseRef) -> Case:
    """Read a CSI 2014 case; ``InputError`` when its ``.lml`` (or image) is missing or bad."""
    if ref.landmarks is None:
        raise InputError(
            ref.image, f"no landmark file: expected {ref.case_id}.lml beside the image (CSI 2014 needs both files)"
        )
    image = read_image(ref.image)
    tags = load_tags(ref.tags)
    landmarks, extra, lml_tags = read_lml(ref.landmarks, image)
    tags.update(lml_tags)
    return finish_case(ref, image, landmarks, extra, tags)


# --- writing -----------------------------------------------------------------------------------


def lml_text(points: list[tuple[str, Point]], image: sitk.Image, convention: str = "lps", declare: bool = True) -> str:
    """Text of an ``.lml`` file for (canonical name, LPS (x, y, z) mm) points.

    ``declare=False`` writes a plain header without the convention (as real CSI files have);
    names are written as ``<name>_center``; the ``id`` column is the class index + 1 (extras: 0).
    """
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown convention {convention!r}; accepted: {CONVENTIONS}")
    header = f"#LML vertstudy convention={convention}" if declare else "#LML landmarks"
    lines = [header]
    for name, xyz in points:
        x, y, z = from_lps(xyz, convention, image)
        lines.append(f"{INDEX.get(name, -1) + 1}\t{name}_center\t{x:.6f}\t{y:.6f}\t{z:.6f}")
    return "\n".join(lines) + "\n"


def write_case(case: Case, out_dir: Path) -> list[Path]:
    """Write ``case`` as ``<id>.nii.gz``, ``<id>.lml`` (convention=lps, declared) and ``<id>.tags.json``.

    All files are written atomically. Tags starting with ``lml_`` (set by the reader) are not
    written. Extra labels (L6, T13, Co) are not written: ``Case`` keeps only their counts.
    Returns the written paths (image, lml, tags).
    """
    out_dir = Path(out_dir)
    case_id = check_case_id(case.case_id)
    image_path = write_image(case.image, out_dir / f"{case_id}.nii.gz")
    points = [(lm.name, lm.xyz_mm) for lm in case.landmarks]
    lml_path = atomic_write_text(out_dir / f"{case_id}.lml", lml_text(points, case.image, "lps"))
    tags = {k: v for k, v in case.tags.items() if not k.startswith("lml_")}
    tags_path = atomic_write_text(out_dir / f"{case_id}.tags.json", tags_json(tags))
    return [image_path, lml_path, tags_path]
