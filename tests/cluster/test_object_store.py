"""A study on a real S3 server (SeaweedFS, tests/servers.py) on a multi-node local cluster whose
nodes share no folder: every node has a HOME of its own (``cluster start --home-per-node``), so
the data reach a worker only through the cache the driver publishes to the store, and a
checkpoint reaches another node only through the store. One drill: a worker node is SIGKILLed
mid-study, then the driver; the study is resumed from another working directory and HOME (the
stale lease on the store taken over), then read back from the store by ``study status``,
``study export`` and ``vertstudy report``. Every trial and every epoch exactly once.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from tests.study.conftest import tiny_study
from vertstudy.localcluster import kill_worker, load_cluster

pytestmark = pytest.mark.slow
CLI = [sys.executable, "-m", "vertstudy.cli"]
EPOCHS = 20
CHECKPOINT = re.compile(r"/ray/([^/.][^/]*)/checkpoint_(\d+)/")


@pytest.fixture(scope="module")
def store(s3_server):
    return s3_server, s3_server.bucket("vs-drill")


@pytest.fixture(scope="module")
def cluster(root, store):
    """Head + 2 workers of 1 CPU, each node with a HOME of its own, the store's variables in
    their environment (as a cloud's nodes get them from their role or a secret)."""
    server, _ = store
    env = {**os.environ, **server.env()}
    out = subprocess.run([*CLI, "cluster", "start", "--dir", str(root / "c"), "--workers", "2",
                          "--object-store-mb", "80", "--home-per-node"], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    yield load_cluster(root / "c")
    subprocess.run([*CLI, "cluster", "stop", "--dir", str(root / "c")], capture_output=True, timeout=120)


def driver_env(cluster, server, home: Path) -> dict[str, str]:
    """A driver on a machine of its own: its own HOME, the cluster's address and the store's variables."""
    home.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "VERTSTUDY_"))}
    return {**env, **cluster.env(), **server.env(), "HOME": str(home)}


def checkpoints(server, bucket: str, prefix: str) -> dict[str, int]:
    """``{trial_id: its newest checkpoint index}`` on the store."""
    out: dict[str, int] = {}
    for key in server.keys(bucket, prefix):
        m = CHECKPOINT.search("/" + key)
        if m:
            out[m.group(1)] = max(out.get(m.group(1), -1), int(m.group(2)))
    return out


def wait_for(what: str, check, driver: subprocess.Popen, timeout_s: float = 300):
    deadline = time.monotonic() + timeout_s
    while True:
        got = check()
        if got:
            return got
        assert driver.poll() is None, f"the driver ended before {what} (exit {driver.returncode})"
        assert time.monotonic() < deadline, f"no {what} after {timeout_s:g} s"
        time.sleep(0.5)


def table(server, bucket: str, key: str):
    body = server.client().get_object(Bucket=bucket, Key=key)["Body"].read()
    return pq.read_table(io.BytesIO(body))


def test_study_on_the_store_survives_a_worker_and_its_driver_killed_and_reads_back(cluster, store, root):
    server, bucket = store
    uri = f"s3://{bucket}/st"
    study = tiny_study("drill", root / "unused", config={"train.epochs": EPOCHS})
    study.update({"space": {"loss.balance_b": {"type": "choice", "values": [2.0, 3.0]}},
                  "search": {"algorithm": "grid"}, "num_samples": 1, "max_retries": 2, "storage": uri,
                  "inject_delay_s": 0.5})  # epochs of about half a second: the kills land mid-study
    path = root / "drill.yaml"
    path.write_text(yaml.safe_dump(study), encoding="utf-8")
    first = root / "driver1"
    log = open(root / "driver1.log", "w", encoding="utf-8")  # noqa: SIM115 (closed below)
    driver = subprocess.Popen([*CLI, "study", "run", str(path), "--no-progress"], cwd=first.parent,
                              env=driver_env(cluster, server, first), stdout=log, stderr=subprocess.STDOUT,
                              text=True, start_new_session=True)
    try:
        prefix = "st/drill/"
        at_2 = wait_for("both trials at checkpoint 2", lambda: (lambda c: c if len(c) == 2 and min(c.values()) >= 2
                                                                 else None)(checkpoints(server, bucket, prefix)),
                        driver)
        t_kill = time.monotonic()
        assert kill_worker(cluster.root, 1), "worker 1 killed"
        # the driver goes on without the node; once a trial has saved two more checkpoints, kill the driver too
        at_kill = wait_for("checkpoints after the worker's death", lambda: (lambda c: c if any(
            n > at_2[t] + 1 for t, n in c.items()) else None)(checkpoints(server, bucket, prefix)), driver)
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait(timeout=60)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
        log.close()
    killed = time.monotonic() - t_kill
    assert max(at_kill.values()) < EPOCHS - 2, f"the driver was killed mid-study, not at its end: {at_kill}"
    assert server.keys(bucket, "st/.drill.driver.lease"), "the killed driver's lease is left on the store"
    # resume from another working directory and HOME: nothing of the first driver's folders is used
    second = root / "driver2"
    resumed = subprocess.run([*CLI, "study", "resume", f"{uri}/drill", "--no-progress"], cwd=second.parent,
                             env=driver_env(cluster, server, second), capture_output=True, text=True, timeout=600)
    (root / "resume.log").write_text(resumed.stdout + resumed.stderr, encoding="utf-8")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "Traceback" not in resumed.stdout + resumed.stderr
    assert not server.keys(bucket, "st/.drill.driver.lease"), "the resumed driver took the stale lease and released it"

    trials = table(server, bucket, "st/drill/trials.parquet").to_pylist()
    assert sorted(t["status"] for t in trials) == ["completed", "completed"], trials
    survivor = next(n.node_id for n in load_cluster(cluster.root).workers())  # the alive one
    assert {t["node"] for t in trials} == {survivor}, "both trials ended on the node that lived"
    epochs = table(server, bucket, "st/drill/epochs.parquet").to_pandas()
    for t in trials:
        assert sorted(epochs[epochs.trial_id == t["trial_id"]].epoch) == list(range(1, EPOCHS + 1)), "each epoch once"
    # the workers got the data only from the published cache, each entry fetched once per node
    split = json.loads(server.client().get_object(Bucket=bucket, Key="st/drill/split.json")["Body"].read())
    entries = [*split["train"], *split["val"], *split["test"]]
    assert all(e.startswith(f"{uri}/_cache/cases/") for e in entries)
    for node in (1, 2):
        log = cluster.node_home(node) / ".cache" / "vertstudy" / "node" / "fetches.log"
        fetched = [line.split()[0] for line in log.read_text(encoding="utf-8").splitlines()]
        assert len(fetched) == len(set(fetched)) and set(fetched) <= {e.rsplit("/", 1)[1] for e in entries}, node
    assert not (second / ".cache" / "vertstudy" / "_phantoms").exists(), "the resume made no data of its own"
    assert not list(root.glob("**/drill/study.json")), "no local copy of the study anywhere"

    env = driver_env(cluster, server, root / "reader")
    status = subprocess.run([*CLI, "study", "status", f"{uri}/drill", "--json"], env=env, capture_output=True,
                            text=True, timeout=300)
    assert status.returncode == 0, status.stderr[-2000:]
    rows = json.loads(status.stdout)["trials"]
    assert sorted(r["status"] for r in rows) == ["completed", "completed"]
    export = subprocess.run([*CLI, "study", "export", f"{uri}/drill"], env=env, capture_output=True, text=True,
                            timeout=300)
    assert export.returncode == 0, export.stderr[-2000:]
    again = table(server, bucket, "st/drill/epochs.parquet").to_pandas()
    assert sorted(zip(again.trial_id, again.epoch)) == sorted(zip(epochs.trial_id, epochs.epoch))
    report = subprocess.run([*CLI, "report", f"{uri}/drill",
                             "--out", str(root / "report"), "--quiet"], env=env, capture_output=True, text=True,
                            timeout=300)
    assert report.returncode == 0, report.stderr[-2000:]
    assert (root / "report" / "README.md").is_file() or list((root / "report").glob("*.md"))
    print(f"\nworker 1 killed at checkpoints {at_2}, the driver {killed:.1f} s later at {at_kill}; resumed from "
          "another HOME and folder, both trials completed on the surviving node")
