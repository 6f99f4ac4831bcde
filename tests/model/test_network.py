"""The network: a registry-style test over every ablation variant, at tiny width."""

from __future__ import annotations

import itertools
import typing

import pytest
import torch
import torch.nn.functional as F

from vertstudy.config import LossConfig, ModelConfig
from vertstudy.model import network
from vertstudy.model.network import VertebraNet, build_model, estimate_activation_bytes

LOC_HEADS = typing.get_args(ModelConfig.model_fields["loc_head"].annotation)
CLASSIFIERS = typing.get_args(ModelConfig.model_fields["classifier"].annotation)
TASKS = typing.get_args(ModelConfig.model_fields["tasks"].annotation)
VARIANTS = list(itertools.product(LOC_HEADS, CLASSIFIERS, TASKS))
CROPS = [(24, 16, 16), (32, 24, 16)]


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny tensors: one thread is faster


def tiny(**fields) -> ModelConfig:
    return ModelConfig(**{"width": 0.125, "lstm_hidden": 8, **fields})


def _model(loc_head: str, classifier: str, tasks: str, seed: int = 0) -> VertebraNet:
    torch.manual_seed(seed)
    return build_model(tiny(loc_head=loc_head, classifier=classifier, tasks=tasks))


def _loss(out: dict, generator: torch.Generator) -> torch.Tensor:
    """A stand-in loss touching every output that carries gradient, with random weights."""
    loss = torch.zeros(())
    if out["heatmaps"] is not None:
        loss = loss + (out["heatmaps"] * torch.randn(out["heatmaps"].shape, generator=generator)).mean()
    if out["coords"].requires_grad:
        loss = loss + (out["coords"] * torch.randn(out["coords"].shape, generator=generator)).sum()
    if out["logits"] is not None:
        loss = loss + (out["logits"] * torch.randn(out["logits"].shape, generator=generator)).sum()
    return loss


def test_variant_list_covers_every_config_choice() -> None:
    assert len(VARIANTS) == 12
    assert set(LOC_HEADS) == {"integral", "heatmap", "fc"}


@pytest.mark.parametrize(("loc_head", "classifier", "tasks"), VARIANTS)
@pytest.mark.parametrize("crop", CROPS, ids=lambda c: "x".join(map(str, c)))
def test_variant_forward_backward(loc_head: str, classifier: str, tasks: str, crop: tuple[int, int, int]) -> None:
    model = _model(loc_head, classifier, tasks)
    x = torch.randn(2, 1, *crop)
    out = model(x)

    assert set(out) == {"coords", "logits", "heatmaps"}
    assert out["coords"].shape == (2, 26, 3) and out["coords"].dtype == torch.float32
    assert torch.isfinite(out["coords"]).all()
    upper = torch.tensor(crop, dtype=torch.float32) - 1
    assert (out["coords"] >= 0).all() and (out["coords"] <= upper).all()
    if tasks == "loc":
        assert out["logits"] is None
    else:
        assert out["logits"].shape == (2, 26) and out["logits"].dtype == torch.float32
        assert torch.isfinite(out["logits"]).all()
    if loc_head == "fc":
        assert out["heatmaps"] is None
    else:
        assert out["heatmaps"].shape == (2, 26, *crop) and out["heatmaps"].dtype == torch.float32
        assert torch.isfinite(out["heatmaps"]).all()
    assert out["coords"].requires_grad == (loc_head != "heatmap")

    _loss(out, torch.Generator().manual_seed(1)).backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(param.grad).all(), f"{name} has a non-finite gradient"
        assert param.grad.abs().sum() > 0, f"{name} has an all-zero gradient"


def test_heatmap_head_coords_are_the_argmax() -> None:
    model = _model("heatmap", "bilstm", "loc").eval()
    with torch.no_grad():
        out = model(torch.randn(1, 1, 16, 16, 8))
    flat = out["heatmaps"].flatten(2).argmax(-1)[0, 5].item()
    assert out["coords"][0, 5].tolist() == [flat // (16 * 8), (flat // 8) % 16, flat % 8]


def test_variants_share_the_encoder() -> None:
    names = [{n for n, _ in _model(*v).named_parameters() if n.startswith(("enc", "bottleneck"))} for v in VARIANTS]
    assert all(n == names[0] for n in names) and len(names[0]) > 0
    assert "classifier" not in {n.split(".")[0] for n, _ in _model("integral", "bilstm", "loc").named_parameters()}
    assert _model("integral", "none-lstm", "loc+cls").classifier.lstm is None


@pytest.mark.parametrize("spatial", [(8, 16, 8), (16, 8, 24), (40, 16, 8)])
@pytest.mark.parametrize("loc_head", ["integral", "fc"])
def test_any_size_divisible_by_8_works(spatial: tuple[int, int, int], loc_head: str) -> None:
    out = _model(loc_head, "bilstm", "loc+cls")(torch.randn(1, 1, *spatial))
    assert out["coords"].shape == (1, 26, 3) and out["logits"].shape == (1, 26)


def test_smallest_crop_at_default_width() -> None:
    """8x8x8 leaves one bottleneck voxel; GroupNorm needs > 1 value per group, which the default
    widths give (a tiny width with one channel per group cannot train on it)."""
    out = build_model(ModelConfig())(torch.randn(1, 1, 8, 8, 8))
    assert out["coords"].shape == (1, 26, 3) and out["logits"].shape == (1, 26)


@pytest.mark.parametrize(
    "shape", [(1, 1, 12, 16, 16), (1, 1, 16, 16, 20), (2, 1, 16, 9, 16), (1, 2, 16, 16, 16), (1, 16, 16, 16)]
)
def test_bad_input_shape_raises(shape: tuple[int, ...]) -> None:
    model = _model("integral", "bilstm", "loc+cls")
    with pytest.raises(ValueError, match=str(shape).replace("(", r"\(").replace(")", r"\)")):
        model(torch.zeros(shape))


def test_bf16_autocast_outputs_float32() -> None:
    """Coordinates and logits come out float32 under bf16 autocast; the heatmaps stay in the
    dtype they were computed in (the losses that read them compute in float32 themselves)."""
    model = _model("integral", "bilstm", "loc+cls")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(1, 1, 16, 16, 16))
    assert out["coords"].dtype == out["logits"].dtype == torch.float32
    assert out["heatmaps"].dtype == torch.bfloat16
    out["coords"].sum().backward()


@pytest.mark.parametrize("loc_head", ["heatmap", "integral"])
def test_losses_of_bf16_heatmaps_are_float32_and_close(loc_head: str) -> None:
    from vertstudy.losses import total_loss

    model = _model(loc_head, "bilstm", "loc+cls")
    cfg = model.cfg
    x = torch.randn(2, 1, 16, 16, 16)
    batch = {"present": torch.ones(2, 26), "coords": torch.rand(2, 26, 3) * 15}
    loss_cfg = LossConfig(map_reg="js")
    with torch.no_grad():
        ref = total_loss(model(x), batch, loss_cfg, cfg)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        low = total_loss(out, batch, loss_cfg, cfg)
    assert low["reg"].dtype == torch.float32
    torch.testing.assert_close(low["reg"], ref["reg"], rtol=0.02, atol=0.02)


def test_default_parameter_count_is_documented() -> None:
    """The module docstring states these counts; update both together."""
    default = build_model(ModelConfig())
    fc = build_model(ModelConfig(loc_head="fc"))
    assert default.num_parameters() == 3_409_508
    assert fc.num_parameters() == 11_478_360
    for count in (default.num_parameters(), fc.num_parameters()):
        assert f"{count:,}" in network.__doc__
    assert default.channels == network.ENCODER_CHANNELS == (32, 64, 128, 256)


def test_activation_estimate_is_positive_and_linear_in_batch() -> None:
    model = _model("integral", "bilstm", "loc+cls")
    one, two, four = (estimate_activation_bytes(model, (b, 1, 16, 16, 16)) for b in (1, 2, 4))
    assert one > 0
    assert 1.8 < two / one <= 2.05 and 1.8 < four / two <= 2.05
    assert model.training


def test_integral_head_overfits_one_crop() -> None:
    torch.manual_seed(0)
    model = build_model(tiny(tasks="loc"))
    x = torch.randn(1, 1, 16, 16, 16)
    target = torch.rand(1, 26, 3, generator=torch.Generator().manual_seed(0)) * 11 + 2
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-2)  # gave >= 25x over seeds 0-5 when tuned
    losses = []
    for _ in range(100):
        loss = F.smooth_l1_loss(model(x)["coords"], target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 10, f"loss {losses[0]:.3f} -> {losses[-1]:.3f}"


LAYOUT_VARIANTS = [("integral", "bilstm", "loc+cls"), ("fc", "none-lstm", "loc"), ("heatmap", "bilstm", "loc+cls")]


@pytest.mark.parametrize(("loc_head", "classifier", "tasks"), LAYOUT_VARIANTS)
def test_conv_layout_changes_speed_not_results(loc_head: str, classifier: str, tasks: str) -> None:
    """``model.conv_layout`` auto, channels_last, channels_last_all and contiguous: same
    parameters, same outputs and gradients within float rounding (it only changes how the
    convolutions and, channels-last throughout, the GroupNorms run), and the same outputs
    without gradients (auto's inference path). 24 x 16 x 16 maps: the full-resolution
    GroupNorms of channels_last_all take the channels-last rows path."""
    results = {}
    for layout in ("auto", "channels_last", "channels_last_all", "contiguous"):
        torch.manual_seed(0)
        # the paper's soft-max (beta 1): beta 25 makes this tiny network's few ill-conditioned
        # gradients more so (a GroupNorm bias 26 % apart between layouts), which says nothing of layouts
        model = build_model(tiny(loc_head=loc_head, classifier=classifier, tasks=tasks, conv_layout=layout,
                                 softmax_beta=1.0))
        convs = [m for m in model.modules() if isinstance(m, network.Conv3d)]
        assert {m.layout for m in convs} == {layout}
        x = torch.randn(2, 1, 24, 16, 16, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            inference = model(x)
        out = model(x)
        _loss(out, torch.Generator().manual_seed(2)).backward()
        results[layout] = (out, inference, {n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    _, _, grads_ref = results["contiguous"]
    assert grads_ref
    for layout in ("auto", "channels_last", "channels_last_all"):
        for key in ("coords", "logits", "heatmaps"):
            for i in (0, 1):  # with and without gradients
                a, b = results[layout][i][key], results["contiguous"][i][key]
                if a is not None:
                    assert a.is_contiguous() or (layout == "channels_last_all" and key == "heatmaps")
                    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        grads = results[layout][2]
        assert grads.keys() == grads_ref.keys()
        for name in grads:
            if layout == "channels_last_all":
                # every kernel sums in another order: some of this tiny network's gradients are
                # ill-conditioned (measured against float64: contiguous, channels_last and
                # channels_last_all all 1-3 % off in the worst parameter), so compare by norm
                err = float((grads[name] - grads_ref[name]).norm() / grads_ref[name].norm().clamp_min(1e-6))
                assert err < 0.05, f"{name}: relative gradient difference {err:.3f}"
            else:
                torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-3, atol=1e-5, msg=name)


def test_bf16_training_keeps_activations_channels_last_and_learns() -> None:
    """Under bf16 CPU autocast, ``auto`` trains channels-last throughout: every GroupNorm sees a
    channels-last map (none does with ``contiguous``); the outputs agree with the contiguous
    layout in the same precision within bf16 rounding; and the integral head overfits one crop
    as in float32 (``test_integral_head_overfits_one_crop``). Gradients are not compared one by
    one: at initialisation this tiny network's are ill-conditioned (measured against float64:
    1-3 % off in float32 and far more in bf16, in every layout alike)."""
    from vertstudy.model.blocks import GroupNorm, is_channels_last

    outs, seen = {}, {}
    x = torch.randn(2, 1, 24, 16, 16, generator=torch.Generator().manual_seed(1))
    for layout in ("auto", "contiguous"):
        torch.manual_seed(0)
        model = build_model(tiny(conv_layout=layout))
        seen[layout] = []
        for m in model.modules():
            if isinstance(m, GroupNorm):
                m.register_forward_hook(lambda mod, inp, out, s=seen[layout]: s.append(is_channels_last(inp[0])))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outs[layout] = model(x)
    assert seen["auto"] and all(seen["auto"]) and not any(seen["contiguous"])
    for key in ("coords", "logits"):
        torch.testing.assert_close(outs["auto"][key], outs["contiguous"][key], rtol=0.05, atol=0.05)

    torch.manual_seed(0)
    model = build_model(tiny(tasks="loc"))
    target = torch.rand(1, 26, 3, generator=torch.Generator().manual_seed(0)) * 11 + 2
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-2)
    x = torch.randn(1, 1, 16, 16, 16)
    losses = []
    for _ in range(100):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            coords = model(x)["coords"]
        loss = F.smooth_l1_loss(coords, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 10, f"loss {losses[0]:.3f} -> {losses[-1]:.3f}"


def test_lstm_is_the_papers_128_or_follows_the_width() -> None:
    """The LSTM keeps the paper's 128 states at every width unless lstm_hidden is 'width'
    (128 x width, at least 8) or a number; a checkpoint's stored number and the resolved
    'width' are the same network."""
    assert ModelConfig().lstm_states == 128 and ModelConfig(width=0.25).lstm_states == 128
    assert ModelConfig(width=0.25, lstm_hidden="width").lstm_states == 32
    assert ModelConfig(width=0.03, lstm_hidden="width").lstm_states == 8
    assert ModelConfig(width=0.25, lstm_hidden=16).lstm_states == 16
    assert build_model(ModelConfig(width=0.25, lstm_hidden="width")).classifier.lstm.hidden_size == 32
    assert ModelConfig(width=0.25, lstm_hidden="width").same_network(
        ModelConfig(width=0.25, lstm_hidden=32, conv_layout="contiguous"))
    assert not ModelConfig(width=0.25, lstm_hidden="width").same_network(ModelConfig(width=0.25))
    for bad in (0, "half"):
        with pytest.raises(ValueError, match="lstm_hidden"):
            ModelConfig(lstm_hidden=bad)


def test_softmax_beta_sharpens_the_integral_heads_softmax() -> None:
    """``model.softmax_beta`` multiplies the integral head's logits before the soft-max (the
    ``heatmaps`` output is the scaled logits), same parameters, and 1 is the paper's head."""
    from vertstudy.model.integral import integral_regression

    x = torch.randn(1, 1, 16, 16, 16, generator=torch.Generator().manual_seed(3))
    outs = {}
    for beta in (1.0, 25.0):
        torch.manual_seed(0)
        model = build_model(tiny(tasks="loc", softmax_beta=beta)).eval()
        with torch.no_grad():
            outs[beta] = model(x)
        torch.testing.assert_close(outs[beta]["coords"], integral_regression(outs[beta]["heatmaps"]))
    torch.testing.assert_close(outs[25.0]["heatmaps"], 25.0 * outs[1.0]["heatmaps"], rtol=1e-5, atol=1e-6)
    assert ModelConfig().softmax_beta == 25.0  # the default; the paper's plain soft-max is 1
    assert not ModelConfig(softmax_beta=1).same_network(ModelConfig())
    with pytest.raises(ValueError, match="softmax_beta"):
        ModelConfig(softmax_beta=0)
