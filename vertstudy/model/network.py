"""The residual-block multi-label classification and localization network with integral
regression (Qin et al., "Residual block-based multi-label classification and localization
network with integral regression for vertebrae labeling", section II, Fig. 3-6).

Tensors are ``(B, C, D, H, W)`` with ``(D, H, W) = (z, y, x)``, z the body's long axis; the
input is a z-scored crop ``(B, 1, D, H, W)`` float32 with D, H, W each divisible by 8.

Architecture (channel widths at ``width=1``; every width is scaled by ``ModelConfig.width``
and rounded to a multiple of ``ModelConfig.groups`` by ``scaled_channels``):

- Shared encoder, bottom-up (6 residual modules, 3 max-poolings)::

      scale 1    res(1 -> 32)                   -> f0
      pool       res(32 -> 64)                  -> f1
      pool       res(64 -> 128)                 -> f2
      pool       res(128 -> 256)                -> f3
      scale 1/8  res(256 -> 256), res(256 -> 256) -> bottleneck b

  and 4 skip-out branches, one per scale, each a 1x1x1 conv + GroupNorm + ReLU on that scale's
  features (skip0: 32 -> 64, skip1: 64 -> 128, skip2: 128 -> 256, skip3: 256 -> 256), added
  element by element to the top-down branch at the same scale; the fourth (scale 1/8) is
  added to the bottleneck output, like the innermost skip of an hourglass. The skip-out
  branches only feed the top-down branch, so the fc head's variant has none.

- Localization branch, top-down (3 residual modules, 3 upsamplings, 2 convolutions)::

      x = b + skip3(f3)
      x = res(256 -> 128)(up(x) + skip2(f2))     scale 1/4
      x = res(128 -> 64)(up(x) + skip1(f1))      scale 1/2
      x = res(64 -> 32)(up(x) + skip0(f0))       scale 1
      heatmaps = conv1x1x1(32 -> 26)(conv3x3x3(32 -> 32) + GN + ReLU)

  ``up`` is nearest-neighbour x2. Then, by ``loc_head``:
  ``integral`` -> integral regression (``vertstudy.model.integral``, paper eq. 5-6) of the
  logits times ``softmax_beta`` (an inverse temperature, 1 in the paper; the ``heatmaps``
  output is then the scaled logits, the maps the soft-max and the losses see);
  ``heatmap`` -> raw heatmaps for a Gaussian-target L2 loss, coordinates by arg-max (Fig. 5b);
  ``fc`` -> no heatmaps: direct regression from the bottleneck (Fig. 5a), see below.

- Classification branch (paper II-C), on the bottleneck ``b`` (B, 256, D/8, H/8, W/8):
  conv 32 kernels 5x3x3 + GN + ReLU, conv 32 kernels 1x1x1 + GN + ReLU, then the one
  max-pooling: a max over the whole (y, x) plane, which turns the features into a sequence
  along the body axis, ``(B, D/8, 32)``, one 32-vector per z-slab of 8 voxels (16 mm). Three
  stacked bidirectional LSTMs (``lstm_hidden`` = 128 states per direction, at every width unless
  it is ``"width"``: ``ModelConfig.lstm_states``) run along z; the
  ``(B, D/8, 256)`` outputs are max-pooled over time (a vertebra is present if it is seen at
  any z, and this works for any crop depth) and a fully connected layer gives 26 logits.
  ``none-lstm``: the same convolutions and in-plane max, then the max over z, straight into
  the fully connected layer (32 -> 26).

- ``fc`` head (Fig. 5a): the bottleneck is average-pooled to a fixed 4x4x4 grid (any crop
  size), flattened, FC 16384 -> 512 + ReLU, FC 512 -> 78, and ``sigmoid * (size - 1)`` per
  axis gives (z, y, x) in crop voxels, so the output range follows the crop size.

Defaults (width 1, groups 4, lstm_hidden 128, 3 LSTM layers): 3,409,508 parameters with the
integral (or heatmap) head and the BiLSTM classifier: encoder 1.72 M, skip-out branches and
top-down branch 0.36 M, classification branch 1.33 M (0.37 M without the LSTMs). The fc head
variant has 11,478,360 (its first FC layer alone is 8.4 M).

Activation memory (tensors saved for backward, measured with :func:`estimate_activation_bytes`,
integral head + BiLSTM, batch 2, crop 104 x 80 x 80): 4.59 GB in fp32 and 2.64 GB under bf16
autocast (measured on CPU). It is linear in batch size (2.30 GB fp32 at batch 1); ``width``
0.5 roughly halves it (2.37 GB fp32). The bf16 figure relies on ``blocks.GroupNorm`` keeping
bf16 input in bf16: with CUDA autocast's default float32 GroupNorm it would be ~4.96 GB, more
than fp32. Parameters, gradients and Adam state add ~55 MB, so batch 2 fits an 11 GB GPU with
room for the backward pass's transient gradients and cuDNN workspaces.

Weight init: Kaiming-normal (fan_out, ReLU) for convolutions, GroupNorm gamma 1 / beta 0, the
last heatmap convolution normal(std 1e-3) with zero bias, so every softmax starts almost
uniform and the integral head starts at the crop centre (times the default ``softmax_beta`` 25,
measured at width 0.25 on a 48 x 32 x 32 crop: logits' std 0.04 per map, no voxel above 1.5x
the uniform probability); the fc head's last layer likewise
normal(std 1e-3), zero bias (also the centre). Small rather than zero, so that every upstream
parameter gets a gradient from the first step; for the same reason, no zero-init of the
residual branches' last GroupNorm gamma (the network is shallow enough not to need it). LSTMs
and the classifier's FC keep PyTorch's default init.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vertstudy.anatomy import NUM_CLASSES
from vertstudy.config import ModelConfig
from vertstudy.model.blocks import Conv3d, ConvNormAct, ResidualModule, scaled_channels
from vertstudy.model.integral import argmax_coordinates, integral_regression

#: Channels at scales 1, 1/2, 1/4, 1/8 at ``width=1`` (before rounding to ``groups``).
ENCODER_CHANNELS: tuple[int, int, int, int] = (32, 64, 128, 256)
#: Kernels of the classification branch's two convolutions (paper: 32).
CLASSIFIER_CHANNELS = 32
#: The fc head's pooled grid and hidden width.
FC_GRID: tuple[int, int, int] = (4, 4, 4)
FC_HIDDEN = 512
#: Number of max-poolings; every input axis must be divisible by 2 ** DEPTH.
DEPTH = 3


# -- heads ---------------------------------------------------------------------------------------
class SequenceClassifier(nn.Module):
    """Paper II-C: bottleneck ``(B, C, d, h, w)`` -> 26 logits ``(B, 26)``.

    Two convolutions (5x3x3 and 1x1x1), in-plane max-pooling to a z-sequence ``(B, d, c)``, then
    ``lstm_layers`` bidirectional LSTMs along z, max over z and a fully connected layer. With
    ``use_lstm=False`` (ablation "none-lstm") the sequence is max-pooled over z straight away.
    """

    def __init__(
        self, in_channels: int, channels: int, groups: int, use_lstm: bool, lstm_hidden: int, lstm_layers: int
    ) -> None:
        super().__init__()
        self.convs = nn.Sequential(
            ConvNormAct(in_channels, channels, (5, 3, 3), groups),
            ConvNormAct(channels, channels, 1, groups),
        )
        self.lstm = (
            nn.LSTM(channels, lstm_hidden, num_layers=lstm_layers, batch_first=True, bidirectional=True)
            if use_lstm
            else None
        )
        self.fc = nn.Linear(2 * lstm_hidden if use_lstm else channels, NUM_CLASSES)

    def forward(self, bottleneck: Tensor) -> Tensor:
        feats = self.convs(bottleneck)  # (B, c, d, h, w)
        seq = feats.amax(dim=(3, 4)).transpose(1, 2)  # (B, d, c): one vector per z-slab
        if self.lstm is not None:
            # The LSTMs are tiny (d = D / 8 steps): run them in float32 outside autocast, which
            # also avoids oneDNN's CPU LSTM failing on mixed-dtype input under CPU autocast.
            with torch.autocast(device_type=seq.device.type, enabled=False):
                seq, _ = self.lstm(seq.float())  # (B, d, 2 * hidden)
        return self.fc(seq.amax(dim=1)).float()


class DirectRegressionHead(nn.Module):
    """Paper Fig. 5a: bottleneck ``(B, C, d, h, w)`` -> coordinates ``(B, 26, 3)`` (z, y, x).

    Average-pools to ``FC_GRID`` (so any crop size works), two fully connected layers, and
    ``sigmoid * (size - 1)`` per axis, ``size`` being the crop's ``(D, H, W)``.
    """

    def __init__(self, in_channels: int, hidden: int = FC_HIDDEN, grid: Sequence[int] = FC_GRID) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool3d(tuple(grid))
        self.fc1 = nn.Linear(in_channels * math.prod(grid), hidden)
        self.fc2 = nn.Linear(hidden, NUM_CLASSES * 3)

    def forward(self, bottleneck: Tensor, crop_size: Sequence[int]) -> Tensor:
        hidden = F.relu(self.fc1(self.pool(bottleneck).flatten(1)))
        unit = torch.sigmoid(self.fc2(hidden).float()).view(-1, NUM_CLASSES, 3)
        scale = torch.tensor([s - 1 for s in crop_size], dtype=unit.dtype, device=unit.device)
        return unit * scale


# -- the network ---------------------------------------------------------------------------------
class VertebraNet(nn.Module):
    """Shared encoder + localization branch (+ classification branch), paper Fig. 3.

    ``forward(x)`` with ``x`` ``(B, 1, D, H, W)`` float32, D, H, W divisible by 8, returns a dict:

    - ``"coords"``: ``(B, 26, 3)`` float32, crop voxel units ``(z, y, x)``;
    - ``"logits"``: ``(B, 26)`` float32 pre-sigmoid logits, or None when ``tasks == "loc"``;
    - ``"heatmaps"``: ``(B, 26, D, H, W)`` raw heatmap logits in the dtype they were computed in
      (bf16 under bf16 autocast; the losses compute in float32 themselves), or None for the fc
      head.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        g = cfg.groups
        c0, c1, c2, c3 = (scaled_channels(c, cfg.width, g) for c in ENCODER_CHANNELS)
        self.channels = (c0, c1, c2, c3)

        # shared encoder: 6 residual modules, 3 max-poolings
        self.enc0 = ResidualModule(1, c0, g)
        self.enc1 = ResidualModule(c0, c1, g)
        self.enc2 = ResidualModule(c1, c2, g)
        self.enc3 = ResidualModule(c2, c3, g)
        self.bottleneck = nn.Sequential(ResidualModule(c3, c3, g), ResidualModule(c3, c3, g))
        self.pool = nn.MaxPool3d(2)

        # localization branch: skip-out branches + top-down path, or the fc head
        self.fc_head: DirectRegressionHead | None = None
        if cfg.loc_head == "fc":
            self.fc_head = DirectRegressionHead(c3)
        else:
            self.skip0 = ConvNormAct(c0, c1, 1, g)
            self.skip1 = ConvNormAct(c1, c2, 1, g)
            self.skip2 = ConvNormAct(c2, c3, 1, g)
            self.skip3 = ConvNormAct(c3, c3, 1, g)
            self.dec2 = ResidualModule(c3, c2, g)
            self.dec1 = ResidualModule(c2, c1, g)
            self.dec0 = ResidualModule(c1, c0, g)
            self.heatmap_conv = ConvNormAct(c0, c0, 3, g)
            self.heatmap_out = Conv3d(c0, NUM_CLASSES, 1)

        # classification branch
        self.classifier: SequenceClassifier | None = None
        if cfg.tasks == "loc+cls":
            self.classifier = SequenceClassifier(
                c3,
                scaled_channels(CLASSIFIER_CHANNELS, cfg.width, g),
                g,
                use_lstm=cfg.classifier == "bilstm",
                lstm_hidden=cfg.lstm_states,
                lstm_layers=cfg.lstm_layers,
            )
        self._init_weights()
        self.set_conv_layout(cfg.conv_layout)

    def set_conv_layout(self, layout: str) -> None:
        """Run every convolution in ``layout`` (``auto``, ``channels_last``, ``channels_last_all``
        or ``contiguous``; see :class:`vertstudy.model.blocks.Conv3d`, which keeps 1x1x1
        convolutions contiguous under ``channels_last``: memory-bound, measured slower
        channels-last in float32)."""
        for m in self.modules():
            if isinstance(m, Conv3d):
                m.layout = layout

    def forward_features(self, x: Tensor) -> list[Tensor]:
        """Encoder: ``x (B, 1, D, H, W)`` -> ``[f0, f1, f2, f3, b]``, scales 1, 1/2, 1/4, 1/8, 1/8.

        ``b`` is the bottleneck (high-level features, ``(B, c3, D/8, H/8, W/8)``).
        """
        f0 = self.enc0(x)
        f1 = self.enc1(self.pool(f0))
        f2 = self.enc2(self.pool(f1))
        f3 = self.enc3(self.pool(f2))
        return [f0, f1, f2, f3, self.bottleneck(f3)]

    def forward_heatmaps(self, feats: Sequence[Tensor]) -> Tensor:
        """Top-down branch: encoder features -> heatmap logits ``(B, 26, D, H, W)``."""
        f0, f1, f2, f3, b = feats
        x = b + self.skip3(f3)
        x = self.dec2(_up(x) + self.skip2(f2))
        x = self.dec1(_up(x) + self.skip1(f1))
        x = self.dec0(_up(x) + self.skip0(f0))
        return self.heatmap_out(self.heatmap_conv(x))

    def forward_heads(self, feats: Sequence[Tensor], crop_size: Sequence[int]) -> dict[str, Tensor | None]:
        """Localization and classification heads on the encoder features; see the class docstring."""
        bottleneck = feats[-1]
        heatmaps: Tensor | None = None
        if self.fc_head is not None:
            coords = self.fc_head(bottleneck, crop_size)
        else:
            heatmaps = self.forward_heatmaps(feats)
            if self.cfg.loc_head == "integral":
                if self.cfg.softmax_beta != 1.0:
                    heatmaps = heatmaps * self.cfg.softmax_beta  # the maps the soft-max sees (and the losses)
                coords = integral_regression(heatmaps)
            else:
                coords = argmax_coordinates(heatmaps)
        logits = self.classifier(bottleneck) if self.classifier is not None else None
        return {"coords": coords.float(), "logits": logits, "heatmaps": heatmaps}

    def forward(self, x: Tensor) -> dict[str, Tensor | None]:
        check_input_shape(x.shape)
        return self.forward_heads(self.forward_features(x), tuple(x.shape[2:]))

    def num_parameters(self, trainable_only: bool = True) -> int:
        """Number of (trainable) parameters."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.GroupNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if self.fc_head is None:
            nn.init.normal_(self.heatmap_out.weight, std=1e-3)
            nn.init.zeros_(self.heatmap_out.bias)
        else:
            nn.init.normal_(self.fc_head.fc2.weight, std=1e-3)
            nn.init.zeros_(self.fc_head.fc2.bias)


def _up(x: Tensor) -> Tensor:
    return F.interpolate(x, scale_factor=2, mode="nearest")


def check_input_shape(shape: Sequence[int]) -> None:
    """Raise ValueError unless ``shape`` is ``(B, 1, D, H, W)`` with D, H, W divisible by 8."""
    shape = tuple(int(s) for s in shape)
    factor = 2**DEPTH
    if len(shape) != 5 or shape[1] != 1:
        raise ValueError(f"input must be (B, 1, D, H, W), got shape {shape}")
    if any(s % factor or s == 0 for s in shape[2:]):
        raise ValueError(
            f"input shape {shape}: D, H, W = {shape[2:]} must each be a positive multiple of {factor} "
            f"({DEPTH} max-poolings)"
        )


# -- measurement ---------------------------------------------------------------------------------
def estimate_activation_bytes(
    model: nn.Module, input_shape: Sequence[int], autocast_dtype: torch.dtype | None = None
) -> int:
    """Bytes of activations saved for backward by one training forward pass of ``model``.

    Runs ``model(torch.randn(input_shape))`` on the model's device with grad enabled, in train
    mode, and sums the storage sizes of every tensor autograd saves for backward (hooked with
    ``torch.autograd.graph.saved_tensors_hooks``), each storage counted once and parameters
    excluded. ``autocast_dtype`` (e.g. ``torch.bfloat16``) runs the pass under autocast on the
    model's device type. Excludes parameters, gradients, optimizer state, the allocator's
    caching and cuDNN workspaces. The model's train/eval mode is restored.
    """
    param = next(model.parameters())
    device = param.device
    param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in param_storages and t.device.type != "meta":
            seen[ptr] = max(seen.get(ptr, 0), storage.nbytes())
        return t

    was_training = model.training
    model.train()
    x = torch.randn(tuple(input_shape), device=device)
    try:
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
                out = model(x)
        del out
    finally:
        model.train(was_training)
    return sum(seen.values())


# -- factory -------------------------------------------------------------------------------------
def build_model(cfg: ModelConfig) -> VertebraNet:
    """The network for ``cfg`` (all ablation variants share the encoder)."""
    return VertebraNet(cfg)
