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


def _reference_group_norm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, dy: torch.Tensor, relu: bool):
    """GroupNorm (+ ReLU) in float64 of the same values: output and gradients of input, gamma, beta."""
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
    y = nn.functional.group_norm(x64, 4, w64, b64, 1e-5)
    if relu:
        y = torch.relu(y)
    y.backward(dy.double())
    return y.detach(), x64.grad, w64.grad, b64.grad


@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("shape", [(2, 8, 12, 8, 8), (1, 12, 5, 3, 7), (3, 32, 6, 4, 4), (2, 4, 9, 9, 9)])
def test_fused_group_norm_kernel_matches_float64_within_bf16_rounding(shape: tuple, relu: bool) -> None:
    """Our C kernel (GroupNorm and ReLU fused, channels-last bf16): output within bf16 rounding of
    the float64 result, input gradient within a few bf16 roundings, gamma / beta gradients (float32
    sums) within 1e-5; shapes whose value count is not a whole number of the kernel's chunks and
    channel counts that are not powers of 2 included."""
    from vertstudy.model.blocks import _FusedGroupNormBF16, is_channels_last
    from vertstudy.model.kernels import group_norm_library

    lib = group_norm_library()
    assert lib is not None, "the C kernels did not build on a machine with a C compiler"
    gen = torch.Generator().manual_seed(2)
    x = _channels_last((torch.randn(shape, generator=gen) * 3 + 1).to(torch.bfloat16)).requires_grad_()
    w = (torch.rand(shape[1], generator=gen) + 0.5).requires_grad_()
    b = (torch.randn(shape[1], generator=gen) * 0.3).requires_grad_()
    dy = _channels_last(torch.randn(shape, generator=gen).to(torch.bfloat16))
    y = _FusedGroupNormBF16.apply(x, 4, w, b, 1e-5, relu, lib)
    y.backward(dy)
    ref_y, ref_dx, ref_dw, ref_db = _reference_group_norm(x, w, b, dy, relu)
    assert y.dtype == torch.bfloat16 and is_channels_last(y) and is_channels_last(x.grad)
    assert torch.all((y.double() - ref_y).abs() <= ref_y.abs() * 2**-8 + 1e-6)
    if relu:
        assert bool((y >= 0).all())
    assert float((x.grad.double() - ref_dx).norm() / ref_dx.norm()) < 0.01
    for got, ref in ((w.grad, ref_dw), (b.grad, ref_db)):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)


def test_group_norm_takes_the_fused_kernel_in_bf16_and_the_composite_without_it(monkeypatch, tmp_path) -> None:
    """Under bf16 training on one thread the module runs our kernel; with ``VERTSTUDY_C_KERNELS=0``
    (or no compiler) the PyTorch composite, with the same output within bf16 rounding; with more
    torch threads the composite too."""
    from vertstudy.model import kernels

    norm = ConvNormAct(8, 8, 3)
    x = _channels_last(torch.randn(2, 8, 16, 16, 16).to(torch.bfloat16))
    conv = norm[0](x.float()).to(torch.bfloat16).contiguous(memory_format=torch.channels_last_3d)

    def grad_fn(threads: int = 1) -> tuple[str, torch.Tensor]:
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            out = norm[1](conv.detach().requires_grad_(), relu=True)
        finally:
            torch.set_num_threads(previous)
        return type(out.grad_fn).__name__, out

    monkeypatch.setenv("VERTSTUDY_KERNEL_CACHE", str(tmp_path / "kernels"))
    kernels.reset()
    try:
        fused_name, fused = grad_fn()
        assert fused_name == "_FusedGroupNormBF16Backward"
        assert list((tmp_path / "kernels").glob("groupnorm-*.so")), "the kernel was not built into the cache"
        many_name, _ = grad_fn(threads=2)
        assert many_name != "_FusedGroupNormBF16Backward"
        monkeypatch.setenv("VERTSTUDY_C_KERNELS", "0")
        kernels.reset()
        plain_name, plain = grad_fn()
        assert plain_name != "_FusedGroupNormBF16Backward" and kernels.why_not() == "VERTSTUDY_C_KERNELS=0"
        monkeypatch.delenv("VERTSTUDY_C_KERNELS")
        monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
        monkeypatch.setenv("VERTSTUDY_KERNEL_CACHE", str(tmp_path / "empty"))
        monkeypatch.setenv("PATH", str(tmp_path))  # no gcc or clang either
        kernels.reset()
        assert kernels.group_norm_library() is None and "compiler" in kernels.why_not()
    finally:
        kernels.reset()
    torch.testing.assert_close(fused.float(), plain.float(), rtol=0.02, atol=0.02)
