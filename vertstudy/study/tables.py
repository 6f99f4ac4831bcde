"""The study's Parquet tables (``trials``, ``epochs``, ``vertebrae``; their contract is
:mod:`vertstudy.study.schema`), built
from what the trials reported to Ray and written atomically through pyarrow's filesystems.

A trial reports one result per epoch (``phase: "epoch"``, the trainer's record) and, when it
ends normally, one ``phase: "final"`` result: its status (``completed`` / ``diverged``), best
epoch and metrics, the held-out evaluation (``test_*`` and the vertebra rows as JSON), where it
ran and its W&B run. A trial that Ray stopped early (ASHA) has no final result: ``pruned``; a
trial that failed past its retries: ``error``. Only ended trials enter the tables, so a study
that is running or was killed always has consistent tables.

A refresh after a trial ends costs what that trial adds (:func:`add_trials`): its ``epochs``
and ``vertebrae`` rows go to one part file each (:data:`vertstudy.study.schema.PARTS`), then
its row into ``trials.parquet``, so a trial is in ``trials.parquet`` only once its other rows
are written. :func:`read_table` reads a table's file with its parts; :func:`compact_tables`
merges the parts into the files when the study ends. Every file is written atomically, and a
trial's part replaces its earlier rows, so a refresh that runs twice leaves its rows once.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from vertstudy.study.schema import (
    PARTED,
    PARTS,
    TrialOutcome,
    column_order,
    declared_types,
    epoch_rows,
    to_table,
    trial_row,
    vertebra_rows,
)
from vertstudy.study.storage import join, read_parquet, resolve, uri_join, write_atomic

REFRESHED = ("trials", "epochs", "vertebrae")  # grow whenever a trial ends
PART_SUFFIX = ".parquet"
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
    """Write the three tables whole (their parts, if any, still replace their trials' rows)."""
    for name in REFRESHED:
        write_table(study_dir, name, tables[name])


def rewrite_tables(study_dir: str, study: str, outcomes: list[TrialOutcome], meta: dict[str, Any]) -> None:
    """The three tables of ``outcomes`` built and written whole: what every refresh did before
    the parts (its cost grows with the study); kept to compare against (``bench tables``, tests)."""
    write_tables(study_dir, build_tables(study, outcomes, meta))


def merge_tables(tables: list[pa.Table], name: str) -> pa.Table:
    """One table of the rows of ``tables`` (parts of table ``name``), in the order given: the
    columns of them all (null where a table lacks one; int and float columns widened to float)
    in the schema's column order with its declared types, as :func:`to_table` gives for all
    their rows at once."""
    tables = [t for t in tables if t.num_rows]
    if not tables:
        return to_table([], name)
    merged = pa.concat_tables(tables, promote_options="permissive")
    return declared_types(merged.select(column_order(merged.column_names)), name)


def _by_trial(table: pa.Table) -> pa.Table:
    """``table`` ordered by ``trial_id``, each trial's rows in their order (a stable sort)."""
    if table.num_rows < 2:
        return table
    return table.take(pc.sort_indices(table, sort_keys=[("trial_id", "ascending")]))


def _without(table: pa.Table, trial_ids) -> pa.Table:
    """``table`` without the rows of ``trial_ids``."""
    if not table.num_rows or not trial_ids:
        return table
    return table.filter(pc.invert(pc.is_in(table["trial_id"], value_set=pa.array(sorted(trial_ids), pa.string()))))


def part_path(study_dir: str, name: str, trial_id: str) -> str:
    """``<study_dir>/parts/<name>/<trial_id>.parquet``: the rows of one trial in table ``name``."""
    return uri_join(study_dir, PARTS, name, f"{trial_id}{PART_SUFFIX}")


def list_parts(study_dir: str, name: str) -> dict[str, str]:
    """``{trial_id: path in the storage's filesystem}`` of the parts of table ``name``
    (hidden temporary files of writes under way left out)."""
    fs, base = resolve(study_dir)
    infos = fs.get_file_info(pafs.FileSelector(join(base, PARTS, name), allow_not_found=True))
    return {i.base_name[: -len(PART_SUFFIX)]: i.path for i in infos
            if i.type == pafs.FileType.File and i.base_name.endswith(PART_SUFFIX) and not i.base_name.startswith(".")}


def write_part(study_dir: str, name: str, trial_id: str, table: pa.Table) -> str:
    """Write one trial's rows of table ``name`` as its part, atomically (replacing an earlier one)."""
    location = part_path(study_dir, name, trial_id)
    fs, path = resolve(location)
    fs.create_dir(path.rpartition("/")[0], recursive=True)
    return write_atomic(location, lambda fs, tmp: pq.write_table(table, tmp, filesystem=fs))


def delete_parts(study_dir: str, trial_ids, names=PARTED) -> None:
    """Remove the parts of ``trial_ids`` (those that exist)."""
    fs, _ = resolve(study_dir)
    for name in names:
        have = list_parts(study_dir, name)
        for trial_id in sorted(set(trial_ids) & set(have)):
            fs.delete_file(have[trial_id])


def _trial_ids(fs, base: str) -> set[str]:
    """The trial ids of ``trials.parquet`` (none when it does not exist)."""
    path = join(base, "trials.parquet")
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return set()
    return set(read_parquet(fs, path, columns=["trial_id"])["trial_id"].to_pylist())


def add_trials(study_dir: str, study: str, outcomes: Iterable[TrialOutcome], meta: dict[str, Any],
               drop=frozenset()) -> None:
    """Write the rows of ``outcomes`` (ended trials, built one at a time if given as a
    generator): each trial's ``epochs`` and ``vertebrae`` rows as its parts, then
    ``trials.parquet`` with their rows in place of any earlier ones of the same trials and
    without the rows of ``drop``. Costs what the trials add, plus one rewrite of
    ``trials.parquet`` (one row per ended trial)."""
    fresh, ids = [], set()
    for o in outcomes:
        tables = build_tables(study, [o], meta)
        for name in PARTED:
            write_part(study_dir, name, o.trial_id, tables[name])
        fresh.append(tables["trials"])
        ids.add(o.trial_id)
    old = _without(read_table(study_dir, "trials"), ids | set(drop))
    write_table(study_dir, "trials", _by_trial(merge_tables([old, *fresh], "trials")))


def _read_parts(fs, paths: list[str]) -> list[pa.Table]:
    """The tables of ``paths``, in order; read on a few threads (a part is small: the time of a
    read is mostly opening it, and on an object store, waiting for it)."""
    from concurrent.futures import ThreadPoolExecutor

    if len(paths) < 4:
        return [read_parquet(fs, p) for p in paths]
    with ThreadPoolExecutor(max_workers=min(16, len(paths))) as pool:
        return list(pool.map(lambda p: read_parquet(fs, p), paths))


def read_table(study_dir: str, name: str) -> pa.Table:
    """Table ``name`` of a study: ``<study_dir>/<name>.parquet`` (an empty table when the study
    has none yet) with, for ``epochs`` and ``vertebrae``, the rows of the trials that have a part
    in place of the file's rows of those trials (only trials that ``trials.parquet`` holds),
    ordered by trial id: the whole table, while the study runs as after it ended."""
    fs, base = resolve(study_dir)
    path = join(base, f"{name}.parquet")
    parts = list_parts(study_dir, name) if name in PARTED else {}
    exists = fs.get_file_info(path).type != pafs.FileType.NotFound
    table = read_parquet(fs, path) if exists else None
    if not parts:
        return table if table is not None else to_table([])
    ended = _trial_ids(fs, base)
    parts = {t: p for t, p in parts.items() if t in ended}  # a part whose trial row is not written yet: not yet
    kept = _without(table, parts) if table is not None else None
    tables = ([kept] if kept is not None and kept.num_rows else []) + _read_parts(fs, [parts[t] for t in sorted(parts)])
    merged = merge_tables(tables, name)
    return _by_trial(merged) if kept is not None and kept.num_rows else merged


def compact_tables(study_dir: str, drop=frozenset()) -> None:
    """Merge the parts of ``epochs`` and ``vertebrae`` into their ``.parquet`` files (without the
    rows of the trials ``drop``), then remove the parts: what readers read is one file per
    table again. Each file is written whole before any part goes, and a part left by a stop
    in between holds the same rows as the file, so the tables read the same at every step.
    Nothing is written when there are no parts and nothing to drop."""
    fs, base = resolve(study_dir)
    merged = {}
    for name in PARTED:
        parts = list_parts(study_dir, name)
        if parts or drop:
            write_table(study_dir, name, _without(read_table(study_dir, name), set(drop)))
        merged[name] = parts
    for parts in merged.values():
        for path in parts.values():
            fs.delete_file(path)
    for folder in [*(join(base, PARTS, n) for n in PARTED), join(base, PARTS)]:
        _remove_if_empty(fs, folder)


def _remove_if_empty(fs, folder: str) -> None:
    try:
        if fs.get_file_info(folder).type == pafs.FileType.Directory and not fs.get_file_info(
                pafs.FileSelector(folder)):
            fs.delete_dir(folder)
    except OSError:  # gone meanwhile, or a part just went into it: it stays
        pass
