"""Checkpoint files: the one place they are written and read (the trainer, inference and
``predict`` share it). A checkpoint is a ``torch.save`` dict with ``format`` =
:data:`CHECKPOINT_FORMAT`, the model's state, its config and (since the sequence decoder) the
spine prior; it is read with ``weights_only=True`` so a file cannot run code."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from vertstudy.atomic import atomic_path
from vertstudy.config import Config, load_config
from vertstudy.errors import InputError

CHECKPOINT_FORMAT = "vertstudy-checkpoint-v1"


# -- checkpoints -----------------------------------------------------------------------------
def _cpu(obj):
    """``obj`` with every tensor moved to the CPU (so a checkpoint loads on any machine)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _cpu(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_cpu(v) for v in obj)
    return obj


def save_checkpoint(path: Path, state: dict[str, Any]) -> Path:
    """Write ``state`` to ``path`` atomically (temporary file in the same folder, then rename)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(_cpu(state), tmp)
    return path


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint written by :func:`train` (tensors on the CPU).

    Only ``weights_only=True`` loading is used, so a checkpoint cannot run code. Raises
    ``InputError`` naming the file when it is missing or not a vertstudy checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "checkpoint not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a truncated or foreign file
        why = str(exc).strip().split(". ", 1)[0].splitlines()[0] if str(exc).strip() else ""
        raise InputError(path, f"not a readable checkpoint ({type(exc).__name__}: {why}); it may be truncated or "
                         "corrupt") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise InputError(path, f"not a vertstudy checkpoint (expected format {CHECKPOINT_FORMAT!r})")
    return state


#: fields added to the config after checkpoints were first written, with the value the code
#: computed with before each existed: a checkpoint that lacks one was trained that way, whatever
#: the default is now
ADDED_FIELDS: dict[str, Any] = {"model.softmax_beta": 1.0, "train.ema_decay": 0.0}


def checkpoint_config(state: dict[str, Any], path: Path) -> Config:
    """The validated :class:`Config` stored in a checkpoint ``state`` read from ``path`` (a field
    it predates gets its value of that time, :data:`ADDED_FIELDS`)."""
    stored = state["config"]
    if isinstance(stored, dict):
        stored = {k: dict(v) if isinstance(v, dict) else v for k, v in stored.items()}  # not the caller's
        for name, old in ADDED_FIELDS.items():
            section, field = name.split(".")
            if isinstance(stored.get(section), dict):
                stored[section].setdefault(field, old)
    return load_config(stored, where=f"{path} (stored config)")
