"""One live driver per study: a lease file beside the study directory.

``<storage>/.<study name>.driver.lease`` holds the driver's host, pid and start time (JSON) and
is created exclusively (``O_CREAT | O_EXCL``), so of several drivers started together exactly
one gets it. While the driver runs, a thread touches the file every :data:`HEARTBEAT_S` seconds.
Another ``study run`` or ``study resume`` of the same study finds the lease and refuses in one
line naming the host and pid, unless the lease is stale: its pid is gone on this host, or its
heartbeat is older than :data:`STALE_S` seconds (a driver killed on another host, or a lost
node). A stale lease is moved aside with an atomic rename (one taker wins) and taken over.

The lease lives beside the study directory, not in it, so a study that fails its checks still
leaves nothing behind.

On S3 (and S3-compatible stores) the lease is the object ``<prefix>/.<study name>.driver.lease``,
written with boto3's conditional writes (pyarrow has none): created with ``If-None-Match: *`` (of
several drivers exactly one gets it, the others get 412), its heartbeat rewritten with
``If-Match: <its ETag>`` (each body carries a fresh nonce, since equal bytes have equal ETags), a
stale one taken over by the same conditional overwrite (one taker wins) and deleted on exit with
``If-Match``. Its age is the store's own clock: the response's ``Date`` less the object's
``Last-Modified``. Before taking a lease the driver checks that the store honours both conditions
(a store that ignored them would let two drivers in); one that does not is refused in one line.

Elsewhere (``gs://``, ``hdfs://``...), and on a store without conditional writes, there is no
lease: the driver refuses to start unless the user asks to run without one (``--no-lease``, or
``VERTSTUDY_NO_LEASE=1``), promising that no other driver of the study runs.

:func:`claim_optuna_study` guards the other thing two drivers can share: an Optuna study on a
server database or journal (``search.optuna_storage``). The study is created by the first driver
with its study directory recorded in it; a driver of another directory with the same study name
on the same database is refused in one line instead of silently mixing its trials in.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from pathlib import Path

from vertstudy.errors import ConfigError, StorageError
from vertstudy.study import storage

HEARTBEAT_S = 10.0
STALE_S = 60.0
NO_LEASE_ENV = "VERTSTUDY_NO_LEASE"
#: the Optuna user attribute naming the study directory an Optuna study belongs to
OWNER_ATTR = "vertstudy_study_dir"


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


def _busy(name: str, study_dir: str, info: dict, age: float) -> ConfigError:
    return ConfigError(
        f"study {name!r} ({study_dir}): its driver is running on {info.get('host', '?')} (pid "
        f"{info.get('pid', '?')}, heartbeat {age:.0f} s ago); wait for it to end or stop it, then `vertstudy study "
        f"resume {study_dir}` (a driver silent for {STALE_S:.0f} s is taken over)")


def lease_wanted() -> bool:
    """False when the user asked to run without a driver lease (``--no-lease``)."""
    return os.environ.get(NO_LEASE_ENV, "").strip().lower() not in ("1", "true", "yes", "on")


def _no_lease_here(study_dir: str, why: str) -> ConfigError:
    return ConfigError(
        f"storage: {study_dir}: {why}, so vertstudy cannot make sure only one driver runs this study; use a store "
        "that does (local or shared file system, S3 or an S3-compatible store with conditional writes), or run with "
        "--no-lease (VERTSTUDY_NO_LEASE=1) if you make sure yourself that no other driver of it runs")


class DriverLease:
    """``with DriverLease(study_dir, name):`` holds the study's lease for the block, or raises
    ``ConfigError`` (one line) when a live driver holds it."""

    def __init__(self, study_dir: str, name: str):
        self.study_dir, self.name = study_dir, name
        self.path = lease_path(study_dir)
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._object: ObjectLease | None = None

    def __enter__(self) -> DriverLease:
        if not lease_wanted():
            print(f"no driver lease for study {self.name!r} (--no-lease): make sure no other driver of it runs",
                  file=sys.stderr)
            return self
        if self.path is None:
            if not str(self.study_dir).startswith("s3://"):
                scheme = str(self.study_dir).split("://", 1)[0]
                raise _no_lease_here(self.study_dir, f"vertstudy has no driver lease on {scheme}:// storage")
            self._object = ObjectLease(self.study_dir, self.name, self.token).acquire()
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
                    raise _busy(self.name, self.study_dir, info, age) from None
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
        if self._object is not None:
            self._object.release()
            return
        if self.path is None or self._thread is None:
            return
        self._stop.set()
        self._thread.join(timeout=5)
        held = _holder(self.path)
        if held is not None and held[0].get("token") == self.token:
            self.path.unlink(missing_ok=True)


class ObjectLease:
    """The driver lease as an S3 object (see the module docstring): :meth:`acquire`, a heartbeat
    thread, :meth:`release`."""

    def __init__(self, study_dir: str, name: str, token: str):
        self.study_dir, self.name, self.token = study_dir, name, token
        bucket, key = storage.s3_parts(study_dir)
        head, _, leaf = key.rpartition("/")
        self.bucket = bucket
        self.key = f"{head}/.{leaf}.driver.lease" if head else f".{leaf}.driver.lease"
        self.uri = f"s3://{bucket}/{self.key}"
        self.etag = ""
        self._s3 = storage.s3_client()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- the store's answers
    @staticmethod
    def _code(exc) -> tuple[str, int]:
        response = getattr(exc, "response", None) or {}
        return (str(response.get("Error", {}).get("Code", "")),
                int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0))

    def _refused_condition(self, exc) -> bool:
        """The store answered 412 (a condition did not hold) or 409 (a concurrent conditional write)."""
        code, status = self._code(exc)
        return status in (409, 412) or code in ("PreconditionFailed", "ConditionalRequestConflict")

    def _call(self, op: str, **kw):
        """``s3.<op>(**kw)``; an error other than a refused condition becomes one line."""
        import botocore.exceptions as bexc

        try:
            return getattr(self._s3, op)(Bucket=self.bucket, **kw)
        except bexc.ClientError as exc:
            if self._refused_condition(exc):
                raise
            raise storage.store_error(self.uri, exc, "cannot hold the driver lease") from None
        except (bexc.BotoCoreError, OSError) as exc:
            raise storage.store_error(self.uri, exc, "cannot hold the driver lease") from None

    def _body(self) -> bytes:
        return json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started_at": time.time(),
                           "token": self.token, "nonce": uuid.uuid4().hex}).encode()

    def _put(self, **condition) -> str | None:
        """Write this driver's lease under ``condition``; its new ETag, or None if the condition failed."""
        import botocore.exceptions as bexc

        try:
            return self._call("put_object", Key=self.key, Body=self._body(), ContentType="application/json",
                              **condition)["ETag"]
        except bexc.ClientError:  # 412 / 409 only (_call raised the others as one line)
            return None

    def _holder(self) -> tuple[dict, float, str] | None:
        """(content, seconds since its last write by the store's clock, ETag); None if there is none."""
        import email.utils

        import botocore.exceptions as bexc

        try:
            got = self._s3.get_object(Bucket=self.bucket, Key=self.key)
            text = got["Body"].read()
        except bexc.ClientError as exc:
            code, status = self._code(exc)
            if status == 404 or code in ("NoSuchKey", "NotFound"):
                return None
            raise storage.store_error(self.uri, exc, "cannot hold the driver lease") from None
        except (bexc.BotoCoreError, OSError) as exc:
            raise storage.store_error(self.uri, exc, "cannot hold the driver lease") from None
        now = email.utils.parsedate_to_datetime(got["ResponseMetadata"]["HTTPHeaders"]["date"])
        age = max(0.0, (now - got["LastModified"]).total_seconds())
        try:
            info = json.loads(text)
        except ValueError:
            info = {}  # a lease torn while written: judged by its age alone
        return (info if isinstance(info, dict) else {}), age, got["ETag"]

    def check_conditional_writes(self) -> None:
        """Refuse (one line) a store that refuses or ignores ``If-None-Match`` or ``If-Match`` on
        PUT: with it two drivers would both believe they hold the lease."""
        import botocore.exceptions as bexc

        probe = f"{self.key}.probe-{uuid.uuid4().hex[:12]}"
        ignored = []
        try:
            self._call("put_object", Key=probe, Body=b"1", IfNoneMatch="*")
            for condition in ({"IfNoneMatch": "*"}, {"IfMatch": '"00000000000000000000000000000000"'}):
                try:
                    self._call("put_object", Key=probe, Body=b"2", **condition)
                    ignored.append(next(iter(condition)))
                except bexc.ClientError:
                    pass  # 412: the condition was checked
        except StorageError as exc:
            if any(k in str(exc) for k in ("NotImplemented", "InvalidArgument", "InvalidRequest", "501")):
                raise _no_lease_here(self.study_dir, f"the store at {storage.endpoint()} refuses conditional "
                                                     "writes (If-None-Match / If-Match on PUT)") from None
            raise
        finally:
            try:
                self._s3.delete_object(Bucket=self.bucket, Key=probe)
            except Exception:  # noqa: BLE001 (a probe left behind costs one byte)
                pass
        if ignored:
            raise _no_lease_here(self.study_dir, f"the store at {storage.endpoint()} ignores conditional writes "
                                                 f"({', '.join(ignored)} on PUT)")

    def acquire(self) -> ObjectLease:
        self.check_conditional_writes()
        for _ in range(20):
            etag = self._put(IfNoneMatch="*")
            if etag is None:
                held = self._holder()
                if held is None:
                    continue  # released meanwhile: try again
                info, age, tag = held
                if not _stale(info, age):
                    raise _busy(self.name, self.study_dir, info, age) from None
                etag = self._put(IfMatch=tag)  # one taker of a stale lease wins; the others find the new one
                if etag is None:
                    continue
            self.etag = etag
            self._thread = threading.Thread(target=self._beat, name="vertstudy-lease", daemon=True)
            self._thread.start()
            return self
        raise ConfigError(f"study {self.name!r}: could not take the driver lease {self.uri}; try again")

    def _beat(self) -> None:
        log = logging.getLogger(__name__)
        while not self._stop.wait(HEARTBEAT_S):
            try:
                etag = self._put(IfMatch=self.etag)
            except StorageError as exc:  # the store is away for a moment: try at the next beat
                log.warning("driver lease heartbeat failed (%s); trying again in %.0f s", exc, HEARTBEAT_S)
                continue
            if etag is None:
                log.error("study %r: the driver lease %s was taken over by another driver (this one was silent "
                          "for over %.0f s); stop this driver", self.name, self.uri, STALE_S)
                return
            self.etag = etag

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        try:
            self._s3.delete_object(Bucket=self.bucket, Key=self.key, IfMatch=self.etag)
        except Exception:  # noqa: BLE001 (not ours any more, or the store is away: it goes stale)
            pass


def _open_racing(spec, study_dir: str):
    """Optuna's storage, opened again when drivers starting together on a new database raced to
    create its tables (PostgreSQL: a unique violation on the catalog, or "already exists"); the
    first driver's tables serve them all."""
    from vertstudy.study.search import open_optuna_storage

    for attempt in range(8):
        try:
            return open_optuna_storage(spec, study_dir)
        except ConfigError as exc:
            signs = ("UniqueViolation", "already exists", "DuplicateTable", "IntegrityError")
            raced = any(k in str(exc) for k in signs)
            if not raced or attempt == 7:
                raise
            time.sleep(0.3 * (attempt + 1))
    raise AssertionError("unreachable")


def claim_optuna_study(spec, study_dir: str, fresh: bool) -> None:
    """Bind the study's Optuna study (its name in ``search.optuna_storage``) to ``study_dir``.

    A fresh run creates it (``create_study`` without ``load_if_exists``: of drivers racing for one
    name, one creates it) and records ``study_dir`` in it; a resume adopts one that records
    nothing (made before this check existed). Any other case, an Optuna study of that name that
    belongs to another study directory, or that a racing driver has just created, is refused in
    one line: its trials would mix with this study's. Nothing for grids and for the default
    SQLite database, which lives in the study directory."""
    if spec.search.is_grid or not spec.search.optuna_storage:
        return
    import optuna

    study_dir = storage.canonical(study_dir)
    store = _open_racing(spec, study_dir)
    modes = list(spec.search.modes) if spec.search.multi_objective else [spec.search.mode]
    directions = ["maximize" if m == "max" else "minimize" for m in modes]
    try:
        study = optuna.create_study(study_name=spec.name, storage=store, directions=directions)
        study.set_user_attr(OWNER_ATTR, study_dir)
        return
    except optuna.exceptions.DuplicatedStudyError:
        pass
    study = optuna.load_study(study_name=spec.name, storage=store)
    owner = study.user_attrs.get(OWNER_ATTR)
    if owner == study_dir:
        return
    if owner is None and not fresh:
        study.set_user_attr(OWNER_ATTR, study_dir)
        return
    from sqlalchemy.engine import make_url

    url = spec.search.optuna_storage
    if not url.startswith("journal:"):
        url = make_url(url).render_as_string(hide_password=True)
    belongs = f"belongs to {owner}" if owner else "was just created by another driver"
    raise ConfigError(
        f"search.optuna_storage: {url} already holds an Optuna study named {spec.name!r} that {belongs}, not "
        f"{study_dir}; two studies of one name on one database would mix their trials: give this study another "
        f"name or another optuna_storage{f', or resume it with `vertstudy study resume {owner}`' if owner else ''}")
