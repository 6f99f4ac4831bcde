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


def scaled_channels(channels: int, width: float, groups: int) -> int:
    """``channels * width`` rounded to a multiple of ``groups`` (at least ``groups``).

    Keeps every GroupNorm valid whatever the width factor: ``scaled_channels(16, 0.125, 4) == 4``.
    """
    return max(groups, round(channels * width / groups) * groups)


def _same_padding(kernel_size: int | Sequence[int]) -> int | tuple[int, ...]:
    if isinstance(kernel_size, int):
        return kernel_size // 2
    return tuple(k // 2 for k in kernel_size)


class GroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` that keeps a low-precision input's dtype under autocast.

    CUDA autocast runs ``group_norm`` in float32, so after every bf16 convolution a float32 copy
    would be saved for backward, and the ReLU after it would save a float32 output: bf16
    autocast would then keep *more* activation memory than float32 (~1.08x, measured by
    emulating that policy). The GroupNorm kernels accumulate their statistics in float32 for
    bf16/fp16 input anyway, so here they get the input as it is.
    """

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype in (torch.float16, torch.bfloat16) and torch.is_autocast_enabled(x.device.type):
            with torch.autocast(device_type=x.device.type, enabled=False):
                return F.group_norm(x, self.num_groups, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)
        return super().forward(x)


class Conv3d(nn.Conv3d):
    """``nn.Conv3d`` that can run in the ``channels_last_3d`` memory layout.

    ``layout``: ``contiguous`` (PyTorch's default), ``channels_last``, or ``auto``:
    channels-last when autograd is recording (training), contiguous otherwise (inference). In
    the channels-last layout the input and weight are laid out channels-last for the convolution
    and the output comes back contiguous, so the GroupNorm, ReLU and 1x1x1 convolutions around it
    keep their fast contiguous kernels. Same parameters, same state dict and the same output
    within float rounding; only the speed differs. Measured on the CPU (oneDNN, 1 thread, this
    network's 3x3x3 shapes): forward + backward 1.1-2.1x faster channels-last (4-128 channels;
    equal at 32 and 256), forward alone 0.63-0.96x (faster only at 8 channels), hence ``auto``;
    1x1x1 convolutions are slower channels-last and stay contiguous (see
    :meth:`vertstudy.model.network.VertebraNet.set_conv_layout`).
    """

    layout: str = "contiguous"

    def forward(self, x: Tensor) -> Tensor:
        if self.layout == "contiguous" or (self.layout == "auto" and not torch.is_grad_enabled()):
            return super().forward(x)
        cl = torch.channels_last_3d
        y = F.conv3d(x.contiguous(memory_format=cl), self.weight.contiguous(memory_format=cl), self.bias,
                     self.stride, self.padding, self.dilation, self.groups)
        return y.contiguous()


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
