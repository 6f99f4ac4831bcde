"""Where a study's results live: a local directory or a URI that pyarrow's filesystems read
(``file://``, ``s3://``, ``gs://``, ``hdfs://``...). Every path here is a string in the
filesystem's own syntax, always joined with ``/``.
"""

from __future__ import annotations

import contextlib
import io
import os
import uuid
from pathlib import Path

import pyarrow.fs as pafs

from vertstudy.errors import ConfigError


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


def resolve(location: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path in it) of a local path or URI; ``ConfigError`` for an unknown scheme."""
    if not is_uri(location):
        return pafs.LocalFileSystem(), str(Path(location).expanduser().resolve())
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
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"storage: {location!r} cannot be written ({reason}); give a writable directory or URI") \
            from None


def exists(location: str) -> bool:
    fs, path = resolve(location)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_text(location: str) -> str:
    fs, path = resolve(location)
    with fs.open_input_stream(path) as f:
        return f.read().decode("utf-8")


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


def ray_storage(location: str) -> tuple[str, pafs.FileSystem | None]:
    """(storage path, filesystem) to give Ray for ``location``: local paths (and ``file://``)
    go through :class:`AtomicLocalHandler`; object-store URIs are used as they are."""
    if is_local(location):
        return str(local_path(location)), pafs.PyFileSystem(AtomicLocalHandler())
    return location, None
