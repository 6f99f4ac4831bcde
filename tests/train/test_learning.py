"""Evidence that the real network learns through the real trainer on real phantoms.

Three short-view coarse phantoms (2-4 vertebrae each) prepared at 4 mm; crops of 32 x 24 x 24
voxels (128 x 96 x 96 mm) centred on the spine without jitter or augmentation, so every crop
holds most of its case's vertebrae; width 0.25 with a one-layer 32-state LSTM; Adam at
lr 0.003 (0.01, the paper's, needs more steps at this scale), batch 2, 13 epochs of 24 steps.
This is the "can it fit a small data set" check, validated on fixed crops of the same cases.

Thresholds, from runs of exactly this set-up (seeded, one thread): the mean total loss goes
from 23.2 in epoch 1 to 3.75 in epoch 13 (6.2x; asserted: 4x; classification 7.9x, asserted
4x; regression 4.5x, asserted 2x); the crop-level localization error on the validation crops
from ~23 mm to ~7 mm (asserted: halved and < 10 mm) and the crop-level identification rate
from ~0.1 to ~0.9 (asserted: >= 0.75). Seeds 0 and 1 both pass every threshold.

The labeling issue's regression guard rides on the same runs: on 4 spine-centred crops per
case, the localization error of present vertebrae must be below half the error of always
predicting the crop centre on the same crops (measured: ~0.25 of it after 13 epochs; 0.4-0.5
after 10). About 20-30 s per seed on a 2-core machine, 40 s when the machine is busy.
"""

from __future__ import annotations

import pytest

from tests.synth import prepared_short_phantoms
from vertstudy.config import Config
from vertstudy.train.trainer import train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    return prepared_short_phantoms(tmp_path_factory.mktemp("learning-data"), cases=3, seed=1).cases


@pytest.mark.parametrize("seed", [0, 1])
def test_real_network_fits_a_few_phantoms(seed, cases, tmp_path, one_torch_thread):
    cfg = Config.model_validate(
        {
            # the paper's plain soft-max (softmax_beta 1), as when these thresholds were measured
            "model": {"width": 0.25, "lstm_hidden": 32, "lstm_layers": 1, "softmax_beta": 1.0},
            "data": {
                "prep": {"spacing_mm": 4.0},
                # the paper's crops (all on the spine) and loss (no map regulariser), as measured
                "crop": {"crop_size": (32, 24, 24), "crops_per_case": 16, "jitter_mm": 0.0, "anywhere_fraction": 0.0},
                "augment": {"enabled": False},
            },
            # float32, as measured; under bf16 (train.amp auto on a CPU with native bf16) the same
            # runs went 23.3 -> 6.1 (seed 0: the classification loss 2.1 -> 4.1 in the last epoch
            # alone) and 23.5 -> 2.6, with the same validation error and identification; no weight
            # average and plateau patience 5, the defaults when they were measured
            "train": {"epochs": 13, "lr": 0.003, "val_crops_per_case": 2, "amp": "off", "ema_decay": 0.0,
                      "schedule": {"patience": 5}},
            "loss": {"map_reg": "none"},
            "seed": seed,
        }
    )
    result = train(cfg, cases, cases, tmp_path)
    assert result.status == "completed"
    first, last = result.history[0], result.history[-1]
    assert last["loss"] < first["loss"] / 4
    assert last["loss_cls"] < first["loss_cls"] / 4 and last["loss_reg"] < first["loss_reg"] / 2
    assert last["val_loss"] < first["val_loss"] / 4
    assert last["val_loc_error_mm"] < min(first["val_loc_error_mm"] / 2, 10.0)
    assert last["val_id_rate"] >= 0.75
    # the labeling issue's regression guard: on spine-centred crops, the localization error of
    # present vertebrae is below half the error of always predicting the crop centre
    from vertstudy.infer.diagnose import crop_view
    from vertstudy.model.load import load_model

    model, cfg = load_model(result.last_checkpoint)
    view = crop_view(model, cfg, cases, crops_per_case=4)
    assert view["crop_loc_error_mm"] < view["crop_centre_error_mm"] / 2, view

