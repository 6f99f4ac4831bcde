"""The one typed configuration of vertstudy, validated once where it enters.

Every tunable value is a field here; a study (YAML) or a Ray trial config (dict with dotted
names) is turned into a :class:`Config` by :func:`load_config`, and everything below takes
the typed parts it needs. Units: millimetres, voxels, Hounsfield units, as named.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from vertstudy.errors import ConfigError


class StrictModel(BaseModel):
    """Base of every validated record: unknown fields refused, values immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class PrepConfig(StrictModel):
    """Preprocessing (paper III-A): canonical orientation, isotropic resampling, HU clamp, z-score."""

    spacing_mm: float = Field(2.0, gt=0, le=10, description="isotropic output spacing, mm")
    hu_min: float = Field(-1000.0, description="HU below this (air) are clamped to it")
    antialias: bool = Field(True, description="Gaussian pre-smoothing when downsampling")


class AugmentConfig(StrictModel):
    """Light augmentation of training crops; targets move with the image."""

    enabled: bool = True
    rotate_deg: float = Field(8.0, ge=0, le=45, description="max rotation about each axis, degrees")
    scale: float = Field(0.08, ge=0, lt=0.5, description="max relative isotropic scaling")
    intensity_scale: float = Field(0.1, ge=0, lt=1, description="max relative intensity scaling")
    intensity_shift: float = Field(0.1, ge=0, lt=2, description="max intensity shift, z-score units")


class CropConfig(StrictModel):
    """Random crops along the spine (paper Fig. 7)."""

    crop_size: tuple[int, int, int] = Field((104, 80, 80), description="(z, y, x) voxels at spacing_mm")
    jitter_mm: float = Field(40.0, ge=0, description="random offset of the crop centre from the spine, mm")
    crops_per_case: int = Field(4, ge=1, description="training crops drawn per case per epoch")
    anywhere_fraction: float = Field(
        0.0, ge=0, le=1,
        description="fraction of training crops centred uniformly anywhere in the volume instead of on the "
        "spine, so the classifier learns absence (paper: 0, every crop on the spine)",
    )

    @field_validator("crop_size")
    @classmethod
    def _positive(cls, v: tuple[int, int, int]) -> tuple[int, int, int]:
        if any(s < 8 for s in v):
            raise ValueError(f"every crop axis must be >= 8 voxels, got {v}")
        return v


class DataConfig(StrictModel):
    prep: PrepConfig = PrepConfig()
    crop: CropConfig = CropConfig()
    augment: AugmentConfig = AugmentConfig()


class ModelConfig(StrictModel):
    """The network (paper II-A, Fig. 3-4) and its ablation variants (paper tables I-III).

    Channel widths are the defaults documented in ``vertstudy.model.network`` times ``width``;
    the LSTM's hidden size is the paper's 128 unless ``lstm_hidden`` says otherwise
    (:attr:`lstm_states`).
    """

    @field_validator("lstm_hidden")
    @classmethod
    def _positive_lstm(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v < 1:
            raise ValueError(f"must be >= 1 or 'width', got {v}")
        return v

    width: float = Field(1.0, gt=0, le=4, description="multiplies every channel width")
    groups: int = Field(4, ge=1, description="GroupNorm groups (paper: 4)")
    loc_head: Literal["integral", "heatmap", "fc"] = "integral"
    classifier: Literal["bilstm", "none-lstm"] = "bilstm"
    tasks: Literal["loc", "loc+cls"] = "loc+cls"
    lstm_hidden: int | Literal["width"] = Field(
        128,
        description="hidden states per LSTM direction (paper: 128 at every width), or 'width': 128 x width, at least "
        "8 (measured on phantoms at width 0.25: 32 states labelled worse than 128 on both seeds)",
    )
    lstm_layers: int = Field(3, ge=1, description="stacked bidirectional LSTMs (paper: 3)")
    heatmap_sigma_vox: float = Field(2.0, gt=0, description="Gaussian target sigma of the heatmap head, voxels")
    softmax_beta: float = Field(
        25.0, gt=0, le=1000,
        description="integral head: inverse temperature of the soft-max over each map (eq. 5 with logits x beta, in "
        "training and inference alike; mmpose's debiased integral head uses 10, NVlabs DREAM learns one from 25); "
        "1 is the paper. Measured (bench learn, 3,200 crops, 12 held-out phantoms, seeds 0 and 1): beta 25 "
        "labelled 53.9 / 55.9 % against 41.3 / 41.7 % with beta 1",
    )
    conv_layout: Literal["auto", "channels_last", "channels_last_all", "contiguous"] = Field(
        "auto",
        description="memory layout the convolutions run in: channels_last = k > 1 convolutions channels-last, "
        "activations contiguous between them; channels_last_all = every activation channels-last (bf16's native "
        "layout on the CPU); auto = channels_last_all while training under bf16 on the CPU, channels_last while "
        "training otherwise (both measured faster forward + backward on the CPU), contiguous for inference "
        "(measured faster forward alone); the same outputs within float rounding, so a checkpoint resumes under any",
    )

    @property
    def lstm_states(self) -> int:
        """Hidden states per LSTM direction: ``lstm_hidden``, or for ``"width"``
        ``max(8, round(128 * width))``."""
        return self.lstm_hidden if isinstance(self.lstm_hidden, int) else max(8, round(128 * self.width))

    def same_network(self, other: ModelConfig) -> bool:
        """Whether ``other`` builds the same network (parameters and what they compute): equal
        but for ``conv_layout``, with the LSTM size resolved (:attr:`lstm_states`)."""
        def key(cfg: ModelConfig) -> ModelConfig:
            return cfg.model_copy(update={"conv_layout": "auto", "lstm_hidden": cfg.lstm_states})
        return key(self) == key(other)


class LossConfig(StrictModel):
    """Paper eq. 1-4: L = L_cls + L_reg."""

    balance_b: float = Field(3.0, gt=0, description="balance factor B of the positive terms (paper: 2-4)")
    reg_lambda: float = Field(0.4, ge=0, description="weight lambda of the smooth-L1 regression (paper: 0.4)")
    map_reg: Literal["none", "js"] = Field(
        "js",
        description="integral head: divergence term pulling each present class's soft-max map toward a Gaussian at "
        "its target (dsntnn's js_reg_losses); 'none' is the paper",
    )
    map_reg_weight: float = Field(
        8.0, ge=0,
        description="weight of the map divergence term (per present vertebra; nats against a smooth-L1 in voxels "
        "times lambda: dsntnn's weight 1 against coordinates in [-1, 1] is about lambda * W / 2 = 6-10 here). "
        "Measured with beta 25 (bench learn, 3,200 crops, seeds 0 and 1): 66.1 / 54.3 % and 9.7 / 13.6 mm against "
        "53.9 / 55.9 % and 12.9 / 14.6 mm without the term",
    )
    map_reg_sigma_vox: float = Field(1.0, gt=0, description="sigma of the Gaussian target map, voxels")


class ScheduleConfig(StrictModel):
    """Learning-rate schedule: the paper's plateau schedule, or cosine / step for the search."""

    kind: Literal["plateau", "cosine", "step"] = "plateau"
    factor: float = Field(0.4, gt=0, lt=1, description="plateau: lr multiplier when the validation loss stalls")
    patience: int = Field(
        15, ge=0,
        description="plateau: epochs without improvement before reducing (the paper gives none; 5 here before "
        "issue 24: on 80-crop epochs it floored the lr at 1e-6 within 10 minutes, see train.ema_decay)",
    )
    min_lr: float = Field(1e-6, ge=0, description="floor of every schedule")
    step_size: int = Field(10, ge=1, description="step: epochs between reductions")
    gamma: float = Field(0.5, gt=0, lt=1, description="step: lr multiplier per step")


class TrainConfig(StrictModel):
    """Trainer (paper III-B): Adam, batch 2, weight decay, a schedule on the validation loss."""

    lr: float = Field(0.01, gt=0, description="initial learning rate (paper: 0.01)")
    weight_decay: float = Field(1e-4, ge=0)
    batch_size: int = Field(2, ge=1)
    epochs: int = Field(50, ge=1)
    schedule: ScheduleConfig = ScheduleConfig()
    val_crops_per_case: int = Field(2, ge=1, description="fixed validation crops per held-out case")
    workers: int = Field(0, ge=0, description="DataLoader worker processes")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: Literal["auto", "always", "cuda", "off"] = Field(
        "auto",
        description="bf16 autocast while training: auto = on CUDA and on CPUs with native bf16 (AVX-512 BF16 or "
        "AMX), always = on any device (emulated, slow, on a CPU without native bf16), cuda = on CUDA only (what "
        "`true` meant before), off = float32 everywhere (`false`). The soft-max, integral regression, losses and "
        "LSTMs run in float32 either way. A run-only field: a trial's resolved precision is its `precision` column",
    )
    grad_clip: float | None = Field(None, gt=0, description="max gradient norm, or None")
    whole_ct_every: int = Field(
        0, ge=0,
        description="every k epochs, label the validation cases' whole CTs (val_ct_id_rate, val_ct_loc_error_mm); "
        "0: never",
    )
    ema_decay: float = Field(
        0.998, ge=0, lt=1,
        description="exponential moving average of the weights, updated after every step with decay "
        "min(ema_decay, (1 + t) / (10 + t)) at step t: validation, whole-CT validation, the schedule and best.pt "
        "see the averaged weights (last.pt keeps both, for resuming); 0: off, the paper. Measured with plateau "
        "patience 15 against 0 and patience 5 (bench learn --crops 8000, training seeds 0 and 1): 90.2 / 72.0 % "
        "and 5.6 / 9.8 mm against 79.1 / 52.4 % and 8.8 / 14.0 mm",
    )
    select_on: Literal["val_loss", "val_ct"] = Field(
        "val_loss",
        description="what best.pt keeps: the lowest validation crop loss (paper) or the best whole-CT validation "
        "(highest id rate, then lowest error; needs whole_ct_every)",
    )
    whole_ct_tiles_per_crop: int = Field(
        2, ge=0, le=16,
        description="the whole-CT validations tile at crop_size / this voxels per axis (2: half a crop), coarser "
        "and several times cheaper than the held-out labelling (infer.tiles_per_crop); 0: infer.stride",
    )


    @field_validator("amp", mode="before")
    @classmethod
    def _amp_from_bool(cls, v: Any) -> Any:
        """``true`` / ``false`` of study files and checkpoints written before ``auto`` existed keep
        their meaning: bf16 on CUDA only / float32 everywhere. (YAML also reads ``on`` / ``off``
        as these booleans, which is why the value for "everywhere" is ``always``, not ``on``.)"""
        if isinstance(v, bool):
            return "cuda" if v else "off"
        return v

    @model_validator(mode="after")
    def _selection_needs_whole_ct(self) -> TrainConfig:
        if self.select_on == "val_ct" and self.whole_ct_every == 0:
            raise ValueError(
                "train.select_on = 'val_ct' needs train.whole_ct_every > 0 (epochs between whole-CT validations)"
            )
        return self


class InferConfig(StrictModel):
    """Whole-CT inference (paper III-B, test phase)."""

    stride: tuple[int, int, int] = Field(
        (52, 40, 40),
        description="tile stride (z, y, x) voxels; a study or bench learn that leaves it unset derives it from the "
        "crop (tiles_per_crop)",
    )
    tiles_per_crop: int = Field(
        4, ge=1, le=16,
        description="where infer.stride is left unset (studies, bench learn): tiles start every crop_size / this "
        "voxels along each axis, so about this many tiles per axis see each point (2: half a crop, the default "
        "before 2026-12-07; 4: a quarter, about 3.8x the tiles' time)",
    )
    batch_size: int = Field(4, ge=1)
    threshold: float = Field(0.5, gt=0, lt=1, description="class probability to keep a crop's coordinate")
    min_votes: int = Field(1, ge=1, description="crops that must vote for a class before it is predicted")
    decoder: Literal["kmeans", "sequence"] = Field(
        "sequence",
        description="'kmeans': the paper's per-class 2-means; 'sequence': at most one centroid per class in "
        "anatomical order with plausible spacing (dynamic programming over all votes)",
    )
    centre_weight: float = Field(
        1.0, ge=0, le=8,
        description="a centroid averages its votes weighted by probability times the vote's centrality in its tile "
        "(1 at the centre, towards 0 at a face) to this power; 0: by probability alone (the paper's). Measured on "
        "7 checkpoints at a quarter-crop stride, 1 against 0: error lower on 6 (e.g. 3.47 -> 3.18 mm)",
    )
    kmeans_threshold: float | None = Field(
        0.9, gt=0, lt=1,
        description="K-means decoder: class probability a vote needs (votes below infer.threshold are never cast, "
        "so the higher of the two applies); null: infer.threshold (0.5, the paper's). Chosen on the 24 training "
        "and validation phantoms of two bench learn checkpoints (`vertstudy diagnose --sweep`), their 12 held-out "
        "phantoms labelled once: "
        "68.5 -> 81.5 % and 65.0 -> 77.2 % with kmeans_centre_weight 8",
    )
    kmeans_centre_weight: float | None = Field(
        8.0, ge=0, le=8,
        description="K-means decoder: infer.centre_weight for its centroids; null: infer.centre_weight (0 is the "
        "paper's probability-weighted mean)",
    )
    skip_empty_tiles: bool = Field(True, description="skip tiles that hold (almost) no body")
    body_fraction: float = Field(
        0.02, ge=0, lt=1, description="a tile with less than this fraction of voxels above air is skipped"
    )
    seq_radius_mm: float = Field(
        10.0, gt=0, description="sequence decoder: votes within this distance (mm) of a candidate support it"
    )
    seq_min_score: float = Field(
        0.1, ge=0, lt=1,
        description="sequence decoder: a candidate's label score (mean probability over the tiles that see it) must "
        "exceed this to be worth predicting",
    )
    seq_pair_weight: float = Field(
        0.02, ge=0, description="sequence decoder: weight of the spacing prior's log-likelihood against the scores"
    )


class Config(StrictModel):
    """Top-level configuration: one field per pipeline stage."""

    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    loss: LossConfig = LossConfig()
    train: TrainConfig = TrainConfig()
    infer: InferConfig = InferConfig()
    seed: int = 0


def derived_stride(crop_size, tiles_per_crop: int) -> tuple[int, int, int]:
    """The tile stride (z, y, x) voxels that starts ``tiles_per_crop`` tiles per crop length along
    each axis of a ``crop_size`` (z, y, x) tile: ``max(1, c // tiles_per_crop)``."""
    return tuple(max(1, int(c) // int(tiles_per_crop)) for c in crop_size)


def with_derived_stride(cfg: Config) -> Config:
    """``cfg`` with ``infer.stride`` derived from its crop and ``infer.tiles_per_crop``
    (:func:`derived_stride`): what a study or ``bench learn`` that leaves the stride unset runs."""
    stride = derived_stride(cfg.data.crop.crop_size, cfg.infer.tiles_per_crop)
    return cfg.model_copy(update={"infer": cfg.infer.model_copy(update={"stride": stride})})


def load_config(values: dict[str, Any] | None = None, where: str = "config") -> Config:
    """Build a validated :class:`Config` from nested or dotted-name values.

    ``{"data.prep.spacing_mm": 3}`` and ``{"data": {"prep": {"spacing_mm": 3}}}`` are the same.
    Raises ``ConfigError`` naming ``where``, the field, the bad value and what is accepted.
    """
    nested: dict[str, Any] = {}
    for key, value in (values or {}).items():
        parts = str(key).split(".")
        node = nested
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{where}: field {key!r} conflicts with a value set for {part!r}")
        if isinstance(value, dict) and isinstance(node.get(parts[-1]), dict):
            node[parts[-1]].update(value)
        else:
            node[parts[-1]] = value
    return validated(Config, where, **nested)


def validated(schema: type[BaseModel], where: str, /, **values: Any) -> Any:
    """``schema(**values)``, with a validation failure turned into a one-line ``ConfigError``
    naming ``where``, the field, the bad value and what is accepted."""
    try:
        return schema.model_validate(values)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"])
        if not field:  # a whole-model check names its fields itself
            raise ConfigError(f"{where}: {err['msg'].removeprefix('Value error, ')}") from None
        bad = err.get("input")
        raise ConfigError(f"{where}: field {field!r} = {bad!r}: {err['msg']}") from None


def flat_config(cfg: Config) -> dict[str, Any]:
    """``{"loss.balance_b": 3.0, ...}``: every leaf of ``cfg`` by its dotted name (tuples as lists)."""
    out: dict[str, Any] = {}

    def walk(node: dict, prefix: str) -> None:
        for k, v in node.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            else:
                out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v

    walk(cfg.model_dump(), "")
    return out
