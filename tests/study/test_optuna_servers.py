"""Optuna on the storages a cluster uses, started for real: a PostgreSQL server (tests/servers.py,
the password from PGPASSWORD) and a journal file on a shared folder. Drivers of several search
studies and a duplicate of one (same name, another storage) start at once on one database and
one Ray cluster: each study keeps its own trials, the duplicate is refused in one line (it would
share the Optuna study), and a study whose driver is SIGKILLed resumes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pyarrow.parquet as pq
import pytest
import yaml

from tests.study.conftest import tiny_study
from vertstudy.study.lease import OWNER_ATTR

pytestmark = pytest.mark.slow
CLI = [sys.executable, "-m", "vertstudy.cli"]


def study_file(root: Path, name: str, store: Path, slow: bool) -> Path:
    """2 trials one at a time; ``slow``: 3 epochs of about 0.2 s more each, so a kill lands mid-study."""
    extra = {"config": {"train.epochs": 3}, "inject_delay_s": 0.4} if slow else {}
    study = tiny_study(name, store, concurrency=1, **extra)
    path = root / f"{name}-{store.name}.yaml"
    path.write_text(yaml.safe_dump(study), encoding="utf-8")
    return path


def first_result(study_dir: Path) -> bool:
    return any(f.stat().st_size > 0 for f in study_dir.glob("ray/*/result.json"))


def drill(root: Path, address: str, url: str, env: dict[str, str], names: list[str], kill: str | None) -> dict:
    """Start a driver per name on storage ``root/st`` and a duplicate of ``names[0]`` on
    ``root/dup``, all at once; SIGKILL ``kill``'s driver once it has a result and resume it."""
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("VERTSTUDY_")}, **env}
    runs = {name: study_file(root, name, root / "st", slow=bool(kill)) for name in names}
    runs["dup"] = study_file(root, names[0], root / "dup", slow=bool(kill))
    t0 = time.monotonic()
    procs = {key: subprocess.Popen([*CLI, "study", "run", str(path), "--address", address, "--optuna-storage", url,
                                    "--no-progress"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True, start_new_session=True)
             for key, path in runs.items()}
    try:
        if kill:
            deadline = time.monotonic() + 300
            while not first_result(root / "st" / kill):
                assert procs[kill].poll() is None, f"{kill} ended before it was killed: {procs[kill].communicate()}"
                assert time.monotonic() < deadline, f"{kill}: no result after 300 s"
                time.sleep(0.2)
            os.killpg(procs[kill].pid, signal.SIGKILL)
        outs = {key: p.communicate(timeout=600) for key, p in procs.items()}
    finally:
        for p in procs.values():
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    codes = {key: p.returncode for key, p in procs.items()}
    if kill:
        assert codes[kill] == -signal.SIGKILL
        resumed = subprocess.run([*CLI, "study", "resume", str(root / "st" / kill), "--address", address,
                                  "--no-progress"], env=env, capture_output=True, text=True, timeout=600)
        assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
        codes[kill] = 0
    return {"codes": codes, "outs": outs, "wall_s": time.monotonic() - t0}


def check(root: Path, url: str, names: list[str], result: dict, storage_obj) -> None:
    codes, outs = result["codes"], result["outs"]
    first = names[0]
    # of the two drivers of one name on one database, exactly one ran; the other refused in one line
    assert sorted([codes[first], codes["dup"]]) == [0, 2], codes
    winner, loser = (first, "dup") if codes[first] == 0 else ("dup", first)
    err = outs[loser][1].strip().splitlines()
    assert len(err) == 1 and f"already holds an Optuna study named '{first}'" in err[0], outs[loser][1][-2000:]
    assert err[0].startswith("error: search.optuna_storage: ") and "Traceback" not in outs[loser][1]
    lost = root / ("dup" if loser == "dup" else "st") / first
    assert not (lost / "study.json").exists(), "the refused driver wrote no study"
    for name in names[1:]:
        assert codes[name] == 0, (name, outs[name][1][-2000:])
    dirs = {name: root / "st" / name for name in names[1:]} | {first: root / ("st" if winner == first else "dup") /
                                                                first}
    for name, study_dir in dirs.items():
        rows = pq.read_table(study_dir / "trials.parquet").to_pylist()
        assert sorted(r["status"] for r in rows) == ["completed", "completed"], (name, rows)
        study = optuna.load_study(study_name=name, storage=storage_obj)
        assert study.user_attrs[OWNER_ATTR] == str(study_dir)
        done = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
        ours = sorted(round(json.loads(r["params"])["loss.balance_b"], 9) for r in rows)
        theirs = sorted(round(t.params["loss.balance_b"], 9) for t in done)
        assert theirs == ours, f"{name}: Optuna's completed trials are the study's own ({theirs} vs {ours})"
        assert not [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.RUNNING]


@pytest.fixture
def drill_root(short_dir, request):
    root = short_dir / request.node.name[-12:]
    root.mkdir()
    return root


def test_three_studies_and_a_duplicate_on_one_postgresql_database(ray_cluster, postgres, drill_root):
    url = postgres.url  # without the password: the drivers get it from PGPASSWORD
    result = drill(drill_root, ray_cluster, url, postgres.env(), ["pa", "pb", "pc"], kill="pb")
    os.environ["PGPASSWORD"] = postgres.password
    try:
        store = optuna.storages.RDBStorage(url)
        check(drill_root, url, ["pa", "pb", "pc"], result, store)
        assert set(optuna.get_all_study_names(store)) == {"pa", "pb", "pc"}
    finally:
        del os.environ["PGPASSWORD"]
    print(f"\nPostgreSQL: 3 studies + 1 duplicate, one driver killed and resumed, in {result['wall_s']:.0f} s")


def test_two_studies_and_a_duplicate_on_one_journal_file(ray_cluster, drill_root):
    shared = drill_root / "shared"
    shared.mkdir()
    url = f"journal:{shared / 'optuna.log'}"
    # the same drill as PostgreSQL's: a SIGKILLed driver (which may hold the journal's file lock)
    # and its resume
    result = drill(drill_root, ray_cluster, url, {}, ["ja", "jb"], kill="jb")
    from optuna.storages.journal import JournalFileBackend

    store = optuna.storages.JournalStorage(JournalFileBackend(str(shared / "optuna.log")))
    check(drill_root, url, ["ja", "jb"], result, store)
    print(f"\njournal: 2 studies + 1 duplicate, one driver killed and resumed, in {result['wall_s']:.0f} s")
