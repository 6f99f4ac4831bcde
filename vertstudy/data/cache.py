"""Content-addressed cache of preprocessed cases.

Layout under the cache folder::

    cases/<key[:2]>/<key>/volume.npy   (D, H, W) float16 z-scored volume, canonical (z, y, x)
    cases/<key[:2]>/<key>/meta.json    case id, tags, landmarks, geometry, intensity stats
    locks/<key>.lock                   one writer per key across processes
    hashes/<path-digest>.json          memo of file content hashes keyed by (size, mtime)
    datasets/<name>-<digest>.json      the index of one prepared data set

The key hashes the input files' *contents*, the reader and case id, the preprocessing
parameters and the cache format version, so a second run over the same data preprocesses
nothing. An entry is written in a temporary folder and renamed into place, under a file
lock: two processes asking for the same case at once do the work once, and an interrupted
run never leaves a half-written entry.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from filelock import FileLock

from vertstudy.anatomy import NAMES
from vertstudy.atomic import atomic_write_json
from vertstudy.config import PrepConfig
from vertstudy.data.case import Case
from vertstudy.data.preprocess import Geometry, preprocess

CACHE_VERSION = 1


# -- hashing -------------------------------------------------------------------------------
def file_digest(path: Path, cache_dir: Path | None = None) -> str:
    """sha256 of a file's contents (of every file below it, for a folder).

    With ``cache_dir``, the digest is memoised under ``hashes/`` keyed by the file's
    absolute path, size and modification time, so unchanged files are not read again.
    """
    path = Path(path)
    if path.is_dir():
        h = hashlib.sha256()
        for child in sorted(p for p in path.rglob("*") if p.is_file()):
            h.update(child.relative_to(path).as_posix().encode())
            h.update(file_digest(child, cache_dir).encode())
        return h.hexdigest()
    st = path.stat()
    memo = None
    if cache_dir is not None:
        memo = Path(cache_dir) / "hashes" / (hashlib.sha1(str(path.resolve()).encode()).hexdigest() + ".json")
        try:
            saved = json.loads(memo.read_text(encoding="utf-8"))
            if saved["size"] == st.st_size and saved["mtime_ns"] == st.st_mtime_ns:
                return saved["sha256"]
        except (OSError, ValueError, KeyError):
            pass
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    digest = h.hexdigest()
    if memo is not None:
        atomic_write_json(memo, {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest})
    return digest


def cache_key(case_id: str, fmt: str, sources: list[Path], prep: PrepConfig, cache_dir: Path | None = None) -> str:
    """Content key of one case: its input files' contents and the preprocessing parameters."""
    h = hashlib.sha256()
    h.update(f"vertstudy-cache-v{CACHE_VERSION}\0{fmt}\0{case_id}\0".encode())
    h.update(prep.model_dump_json().encode())
    for src in sources:
        h.update(b"\0" + file_digest(Path(src), cache_dir).encode())
    return h.hexdigest()[:32]


# -- entries -------------------------------------------------------------------------------
@dataclass(frozen=True)
class CachedCase:
    """A preprocessed case on disk: metadata in memory, the volume loaded on demand.

    ``zyx_vox`` (N, 3) are canonical (z, y, x) voxel coordinates of the centroids of classes
    ``indices`` (N,); ``geometry`` maps them back to the original image.
    """

    key: str
    path: Path
    case_id: str
    fmt: str
    indices: np.ndarray
    zyx_vox: np.ndarray
    geometry: Geometry
    pad_value: float
    tags: dict[str, str] = field(default_factory=dict)
    extra_labels: dict[str, int] = field(default_factory=dict)

    def volume(self, mmap: bool = True) -> np.ndarray:
        """(D, H, W) float16 z-scored canonical volume, memory-mapped read-only by default."""
        return np.load(self.path / "volume.npy", mmap_mode="r" if mmap else None)

    @property
    def labels(self) -> list[str]:
        return [NAMES[i] for i in self.indices]


def entry_dir(cache_dir: Path, key: str) -> Path:
    return Path(cache_dir) / "cases" / key[:2] / key


def load_entry(path: Path) -> CachedCase:
    """Load the metadata of a cache entry folder (the volume stays on disk)."""
    path = Path(path)
    meta = json.loads((path / "meta.json").read_text(encoding="utf-8"))
    lms = meta["landmarks"]
    return CachedCase(
        key=meta["key"],
        path=path,
        case_id=meta["case_id"],
        fmt=meta["fmt"],
        indices=np.array([lm["index"] for lm in lms], dtype=np.int64),
        zyx_vox=np.array([lm["zyx_vox"] for lm in lms], dtype=np.float64).reshape(-1, 3),
        geometry=Geometry.from_dict(meta["geometry"]),
        pad_value=float(meta["pad_value"]),
        tags=dict(meta.get("tags", {})),
        extra_labels=dict(meta.get("extra_labels", {})),
    )


def get_or_prepare(ref, cache_dir: Path, prep: PrepConfig) -> tuple[CachedCase, bool]:
    """Return the cache entry of ``ref`` (a ``formats.CaseRef``), preprocessing it if needed.

    Returns ``(entry, hit)``; ``hit`` is False when this call did the work. Raises
    ``InputError`` for a bad case, leaving nothing in the cache.
    """
    from vertstudy.data.formats import read_case

    cache_dir = Path(cache_dir)
    sources = [p for p in (ref.image, ref.landmarks, ref.tags) if p is not None]
    if ref.landmarks is None or not all(p.exists() for p in sources):
        read_case(ref)  # raises the reader's InputError naming the missing file
    key = cache_key(ref.case_id, ref.fmt, sources, prep, cache_dir)
    final = entry_dir(cache_dir, key)
    if (final / "meta.json").exists():
        return load_entry(final), True
    (cache_dir / "locks").mkdir(parents=True, exist_ok=True)
    with FileLock(str(cache_dir / "locks" / f"{key}.lock")):
        if (final / "meta.json").exists():  # another process finished it while we waited
            return load_entry(final), True
        return write_entry(final, key, read_case(ref), prep), False


def write_entry(final: Path, key: str, case: Case, prep: PrepConfig) -> CachedCase:
    """Preprocess ``case`` and write its entry to the folder ``final`` atomically.

    The entry is built in a temporary sibling folder and renamed into place, so ``final``
    either does not exist or is complete.
    """
    final = Path(final)
    prepared = preprocess(case, prep)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=final.parent))
    try:
        np.save(tmp / "volume.npy", prepared.volume.astype(np.float16))
        points = case.points_mm()
        meta = {
            "version": CACHE_VERSION,
            "key": key,
            "case_id": case.case_id,
            "fmt": case.fmt,
            "sources": [str(s) for s in case.sources],
            "tags": case.tags,
            "extra_labels": dict(case.extra_labels),
            "prep": prep.model_dump(),
            "geometry": prepared.geometry.to_dict(),
            "hu_mean": prepared.hu_mean,
            "hu_std": prepared.hu_std,
            "pad_value": prepared.pad_value,
            "landmarks": [
                {"index": int(i), "name": NAMES[int(i)], "zyx_vox": zyx.tolist(), "xyz_mm": xyz.tolist()}
                for i, zyx, xyz in zip(prepared.indices, prepared.zyx_vox, points)
            ],
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
        os.rename(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return load_entry(final)


