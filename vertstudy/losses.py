"""Training losses of the network (paper II-A "Loss function", eq. 1-4).

In the style of dsntnn: every loss returns per-sample, per-vertebra values ``(B, 26)``; the
reduction over vertebrae with the presence mask is a separate function (:func:`masked_sum`),
and :func:`total_loss` only connects them according to the configuration.

Shapes and units:

- ``logits`` ``(B, 26)``: pre-sigmoid class scores, class order of ``vertstudy.anatomy``.
- ``present`` ``(B, 26)``: float in {0, 1}, ``u_n`` of the paper (centroid inside the crop).
- ``coords`` ``(B, 26, 3)``: crop voxel units, axis order ``(z, y, x)``; voxel ``(0, 0, 0)`` is
  the centre of the crop's first voxel (as in ``vertstudy.data.crops`` and
  ``vertstudy.model.integral``). The smooth-L1 switch point ``|x| = 1`` is therefore one voxel.
- ``heatmaps`` ``(B, 26, D, H, W)``: the heatmap head's raw output, ``D, H, W`` = ``(z, y, x)``.

Every loss is computed in float32 (float64 stays float64), also under autocast.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from vertstudy.config import LossConfig, ModelConfig


def _float(t: Tensor) -> Tensor:
    """``t`` in at least float32 precision."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def classification_loss(logits: Tensor, present: Tensor, balance_b: float) -> Tensor:
    """Paper eq. 1 per vertebra: ``-B log f`` where ``u = 1``, ``-log(1 - f)`` where ``u = 0``.

    logits: ``(B, 26)`` pre-sigmoid scores; ``f = sigmoid(logits)``.
    present: ``(B, 26)`` float in {0, 1} (``u``).
    balance_b: the balance factor ``B`` of the positive terms (paper: 2-4).
    Returns ``(B, 26)``, non-negative. Computed with ``logsigmoid`` (``log(1 - f) =
    logsigmoid(-logits)``), so it stays finite for any finite logit. The gradient with respect
    to the logit is ``-B (1 - f)`` for ``u = 1`` and ``f`` for ``u = 0``.
    """
    logits, present = _float(logits), present.to(_float(logits).dtype)
    positive = -balance_b * F.logsigmoid(logits)
    negative = -F.logsigmoid(-logits)
    return present * positive + (1.0 - present) * negative


def regression_loss(pred: Tensor, target: Tensor) -> Tensor:
    """Paper eq. 3 summed over the three coordinates, per vertebra; no masking here.

    pred, target: ``(B, 26, 3)`` crop voxels ``(z, y, x)``. With ``x = pred - target`` per axis,
    ``smoothL1(x) = 0.5 x^2`` if ``|x| < 1`` else ``|x| - 0.5`` (units: voxels).
    Returns ``(B, 26)``. Rows of absent vertebrae hold whatever their (meaningless) targets
    give; :func:`masked_sum` removes them.
    """
    pred = _float(pred)
    return F.smooth_l1_loss(pred, target.to(pred.dtype), reduction="none", beta=1.0).sum(dim=-1)


def gaussian_1d(centres: Tensor, size: int, sigma_vox: float) -> Tensor:
    """``exp(-(k - c)^2 / (2 sigma^2))`` for voxel indices ``k = 0..size-1``.

    centres: ``(...)`` voxel coordinates along one axis. Returns ``(..., size)``.
    """
    grid = torch.arange(size, device=centres.device, dtype=centres.dtype)
    return torch.exp(-((grid - centres.unsqueeze(-1)) ** 2) / (2.0 * sigma_vox**2))


def heatmap_targets(coords: Tensor, shape: Sequence[int], sigma_vox: float) -> Tensor:
    """Gaussian target maps of the heatmap head (paper Fig. 5b), peak value 1 at the centroid.

    coords: ``(B, 26, 3)`` crop voxels ``(z, y, x)``. shape: ``(D, H, W)`` of the maps.
    Returns ``(B, 26, D, H, W)`` with ``exp(-|v - c|^2 / (2 sigma_vox^2))`` at voxel ``v``,
    built as the outer product of three 1-D Gaussians (the 3-D Gaussian is separable). A
    centroid between voxels gives a peak slightly below 1. No gradient flows to ``coords``.
    """
    coords = _float(coords).detach()
    d, h, w = (int(s) for s in shape)
    gz = gaussian_1d(coords[..., 0], d, sigma_vox)  # (B, 26, D)
    gy = gaussian_1d(coords[..., 1], h, sigma_vox)  # (B, 26, H)
    gx = gaussian_1d(coords[..., 2], w, sigma_vox)  # (B, 26, W)
    return gz[..., :, None, None] * gy[..., None, :, None] * gx[..., None, None, :]


def heatmap_loss(
    heatmaps: Tensor, coords: Tensor, sigma_vox: float, reduction: Literal["mean", "sum"] = "mean"
) -> Tensor:
    """Squared Euclidean (L2) distance between raw heatmaps and Gaussian targets, per map.

    The Fig. 5b baseline: the head's raw output is regressed directly onto
    :func:`heatmap_targets` (no sigmoid; the arg-max read-out is unaffected by any monotone
    squashing, and regressing raw outputs is the usual form of this baseline), and the
    coordinates are read out offline by arg-max, so this loss has no gradient path through
    coordinates.

    heatmaps: ``(B, 26, D, H, W)``; coords: ``(B, 26, 3)`` crop voxels ``(z, y, x)``.
    reduction over the voxels of each map: ``"mean"`` (default: independent of the crop size)
    or ``"sum"``. Returns ``(B, 26)``; no masking here.
    """
    if heatmaps.ndim != 5:
        raise ValueError(f"heatmaps must be (B, 26, D, H, W), got shape {tuple(heatmaps.shape)}")
    heatmaps = _float(heatmaps)
    target = heatmap_targets(coords.to(heatmaps.dtype), heatmaps.shape[2:], sigma_vox)
    squared = (heatmaps - target).square().flatten(2)
    if reduction == "mean":
        return squared.mean(dim=-1)
    if reduction == "sum":
        return squared.sum(dim=-1)
    raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")


def _gaussian_axes(coords: Tensor, shape: Sequence[int], sigma_vox: float) -> list[Tensor]:
    """The three 1-D factors ``(..., D)``, ``(..., H)``, ``(..., W)`` of :func:`gaussian_map`, each
    normalised over its grid; coords ``(..., 3)`` crop voxels ``(z, y, x)``, no gradient."""
    coords = _float(coords).detach()
    axes = []
    for axis, size in enumerate(int(s) for s in shape):
        g = gaussian_1d(coords[..., axis], size, sigma_vox)
        axes.append(g / g.sum(dim=-1, keepdim=True).clamp_min(1e-12))
    return axes


def _outer(axes: list[Tensor]) -> Tensor:
    """``(..., D, H, W)``: the separable product of three 1-D factors."""
    gz, gy, gx = axes
    return gz[..., :, None, None] * gy[..., None, :, None] * gx[..., None, None, :]


def gaussian_map(coords: Tensor, shape: Sequence[int], sigma_vox: float) -> Tensor:
    """Normalised Gaussian target distributions at ``coords``: ``(B, 26, D, H, W)`` summing to 1 per map.

    coords: ``(B, 26, 3)`` crop voxels ``(z, y, x)``; shape: ``(D, H, W)``. Each axis's 1-D
    Gaussian is normalised over the grid first, so the separable product sums to 1 even when
    the centre is near (or past) an edge. No gradient flows to ``coords``.
    """
    return _outer(_gaussian_axes(coords, shape, sigma_vox))


class _JSMap(torch.autograd.Function):
    """Jensen-Shannon divergence of soft-max maps to fixed target distributions, fused, with a
    hand-written backward.

    Forward: logits ``z`` ``(P, N)`` (float32/float64), targets ``g`` ``(P, N)`` (no gradient)
    and their entropy terms ``sum g log g`` ``(P,)`` -> ``(P,)``. With ``p = softmax(z)`` and
    ``m = (p + g) / 2``: ``JS = (sum p log p + sum g log g) / 2 - sum m log m`` (the two halves
    of ``KL(p || m) / 2 + KL(g || m) / 2`` collected), ``log p = z - logsumexp(z)`` exactly.
    Backward: ``d JS / d p_k = (log p_k - log m_k) / 2 =: a_k``, through the soft-max
    ``d JS / d z_j = p_j (a_j - sum_k p_k a_k)``: three passes over the maps. Autograd's graph of
    the plain formula (two ``xlogy``, two ``p * log m``, their sums and the soft-max backward)
    made several times as many; this one agrees with it within float rounding (gradcheck in
    float64 in the tests). ``m`` is floored at 1e-30 before the log, where both maps underflow.
    """

    @staticmethod
    def forward(ctx, z: Tensor, g: Tensor, g_log_g: Tensor) -> Tensor:
        log_p = torch.log_softmax(z, dim=-1)
        p = log_p.exp()
        log_m = torch.log((0.5 * (p + g)).clamp_min_(1e-30))
        a = (log_p - log_m).mul_(0.5)  # d JS / d p
        # JS = sum p a + (sum g log g - sum g log m) / 2
        js = (p * a).sum(dim=-1) + 0.5 * (g_log_g - (g * log_m).sum(dim=-1))
        ctx.save_for_backward(p, a)
        return js

    @staticmethod
    def backward(ctx, grad: Tensor):
        p, a = ctx.saved_tensors
        centred = a - (p * a).sum(dim=-1, keepdim=True)
        return centred.mul_(p).mul_(grad[:, None]), None, None


def js_map_loss(heatmaps: Tensor, coords: Tensor, sigma_vox: float, mask: Tensor | None = None) -> Tensor:
    """Jensen-Shannon divergence between each soft-max map and a Gaussian at its target (nats).

    The regulariser of dsntnn's ``js_reg_losses``: integral regression alone only constrains
    the *mean* of each map, and from a nearly flat start its gradient ``P_k (z_k - E[z])`` is
    tiny; this term shapes the whole map toward a peak at the target from the first step.

    heatmaps: ``(B, 26, D, H, W)`` raw logits (soft-maxed over each map, paper eq. 5, in
    float32 whatever their dtype); coords: ``(B, 26, 3)`` target crop voxels ``(z, y, x)``;
    sigma_vox: the target's sigma; mask: ``(B, 26)`` in {0, 1} or None: only these maps are
    computed (the others are 0), which saves the work for absent vertebrae. Returns ``(B, 26)``
    in ``[0, log 2]``, computed by :class:`_JSMap` (the target's entropy from its three 1-D
    factors: the separable Gaussian's entropy is the sum of theirs).
    """
    if heatmaps.ndim != 5:
        raise ValueError(f"heatmaps must be (B, 26, D, H, W), got shape {tuple(heatmaps.shape)}")
    keep = torch.ones(heatmaps.shape[:2], dtype=torch.bool, device=heatmaps.device) if mask is None \
        else mask.to(torch.bool)
    b, n = torch.nonzero(keep, as_tuple=True)
    acc = torch.promote_types(heatmaps.dtype, torch.float32)
    out = torch.zeros(heatmaps.shape[:2], dtype=acc, device=heatmaps.device)
    if b.numel() == 0:
        return out
    with torch.autocast(device_type=heatmaps.device.type, enabled=False):
        z = heatmaps[b, n].to(acc).flatten(1)  # (P, N)
        axes = _gaussian_axes(coords.detach()[b, n].to(acc), heatmaps.shape[2:], sigma_vox)  # (P, size) each
        g_log_g = sum(torch.xlogy(ga, ga).sum(dim=-1) for ga in axes)  # (P,)
        g = _outer(axes).flatten(1)
        return out.index_put((b, n), _JSMap.apply(z, g, g_log_g))


def masked_sum(values: Tensor, mask: Tensor) -> Tensor:
    """Sum over vertebrae of the values where ``mask`` is 1, then mean over the batch.

    values, mask: ``(B, 26)``; mask float or bool in {0, 1}. Returns a scalar. This is eq. 1-2's
    sum over ``n`` (weighted by ``u_n`` for eq. 2) averaged over the samples of the batch, so
    the loss scale does not depend on the batch size. Masked-out entries contribute exactly 0,
    even when they are not finite.
    """
    keep = mask.to(torch.bool)
    return torch.where(keep, values, torch.zeros_like(values)).sum(dim=-1).mean()


def total_loss(
    out: Mapping[str, Tensor | None],
    batch: Mapping[str, Tensor],
    loss_cfg: LossConfig,
    model_cfg: ModelConfig,
) -> dict[str, Tensor]:
    """Paper eq. 4, ``total = cls + reg``, from the network output and a DataLoader batch.

    out: ``coords`` ``(B, 26, 3)``, ``logits`` ``(B, 26)`` or None, ``heatmaps``
    ``(B, 26, D, H, W)`` or None (see module docstring). batch: ``present`` ``(B, 26)``,
    ``coords`` ``(B, 26, 3)`` crop voxels.

    - ``cls``: eq. 1 summed over the 26 classes, mean over the batch; 0 when
      ``model_cfg.tasks == "loc"``.
    - ``reg``: ``reg_lambda`` times, over present vertebrae only (eq. 2), the smooth-L1 of the
      coordinates (``integral`` and ``fc`` heads) or the :func:`heatmap_loss` summed over
      voxels (``heatmap`` head, Gaussian sigma ``model_cfg.heatmap_sigma_vox``); summed over
      vertebrae, mean over the batch; with the integral head and ``loss.map_reg = "js"``, plus
      ``map_reg_weight`` times the :func:`js_map_loss` of the present vertebrae.

    Returns scalars ``{"total", "cls", "reg"}``.
    """
    present = batch["present"]
    target = batch["coords"]
    if model_cfg.loc_head == "heatmap":
        if out.get("heatmaps") is None:
            raise ValueError("loc_head 'heatmap' needs out['heatmaps'], got None")
        # Summed over voxels: the mean over a 104x80x80 map is ~1e-4 and would leave the
        # backbone without localization signal next to L_cls (~18 at start); the sum (~45
        # per empty map) is on the scale of the smooth-L1 in voxels used by the other heads.
        per_vertebra = heatmap_loss(out["heatmaps"], target, model_cfg.heatmap_sigma_vox, reduction="sum")
    else:
        per_vertebra = regression_loss(out["coords"], target)
    reg = loss_cfg.reg_lambda * masked_sum(per_vertebra, present)
    if model_cfg.loc_head == "integral" and loss_cfg.map_reg == "js" and loss_cfg.map_reg_weight > 0:
        if out.get("heatmaps") is None:
            raise ValueError("loss.map_reg 'js' needs out['heatmaps'], got None")
        js = js_map_loss(out["heatmaps"], target, loss_cfg.map_reg_sigma_vox, mask=present)
        reg = reg + loss_cfg.map_reg_weight * masked_sum(js, present)

    if model_cfg.tasks == "loc+cls":
        if out.get("logits") is None:
            raise ValueError("tasks 'loc+cls' needs out['logits'], got None")
        cls_values = classification_loss(out["logits"], present, loss_cfg.balance_b)
        cls = masked_sum(cls_values, torch.ones_like(cls_values))
    else:
        cls = torch.zeros((), dtype=reg.dtype, device=reg.device)
    return {"total": cls + reg, "cls": cls, "reg": reg}
