"""``vertstudy bench tables``: what one refresh of the study tables costs as the study grows.

A simulated study (no training, no Ray): trial folders as Ray writes them under
``<study>/ray/<trial_id>/`` (``params.json``, ``result.json`` with one result per epoch and a
final one, the held-out rows as ``held_out.parquet`` in the final checkpoint, and an experiment
state that says TERMINATED), of a smoke-scale study spec, so the real code reads them back into
:class:`~vertstudy.study.schema.TrialOutcome` and builds the rows with the schema's builders.
Each trial: ``epochs`` epochs, ``cases`` held-out cases x ``vertebrae`` rows, all completed.

The trials end one after the other. When the N-th ends (N in ``sizes``), one refresh is timed
both ways, side by side on the same folders:

- **old** (:func:`vertstudy.study.refresh.rebuild_tables`): every ended trial's outcome read
  again, the three tables built and written whole (``old_read_s`` + ``old_write_s``);
- **new** (:class:`vertstudy.study.refresh.TableRefresh`, what the driver calls): the new
  trial's outcome read, its ``epochs`` and ``vertebrae`` parts written, ``trials.parquet``
  rewritten; the median of ``repeats`` refreshes of the same trial (each replaces its rows).

Also at each N: ``read_<table>_s``, reading a whole table with its parts while the study runs
(:func:`vertstudy.study.tables.read_table`), beside ``old_read_vertebrae_s``, reading the one
file the old refresh wrote. At the end: ``end_sync_s``, the study's end
(:func:`vertstudy.study.refresh.sync_tables`: the tables checked against Ray's folders, the
parts compacted into one file per table), and whether the compacted tables equal the old full
rebuild (``compacted_equals_old``). Figures carry their units; ``_at_N`` says the trial count.
"""

from __future__ import annotations

import json
import math
import random
import statistics
import time
from pathlib import Path
from types import SimpleNamespace

from vertstudy.bench import format_figures, smoke_study, work_folder

#: searched values of the simulated study (numbers and a choice, as a real search samples)
SPACE = {
    "loss.balance_b": {"type": "float", "low": 2.0, "high": 4.0},
    "train.lr": {"type": "logfloat", "low": 1.0e-3, "high": 1.0e-2},
    "train.schedule.kind": {"type": "choice", "values": ["plateau", "cosine", "step"]},
}
REGIONS = ("cervical", "thoracic", "lumbar")


def trial_id_of(i: int) -> str:
    return f"bench{i:05d}_{i:05d}"


def _epoch_record(rng: random.Random, epoch: int) -> dict:
    """One epoch as the trainer reports it (:mod:`vertstudy.train.trainer`)."""
    record = {"epoch": epoch, "loss": rng.uniform(0.1, 2.0), "loss_cls": rng.uniform(0.0, 1.0),
              "loss_reg": rng.uniform(0.0, 1.0), "val_loss": rng.uniform(0.1, 2.0),
              "val_loc_error_mm": rng.uniform(2.0, 30.0), "val_id_rate": rng.random(), "val_map": rng.random(),
              "lr": 1e-3 * rng.random(), "wall_s": rng.uniform(5.0, 50.0), "crops_per_s": rng.uniform(10.0, 100.0)}
    for region in REGIONS:
        record |= {f"val_loc_error_mm_{region}": rng.uniform(2.0, 30.0), f"val_id_rate_{region}": rng.random(),
                   f"val_map_{region}": rng.random()}
    return record


def held_out(rng: random.Random, cases: int, vertebrae: int) -> list[dict]:
    """``cases`` x ``vertebrae`` held-out rows through :func:`vertstudy.study.schema.held_out_rows`."""
    from vertstudy.anatomy import region_of
    from vertstudy.study.schema import held_out_rows

    per_case = []
    for c in range(cases):
        case = SimpleNamespace(case_id=f"case-{c:03d}", tags={"fov": rng.choice(["full", "lumbar"]),
                                                              "metal": rng.choice(["0", "1"]), "curvature": "mild"})
        rows = []
        for label in range(vertebrae):
            truth, found = rng.random() < 0.9, rng.random() < 0.85
            point = tuple(rng.uniform(-200, 200) for _ in range(3))
            rows.append(SimpleNamespace(
                label=label, region=region_of(label % 26), in_truth=truth, predicted=found,
                error_mm=rng.uniform(0, 40) if truth and found else math.nan, identified=truth and found,
                identified_verse=truth and found and rng.random() < 0.95, true_mm=point if truth else None,
                pred_mm=tuple(v + rng.gauss(0, 3) for v in point) if found else None))
        per_case.append((case, rows))
    return held_out_rows(per_case)


def write_trial(ray_dir: Path, i: int, epochs: int, cases: int, vertebrae: int, seed: int = 0) -> str:
    """Ray's folder of simulated trial ``i`` (completed after ``epochs`` epochs); returns its id."""
    import pyarrow.parquet as pq

    from vertstudy.study.schema import HELD_OUT, to_table

    rng = random.Random(seed * 1_000_003 + i)
    trial_id = trial_id_of(i)
    folder = ray_dir / trial_id
    checkpoint = folder / "checkpoint_000000"
    checkpoint.mkdir(parents=True, exist_ok=True)
    params = {"loss.balance_b": rng.uniform(2.0, 4.0), "train.lr": 10 ** rng.uniform(-3, -2),
              "train.schedule.kind": rng.choice(["plateau", "cosine", "step"])}
    (folder / "params.json").write_text(json.dumps(params))
    where = {"node": f"{i % 4:056x}", "hostname": f"worker-{i % 4}", "device": "cuda:0"}
    t0 = 1.7e9 + 3600.0 * i
    history = [_epoch_record(rng, e) for e in range(1, epochs + 1)]
    results = [{**h, **where, "phase": "epoch", "timestamp": t0 + 30.0 * h["epoch"], "time_this_iter_s": 30.0,
                "training_iteration": h["epoch"], "trial_id": trial_id} for h in history]
    best = min(history, key=lambda h: h["val_loss"])
    figures = {f"test_{k}": rng.random() for k in ("id_rate", "id_rate_verse", "loc_error_mm_mean",
                                                   "loc_error_mm_std", "n_truth", "infer_s_per_case")}
    figures |= {f"test_{k}_{r}": rng.random() for k in ("id_rate", "loc_error_mm_mean") for r in REGIONS}
    rows = held_out(rng, cases, vertebrae)
    final = {**history[-1], **where, "phase": "final", "status": "completed", "message": "", "best_epoch":
             best["epoch"], **{f"best_{k}": v for k, v in best.items() if k.startswith("val_")}, **figures,
             "wall_s": sum(h["wall_s"] for h in history), "seed": 0, "wandb_run": f"run-{trial_id}",
             "held_out_rows": len(rows), "timestamp": t0 + 30.0 * (epochs + 1), "time_this_iter_s": 30.0,
             "checkpoint_dir_name": checkpoint.name, "trial_id": trial_id}
    results.append(final)
    pq.write_table(to_table(rows, "vertebrae"), checkpoint / HELD_OUT)
    (folder / "result.json").write_text("".join(json.dumps(r) + "\n" for r in results))
    return trial_id


def write_state(ray_dir: Path, trial_ids: list[str]) -> None:
    """Ray's saved experiment state: every trial TERMINATED (what the end of a study reads)."""
    entries = [[json.dumps({"trial_id": t, "status": "TERMINATED"}), "{}"] for t in trial_ids]
    (ray_dir / "experiment_state-2025-01-01_00-00-00.json").write_text(json.dumps({"trial_data": entries}))


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def old_refresh(spec, study_dir: Path, out_dir: Path, ended: dict[str, str], meta: dict) -> tuple[float, float]:
    """(seconds reading every ended trial's outcome again, seconds building and writing the
    three tables whole into ``out_dir``): the refresh as it was before the parts."""
    from vertstudy.study.results import ended_outcomes
    from vertstudy.study.tables import rewrite_tables

    t0 = time.perf_counter()
    outcomes = ended_outcomes(spec, str(study_dir), ended, {})
    t1 = time.perf_counter()
    rewrite_tables(str(out_dir), spec.name, outcomes, meta)
    return t1 - t0, time.perf_counter() - t1


def same_table(a, b) -> bool:
    """Same schema, and the same rows in the same order once both are ordered by trial id (a
    stable sort), NaN equal to NaN (``pa.Table.equals`` holds NaN unequal to itself)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if not a.schema.equals(b.schema) or a.num_rows != b.num_rows:
        return False
    a, b = (t.take(pc.sort_indices(t, sort_keys=[("trial_id", "ascending")])) for t in (a, b))
    for name in a.column_names:
        x, y = a[name], b[name]
        if pa.types.is_floating(x.type):
            if not pc.is_nan(x).equals(pc.is_nan(y)):
                return False
            x, y = (pc.if_else(pc.is_nan(c), 0.0, c) for c in (x, y))
        if not x.equals(y):
            return False
    return True


def bench_tables(sizes: tuple[int, ...] = (10, 100, 1000), epochs: int = 70, cases: int = 60, vertebrae: int = 25,
                 repeats: int = 3, workdir: Path | None = None, progress: bool = True) -> dict:
    """Figures of the module docstring (names carry units)."""
    import sys

    from vertstudy.study.refresh import TableRefresh, sync_tables
    from vertstudy.study.tables import REFRESHED, build_tables, read_table, write_tables

    sizes = tuple(sorted(set(sizes)))
    figures: dict = {"trials": list(sizes), "epochs_per_trial": epochs, "held_out_cases": cases,
                     "vertebra_rows_per_case": vertebrae}
    with work_folder(workdir, "vs-bench-tables-") as work:
        name = f"bench-tables-{time.strftime('%H%M%S')}"
        spec = smoke_study(work / "st", name, "bench tables", trials=max(sizes), epochs=epochs, space=SPACE)
        study_dir, old_dir = work / "st" / name, work / "old" / name  # old: its tables only (same Ray folders)
        ray_dir = study_dir / "ray"
        ray_dir.mkdir(parents=True)
        old_dir.mkdir(parents=True)
        meta = {"vertstudy_version": "bench", "git_sha": "0" * 40, "wandb": True, "cpus": 1.0, "gpus": 0.0,
                "search_metric": spec.search.metric, "search_mode": spec.search.mode}
        write_tables(str(study_dir), build_tables(name, [], meta))  # what a study writes before a trial ends
        refresh = TableRefresh(spec, str(study_dir), meta)
        ended: dict[str, str] = {}
        for n in sizes:
            while len(ended) < n:  # the trials before the N-th end, each refreshed as in a study (not timed)
                tid = write_trial(ray_dir, len(ended) + 1, epochs, cases, vertebrae)
                ended[tid] = "complete"
                if len(ended) < n:
                    refresh(ended, {})
            write_state(ray_dir, list(ended))
            last = trial_id_of(n)
            times = []
            for _ in range(repeats):  # the N-th trial's refresh; a repeat replaces its rows
                refresh.written.pop(last, None)
                times.append(_timed(lambda: refresh(ended, {})))
            figures[f"new_refresh_s_at_{n}"] = statistics.median(times)
            read_s, write_s = old_refresh(spec, study_dir, old_dir, ended, meta)
            figures[f"old_read_s_at_{n}"], figures[f"old_write_s_at_{n}"] = read_s, write_s
            figures[f"old_refresh_s_at_{n}"] = figures[f"old_read_s_at_{n}"] + figures[f"old_write_s_at_{n}"]
            figures[f"old_over_new_at_{n}"] = figures[f"old_refresh_s_at_{n}"] / figures[f"new_refresh_s_at_{n}"]
            for table in ("trials", "vertebrae"):
                figures[f"read_{table}_s_at_{n}"] = _timed(lambda t=table: read_table(str(study_dir), t))
            figures[f"old_read_vertebrae_s_at_{n}"] = _timed(lambda: read_table(str(old_dir), "vertebrae"))
            figures[f"vertebra_rows_at_{n}"] = read_table(str(study_dir), "vertebrae").num_rows
            if progress:
                print(f"{n} trials: old refresh {figures[f'old_refresh_s_at_{n}']:.3f} s, new "
                      f"{figures[f'new_refresh_s_at_{n}']:.3f} s", file=sys.stderr)
        figures["end_sync_s"] = _timed(lambda: sync_tables(spec, str(study_dir), meta))
        figures["compacted_equals_old"] = all(
            same_table(read_table(str(study_dir), t), read_table(str(old_dir), t)) for t in REFRESHED)
        figures["parts_left"] = len(list((study_dir / "parts").rglob("*.parquet"))) if (
            study_dir / "parts").exists() else 0
    return figures


def format_table(figures: dict) -> str:
    return format_figures("vertstudy bench tables", figures)
