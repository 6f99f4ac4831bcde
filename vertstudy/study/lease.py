"""One live driver per study: a lease file beside the study directory.

``<storage>/.<study name>.driver.lease`` holds the driver's host, pid and start time (JSON) and
is created exclusively (``O_CREAT | O_EXCL``), so of several drivers started together exactly
one gets it. While the driver runs, a thread touches the file every :data:`HEARTBEAT_S` seconds.
Another ``study run`` or ``study resume`` of the same study finds the lease and refuses in one
line naming the host and pid, unless the lease is stale: its pid is gone on this host, or its
heartbeat is older than :data:`STALE_S` seconds (a driver killed on another host, or a lost
node). A stale lease is moved aside with an atomic rename (one taker wins) and taken over.

The lease lives beside the study directory, not in it, so a study that fails its checks still
leaves nothing behind. Local storage (and shared file systems mounted as local paths) only: on
object storage (``s3://``, ``gs://``) there is no exclusive create, and no lease is taken.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path

from vertstudy.errors import ConfigError
from vertstudy.study import storage

HEARTBEAT_S = 10.0
STALE_S = 60.0


def lease_path(study_dir: str) -> Path | None:
    """Where the lease of the study at ``study_dir`` lives; ``None`` on object storage."""
    if not storage.is_local(study_dir):
        return None
    path = storage.local_path(study_dir)
    return path.parent / f".{path.name}.driver.lease"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _holder(path: Path) -> tuple[dict, float] | None:
    """The lease's content and the seconds since its last heartbeat; ``None`` if it vanished."""
    try:
        age = time.time() - path.stat().st_mtime
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    try:
        info = json.loads(text)
    except ValueError:
        info = {}  # a lease torn while written: judged by its age alone
    return (info if isinstance(info, dict) else {}), age


def _stale(info: dict, age: float) -> bool:
    if age > STALE_S:
        return True
    same_host = info.get("host") == socket.gethostname()
    return same_host and isinstance(info.get("pid"), int) and not _pid_alive(info["pid"])


class DriverLease:
    """``with DriverLease(study_dir, name):`` holds the study's lease for the block, or raises
    ``ConfigError`` (one line) when a live driver holds it."""

    def __init__(self, study_dir: str, name: str):
        self.study_dir, self.name = study_dir, name
        self.path = lease_path(study_dir)
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> DriverLease:
        if self.path is None:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        body = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started_at": time.time(),
                           "token": self.token}).encode()
        for _ in range(20):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                held = _holder(self.path)
                if held is None:
                    continue  # released meanwhile: try again
                info, age = held
                if not _stale(info, age):
                    raise ConfigError(
                        f"study {self.name!r} ({self.study_dir}): its driver is running on "
                        f"{info.get('host', '?')} (pid {info.get('pid', '?')}, heartbeat {age:.0f} s ago); wait "
                        f"for it to end or stop it, then `vertstudy study resume {self.study_dir}` (a driver "
                        f"silent for {STALE_S:.0f} s is taken over)"
                    ) from None
                again = _holder(self.path)  # still the lease judged stale (not a new one a racer took)?
                if again is None or again[0] != info or not _stale(*again):
                    continue
                aside = self.path.with_name(f"{self.path.name}.stale-{self.token}")
                try:  # one taker wins the rename; the others find the new lease on their next try
                    os.replace(self.path, aside)
                    aside.unlink(missing_ok=True)
                except FileNotFoundError:
                    pass
                continue
            with os.fdopen(fd, "wb") as f:
                f.write(body)
            self._thread = threading.Thread(target=self._beat, name="vertstudy-lease", daemon=True)
            self._thread.start()
            return self
        raise ConfigError(f"study {self.name!r}: could not take the driver lease {self.path}; try again")

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                return

    def __exit__(self, *exc) -> None:
        if self.path is None or self._thread is None:
            return
        self._stop.set()
        self._thread.join(timeout=5)
        held = _holder(self.path)
        if held is not None and held[0].get("token") == self.token:
            self.path.unlink(missing_ok=True)
