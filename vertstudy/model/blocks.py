"""Building blocks of the network (paper II-A, Fig. 4): conv + GroupNorm + ReLU and the
bottleneck residual module.

All blocks are 3-D, keep the spatial size of their input (odd kernels, "same" padding) and work
on any input size. Tensors are ``(B, C, D, H, W)`` with ``(D, H, W) = (z, y, x)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vertstudy.model.kernels import group_norm_kernel


def scaled_channels(channels: int, width: float, groups: int) -> int:
    """``channels * width`` rounded to a multiple of ``groups`` (at least ``groups``).

    Keeps every GroupNorm valid whatever the width factor: ``scaled_channels(16, 0.125, 4) == 4``.
    """
    return max(groups, round(channels * width / groups) * groups)


def _same_padding(kernel_size: int | Sequence[int]) -> int | tuple[int, ...]:
    if isinstance(kernel_size, int):
        return kernel_size // 2
    return tuple(k // 2 for k in kernel_size)


_CL = torch.channels_last_3d


def is_channels_last(x: Tensor) -> bool:
    """Whether ``x`` (5-D) is laid out channels-last and not also contiguous (a tensor with one
    channel, or one voxel, is both, and counts as contiguous)."""
    return x.ndim == 5 and x.is_contiguous(memory_format=_CL) and not x.is_contiguous()


def _channel_rows(x: Tensor) -> Tensor:
    """A channels-last ``(B, C, D, H, W)`` tensor as its ``(B, D*H*W, C)`` view (no copy)."""
    b, c = x.shape[:2]
    return x.permute(0, 2, 3, 4, 1).reshape(b, -1, c)


def _from_rows(rows: Tensor, like: Tensor) -> Tensor:
    """``(B, N, C)`` rows back to a channels-last tensor of ``like``'s shape (no copy)."""
    b, c, d, h, w = like.shape
    return rows.view(b, d, h, w, c).permute(0, 4, 1, 2, 3)


def _channel_sums(rows: Tensor) -> Tensor:
    """``(B, N, C)`` rows -> ``(B, C)`` sums over N, at least float32. Accumulated in float32 by
    the reduction kernel, the result rounded once to the rows' dtype (bf16: 2^-9 relative):
    asking ``sum`` for a float32 result instead makes it copy the whole tensor to float32 first,
    which measured a third of the normalisation's time."""
    return rows.sum(dim=1).to(torch.promote_types(rows.dtype, torch.float32))


def _affine(x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """``x * scale + shift`` per sample and channel, ``scale``/``shift`` ``(B, C)`` float32, in one
    pass per sample, through the inference batch-norm kernel (mean 0, variance 1, eps 0), which
    keeps a channels-last tensor channels-last and computes in float32. A plain broadcast add
    over the channels-last rows measured 4-8x slower (bf16, 8-16 channels)."""
    zeros = torch.zeros(x.shape[1], dtype=scale.dtype, device=x.device)
    ones = torch.ones_like(zeros)
    parts = [F.batch_norm(x[i : i + 1], zeros, ones, scale[i], shift[i], False, 0.0, 0.0) for i in range(x.shape[0])]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


class _ChannelsLastGroupNorm(torch.autograd.Function):
    """GroupNorm of a channels-last tensor, forward and backward, without a layout change.

    PyTorch's own CPU GroupNorm kernels are written for contiguous tensors; on channels-last
    bf16 input they took 7-15x longer (forward + backward, 8-16 channels at 48 x 32 x 32,
    measured), and copying to contiguous and back around every convolution costs as much as
    the convolution gains. Here each pass runs over the ``(B, N, C)`` rows of the channels-last
    tensor: per-channel sums (:func:`_channel_sums`: accumulated in float32, the sum rounded
    once to the tensor's dtype) give each group's mean ``mu`` and variance (``E[x^2] - mu^2``,
    clamped at 0), and the output is one per-(sample, channel) scale and shift (:func:`_affine`).
    Backward, over a group of ``M`` values with ``r = 1 / sqrt(var + eps)`` and ``g = gamma
    dy``: ``dx = r gamma dy - (r / M) sum(g) - (r^3 / M) (x - mu) sum(g (x - mu))``, again from
    per-channel sums. The group statistics and coefficients are float32 (float64 for float64);
    the passes over the tensor run in its dtype (bf16 under autocast). Same result and
    gradients as ``F.group_norm`` within that dtype's rounding (tests; gradcheck in float64).
    """

    @staticmethod
    def forward(ctx, x: Tensor, groups: int, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
        b, c = x.shape[:2]
        per = c // groups
        acc = torch.promote_types(x.dtype, torch.float32)
        rows = _channel_rows(x)
        n = rows.shape[1] * per  # values per group
        s1 = _channel_sums(rows).view(b, groups, per).sum(-1)
        s2 = _channel_sums(rows * rows).view(b, groups, per).sum(-1)
        mean = s1 / n  # (B, G)
        rstd = torch.rsqrt((s2 / n - mean * mean).clamp_min(0.0) + eps)
        scale = weight.to(acc) * rstd.repeat_interleave(per, dim=1)  # (B, C)
        shift = bias.to(acc) - mean.repeat_interleave(per, dim=1) * scale
        ctx.groups, ctx.n = groups, n
        ctx.save_for_backward(x, weight, mean, rstd)
        return _affine(x, scale, shift)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight, mean, rstd = ctx.saved_tensors
        groups, n = ctx.groups, ctx.n
        b, c = x.shape[:2]
        per = c // groups
        grad = grad.contiguous(memory_format=_CL)
        rows, dy = _channel_rows(x), _channel_rows(grad)
        mu_c = mean.repeat_interleave(per, dim=1)  # (B, C)
        r_c = rstd.repeat_interleave(per, dim=1)
        s_dy = _channel_sums(dy)  # (B, C): sum dy
        s_dy_xc = _channel_sums(dy * rows) - mu_c * s_dy  # sum dy (x - mu)
        w = weight.to(mean.dtype)
        grad_weight = (r_c * s_dy_xc).sum(0)
        grad_bias = s_dy.sum(0)
        p = (w * s_dy).view(b, groups, per).sum(-1)  # (B, G): sum g
        q = (w * s_dy_xc).view(b, groups, per).sum(-1)  # (B, G): sum g (x - mu)
        d = (-(rstd**3) * q / n).repeat_interleave(per, dim=1)  # coefficient of (x - mu)
        e = (-rstd * p / n).repeat_interleave(per, dim=1)
        dx = _affine(x, d, e - mu_c * d) + grad * (r_c * w).to(x.dtype)[:, :, None, None, None]
        return dx, None, grad_weight.to(weight.dtype), grad_bias.to(weight.dtype), None


class _FusedGroupNormBF16(torch.autograd.Function):
    """GroupNorm, and the ReLU after it if ``relu``, of a channels-last bf16 tensor, forward and
    backward, through our C kernels (:mod:`vertstudy.model.kernels`): 2 passes over the tensor
    forward and 2 backward, where :class:`_ChannelsLastGroupNorm` and a ReLU make about 10. Same
    arithmetic: float32 coefficients, sums in float32 over blocks and float64 across them, bf16
    output rounded to nearest even. Saves the input and (for the ReLU's mask) the output, as
    the unfused pair did."""

    @staticmethod
    def forward(ctx, x: Tensor, groups: int, weight: Tensor, bias: Tensor, eps: float, relu: bool, lib) -> Tensor:
        b, c = x.shape[:2]
        n = x[0, 0].numel()
        w = weight.detach().to(torch.float32).contiguous()
        bb = bias.detach().to(torch.float32).contiguous()
        y = torch.empty_like(x, memory_format=_CL)
        mean = torch.empty(b, groups, dtype=torch.float32)
        rstd = torch.empty_like(mean)
        if lib.vs_group_norm_forward(x.data_ptr(), w.data_ptr(), bb.data_ptr(), y.data_ptr(), mean.data_ptr(),
                                     rstd.data_ptr(), b, n, c, groups, float(eps), int(relu)):
            raise MemoryError("GroupNorm kernel: out of memory")
        ctx.groups, ctx.relu, ctx.lib = groups, relu, lib
        ctx.save_for_backward(x, y if relu else x, w, mean, rstd)
        ctx.weight_dtype = weight.dtype
        return y

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, y, w, mean, rstd = ctx.saved_tensors
        b, c = x.shape[:2]
        grad = grad.to(torch.bfloat16).contiguous(memory_format=_CL)
        dx = torch.empty_like(x, memory_format=_CL)
        dw = torch.empty(c, dtype=torch.float32)
        db = torch.empty_like(dw)
        if ctx.lib.vs_group_norm_backward(grad.data_ptr(), x.data_ptr(), y.data_ptr(), w.data_ptr(), mean.data_ptr(),
                                          rstd.data_ptr(), dx.data_ptr(), dw.data_ptr(), db.data_ptr(), b,
                                          x[0, 0].numel(), c, ctx.groups, int(ctx.relu)):
            raise MemoryError("GroupNorm kernel: out of memory")
        return dx, None, dw.to(ctx.weight_dtype), db.to(ctx.weight_dtype), None, None, None


#: below this many voxels per map, PyTorch's own GroupNorm on a channels-last input was as fast or
#: faster (its fixed cost per call is lower): measured 0.08-0.46 ms against 0.40-0.58 ms forward +
#: backward at 32-128 channels of 6 x 4 x 4 to 12 x 8 x 8; from 24 x 16 x 16 up the rows are faster
_CL_NORM_MIN_VOXELS = 4096


class GroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` that keeps a low-precision input's dtype under autocast, and keeps a
    channels-last input channels-last.

    CUDA autocast runs ``group_norm`` in float32, so after every bf16 convolution a float32 copy
    would be saved for backward, and the ReLU after it would save a float32 output: bf16
    autocast would then keep *more* activation memory than float32 (~1.08x, measured by
    emulating that policy). The GroupNorm kernels accumulate their statistics in float32 for
    bf16/fp16 input anyway, so here they get the input as it is.

    A channels-last input (the ``channels_last_all`` layout of :class:`Conv3d`, which bf16
    training on the CPU uses) on the CPU goes, if bf16 with torch on one thread and our C kernels
    built (:mod:`vertstudy.model.kernels`), through :class:`_FusedGroupNormBF16` at any size;
    else, with at least ``_CL_NORM_MIN_VOXELS`` voxels per map, through
    :class:`_ChannelsLastGroupNorm`. ``relu=True`` applies a ReLU to the output (fused into the
    kernel where one runs; :class:`ConvNormAct` asks for it).
    """

    def forward(self, x: Tensor, relu: bool = False) -> Tensor:
        if x.device.type == "cpu" and is_channels_last(x):
            if x.dtype == torch.bfloat16:
                lib = group_norm_kernel()
                if lib is not None:
                    with torch.autocast(device_type="cpu", enabled=False):
                        return _FusedGroupNormBF16.apply(
                            x, self.num_groups, self.weight, self.bias, self.eps, relu, lib
                        )
            if x[0, 0].numel() >= _CL_NORM_MIN_VOXELS:
                with torch.autocast(device_type="cpu", enabled=False):
                    y = _ChannelsLastGroupNorm.apply(x, self.num_groups, self.weight, self.bias, self.eps)
                return F.relu_(y) if relu else y
        if x.dtype in (torch.float16, torch.bfloat16) and torch.is_autocast_enabled(x.device.type):
            with torch.autocast(device_type=x.device.type, enabled=False):
                y = F.group_norm(x, self.num_groups, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)
        else:
            y = super().forward(x)
        return F.relu_(y) if relu else y


def _bf16_on_cpu(x: Tensor) -> bool:
    """Whether a convolution of ``x`` would run in bf16 on the CPU (bf16 input, or CPU autocast to bf16)."""
    return x.dtype == torch.bfloat16 or (
        torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    )


class Conv3d(nn.Conv3d):
    """``nn.Conv3d`` that can run in the ``channels_last_3d`` memory layout.

    ``layout`` (set by :meth:`vertstudy.model.network.VertebraNet.set_conv_layout`):

    - ``contiguous``: PyTorch's default;
    - ``channels_last``: the input and weight are laid out channels-last for the convolution
      and the output comes back contiguous, so the GroupNorm, ReLU and 1x1x1 convolutions
      around it keep their fast contiguous kernels. Measured on the CPU (oneDNN, 1 thread, this
      network's 3x3x3 shapes, float32): forward + backward 1.1-2.1x faster (4-128 channels;
      equal at 32 and 256), forward alone 0.63-0.96x;
    - ``channels_last_all``: input, weight *and output* channels-last, so activations stay
      channels-last from convolution to convolution (GroupNorm follows, see
      :class:`GroupNorm`). In bf16 this is oneDNN's native layout: measured (1 thread, 48 x 32
      x 32, batch 2, forward + backward) a 1x1x1 convolution at 8-32 channels 4-10x faster than
      on contiguous bf16 input, a 3x3x3 one 1.2-1.4x faster than ``channels_last`` with its
      layout copies;
    - ``auto``: while autograd records (training) ``channels_last_all`` under bf16 CPU
      autocast, else ``channels_last`` for kernels larger than 1x1x1 and contiguous for
      1x1x1 (slower channels-last in float32); contiguous for inference (no grad: forward
      alone measured faster contiguous).

    Same parameters, same state dict and the same output within float rounding; only the speed
    differs.
    """

    layout: str = "contiguous"

    def _mode(self) -> str:
        layout = self.layout
        if layout == "auto":
            if not torch.is_grad_enabled():
                return "contiguous"
            if torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16:
                return "channels_last_all"
            return "channels_last" if self.kernel_size != (1, 1, 1) else "contiguous"
        if layout == "channels_last" and self.kernel_size == (1, 1, 1):
            return "contiguous"
        return layout

    def forward(self, x: Tensor) -> Tensor:
        if x.device.type == "cpu" and _bf16_on_cpu(x) and any(s < k for s, k in zip(x.shape[2:], self.kernel_size)):
            # oneDNN's bf16 backward on the CPU returned non-finite gradients for maps smaller
            # than the kernel on every axis (2 x 2 x 2 under a 3x3x3 kernel: 1-3 of 30 random
            # draws, at 8-64 channels, in both layouts; none at 3 x 2 x 2 or larger): such a
            # map (a crop of 16 voxels at the 1/8 scale) is convolved in float32, at no measurable cost
            with torch.autocast(device_type="cpu", enabled=False):
                return F.conv3d(x.float(), self.weight.float(), None if self.bias is None else self.bias.float(),
                                self.stride, self.padding, self.dilation, self.groups)
        mode = self._mode()
        if mode == "contiguous":
            return super().forward(x)
        y = F.conv3d(x.contiguous(memory_format=_CL), self.weight.contiguous(memory_format=_CL), self.bias,
                     self.stride, self.padding, self.dilation, self.groups)
        return y.contiguous() if mode == "channels_last" else y.contiguous(memory_format=_CL)


class ConvNormAct(nn.Sequential):
    """Conv3d (no bias) -> GroupNorm -> ReLU (``act=False``: no ReLU). Spatial size unchanged."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | Sequence[int] = 3,
        groups: int = 4,
        act: bool = True,
    ) -> None:
        layers: list[nn.Module] = [
            Conv3d(in_channels, out_channels, kernel_size, padding=_same_padding(kernel_size), bias=False),
            GroupNorm(groups, out_channels),
        ]
        if act:
            layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)
        self.act = act

    def forward(self, x: Tensor) -> Tensor:
        # the ReLU (``self[2]``, kept so the structure prints as the paper draws it) is applied by
        # the GroupNorm call, which fuses it into its kernel where it runs ours
        return self[1](self[0](x), relu=self.act)


class ResidualModule(nn.Module):
    """Paper Fig. 4: 1x1x1 -> 3x3x3 -> 1x1x1 convolutions, each followed by GroupNorm and ReLU,
    plus a skip branch; the two are added.

    ``(B, in_channels, D, H, W) -> (B, out_channels, D, H, W)``. The skip branch is the identity
    when the channel count is kept, else a 1x1x1 projection + GroupNorm. The 1x1x1 convolutions
    squeeze to ``mid_channels`` (default: half of ``out_channels``, a multiple of ``groups``) to
    save parameters and memory, as the paper says. As in the paper's figure, the ReLU after the
    last GroupNorm comes before the addition (there is none after it).
    """

    def __init__(self, in_channels: int, out_channels: int, groups: int = 4, mid_channels: int | None = None) -> None:
        super().__init__()
        if mid_channels is None:
            mid_channels = max(groups, round(out_channels / 2 / groups) * groups)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.branch = nn.Sequential(
            ConvNormAct(in_channels, mid_channels, 1, groups),
            ConvNormAct(mid_channels, mid_channels, 3, groups),
            ConvNormAct(mid_channels, out_channels, 1, groups),
        )
        if in_channels == out_channels:
            self.skip: nn.Module = nn.Identity()
        else:
            self.skip = ConvNormAct(in_channels, out_channels, 1, groups, act=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.branch(x) + self.skip(x)
