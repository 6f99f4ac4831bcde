"""Our C kernels for the CPU: the fused GroupNorm (+ ReLU) of channels-last bf16 tensors.

bf16 training on the CPU keeps activations channels-last (:class:`vertstudy.model.blocks.Conv3d`,
``channels_last_all``), and PyTorch's GroupNorm kernels are slow on that layout; the composite of
PyTorch operations in :class:`vertstudy.model.blocks._ChannelsLastGroupNorm` makes about 10
passes over the tensor for a GroupNorm and its ReLU, forward and backward, and measured more
time than the convolutions (37 % of a width-0.5 bf16 step, 1 thread). ``_groupnorm.c`` does the
same in 4 passes, the ReLU fused. It is compiled on first use with the system's C compiler
(``$CC``, else ``cc``; ``-O3 -march=native``) into ``~/.cache/vertstudy/kernels/``
(``$VERTSTUDY_KERNEL_CACHE`` overrides), named by a hash of the source, the compiler's version
and the CPU's flags, so a node of another CPU builds its own; the build is a few tenths of a
second and written atomically (concurrent trials race harmlessly).

Where no compiler works, or ``VERTSTUDY_C_KERNELS=0`` is set, :func:`group_norm_library` returns
None and the PyTorch composite runs instead (same results within bf16 rounding, slower); the
reason is logged once. The kernels run on one thread; :class:`~vertstudy.model.blocks.GroupNorm`
uses them when torch runs on one thread (each CPU trial of a study does).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("_groupnorm.c")
FLAGS = ("-O3", "-march=native", "-shared", "-fPIC", "-std=c99")

_library: ctypes.CDLL | None = None
_tried = False
_why_not: str | None = None


def kernel_cache() -> Path:
    """Where compiled kernels are kept: ``$VERTSTUDY_KERNEL_CACHE`` or ``~/.cache/vertstudy/kernels``."""
    env = os.environ.get("VERTSTUDY_KERNEL_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "vertstudy" / "kernels"


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def _compiler() -> str | None:
    cc = os.environ.get("CC", "cc")
    return shutil.which(cc) or shutil.which("gcc") or shutil.which("clang")


def _build(cc: str) -> Path:
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60).stdout
    key = hashlib.sha256(
        SOURCE.read_bytes() + version.encode() + _cpu_flags().encode() + " ".join(FLAGS).encode()
    ).hexdigest()[:16]
    target = kernel_cache() / f"groupnorm-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".groupnorm-", suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        done = subprocess.run([cc, *FLAGS, "-o", tmp, str(SOURCE), "-lm"], capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            last = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"
            raise RuntimeError(f"{cc} failed: {last}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def group_norm_library() -> ctypes.CDLL | None:
    """The compiled GroupNorm kernels (built on the first call), or None where they cannot be had
    (then :func:`why_not` says why)."""
    global _library, _tried, _why_not
    if _tried:
        return _library
    _tried = True
    if os.environ.get("VERTSTUDY_C_KERNELS", "1").strip() in ("0", "off", "false", "no"):
        _why_not = "VERTSTUDY_C_KERNELS=0"
        return None
    cc = _compiler()
    if cc is None:
        _why_not = "no C compiler (set CC, or install gcc)"
    else:
        try:
            lib = ctypes.CDLL(str(_build(cc)))
            i64, ptr = ctypes.c_int64, ctypes.c_void_p
            lib.vs_group_norm_forward.argtypes = [ptr] * 6 + [i64] * 4 + [ctypes.c_double, ctypes.c_int]
            lib.vs_group_norm_backward.argtypes = [ptr] * 9 + [i64] * 4 + [ctypes.c_int]
            lib.vs_group_norm_forward.restype = lib.vs_group_norm_backward.restype = ctypes.c_int
            _library = lib
        except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
            _why_not = f"building {SOURCE.name} failed: {exc}"
    if _library is None:
        log.warning("GroupNorm C kernels unavailable (%s); the PyTorch composite runs (slower in bf16)", _why_not)
    return _library


def group_norm_kernel() -> ctypes.CDLL | None:
    """The kernels where they run now: built (:func:`group_norm_library`) and torch on one thread
    (they are single-threaded; on more threads the PyTorch composite is faster)."""
    import torch

    return group_norm_library() if torch.get_num_threads() == 1 else None


def describe_group_norm() -> str:
    """Which GroupNorm a bf16 CPU step runs now, for the training log."""
    import torch

    if group_norm_kernel() is not None:
        return "our C kernel"
    reason = "more than one torch thread" if torch.get_num_threads() != 1 else why_not()
    return f"PyTorch composite ({reason})"


def why_not() -> str | None:
    """Why :func:`group_norm_library` returned None (None if it has not, or was not called)."""
    return _why_not


def reset() -> None:
    """Forget the loaded library and try again on the next call (tests; after changing the environment)."""
    global _library, _tried, _why_not
    _library, _tried, _why_not = None, False, None
