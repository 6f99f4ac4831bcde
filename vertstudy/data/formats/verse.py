"""VerSe 2019/2020 format: BIDS-named ``*_ct.nii.gz`` + ``*_ctd.json``.

Names (both styles): VerSe 2019 ``sub-verse004_ct.nii.gz`` + ``sub-verse004_seg-subreg_ctd.json``;
VerSe 2020 ``sub-gl003_dir-ax_ct.nii.gz`` + ``sub-gl003_dir-ax_seg-subreg_ctd.json``; a ctd named
``<prefix>_ctd.json`` is accepted too. Image and ctd may share a folder or be split into
``rawdata/sub-X/`` and ``derivatives/sub-X/``. The case id is the prefix without ``sub-``.
Optional tags: ``<prefix>_tags.json`` beside the ctd or the image.

The ctd file is a JSON list. Its first entry gives nibabel-style axis codes, e.g.
``{"direction": ["P", "I", "R"]}``: letter ``j`` is the RAS+ world direction voxel axis ``j``
points TO (R, A, S positive; L, P, I negative; ITK/LPS flips x and y relative to RAS). The other
entries are ``{"label": int, "X": float, "Y": float, "Z": float}``: a continuous voxel index
(voxel centres at integers) of the image reoriented to those axis codes. The reader maps each
point to the image's own voxel axes (axis permutation, and ``c -> size - 1 - c`` on a flipped
axis; the image's axis codes are those of the closest axis-aligned orientation of its direction
matrix, as nibabel's ``io_orientation`` does), then to ITK/LPS mm with
``TransformContinuousIndexToPhysicalPoint``.

Labels (:data:`vertstudy.anatomy.VERSE_TO_NAME`): 1-7 C1-C7, 8-19 T1-T12, 20-24 L1-L5, 26 sacrum
-> S1; 25 (L6), 27 (coccyx) and 28 (T13) are counted in ``Case.extra_labels``, never relabelled.

Discovery: every ``*_ct.nii[.gz]`` and every ``*_ctd.json`` under the root (recursively, hidden
files skipped), paired by prefix. An unpaired file is still listed, and reading it raises
``InputError``: a bad case, never skipped silently.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from vertstudy.anatomy import INDEX, VERSE_TO_NAME, parse_verse_label
from vertstudy.atomic import atomic_write_text
from vertstudy.data.case import Case, Landmark, make_landmarks
from vertstudy.data.formats import (
    CaseRef,
    check_case_id,
    finish_case,
    is_hidden,
    load_json,
    load_tags,
    tags_json,
    unique_ids,
)
from vertstudy.data.io import check_points_inside, read_image, strip_image_suffix, write_image
from vertstudy.errors import InputError

FMT = "verse"
_CT_SUFFIXES = ("_ct.nii.gz", "_ct.nii")
_CTD_SUFFIX = "_ctd.json"
# axis code -> (world axis in RAS order, sign)
_CODES: dict[str, tuple[int, int]] = {"R": (0, 1), "L": (0, -1), "A": (1, 1), "P": (1, -1), "S": (2, 1), "I": (2, -1)}
_ACCEPTED_LABELS = "accepted VerSe labels: 1-24 (C1-L5), 25 (L6), 26 (sacrum -> S1), 27 (coccyx), 28 (T13)"
NAME_TO_VERSE: dict[str, int] = {name: label for label, name in VERSE_TO_NAME.items()}

Point = tuple[float, float, float]


# --- orientation -------------------------------------------------------------------------------


def axis_codes(image: sitk.Image) -> tuple[str, str, str]:
    """Nibabel-style axis codes of ``image``'s voxel axes (x, y, z), e.g. ``("P", "I", "R")``.

    Each voxel axis is matched to the world axis its direction cosine is closest to (greedy on
    the largest absolute cosine, so oblique images still get three distinct axes).
    """
    d = np.array(image.GetDirection(), dtype=np.float64).reshape(3, 3)  # column j = voxel axis j in LPS
    ras = d * np.array([[-1.0], [-1.0], [1.0]])
    remaining = np.abs(ras)
    codes: list[str] = [""] * 3
    for _ in range(3):
        world, axis = np.unravel_index(int(np.argmax(remaining)), remaining.shape)
        positive = ras[world, axis] > 0
        codes[axis] = "RAS"[world] if positive else "LPI"[world]
        remaining[world, :] = -1.0
        remaining[:, axis] = -1.0
    return tuple(codes)  # type: ignore[return-value]


def parse_axis_codes(value, path: Path) -> tuple[str, str, str]:
    """Validate axis codes from a ctd file (list of letters or a 3-letter string)."""
    letters = list(value) if isinstance(value, (list, tuple, str)) else []
    codes = tuple(str(c).upper() for c in letters)
    worlds = sorted(_CODES[c][0] for c in codes if c in _CODES)
    if len(codes) != 3 or worlds != [0, 1, 2]:
        raise InputError(
            path,
            f"first entry 'direction' {value!r} is not valid axis codes; expected three letters, one of "
            'R/L, one of A/P, one of S/I, e.g. ["P", "I", "R"]',
        )
    return codes  # type: ignore[return-value]


def _axis_map(codes: tuple[str, str, str], image: sitk.Image) -> list[tuple[int, int, bool]]:
    """For each ctd axis ``j``: (j, the image's own axis ``i`` along the same world axis, flipped?)."""
    own = axis_codes(image)
    out = []
    for j, code in enumerate(codes):
        world, sign = _CODES[code]
        i = next(k for k, c in enumerate(own) if _CODES[c][0] == world)
        out.append((j, i, _CODES[own[i]][1] != sign))
    return out


def ctd_to_index(xyz: Point, codes: tuple[str, str, str], image: sitk.Image) -> Point:
    """Point in voxel units of the image reoriented to ``codes`` -> continuous index (x, y, z)
    of ``image`` itself (permutation, and ``c -> size - 1 - c`` on a flipped axis)."""
    size = image.GetSize()
    index = [0.0, 0.0, 0.0]
    for j, i, flipped in _axis_map(codes, image):
        index[i] = size[i] - 1 - float(xyz[j]) if flipped else float(xyz[j])
    return tuple(index)  # type: ignore[return-value]


def index_to_ctd(index: Point, codes: tuple[str, str, str], image: sitk.Image) -> Point:
    """Inverse of :func:`ctd_to_index`."""
    size = image.GetSize()
    out = [0.0, 0.0, 0.0]
    for j, i, flipped in _axis_map(codes, image):
        out[j] = size[i] - 1 - float(index[i]) if flipped else float(index[i])
    return tuple(out)  # type: ignore[return-value]


# --- reading -----------------------------------------------------------------------------------


def parse_ctd(path: Path) -> tuple[tuple[str, str, str], list[tuple[int, str, Point]]]:
    """Parse a ctd file: ``(axis codes, [(entry number, canonical name, (X, Y, Z) voxels), ...])``.

    Entry numbers count from 0 (the direction entry). Raises ``InputError`` naming the file and
    entry on a malformed entry or an unknown label.
    """
    path = Path(path)
    data = load_json(path)
    if not isinstance(data, list) or not data or not isinstance(data[0], dict) or "direction" not in data[0]:
        raise InputError(
            path,
            'not a VerSe centroid file; expected a JSON list whose first entry is {"direction": ["P","I","R"]} '
            'followed by {"label": int, "X": float, "Y": float, "Z": float} entries',
        )
    codes = parse_axis_codes(data[0]["direction"], path)
    points = []
    for k, entry in enumerate(data[1:], start=1):
        label, xyz = _entry(entry, k, path)
        name = parse_verse_label(label)
        if name is None:
            raise InputError(path, f"entry {k}: unknown label {label}; {_ACCEPTED_LABELS}")
        points.append((k, name, xyz))
    return codes, points


def _entry(entry, k: int, path: Path) -> tuple[int, Point]:
    expected = 'expected {"label": int, "X": float, "Y": float, "Z": float}'
    if not isinstance(entry, dict) or not {"label", "X", "Y", "Z"} <= set(entry):
        raise InputError(path, f"entry {k}: malformed centroid {entry!r}; {expected}")
    label = entry["label"]
    try:
        xyz = tuple(float(entry[a]) for a in "XYZ")
        label_ok = not isinstance(label, bool) and float(label) == int(label)
    except (TypeError, ValueError):
        raise InputError(path, f"entry {k}: malformed centroid {entry!r}; {expected}") from None
    if not label_ok or not all(math.isfinite(v) for v in xyz):
        raise InputError(path, f"entry {k}: malformed centroid {entry!r}; {expected}")
    return int(label), xyz  # type: ignore[return-value]


def read_ctd(ctd_path: Path, reference_image: sitk.Image) -> tuple[list[Landmark], Counter]:
    """Landmarks (ITK/LPS mm) and extra-label counts of a ctd file, for the image it belongs to.

    ``reference_image`` only supplies the geometry, so a mask with the CT's geometry works too.
    Raises ``InputError`` when a point lies outside the image.
    """
    ctd_path = Path(ctd_path)
    codes, parsed = parse_ctd(ctd_path)
    named = []
    for _, name, xyz in parsed:
        index = ctd_to_index(xyz, codes, reference_image)
        named.append((name, tuple(reference_image.TransformContinuousIndexToPhysicalPoint(index))))
    landmarks, extra = make_landmarks(named, ctd_path)
    if named:
        check_points_inside(reference_image, np.array([p for _, p in named]), [n for n, _ in named], ctd_path)
    return landmarks, extra


def read_case(ref: CaseRef) -> Case:
    """Read a VerSe case; ``InputError`` when its ctd (or image) is missing or bad."""
    if ref.landmarks is None:
        raise InputError(
            ref.image,
            f"no centroid file: expected {_prefix(ref.image)}_seg-subreg_ctd.json beside the image or in the "
            "matching derivatives/ folder",
        )
    image = read_image(ref.image)
    landmarks, extra = read_ctd(ref.landmarks, image)
    return finish_case(ref, image, landmarks, extra, load_tags(ref.tags))


# --- discovery ---------------------------------------------------------------------------------


def _prefix(image: Path) -> str:
    name = image.name
    for suffix in _CT_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return strip_image_suffix(name)


def _ctd_prefix(ctd: Path) -> str:
    stem = ctd.name[: -len(_CTD_SUFFIX)]
    return stem.split("_seg-")[0]


def _case_id(prefix: str) -> str:
    return prefix[4:] if prefix.startswith("sub-") else prefix


def _mirror(folder: Path, src: str, dst: str) -> Path | None:
    parts = list(folder.parts)
    if src not in parts:
        return None
    i = len(parts) - 1 - parts[::-1].index(src)
    parts[i] = dst
    return Path(*parts)


def _pick(prefix: str, near: Path, candidates: list[Path], src: str, dst: str) -> Path | None:
    """Best match among same-prefix files: same folder, then the rawdata/derivatives mirror;
    ``_seg-subreg_ctd.json`` before other names."""
    mirror = _mirror(near, src, dst)

    def rank(p: Path) -> tuple[int, int, str]:
        where = 0 if p.parent == near else 1 if p.parent == mirror else 2
        return where, 0 if p.name == f"{prefix}_seg-subreg{_CTD_SUFFIX}" else 1, str(p)

    return min(candidates, key=rank) if candidates else None


def _tags_for(prefix: str, *folders: Path | None) -> Path | None:
    for folder in folders:
        if folder is not None and (folder / f"{prefix}_tags.json").is_file():
            return folder / f"{prefix}_tags.json"
    return None


def looks_like(root: Path) -> bool:
    """True when ``root`` holds a ``*_ctd.json`` or ``*_ct.nii[.gz]`` file."""
    for path in root.rglob("*"):
        low = path.name.lower()
        if (low.endswith(_CTD_SUFFIX) or low.endswith(_CT_SUFFIXES)) and not is_hidden(path, root):
            return True
    return False


def ref_for(image: Path) -> CaseRef:
    """The case of one image: its ctd and tags beside it or in the matching derivatives folder."""
    image = Path(image)
    prefix = _prefix(image)
    folders = [image.parent, _mirror(image.parent, "rawdata", "derivatives")]
    candidates = []
    for folder in folders:
        if folder is not None and folder.is_dir():
            candidates += [p for p in folder.glob(f"{prefix}_*ctd.json") if _ctd_prefix(p) == prefix]
    ctd = _pick(prefix, image.parent, candidates, "rawdata", "derivatives")
    tags = _tags_for(prefix, ctd.parent if ctd else None, *folders)
    return CaseRef(_case_id(prefix), FMT, image, ctd, tags)


def discover(root: Path) -> list[CaseRef]:
    """All cases under ``root``, sorted by case id; unpaired files are listed, see module doc."""
    root = Path(root)
    images: dict[str, list[Path]] = {}
    ctds: dict[str, list[Path]] = {}
    for path in sorted(root.rglob("*")):
        if not path.is_file() or is_hidden(path, root):
            continue
        low = path.name.lower()
        if low.endswith(_CT_SUFFIXES):
            images.setdefault(_prefix(path), []).append(path)
        elif low.endswith(_CTD_SUFFIX):
            ctds.setdefault(_ctd_prefix(path), []).append(path)
    pairs: list[tuple[str, Path, Path | None]] = []
    for prefix, paths in images.items():
        for image in paths:
            pairs.append((prefix, image, _pick(prefix, image.parent, ctds.get(prefix, []), "rawdata", "derivatives")))
    used = {ctd for _, _, ctd in pairs if ctd is not None}
    for prefix, paths in ctds.items():
        for ctd in paths:
            if ctd not in used and prefix not in images:  # ctd without image: a bad case, listed
                folder = _mirror(ctd.parent, "derivatives", "rawdata") or ctd.parent
                pairs.append((prefix, folder / f"{prefix}_ct.nii.gz", ctd))
                used.add(ctd)
    ids = unique_ids([(_case_id(prefix), image) for prefix, image, _ in pairs], root)
    refs = []
    for case_id, (prefix, image, ctd) in zip(ids, pairs):
        tags = _tags_for(prefix, ctd.parent if ctd else None, image.parent)
        refs.append(CaseRef(case_id, FMT, image, ctd, tags))
    return sorted(refs, key=lambda r: r.case_id)


# --- writing -----------------------------------------------------------------------------------


def ctd_text(landmarks: list[Landmark], image: sitk.Image) -> str:
    """ctd JSON for ``landmarks`` (LPS mm) in voxel units of ``image``'s own axis codes.

    S2 has no VerSe label and is left out.
    """
    codes = axis_codes(image)
    entries: list[dict] = [{"direction": list(codes)}]
    for lm in landmarks:
        label = NAME_TO_VERSE.get(lm.name)
        if label is None or lm.index >= INDEX["S2"]:
            continue
        index = image.TransformPhysicalPointToContinuousIndex(tuple(float(v) for v in lm.xyz_mm))
        xyz = index_to_ctd(index, codes, image)
        entries.append({"label": label, "X": round(xyz[0], 6), "Y": round(xyz[1], 6), "Z": round(xyz[2], 6)})
    return json.dumps(entries) + "\n"


def write_case(case: Case, out_dir: Path) -> list[Path]:
    """Write ``case`` in the VerSe 2019 layout under ``out_dir``, atomically:

    - ``rawdata/sub-<id>/sub-<id>_ct.nii.gz``
    - ``derivatives/sub-<id>/sub-<id>_seg-subreg_ctd.json`` (axis codes of the image's own
      orientation, so the points are its continuous voxel index)
    - ``derivatives/sub-<id>/sub-<id>_tags.json``

    S2 has no VerSe label, so it is NOT written (a warning-free loss: read back, the case has no
    S2). Extra labels (L6, T13, Co) are not written either: ``Case`` keeps only their counts.
    The BIDS folder is the subject part of the id (``sub-gl003`` for id ``gl003_dir-ax``).
    Returns the written paths (image, ctd, tags).
    """
    out_dir = Path(out_dir)
    case_id = check_case_id(case.case_id)
    prefix = case_id if case_id.startswith("sub-") else f"sub-{case_id}"
    subject = prefix.split("_")[0]
    image_path = write_image(case.image, out_dir / "rawdata" / subject / f"{prefix}_ct.nii.gz")
    deriv = out_dir / "derivatives" / subject
    ctd_path = atomic_write_text(deriv / f"{prefix}_seg-subreg{_CTD_SUFFIX}", ctd_text(case.landmarks, case.image))
    tags_path = atomic_write_text(deriv / f"{prefix}_tags.json", tags_json(case.tags))
    return [image_path, ctd_path, tags_path]
