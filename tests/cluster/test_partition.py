"""A network partition between real (virtual) hosts: a local cluster whose two workers each run in
a network namespace of their own, with their own IP address on a private bridge, started by
``vertstudy cluster start --netns``. Mid-study one worker's link goes down (not a process
kill: the worker keeps running, cut off). Its trial must go on from its checkpoint on the other
node, every trial and every epoch exactly once, and when the link comes back the cut-off
worker's late files must not count: each attempt writes under its own folder and the tables
point at the last attempt's. The drill keeps Ray's health checks short (3 s).

Runs wherever ``ip netns add`` is allowed (root with iproute2, as here); elsewhere it skips and
says why.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from tests.cluster.conftest import both_trials_at_epoch, trial_results
from tests.study.conftest import tiny_study
from vertstudy.localcluster import load_cluster
from vertstudy.localnet import namespaces_allowed

pytestmark = pytest.mark.slow
CLI = [sys.executable, "-m", "vertstudy.cli"]
EPOCHS = 30


@pytest.fixture(scope="module")
def cluster(root):
    why_not = namespaces_allowed()
    if why_not:
        pytest.skip(f"network namespaces are not allowed here ({why_not}): the partition drill did not run")
    out = subprocess.run([*CLI, "cluster", "start", "--dir", str(root / "c"), "--workers", "2", "--object-store-mb",
                          "80", "--netns", "--health-check-s", "3"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    yield load_cluster(root / "c")
    subprocess.run([*CLI, "cluster", "stop", "--dir", str(root / "c")], capture_output=True, timeout=120)
    prefix = load_cluster(root / "c").network
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert prefix not in listed, "cluster stop removes its namespaces"


def test_workers_have_addresses_of_their_own(cluster):
    ips = [n.ip for n in cluster.nodes]
    assert len(set(ips)) == 3 and "127.0.0.1" not in ips, ips
    code = "import ray, json; ray.init(log_to_driver=False); print(json.dumps(sorted(n['NodeManagerAddress'] " \
           "for n in ray.nodes() if n['Alive'])))"
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, **cluster.env()}, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == sorted(ips)


def test_a_worker_cut_off_mid_trial_its_trial_goes_on_elsewhere_once(cluster, root):
    study = tiny_study("cut", root / "st", config={"train.epochs": EPOCHS})
    study.update({"space": {"loss.balance_b": {"type": "choice", "values": [2.0, 3.0]}},
                  "search": {"algorithm": "grid"}, "num_samples": 1, "max_retries": 2})
    path = root / "cut.yaml"
    path.write_text(yaml.safe_dump(study), encoding="utf-8")
    study_dir = root / "st" / "cut"
    driver = subprocess.Popen([*CLI, "study", "run", str(path), "--no-progress"],
                              env={**os.environ, **cluster.env()}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
    healed = False
    try:
        results = both_trials_at_epoch(driver, study_dir, 3)
        deadline = time.monotonic() + 300
        victim = sorted(results)[0]
        cut_node = results[victim][-1]["node"]
        index = next(n.index for n in cluster.workers() if n.node_id == cut_node)
        cut = subprocess.run([*CLI, "cluster", "cut-worker", "--dir", str(cluster.root), str(index)],
                             capture_output=True, text=True, timeout=60)
        assert cut.returncode == 0, cut.stderr
        cut_at = time.time()
        survivor = next(n.node_id for n in cluster.workers() if n.index != index)
        while True:  # the victim goes on elsewhere; then the cut-off worker comes back
            rows = trial_results(study_dir).get(victim, [])
            moved = [r for r in rows if r.get("node") == survivor and "epoch" in r]
            if moved:
                break
            assert driver.poll() is None and time.monotonic() < deadline, "the cut-off trial did not move"
            time.sleep(0.2)
        recovered_s = moved[0]["timestamp"] - cut_at
        heal = subprocess.run([*CLI, "cluster", "cut-worker", "--dir", str(cluster.root), str(index), "--heal"],
                              capture_output=True, text=True, timeout=60)
        assert heal.returncode == 0, heal.stderr
        healed = True
        output, _ = driver.communicate(timeout=600)
    finally:
        if not healed:
            subprocess.run([*CLI, "cluster", "cut-worker", "--dir", str(cluster.root), str(index), "--heal"],
                           capture_output=True, timeout=60)
        if driver.poll() is None:
            driver.kill()
    assert driver.returncode == 0, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    trials = {t["trial_id"]: t for t in pq.read_table(study_dir / "trials.parquet").to_pylist()}
    assert sorted(trials) == sorted(results), "every trial exactly once"
    assert {t["status"] for t in trials.values()} == {"completed"}
    assert trials[victim]["node"] == survivor
    epochs = pq.read_table(study_dir / "epochs.parquet").to_pandas()
    for tid in trials:
        assert sorted(epochs[epochs.trial_id == tid].epoch) == list(range(1, EPOCHS + 1)), "each epoch once"
    rows = trial_results(study_dir)[victim]
    first = next(i for i, r in enumerate(rows) if r.get("node") == survivor and "epoch" in r)
    assert 1 < rows[first]["epoch"] <= rows[first - 1]["epoch"] + 1, "went on from its checkpoint, not epoch 1"
    # each attempt wrote under its own folder; the tables point at the last attempt's files
    attempts = sorted({p.name for p in (study_dir / "ray" / victim).glob("checkpoint_*/attempt-*")})
    final = Path(trials[victim]["checkpoint"])
    assert final.name == attempts[-1] and (final / "best.pt").exists() and (final / "final.json").exists()
    assert int(final.name.split("-")[1]) > cut_at * 1e9, "the files counted are those of the attempt after the cut"
    assert json.loads((final / "final.json").read_text(encoding="utf-8"))["node"] == survivor
    late = [p for p in (study_dir / "ray" / victim).glob("checkpoint_*/attempt-*") if p.name != attempts[-1]
            and p.parent.name > rows[first - 1]["checkpoint_dir_name"]]
    print(f"partition drill: worker {index} cut off; trial {victim} went on at epoch {rows[first]['epoch']} on the "
          f"other node {recovered_s:.0f} s after the cut; {len(late)} checkpoint folder(s) written late by the "
          "cut-off attempt, not counted")
