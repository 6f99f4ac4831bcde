"""The process's allocator, set for large tensors (training and whole-CT inference on the CPU).

glibc's ``malloc`` serves every block above its mmap threshold (at most 32 MB) with a fresh
``mmap`` and gives it back with ``munmap`` when freed. A full-resolution activation of the
paper's network is far larger (1 x 32 x 104 x 80 x 80 float32 = 85 MB), so every forward pass
maps, page-faults in and unmaps gigabytes: measured 637,000 minor page faults per forward pass
of one 104 x 80 x 80 tile at width 1, and the pass took twice the CPU time it takes when freed
memory is kept and reused (1 thread; training steps at width 1: 1.3x). :func:`reuse_freed_memory`
tells glibc to serve large blocks from its heap and to keep freed memory for reuse
(``mallopt(M_MMAP_MAX, 0)``, ``mallopt(M_TRIM_THRESHOLD, 2 GiB - 1)``). The price: the
process keeps its peak memory until it exits (measured ~10 % more peak RSS).

It changes no result, only speed. Set ``VERTSTUDY_MALLOC=system`` to leave the allocator as it
is; on a C library without ``mallopt`` (not glibc) nothing happens.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_state: dict[str, bool] = {}


def reuse_freed_memory() -> bool:
    """Make large allocations come from the heap and keep freed memory (see the module
    docstring); once per process. Returns whether the setting is in force."""
    if "on" in _state:
        return _state["on"]
    on = False
    if os.environ.get("VERTSTUDY_MALLOC", "").strip().lower() != "system":
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            mallopt = libc.mallopt
        except (OSError, AttributeError):
            mallopt = None
        if mallopt is not None:
            on = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    _state["on"] = on
    return on
