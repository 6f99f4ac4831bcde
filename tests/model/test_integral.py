"""Integral regression (paper eq. 5-6) and arg-max coordinates: golden values and gradients."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vertstudy.model.integral import argmax_coordinates, integral_regression, softmax_3d


def _peaked(shape: tuple[int, int, int], *voxels: tuple[int, int, int], height: float = 60.0) -> torch.Tensor:
    """(1, 1, D, H, W) float64 logits: 0 everywhere, ``height`` at each of ``voxels``."""
    maps = torch.zeros((1, 1, *shape), dtype=torch.float64)
    for z, y, x in voxels:
        maps[0, 0, z, y, x] = height
    return maps


def test_one_hot_like_map_gives_its_voxel() -> None:
    out = integral_regression(_peaked((6, 5, 4), (4, 1, 3)))
    assert out.shape == (1, 1, 3)
    torch.testing.assert_close(out[0, 0], torch.tensor([4.0, 1.0, 3.0], dtype=torch.float64))


def test_uniform_map_gives_the_centre() -> None:
    out = integral_regression(torch.full((2, 3, 7, 6, 5), 1.7))
    expected = torch.tensor([3.0, 2.5, 2.0]).expand(2, 3, 3)
    torch.testing.assert_close(out, expected)


def test_symmetric_two_peaks_give_the_midpoint() -> None:
    out = integral_regression(_peaked((9, 8, 8), (1, 2, 7), (7, 6, 1)))
    torch.testing.assert_close(out[0, 0], torch.tensor([4.0, 4.0, 4.0], dtype=torch.float64))


def test_axis_order_is_z_y_x_and_channels_independent() -> None:
    maps = torch.zeros(1, 2, 4, 6, 8)
    maps[0, 0, 3, 0, 0] = 80.0
    maps[0, 1, 0, 5, 7] = 80.0
    out = integral_regression(maps)
    torch.testing.assert_close(out[0], torch.tensor([[3.0, 0.0, 0.0], [0.0, 5.0, 7.0]]), atol=1e-4, rtol=0)


def test_invariant_to_a_constant_shift_of_the_logits() -> None:
    maps = torch.randn(2, 3, 4, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(integral_regression(maps), integral_regression(maps + 123.0))


def test_softmax_sums_to_one_over_each_volume() -> None:
    probs = softmax_3d(torch.randn(2, 3, 4, 5, 6) * 10)
    torch.testing.assert_close(probs.sum(dim=(2, 3, 4)), torch.ones(2, 3))


def test_gradcheck_float64() -> None:
    maps = torch.randn(2, 2, 3, 4, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(integral_regression, (maps,))


def test_gradient_matches_hand_derivation() -> None:
    """d E[a] / d Y_k = P_k (a_k - E[a]) for each axis a in (z, y, x)."""
    maps = torch.randn(1, 1, 4, 3, 5, dtype=torch.float64, requires_grad=True)
    coords = integral_regression(maps)[0, 0]
    probs = softmax_3d(maps.detach())[0, 0]
    grid = torch.stack(
        torch.meshgrid(*(torch.arange(n, dtype=torch.float64) for n in probs.shape), indexing="ij")
    )  # (3, D, H, W): z, y, x of every voxel
    for axis in range(3):
        (grad,) = torch.autograd.grad(coords[axis], maps, retain_graph=True)
        expected = probs * (grid[axis] - coords[axis].detach())
        torch.testing.assert_close(grad[0, 0], expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_input_gives_float32(dtype: torch.dtype) -> None:
    maps = _peaked((8, 8, 8), (5, 2, 6), height=30.0).to(dtype)
    out = integral_regression(maps)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out[0, 0], torch.tensor([5.0, 2.0, 6.0]), atol=1e-3, rtol=0)


def test_float32_under_autocast() -> None:
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = integral_regression(torch.randn(1, 2, 8, 8, 8).to(torch.bfloat16))
    assert out.dtype == torch.float32


@settings(max_examples=25, deadline=None)
@given(
    shape=st.tuples(st.integers(1, 6), st.integers(1, 6), st.integers(1, 6)),
    scale=st.floats(0.0, 50.0),
    seed=st.integers(0, 2**16),
)
def test_coordinates_lie_inside_the_volume(shape: tuple[int, int, int], scale: float, seed: int) -> None:
    maps = torch.randn((1, 2, *shape), generator=torch.Generator().manual_seed(seed)) * scale
    out = integral_regression(maps)
    upper = torch.tensor(shape, dtype=torch.float32) - 1
    assert torch.isfinite(out).all()
    assert (out >= -1e-4).all() and (out <= upper + 1e-4).all()


def test_argmax_coordinates_golden_value() -> None:
    maps = torch.randn(2, 3, 5, 6, 7)
    maps[1, 2, 4, 0, 6] = 100.0
    out = argmax_coordinates(maps.requires_grad_())
    assert out.dtype == torch.float32 and out.shape == (2, 3, 3) and not out.requires_grad
    torch.testing.assert_close(out[1, 2], torch.tensor([4.0, 0.0, 6.0]))


@pytest.mark.parametrize("fn", [integral_regression, argmax_coordinates])
def test_wrong_rank_raises(fn) -> None:
    with pytest.raises(ValueError, match=r"\(B, C, D, H, W\).*\(2, 3, 4, 4\)"):
        fn(torch.zeros(2, 3, 4, 4))


def test_hand_written_backward_matches_autograd_of_the_plain_formula() -> None:
    """The fused forward/backward equals autograd through softmax and the three marginals
    (values and gradients, float32, 26 maps of a realistic crop)."""
    g = torch.Generator().manual_seed(3)
    logits = (3 * torch.randn(2, 26, 24, 16, 16, generator=g)).requires_grad_(True)
    weights = torch.randn(2, 26, 3, generator=g)

    probs = softmax_3d(logits)
    plain = torch.stack([(probs.sum(dim=tuple(a for a in (2, 3, 4) if a != axis))
                          * torch.arange(probs.shape[axis], dtype=probs.dtype)).sum(-1) for axis in (2, 3, 4)], -1)
    (grad_plain,) = torch.autograd.grad((plain * weights).sum(), logits)
    fused = integral_regression(logits)
    (grad_fused,) = torch.autograd.grad((fused * weights).sum(), logits)

    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-4)
    scale = float(grad_plain.abs().max())  # rounding differs where P_k (a_k - E[a]) cancels
    torch.testing.assert_close(grad_fused, grad_plain, rtol=1e-4, atol=1e-5 * scale)
