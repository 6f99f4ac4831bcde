"""The study tables' contract: the one home of what ``trials``, ``epochs``, ``vertebrae``,
``baseline`` and ``cases`` (``<storage>/<study>/<table>.parquet``, written with pyarrow) hold,
the records they are built from and their row builders. Every writer (the study's driver,
``study export``) and every reader (``study status``, the reports) goes through it.

- ``trials`` - one row per ended trial: ``study``, ``trial_id``, ``status`` (one of
  :data:`STATUSES`), ``params`` (JSON of what the search sampled), one ``cfg.<dotted.name>``
  column per configuration value (flattened; sequences as JSON), the last epoch's validation
  metrics (``val_*``, ``loss``, ``loss_cls``, ``loss_reg``, ``lr``) and those of the best epoch
  (``best_val_*``), the held-out whole-CT figures (``test_*``), ``best_epoch``, ``epochs``,
  ``wall_s``, where and how it ran (``node``, ``hostname``, ``device``, ``precision``: bf16 or fp32, the
  resolved ``train.amp``; empty in tables written before it), ``seed``, ``started_at`` /
  ``ended_at`` (unix s), ``resources_cpu`` / ``resources_gpu`` (what it held), ``checkpoint``,
  ``wandb_run``, ``message``, what the study ranked by (``search_metric``, ``search_mode``),
  ``vertstudy_version``, ``git_sha``. Types of the fixed columns: :data:`TRIAL_TYPES`.
- ``epochs`` - one row per trial per epoch: ``study``, ``trial_id``, ``epoch``, the losses
  (total, classification, regression), the validation metrics (crop-level ``val_*``, and
  whole-CT ``val_ct_*`` when measured), ``lr``, ``crops_per_s``, ``wall_s``.
- ``vertebrae`` - the evaluation of each finished trial's best checkpoint on the held-out
  cases, one row per trial x case x class: ``study``, ``trial_id``, ``case``, ``label``
  (class index, :mod:`vertstudy.anatomy`), ``region``, ``in_truth``, ``predicted``,
  ``error_mm``, ``identified``, ``identified_verse`` (the VerSe benchmark's rule, below), the
  true and predicted centroids (canonical (z, y, x) mm,
  :data:`POINT_COLUMNS`, NaN when absent), plus the case's condition tags (phantoms carry e.g.
  ``fov``, ``metal``, ``curvature``). Types: :data:`VERTEBRA_TYPES`.
- ``baseline`` - the same rows for the mean-position baseline (``trial_id`` ``baseline``).
- ``cases`` - one row per held-out case: its sagittal and coronal views for the reports'
  failure gallery (:func:`vertstudy.study.dataset.case_view_row`).

Metrics (paper section III-C; :mod:`vertstudy.train.metrics`): the localization error is the
Euclidean distance in mm between a predicted centroid and the truth of the same class, mean and
std over the true vertebrae that were predicted; a true vertebra is identified when the
predicted centroid closest to it is of its class and within 20 mm, and the identification rate
is identified / vertebrae in the truth; ``id_rate_verse`` counts by the VerSe benchmark's
rule instead (:mod:`vertstudy.train.metrics`: from each prediction to the truths present in
both); classification is the mAP over the 26 classes; every
metric is also reported per region.

While a study runs, ``epochs`` and ``vertebrae`` grow by one file per ended trial,
``<storage>/<study>/parts/<table>/<trial_id>.parquet`` (:data:`PARTS`, :data:`PARTED`), so a
refresh writes what the new trial adds; ``trials.parquet`` is rewritten whole (one row a trial).
A part holds the current rows of its trial (they replace that trial's rows in the table's file)
and counts once its trial has a row in ``trials.parquet``. When the study ends the parts are
merged into ``<table>.parquet`` and removed; :func:`vertstudy.study.tables.read_table` reads a
table with its parts at any time.

Reports are pure functions of these files: the same Parquet gives the same report.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from vertstudy.study.tracking import run_id

TABLES = ("trials", "epochs", "vertebrae", "baseline", "cases")
STATUSES = ("completed", "pruned", "error", "diverged")
#: fixed ``trials`` columns and their types (the column families ``cfg.*``, ``val_*``,
#: ``best_val_*``, ``test_*`` are numbers or text as configured or measured)
TRIAL_TYPES: dict[str, pa.DataType] = {
    "study": pa.string(), "trial_id": pa.string(), "status": pa.string(), "params": pa.string(),
    "best_epoch": pa.int64(), "epochs": pa.int64(), "wall_s": pa.float64(), "node": pa.string(),
    "hostname": pa.string(), "device": pa.string(), "precision": pa.string(), "seed": pa.int64(),
    "started_at": pa.float64(),
    "ended_at": pa.float64(), "resources_cpu": pa.float64(), "resources_gpu": pa.float64(),
    "checkpoint": pa.string(), "wandb_run": pa.string(), "message": pa.string(), "search_metric": pa.string(),
    "search_mode": pa.string(), "vertstudy_version": pa.string(), "git_sha": pa.string(),
}
POINT_COLUMNS = tuple(f"{kind}_{axis}_mm" for kind in ("true", "pred") for axis in "zyx")
#: ``vertebrae`` / ``baseline`` columns other than the case's tags, and their types
VERTEBRA_TYPES: dict[str, pa.DataType] = {
    "study": pa.string(), "trial_id": pa.string(), "case": pa.string(), "label": pa.int64(),
    "region": pa.string(), "in_truth": pa.bool_(), "predicted": pa.bool_(), "error_mm": pa.float64(),
    "identified": pa.bool_(), "identified_verse": pa.bool_(), **{c: pa.float64() for c in POINT_COLUMNS},
}
ROW_KEYS = set(VERTEBRA_TYPES)  # a case tag with one of these names is left out of its rows
VERTEBRA_FLAGS = ("in_truth", "predicted", "identified")
#: trial columns every part of the report may read; absent ones are filled with NaN / ""
TRIAL_NUMBERS = (
    "best_val_id_rate", "best_val_loc_error_mm", "best_val_map", "best_val_loss", "best_val_ct_id_rate",
    "best_val_ct_loc_error_mm", "test_id_rate",
    "test_loc_error_mm_mean", "test_n_truth", "wall_s", "started_at", "ended_at", "resources_cpu", "resources_gpu",
    "epochs", "best_epoch",
)
TRIAL_TEXTS = ("status", "params", "message", "device", "precision", "hostname", "vertstudy_version", "git_sha",
               "search_metric", "search_mode")
#: ``study status``: trials column -> heading
STATUS_HEADINGS = {
    "trial_id": "trial", "status": "status", "epochs": "epochs", "best_epoch": "best", "best_val_loc_error_mm":
    "val mm", "best_val_id_rate": "val id", "test_loc_error_mm_mean": "test mm", "test_id_rate": "test id",
    "wall_s": "wall s",
}
TYPES = {"trials": TRIAL_TYPES, "vertebrae": VERTEBRA_TYPES, "baseline": VERTEBRA_TYPES}
#: a trial's held-out rows (``vertebrae`` columns but ``study`` and ``trial_id``), written by the
#: trial into the checkpoint of its final result, so Ray carries them to the study's storage
#: from any node; the trial reports only scalars to Ray
HELD_OUT = "held_out.parquet"
#: a trial's epoch reports so far (one JSON object per line, each as sent to Tune), written by the
#: trial into every checkpoint: Ray copies ``result.json`` to the study's storage in the background,
#: so a driver killed before a copy can leave it without a report whose checkpoint the resumed
#: trial goes on from (that epoch is then never reported again); the tables take such an epoch
#: from the newest checkpoint's copy (:func:`vertstudy.study.results.outcome`)
REPORTED = "epochs.jsonl"
#: folder in the study directory of the per-trial parts of the tables in :data:`PARTED`
#: (``parts/<table>/<trial_id>.parquet``; see the module docstring)
PARTS = "parts"
#: the tables that grow by one part per ended trial while a study runs
PARTED = ("epochs", "vertebrae")
#: inside each of Tune's ``checkpoint_NNNNNN`` folders, every attempt of a trial writes its files
#: under ``attempt-<start ns>-<pid>/`` (:func:`vertstudy.study.trial.attempt_name`); readers take the newest
ATTEMPT_PREFIX = "attempt-"


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
    vertebrae: list[dict[str, Any]] = field(default_factory=list)  # held-out rows (its checkpoint's HELD_OUT file)


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
    for key in ("node", "hostname", "device", "precision"):  # where and how it ran: every report says
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
    """The trial's held-out rows (trials of studies written before :data:`HELD_OUT` existed
    carried them as JSON in their final result)."""
    rows = o.vertebrae or json.loads(o.final.get("vertebrae", "[]") or "[]")
    return [{"study": study, "trial_id": o.trial_id, **r} for r in rows]


FIRST = ["study", "trial_id", "status", "case", "epoch"]


def column_order(names) -> list[str]:
    """The tables' column order: the fixed key columns (:data:`FIRST`) first, then by name."""
    return sorted(set(names), key=lambda k: (FIRST.index(k) if k in FIRST else len(FIRST), k))


def declared_types(table: pa.Table, name: str | None) -> pa.Table:
    """``table`` with the declared columns of table ``name`` (:data:`TYPES`) cast to their
    declared types (a column that holds only nulls, for one)."""
    for column, kind in TYPES.get(name or "", {}).items():
        i = table.schema.get_field_index(column)
        if i >= 0 and table.schema.field(i).type != kind:
            table = table.set_column(i, column, table.column(i).cast(kind))
    return table


def to_table(rows: list[dict[str, Any]], name: str | None = None) -> pa.Table:
    """Rows (dicts, columns may differ) as one table; fixed key columns first, then sorted. With
    the table's ``name``, its declared columns (:data:`TYPES`) get their declared types (a column
    that holds only nulls, for one)."""
    names = column_order(k for r in rows for k in r)
    if not rows:
        return pa.table({n: pa.array([], pa.string()) for n in ("study", "trial_id")})
    return declared_types(pa.Table.from_pylist([{n: r.get(n) for n in names} for r in rows]), name)


def _point_columns(prefix: str, point) -> dict[str, float]:
    """``{prefix_z_mm, prefix_y_mm, prefix_x_mm}`` of a canonical (z, y, x) mm point (NaN if absent)."""
    values = point if point is not None else (math.nan,) * 3
    return {f"{prefix}_{axis}_mm": float(v) for axis, v in zip("zyx", values)}


def held_out_rows(per_case) -> list[dict[str, Any]]:
    """JSON-ready ``vertebrae.parquet`` rows: case id, the metric row, the true and predicted
    centroids (canonical (z, y, x) mm: ``true_z_mm`` ... ``pred_x_mm``, NaN when absent) and the
    case's condition tags."""
    rows = []
    for case, case_rows in per_case:
        tags = {k: str(v) for k, v in sorted(case.tags.items()) if k not in ROW_KEYS}
        for r in case_rows:
            rows.append({
                "case": case.case_id, "label": int(r.label), "region": str(r.region), "in_truth": bool(r.in_truth),
                "predicted": bool(r.predicted), "error_mm": float(r.error_mm), "identified": bool(r.identified),
                "identified_verse": bool(r.identified_verse),
                **_point_columns("true", r.true_mm), **_point_columns("pred", r.pred_mm), **tags,
            })
    return rows
