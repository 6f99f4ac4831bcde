"""Where a study's results live: a local directory or a URI that pyarrow's filesystems read
(``file://``, ``s3://``, ``gs://``, ``hdfs://``...). Every path here is a string in the
filesystem's own syntax, always joined with ``/``.
"""

from __future__ import annotations

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


def write_text(location: str, text: str) -> None:
    """Write a small text file atomically (temporary name, then a rename)."""
    fs, path = resolve(location)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with fs.open_output_stream(tmp) as out:
        out.write(text.encode("utf-8"))
    fs.move(tmp, path)
