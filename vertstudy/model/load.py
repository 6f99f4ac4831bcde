"""A trained network from its checkpoint, on the right device."""

from __future__ import annotations

from pathlib import Path

import torch

from vertstudy.checkpoint import checkpoint_config, load_checkpoint
from vertstudy.config import Config
from vertstudy.errors import ConfigError, InputError, VertstudyError


# -- devices, seeds, random states -----------------------------------------------------------
def select_device(kind: str) -> torch.device:
    """``auto``: CUDA when present, else CPU. ``cuda`` without a GPU is a ConfigError."""
    if kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device = 'cuda' but no CUDA device is available; use 'auto' or 'cpu'")
    if kind == "cpu" or (kind == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    torch.backends.cudnn.benchmark = True  # fixed crop size: let cuDNN pick the fastest kernels
    return torch.device("cuda")


def load_model(checkpoint_path: Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, Config]:
    """The network of a checkpoint, in eval mode on ``device`` (``"auto"``: CUDA when present),
    and its configuration."""
    from vertstudy.model.network import build_model

    if device in ("auto", "cpu", "cuda"):
        device = select_device(str(device))
    state = load_checkpoint(checkpoint_path)
    cfg = checkpoint_config(state, checkpoint_path)
    model = build_model(cfg.model)
    model.load_state_dict(state["model"])
    return model.to(device).eval(), cfg


def load_checkpoint_model(checkpoint: Path, device: str = "auto"):
    """``(model in eval mode, Config)`` of a vertstudy checkpoint; ``InputError`` naming it otherwise."""
    from vertstudy.model.load import load_model, select_device

    checkpoint = Path(checkpoint)
    if not checkpoint.exists():
        raise InputError(checkpoint, "checkpoint not found")
    try:
        return load_model(checkpoint, select_device(device))
    except VertstudyError:
        raise
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        detail = " ".join(str(exc).split())  # one line: state-dict errors span many
        if len(detail) > 160:
            detail = detail[:157] + "..."
        raise InputError(
            checkpoint, f"not a usable vertstudy checkpoint: its weights or config do not load "
            f"({type(exc).__name__}: {detail})"
        ) from None
