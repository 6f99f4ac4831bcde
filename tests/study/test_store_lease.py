"""The driver lease on a real S3-compatible server (SeaweedFS, tests/servers.py): conditional
create, heartbeat and release by ETag, six drivers racing, stale-lease takeover; storage without
a lease is refused unless asked for; and the store's errors (unreachable endpoint, missing
bucket, refused credentials, denied write, a URI with a query or credentials) are one line,
exit 2, with nothing of the study written."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest
import yaml

from tests.study.conftest import tiny_study
from vertstudy.errors import ConfigError, StorageError
from vertstudy.study import lease
from vertstudy.study.lease import DriverLease

CLI = [sys.executable, "-m", "vertstudy.cli"]


@pytest.fixture(scope="module")
def bucket(s3_server):
    return s3_server.bucket("vs-lease")


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv(lease.NO_LEASE_ENV, raising=False)
    return s3_server


def lease_object(server, bucket: str, key: str) -> tuple[dict, str] | None:
    s3 = server.client()
    try:
        got = s3.get_object(Bucket=bucket, Key=key)
    except s3.exceptions.NoSuchKey:
        return None
    return json.loads(got["Body"].read()), got["ETag"]


def test_lease_object_is_exclusive_beats_by_etag_and_is_removed(s3_env, bucket, monkeypatch):
    monkeypatch.setattr(lease, "HEARTBEAT_S", 0.2)
    study = f"s3://{bucket}/st/one"
    with DriverLease(study, "one") as held:
        body, etag = lease_object(s3_env, bucket, "st/.one.driver.lease")
        assert body["pid"] == os.getpid() and body["host"] == socket.gethostname() and body["nonce"]
        with pytest.raises(ConfigError) as info, DriverLease(study, "one"):
            pass
        message = str(info.value)
        assert "\n" not in message and f"pid {os.getpid()}" in message and f"study resume {study}" in message
        time.sleep(1.0)
        later, later_etag = lease_object(s3_env, bucket, "st/.one.driver.lease")
        assert later_etag != etag and later["nonce"] != body["nonce"], "the heartbeat rewrote the lease"
        assert held._object.etag == later_etag
    assert lease_object(s3_env, bucket, "st/.one.driver.lease") is None
    assert not [k for k in s3_env.keys(bucket, "st/") if "probe" in k], "no probe object left"


def test_stale_leases_on_the_store_are_taken_over_and_a_live_one_is_not(s3_env, bucket, monkeypatch):
    s3, key, study = s3_env.client(), "st/.two.driver.lease", f"s3://{bucket}/st/two"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    s3.put_object(Bucket=bucket, Key=key, Body=json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout),
                                                           "token": "x"}).encode())
    with DriverLease(study, "two"):  # a driver of this host whose process has ended (a SIGKILLed driver)
        assert lease_object(s3_env, bucket, key)[0]["pid"] == os.getpid()
    monkeypatch.setattr(lease, "STALE_S", 2.0)
    s3.put_object(Bucket=bucket, Key=key, Body=json.dumps({"host": "other-host", "pid": 1, "token": "y"}).encode())
    with pytest.raises(ConfigError, match="running on other-host"), DriverLease(study, "two"):
        pass  # another host, its heartbeat fresh by the store's clock
    time.sleep(3.5)  # silent for longer than STALE_S by the store's clock
    with DriverLease(study, "two"):
        assert lease_object(s3_env, bucket, key)[0]["pid"] == os.getpid()
    assert lease_object(s3_env, bucket, key) is None


def test_a_lease_lost_to_a_takeover_is_not_deleted_by_its_old_holder(s3_env, bucket, monkeypatch, caplog):
    monkeypatch.setattr(lease, "HEARTBEAT_S", 0.2)
    s3, key = s3_env.client(), "st/.three.driver.lease"
    with DriverLease(f"s3://{bucket}/st/three", "three"):
        s3.put_object(Bucket=bucket, Key=key, Body=b'{"host": "other-host", "pid": 2, "token": "z"}')
        time.sleep(0.8)
    assert "taken over by another driver" in caplog.text
    assert lease_object(s3_env, bucket, key)[0]["host"] == "other-host", "the new holder's lease stays"
    s3.delete_object(Bucket=bucket, Key=key)


RACE = """
import sys, time
from vertstudy.errors import ConfigError
from vertstudy.study.lease import DriverLease
start = float(sys.argv[2])
time.sleep(max(0.0, start - time.time()))
try:
    with DriverLease(sys.argv[1], 'race'):
        print('won', flush=True); time.sleep(3.0)
except ConfigError as exc:
    print('refused', exc, flush=True)
"""


def test_of_six_drivers_racing_for_the_lease_on_the_store_exactly_one_wins(s3_env, bucket):
    study = f"s3://{bucket}/st/race"
    start = time.time() + 6.0  # every process has imported boto3 and is waiting before the start
    procs = [subprocess.Popen([sys.executable, "-c", RACE, study, str(start)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=os.environ.copy()) for _ in range(6)]
    outs = [p.communicate(timeout=180) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-1500:] for _, err in outs]
    stdout = [out for out, _ in outs]
    assert sum(o.startswith("won") for o in stdout) == 1, stdout
    refused = [o for o in stdout if o.startswith("refused")]
    assert len(refused) == 5 and all("driver is running" in o and o.count("\n") == 1 for o in refused), stdout
    assert not s3_env.keys(bucket, "st/.race"), "the lease and the probes are gone"


def test_storage_without_a_lease_is_refused_unless_asked(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(lease.NO_LEASE_ENV, raising=False)
    with pytest.raises(ConfigError) as info, DriverLease("gs://some-bucket/st/x", "x"):
        pass
    message = str(info.value)
    assert "\n" not in message and "gs://" in message and "--no-lease" in message
    monkeypatch.setenv(lease.NO_LEASE_ENV, "1")
    with DriverLease("gs://some-bucket/st/x", "x"):
        pass
    assert "no driver lease for study 'x' (--no-lease)" in capsys.readouterr().err


def _run(argv: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([*CLI, *argv], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_store_errors_are_one_line_exit_2_and_write_nothing(s3_server, tmp_path):
    """Unreachable endpoint, missing bucket, refused credentials, denied write, and a URI with a
    query or with credentials: one line each, naming the URI and what to check, no secret."""
    bucket = s3_server.bucket("vs-errors")
    study = tiny_study("errs", tmp_path / "unused")
    path = tmp_path / "errs.yaml"
    path.write_text(yaml.safe_dump(study), encoding="utf-8")
    base = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    cases = {
        "endpoint": (f"s3://{bucket}/st", s3_server.env(endpoint=f"http://127.0.0.1:{dead}"),
                     [f"cannot reach the object store at http://127.0.0.1:{dead}", "AWS_ENDPOINT_URL"]),
        "bucket": ("s3://vs-no-such-bucket/st", s3_server.env(), ["the bucket 'vs-no-such-bucket' does not exist"]),
        "credentials": (f"s3://{bucket}/st", s3_server.env(keys=("vsnobody", "not-the-secret")),
                        ["refused the credentials", "AWS_ACCESS_KEY_ID"]),
        "denied": (f"s3://{bucket}/st", s3_server.env(keys=s3_server.reader),
                   ["may read but not write", "s3:PutObject"]),
    }
    procs = {name: _run(["study", "run", str(path), "--storage", uri, "--no-progress"], {**base, **env})
             for name, (uri, env, _) in cases.items()}
    secrets_ = [s3_server.admin[1], s3_server.reader[1], "not-the-secret"]
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        lines = err.strip().splitlines()
        assert proc.returncode == 2, (name, err[-2000:])
        assert len(lines) == 1 and lines[0].startswith("error: storage: "), (name, err[-2000:])
        assert "Traceback" not in err and not out.strip(), name
        for must in cases[name][2]:
            assert must in lines[0], (name, lines[0])
        assert cases[name][0] in lines[0], (name, lines[0])
        assert not any(s in lines[0] for s in secrets_), (name, lines[0])
        print(f"{name}: {lines[0]}")
    assert s3_server.keys(bucket) == [], "nothing written to the store"
def test_uris_with_a_query_or_credentials_and_reads_of_an_unreachable_store_are_one_line(s3_server, monkeypatch):
    """A query or KEY:SECRET@ in the storage URI is refused before anything is written (it would be
    joined with paths and saved in study.json); reading a study back (status, resume, report) from
    a store that cannot be reached is one line too; a reader may still read."""
    from vertstudy.study import storage
    from vertstudy.study.runner import study_status

    bucket = s3_server.bucket("vs-errors")
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ConfigError) as info:
        storage.check_writable(f"s3://{bucket}/st?endpoint_override=127.0.0.1&secret_key=hush")
    message = str(info.value)
    assert f"s3://{bucket}/st?... carries a query (endpoint_override, secret_key)" in message
    assert "AWS_ENDPOINT_URL" in message and "hush" not in message and "\n" not in message
    with pytest.raises(ConfigError) as info:
        storage.check_writable(f"s3://AKIDSECRET:hushhush@{bucket}/st")
    message = str(info.value)
    assert f"s3://***@{bucket}/st carries credentials" in message and "hush" not in message
    assert "AKIDSECRET" not in message
    assert s3_server.keys(bucket) == [], "nothing written to the store"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{dead}")
    with pytest.raises(StorageError) as info:
        study_status(f"s3://{bucket}/st/errs")
    assert "cannot reach the object store" in str(info.value) and "\n" not in str(info.value)
    for key, value in s3_server.env(keys=s3_server.reader).items():
        monkeypatch.setenv(key, value)
    assert storage.exists(f"s3://{bucket}/x/none") is False, "the reader may still read"
