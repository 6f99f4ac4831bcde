"""One live driver per study (vertstudy.study.lease): the lease is exclusive, refused in one line
naming the holder, taken over when stale, and of many processes racing for it exactly one wins."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from vertstudy.errors import ConfigError
from vertstudy.study import lease
from vertstudy.study.lease import DriverLease, lease_path


def write_lease(path, host: str, pid: int, age_s: float = 0.0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"host": host, "pid": pid, "started_at": 0.0, "token": "x"}), encoding="utf-8")
    then = time.time() - age_s
    os.utime(path, (then, then))


def test_a_held_lease_refuses_a_second_driver_in_one_line_and_is_removed_after(tmp_path):
    study = str(tmp_path / "st" / "s1")
    path = lease_path(study)
    assert path == tmp_path / "st" / ".s1.driver.lease"
    with DriverLease(study, "s1"):
        assert json.loads(path.read_text())["pid"] == os.getpid()
        with pytest.raises(ConfigError) as info, DriverLease(study, "s1"):
            pass
        message = str(info.value)
        assert "\n" not in message and socket.gethostname() in message and f"pid {os.getpid()}" in message
        assert f"vertstudy study resume {study}" in message
    assert not path.exists() and not list(path.parent.glob(".s1.driver.lease*"))


def test_stale_leases_are_taken_over_and_a_live_remote_one_is_not(tmp_path):
    study = str(tmp_path / "s")
    path = lease_path(study)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    write_lease(path, socket.gethostname(), int(dead.stdout))  # this host, a pid that has ended
    with DriverLease(study, "s"):
        assert json.loads(path.read_text())["pid"] == os.getpid()
    write_lease(path, "other-host", 1, age_s=lease.STALE_S + 30)  # another host, silent for 90 s
    with DriverLease(study, "s"):
        pass
    write_lease(path, "other-host", 1, age_s=5)  # another host, alive 5 s ago
    with pytest.raises(ConfigError, match="running on other-host"), DriverLease(study, "s"):
        pass
    assert json.loads(path.read_text())["host"] == "other-host"  # the live lease is untouched


def test_the_heartbeat_keeps_the_lease_fresh(tmp_path, monkeypatch):
    monkeypatch.setattr(lease, "HEARTBEAT_S", 0.05)
    study = str(tmp_path / "s")
    with DriverLease(study, "s"):
        path = lease_path(study)
        os.utime(path, (time.time() - 100, time.time() - 100))
        time.sleep(0.5)
        assert time.time() - path.stat().st_mtime < 5


def test_of_many_processes_racing_for_one_lease_exactly_one_wins(tmp_path):
    study = str(tmp_path / "st" / "race")
    script = (
        "import sys, time\n"
        "from vertstudy.errors import ConfigError\n"
        "from vertstudy.study.lease import DriverLease\n"
        "start = float(sys.argv[2])\n"
        "time.sleep(max(0.0, start - time.time()))\n"
        "try:\n"
        "    with DriverLease(sys.argv[1], 'race'):\n"
        "        print('won', flush=True); time.sleep(2.0)\n"
        "except ConfigError as exc:\n"
        "    print('refused', exc, flush=True)\n"
    )
    start = time.time() + 3.0  # every process is up and waiting before the start
    procs = [subprocess.Popen([sys.executable, "-c", script, study, str(start)], stdout=subprocess.PIPE, text=True)
             for _ in range(6)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert sum(o.startswith("won") for o in outs) == 1, outs
    assert sum(o.startswith("refused") and "driver is running" in o for o in outs) == 5, outs
    assert not lease_path(study).exists()


def test_drivers_asking_for_one_new_phantom_set_at_once_write_it_once(tmp_path):
    """Three processes (as three drivers on one storage would) ask for the same phantom set at
    the same moment: all get the complete set; it is written once, and no temporary is left."""
    script = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from vertstudy.study.dataset import _phantom_root\n"
        "from vertstudy.study.spec import DataSpec\n"
        "start = float(sys.argv[2])\n"
        "time.sleep(max(0.0, start - time.time()))\n"
        "data = DataSpec.model_validate({'phantoms': {'count': 3, 'seed': 11}, 'split': {'val': 1, 'test': 1}})\n"
        "root = _phantom_root(data, Path(sys.argv[1]), progress=False)\n"
        "print(root, sorted(p.name for p in root.iterdir()), flush=True)\n"
    )
    start = time.time() + 4.0
    procs = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path), str(start)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outs]
    assert len({out for out, _ in outs}) == 1, outs  # the same complete set for all three
    sets = sorted(p.name for p in (tmp_path / "_phantoms").iterdir())
    assert sets == ["coarse-s11-n3", "coarse-s11-n3.lock"], sets
    assert (tmp_path / "_phantoms" / "coarse-s11-n3" / ".complete").exists()
