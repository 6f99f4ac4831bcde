"""Residual module (paper Fig. 4), conv blocks, channel scaling."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vertstudy.model.blocks import ConvNormAct, GroupNorm, ResidualModule, scaled_channels


@pytest.mark.parametrize(
    ("channels", "width", "groups", "expected"),
    [(32, 1.0, 4, 32), (32, 0.125, 4, 4), (16, 0.125, 4, 4), (256, 0.5, 4, 128), (30, 1.0, 4, 32), (64, 0.3, 8, 16)],
)
def test_scaled_channels_are_multiples_of_groups(channels: int, width: float, groups: int, expected: int) -> None:
    out = scaled_channels(channels, width, groups)
    assert out == expected and out % groups == 0


@pytest.mark.parametrize("spatial", [(5, 7, 3), (8, 8, 8), (1, 2, 3)])
def test_residual_module_keeps_spatial_size_and_projects_channels(spatial: tuple[int, int, int]) -> None:
    block = ResidualModule(4, 12)
    out = block(torch.randn(2, 4, *spatial))
    assert out.shape == (2, 12, *spatial)
    assert isinstance(block.skip[0], nn.Conv3d) and block.skip[0].kernel_size == (1, 1, 1)


def test_residual_module_identity_skip_when_channels_kept() -> None:
    block = ResidualModule(8, 8)
    assert isinstance(block.skip, nn.Identity)
    x = torch.randn(1, 8, 3, 4, 5)
    torch.testing.assert_close(block(x), block.branch(x) + x)


def test_residual_branch_is_1_3_1_with_groupnorm_and_relu() -> None:
    block = ResidualModule(16, 32, groups=4)
    kernels = [layer[0].kernel_size for layer in block.branch]
    assert kernels == [(1, 1, 1), (3, 3, 3), (1, 1, 1)]
    for layer in block.branch:
        assert isinstance(layer[1], nn.GroupNorm) and layer[1].num_groups == 4
        assert isinstance(layer[2], nn.ReLU)
    assert block.branch[0][0].out_channels == 16  # squeezed to half the output channels


def test_conv_norm_act_anisotropic_kernel_keeps_size() -> None:
    out = ConvNormAct(4, 8, (5, 3, 3))(torch.randn(1, 4, 3, 2, 2))
    assert out.shape == (1, 8, 3, 2, 2)


def test_group_norm_matches_torch_and_keeps_bf16_under_autocast() -> None:
    norm, ref = GroupNorm(4, 8), nn.GroupNorm(4, 8)
    x = torch.randn(2, 8, 3, 4, 5)
    torch.testing.assert_close(norm(x), ref(x))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = norm(x.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref(x), atol=0.05, rtol=0.05)


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last_3d)


def test_channels_last_group_norm_gradients_are_exact_in_float64() -> None:
    from vertstudy.model.blocks import _ChannelsLastGroupNorm

    gen = torch.Generator().manual_seed(0)
    x = _channels_last(torch.randn(2, 8, 3, 4, 5, dtype=torch.float64, generator=gen)).requires_grad_()
    w = torch.randn(8, dtype=torch.float64, generator=gen).requires_grad_()
    b = torch.randn(8, dtype=torch.float64, generator=gen).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, w, b: _ChannelsLastGroupNorm.apply(x, 4, w, b, 1e-5), (x, w, b))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_group_norm_on_channels_last_input_matches_torch_and_stays_channels_last(dtype: torch.dtype) -> None:
    """A channels-last map with enough voxels takes the rows path; values and gradients (input,
    gamma, beta) agree with ``nn.GroupNorm`` in float64 within the dtype's rounding."""
    from vertstudy.model.blocks import _CL_NORM_MIN_VOXELS, is_channels_last

    gen = torch.Generator().manual_seed(1)
    norm, ref = GroupNorm(4, 16), nn.GroupNorm(4, 16).double()
    with torch.no_grad():
        for m in (norm, ref):
            m.weight.copy_(torch.linspace(0.5, 1.5, 16))
            m.bias.copy_(torch.linspace(-0.2, 0.3, 16))
    base = torch.randn(2, 16, 16, 16, 16, generator=gen) * 2 + 0.5
    assert base[0, 0].numel() >= _CL_NORM_MIN_VOXELS
    x = _channels_last(base.to(dtype)).requires_grad_()
    x64 = base.to(dtype).double().requires_grad_()
    dy = torch.randn(base.shape, generator=gen)
    out = norm(x)
    assert out.dtype == dtype and is_channels_last(out)
    out.backward(_channels_last(dy.to(dtype)))
    ref(x64).backward(dy.to(dtype).double())
    tol = {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 0.03, "atol": 0.03}
    torch.testing.assert_close(out.double(), ref(x64).detach(), **tol)
    torch.testing.assert_close(x.grad.double(), x64.grad, **tol)
    for p, q in ((norm.weight, ref.weight), (norm.bias, ref.bias)):
        rel = float((p.grad.double() - q.grad).norm() / q.grad.norm())
        assert rel < (1e-4 if dtype == torch.float32 else 0.02)
