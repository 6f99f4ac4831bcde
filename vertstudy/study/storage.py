"""Where a study's results live: a local directory or a URI that pyarrow's filesystems read
(``file://``, ``s3://``, ``gs://``, ``hdfs://``...). Every path here is a string in the
filesystem's own syntax, always joined with ``/``.

A storage URI is saved in ``study.json`` and paths are appended to it, so it carries neither
credentials (``s3://KEY:SECRET@bucket``) nor a query (``s3://b/p?endpoint_override=...``): both
are refused in one line. A non-AWS object store (MinIO, Ceph, SeaweedFS, a cloud's S3 API) is
named by the standard environment instead: ``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY`` (or ``AWS_PROFILE``, or the node's role) and ``AWS_DEFAULT_REGION``,
which pyarrow (``FileSystem.from_uri``) and boto3 (the driver lease) both read. A store that
cannot be reached, a missing bucket, refused credentials and a denied write are each one line
(:func:`store_error`) naming the URI and what to check.
"""

from __future__ import annotations

import contextlib
import io
import os
import uuid
from pathlib import Path

import pyarrow.fs as pafs

from vertstudy.errors import ConfigError, StorageError


def is_uri(location: str) -> bool:
    return "://" in str(location)


def is_local(location: str) -> bool:
    """True for a plain path or a ``file://`` URI (results can be opened as local files)."""
    return not is_uri(location) or str(location).startswith("file://")


def local_path(location: str) -> Path:
    """The local path of a plain path or ``file://`` URI."""
    if str(location).startswith("file://"):
        return Path(pafs.FileSystem.from_uri(str(location))[1])
    return Path(location).expanduser().resolve()


def canonical(location: str | Path) -> str:
    """A URI as given; a local path made absolute (what the study commands accept as DIR)."""
    return str(location) if is_uri(str(location)) else str(local_path(str(location)))


def check_uri(location: str, where: str = "storage") -> str:
    """``location`` if it is a path or a URI without credentials and without a query; else
    ``ConfigError`` (one line, the secret parts not shown)."""
    location = str(location)
    if not is_uri(location):
        return location
    scheme, _, rest = location.partition("://")
    authority = rest.split("/", 1)[0]
    if "@" in authority:
        shown = f"{scheme}://***@{rest.split('@', 1)[1].split('?', 1)[0]}"
        raise ConfigError(
            f"{where}: {shown} carries credentials, which would be saved with the study (study.json); leave them "
            "out of the URI and set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, or the node's role) "
            "in the environment")
    if "?" in rest:
        path, _, query = rest.partition("?")
        keys = ", ".join(sorted({q.split("=", 1)[0] for q in query.split("&") if q})) or "?"
        raise ConfigError(
            f"{where}: {scheme}://{path}?... carries a query ({keys}), which cannot be joined with the study's "
            "paths; give the URI without it and set the store in the environment: AWS_ENDPOINT_URL for a non-AWS "
            "endpoint (MinIO, Ceph, SeaweedFS...), AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY for credentials, "
            "AWS_DEFAULT_REGION for the region")
    return location


def endpoint() -> str:
    """The S3 endpoint pyarrow and boto3 talk to (``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL``,
    any user:password in it hidden); ``AWS`` when neither is set."""
    url = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or ""
    if "@" in url:
        scheme, _, rest = url.partition("://")
        url = f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url or "AWS"


#: words in pyarrow's and boto3's errors, by what the user should check
_UNREACHABLE = ("NETWORK_CONNECTION", "curlCode", "Could not connect", "Could not resolve", "Connection refused",
                "EndpointConnectionError", "Connect timeout", "timed out", "Name or service not known")
_NO_BUCKET = ("NO_SUCH_BUCKET", "NoSuchBucket", "allow_bucket_creation")
_BAD_KEYS = ("INVALID_ACCESS_KEY_ID", "InvalidAccessKeyId", "SIGNATURE_DOES_NOT_MATCH", "SignatureDoesNotMatch",
             "EXPIRED_TOKEN", "ExpiredToken", "InvalidToken", "InvalidClientTokenId", "NoCredentialsError",
             "Unable to locate credentials")
_DENIED = ("ACCESS_DENIED", "AccessDenied", "Access Denied", "Forbidden")


def s3_parts(location: str) -> tuple[str, str]:
    """(bucket, key prefix) of an ``s3://`` URI."""
    rest = str(location).split("://", 1)[1]
    bucket, _, key = rest.partition("/")
    return bucket, key.strip("/")


def s3_client():
    """A boto3 S3 client for the store pyarrow reads (the same environment: ``AWS_ENDPOINT_URL``,
    credentials, region), with short timeouts and 3 attempts; ``ConfigError`` without boto3."""
    try:
        import boto3
        from botocore.config import Config
    except ImportError:
        raise ConfigError("storage: s3:// needs boto3 (pip install 'vertstudy[cluster]')") from None
    region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or None
    config = Config(retries={"max_attempts": 3, "mode": "standard"}, connect_timeout=5, read_timeout=20)
    return boto3.client("s3", region_name=region, config=config)


def _diagnose_s3_denial(location: str) -> str:
    """Why an s3 store said "access denied": refused credentials, no read, or no write (boto3 asks)."""
    try:
        import botocore.exceptions as bexc

        bucket, prefix = s3_parts(location)
        s3_client().list_objects_v2(Bucket=bucket, Prefix=prefix, MaxKeys=1)
    except ConfigError:
        return "access denied: check the credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or AWS_PROFILE) " \
               "and that they may read and write this prefix"
    except bexc.ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        if any(k in code for k in _BAD_KEYS):
            return _bad_keys(code)
        return (f"access denied ({code or 'reading'}): the credentials may not list this prefix; grant them "
                "s3:ListBucket, s3:GetObject, s3:PutObject and s3:DeleteObject on it")
    except Exception as exc:  # noqa: BLE001 (a second failure says no more than the first)
        return f"access denied ({type(exc).__name__}): check the credentials and their permissions on this prefix"
    return ("the credentials may read but not write here (access denied): grant them s3:PutObject and "
            "s3:DeleteObject on this prefix, or give a storage they may write")


def _bad_keys(code: str) -> str:
    return (f"the store refused the credentials ({code}): check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
            "(or AWS_PROFILE, or the node's role) for this endpoint")


def store_error(location: str, exc: BaseException, doing: str = "cannot be read") -> StorageError:
    """One line for an object store's failure on ``location``: what went wrong and what to check
    (unreachable endpoint, missing bucket, refused credentials, denied write), no secret shown."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    where = str(location).split("?", 1)[0]
    s3 = str(location).startswith("s3://")
    if any(k in text for k in _UNREACHABLE):
        why = (f"cannot reach the object store at {endpoint() if s3 else 'its endpoint'}; check "
               f"{'AWS_ENDPOINT_URL (or the region) and ' if s3 else ''}that the store is up and reachable from here")
    elif any(k in text for k in _NO_BUCKET) or ("Bucket" in text and "not found" in text):
        bucket = s3_parts(location)[0] if s3 else str(location).split("://", 1)[-1].split("/", 1)[0]
        why = (f"the bucket {bucket!r} does not exist{f' at {endpoint()}' if s3 else ''}; create it first "
               "(vertstudy creates no buckets) or fix the URI")
    elif any(k in text for k in _BAD_KEYS):
        code = next(k for k in _BAD_KEYS if k in text)
        why = _bad_keys(code)
    elif any(k in text for k in _DENIED):
        why = _diagnose_s3_denial(location) if s3 else \
            "access denied: check the credentials and that they may read and write this location"
    else:
        first = text[:240]
        why = f"{first}; check the URI, the store and the credentials"
    return StorageError(f"storage: {where} {doing}: {why}")


def resolve(location: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path in it) of a local path or URI; ``ConfigError`` for an unknown scheme, a
    URI with credentials or a query (:func:`check_uri`)."""
    if not is_uri(location):
        return pafs.LocalFileSystem(), str(Path(location).expanduser().resolve())
    check_uri(location)
    try:
        return pafs.FileSystem.from_uri(str(location))
    except (ValueError, OSError) as exc:  # pyarrow's ArrowInvalid is a ValueError
        raise ConfigError(f"storage: cannot open {location!r} ({exc}); accepted: a local directory or a "
                          "URI pyarrow reads (file://, s3://, gs://, hdfs://)") from None


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts])


def uri_join(location: str, *parts: str) -> str:
    """``location`` (path or URI) with ``parts`` appended, in the same syntax."""
    if is_uri(location):
        return join(location, *parts)
    return str(Path(location).expanduser().resolve().joinpath(*parts))


def check_writable(location: str) -> None:
    """Create ``location`` and write and delete a probe file there; ``ConfigError`` naming the
    location and the reason when it cannot be written."""
    fs, path = resolve(location)
    probe = join(path, f".vertstudy-write-probe-{uuid.uuid4().hex[:8]}")
    try:
        fs.create_dir(path, recursive=True)
        with fs.open_output_stream(probe) as out:
            out.write(b"ok")
        fs.delete_file(probe)
    except (OSError, ValueError) as exc:
        if is_uri(location) and not is_local(location):
            raise store_error(location, exc, "cannot be written") from None
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"storage: {location!r} cannot be written ({reason}); give a writable directory or URI") \
            from None


def exists(location: str) -> bool:
    fs, path = resolve(location)
    try:
        return fs.get_file_info(path).type != pafs.FileType.NotFound
    except OSError as exc:
        if is_local(location):
            raise
        raise store_error(location, exc) from None


def read_text(location: str) -> str:
    fs, path = resolve(location)
    try:
        with fs.open_input_stream(path) as f:
            return f.read().decode("utf-8")
    except OSError as exc:
        if is_local(location) or isinstance(exc, FileNotFoundError):
            raise
        raise store_error(location, exc) from None


def write_atomic(location: str, write) -> str:
    """Make ``location`` appear whole or not at all: ``write(filesystem, temporary path)`` writes
    a hidden temporary file beside it, which is then renamed over ``location`` (and removed if
    writing fails). Returns the path in its filesystem."""
    fs, path = resolve(location)
    head, _, tail = path.rpartition("/")
    tmp = f"{head}/.{tail}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        write(fs, tmp)
        fs.move(tmp, path)
    except BaseException:
        try:
            fs.delete_file(tmp)
        except OSError:
            pass
        raise
    return path


def read_parquet(fs: pafs.FileSystem, path: str, columns: list[str] | None = None):
    """The table of the Parquet file ``path`` on ``fs``, read whole through one open handle.

    A file that :func:`write_atomic` replaces while it is read is read whole, old or new:
    ``pq.read_table(path)`` looks the file's size up and opens it in two steps, so a rename in
    between made it read the new file with the old size ("Page was smaller than expected"; 3,668
    of 12,610 reads failed against a writer replacing a small table in a loop, 0 of 53,582
    through a handle). An object store's handle still asks the size and the bytes in two
    requests, so a read that does not parse is tried again (twice) before its error is raised.
    Readers of a running study's tables and checkpoints go through here."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    for attempt in (1, 2, 3):
        try:
            with fs.open_input_file(path) as f:
                body = f.read()
            return pq.ParquetFile(pa.BufferReader(body)).read(columns=columns, use_threads=False)
        except FileNotFoundError:
            raise
        except (OSError, pa.ArrowException):
            if attempt == 3:
                raise


def write_text(location: str, text: str) -> None:
    """Write a small UTF-8 text file atomically (see :func:`write_atomic`)."""

    def write(fs, tmp: str) -> None:
        with fs.open_output_stream(tmp) as out:
            out.write(text.encode("utf-8"))

    write_atomic(location, write)


class _AtomicFile(io.FileIO):
    """A file written under a hidden temporary name and renamed over ``final`` when closed; after
    a failed write (a full disk: ENOSPC, a quota) the temporary file is removed instead, so the
    earlier ``final`` stays whole (Ray closes its streams after a failed write as after a good one)."""

    def __init__(self, final: str):
        self._final = final
        self._failed = False
        head, tail = os.path.split(final)
        self._tmp = os.path.join(head, f".{tail}.tmp-{uuid.uuid4().hex[:8]}")
        super().__init__(self._tmp, "wb")

    def write(self, data) -> int:
        try:
            return super().write(data)
        except BaseException:
            self._failed = True
            raise

    def close(self) -> None:
        if self.closed:
            return
        try:
            super().close()
        except BaseException:
            self._failed = True
            raise
        finally:
            if self._failed:
                with contextlib.suppress(OSError):
                    os.unlink(self._tmp)
        if not self._failed:
            os.replace(self._tmp, self._final)


class AtomicLocalHandler(pafs.FileSystemHandler):
    """The local filesystem, except that every file written appears whole or not at all.

    Ray uploads its experiment state, results and checkpoints to the storage with plain copies;
    a driver killed mid-copy would leave a truncated ``experiment_state-*.json`` that no resume
    can read. Object stores (s3://, gs://) are atomic per object already; this gives a local or
    NFS storage the same property (``study resume`` after SIGKILL relies on it)."""

    def __init__(self):
        self._fs = pafs.LocalFileSystem()

    def __eq__(self, other) -> bool:
        return isinstance(other, AtomicLocalHandler)

    def __reduce__(self):
        return (AtomicLocalHandler, ())

    def equals(self, other) -> bool:
        return self == other

    def get_type_name(self) -> str:
        return "vertstudy-atomic-local"

    def normalize_path(self, path):
        return self._fs.normalize_path(path)

    def get_file_info(self, paths):
        return self._fs.get_file_info(paths)

    def get_file_info_selector(self, selector):
        return self._fs.get_file_info(selector)

    def create_dir(self, path, recursive):
        self._fs.create_dir(path, recursive=recursive)

    def delete_dir(self, path):
        self._fs.delete_dir(path)

    def delete_dir_contents(self, path, missing_dir_ok=False):
        self._fs.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self):
        raise OSError("vertstudy: refusing to delete the contents of the root directory")

    def delete_file(self, path):
        self._fs.delete_file(path)

    def move(self, src, dest):
        self._fs.move(src, dest)

    def copy_file(self, src, dest):
        with self._fs.open_input_stream(src) as source, self.open_output_stream(dest, None) as out:
            while chunk := source.read(1 << 20):
                out.write(chunk)

    def open_input_stream(self, path):
        return self._fs.open_input_stream(path)

    def open_input_file(self, path):
        return self._fs.open_input_file(path)

    def open_output_stream(self, path, metadata):
        import pyarrow as pa

        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        return pa.PythonFile(_AtomicFile(path), mode="w")

    def open_append_stream(self, path, metadata):
        return self._fs.open_append_stream(path)


class _AlreadyDeleted:
    """Drops Ray's log record (an ERROR with a traceback) of a checkpoint it could not delete
    because it is gone already: after a driver was killed on an object store, the state it left
    can name checkpoints a newer one had replaced; nothing is lost."""

    def filter(self, record) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not (isinstance(exc, FileNotFoundError) and "deleting path" in str(record.msg))


def quiet_missing_deletes() -> None:
    """Install :class:`_AlreadyDeleted` on Ray's storage logger (once)."""
    import logging

    logger = logging.getLogger("ray.train._internal.storage")
    if not any(isinstance(f, _AlreadyDeleted) for f in logger.filters):
        logger.addFilter(_AlreadyDeleted())


def ray_storage(location: str) -> tuple[str, pafs.FileSystem | None]:
    """(storage path, filesystem) to give Ray for ``location``: local paths (and ``file://``)
    go through :class:`AtomicLocalHandler`; object-store URIs are used as they are."""
    if is_local(location):
        return str(local_path(location)), pafs.PyFileSystem(AtomicLocalHandler())
    return location, None
