"""Prepare a data set: discover its cases and preprocess each into the cache in parallel.

``prepare_dataset`` is what ``vertstudy data prepare`` runs: bad cases are reported and
skipped (or, with ``strict``, end the run with the first one, keeping the finished entries).
A data set is for training unless ``for_prediction``: then a case without landmarks (no
landmark file found, or one that lists none) is a bad case too, not a case with 0 vertebrae.
"""

from __future__ import annotations

import os
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vertstudy.anatomy import NAMES, NUM_CLASSES
from vertstudy.config import PrepConfig
from vertstudy.data.cache import CachedCase, get_or_prepare, load_entry
from vertstudy.errors import InputError
from vertstudy.progress import progress_counter


@dataclass
class PrepareResult:
    """Outcome of one prepare run.

    ``cases`` are the prepared entries in discovery order; ``skipped`` pairs a case id with
    the one-line reason it was left out; ``hits`` counts entries found already cached.
    """

    cases: list[CachedCase]
    skipped: list[tuple[str, str]]
    hits: int
    extra_labels: Counter = field(default_factory=Counter)

    def class_counts(self) -> np.ndarray:
        """(26,) int: vertebrae per class over the prepared cases."""
        counts = np.zeros(NUM_CLASSES, dtype=np.int64)
        for case in self.cases:
            np.add.at(counts, case.indices, 1)
        return counts


def _worker_init(threads: int) -> None:
    import SimpleITK as sitk

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(max(1, threads))


#: where each format looks for a case's landmarks, for the message of a case without them
LANDMARK_FILES = {"csi2014": "<id>.lml beside the image", "verse": "a *_ctd.json centroid file beside the image",
                  "generic": "<stem>.json or <stem>.csv beside the image"}


def _prepare_one(ref, cache_dir: Path, prep: PrepConfig, for_prediction: bool = False) -> tuple[str, bool]:
    """Worker task: returns (entry path, hit). InputError propagates to the parent."""
    entry, hit = get_or_prepare(ref, cache_dir, prep)
    if not for_prediction and not len(entry.indices):
        where = "no landmark file was found" if ref.landmarks is None else f"{Path(ref.landmarks).name} lists none"
        raise InputError(ref.image, f"case {ref.case_id} has no landmarks ({where}; format {ref.fmt}); a data set "
                         f"for training needs them: {LANDMARK_FILES.get(ref.fmt, 'a landmark file')}, or prepare it "
                         "with --for-prediction")
    return str(entry.path), hit


def prepare_dataset(
    root: Path,
    cache_dir: Path,
    fmt: str = "auto",
    prep: PrepConfig | None = None,
    workers: int = 1,
    strict: bool = False,
    progress: bool = True,
    for_prediction: bool = False,
) -> PrepareResult:
    """Preprocess every case under ``root`` into ``cache_dir``; returns the result and writes the index.

    Raises ``InputError`` when ``root`` holds no case, or (``strict``) on the first bad case.
    ``for_prediction``: cases without landmarks are prepared (CTs to label), not refused.
    """
    from vertstudy.data.formats import discover

    prep = prep or PrepConfig()
    root, cache_dir = Path(root), Path(cache_dir)
    refs = discover(root, fmt)
    cache_dir.mkdir(parents=True, exist_ok=True)
    done: dict[int, tuple[str, bool]] = {}
    skipped: list[tuple[str, str]] = []

    with progress_counter(progress, len(refs), "preprocessing") as advance:
        if workers <= 1:
            for i, ref in enumerate(refs):
                try:
                    done[i] = _prepare_one(ref, cache_dir, prep, for_prediction)
                except InputError as exc:
                    if strict:
                        raise
                    skipped.append((ref.case_id, str(exc)))
                advance()
        else:
            threads = max(1, (os.cpu_count() or 1) // workers)
            with ProcessPoolExecutor(workers, initializer=_worker_init, initargs=(threads,)) as pool:
                pending: dict[Future, int] = {
                    pool.submit(_prepare_one, ref, cache_dir, prep, for_prediction): i for i, ref in enumerate(refs)
                }
                try:
                    while pending:
                        finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                        for fut in finished:
                            i = pending.pop(fut)
                            try:
                                done[i] = fut.result()
                            except InputError as exc:
                                if strict:
                                    raise
                                skipped.append((refs[i].case_id, str(exc)))
                            advance()
                finally:
                    for fut in pending:
                        fut.cancel()

    cases = [load_entry(Path(done[i][0])) for i in sorted(done)]
    extra: Counter = Counter()
    for case in cases:
        extra.update(case.extra_labels)
    return PrepareResult(cases, skipped, sum(hit for _, hit in done.values()), extra)


def summary_rows(result: PrepareResult) -> list[tuple[str, str]]:
    """Human-readable (label, value) rows of a prepare run, for the CLI's summary table."""
    counts = result.class_counts()
    rows = [
        ("cases prepared", f"{len(result.cases)} ({len(result.cases) - result.hits} new, {result.hits} cached)"),
        ("cases skipped", str(len(result.skipped))),
        ("vertebrae", str(int(counts.sum()))),
    ]
    per_class = "  ".join(f"{NAMES[i]}:{int(c)}" for i, c in enumerate(counts))
    rows.append(("per class", per_class))
    if result.extra_labels:
        extras = ", ".join(f"{k}: {v}" for k, v in sorted(result.extra_labels.items()))
        rows.append(("outside the 26 classes (not relabelled)", extras))
    return rows
