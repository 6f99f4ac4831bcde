"""Helpers shared by the cluster tests."""

from __future__ import annotations

import json
from pathlib import Path


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
