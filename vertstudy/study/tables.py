"""The study's Parquet tables (``trials``, ``epochs``, ``vertebrae``; schemas in DESIGN.md), built
from what the trials reported to Ray and written atomically through pyarrow's filesystems.

A trial reports one result per epoch (``phase: "epoch"``, the trainer's record) and, when it
ends normally, one ``phase: "final"`` result: its status (``completed`` / ``diverged``), best
epoch and metrics, the held-out evaluation (``test_*`` and the vertebra rows as JSON), where it
ran and its W&B run. A trial that Ray stopped early (ASHA) has no final result: ``pruned``; a
trial that failed past its retries: ``error``. Only ended trials enter the tables, so a study
that is running or was killed always has consistent tables.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from vertstudy.study.storage import join, resolve, uri_join, write_atomic
from vertstudy.study.tracking import run_id

TABLES = ("trials", "epochs", "vertebrae")
EPOCH_KEYS_DROPPED = {"phase", "vertebrae", "node", "hostname", "device"}
WHERE_KEYS = ("node", "hostname", "device")
#: Ray's own bookkeeping keys in every result; kept out of our tables.
RAY_KEYS = {
    "timestamp", "checkpoint_dir_name", "should_checkpoint", "done", "training_iteration", "trial_id", "date",
    "time_this_iter_s", "time_total_s", "pid", "node_ip", "config", "time_since_restore",
    "iterations_since_restore", "experiment_tag",
}


@dataclass
class TrialOutcome:
    """One ended trial: what the tables are made of."""

    trial_id: str
    status: str  # completed | pruned | error | diverged
    config: dict[str, Any]  # flat dotted config values of the trial (the whole Config)
    epochs: list[dict[str, Any]] = field(default_factory=list)  # one per epoch, latest report of each epoch
    final: dict[str, Any] = field(default_factory=dict)  # the final report (empty if pruned / error)
    checkpoint: str | None = None
    error: str = ""
    where: dict[str, Any] = field(default_factory=dict)  # node id, hostname, device of its last report
    params: dict[str, Any] = field(default_factory=dict)  # the values the search sampled (labels as sampled)
    started_at: float = math.nan  # unix seconds: the start of its first reported iteration
    ended_at: float = math.nan  # unix seconds: its last report


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


def _number(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return float("nan")
    return v


def fallback_best_epoch(epochs: list[dict[str, Any]], select_on: str) -> int:
    """The best epoch of a trial that ended without a final report (pruned), by the rule its
    trainer keeps ``best.pt`` by (``train.select_on``): the lowest ``val_loss``, or the first
    epoch with the best whole-CT validation (:func:`vertstudy.train.trainer.ct_score`)."""
    if select_on == "val_ct":
        from vertstudy.train.trainer import ct_score

        scored = [e for e in epochs if "val_ct_id_rate" in e and "val_ct_loc_error_mm" in e]
        if scored:
            return int(max(scored, key=lambda e: (ct_score(e), -e["epoch"]))["epoch"])
    return int(min(epochs, key=lambda e: e.get("val_loss", math.inf))["epoch"])


def trial_row(study: str, o: TrialOutcome, meta: dict[str, Any]) -> dict[str, Any]:
    """One ``trials.parquet`` row: ids, status, ``cfg.*``, final (``val_*``) and best
    (``best_val_*``) validation metrics, held-out ``test_*`` metrics, provenance."""
    last = o.epochs[-1] if o.epochs else {}
    row: dict[str, Any] = {"study": study, "trial_id": o.trial_id, "status": o.status}
    row["params"] = json.dumps(o.params, sort_keys=True)  # only what was sampled (inactive conditionals absent)
    row.update({f"cfg.{k}": (json.dumps(v) if isinstance(v, (list, tuple, dict)) else v) for k, v in o.config.items()})
    for k, v in last.items():
        if k.startswith("val_") or k in ("loss", "loss_cls", "loss_reg", "lr"):
            row[k] = _number(v)
    best_epoch = o.final.get("best_epoch")
    if best_epoch is None and o.epochs:  # a pruned trial: its best epoch by the trial's own rule
        best_epoch = fallback_best_epoch(o.epochs, o.config.get("train.select_on", "val_loss"))
    best = next((e for e in o.epochs if e.get("epoch") == best_epoch), {})
    for k, v in best.items():
        if k.startswith("val_"):
            row[f"best_{k}"] = _number(v)
    row.update({k: _number(v) for k, v in o.final.items() if k.startswith("test_") or k.startswith("baseline_")})
    row["best_epoch"] = int(best_epoch) if best_epoch is not None else -1
    row["epochs"] = int(last.get("epoch", 0))
    row["wall_s"] = float(o.final.get("wall_s", sum(float(e.get("wall_s", 0.0)) for e in o.epochs)))
    for key in ("node", "hostname", "device"):  # where it ran: every report says
        row[key] = str(o.final.get(key, o.where.get(key, "")))
    row["seed"] = int(o.config.get("seed", 0))
    row["started_at"], row["ended_at"] = float(o.started_at), float(o.ended_at)
    row["resources_cpu"] = float(meta.get("cpus", math.nan))  # what the trial held, for CPU/GPU hours
    row["resources_gpu"] = float(meta.get("gpus", math.nan))
    row["checkpoint"] = o.checkpoint or ""
    # a trial without a final report logged to the run its id names (if W&B was on)
    default_run = run_id(study, o.trial_id) if meta.get("wandb") else ""
    row["wandb_run"] = str(o.final.get("wandb_run", default_run))
    message = str(o.final.get("message", o.error))
    if o.status == "pruned" and not message:
        message = f"stopped by the scheduler after epoch {row['epochs']}"
    row["message"] = message[:500]
    row["search_metric"] = str(meta.get("search_metric", ""))  # what `study run` ranked by (study/objective.py)
    row["search_mode"] = str(meta.get("search_mode", ""))
    row["vertstudy_version"] = meta.get("vertstudy_version", "")
    row["git_sha"] = meta.get("git_sha", "")
    return row


def epoch_rows(study: str, o: TrialOutcome) -> list[dict[str, Any]]:
    return [{"study": study, "trial_id": o.trial_id, **{k: _number(v) for k, v in e.items()}} for e in o.epochs]


def vertebra_rows(study: str, o: TrialOutcome) -> list[dict[str, Any]]:
    rows = json.loads(o.final.get("vertebrae", "[]") or "[]")
    return [{"study": study, "trial_id": o.trial_id, **r} for r in rows]


FIRST = ["study", "trial_id", "status", "case", "epoch"]


def to_table(rows: list[dict[str, Any]]) -> pa.Table:
    """Rows (dicts, columns may differ) as one table; fixed key columns first, then sorted."""
    names = sorted({k for r in rows for k in r}, key=lambda k: (FIRST.index(k) if k in FIRST else len(FIRST), k))
    if not rows:
        return pa.table({n: pa.array([], pa.string()) for n in ("study", "trial_id")})
    return pa.Table.from_pylist([{n: r.get(n) for n in names} for r in rows])


def build_tables(study: str, outcomes: list[TrialOutcome], meta: dict[str, Any]) -> dict[str, pa.Table]:
    """The three tables of ``outcomes`` (ended trials, one each), ordered by trial id."""
    outcomes = sorted(outcomes, key=lambda o: o.trial_id)
    return {
        "trials": to_table([trial_row(study, o, meta) for o in outcomes]),
        "epochs": to_table([r for o in outcomes for r in epoch_rows(study, o)]),
        "vertebrae": to_table([r for o in outcomes for r in vertebra_rows(study, o)]),
    }


def write_table(study_dir: str, name: str, table: pa.Table) -> str:
    """Write ``<study_dir>/<name>.parquet`` atomically (temporary name, then a rename)."""
    return write_atomic(uri_join(study_dir, f"{name}.parquet"),
                        lambda fs, tmp: pq.write_table(table, tmp, filesystem=fs))


def write_tables(study_dir: str, tables: dict[str, pa.Table]) -> None:
    for name in TABLES:
        write_table(study_dir, name, tables[name])


def read_table(study_dir: str, name: str) -> pa.Table:
    """``<study_dir>/<name>.parquet``; an empty table when the study has none yet."""
    fs, base = resolve(study_dir)
    path = join(base, f"{name}.parquet")
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return to_table([])
    return pq.read_table(path, filesystem=fs)
