"""Studies on a real multi-node Ray cluster on this machine: a head (no CPUs) and 2 worker nodes
of 1 CPU each, started by ``vertstudy cluster start`` with token authentication, shared by the
module. Trials must spread over the nodes, fetch the published cache once per node, survive a
worker's SIGKILL, run through ``ray job submit``, and leave no secret of their environment in
any file they write. The worker-kill test breaks the cluster, so it runs last.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from tests.cluster.conftest import both_trials_at_epoch, trial_results
from tests.study.conftest import tiny_study
from vertstudy.localcluster import load_cluster, ray_command

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "vertstudy.cli"]
# the console script of this environment (the job's shell has the head node's PATH, not ours)
VERTSTUDY = str(Path(sys.executable).parent / "vertstudy")
# secrets the drivers get in their environment; no file a study writes may contain them
SECRETS = {"WANDB_API_KEY": "wb" + secrets.token_hex(20), "PGPASSWORD": "pg" + secrets.token_hex(12),
           "VS_TEST_SECRET": "vs" + secrets.token_hex(12)}


@pytest.fixture(scope="module")
def cluster(root):
    """Head + 2 workers through the CLI (the way a developer starts one); stopped at the end. The
    workers run in network namespaces of their own, with addresses of their own, as separate
    hosts would, wherever `ip netns add` is allowed (else on the host's address, said below)."""
    from vertstudy.localnet import namespaces_allowed

    why_not = namespaces_allowed()
    if why_not:
        print(f"\nnetwork namespaces not allowed here ({why_not}): the workers share the host's address")
    out = subprocess.run([*CLI, "cluster", "start", "--dir", str(root / "c"), "--workers", "2",
                          "--object-store-mb", "80", *([] if why_not else ["--netns"])],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "token authentication on" in out.stdout
    yield load_cluster(root / "c")
    subprocess.run([*CLI, "cluster", "stop", "--dir", str(root / "c")], capture_output=True, timeout=120)


def driver_env(cluster, **extra: str) -> dict[str, str]:
    env = {**os.environ, **cluster.env(), **SECRETS, **extra}
    env.pop("VERTSTUDY_OPTUNA_STORAGE", None)
    return env


def study_file(root: Path, name: str, epochs: int, **fields) -> Path:
    """A 2-trial grid (B in {2, 3}), 2 at a time, 1 CPU each, data published as a file:// URI."""
    study = tiny_study(name, root / "st", config={"train.epochs": epochs}, wandb={"mode": "offline"}, **fields)
    study.update({"space": {"loss.balance_b": {"type": "choice", "values": [2.0, 3.0]}},
                  "search": {"algorithm": "grid"}, "num_samples": 1, "max_retries": 2})
    study["data"].update({"shared_cache": f"file://{root}/shared", "node_cache": str(root / "node")})
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(study), encoding="utf-8")
    return path


def test_study_runs_on_both_workers_and_fetches_the_cache_once(cluster, root):
    path = study_file(root, "spread", epochs=2)
    out = subprocess.run([*CLI, "study", "run", str(path), "--no-progress"], env=driver_env(cluster),
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    for name, value in SECRETS.items():
        assert value not in out.stdout + out.stderr, f"{name} in the driver's output"
    trials = pq.read_table(root / "st" / "spread" / "trials.parquet").to_pylist()
    assert sorted(t["status"] for t in trials) == ["completed", "completed"]
    workers = {n.node_id for n in cluster.workers()}
    nodes = {t["node"] for t in trials}
    assert nodes <= workers, "the head has no CPUs: trials run on worker nodes only"
    assert len(nodes) == 2, f"trials ran on {len(nodes)} node(s): {nodes}"
    # the split names published entries; each was fetched once for this machine, not per trial
    split = json.loads((root / "st" / "spread" / "split.json").read_text(encoding="utf-8"))
    entries = [*split["train"], *split["val"], *split["test"]]
    assert all(e.startswith(f"file://{root}/shared/cases/") for e in entries)
    fetched = [line.split()[0] for line in (root / "node" / "fetches.log").read_text(encoding="utf-8").splitlines()]
    assert sorted(fetched) == sorted(e.rsplit("/", 1)[1] for e in entries)


def test_no_secret_in_any_output(cluster, root):
    """Every file of the study (tables, Ray's state and results, checkpoints, W&B offline runs,
    the Optuna database), the node cache, and the cluster's Ray logs."""
    study_dir = root / "st" / "spread"
    assert (study_dir / "wandb").is_dir(), "the study logged to W&B (offline)"
    scanned = 0
    for base in (study_dir, root / "node", cluster.temp_dir):
        for f in base.rglob("*"):
            if f.is_file() and not f.is_symlink() and not f.name.endswith((".sock", ".lock")):
                try:
                    data = f.read_bytes()
                except OSError:
                    continue
                scanned += 1
                for name, value in SECRETS.items():
                    assert value.encode() not in data, f"{name} leaked into {f}"
    assert scanned > 50


def test_ray_job_submit_runs_a_smoke_study(cluster, root):
    storage = root / "jobs"
    out = subprocess.run(
        [ray_command(), "job", "submit", "--address", cluster.dashboard_url, "--", VERTSTUDY, "study", "run",
         str(REPO / "studies" / "quickstart.yaml"), "--smoke", "--storage", str(storage), "--no-progress"],
        env=driver_env(cluster), capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "succeeded" in out.stdout + out.stderr
    trials = pq.read_table(storage / "quickstart-smoke" / "trials.parquet").to_pylist()
    # ASHA (the quickstart's scheduler) may stop one of the two at the smoke grace period
    assert len(trials) == 2 and "completed" in {t["status"] for t in trials}
    assert {t["status"] for t in trials} <= {"completed", "pruned"}
    assert (storage / "quickstart-smoke" / "optuna.db").is_file()


def test_driver_without_the_token_is_refused(cluster, root, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["HOME"] = str(tmp_path)  # no ~/.ray/auth_token either
    path = study_file(root, "notoken", epochs=1)
    out = subprocess.run([*CLI, "study", "run", str(path), "--address", cluster.address, "--no-progress"],
                         env=env, capture_output=True, text=True, timeout=180)
    assert out.returncode == 2, out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert lines[-1].startswith(f"error: --address {cluster.address}: cannot connect"), lines[-3:]
    assert "Traceback" not in out.stderr
    assert not (root / "st" / "notoken").exists(), "nothing written for a study that could not start"


def test_cluster_commands_status_and_bad_input(cluster, root, tmp_path):
    status = subprocess.run([*CLI, "cluster", "status", "--dir", str(cluster.root), "--json"], capture_output=True,
                            text=True, timeout=60)
    assert status.returncode == 0, status.stderr
    info = json.loads(status.stdout)
    assert info["running"] and len(info["nodes"]) == 3 and info["address"] == cluster.address
    assert info["dashboard"].startswith("http://127.0.0.1:")
    for argv, must in ((["status", "--dir", str(tmp_path)], "no local cluster here"),
                       (["kill-worker", "--dir", str(cluster.root), "7"], "worker index 7: not a worker"),
                       (["start", "--dir", str(cluster.root)], "already running")):
        out = subprocess.run([*CLI, "cluster", *argv], capture_output=True, text=True, timeout=60)
        lines = out.stderr.strip().splitlines()
        assert out.returncode == 2 and len(lines) == 1 and must in lines[0], out.stderr
    assert load_cluster(cluster.root).running(), "a refused start leaves the running cluster alone"


def test_worker_killed_mid_study_resumes_on_the_other_node(cluster, root):
    path = study_file(root, "kill", epochs=30)
    study_dir = root / "st" / "kill"
    driver = subprocess.Popen([*CLI, "study", "run", str(path), "--no-progress"], env=driver_env(cluster),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        results = both_trials_at_epoch(driver, study_dir, 3)
        victim = sorted(results)[0]
        last = results[victim][-1]
        index = next(n.index for n in cluster.workers() if n.node_id == last["node"])
        killed_at = time.time()
        kill = subprocess.run([*CLI, "cluster", "kill-worker", "--dir", str(cluster.root), str(index)],
                              capture_output=True, text=True, timeout=60)
        assert kill.returncode == 0, kill.stderr
        output, _ = driver.communicate(timeout=600)
    finally:
        if driver.poll() is None:
            driver.kill()
    assert driver.returncode == 0, output[-3000:]
    assert "Traceback" not in output, "a node's death is one line in the driver's output"
    trials = {t["trial_id"]: t for t in pq.read_table(study_dir / "trials.parquet").to_pylist()}
    assert sorted(trials) == sorted(results), "every trial exactly once"
    assert {t["status"] for t in trials.values()} == {"completed"}
    survivor = next(n.node_id for n in cluster.workers() if n.index != index)
    assert trials[victim]["node"] == survivor, "the killed node's trial finished on the other node"
    epochs = pq.read_table(study_dir / "epochs.parquet").to_pandas()
    for tid in trials:
        assert sorted(epochs[epochs.trial_id == tid].epoch) == list(range(1, 31)), "each epoch once"
    # after the kill, the trial continued from its checkpoint on the survivor, not from epoch 1
    rows = trial_results(study_dir)[victim]
    first = next(i for i, r in enumerate(rows) if r.get("node") == survivor and "epoch" in r)
    assert all(r["node"] == last["node"] for r in rows[:first] if "epoch" in r)
    assert 1 < rows[first]["epoch"] <= rows[first - 1]["epoch"] + 1
    print(f"worker {index} killed; trial {victim} went on at epoch {rows[first]['epoch']} on the other node "
          f"about {rows[first]['timestamp'] - killed_at:.0f} s later (after the other trial freed its CPU)")
