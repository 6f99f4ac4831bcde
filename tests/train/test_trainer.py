"""The trainer's contract: epoch records, schedules, divergence, checkpoints, bit-exact resume.

Real network (tiny: width 0.25, a one-layer 8-state LSTM) on real coarse phantoms prepared at
4 mm, with 16^3-voxel crops, so an epoch takes a fraction of a second.
"""

from __future__ import annotations

import ast
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import vertstudy
from tests.synth import prepared_short_phantoms
from vertstudy.anatomy import REGIONS
from vertstudy.checkpoint import load_checkpoint
from vertstudy.config import Config, TrainConfig
from vertstudy.errors import ConfigError, InputError
from vertstudy.model.load import load_model
from vertstudy.train.trainer import EPOCH_KEYS, make_optimizer, make_scheduler, step_scheduler, train

REGION_KEYS = {f"val_{m}_{r}" for m in ("loc_error_mm", "id_rate", "map") for r in REGIONS}


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # bit-reproducible runs


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """Four short-view coarse phantoms prepared at 4 mm: (cases, their cache entry folders)."""
    result = prepared_short_phantoms(tmp_path_factory.mktemp("trainer-data"), cases=4, seed=3)
    return result.cases, [str(c.path) for c in result.cases]


def tiny(**sections) -> Config:
    """A tiny, fast configuration; ``sections`` override whole nested sections' fields."""
    values = {
        "model": {"width": 0.25, "lstm_hidden": 8, "lstm_layers": 1},
        "data": {
            "prep": {"spacing_mm": 4.0},
            "crop": {"crop_size": (16, 16, 16), "crops_per_case": 2, "jitter_mm": 8.0},
        },
        "train": {"epochs": 2, "lr": 0.003},
    }
    for name, fields in sections.items():
        target = values.setdefault(name, {})
        for key, value in fields.items():
            if isinstance(value, dict):
                target.setdefault(key, {}).update(value)
            else:
                target[key] = value
    return Config.model_validate(values)


TIMING_KEYS = ("wall_s", "crops_per_s")  # the only per-epoch values that differ between identical runs


def deterministic(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in h.items() if k not in TIMING_KEYS} for h in history]


def same_floats(a: list[dict], b: list[dict]) -> bool:
    """Equal records, NaN equal to NaN."""
    return len(a) == len(b) and all(
        x.keys() == y.keys() and all(x[k] == y[k] or (math.isnan(x[k]) and math.isnan(y[k])) for k in x)
        for x, y in zip(a, b)
    )


# -- epoch records and result ----------------------------------------------------------------
def test_callback_once_per_epoch_with_documented_keys(prepared, tmp_path):
    cases, _ = prepared
    seen: list[dict] = []
    result = train(tiny(train={"epochs": 3}), cases[:2], cases[2:], tmp_path, on_epoch=seen.append)
    assert result.status == "completed" and result.epochs == 3
    assert [r["epoch"] for r in seen] == [1, 2, 3]
    for record in seen:
        assert set(record) == set(EPOCH_KEYS) | REGION_KEYS
        assert all(isinstance(v, float) for k, v in record.items() if k != "epoch")
        assert math.isfinite(record["loss"]) and math.isfinite(record["val_loss"])
        assert record["crops_per_s"] > 0 and record["wall_s"] > 0
        assert record["loss"] == pytest.approx(record["loss_cls"] + record["loss_reg"], rel=1e-5)
        assert 0.0 <= record["val_id_rate"] <= 1.0
    assert result.history == seen
    best = min(seen, key=lambda r: r["val_loss"])
    assert result.best_epoch == best["epoch"] and result.best_metrics == best
    assert result.last_checkpoint == tmp_path / "last.pt" and result.best_checkpoint == tmp_path / "best.pt"
    assert load_checkpoint(result.best_checkpoint)["epoch"] == best["epoch"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "last.pt"]  # no temporary files left


def test_without_validation_cases_the_training_loss_is_monitored(prepared, tmp_path):
    cases, _ = prepared
    result = train(tiny(), cases[:1], [], tmp_path)
    assert result.status == "completed"
    assert all(math.isnan(h["val_loss"]) and math.isnan(h["val_map"]) for h in result.history)
    assert result.best_metrics["loss"] == min(h["loss"] for h in result.history)


def test_localization_only_model_trains(prepared, tmp_path):
    cases, _ = prepared
    result = train(tiny(model={"tasks": "loc"}, train={"epochs": 1}), cases[:1], cases[1:2], tmp_path)
    assert result.status == "completed"
    assert result.history[0]["loss_cls"] == 0.0 and math.isnan(result.history[0]["val_map"])


# -- divergence ------------------------------------------------------------------------------
def test_non_finite_loss_ends_as_diverged_without_raising(prepared, tmp_path):
    cases, _ = prepared
    # 1e39 overflows float32: the regression term is inf (or NaN) from the first batch.
    seen: list[dict] = []
    result = train(tiny(loss={"reg_lambda": 1e39}), cases[:1], cases[1:2], tmp_path, on_epoch=seen.append)
    assert result.status == "diverged" and "epoch 1" in result.message
    assert result.epochs == 0 and result.history == [] and seen == []
    assert result.last_checkpoint is None and result.best_checkpoint is None


def test_divergence_keeps_the_last_good_checkpoint(prepared, tmp_path):
    cases, _ = prepared
    first = train(tiny(train={"epochs": 1}), cases[:1], cases[1:2], tmp_path)
    before = (tmp_path / "last.pt").read_bytes()
    result = train(
        tiny(loss={"reg_lambda": 1e39}, train={"epochs": 3}),
        cases[:1],
        cases[1:2],
        tmp_path,
        resume=first.last_checkpoint,
    )
    assert result.status == "diverged" and "epoch 2" in result.message
    assert result.epochs == 1 and same_floats(deterministic(result.history), deterministic(first.history))
    assert (tmp_path / "last.pt").read_bytes() == before
    assert result.best_checkpoint == tmp_path / "best.pt"


# -- schedules -------------------------------------------------------------------------------
def _lrs(train_cfg: TrainConfig, losses: list[float]) -> list[float]:
    """The lr of each epoch under the schedule, stepped with the given epoch losses."""
    optimizer = make_optimizer(torch.nn.Linear(1, 1), train_cfg)
    scheduler = make_scheduler(optimizer, train_cfg)
    lrs = []
    for loss in losses:
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()  # no gradients: changes nothing, but keeps the step order torch expects
        step_scheduler(scheduler, loss)
    return lrs


def test_plateau_reduces_by_factor_after_patience_down_to_min_lr():
    cfg = TrainConfig(lr=0.01, schedule={"kind": "plateau", "patience": 2, "min_lr": 1e-3})
    lrs = _lrs(cfg, [5.0] + [4.0] * 14)
    # epoch 2 improves; epochs 3, 4 stall (patience 2); after the 3rd stall (epoch 5) the lr drops.
    assert lrs[:5] == pytest.approx([0.01] * 5)
    assert lrs[5:8] == pytest.approx([0.004] * 3)
    assert lrs[8:11] == pytest.approx([0.0016] * 3)
    assert lrs[11:] == pytest.approx([1e-3] * 4)  # 0.00064 is below min_lr
    assert TrainConfig().schedule.factor == 0.4 and TrainConfig().schedule.min_lr == 1e-6  # the paper's


def test_plateau_keeps_the_lr_while_the_loss_falls():
    lrs = _lrs(TrainConfig(schedule={"kind": "plateau", "patience": 0}), [10.0 - i for i in range(8)])
    assert lrs == pytest.approx([0.01] * 8)


def test_cosine_schedule_follows_the_formula():
    cfg = TrainConfig(lr=0.01, epochs=4, schedule={"kind": "cosine", "min_lr": 1e-4})
    expected = [1e-4 + (0.01 - 1e-4) * (1 + math.cos(math.pi * e / 4)) / 2 for e in range(5)]
    assert _lrs(cfg, [1.0] * 5) == pytest.approx(expected)


def test_step_schedule_follows_the_formula_with_floor():
    cfg = TrainConfig(lr=0.01, schedule={"kind": "step", "step_size": 2, "gamma": 0.1, "min_lr": 5e-5})
    assert _lrs(cfg, [1.0] * 7) == pytest.approx([0.01, 0.01, 1e-3, 1e-3, 1e-4, 1e-4, 5e-5])


@pytest.mark.parametrize("kind", ["plateau", "cosine", "step"])
def test_every_schedule_runs_in_the_trainer_and_records_its_lr(prepared, tmp_path, kind):
    cases, _ = prepared
    schedule = {"kind": kind, "patience": 0, "step_size": 1, "gamma": 0.5, "min_lr": 1e-4}
    cfg = tiny(train={"epochs": 3, "lr": 0.01, "schedule": schedule})
    result = train(cfg, cases[:1], cases[1:2], tmp_path)
    assert result.status == "completed"
    lrs = [h["lr"] for h in result.history]
    assert lrs[0] == 0.01
    if kind == "cosine":
        assert lrs == pytest.approx([1e-4 + (0.01 - 1e-4) * (1 + math.cos(math.pi * e / 3)) / 2 for e in range(3)])
    elif kind == "step":
        assert lrs == pytest.approx([0.01, 0.005, 0.0025])
    else:  # patience 0: the lr drops by 0.4 after every epoch whose validation loss did not improve
        val = [h["val_loss"] for h in result.history]
        lr = 0.01
        for e in range(1, 3):
            best_before = min(val[: e - 1], default=math.inf)
            lr = lr * 0.4 if e > 1 and val[e - 1] >= best_before * (1 - 1e-4) else lr
            assert lrs[e] == pytest.approx(lr)


# -- checkpoints and resume ------------------------------------------------------------------
def test_checkpoint_holds_plain_state_and_loads_with_weights_only(prepared, tmp_path):
    cases, _ = prepared
    cfg = tiny(train={"epochs": 1})
    train(cfg, cases[:1], cases[1:2], tmp_path)
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    keys = {"model", "optimizer", "scheduler", "epoch", "best_epoch", "best_loss", "history", "config", "rng"}
    assert keys <= set(state)
    assert state["epoch"] == 1 and Config.model_validate(state["config"]) == cfg
    assert {"torch", "cuda", "numpy", "python"} <= set(state["rng"])
    model, loaded_cfg = load_model(tmp_path / "last.pt")
    assert loaded_cfg == cfg and not model.training
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state["model"].items())


def test_load_checkpoint_rejects_foreign_and_missing_files(tmp_path):
    with pytest.raises(InputError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="junk.pt"):
        load_checkpoint(tmp_path / "junk.pt")
    torch.save({"model": {}}, tmp_path / "other.pt")
    with pytest.raises(InputError, match="not a vertstudy checkpoint"):
        load_checkpoint(tmp_path / "other.pt")


def test_resume_with_another_model_config_is_refused(prepared, tmp_path):
    cases, _ = prepared
    first = train(tiny(train={"epochs": 1}), cases[:1], [], tmp_path / "a")
    with pytest.raises(ConfigError, match="last.pt"):
        train(tiny(model={"width": 0.5}), cases[:1], [], tmp_path / "b", resume=first.last_checkpoint)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["model"]


def _resume_cfg() -> Config:
    # augmentation on, so resumed crops must come from the right (seed, epoch, index)
    return tiny(train={"epochs": 3}, data={"augment": {"enabled": True}})


def _straight_and_first_epoch(cfg: Config, cases, tmp_path: Path, part_dir: str):
    """The full run of ``cfg`` and, in ``tmp_path / part_dir``, a run of its first epoch only."""
    straight = train(cfg, cases[:2], cases[2:], tmp_path / "straight")
    one_epoch = cfg.model_copy(update={"train": cfg.train.model_copy(update={"epochs": 1})})
    return straight, train(one_epoch, cases[:2], cases[2:], tmp_path / part_dir)


def test_resume_reproduces_the_straight_run_bit_for_bit(prepared, tmp_path):
    cases, _ = prepared
    cfg = _resume_cfg()
    straight, part = _straight_and_first_epoch(cfg, cases, tmp_path, "resumed")
    seen: list[dict] = []
    resumed = train(cfg, cases[:2], cases[2:], tmp_path / "resumed", on_epoch=seen.append, resume=part.last_checkpoint)
    assert [r["epoch"] for r in seen] == [2, 3]  # only the new epochs are reported
    assert same_floats(deterministic(resumed.history), deterministic(straight.history))
    a, b = _weights(straight.last_checkpoint), _weights(resumed.last_checkpoint)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sa, sb = load_checkpoint(straight.last_checkpoint), load_checkpoint(resumed.last_checkpoint)
    assert sa["scheduler"] == sb["scheduler"]
    assert all(torch.equal(x, y) for x, y in zip(_flat(sa["optimizer"]), _flat(sb["optimizer"])))


def _flat(obj) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for k in sorted(obj, key=str) for t in _flat(obj[k])]
    if isinstance(obj, list | tuple):
        return [t for v in obj for t in _flat(v)]
    return []


_RESUME_SCRIPT = """
import sys, torch
from pathlib import Path
from vertstudy.config import Config
from vertstudy.data.cache import load_entry
from vertstudy.train.trainer import train
torch.set_num_threads(1)
cfg = Config.model_validate_json(Path(sys.argv[1]).read_text(encoding="utf-8"))
cases = [load_entry(Path(p)) for p in sys.argv[4:]]
result = train(cfg, cases[:2], cases[2:], Path(sys.argv[2]), resume=Path(sys.argv[3]))
assert result.status == "completed", result
"""


def test_resume_in_a_fresh_process_reproduces_the_straight_run(prepared, tmp_path):
    cases, entries = prepared
    cfg = _resume_cfg()
    straight, part = _straight_and_first_epoch(cfg, cases, tmp_path, "part")
    (tmp_path / "cfg.json").write_text(cfg.model_dump_json())
    subprocess.run(
        [
            sys.executable,
            "-c",
            _RESUME_SCRIPT,
            str(tmp_path / "cfg.json"),
            str(tmp_path / "fresh"),
            str(part.last_checkpoint),
            *entries,
        ],
        check=True,
        timeout=120,
    )
    fresh = load_checkpoint(tmp_path / "fresh" / "last.pt")
    assert same_floats(deterministic(fresh["history"]), deterministic(straight.history))
    a, b = _weights(straight.last_checkpoint), fresh["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


# -- safety ----------------------------------------------------------------------------------
def _torch_load_calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            if (
                isinstance(f, ast.Attribute)
                and f.attr == "load"
                and isinstance(f.value, ast.Name)
                and f.value.id == "torch"
            ):
                yield node


def test_torch_load_is_only_called_with_weights_only_true():
    package = Path(vertstudy.__file__).parent
    calls = 0
    for path in sorted(package.rglob("*.py")):
        source = path.read_text(encoding="utf-8")
        tree = ast.parse(source, filename=str(path))
        for node in ast.walk(tree):  # no aliasing of torch.load that the check below would miss
            if isinstance(node, ast.ImportFrom) and node.module == "torch":
                assert "load" not in {a.name for a in node.names}, f"{path}: `from torch import load`"
        for call in _torch_load_calls(tree):
            calls += 1
            kw = {k.arg: k.value for k in call.keywords}
            ok = isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True
            assert ok, f"{path}:{call.lineno}: torch.load without weights_only=True"
    assert calls >= 1  # the check sees the trainer's load_checkpoint


def test_progress_bar_run_and_auto_device_model(prepared, tmp_path, capsys):
    cases, _ = prepared
    result = train(tiny(train={"epochs": 1}), cases[:1], [], tmp_path, progress=True)
    assert result.status == "completed" and result.device == "cpu"
    model, _ = load_model(result.last_checkpoint, device="auto")
    assert next(model.parameters()).device.type == ("cuda" if torch.cuda.is_available() else "cpu")


# -- whole-CT validation and the spine prior ----------------------------------------------------
def test_whole_ct_validation_every_k_epochs_selects_best_pt_and_stores_the_prior(prepared, tmp_path):
    from vertstudy.model.prior import SpinePrior, load_spine_prior
    from vertstudy.train.trainer import WHOLE_CT_KEYS, ct_score

    cases, _ = prepared
    from vertstudy.infer.evaluate import whole_ct_figures

    cfg = tiny(train={"epochs": 3, "whole_ct_every": 2, "select_on": "val_ct"}, infer={"stride": (8, 8, 8)})
    with pytest.raises(ConfigError, match="needs a whole-CT validator"):  # inference is a later stage: passed in
        train(cfg, cases[:2], cases[2:], tmp_path)
    result = train(cfg, cases[:2], cases[2:], tmp_path, whole_ct=whole_ct_figures)
    assert result.status == "completed"
    h = result.history
    assert all(set(WHOLE_CT_KEYS) <= set(r) for r in h)
    for r in h:  # evaluated after epochs 1 (the first), 2 (every 2nd) and 3 (the last)
        assert 0.0 <= r["val_ct_id_rate"] <= 1.0 and r["val_ct_false_per_case"] >= 0
    key = [ct_score(r) for r in h]
    best = h[max(range(3), key=lambda i: (key[i], -i))]  # the first of equals: later ones must improve
    assert result.best_epoch == best["epoch"]
    prior = load_spine_prior(result.best_checkpoint)
    assert isinstance(prior, SpinePrior) and prior.count.sum() > 0
    # the prior comes from the training cases only
    truth = [(c.indices, c.zyx_vox * c.geometry.spacing_mm) for c in cases[:2]]
    from vertstudy.model.prior import fit_spine_prior

    assert (prior.mean == fit_spine_prior(truth).mean).all()


def test_whole_ct_score_ranks_unmeasured_figures_last():
    from vertstudy.train.trainer import ct_score

    nan = math.nan
    assert ct_score({"val_ct_id_rate": 0.5, "val_ct_loc_error_mm": 9.0}) > \
        ct_score({"val_ct_id_rate": 0.5, "val_ct_loc_error_mm": 12.0}) > \
        ct_score({"val_ct_id_rate": 0.0, "val_ct_loc_error_mm": nan}) > \
        ct_score({"val_ct_id_rate": nan, "val_ct_loc_error_mm": nan}) > (-math.inf, -math.inf)


def test_selection_on_whole_ct_needs_its_evaluations():
    from vertstudy.config import load_config

    with pytest.raises(ConfigError, match=r"select_on = 'val_ct' needs train.whole_ct_every > 0"):
        load_config({"train.select_on": "val_ct"}, where="study.yaml")


def test_fused_adam_makes_the_plain_update():
    """make_optimizer's fused Adam: the same parameters as the per-parameter loop after a few
    steps (float rounding only), and a state dict either one loads."""
    torch.manual_seed(0)
    fused_model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.LSTM(7, 3))
    plain_model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.LSTM(7, 3))
    plain_model.load_state_dict(fused_model.state_dict())
    cfg = TrainConfig(lr=0.01, weight_decay=1e-4)
    fused = make_optimizer(fused_model, cfg)
    plain = torch.optim.Adam(plain_model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    for step in range(5):
        for model, opt in ((fused_model, fused), (plain_model, plain)):
            x = torch.randn(4, 5, generator=torch.Generator().manual_seed(step))
            out, _ = model[1](model[0](x))
            opt.zero_grad()
            out.square().sum().backward()
            opt.step()
    for (name, a), b in zip(fused_model.named_parameters(), plain_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    plain.load_state_dict(fused.state_dict())
    assert plain.state_dict()["state"].keys() == fused.state_dict()["state"].keys()


def test_best_checkpoint_holds_weights_without_optimizer_state(prepared, tmp_path):
    """best.pt is lean (no optimizer, scheduler or RNG states, so about a third of last.pt with
    Adam's moments), loads for prediction like last.pt, and is refused as a resume point in one
    line naming it."""
    cases, _ = prepared
    result = train(tiny(train={"epochs": 2}), cases[:1], cases[1:2], tmp_path)
    best, last = load_checkpoint(result.best_checkpoint), load_checkpoint(result.last_checkpoint)
    assert not {"optimizer", "scheduler", "rng"} & set(best) and {"optimizer", "scheduler", "rng"} <= set(last)
    assert {"model", "config", "spine_prior", "epoch", "best_epoch"} <= set(best)
    assert result.best_checkpoint.stat().st_size < 0.5 * result.last_checkpoint.stat().st_size
    model, _ = load_model(result.best_checkpoint)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in best["model"].items())
    with pytest.raises(ConfigError, match=r"best\.pt.*weights only.*resume from last\.pt"):
        train(tiny(train={"epochs": 3}), cases[:1], cases[1:2], tmp_path / "again", resume=result.best_checkpoint)


def test_a_checkpoint_older_than_a_config_field_keeps_the_value_it_was_trained_with(tmp_path) -> None:
    """A checkpoint written before ``model.softmax_beta`` existed was trained with a plain
    soft-max (1): loading it gives 1 whatever the default, and it is still that network."""
    from vertstudy.checkpoint import ADDED_FIELDS, checkpoint_config
    from vertstudy.config import Config

    stored = Config().model_dump()
    del stored["model"]["softmax_beta"]
    state = {"config": stored}
    cfg = checkpoint_config(state, tmp_path / "old.pt")
    assert cfg.model.softmax_beta == ADDED_FIELDS["model.softmax_beta"] == 1.0
    assert "softmax_beta" not in state["config"]["model"]  # the caller's dict is left as it was
    newer = Config().model_dump()
    newer["model"]["softmax_beta"] = 25.0
    assert checkpoint_config({"config": newer}, tmp_path / "new.pt").model.softmax_beta == 25.0


def test_weight_average_follows_its_formula():
    from vertstudy.train.trainer import WeightAverage

    model = torch.nn.Linear(3, 2)
    average = WeightAverage(model, 0.9)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.weight.add_(1.0)
    average.update(model)  # step 1: d = min(0.9, 2 / 11)
    d = 2 / 11
    torch.testing.assert_close(average.model.weight, d * start["weight"] + (1 - d) * model.weight)
    assert not average.model.weight.requires_grad and average.steps == 1
    for _ in range(200):
        average.update(model)  # d reaches the decay; the average converges to fixed weights
    torch.testing.assert_close(average.model.weight, model.weight)


def test_weight_average_validates_and_ships_the_averaged_weights_and_resumes_bit_for_bit(prepared, tmp_path):
    """With train.ema_decay the validation figures and best.pt are the averaged weights', last.pt
    keeps the trained and the averaged ones, and a resumed run equals the straight one."""
    cases, _ = prepared
    cfg = tiny(train={"epochs": 3, "ema_decay": 0.9}, data={"augment": {"enabled": True}})
    straight, part = _straight_and_first_epoch(cfg, cases, tmp_path, "resumed")
    last = load_checkpoint(straight.last_checkpoint)
    assert last["average"]["steps"] == 3 * 2  # 2 training cases x 2 crops / batch 2 per epoch
    trained, averaged = last["model"], last["average"]["model"]
    assert any(not torch.equal(trained[k], averaged[k]) for k in trained)
    best = load_checkpoint(straight.best_checkpoint)
    assert "average" not in best
    one_last, one_best = load_checkpoint(part.last_checkpoint), load_checkpoint(part.best_checkpoint)
    assert one_best["epoch"] == 1  # a one-epoch run's best.pt holds that epoch's averaged weights
    assert all(torch.equal(one_best["model"][k], v) for k, v in one_last["average"]["model"].items())
    assert any(not torch.equal(one_best["model"][k], v) for k, v in one_last["model"].items())
    model, _ = load_model(straight.best_checkpoint)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in best["model"].items())
    plain = train(tiny(train={"epochs": 3, "ema_decay": 0.0}, data={"augment": {"enabled": True}}), cases[:2],
                  cases[2:], tmp_path / "plain")
    # the same training, validated on other weights
    assert [h["loss"] for h in plain.history][0] == straight.history[0]["loss"]
    assert plain.history[0]["val_loss"] != straight.history[0]["val_loss"]
    resumed = train(cfg, cases[:2], cases[2:], tmp_path / "resumed", resume=part.last_checkpoint)
    assert same_floats(deterministic(resumed.history), deterministic(straight.history))
    again = load_checkpoint(resumed.last_checkpoint)
    assert again["average"]["steps"] == 6
    assert all(torch.equal(again["average"]["model"][k], averaged[k]) for k in averaged)
