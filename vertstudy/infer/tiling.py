"""Tiling a canonical volume and running the network on its tiles (paper section III-B, test
phase, steps 1-2; see :mod:`vertstudy.infer`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from vertstudy.anatomy import NUM_CLASSES
from vertstudy.data.crops import extract_crop
from vertstudy.errors import ConfigError
from vertstudy.memory import reuse_freed_memory


# -- tiling ----------------------------------------------------------------------------------
def axis_origins(n: int, c: int, s: int) -> np.ndarray:
    """Tile origins along one axis of ``n`` voxels for tiles of ``c`` voxels at stride ``s``.

    ``n > c``: ``0, s, 2s, ...`` while the tile fits, then one tile flush with the end
    (``n - c``); every voxel is covered when ``s <= c``. ``n <= c``: one tile centred on the
    axis, origin ``-((c - n) // 2) <= 0``.
    Returns (T,) int64, strictly increasing.
    """
    if n <= 0 or c <= 0 or s <= 0:
        raise ValueError(f"axis length, tile size and stride must be > 0, got n={n}, c={c}, s={s}")
    if n <= c:
        return np.array([-((c - n) // 2)], dtype=np.int64)
    origins = list(range(0, n - c, s))
    origins.append(n - c)
    return np.unique(np.asarray(origins, dtype=np.int64))


def tile_origins(shape_zyx: Sequence[int], crop_size: Sequence[int], stride: Sequence[int]) -> np.ndarray:
    """(T, 3) int64 canonical (z, y, x) voxel origins of the tiles covering a volume.

    ``shape_zyx`` volume shape, ``crop_size`` tile shape, ``stride`` step per axis, all
    ``(z, y, x)`` voxels. Tiles are listed z-major (then y, then x); see :func:`axis_origins`.
    Raises ``ConfigError`` when a stride exceeds the crop (voxels between tiles never seen).
    """
    if any(int(s) > int(c) for s, c in zip(stride, crop_size)):
        raise ConfigError(
            f"infer.stride {tuple(int(s) for s in stride)} exceeds the model's crop size "
            f"{tuple(int(c) for c in crop_size)} on some axis; voxels between tiles would never be seen"
        )
    axes = [axis_origins(int(n), int(c), int(s)) for n, c, s in zip(shape_zyx, crop_size, stride, strict=True)]
    grid = np.meshgrid(*axes, indexing="ij")
    return np.stack([g.ravel() for g in grid], axis=1).astype(np.int64)


# -- the network over the tiles --------------------------------------------------------------
def _model_device(model: torch.nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def has_body(crop: np.ndarray, pad_value: float, body_fraction: float) -> bool:
    """Whether a tile ``crop`` (D, H, W) z-scored holds body: at least ``body_fraction`` of its
    voxels more than 0.5 z-score units (~200 HU in a CT) above ``pad_value`` (z-scored air)."""
    return float((crop > pad_value + 0.5).mean()) >= body_fraction


@dataclass(frozen=True)
class TileOutputs:
    """The network's raw outputs on the tiles that ran.

    ``origins`` (T, 3) int64 canonical (z, y, x) voxel of each tile's voxel 0; ``coords``
    (T, 26, 3) float64 crop voxels (z, y, x); ``probs`` (T, 26) float64 class probabilities, or
    ``None`` for a localization-only model; ``skipped`` tiles without body that did not run.
    """

    origins: np.ndarray
    coords: np.ndarray
    probs: np.ndarray | None
    skipped: int = 0

    @property
    def loc_only(self) -> bool:
        return self.probs is None

    def subset(self, keep: np.ndarray) -> TileOutputs:
        """The tiles where ``keep`` (T,) bool is True (the others count as skipped)."""
        keep = np.asarray(keep, dtype=bool)
        probs = None if self.probs is None else self.probs[keep]
        return TileOutputs(self.origins[keep], self.coords[keep], probs, self.skipped + int((~keep).sum()))


def run_network(
    model: torch.nn.Module,
    volume: np.ndarray,
    pad_value: float,
    crop_size: Sequence[int],
    origins_zyx: np.ndarray,
    batch_size: int,
    body_fraction: float | None = None,
) -> TileOutputs:
    """Run ``model`` (on its own device, put in eval mode) on the tiles at ``origins_zyx``.

    ``volume`` (Z, Y, X) float32 canonical, z-scored; ``pad_value`` fills tile voxels outside
    it. ``body_fraction``: skip tiles that fail :func:`has_body` (``None``: run every tile).
    Large activations reuse freed memory (:func:`vertstudy.memory.reuse_freed_memory`).
    """
    reuse_freed_memory()
    model.eval()
    device = _model_device(model)
    keep, coords, probs = [], [], []
    loc_only = False
    pending: list[tuple[np.ndarray, np.ndarray]] = []

    def flush() -> None:
        nonlocal loc_only
        if not pending:
            return
        x = torch.from_numpy(np.stack([c for _, c in pending]))[:, None].to(device)
        out = model(x)
        coords.append(out["coords"].float().cpu().numpy().astype(np.float64))
        logits = out.get("logits")
        loc_only = logits is None
        if logits is not None:
            probs.append(torch.sigmoid(logits.float()).cpu().numpy().astype(np.float64))
        keep.extend(o for o, _ in pending)
        pending.clear()

    skipped = 0
    with torch.inference_mode():
        for origin in origins_zyx:
            crop = extract_crop(volume, origin, crop_size, pad_value)
            if body_fraction is not None and not has_body(crop, pad_value, body_fraction):
                skipped += 1
                continue
            pending.append((origin, crop))
            if len(pending) == batch_size:
                flush()
        flush()
    origins = np.asarray(keep, dtype=np.int64).reshape(-1, 3)
    coords_arr = np.concatenate(coords) if coords else np.zeros((0, NUM_CLASSES, 3))
    if loc_only:
        probs_arr = None
    else:
        probs_arr = np.concatenate(probs) if probs else np.zeros((0, NUM_CLASSES))
    return TileOutputs(origins, coords_arr, probs_arr, skipped)


def tile_volume(model: torch.nn.Module, volume: np.ndarray, pad_value: float, crop_size: Sequence[int],
                infer_cfg) -> TileOutputs:
    """Steps 1-2 of inference on one volume as ``infer_cfg`` (:class:`vertstudy.config.InferConfig`)
    sets them: tiles at ``infer_cfg.stride`` (:func:`tile_origins`), those without body skipped
    when ``skip_empty_tiles`` (below ``body_fraction``), the rest through :func:`run_network` in
    batches of ``batch_size``. ``volume`` (Z, Y, X) float32 canonical, z-scored."""
    origins = tile_origins(volume.shape, crop_size, infer_cfg.stride)
    body = infer_cfg.body_fraction if infer_cfg.skip_empty_tiles else None
    return run_network(model, volume, pad_value, crop_size, origins, infer_cfg.batch_size, body)
