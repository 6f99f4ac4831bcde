"""Files that appear whole or not at all: the one way vertstudy writes a local file that someone
may read while it is written, or that a crash could leave cut.

``with atomic_path(final) as tmp:`` gives a hidden temporary path in ``final``'s folder (created
if needed); whatever is written there is renamed over ``final`` when the block ends, and removed
when it raises. ``atomic_write_text`` and ``atomic_write_json`` are the common cases. (Writes to
a study's storage, which may be an object store, go through :mod:`vertstudy.study.storage`.)
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def atomic_path(final: str | Path, suffix: str = "") -> Iterator[Path]:
    """A temporary path beside ``final`` (``suffix`` for writers that go by the file name, e.g.
    ``.nii.gz``), renamed over ``final`` on success and removed on failure."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=suffix, dir=final.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, final)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write a UTF-8 text file atomically; returns its path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` as JSON atomically; returns the path."""
    return atomic_write_text(path, json.dumps(obj))
