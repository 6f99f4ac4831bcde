"""The one typed config: dotted names, nested values, precise one-line errors."""

from __future__ import annotations

import pytest

from vertstudy.config import Config, PrepConfig, load_config, validated
from vertstudy.errors import ConfigError


def test_defaults_follow_the_paper():
    cfg = load_config()
    assert cfg.data.prep.spacing_mm == 2.0 and cfg.data.prep.hu_min == -1000.0
    assert cfg.data.crop.crop_size == (104, 80, 80)


def test_every_section_takes_dotted_names():
    cfg = load_config({"model.width": 0.5, "loss.balance_b": 2.5, "train.schedule.kind": "cosine", "seed": 3})
    assert (cfg.model.width, cfg.loss.balance_b, cfg.train.schedule.kind, cfg.seed) == (0.5, 2.5, "cosine", 3)


def test_dotted_and_nested_names_agree():
    a = load_config({"data.prep.spacing_mm": 3, "data.crop.crop_size": [64, 48, 48]})
    b = load_config({"data": {"prep": {"spacing_mm": 3.0}, "crop": {"crop_size": (64, 48, 48)}}})
    assert a == b and isinstance(a, Config)
    assert a.data.crop.crop_size == (64, 48, 48)


@pytest.mark.parametrize(
    "values, field, fragment",
    [
        ({"data.prep.spacng_mm": 3}, "data.prep.spacng_mm", "Extra inputs are not permitted"),
        ({"data.prep.spacing_mm": -1}, "data.prep.spacing_mm", "greater than 0"),
        ({"data.crop.crop_size": [4, 80, 80]}, "data.crop.crop_size", ">= 8 voxels"),
        ({"data.augment.rotate_deg": "lots"}, "data.augment.rotate_deg", "valid number"),
    ],
)
def test_errors_name_field_value_and_rule(values, field, fragment):
    with pytest.raises(ConfigError) as info:
        load_config(values, where="study.yaml")
    msg = str(info.value)
    assert msg.startswith("study.yaml: field ") and repr(field) in msg and fragment in msg
    assert "\n" not in msg
    bad = next(iter(values.values()))
    assert repr(bad) in msg


def test_validated_wraps_any_model():
    assert validated(PrepConfig, "--spacing-mm", spacing_mm=1.5).spacing_mm == 1.5
    with pytest.raises(ConfigError, match="--spacing-mm: field 'spacing_mm' = 0"):
        validated(PrepConfig, "--spacing-mm", spacing_mm=0)


def test_train_amp_accepts_old_booleans_and_resolves_per_device() -> None:
    """``true``/``false`` of older study files and checkpoints keep their meaning (bf16 on CUDA
    only / float32); ``auto`` trains bf16 on CUDA and on CPUs with native bf16."""
    import torch

    from vertstudy.train.trainer import cpu_has_native_bf16, training_precision

    assert load_config({"train.amp": True}).train.amp == "cuda"
    assert load_config({"train.amp": False}).train.amp == "off"
    assert Config().train.amp == "auto"
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert training_precision(cpu, "cuda") == training_precision(cpu, "off") == "fp32"
    assert training_precision(cuda, "cuda") == training_precision(cuda, "auto") == "bf16"
    assert training_precision(cuda, "off") == "fp32"
    assert training_precision(cpu, "always") == "bf16"
    # YAML reads on / off as booleans: on would mean the old true (CUDA only), hence "always"
    from vertstudy.cli import _overrides

    assert load_config(_overrides(["train.amp=on"])).train.amp == "cuda"
    assert load_config(_overrides(["train.amp=always"])).train.amp == "always"
    assert training_precision(cpu, "auto") == ("bf16" if cpu_has_native_bf16() else "fp32")
    with pytest.raises(ConfigError, match="train.amp"):
        load_config({"train.amp": "sometimes"})
