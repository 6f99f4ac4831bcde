"""Fixtures and helpers shared by the cluster tests."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.paths import short_tmp


@pytest.fixture(scope="module")
def root():
    """A short folder of the test module's own for its cluster, studies and data."""
    with short_tmp("vs-cl-") as path:
        yield path


def trial_results(study_dir: Path) -> dict[str, list[dict]]:
    """``{trial_id: its results so far}`` from Ray's ``result.json`` files (read while the study runs)."""
    out = {}
    for f in sorted(study_dir.glob("ray/*/result.json")):
        rows = []
        for line in f.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line being written
                break
        if rows:
            out[f.parent.name] = rows
    return out


def both_trials_at_epoch(driver, study_dir: Path, epoch: int, timeout_s: float = 300) -> dict[str, list[dict]]:
    """Wait until both trials of ``study_dir`` have reported ``epoch``; their results (fails if the
    driver ends first or time runs out)."""
    deadline = time.monotonic() + timeout_s
    while True:
        results = trial_results(study_dir)
        if len(results) == 2 and all(max(r.get("epoch", 0) for r in rows) >= epoch for rows in results.values()):
            return results
        assert driver.poll() is None and time.monotonic() < deadline, f"trials did not reach epoch {epoch}"
        time.sleep(0.2)
