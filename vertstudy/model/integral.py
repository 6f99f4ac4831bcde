"""Heatmap-to-coordinate functions: integral regression (paper II-B, eq. 5-6, Fig. 5c, 6) and
the offline arg-max of the Gaussian-heatmap baseline (Fig. 5b).

Pure functions without parameters, in the style of dsntnn's soft-argmax. Axis order everywhere:
heatmaps are ``(B, C, D, H, W)`` with ``D, H, W`` the crop's ``(z, y, x)`` axes, and the
returned coordinates are ``(B, C, 3)`` in crop voxel units ordered ``(z, y, x)``; voxel
``(0, 0, 0)`` is the centre of the crop's first voxel, as in ``vertstudy.data.crops``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _check_heatmaps(heatmaps: Tensor) -> None:
    if heatmaps.ndim != 5:
        raise ValueError(f"heatmaps must be (B, C, D, H, W), got shape {tuple(heatmaps.shape)}")


def softmax_3d(heatmaps: Tensor) -> Tensor:
    """Paper eq. 5: softmax over each map's whole volume, computed in float32 (or float64).

    heatmaps: ``(B, C, D, H, W)`` logits Y. Returns P, same shape, ``P.sum((2, 3, 4)) == 1``.
    Autocast is switched off so bf16/fp16 logits never go through a low-precision exp/sum.
    """
    _check_heatmaps(heatmaps)
    dtype = torch.promote_types(heatmaps.dtype, torch.float32)
    with torch.autocast(device_type=heatmaps.device.type, enabled=False):
        flat = heatmaps.to(dtype).flatten(2)
        return F.softmax(flat, dim=-1).view(heatmaps.shape)


def integral_regression(heatmaps: Tensor) -> Tensor:
    """Paper eq. 5-6: expected voxel coordinate under the softmax of each class's 3-D map.

    heatmaps: ``(B, C, D, H, W)`` raw logits (any float dtype, autocast or not).
    Returns ``(B, C, 3)`` float32 (float64 for float64 input): ``E[(z, y, x)]`` in crop voxel
    units, each in ``[0, size - 1]`` of its axis. Differentiable:
    ``d E[z] / d Y_k = P_k (z_k - E[z])``.

    The expectation is taken through the marginals (``E[z] = sum_z z * sum_yx P``), which is
    the same as eq. 6 with the full D x H x W x 3 coordinate matrix, without building it.
    """
    probs = softmax_3d(heatmaps)
    coords = []
    for axis in (2, 3, 4):  # z, y, x
        others = tuple(a for a in (2, 3, 4) if a != axis)
        marginal = probs.sum(dim=others)  # (B, C, n)
        grid = torch.arange(probs.shape[axis], device=probs.device, dtype=probs.dtype)
        coords.append((marginal * grid).sum(dim=-1))
    return torch.stack(coords, dim=-1)


def argmax_coordinates(heatmaps: Tensor) -> Tensor:
    """Fig. 5b: the voxel of each map's maximum, ``(B, C, 3)`` float32 ``(z, y, x)``, no gradient.

    heatmaps: ``(B, C, D, H, W)``. Ties resolve to the first voxel in C order.
    """
    _check_heatmaps(heatmaps)
    _, _, d, h, w = heatmaps.shape
    with torch.no_grad():
        flat_index = heatmaps.flatten(2).argmax(dim=-1)  # (B, C)
        z = torch.div(flat_index, h * w, rounding_mode="floor")
        y = torch.div(flat_index % (h * w), w, rounding_mode="floor")
        x = flat_index % w
        return torch.stack((z, y, x), dim=-1).to(torch.float32)
