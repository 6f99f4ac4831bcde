"""A study's data: phantoms written (once) or a data set root, preprocessed into the
content-addressed cache, and split into train / validation / held-out test cases.

Runs once in the driver before any trial starts. The split (case ids and cache entries) is
written to ``<study dir>/split.json``; a resumed study reads it back, so its trials see the
same cases. Trials receive the cache entries through ``tune.with_parameters``.

On a cluster, trials on any node must find the entries. Either the cache is on a shared path
(NFS; entries are read in place), or the driver publishes the split's entries to a URI
(``data.shared_cache``: s3://, gs://, file://, read through pyarrow's filesystems) and each node
fetches an entry once into its own ``data.node_cache``, under a per-entry file lock, so the
trials of one node never fetch the same entry twice. Entries are content-addressed, so a
published or fetched entry never changes; ``meta.json`` is copied last and marks it complete.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from vertstudy.config import Config, PrepConfig
from vertstudy.data.cache import CachedCase, load_entry
from vertstudy.errors import ConfigError, InputError
from vertstudy.study.spec import DataSpec


@dataclass(frozen=True)
class StudyData:
    """The cache entries of each part of the split: absolute directories, or URIs of published
    entries that a node fetches into ``node_cache`` (see the module docstring)."""

    train: tuple[str, ...]
    val: tuple[str, ...]
    test: tuple[str, ...]
    node_cache: str = ""

    def cases(self, part: str) -> list[CachedCase]:
        """The cached cases (metadata; volumes stay on disk) of ``part`` (train / val / test)."""
        return [load_entry(local_entry(p, self.node_cache)) for p in getattr(self, part)]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> StudyData:
        raw = json.loads(text)
        # (studies written before this version also hold "spacing_mm", which nothing reads)
        return cls(tuple(raw["train"]), tuple(raw["val"]), tuple(raw["test"]), str(raw.get("node_cache", "")))


ENTRY_FILES = ("volume.npy", "meta.json")  # meta.json last: its presence marks a whole entry
FETCH_LOG = "fetches.log"


def publish_entries(paths: list[str], shared: str) -> dict[str, str]:
    """Copy local cache entry directories to ``<shared>/cases/<key[:2]>/<key>/`` (skipping those
    already there); returns ``{local path: entry URI}``."""
    import pyarrow.fs as pafs

    from vertstudy.study import storage

    fs, base = storage.resolve(shared)
    local = pafs.LocalFileSystem()
    out = {}
    for path in paths:
        key = Path(path).name
        dest = storage.join(base, "cases", key[:2], key)
        if fs.get_file_info(storage.join(dest, "meta.json")).type == pafs.FileType.NotFound:
            fs.create_dir(dest, recursive=True)
            for name in ENTRY_FILES:
                pafs.copy_files(str(Path(path) / name), storage.join(dest, name), source_filesystem=local,
                                destination_filesystem=fs)
        out[path] = storage.join(shared, "cases", key[:2], key)
    return out


def local_entry(entry: str, node_cache: str) -> Path:
    """A local directory holding ``entry``: the entry itself when it is a path, else this node's
    copy of the published entry, fetched once (one line per fetch in ``<node_cache>/fetches.log``)."""
    from vertstudy.study import storage

    if not storage.is_uri(entry):
        return Path(entry)
    import pyarrow.fs as pafs
    from filelock import FileLock

    key = entry.rstrip("/").rsplit("/", 1)[-1]
    root = Path(node_cache or "~/.cache/vertstudy/node").expanduser()
    target = root / "cases" / key[:2] / key
    if (target / "meta.json").exists():
        return target
    (root / "locks").mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / "locks" / f"{key}.lock")):
        if (target / "meta.json").exists():  # another trial of this node fetched it meanwhile
            return target
        fs, src = storage.resolve(entry)
        tmp = target.with_name(f".{key}.{uuid.uuid4().hex[:8]}")
        tmp.mkdir(parents=True)
        t0 = time.perf_counter()
        try:
            for name in ENTRY_FILES:
                pafs.copy_files(storage.join(src, name), str(tmp / name), source_filesystem=fs,
                                destination_filesystem=pafs.LocalFileSystem())
            tmp.rename(target)
        except Exception as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise InputError(Path(key), f"cannot fetch cache entry {entry}: {exc}") from None
        with open(root / FETCH_LOG, "a", encoding="utf-8") as log:
            log.write(f"{key} {socket.gethostname()} {os.getpid()} {time.perf_counter() - t0:.3f}s\n")
    return target


def _phantom_root(data: DataSpec, work: Path, progress: bool) -> Path:
    """Write the study's phantoms under ``work/_phantoms/<preset>-s<seed>-n<count>`` once, under
    a file lock; a finished set is reused by every study on the same storage."""
    from filelock import FileLock

    from vertstudy.data.phantom import PhantomConfig, write_phantoms

    ph = data.phantoms
    root = work / "_phantoms" / f"{ph.preset}-s{ph.seed}-n{ph.count}"
    if (root / ".complete").exists():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    # several drivers on one storage (same study or not): one writes the set, the others wait for it
    with FileLock(str(root.with_name(root.name + ".lock"))):
        if (root / ".complete").exists():
            return root
        tmp = root.with_name(root.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        write_phantoms(tmp, cases=ph.count, seed=ph.seed, config=PhantomConfig.preset(ph.preset), workers=2,
                       progress=progress)
        (tmp / ".complete").write_text("done\n", encoding="utf-8")
        shutil.rmtree(root, ignore_errors=True)
        tmp.rename(root)
    return root


def split_cases(case_ids: list[str], val: int, test: int, seed: int) -> tuple[list[int], list[int], list[int]]:
    """Indices into ``case_ids`` of (train, val, test): sorted by id, shuffled with ``seed``;
    the first ``test`` are held out, the next ``val`` validate, the rest train."""
    order = sorted(range(len(case_ids)), key=lambda i: case_ids[i])
    order = [order[i] for i in np.random.default_rng(seed).permutation(len(order))]
    return order[test + val:], order[test:test + val], order[:test]


def materialize(data: DataSpec, config: Config, work: Path, progress: bool = True, shared: str | None = None
                ) -> StudyData:
    """Phantoms or the data set, prepared into ``data.cache_dir`` (default ``work/_cache``) with
    the study's preprocessing, and split; with ``shared`` (a URI), the split's entries are
    published there and the split names them by URI. ``ConfigError`` when too few cases remain."""
    from vertstudy.data.prepare import prepare_dataset

    work = Path(work)
    if data.phantoms is not None:
        root, fmt = _phantom_root(data, work, progress), "auto"
    else:
        root, fmt = Path(data.root).expanduser(), data.format
        if not root.is_dir():
            raise InputError(root, "data.root: not a directory; give the folder that holds the data set's cases")
    cache = Path(data.cache_dir).expanduser() if data.cache_dir else work / "_cache"
    prep: PrepConfig = config.data.prep
    result = prepare_dataset(root, cache, fmt=fmt, prep=prep, workers=2, progress=progress)
    cases = result.cases
    n_val, n_test = data.split.counts(len(cases))
    if len(cases) < n_val + n_test + 1:
        raise ConfigError(
            f"data.split: {len(cases)} usable cases in {root} cannot give {n_val} validation, {n_test} test and at "
            "least 1 training case; lower data.split.val / data.split.test or add cases"
        )
    ids = [c.case_id for c in cases]
    tr, va, te = split_cases(ids, n_val, n_test, data.split.seed)
    paths = [str(Path(c.path).resolve()) for c in cases]
    if shared:
        published = publish_entries([paths[i] for i in tr + va + te], shared)
        paths = [published.get(p, p) for p in paths]
    return StudyData(
        train=tuple(paths[i] for i in tr), val=tuple(paths[i] for i in va), test=tuple(paths[i] for i in te),
        node_cache=data.node_cache,
    )


#: the longest side of a stored case view, in pixels
VIEW_PIXELS = 192
#: half thickness of the maximum-intensity slab around the spine, in mm
VIEW_SLAB_MM = 20.0


def _block_mean(image: np.ndarray, f: int) -> np.ndarray:
    """``image`` (H, W) averaged over f x f blocks (edges padded by repetition)."""
    h, w = -(-image.shape[0] // f) * f, -(-image.shape[1] // f) * f
    padded = np.pad(image, ((0, h - image.shape[0]), (0, w - image.shape[1])), mode="edge")
    return padded.reshape(h // f, f, w // f, f).mean(axis=(1, 3))


def case_view_row(case: CachedCase) -> dict:
    """A ``cases.parquet`` row: sagittal and coronal pictures of a held-out case, so a report can
    draw predicted and true centroids on the CT from the tables alone.

    ``sagittal`` (z, y) and ``coronal`` (z, x) are maximum-intensity projections of the z-scored
    canonical volume over a slab of +-``VIEW_SLAB_MM`` around the spine's median x (sagittal) or
    y (coronal), block-averaged by ``factor`` so the long side has at most ``VIEW_PIXELS``;
    flattened row-major, with their ``*_shape``. Pixel (i, j) is centred at canonical
    ``(i * pixel_mm + origin_mm, j * pixel_mm + origin_mm)`` mm, the frame of the ``true_*_mm`` /
    ``pred_*_mm`` columns of ``vertebrae.parquet``.
    """
    volume = np.asarray(case.volume(mmap=True), dtype=np.float32)
    spacing = float(case.geometry.spacing_mm)
    factor = max(1, -(-max(volume.shape) // VIEW_PIXELS))
    centre = np.median(np.asarray(case.zyx_vox, dtype=np.float64), axis=0) if len(case.indices) else \
        np.asarray(volume.shape, dtype=np.float64) / 2
    half = max(1, int(round(VIEW_SLAB_MM / spacing)))

    def slab(axis: int) -> np.ndarray:
        c = int(np.clip(round(centre[axis]), 0, volume.shape[axis] - 1))
        lo, hi = max(0, c - half), min(volume.shape[axis], c + half + 1)
        return np.take(volume, np.arange(lo, hi), axis=axis).max(axis=axis)

    sagittal, coronal = _block_mean(slab(2), factor), _block_mean(slab(1), factor)
    return {
        "case": case.case_id,
        "spacing_mm": spacing,
        "factor": factor,
        "pixel_mm": spacing * factor,
        "origin_mm": spacing * (factor - 1) / 2,
        "sagittal": sagittal.astype(np.float32).ravel().tolist(),
        "sagittal_shape": list(sagittal.shape),
        "coronal": coronal.astype(np.float32).ravel().tolist(),
        "coronal_shape": list(coronal.shape),
        **{k: str(v) for k, v in sorted(case.tags.items())},
    }
