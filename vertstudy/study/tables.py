"""The study's Parquet tables (``trials``, ``epochs``, ``vertebrae``; their contract is
:mod:`vertstudy.study.schema`), built
from what the trials reported to Ray and written atomically through pyarrow's filesystems.

A trial reports one result per epoch (``phase: "epoch"``, the trainer's record) and, when it
ends normally, one ``phase: "final"`` result: its status (``completed`` / ``diverged``), best
epoch and metrics, the held-out evaluation (``test_*`` and the vertebra rows as JSON), where it
ran and its W&B run. A trial that Ray stopped early (ASHA) has no final result: ``pruned``; a
trial that failed past its retries: ``error``. Only ended trials enter the tables, so a study
that is running or was killed always has consistent tables.
"""

from __future__ import annotations

import math
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from vertstudy.study.schema import TrialOutcome, epoch_rows, to_table, trial_row, vertebra_rows
from vertstudy.study.storage import join, resolve, uri_join, write_atomic

REFRESHED = ("trials", "epochs", "vertebrae")  # rebuilt whenever a trial ends
EPOCH_KEYS_DROPPED = {"phase", "vertebrae", "node", "hostname", "device"}
WHERE_KEYS = ("node", "hostname", "device")
#: Ray's own bookkeeping keys in every result; kept out of our tables.
RAY_KEYS = {
    "timestamp", "checkpoint_dir_name", "should_checkpoint", "done", "training_iteration", "trial_id", "date",
    "time_this_iter_s", "time_total_s", "pid", "node_ip", "config", "time_since_restore",
    "iterations_since_restore", "experiment_tag",
}


def result_times(results: list[dict[str, Any]]) -> tuple[float, float]:
    """(started, ended) unix seconds of a trial from Ray's ``timestamp`` / ``time_this_iter_s``
    of its results; NaN when the results carry none."""
    stamps = [(float(r["timestamp"]), float(r.get("time_this_iter_s") or 0.0)) for r in results
              if isinstance(r.get("timestamp"), (int, float))]
    if not stamps:
        return math.nan, math.nan
    first = min(stamps)
    return first[0] - first[1], max(t for t, _ in stamps)


def split_results(results: list[dict[str, Any]]) -> tuple[list[dict], dict, dict]:
    """(per-epoch records, final record, where it last ran: node/hostname/device) from a trial's
    results in report order. A retried epoch may appear twice: the last report of an epoch wins."""
    by_epoch: dict[int, dict] = {}
    final: dict = {}
    for r in results:
        clean = {k: v for k, v in r.items() if k not in RAY_KEYS}
        if clean.get("phase") == "final":
            final = clean
        elif "epoch" in clean:
            by_epoch[int(clean["epoch"])] = clean
    epochs = [by_epoch[e] for e in sorted(by_epoch)]
    where = {k: epochs[-1][k] for k in WHERE_KEYS if epochs and k in epochs[-1]}
    return [{k: v for k, v in e.items() if k not in EPOCH_KEYS_DROPPED} for e in epochs], final, where


def outcome_status(ended_by: str, final: dict) -> str:
    """``ended_by``: ``complete`` (the function returned or Ray stopped it) or ``error``."""
    if ended_by == "error":
        return "error"
    return str(final.get("status", "pruned")) if final else "pruned"


def build_tables(study: str, outcomes: list[TrialOutcome], meta: dict[str, Any]) -> dict[str, pa.Table]:
    """The three tables of ``outcomes`` (ended trials, one each), ordered by trial id."""
    outcomes = sorted(outcomes, key=lambda o: o.trial_id)
    return {
        "trials": to_table([trial_row(study, o, meta) for o in outcomes], "trials"),
        "epochs": to_table([r for o in outcomes for r in epoch_rows(study, o)], "epochs"),
        "vertebrae": to_table([r for o in outcomes for r in vertebra_rows(study, o)], "vertebrae"),
    }


def write_table(study_dir: str, name: str, table: pa.Table) -> str:
    """Write ``<study_dir>/<name>.parquet`` atomically (temporary name, then a rename)."""
    return write_atomic(uri_join(study_dir, f"{name}.parquet"),
                        lambda fs, tmp: pq.write_table(table, tmp, filesystem=fs))


def write_tables(study_dir: str, tables: dict[str, pa.Table]) -> None:
    for name in REFRESHED:
        write_table(study_dir, name, tables[name])


def read_table(study_dir: str, name: str) -> pa.Table:
    """``<study_dir>/<name>.parquet``; an empty table when the study has none yet."""
    fs, base = resolve(study_dir)
    path = join(base, f"{name}.parquet")
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return to_table([])
    return pq.read_table(path, filesystem=fs)

