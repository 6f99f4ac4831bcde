"""The ``vertstudy study`` commands: bad input stops before any trial with one clear line, and a
driver killed with SIGKILL mid-study is resumed with every trial exactly once."""

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
from vertstudy.cli import main
from vertstudy.study.tables import read_table

STUDIES = Path(__file__).resolve().parents[2] / "studies"


def write_study(path: Path, study: dict) -> Path:
    path.write_text(yaml.safe_dump(study), encoding="utf-8")
    return path


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    err = capsys.readouterr().err
    return code, err


def one_clear_line(err: str, *must: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and "Traceback" not in err
    for text in must:
        assert text in lines[0], (text, lines[0])


@pytest.mark.parametrize(
    "change, must",
    [
        ({"space": {"loss.balnce_b": {"type": "float", "low": 2, "high": 4}}}, ["loss.balnce_b", "unknown parameter"]),
        ({"space": {}}, ["search space is empty"]),
        ({"num_samples": "many"}, ["num_samples", "'many'"]),
        ({"space": {"model.loc_head": {"type": "choice", "values": ["integral", "softmax"]}}},
         ["model.loc_head", "softmax"]),
        ({"space": {"loss.balance_b": {"type": "float", "low": 4, "high": 2}}}, ["low", "high"]),
        ({"search": {"algorithm": "annealing"}}, ["search.algorithm", "annealing", "optuna-tpe"]),
        ({"storage": "/dev/null/results"}, ["storage", "/dev/null/results", "cannot be written"]),
        ({"search": {"optuna_storage": "postgresql://vs:hunter2@db/optuna"}},
         ["search.optuna_storage", "postgresql://vs:***@db/optuna", "password", "PGPASSWORD"]),
        ({"search": {"optuna_storage": "mongodb:/x y"}}, ["search.optuna_storage", "not a storage URL", "journal:"]),
    ],
)
def test_bad_study_files_stop_before_any_trial(tmp_path, capsys, change, must):
    study = {**tiny_study("bad", tmp_path / "st"), **change}
    path = write_study(tmp_path / "bad.yaml", study)
    code, err = run_cli(capsys, "study", "run", str(path), "--no-progress")
    assert code == 2
    one_clear_line(err, *must)
    assert "hunter2" not in err
    assert not (tmp_path / "st" / "bad").exists()


def test_unreadable_and_invalid_files(tmp_path, capsys):
    code, err = run_cli(capsys, "study", "run", str(tmp_path / "missing.yaml"))
    assert code == 2
    one_clear_line(err, "missing.yaml", "not found")
    (tmp_path / "broken.yaml").write_text("name: [unclosed\n", encoding="utf-8")
    code, err = run_cli(capsys, "study", "run", str(tmp_path / "broken.yaml"))
    assert code == 2
    one_clear_line(err, "broken.yaml", "YAML")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n", encoding="utf-8")
    code, err = run_cli(capsys, "study", "run", str(tmp_path / "list.yaml"))
    assert code == 2
    one_clear_line(err, "list.yaml", "mapping")
    for command in ("resume", "status", "export"):
        code, err = run_cli(capsys, "study", command, str(tmp_path))
        assert code == 2
        one_clear_line(err, str(tmp_path), "not a study directory")


def test_cli_options_override_the_study(tmp_path, capsys):
    path = write_study(tmp_path / "s.yaml", tiny_study("s", tmp_path / "st"))
    code, err = run_cli(capsys, "study", "run", str(path), "--storage", "/dev/null/x", "--wandb", "disabled")
    assert code == 2
    one_clear_line(err, "/dev/null/x")


@pytest.mark.slow
def test_driver_killed_mid_study_then_resumed(ray_cluster, storage, tmp_path):
    """SIGKILL the driver after the first trial ended; `study resume` finishes the study with
    every trial exactly once in trials.parquet and no Optuna trial left RUNNING."""
    study = tiny_study("killed", storage, num_samples=4, config={"train.epochs": 3})
    path = write_study(tmp_path / "killed.yaml", study)
    study_dir = storage / "killed"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "vertstudy.cli", "study", "run", str(path), "--address", ray_cluster, "--no-progress"]
    driver = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 240
    try:
        while time.time() < deadline:
            if read_table(str(study_dir), "trials").num_rows >= 1:  # the driver replaces it as we read
                break
            assert driver.poll() is None, driver.stdout.read().decode()
            time.sleep(0.5)
        else:
            pytest.fail("no trial ended within 240 s")
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    ended_before = pq.read_table(study_dir / "trials.parquet").to_pylist()
    assert 1 <= len(ended_before) < 4

    resumed = subprocess.run(
        [sys.executable, "-m", "vertstudy.cli", "study", "resume", str(study_dir), "--address", ray_cluster,
         "--no-progress"], env=env, capture_output=True, text=True, timeout=600,
    )
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "could not rewrite the study tables" not in resumed.stderr, resumed.stderr
    trials = pq.read_table(study_dir / "trials.parquet").to_pylist()
    ids = [t["trial_id"] for t in trials]
    assert len(ids) == len(set(ids)) == 4
    assert set(ids) == {p.parent.name for p in (study_dir / "ray").glob("*/params.json")}
    # trials that had ended before the kill kept their status and were not trained again
    for before in ended_before:
        after = next(t for t in trials if t["trial_id"] == before["trial_id"])
        assert after["status"] == before["status"] and after["epochs"] == before["epochs"]
        result_json = study_dir / "ray" / before["trial_id"] / "result.json"
        reports = [json.loads(r) for r in result_json.read_text().splitlines()]
        epochs = [r["epoch"] for r in reports if r.get("phase") == "epoch"]
        assert len(epochs) == len(set(epochs))
    epochs = pq.read_table(study_dir / "epochs.parquet").to_pylist()
    assert len({(e["trial_id"], e["epoch"]) for e in epochs}) == len(epochs)
    study = optuna.load_study(study_name="killed", storage=f"sqlite:///{study_dir}/optuna.db")
    assert optuna.trial.TrialState.RUNNING not in [t.state for t in study.get_trials()]
    status = subprocess.run([sys.executable, "-m", "vertstudy.cli", "study", "status", str(study_dir), "--json"],
                            capture_output=True, text=True, timeout=120)
    assert status.returncode == 0, status.stderr
    assert {r["trial_id"] for r in json.loads(status.stdout)["trials"]} == set(ids)


@pytest.mark.slow
def test_ctrl_c_stops_cleanly_and_says_how_to_resume(ray_cluster, storage, tmp_path):
    """SIGINT (Ctrl-C) to the driver: Tune saves its state, the tables hold the ended trials,
    the command says how to continue and exits 130; `study resume` then finishes the study."""
    # 12 epochs a trial, and the signal goes as soon as a trial's first epoch is checkpointed: a
    # fixed sleep let a fast machine finish all 4 short trials before Ctrl-C (CI, 2026-12-01)
    study = tiny_study("ctrlc", storage, num_samples=4, config={"train.epochs": 12})
    path = write_study(tmp_path / "ctrlc.yaml", study)
    study_dir = storage / "ctrlc"
    cmd = [sys.executable, "-m", "vertstudy.cli", "study", "run", str(path), "--address", ray_cluster, "--no-progress"]
    driver = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and not any((study_dir / "ray").glob("*/checkpoint_*")):
        assert driver.poll() is None, driver.stdout.read()
        time.sleep(0.2)
    assert driver.poll() is None, "the study ended before any trial was interrupted:\n" + driver.stdout.read()
    driver.send_signal(signal.SIGINT)
    out, _ = driver.communicate(timeout=240)
    assert driver.returncode == 130, out
    assert f"vertstudy study resume {study_dir}" in out
    assert "Traceback" not in out
    ended = pq.read_table(study_dir / "trials.parquet").num_rows
    assert ended < 4
    resumed = subprocess.run([sys.executable, "-m", "vertstudy.cli", "study", "resume", str(study_dir), "--address",
                              ray_cluster, "--no-progress"], capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    trials = pq.read_table(study_dir / "trials.parquet").to_pylist()
    assert len({t["trial_id"] for t in trials}) == len(trials) == 4


@pytest.mark.slow
def test_two_drivers_of_one_study_and_a_resume_while_it_runs(ray_cluster, storage, tmp_path):
    """Two drivers of one study started at once: one runs it, the other refuses in one line naming
    the running driver (exit 2); a `study resume` while that driver trains refuses the same way
    instead of interrupting it; the study completes with its one trial and every epoch once."""
    data = {"phantoms": {"count": 5, "seed": 7}, "split": {"val": 1, "test": 1}}  # a set no other test wrote
    path = write_study(tmp_path / "a.yaml", tiny_study("twice", storage, num_samples=1, data=data,
                                                       config={"train.epochs": 80}))  # ~30 s of training
    study_dir = storage / "twice"

    def driver(*argv):
        return subprocess.Popen([sys.executable, "-m", "vertstudy.cli", *argv, "--address", ray_cluster,
                                 "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    drivers = [driver("study", "run", str(path)), driver("study", "run", str(path))]
    deadline = time.time() + 300
    while time.time() < deadline and not any((study_dir / "ray").glob("*/checkpoint_*")):
        time.sleep(0.5)
    assert any(d.poll() is None for d in drivers), "the study ended before the resume could be tried"
    resume = subprocess.run([sys.executable, "-m", "vertstudy.cli", "study", "resume", str(study_dir), "--address",
                             ray_cluster, "--no-progress"], capture_output=True, text=True, timeout=300)
    results = [(d.wait(timeout=600), *d.communicate()) for d in drivers]
    assert sorted(code for code, _, _ in results) == [0, 2], results
    refused = next(err for code, _, err in results if code == 2).strip()
    assert refused.count("\n") == 0 and refused.startswith("error: ") and "Traceback" not in refused, refused
    assert "its driver is running on" in refused and "(pid " in refused, refused
    # the resume came while the driver was training: refused in one line, the driver unharmed (0, not 130)
    assert resume.returncode == 2, resume.stdout + resume.stderr
    assert resume.stderr.strip().count("\n") == 0 and "its driver is running on" in resume.stderr, resume.stderr
    trials = pq.read_table(study_dir / "trials.parquet").to_pylist()
    assert [t["status"] for t in trials] == ["completed"], trials
    rows = pq.read_table(study_dir / "epochs.parquet").to_pylist()
    assert sorted(e["epoch"] for e in rows) == list(range(1, 81))
    assert not list(storage.glob(".twice.driver.lease*"))  # released


VOLATILE = {"study", "trial_id", "checkpoint", "started_at", "ended_at", "wall_s", "node", "hostname", "wandb_run",
            "test_infer_s_per_case", "crops_per_s"}  # who, where and how fast: everything else is the science


def steady_rows(study_dir: Path, table: str) -> list[str]:
    rows = pq.read_table(study_dir / f"{table}.parquet").to_pylist()
    return sorted(json.dumps({k: v for k, v in r.items() if k not in VOLATILE}, sort_keys=True, default=str)
                  for r in rows)


def test_drivers_of_different_studies_started_together_on_one_storage(ray_cluster, storage, tmp_path, capsys):
    """Three drivers started at once on one storage and one cluster, all asking for a phantom set
    no one has written: two different studies and the first one again. The duplicate refuses in
    one line; each study completes with only its own trials, and its tables are exactly what the
    same study run alone gives (Ray stages every driver's files in a folder named by the second
    it started, so two drivers in one second used to share it and copy each other's trials)."""
    data = {"phantoms": {"count": 5, "seed": 13}, "split": {"val": 1, "test": 1}}
    studies = {
        name: write_study(tmp_path / f"{name}.yaml", tiny_study(name, storage, num_samples=1, concurrency=1, data=data,
                                                               config={"train.epochs": epochs}))
        for name, epochs in (("left", 3), ("right", 4))
    }

    def driver(path):
        return subprocess.Popen([sys.executable, "-m", "vertstudy.cli", "study", "run", str(path), "--address",
                                 ray_cluster, "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)

    drivers = [driver(studies["left"]), driver(studies["right"]), driver(studies["left"])]
    results = [(d.wait(timeout=600), *d.communicate()) for d in drivers]
    assert sorted(code for code, _, _ in results) == [0, 0, 2], results
    refused = next(err for code, _, err in results if code == 2).strip()
    assert refused.count("\n") == 0 and "its driver is running on" in refused and "Traceback" not in refused, refused
    # each finished study says how much resume state its ended trials gave back
    assert all("checkpoints: the resume state (last.pt)" in out for code, out, _ in results if code == 0), results
    for name in studies:
        trials = pq.read_table(storage / name / "trials.parquet").to_pylist()
        assert [t["status"] for t in trials] == ["completed"], (name, trials)
        assert {p.parent.name for p in (storage / name / "ray").glob("*/params.json")} == {trials[0]["trial_id"]}
        assert {r["trial_id"] for r in pq.read_table(storage / name / "vertebrae.parquet").to_pylist()} == \
            {trials[0]["trial_id"]}
    for name, path in studies.items():  # the same studies alone, one after the other
        alone = yaml.safe_load(path.read_text(encoding="utf-8"))
        alone["name"] = f"{name}-alone"
        code, err = run_cli(capsys, "study", "run", str(write_study(tmp_path / f"{name}-alone.yaml", alone)),
                            "--address", ray_cluster, "--no-progress")
        assert code == 0, err
        for table in ("trials", "epochs", "vertebrae", "baseline"):
            assert steady_rows(storage / name, table) == steady_rows(storage / f"{name}-alone", table), (name, table)


@pytest.fixture
def small_disk():
    """A 48 MB tmpfs of its own (the tests run as root here); skipped, saying why, where mounting
    is refused."""
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="vs-disk-", dir="/tmp"))
    out = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(path)], capture_output=True, text=True)
    if out.returncode != 0:
        path.rmdir()
        why = (out.stderr or out.stdout).strip()[:200]
        pytest.skip(f"cannot mount a small tmpfs here ({why}): full-disk drill not run")
    yield path
    subprocess.run(["umount", "-l", str(path)], capture_output=True)
    path.rmdir()


def fill(disk: Path) -> Path:
    """Write zeros to ``disk`` until it is full; returns the filler file."""
    filler = disk / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * (1 << 20))
                f.flush()
        except OSError:
            pass
    return filler


def test_a_full_disk_mid_study_stops_in_one_line_and_the_study_resumes(ray_cluster, small_disk, tmp_path):
    """The study's storage fills up while its first trial trains: the driver stops with one
    line that says to free space and resume (no traceback), no file Ray or vertstudy keeps is
    left truncated, and after space is freed `study resume` completes every trial exactly once."""
    store = small_disk / "st"
    study = tiny_study("full", store, num_samples=2, concurrency=1, max_retries=1, config={"train.epochs": 30})
    path = write_study(tmp_path / "full.yaml", study)
    study_dir = store / "full"
    driver = subprocess.Popen([sys.executable, "-m", "vertstudy.cli", "study", "run", str(path), "--address",
                               ray_cluster, "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not any((study_dir / "ray").glob("*/checkpoint_*")):
        assert driver.poll() is None, driver.communicate()
        time.sleep(0.2)
    filler = fill(small_disk)
    filled_at = time.time()
    out, err = driver.communicate(timeout=600)
    stopped_s = time.time() - filled_at
    assert driver.returncode == 2, out + err
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and "full" in last and f"vertstudy study resume {study_dir}" in last, last
    kept = [*study_dir.glob("ray/experiment_state-*.json"), *study_dir.glob("ray/*/params.json")]
    for f in kept:  # whole or absent, never cut by the full disk
        assert json.loads(f.read_text(encoding="utf-8")), f
    for f in study_dir.glob("ray/*/result.json"):  # no torn line (empty for a trial that had not reported yet)
        [json.loads(line) for line in f.read_text(encoding="utf-8").splitlines()]
    filler.unlink()
    resumed = subprocess.run([sys.executable, "-m", "vertstudy.cli", "study", "resume", str(study_dir), "--address",
                              ray_cluster, "--no-progress"], capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    trials = pq.read_table(study_dir / "trials.parquet").to_pylist()
    assert [t["status"] for t in trials] == ["completed", "completed"], [(t["status"], t["message"]) for t in trials]
    assert {t["trial_id"] for t in trials} == {p.parent.name for p in (study_dir / "ray").glob("*/params.json")}
    epochs = pq.read_table(study_dir / "epochs.parquet").to_pylist()
    assert sorted((e["trial_id"], e["epoch"]) for e in epochs) == sorted((t["trial_id"], n) for t in trials
                                                                         for n in range(1, 31))
    print(f"full disk: the driver stopped {stopped_s:.0f} s after the disk filled; resume completed both trials")


def test_data_root_that_is_not_a_directory_leaves_nothing(tmp_path, capsys):
    study = tiny_study("noroot", tmp_path / "st")
    study["data"] = {"root": str(tmp_path / "nowhere"), "format": "verse", "split": {"val": 1, "test": 1}}
    code, err = run_cli(capsys, "study", "run", str(write_study(tmp_path / "s.yaml", study)), "--no-progress")
    assert code == 2
    one_clear_line(err, "nowhere", "not a directory")
    assert not (tmp_path / "st" / "noroot").exists()
