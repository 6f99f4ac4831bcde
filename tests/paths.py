"""Where the real test data lives: ``../shared/data`` beside the repository checkout."""

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@contextmanager
def short_tmp(prefix: str) -> Iterator[Path]:
    """A new folder ``/tmp/<prefix>XXXX`` (Ray's socket paths must be short, so clusters and
    their storage live here rather than under pytest's ``tmp_path``); removed afterwards unless
    ``VS_KEEP`` is set."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    try:
        yield path
    finally:
        if not os.environ.get("VS_KEEP"):
            shutil.rmtree(path, ignore_errors=True)
