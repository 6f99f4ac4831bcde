"""The tables grow by what each ended trial adds (per-trial parts), read whole at any time and
compacted at the end into what a full rebuild writes. Real files throughout: outcomes built by
hand, and trials in Ray's folder layout read back by the real code (``vertstudy.bench.tables``)."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from vertstudy.bench import smoke_study
from vertstudy.bench.tables import SPACE, same_table, trial_id_of, write_state, write_trial
from vertstudy.cli import main
from vertstudy.study.refresh import TableRefresh, sync_tables
from vertstudy.study.results import ended_outcomes
from vertstudy.study.schema import PARTED, PARTS, TrialOutcome
from vertstudy.study.tables import (
    REFRESHED,
    add_trials,
    build_tables,
    compact_tables,
    read_table,
    rewrite_tables,
    write_tables,
)

META = {"vertstudy_version": "test", "git_sha": "abc", "wandb": False, "cpus": 1.0, "gpus": 0.0,
        "search_metric": "val_loc_error_mm", "search_mode": "min"}


def by_trial(table: pa.Table) -> pa.Table:
    return table.take(pc.sort_indices(table, sort_keys=[("trial_id", "ascending")]))


def outcome(i: int, status: str = "completed") -> TrialOutcome:
    """A trial as the tables see it, without NaN (so ``pa.Table.equals`` compares it whole).
    Trials differ in their columns, as real ones do: a conditional parameter, whole-CT
    validation in some epochs, an integer where another trial has a float, no final report
    (pruned) or no epoch at all (error)."""
    rng = random.Random(i)
    config = {"loss.balance_b": rng.uniform(2, 4), "train.epochs": 3, "seed": i, "train.schedule.kind": "step"}
    if i % 2:
        config |= {"train.schedule.kind": "plateau", "train.schedule.patience": 5}
    epochs = [] if status == "error" else [
        {"epoch": e, "loss": rng.random(), "val_loss": rng.random(), "val_loc_error_mm": rng.uniform(1, 20),
         "lr": 1 if i % 3 == 0 else 0.5, "wall_s": 2.0, **({"val_ct_id_rate": rng.random()} if i % 3 == 1 else {})}
        for e in range(1, 4)]
    final, rows = {}, []
    if status == "completed":
        final = {"status": "completed", "best_epoch": 2, "test_id_rate": rng.random(), "wall_s": 7.5,
                 "node": "n1", "hostname": "h1", "device": "cpu", "wandb_run": f"r{i}"}
        rows = [{"case": f"case-{c}", "label": v, "region": "lumbar", "in_truth": True, "predicted": bool(v % 2),
                 "error_mm": rng.uniform(0, 10), "identified": bool(v % 2), "identified_verse": bool(v % 2),
                 **({"metal": "1"} if c else {})} for c in range(2) for v in range(3)]
    return TrialOutcome(trial_id=f"t{i:03d}", status=status, config=config, epochs=epochs, final=final,
                        checkpoint=f"/ckpt/{i}", error="boom" if status == "error" else "",
                        where={"node": "n1", "hostname": "h1", "device": "cpu"}, params={"b": i},
                        started_at=100.0 * i, ended_at=100.0 * i + 50, vertebrae=rows)


def outcomes() -> list[TrialOutcome]:
    statuses = ["completed", "completed", "pruned", "completed", "error", "completed", "pruned", "completed"]
    return [outcome(i, s) for i, s in enumerate(statuses)]


def fresh_study(path: Path) -> str:
    """A study directory as a study has it before any trial ended: the empty tables."""
    path.mkdir(parents=True, exist_ok=True)
    write_tables(str(path), build_tables("s", [], META))
    return str(path)


def parts_of(study_dir: str, name: str) -> list[str]:
    return sorted(p.stem for p in (Path(study_dir) / PARTS / name).glob("*.parquet"))


def test_each_trial_adds_one_part_per_table_and_a_row(tmp_path):
    study = fresh_study(tmp_path / "s")
    first, second = outcomes()[:2]
    add_trials(study, "s", [first], META)
    assert {n: parts_of(study, n) for n in PARTED} == {n: ["t000"] for n in PARTED}
    assert pq.read_table(Path(study) / "trials.parquet")["trial_id"].to_pylist() == ["t000"]
    add_trials(study, "s", [second], META)
    assert {n: parts_of(study, n) for n in PARTED} == {n: ["t000", "t001"] for n in PARTED}
    assert read_table(study, "trials")["trial_id"].to_pylist() == ["t000", "t001"]
    assert read_table(study, "epochs").num_rows == 6 and read_table(study, "vertebrae").num_rows == 12


def test_a_trial_refreshed_twice_has_its_rows_once(tmp_path):
    study = fresh_study(tmp_path / "s")
    o = outcomes()[1]
    for _ in range(3):  # the same trial again: its part and its row are replaced
        add_trials(study, "s", [o], META)
    assert read_table(study, "trials")["trial_id"].to_pylist() == ["t001"]
    assert read_table(study, "epochs")["epoch"].to_pylist() == [1, 2, 3]
    assert read_table(study, "vertebrae").num_rows == 6
    compact_tables(study)
    assert pq.read_table(Path(study) / "epochs.parquet")["epoch"].to_pylist() == [1, 2, 3]


def test_compacted_tables_equal_the_old_full_rebuild(tmp_path):
    """Trials added one by one in any order, then compacted: the same rows, schema and order
    as the three tables built and written whole from all the outcomes at once."""
    all_ = outcomes()
    study = fresh_study(tmp_path / "new")
    for o in random.Random(0).sample(all_, len(all_)):
        add_trials(study, "s", [o], META)
    during = {name: read_table(study, name) for name in REFRESHED}
    compact_tables(study)
    old = tmp_path / "old"
    old.mkdir()
    rewrite_tables(str(old), "s", all_, META)
    for name in REFRESHED:
        whole = pq.read_table(old / f"{name}.parquet")
        compacted = pq.read_table(Path(study) / f"{name}.parquet")
        assert compacted.schema.equals(whole.schema), name
        assert compacted.equals(whole), name  # already ordered by trial id
        assert by_trial(during[name]).equals(by_trial(whole)), name  # read while the study ran
    assert not (Path(study) / PARTS).exists()  # the parts are gone once compacted


def test_read_table_while_the_study_runs_reads_the_parts(tmp_path):
    study = fresh_study(tmp_path / "s")
    all_ = outcomes()
    add_trials(study, "s", all_[:3], META)
    for name in PARTED:  # no table file yet at all: the parts alone
        (Path(study) / f"{name}.parquet").unlink()
    expected = build_tables("s", all_[:3], META)
    for name in REFRESHED:
        assert read_table(study, name).equals(expected[name]), name
    # a part written by a refresh stopped before its trial's row: not part of the table yet
    orphan = build_tables("s", [all_[5]], META)["epochs"]
    pq.write_table(orphan, Path(study) / PARTS / "epochs" / "t005.parquet")
    assert "t005" not in read_table(study, "epochs")["trial_id"].to_pylist()
    compact_tables(study)
    assert pq.read_table(Path(study) / "epochs.parquet").equals(expected["epochs"])


WRITER = """
import sys, time
from vertstudy.study.tables import add_trials, read_table
sys.path.insert(0, sys.argv[2])
from test_tables_parts import META, outcome
study, end = sys.argv[1], time.time() + float(sys.argv[3])
n = 0
while time.time() < end:  # trials.parquet replaced again and again, its size changing each time
    n += 1
    add_trials(study, "s", [outcome(n % 7)], META, drop={f"t{k:03d}" for k in range(n % 7 + 1, 7)})
print(n)
"""


def test_a_table_replaced_while_it_is_read_is_read_whole(tmp_path):
    """Another process (the study's driver) replaces ``trials.parquet`` over and over while this
    one reads it (``study status``, a test polling a running study): every read gets a whole
    table, old or new. (pyarrow's ``pq.read_table(path)`` took the size of one file and the
    bytes of the next: CI once failed on "Page was smaller (7) than expected (12)".)"""
    import subprocess
    import sys
    import time

    study = fresh_study(tmp_path / "s")
    writer = subprocess.Popen([sys.executable, "-c", WRITER, study, str(Path(__file__).parent), "6"],
                              stdout=subprocess.PIPE, text=True)
    reads, sizes = 0, set()
    try:
        while not any((Path(study) / PARTS / "epochs").glob("*.parquet")):
            time.sleep(0.05)
        end = time.time() + 4
        while time.time() < end:
            sizes.add(read_table(study, "trials").num_rows)
            reads += 1
    finally:
        out, _ = writer.communicate(timeout=60)
    assert writer.returncode == 0
    assert int(out) > 20 and reads > 100 and len(sizes) > 2  # the file did change under the reads


def test_a_part_written_after_a_compaction_replaces_the_trials_rows(tmp_path):
    """Resume after a compaction: an errored trial retried and completed replaces its rows,
    a new trial adds its own, and a trial dropped at compaction leaves every table."""
    study = fresh_study(tmp_path / "s")
    add_trials(study, "s", [outcome(1), outcome(2, "error"), outcome(3)], META)
    compact_tables(study)
    add_trials(study, "s", [outcome(2), outcome(4)], META)
    want = build_tables("s", [outcome(1), outcome(2), outcome(3), outcome(4)], META)
    assert same_table(read_table(study, "vertebrae"), want["vertebrae"])
    assert read_table(study, "epochs")["trial_id"].to_pylist() == [t for t in ("t001", "t002", "t003", "t004")
                                                                  for _ in range(3)]
    add_trials(study, "s", [], META, drop={"t003"})
    compact_tables(study, drop={"t003"})
    want = build_tables("s", [outcome(1), outcome(2), outcome(4)], META)
    for name in PARTED:
        assert pq.read_table(Path(study) / f"{name}.parquet").equals(want[name]), name
    assert read_table(study, "trials")["trial_id"].to_pylist() == ["t001", "t002", "t004"]
    assert not (Path(study) / PARTS).exists()


@pytest.fixture()
def ray_study(tmp_path):
    """A study directory with 4 ended trials in Ray's folder layout (small ones)."""
    spec = smoke_study(tmp_path / "st", "sim", "test", trials=4, epochs=3, space=SPACE)
    study_dir = tmp_path / "st" / "sim"
    (study_dir / "ray").mkdir(parents=True)
    fresh_study(study_dir)
    ids = [write_trial(study_dir / "ray", i, epochs=3, cases=2, vertebrae=4) for i in range(1, 5)]
    return spec, study_dir, ids


def old_tables(spec, study_dir: Path, out: Path) -> dict[str, pa.Table]:
    out.mkdir()
    rewrite_tables(str(out), spec.name, ended_outcomes(spec, str(study_dir)), META)
    return {name: pq.read_table(out / f"{name}.parquet") for name in REFRESHED}


def test_the_driver_refresh_writes_each_ended_trial_once(ray_study, tmp_path):
    spec, study_dir, ids = ray_study
    refresh = TableRefresh(spec, str(study_dir), META)
    assert refresh({ids[0]: "complete"}) == [ids[0]]
    assert refresh({ids[0]: "complete", ids[1]: "complete"}) == [ids[1]]  # the first is not read again
    assert refresh({ids[0]: "complete", ids[1]: "complete"}) == []
    again = TableRefresh(spec, str(study_dir), META)  # a new driver (resumed) refreshing the same trials
    assert again({ids[0]: "complete", ids[1]: "complete"}) == ids[:2]
    assert read_table(str(study_dir), "trials")["trial_id"].to_pylist() == ids[:2]
    assert read_table(str(study_dir), "vertebrae").num_rows == 2 * 2 * 4


def test_the_end_of_a_study_adds_missed_trials_drops_unknown_ones_and_compacts(ray_study, tmp_path):
    """The end (and the start of a resume): a trial whose end no driver wrote is added, an
    error row whose trial completed since is rewritten, the rows of a trial Ray no longer
    knows are dropped; the compacted tables equal the old full rebuild, and so does export's."""
    spec, study_dir, ids = ray_study
    refresh = TableRefresh(spec, str(study_dir), META)
    refresh({ids[0]: "complete", ids[1]: "error"})
    extra = write_trial(study_dir / "ray", 9, epochs=3, cases=2, vertebrae=4)
    refresh({extra: "complete"})
    shutil.move(study_dir / "ray" / extra, tmp_path / extra)  # moved aside (discard_unrecorded_trials)
    write_state(study_dir / "ray", ids)  # all four TERMINATED
    statuses = sync_tables(spec, str(study_dir), META)
    assert statuses == {t: "completed" for t in ids}
    assert not (study_dir / PARTS).exists()
    want = old_tables(spec, study_dir, tmp_path / "old")
    for name in REFRESHED:
        assert same_table(pq.read_table(study_dir / f"{name}.parquet"), want[name]), name
    assert sync_tables(spec, str(study_dir), META, rebuild=True) == statuses  # study export
    for name in REFRESHED:
        assert same_table(pq.read_table(study_dir / f"{name}.parquet"), want[name]), name


def test_an_error_row_gets_its_error_once_ray_copied_it(ray_study):
    """Ray copies a failed trial's error.txt to the storage after the driver heard of the error:
    the next refresh, and the study's end, write the row again with it."""
    spec, study_dir, ids = ray_study

    def message() -> str:
        trials = read_table(str(study_dir), "trials").to_pylist()
        return next(r["message"] for r in trials if r["trial_id"] == ids[0])

    results = study_dir / "ray" / ids[0] / "result.json"
    results.write_text("".join(results.read_text().splitlines(keepends=True)[:-1]))  # failed: no final result
    refresh = TableRefresh(spec, str(study_dir), META)
    assert refresh({ids[0]: "error"}) == [ids[0]] and message() == ""
    (study_dir / "ray" / ids[0] / "error.txt").write_text("Traceback ...\nRuntimeError: out of memory\n")
    assert refresh({ids[0]: "error", ids[1]: "complete"}) == ids[:2]
    assert message() == "RuntimeError: out of memory"
    assert refresh({ids[0]: "error", ids[1]: "complete"}) == []
    (study_dir / "ray" / ids[0] / "error.txt").write_text("RuntimeError: the last word\n")
    (study_dir / "ray" / "experiment_state-2025-01-01_00-00-00.json").write_text(json.dumps({"trial_data": [
        [json.dumps({"trial_id": t, "status": "ERROR" if t == ids[0] else "TERMINATED"}), "{}"] for t in ids]}))
    assert sync_tables(spec, str(study_dir), META) == {ids[0]: "error", **{t: "completed" for t in ids[1:]}}
    assert message() == "RuntimeError: the last word"


def test_bench_tables_runs_from_the_command_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "tables", "--help"])
    assert exit_info.value.code == 0 and "--trials" in capsys.readouterr().out
    code = main(["bench", "tables", "--trials", "2", "3", "--epochs", "2", "--cases", "1", "--vertebrae", "2",
                 "--repeats", "1", "--workdir", str(tmp_path / "w"), "--json"])
    assert code == 0
    figures = json.loads(capsys.readouterr().out)
    assert figures["trials"] == [2, 3] and figures["compacted_equals_old"] is True and figures["parts_left"] == 0
    for n in (2, 3):
        assert figures[f"old_refresh_s_at_{n}"] > 0 and figures[f"new_refresh_s_at_{n}"] > 0
        assert figures[f"vertebra_rows_at_{n}"] == 2 * n
    assert figures["end_sync_s"] > 0
    assert trial_id_of(3) in {p.name for p in (tmp_path / "w" / "st").glob("*/ray/*")}
