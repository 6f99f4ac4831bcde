"""Reproducible studies (``search.reproducible``): the virtual clock and stable ids on their own,
then a small real study run twice on a real local Ray cluster, the second time beside a
CPU-bound process and with every epoch delayed at random, whose tables must be the same."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pyarrow.parquet as pq
import pytest
import yaml

from tests.study.conftest import tiny_spec
from vertstudy.report.summary import search_lines, search_rows, table_lines
from vertstudy.study.ordered import (
    VirtualClock,
    comparable_rows,
    compare_studies,
    rung_cutoff,
    rung_milestones,
    stable_trial_id,
    trial_number,
    trial_seed,
)
from vertstudy.study.tables import read_table


def test_stable_ids_name_the_study_and_the_number():
    assert stable_trial_id("quickstart", 3) == stable_trial_id("quickstart", 3)
    assert stable_trial_id("quickstart", 3) != stable_trial_id("quickstart-smoke", 3)
    assert stable_trial_id("quickstart", 3).endswith("_00003")
    assert trial_number(stable_trial_id("quickstart", 12)) == 12
    with pytest.raises(ValueError, match="not a stable trial id"):
        trial_number("3f2a9c1e")
    assert trial_seed(0, 1) == trial_seed(0, 1) != trial_seed(0, 2)


def test_virtual_clock_starts_trials_when_the_first_slot_frees_in_epochs_not_in_seconds():
    clock = VirtualClock(2)
    assert clock.begin() == (0, 0) and clock.begin() == (1, 0)
    assert clock.next_start() is None  # both running
    clock.report(0, 5)
    clock.report(1, 3)
    clock.finish(1)  # trial 1 pruned after 3 epochs; trial 0 is at epoch 5 > 3: trial 1 ended first
    assert clock.next_start() == 3
    assert clock.begin() == (2, 3) and clock.ended_by(3) == [1]
    # trial 0 ends at 20 in reality before trial 2 has run 17 epochs: whether trial 2 ends first
    # is not known yet, so the next trial waits
    clock.finish(0, 20)
    clock.report(2, 16)
    assert clock.next_start() is None
    clock.report(2, 17)
    assert clock.next_start() is None  # trial 2 at 3 + 17 = 20 may end at 20 too
    clock.report(2, 18)
    assert clock.next_start() == 20 and clock.begin() == (3, 20)
    assert clock.ended_by(20) == [0, 1]


def test_virtual_clock_ignores_which_trial_really_ended_first():
    """Two orders of the same events give the same starts and the same trials seen."""

    def run(order):
        clock = VirtualClock(2)
        clock.begin(), clock.begin()
        seen = []
        for k, epochs in order:
            clock.finish(k, epochs)
            while len(clock.start) < 4 and clock.next_start() is not None:
                k2, t = clock.begin()
                seen.append((k2, t, tuple(clock.ended_by(t))))
                clock.report(k2, 0)
        return seen

    # trial 1 (4 epochs) ends before or after trial 0 (10 epochs) in real time
    assert run([(1, 4), (0, 10), (2, 2)]) == run([(0, 10), (1, 4), (2, 2)]) == [
        (2, 4, (1,)), (3, 6, (1, 2))]


def test_rungs_and_cutoffs_are_ray_ashas():
    from ray.tune.schedulers.async_hyperband import _Bracket

    assert rung_milestones(20, 2, 71) == [20, 40]
    assert sorted(m for m, _ in _Bracket(20, 71, 2, 0)._rungs) == [20, 40]
    assert rung_milestones(1, 2, 5) == [1, 2, 4]
    assert rung_cutoff([], 2) is None
    assert rung_cutoff([0.2, 0.6], 2) == pytest.approx(_Bracket(1, 5, 2, 0).cutoff({"a": 0.2, "b": 0.6}))


def test_a_resumed_driver_asks_what_the_killed_one_asked(tmp_path):
    """A driver killed after asking Optuna for a trial but before saving its searcher's state:
    the resumed searcher (Ray's saved state) asks that trial again, with the same values, and the
    orphan Optuna trial is marked FAIL instead of standing beside the constant liar's trials."""
    from vertstudy.study.search import searcher

    spec = tiny_spec("killed", tmp_path / "st", num_samples=4, search={
        "algorithm": "optuna-tpe", "reproducible": True, "startup_trials": 1})
    study_dir = tmp_path / "st" / "killed"
    study_dir.mkdir(parents=True)
    first = searcher(spec, str(study_dir))
    first.suggest("t0"), first.suggest("t1")
    final = {"phase": "final", "epoch": 2, "training_iteration": 3, "val_loc_error_mm": 20.0}
    first.on_trial_result("t0", {"phase": "epoch", "epoch": 2, "training_iteration": 2, "val_loc_error_mm": 20.0})
    first.on_trial_complete("t0", final)
    first.on_trial_result("t1", {"phase": "epoch", "epoch": 3, "training_iteration": 3, "val_loc_error_mm": 30.0})
    first.save(str(tmp_path / "state.pkl"))  # Ray's last save before the kill
    asked = first.suggest("t2")  # then the driver dies
    assert asked is not None
    again = searcher(spec, str(study_dir))
    again.restore(str(tmp_path / "state.pkl"))
    assert again.suggest("t2") == asked
    states = [t.state for t in optuna.load_study(study_name="killed", storage=f"sqlite:///{study_dir}/optuna.db")
              .get_trials()]
    assert states == [optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.RUNNING,
                      optuna.trial.TrialState.FAIL, optuna.trial.TrialState.RUNNING]

def same(dir_a, dir_b, also_aside: tuple[str, ...] = ()) -> bool:
    """The tables of two runs are the same (timing columns aside, and the columns
    ``also_aside``). ``git_sha`` is left out: the runs share this process's code, but another
    commit may land in the working tree meanwhile."""
    diffs = compare_studies(dir_a, dir_b)
    left = {k: [d for d in v if not any(f"column {c}:" in d for c in ("git_sha", *also_aside))]
            for k, v in diffs.items()}
    assert left == {"trials": [], "epochs": [], "vertebrae": []}
    return True


FIELDS = dict(num_samples=6, concurrency=2, config={"train.epochs": 4},
              search={"algorithm": "optuna-tpe", "reproducible": True, "startup_trials": 2},
              scheduler={"kind": "asha", "grace_period": 1, "reduction_factor": 2})


@pytest.fixture(scope="module")
def reference(ray_cluster, storage):
    """The small study of this module (6 trials two at a time, TPE after 2 start-up trials, ASHA
    from epoch 1), run once undisturbed: (its spec, its result)."""
    from vertstudy.study.runner import run_study

    spec = tiny_spec("again", storage / "first", **FIELDS)
    return spec, run_study(spec, progress=False)


def _drop_epoch_2_reports(study_dir) -> list[str]:
    """Remove the epoch-2 report from the ``result.json`` of every trial that reported later
    epochs (as a killed driver's background copy can); returns those trials' ids."""
    dropped = []
    for results in sorted((study_dir / "ray").glob("*/result.json")):
        lines = results.read_text(encoding="utf-8").splitlines()
        records = [json.loads(ln) if ln.strip() else {} for ln in lines]
        kept = [ln for ln, r in zip(lines, records, strict=True)
                if not (r.get("phase") == "epoch" and r.get("epoch") == 2)]
        if len(kept) < len(lines) and any(r.get("phase") == "epoch" and r.get("epoch", 0) > 2 for r in records):
            results.write_text("\n".join(kept) + "\n", encoding="utf-8")
            dropped.append(results.parent.name)
    return dropped


def test_an_epoch_missing_from_rays_copied_results_comes_from_the_checkpoint(reference, tmp_path):
    """Ray copies ``result.json`` to the storage in the background: a driver killed before a copy
    can leave it without an epoch whose checkpoint the resumed trial went on from, so that epoch
    is never reported again, though later ones are. Each checkpoint carries the trial's epoch
    reports (``epochs.jsonl``), and ``study export`` of such a study gives the same tables. (A
    trial's *last* report lost is not covered: the newest checkpoint the driver recorded is then
    the one before, see ``results._latest_checkpoint``.)"""
    import shutil

    from vertstudy.study.schema import REPORTED

    _, a = reference
    copy = tmp_path / "again"
    shutil.copytree(a.study_dir, copy)
    dropped = _drop_epoch_2_reports(copy)
    assert dropped, "no trial of the reference study reported epochs after epoch 2"
    assert list((copy / "ray").glob(f"{dropped[0]}/checkpoint_*/attempt-*/{REPORTED}"))
    exported = subprocess.run([*CLI, "export", str(copy)], capture_output=True, text=True, timeout=300)
    assert exported.returncode == 0, exported.stdout + exported.stderr
    epochs = pq.read_table(copy / "epochs.parquet").to_pylist()
    assert set(dropped) <= {r["trial_id"] for r in epochs if r["epoch"] == 2}
    assert same(a.study_dir, str(copy))


def test_a_resumed_scheduler_learns_an_epoch_missing_from_rays_copied_results(reference, tmp_path):
    """The reproducible ASHA of a resumed driver rebuilds its rung records from the trials'
    stored reports: an epoch-2 report that ``result.json`` lost comes from the checkpoint, so
    rung 2 holds the epoch-2 values, not the epoch-3 ones (CI once saw a trial go on past the
    rung where the reference stopped it this way)."""
    import shutil

    from ray.tune.experiment import Trial

    from vertstudy.study.search import scheduler

    spec, a = reference
    copy = tmp_path / "again"
    shutil.copytree(a.study_dir, copy)
    assert _drop_epoch_2_reports(copy)

    def records(study_dir) -> dict:
        asha = scheduler(spec, str(study_dir))
        for trial_id in sorted(p.name for p in (study_dir / "ray").iterdir() if p.is_dir() and p.name[0] != "."):
            trial = Trial("vertstudy_scheduler_check", stub=True, trial_id=trial_id)
            trial.status = Trial.TERMINATED
            asha._learn(trial)
        return asha._records

    rebuilt = records(copy)
    assert 2 in rebuilt and rebuilt[2], "no trial of the reference study reached rung 2: the test shows nothing"
    assert rebuilt == records(Path(a.study_dir))


@pytest.mark.slow
def test_a_study_run_twice_gives_the_same_tables_whatever_the_timing(reference, storage):
    """The second run has a CPU-bound process beside it and every epoch delayed at random, so
    trials end in other orders; the tables (timing columns aside), Optuna's record and the best
    trial are the same."""
    from vertstudy.study.runner import run_study
    from vertstudy.study.search import open_optuna_storage

    first, a = reference
    second = tiny_spec("again", storage / "second", inject_delay_s=0.8, **FIELDS)
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        b = run_study(second, progress=False)
    finally:
        busy.kill()
        busy.wait()
    assert same(a.study_dir, b.study_dir)
    trials = comparable_rows(a.study_dir, "trials")
    assert [t["trial_id"] for t in trials] == [stable_trial_id("again", n) for n in range(6)]
    assert any(t["status"] == "pruned" for t in trials), "ASHA stopped no trial: the test shows nothing"
    assert a.best["trial_id"] == b.best["trial_id"]
    records = []
    for spec, result in ((first, a), (second, b)):
        study = optuna.load_study(study_name="again", storage=open_optuna_storage(spec, result.study_dir))
        records.append([(t.number, t.state, t.params, t.value, t.intermediate_values) for t in study.get_trials()])
    assert records[0] == records[1]
    # every pruned trial's last value is among its intermediate values (what TPE ranks it by)
    pruned = [r for r in records[0] if r[1] == optuna.trial.TrialState.PRUNED]
    assert pruned and all(r[4] for r in pruned)
    # what `study run` prints about the search: the trials in sampling order, what ASHA stopped
    rows = search_rows(first, a.study_dir)
    assert [r["trial"] for r in rows] == [stable_trial_id("again", n) for n in range(6)]
    assert [r["status"] for r in rows] == [t["status"] for t in trials]
    lines = search_lines(first, a.study_dir)
    assert lines[0] == "search: 6 trials; the first 2 drawn at random, the other 4 by TPE (reproducible: " \
                       "search.reproducible)"
    assert lines[1].startswith(f"ASHA stopped {len(pruned)} of 6 trials (after epoch: trials ")
    table = table_lines(rows)
    assert len(table) == 7 and table[0].split()[:3] == ["trial", "status", "epochs"]
    assert all(line.isascii() for line in table + lines)  # stdout may be a pipe that takes ASCII only


def run_and_kill(spec, ray_cluster, tmp_path, study_dir, ended: int = 2, also=None) -> None:
    """``study run`` of ``spec`` in a driver of its own, SIGKILLed once ``ended`` trials have
    ended and ``also(study_dir)`` holds (when given)."""
    path = tmp_path / f"{spec.name}.yaml"
    path.write_text(yaml.safe_dump(spec.model_dump(mode="json")), encoding="utf-8")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    driver = subprocess.Popen([*CLI, "run", str(path), "--address", ray_cluster, "--no-progress"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 300
    try:
        while time.time() < deadline:
            done = read_table(str(study_dir), "trials").num_rows  # the driver replaces it as we read
            if done >= ended and (also is None or also(study_dir)):
                break
            assert driver.poll() is None, driver.stdout.read().decode()
            time.sleep(0.3)
        else:
            pytest.fail(f"{ended} trials did not end within 300 s" + ("" if also is None else f" ({also.__name__})"))
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    assert pq.read_table(study_dir / "trials.parquet").num_rows < 6, "the study ended before the kill"


def resume_and_compare(a, ray_cluster, study_dir) -> str:
    """``study resume`` exits 0 and gives the reference's tables; returns what it printed."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    resumed = subprocess.run([*CLI, "resume", str(study_dir), "--address", ray_cluster, "--no-progress"], env=env,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    printed = resumed.stdout + resumed.stderr
    # where a trial's checkpoint lives may differ: Tune numbers the results a resumed trial
    # reports again anew, and a trial held at a rung when the driver died may keep none
    try:
        same(a.study_dir, str(study_dir), also_aside=("checkpoint",))
    except AssertionError as exc:  # what the resume said (which trials it replayed, which failed)
        raise AssertionError(f"{exc}\n--- study resume printed:\n{printed[-8000:]}") from None
    for t in comparable_rows(str(study_dir), "trials"):
        if t["status"] == "completed":  # its held-out rows came from this checkpoint's best.pt
            assert (study_dir / "ray" / t["checkpoint"] / "best.pt").exists() or any(
                (study_dir / "ray" / t["checkpoint"]).glob("attempt-*/best.pt"))
    # a trial asked again under its id writes to its own folder (not Ray's '<id>_<4 hex>', which
    # it picks when the killed driver's local copy of the folder is still there)
    folders = sorted(p.name for p in (study_dir / "ray").iterdir() if p.is_dir() and not p.name.startswith("."))
    assert folders == [stable_trial_id("again", n) for n in range(6)]
    return printed


CLI = [sys.executable, "-m", "vertstudy.cli", "study"]


@pytest.mark.slow
def test_crashed_trials_and_a_killed_driver_keep_the_promise(reference, ray_cluster, storage, tmp_path):
    """Every trial fails once after epoch 2 and resumes from its checkpoint, and the driver is
    SIGKILLed once two trials have ended, then the study resumed: the same tables."""
    _, a = reference
    spec = tiny_spec("again", storage / "third", inject_failure_at_epoch=2, **FIELDS)
    study_dir = storage / "third" / "again"
    run_and_kill(spec, ray_cluster, tmp_path, study_dir)
    resume_and_compare(a, ray_cluster, study_dir)


def _newest(study_dir, pattern: str):
    return sorted((study_dir / "ray").glob(pattern))[-1]


def _drop_last_ray_trial(study_dir) -> str:
    """Ray's saved experiment state loses its newest trial (as when the killed driver's upload
    carried the searcher's newer state but not Ray's): returns the trial's id."""
    path = _newest(study_dir, "experiment_state-*.json")
    state = json.loads(path.read_text(encoding="utf-8"))
    ids = [json.loads(entry[0])["trial_id"] for entry in state["trial_data"]]
    last = max(ids, key=trial_number)
    state["trial_data"] = [e for e, t in zip(state["trial_data"], ids, strict=True) if t != last]
    path.write_text(json.dumps(state), encoding="utf-8")
    return last


def _drop_last_searcher_trial(study_dir) -> str:
    """The searcher's saved state loses its newest trial (Ray's newer state uploaded, the
    searcher's not): the search generator's counter, the concurrency limiter's live trials and
    the Optuna searcher's own record of it. Returns the trial's id."""
    gen_path, pkl_path = _newest(study_dir, "search_gen_state-*"), _newest(study_dir, "searcher-state-*.pkl")
    gen, searcher = pickle.loads(gen_path.read_bytes()), pickle.loads(pkl_path.read_bytes())
    last = max(searcher["_numbers"], key=trial_number)
    k = searcher["_numbers"].pop(last)
    searcher["_ot_trials"].pop(last, None)
    searcher["_completed_trials"].discard(last)
    searcher["_deferred"].pop(k, None)
    clock = searcher["_clock"]
    for table in (clock.start, clock.progress, clock.end):
        table.pop(k, None)
    gen["counter"] = k
    gen["name:ConcurrencyLimiter"]["live_trials"].discard(last)
    gen_path.write_bytes(pickle.dumps(gen))
    pkl_path.write_bytes(pickle.dumps(searcher))
    return last


def _recorded_checkpoints(study_dir) -> dict[str, list[str]]:
    """``{trial id: its checkpoint folders named in Ray's newest saved state}`` of the trials the
    state has not seen end."""
    from ray.tune.trainable.metadata import _TrainingRunMetadata

    state = json.loads(_newest(study_dir, "experiment_state-*.json").read_text(encoding="utf-8"))
    out = {}
    for entry in state["trial_data"]:
        trial = json.loads(entry[0])
        manager = _TrainingRunMetadata.from_json_state(entry[1]).checkpoint_manager
        if trial["status"] not in ("TERMINATED", "ERROR") and manager.latest_checkpoint_result is not None:
            out[trial["trial_id"]] = sorted(
                r.checkpoint.path.rstrip("/").rsplit("/", 1)[-1] for r in manager._checkpoint_results)
    return out


def a_live_trial_has_a_saved_checkpoint(study_dir) -> bool:
    return any((study_dir / "ray").glob("experiment_state-*.json")) and bool(_recorded_checkpoints(study_dir))


def _delete_recorded_checkpoints(study_dir) -> str:
    """Ray's saved state names checkpoints that Ray has since deleted (``num_to_keep``: it deletes
    the older ones when a newer one registers, and saves its state only now and then): every
    checkpoint folder the state names for an unfinished trial, and the older ones, are removed
    (CI once lost a trial this way). Returns one such trial's id."""
    import shutil

    recorded = _recorded_checkpoints(study_dir)
    for trial_id, names in recorded.items():
        for folder in (study_dir / "ray" / trial_id).glob("checkpoint_*"):
            if folder.name <= names[-1]:
                shutil.rmtree(folder)
    return min(recorded, key=trial_number)


@pytest.mark.slow
def test_a_resume_whose_saved_state_names_deleted_checkpoints_keeps_the_promise(reference, ray_cluster, storage,
                                                                               tmp_path):
    """Ray's saved state a few epochs behind its checkpoints: the checkpoints it names for the
    trials still running were deleted by ``num_to_keep`` before the driver was killed. The
    resumed trials replay from epoch 1 (the study says so) and the tables are the same."""
    _, a = reference
    spec = tiny_spec("again", storage / "lost-checkpoints", **FIELDS)
    study_dir = storage / "lost-checkpoints" / "again"
    run_and_kill(spec, ray_cluster, tmp_path, study_dir, ended=0, also=a_live_trial_has_a_saved_checkpoint)
    dropped = _delete_recorded_checkpoints(study_dir)
    assert not (study_dir / "ray" / dropped / "checkpoint_000000").exists()
    printed = resume_and_compare(a, ray_cluster, study_dir)
    assert f"trial {dropped}: its checkpoint_" in printed and "starts again from epoch 1" in printed, printed


@pytest.mark.slow
@pytest.mark.parametrize("behind", ["ray", "searcher"])
def test_a_resume_whose_saved_states_disagree_keeps_the_promise(behind, reference, ray_cluster, storage, tmp_path):
    """Ray uploads its experiment state and the searcher's state as separate files in the
    background, so a killed driver can leave either one a trial behind the other. The resumed
    study realigns the searcher with Ray's trials and gives the same tables. (Ray's state a trial
    behind is also the plain case of a trial started after Ray's last save, whose folder the
    resume moves aside and whose id it asks again: CI once lost such a trial to the killed
    driver's local copy of its folder.)"""
    _, a = reference
    spec = tiny_spec("again", storage / f"behind-{behind}", **FIELDS)
    study_dir = storage / f"behind-{behind}" / "again"
    run_and_kill(spec, ray_cluster, tmp_path, study_dir)
    dropped = (_drop_last_ray_trial if behind == "ray" else _drop_last_searcher_trial)(study_dir)
    assert trial_number(dropped) >= 1
    resume_and_compare(a, ray_cluster, study_dir)
