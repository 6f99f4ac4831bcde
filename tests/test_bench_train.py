"""``vertstudy bench train`` at a tiny size: real phantoms, the real DataLoader and training steps."""

from __future__ import annotations

import json
import math

import pytest

from vertstudy.cli import main


def test_bench_train_measures_the_configured_network(tmp_path, capsys) -> None:
    code = main(["bench", "train", "--width", "0.125", "--crop", "16", "16", "16", "--spacing-mm", "8",
                 "--steps", "2", "--no-memory", "--set", "model.lstm_hidden=8", "--set", "model.conv_layout=contiguous",
                 "--workdir", str(tmp_path), "--json"])
    assert code == 0
    figures = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert "model.lstm_hidden=8" in figures["throughput_config"]
    # the network measured is the one --set asks for: width 0.125 channels, an 8-state LSTM
    from vertstudy.config import ModelConfig
    from vertstudy.model.network import build_model

    expected = build_model(ModelConfig(width=0.125, lstm_hidden=8)).num_parameters()
    assert figures["params"] == expected
    for key in ("loader_crops_per_s", "model_crops_per_s", "achieved_gflop_per_s", "matmul_fp32_gflop_per_s"):
        assert math.isfinite(figures[key]) and figures[key] > 0, key
    assert 0 < figures["achieved_to_matmul_fraction"] < 1


def test_bench_train_refuses_a_bad_field_in_one_line(tmp_path, capsys) -> None:
    code = main(["bench", "train", "--steps", "1", "--no-memory", "--set", "model.lstm_hiden=8",
                 "--workdir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code != 0 and "lstm_hiden" in err and "Traceback" not in err


def test_bench_train_times_each_precision_side_by_side(tmp_path, capsys) -> None:
    """--precisions fp32 bf16: the same network's in-memory steps in each precision, and their
    ratio; the figures say which precision the configured run trained in."""
    from vertstudy.train.trainer import cpu_has_native_bf16

    code = main(["bench", "train", "--width", "0.125", "--crop", "16", "16", "16", "--spacing-mm", "8",
                 "--steps", "2", "--no-memory", "--set", "model.lstm_hidden=8", "--precisions", "fp32", "bf16",
                 "--workdir", str(tmp_path), "--json"])
    assert code == 0
    figures = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("model_crops_per_s_fp32", "model_crops_per_s_bf16", "bf16_to_fp32_speed"):
        assert math.isfinite(figures[key]) and figures[key] > 0, key
    ratio = figures["model_crops_per_s_bf16"] / figures["model_crops_per_s_fp32"]
    assert figures["bf16_to_fp32_speed"] == pytest.approx(ratio)
    assert figures["precision"] == ("bf16" if cpu_has_native_bf16() else "fp32")
    assert figures["cpu_native_bf16"] == cpu_has_native_bf16()
