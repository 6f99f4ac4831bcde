"""Golden-value tests of vertstudy.losses (paper eq. 1-4); every expected value is worked by hand."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vertstudy.config import LossConfig, ModelConfig
from vertstudy.losses import (
    classification_loss,
    heatmap_loss,
    heatmap_targets,
    masked_sum,
    regression_loss,
    total_loss,
)

LN2, LN3 = math.log(2.0), math.log(3.0)


# --- classification (eq. 1) ---------------------------------------------------------------


def test_classification_loss_golden_values():
    # logit 0, u=1, B=3: f = 1/2, -3 log(1/2) = 3 ln 2
    # logit ln 3, u=0: f = 3/(3+1) = 3/4, -log(1 - 3/4) = ln 4 = 2 ln 2
    logits = torch.tensor([[0.0, LN3]])
    present = torch.tensor([[1.0, 0.0]])
    loss = classification_loss(logits, present, balance_b=3.0)
    assert loss.shape == (1, 2)
    torch.testing.assert_close(loss, torch.tensor([[3 * LN2, 2 * LN2]]))


def test_balance_factor_weights_only_positive_terms():
    # u=1 terms scale with B (B ln 2); u=0 terms do not (ln 2 for logit 0)
    logits = torch.zeros(1, 2)
    present = torch.tensor([[1.0, 0.0]])
    torch.testing.assert_close(classification_loss(logits, present, 2.0), torch.tensor([[2 * LN2, LN2]]))
    torch.testing.assert_close(classification_loss(logits, present, 4.0), torch.tensor([[4 * LN2, LN2]]))


def test_classification_gradient_is_minus_b_one_minus_f_or_f():
    # d/dz [-B log sigmoid(z)] = -B (1 - f); d/dz [-log(1 - sigmoid(z))] = f
    # z = 0,    u=1, B=3: f = 1/2 -> -3 * 1/2 = -1.5
    # z = ln 3, u=0:      f = 3/4 -> 0.75
    # z = -ln3, u=1, B=3: f = 1/4 -> -3 * 3/4 = -2.25
    logits = torch.tensor([[0.0, LN3, -LN3]], requires_grad=True)
    present = torch.tensor([[1.0, 0.0, 1.0]])
    classification_loss(logits, present, 3.0).sum().backward()
    torch.testing.assert_close(logits.grad, torch.tensor([[-1.5, 0.75, -2.25]]))


def test_classification_loss_is_stable_for_extreme_logits():
    # -3 log sigmoid(-100) = 3 (100 + log(1 + e^-100)) = 300 (to float precision); -log(1 - sigmoid(-100)) ~ e^-100
    logits = torch.tensor([[-100.0, -100.0, 100.0]], requires_grad=True)
    present = torch.tensor([[1.0, 0.0, 0.0]])
    loss = classification_loss(logits, present, 3.0)
    torch.testing.assert_close(loss, torch.tensor([[300.0, 0.0, 100.0]]))
    loss.sum().backward()
    assert torch.isfinite(logits.grad).all()


@settings(max_examples=50, deadline=None)
@given(
    z=st.floats(-15, 15),  # the naive 1 - f loses precision beyond; the stable form does not
    u=st.sampled_from([0.0, 1.0]),
    b=st.floats(0.5, 5.0),
)
def test_classification_loss_matches_naive_formula(z, u, b):
    f = 1.0 / (1.0 + math.exp(-z))
    naive = -b * math.log(f) if u == 1.0 else -math.log(1.0 - f) if f < 1.0 else float("inf")
    got = float(classification_loss(torch.tensor([[z]], dtype=torch.float64), torch.tensor([[u]]), b))
    assert got >= 0.0
    if math.isfinite(naive):
        assert got == pytest.approx(naive, rel=1e-6, abs=1e-9)


# --- smooth L1 (eq. 3) --------------------------------------------------------------------


def test_smooth_l1_below_above_and_at_the_switch():
    # per axis x: 0.5 -> 0.5*0.25 = 0.125;  -2 -> 2 - 0.5 = 1.5;  0 -> 0     sum 1.625
    # x = 1 (switch): |1| - 0.5 = 0.5 (= 0.5*1^2, continuous); x = 0.99 -> 0.5*0.9801 = 0.49005
    # x = 3 -> 2.5; x = -1 -> 0.5; x = 0.2 -> 0.02                            sum 3.02
    target = torch.zeros(1, 4, 3)
    pred = torch.tensor([[[0.5, -2.0, 0.0], [1.0, 0.0, 0.0], [0.99, 0.0, 0.0], [3.0, -1.0, 0.2]]])
    loss = regression_loss(pred, target)
    assert loss.shape == (1, 4)
    torch.testing.assert_close(loss, torch.tensor([[1.625, 0.5, 0.49005, 3.02]]))


def test_smooth_l1_gradient():
    # d/dx: x for |x| < 1, sign(x) otherwise: 0.5 -> 0.5, -2 -> -1, 3 -> 1
    pred = torch.tensor([[[0.5, -2.0, 3.0]]], requires_grad=True)
    regression_loss(pred, torch.zeros(1, 1, 3)).sum().backward()
    torch.testing.assert_close(pred.grad, torch.tensor([[[0.5, -1.0, 1.0]]]))


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-50, 50), min_size=6, max_size=6))
def test_smooth_l1_is_symmetric_non_negative_and_zero_on_equal(values):
    a = torch.tensor(values[:3], dtype=torch.float64).view(1, 1, 3)
    b = torch.tensor(values[3:], dtype=torch.float64).view(1, 1, 3)
    assert float(regression_loss(a, b)) >= 0.0
    assert float(regression_loss(a, b)) == pytest.approx(float(regression_loss(b, a)))
    assert float(regression_loss(a, a)) == 0.0


# --- masked reduction ---------------------------------------------------------------------


def test_masked_sum_sums_vertebrae_and_averages_batch():
    # sample 0: 1 + 3 = 4; sample 1: 6; mean over batch (4 + 6) / 2 = 5
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    assert float(masked_sum(values, mask)) == 5.0


def test_masked_sum_ignores_non_finite_masked_entries_and_gives_them_no_gradient():
    values = torch.tensor([[1.0, float("nan"), 3.0], [float("inf"), 5.0, 6.0]], requires_grad=True)
    mask = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    out = masked_sum(values, mask)
    assert float(out.detach()) == 5.0
    out.backward()
    # each kept entry gets 1/B = 0.5, masked ones 0
    torch.testing.assert_close(values.grad, torch.tensor([[0.5, 0.0, 0.5], [0.0, 0.0, 0.5]]))


# --- heatmap baseline (Fig. 5b) -----------------------------------------------------------


def test_heatmap_targets_gaussian_values():
    # sigma 1: peak 1 at the centroid; one voxel away exp(-1/2); (1,1,1) away exp(-3/2)
    coords = torch.tensor([[[1.0, 1.0, 1.0]]])
    t = heatmap_targets(coords, (3, 3, 4), sigma_vox=1.0)
    assert t.shape == (1, 1, 3, 3, 4)
    assert float(t[0, 0, 1, 1, 1]) == pytest.approx(1.0)
    assert float(t.max()) == pytest.approx(1.0)
    assert float(t[0, 0, 0, 1, 1]) == pytest.approx(math.exp(-0.5))
    assert float(t[0, 0, 1, 1, 3]) == pytest.approx(math.exp(-2.0))  # x distance 2: exp(-4/2)
    assert float(t[0, 0, 0, 0, 0]) == pytest.approx(math.exp(-1.5))
    # sigma 2, distance 2: exp(-4/8) = exp(-1/2)
    t2 = heatmap_targets(coords, (3, 3, 4), sigma_vox=2.0)
    assert float(t2[0, 0, 1, 1, 3]) == pytest.approx(math.exp(-0.5))


def test_heatmap_loss_golden_value():
    # map (D, H, W) = (1, 1, 3), centroid (0, 0, 1), sigma 1: target [e^-1/2, 1, e^-1/2]
    # zero heatmap: mean of squares = (e^-1 + 1 + e^-1) / 3 = (1 + 0.7357589) / 3 = 0.5785863
    # sum: 1.7357589
    heatmaps = torch.zeros(1, 1, 1, 1, 3)
    coords = torch.tensor([[[0.0, 0.0, 1.0]]])
    assert float(heatmap_loss(heatmaps, coords, 1.0)) == pytest.approx(0.5785863, rel=1e-6)
    assert float(heatmap_loss(heatmaps, coords, 1.0, reduction="sum")) == pytest.approx(1.7357589, rel=1e-6)
    perfect = heatmap_targets(coords, (1, 1, 3), 1.0)
    assert float(heatmap_loss(perfect, coords, 1.0)) == pytest.approx(0.0, abs=1e-12)


def test_heatmap_loss_gradient():
    # d/dh mean((h - t)^2) = 2 (h - t) / n; h = 0, n = 3: -2/3 [e^-1/2, 1, e^-1/2]
    heatmaps = torch.zeros(1, 1, 1, 1, 3, requires_grad=True)
    heatmap_loss(heatmaps, torch.tensor([[[0.0, 0.0, 1.0]]]), 1.0).sum().backward()
    e = math.exp(-0.5)
    torch.testing.assert_close(heatmaps.grad.view(3), torch.tensor([-2 * e / 3, -2 / 3, -2 * e / 3]))


# --- total loss (eq. 4) -------------------------------------------------------------------


def _batch_and_output(batch_size: int = 1):
    """Sample 0: classes 0 and 1 present, prediction offsets (0.5, 0, 0) and (2, 0, 0) voxels,
    absent class 2 off by 100 voxels per axis (must not count). Further samples: nothing
    present. All logits 0 (f = 1/2)."""
    present = torch.zeros(batch_size, 26)
    present[0, :2] = 1.0
    target = torch.full((batch_size, 26, 3), 5.0)
    pred = target.clone()
    pred[0, 0, 0] += 0.5
    pred[0, 1, 0] += 2.0
    pred[0, 2] += 100.0
    logits = torch.zeros(batch_size, 26)
    batch = {"image": torch.zeros(batch_size, 1, 2, 2, 2), "present": present, "coords": target}
    out = {"coords": pred, "logits": logits, "heatmaps": None}
    return out, batch


def test_total_loss_integral_head_golden():
    # cls = 2 * (3 ln 2) + 24 * ln 2 = 30 ln 2 = 20.7944154   (B = 3, logits 0)
    # reg = 0.4 * (0.125 + 1.5) = 0.4 * 1.625 = 0.65          (class 2 masked out)
    out, batch = _batch_and_output()
    losses = total_loss(out, batch, LossConfig(map_reg="none", balance_b=3.0, reg_lambda=0.4), ModelConfig())
    assert set(losses) == {"total", "cls", "reg"}
    assert all(v.ndim == 0 for v in losses.values())
    assert float(losses["cls"]) == pytest.approx(30 * LN2)
    assert float(losses["reg"]) == pytest.approx(0.65)
    assert float(losses["total"]) == pytest.approx(30 * LN2 + 0.65)


def test_total_loss_balance_and_lambda_weighting():
    # B = 2: cls = 2 * 2 ln 2 + 24 ln 2 = 28 ln 2; lambda = 0.8: reg = 0.8 * 1.625 = 1.3
    out, batch = _batch_and_output()
    losses = total_loss(out, batch, LossConfig(map_reg="none", balance_b=2.0, reg_lambda=0.8), ModelConfig())
    assert float(losses["cls"]) == pytest.approx(28 * LN2)
    assert float(losses["reg"]) == pytest.approx(1.3)
    # lambda = 0: no regression term at all
    zero = total_loss(out, batch, LossConfig(map_reg="none", balance_b=2.0, reg_lambda=0.0), ModelConfig())
    assert float(zero["reg"]) == 0.0


def test_total_loss_masks_absent_vertebrae_and_averages_over_batch():
    # sample 1 has nothing present: cls = 26 ln 2, reg = 0
    # mean over 2 samples: cls = (30 ln 2 + 26 ln 2) / 2 = 28 ln 2; reg = 0.65 / 2 = 0.325
    out, batch = _batch_and_output(batch_size=2)
    out["coords"][1] += 1000.0  # wildly wrong, but absent
    losses = total_loss(out, batch, LossConfig(map_reg="none", balance_b=3.0, reg_lambda=0.4), ModelConfig())
    assert float(losses["cls"]) == pytest.approx(28 * LN2)
    assert float(losses["reg"]) == pytest.approx(0.325)


def test_total_loss_gradient_wrt_logits():
    # d total / d z = (per-sample gradient) / batch size 1: u=1: -3 (1 - 1/2) = -1.5; u=0: 1/2
    out, batch = _batch_and_output()
    out["logits"].requires_grad_(True)
    total_loss(out, batch, LossConfig(map_reg="none", balance_b=3.0), ModelConfig())["total"].backward()
    expected = torch.full((1, 26), 0.5)
    expected[0, :2] = -1.5
    torch.testing.assert_close(out["logits"].grad, expected)


def test_total_loss_loc_only_has_zero_cls():
    out, batch = _batch_and_output()
    out["logits"] = None
    losses = total_loss(out, batch, LossConfig(map_reg="none", reg_lambda=0.4), ModelConfig(tasks="loc"))
    assert float(losses["cls"]) == 0.0
    assert float(losses["total"]) == pytest.approx(0.65)


def test_total_loss_fc_head_uses_smooth_l1():
    out, batch = _batch_and_output()
    losses = total_loss(out, batch, LossConfig(map_reg="none", reg_lambda=0.4), ModelConfig(loc_head="fc"))
    assert float(losses["reg"]) == pytest.approx(0.65)


def test_total_loss_heatmap_head_golden():
    # maps (1, 1, 3), sigma 1, present classes 0, 1 with centroid (0, 0, 1) and zero heatmaps:
    # summed over the 3 voxels 1.7357589 each (see test_heatmap_loss_golden_value);
    # reg = 0.4 * 2 * 1.7357589 = 1.3886071
    # absent classes have targets at (0, 0, 0) and zero heatmaps -> nonzero loss, masked out
    out, batch = _batch_and_output()
    batch["coords"] = torch.zeros(1, 26, 3)
    batch["coords"][0, :2] = torch.tensor([0.0, 0.0, 1.0])
    out["heatmaps"] = torch.zeros(1, 26, 1, 1, 3)
    cfg = ModelConfig(loc_head="heatmap", heatmap_sigma_vox=1.0)
    losses = total_loss(out, batch, LossConfig(map_reg="none", balance_b=3.0, reg_lambda=0.4), cfg)
    assert float(losses["reg"]) == pytest.approx(1.3886071, rel=1e-6)
    assert float(losses["total"]) == pytest.approx(30 * LN2 + 1.3886071, rel=1e-6)


def test_total_loss_missing_outputs_are_errors():
    out, batch = _batch_and_output()
    with pytest.raises(ValueError, match="heatmaps"):
        total_loss(out, batch, LossConfig(map_reg="none"), ModelConfig(loc_head="heatmap"))
    out["logits"] = None
    with pytest.raises(ValueError, match="logits"):
        total_loss(out, batch, LossConfig(map_reg="none"), ModelConfig(tasks="loc+cls"))


def test_total_loss_is_float32_for_bfloat16_outputs():
    out, batch = _batch_and_output()
    out = {"coords": out["coords"].bfloat16(), "logits": out["logits"].bfloat16(), "heatmaps": None}
    losses = total_loss(out, batch, LossConfig(map_reg="none"), ModelConfig())
    assert all(v.dtype == torch.float32 for v in losses.values())


# -- the map regulariser (loss.map_reg = "js", beyond the paper) ---------------------------------
def test_gaussian_map_sums_to_one_and_peaks_at_the_target():
    from vertstudy.losses import gaussian_map

    coords = torch.tensor([[[3.0, 2.0, 5.0], [0.0, 0.0, 0.0]]])
    g = gaussian_map(coords, (8, 6, 7), sigma_vox=1.0)
    assert g.shape == (1, 2, 8, 6, 7)
    torch.testing.assert_close(g.flatten(2).sum(-1), torch.ones(1, 2))
    assert tuple(int(i) for i in torch.unravel_index(g[0, 0].argmax(), (8, 6, 7))) == (3, 2, 5)


def test_js_map_loss_is_zero_at_the_target_bounded_and_pulls_a_flat_map():
    from vertstudy.losses import gaussian_map, js_map_loss

    coords = torch.tensor([[[4.0, 3.0, 3.0]]])
    target = gaussian_map(coords, (8, 6, 6), 1.0)
    at_target = js_map_loss(torch.log(target), coords, 1.0)
    assert float(at_target) == pytest.approx(0.0, abs=1e-6)
    flat = torch.zeros(1, 1, 8, 6, 6, requires_grad=True)
    js = js_map_loss(flat, coords, 1.0)
    assert 0.0 < float(js.detach()) <= math.log(2.0)
    js.sum().backward()
    # from a flat start the gradient raises the logit at the target and lowers it far away
    assert flat.grad[0, 0, 4, 3, 3] < 0 < flat.grad[0, 0, 0, 0, 0]


def test_total_loss_adds_the_js_term_of_present_vertebrae_only():
    from vertstudy.losses import js_map_loss

    torch.manual_seed(0)
    heatmaps = torch.randn(2, 26, 8, 6, 6)
    from vertstudy.model.integral import integral_regression

    out = {"coords": integral_regression(heatmaps), "logits": torch.zeros(2, 26), "heatmaps": heatmaps}
    present = torch.zeros(2, 26)
    present[0, 3] = present[1, 7] = 1.0
    batch = {"present": present, "coords": torch.full((2, 26, 3), 2.0)}
    plain = total_loss(out, batch, LossConfig(map_reg="none"), ModelConfig())
    reg = total_loss(out, batch, LossConfig(map_reg="js", map_reg_weight=2.0, map_reg_sigma_vox=1.0), ModelConfig())
    js = js_map_loss(heatmaps, batch["coords"], 1.0)
    expected = plain["reg"] + 2.0 * (js[0, 3] + js[1, 7]) / 2
    torch.testing.assert_close(reg["reg"], expected)
    torch.testing.assert_close(reg["cls"], plain["cls"])
    # other heads are unaffected by map_reg
    fc = {"coords": out["coords"], "logits": out["logits"], "heatmaps": None}
    torch.testing.assert_close(total_loss(fc, batch, LossConfig(map_reg="js"), ModelConfig(loc_head="fc"))["reg"],
                               total_loss(fc, batch, LossConfig(map_reg="none"), ModelConfig(loc_head="fc"))["reg"])


def test_js_map_loss_with_a_mask_computes_only_the_masked_maps_and_the_same_values():
    from vertstudy.losses import js_map_loss

    torch.manual_seed(1)
    heatmaps = torch.randn(2, 26, 6, 5, 4, requires_grad=True)
    coords = torch.rand(2, 26, 3) * 4
    mask = torch.zeros(2, 26)
    mask[0, [1, 5]] = 1
    mask[1, 25] = 1
    full = js_map_loss(heatmaps, coords, 1.0)
    masked = js_map_loss(heatmaps, coords, 1.0, mask=mask)
    torch.testing.assert_close(masked[mask.bool()], full[mask.bool()])
    assert (masked[~mask.bool()] == 0).all()
    masked.sum().backward()
    assert heatmaps.grad[0, 1].abs().sum() > 0 and heatmaps.grad[0, 2].abs().sum() == 0
    assert (js_map_loss(heatmaps, coords, 1.0, mask=torch.zeros(2, 26)) == 0).all()


def _js_reference(heatmaps, coords, sigma_vox):
    """The plain formula, through autograd: KL(p || m) / 2 + KL(g || m) / 2 over each whole map."""
    from vertstudy.losses import gaussian_map
    from vertstudy.model.integral import softmax_3d

    p = softmax_3d(heatmaps).flatten(2)
    g = gaussian_map(coords.to(p.dtype), heatmaps.shape[2:], sigma_vox).flatten(2)
    log_m = torch.log((0.5 * (p + g)).clamp_min(1e-30))
    return 0.5 * (torch.xlogy(p, p) - p * log_m).sum(-1) + 0.5 * (torch.xlogy(g, g) - g * log_m).sum(-1)


def test_js_map_loss_matches_the_plain_formula_in_value_and_gradient():
    from vertstudy.losses import js_map_loss

    torch.manual_seed(2)
    # peaked logits (softmax_beta 25 scale) and targets near and past the edges
    heatmaps = (torch.randn(2, 26, 7, 6, 5, dtype=torch.float64) * 8).requires_grad_(True)
    coords = (torch.rand(2, 26, 3, dtype=torch.float64) * 8 - 1).to(torch.float64)
    torch.testing.assert_close(js_map_loss(heatmaps, coords, 1.0), _js_reference(heatmaps, coords, 1.0))
    weights = torch.rand(2, 26, dtype=torch.float64)
    (js_map_loss(heatmaps, coords, 1.0) * weights).sum().backward()
    fused = heatmaps.grad.clone()
    heatmaps.grad = None
    (_js_reference(heatmaps, coords, 1.0) * weights).sum().backward()
    torch.testing.assert_close(fused, heatmaps.grad)
    small = torch.randn(1, 2, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda h: js_map_loss(h, coords[:1, :2] / 2, 0.8), (small,))


def test_js_map_loss_of_bf16_logits_is_computed_in_float32():
    from vertstudy.losses import js_map_loss

    torch.manual_seed(3)
    heatmaps = torch.randn(1, 26, 8, 6, 6) * 5
    coords = torch.rand(1, 26, 3) * 5
    low = js_map_loss(heatmaps.to(torch.bfloat16), coords, 1.0)
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, _js_reference(heatmaps.to(torch.bfloat16).float(), coords, 1.0))
