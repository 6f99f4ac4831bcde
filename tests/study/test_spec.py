"""The study-file schema, its smoke scaling, the Optuna/Tune spaces and their decoding (no Ray cluster)."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml

from vertstudy.config import load_config
from vertstudy.errors import ConfigError, InputError
from vertstudy.study.space import decode, define_by_run, grid_space
from vertstudy.study.spec import load_study, smoke, validate_spec

STUDIES = Path(__file__).resolve().parents[2] / "studies"
STUDY_FILES = sorted(STUDIES.glob("*.yaml"))

#: The parameters each schedule kind owns in search.yaml (sampled only with that kind).
SCHEDULE_PARAMS = {
    "plateau": {"train.schedule.factor", "train.schedule.patience"},
    "step": {"train.schedule.step_size", "train.schedule.gamma"},
    "cosine": {"train.schedule.min_lr"},
}


def test_the_paper_studies_exist():
    names = {p.name for p in STUDY_FILES}
    assert {"quickstart.yaml", "search.yaml", *(f"table{i}.yaml" for i in range(1, 5))} <= names


@pytest.mark.parametrize("path", STUDY_FILES, ids=lambda p: p.stem)
def test_every_study_loads_and_its_smoke_version_is_small_and_valid(path):
    spec = load_study(path)
    small = smoke(spec)
    again = validate_spec(small.model_dump(), f"{path} (smoke)")
    assert again.name == f"{spec.name}-smoke"
    if small.search.algorithm == "grid":
        points = math.prod(len(p.values) for p in small.space.values())
        assert points * small.repeats * small.num_samples <= 3
    else:
        assert small.num_samples <= 2
    cfg = load_config(small.config)
    assert cfg.model.width == 0.125
    assert cfg.train.device == "cpu"
    assert small.resources.gpus == 0
    assert small.data.phantoms is not None and small.data.root is None


def test_quickstart_searches_b_lambda_and_schedule_two_at_a_time_on_whole_ct_validation():
    """A real search (issue 25): at least 8 trials, TPE past its start-up trials, ASHA, reproducible."""
    from vertstudy.study.ordered import rung_milestones
    from vertstudy.study.search import tpe_settings

    spec = load_study(STUDIES / "quickstart.yaml")
    assert {"loss.balance_b", "loss.reg_lambda", "train.lr", "train.schedule.kind"} <= set(spec.space)
    assert spec.concurrency == 2 and spec.num_samples >= 8
    assert tpe_settings(spec)["n_startup_trials"] < spec.num_samples and spec.search.reproducible
    assert spec.scheduler.kind == "asha"
    epochs = load_config(spec.config).train.epochs
    rungs = rung_milestones(spec.scheduler.grace_period, spec.scheduler.reduction_factor, epochs + 1)
    assert rungs and max(rungs) < epochs  # a rung before the last epoch: weak trials stop early
    # ASHA reads the searched whole-CT figure at every rung: measured there, not carried over
    assert all(r % load_config(spec.config).train.whole_ct_every == 0 for r in rungs)
    assert spec.search.metric == "val_ct_id_rate" and spec.search.mode == "max"
    cfg = load_config(spec.config)
    assert cfg.train.whole_ct_every > 0 and cfg.train.select_on == "val_ct" and cfg.infer.decoder == "sequence"
    assert spec.search.algorithm == "optuna-tpe"
    assert spec.data.phantoms is not None and spec.resources.gpus == 0


def test_search_is_gpu_scale_and_leaves_the_stride_to_the_runner():
    spec = load_study(STUDIES / "search.yaml")
    cfg = load_config(spec.config)
    assert spec.data.root and spec.data.split.val < 1 and spec.data.split.test < 1
    assert (cfg.model.width, cfg.data.prep.spacing_mm, cfg.data.crop.crop_size) == (1.0, 2.0, (104, 80, 80))
    assert cfg.train.device == "cuda" and cfg.train.amp
    assert spec.resources.gpus == 0.5 and spec.scheduler.kind == "asha"
    assert spec.scheduler.grace_period < cfg.train.epochs
    assert "data.crop.crop_size" in spec.space and "infer.stride" not in spec.config


def test_the_trial_stride_follows_its_crop_unless_the_study_sets_it():
    """Inference tiles of a trial start every crop / ``infer.tiles_per_crop`` voxels (a searched
    crop gets its own stride); a study's own ``infer.stride`` wins; bench learn derives it alike."""
    from vertstudy.bench.learn import learn_config
    from vertstudy.study.space import trial_config
    from vertstudy.study.spec import choice_label

    spec = load_study(STUDIES / "search.yaml")
    params = {"data.crop.crop_size": choice_label([96, 72, 72])}
    cfg = trial_config(spec, params)
    assert cfg.data.crop.crop_size == (96, 72, 72) and cfg.infer.stride == (24, 18, 18)
    spec2 = spec.model_copy(update={"config": {**spec.config, "infer.tiles_per_crop": 2}})
    assert trial_config(spec2, params).infer.stride == (48, 36, 36)
    spec3 = spec.model_copy(update={"config": {**spec.config, "infer.stride": (40, 30, 30)}})
    assert trial_config(spec3, params).infer.stride == (40, 30, 30)
    def learn(over=None):
        return learn_config(0.25, (48, 32, 32), 4.0, 0.003, 0, 0, over).infer.stride

    assert learn() == (12, 8, 8) and learn({"infer.tiles_per_crop": 3}) == (16, 10, 10)
    assert learn({"infer.stride": (24, 16, 16)}) == (24, 16, 16)


def test_search_space_is_conditional_on_the_schedule_kind():
    spec = load_study(STUDIES / "search.yaml")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    space = define_by_run(spec)
    kinds, crops = set(), set()
    for _ in range(40):
        trial = study.ask()
        space(trial)
        params = set(trial.params)
        kind = trial.params["train.schedule.kind"]
        kinds.add(kind)
        owned = set().union(*SCHEDULE_PARAMS.values())
        assert params & owned == SCHEDULE_PARAMS[kind], (kind, sorted(params))
        assert {"loss.balance_b", "loss.reg_lambda", "train.lr", "data.crop.crop_size"} <= params
        values = decode(spec, trial.params)
        crop = values["data.crop.crop_size"]
        assert isinstance(crop, (list, tuple)) and len(crop) == 3 and all(c % 8 == 0 for c in crop)
        crops.add(tuple(crop))
        assert 2.0 <= values["loss.balance_b"] <= 4.0
        load_config({**spec.config, **values})  # every sampled point is a valid config
        study.tell(trial, 1.0)
    assert kinds == set(SCHEDULE_PARAMS)
    assert len(crops) > 1


@pytest.mark.parametrize(
    "name, param, values",
    [
        ("table1", "model.loc_head", ["integral", "heatmap", "fc"]),
        ("table2", "model.classifier", ["bilstm", "none-lstm"]),
        ("table3", "model.tasks", ["loc", "loc+cls"]),
        ("table4", None, None),
    ],
)
def test_table_grids_and_their_seeds(name, param, values):
    spec = load_study(STUDIES / f"{name}.yaml")
    assert spec.search.algorithm == "grid" and spec.scheduler.kind == "none"
    assert spec.resources.gpus == 0.5
    grid = grid_space(spec)
    assert grid["seed"] == {"grid_search": [0, 1, 2]}
    if param is None:
        assert set(grid) == {"seed"}
        cfg = load_config(spec.config)
        assert (cfg.loss.balance_b, cfg.loss.reg_lambda, cfg.train.lr) == (3.0, 0.4, 0.01)
        assert cfg.train.schedule.kind == "plateau"
    else:
        assert set(grid) == {param, "seed"}
        assert grid[param] == {"grid_search": values}
    if name == "table1":
        assert load_config(spec.config).model.tasks == "loc"


def test_decode_maps_labels_back_and_rejects_unknown_ones():
    spec = load_study(STUDIES / "search.yaml")
    values = decode(spec, {"data.crop.crop_size": "112x88x88", "train.schedule.kind": "step",
                           "train.schedule.step_size": 5.0, "loss.balance_b": 3, "seed": "2"})
    assert values == {"data.crop.crop_size": [112, 88, 88], "train.schedule.kind": "step",
                      "train.schedule.step_size": 5, "loss.balance_b": 3.0, "seed": 2}
    assert isinstance(values["train.schedule.step_size"], int) and isinstance(values["loss.balance_b"], float)
    with pytest.raises(ConfigError, match="64x64x64"):
        decode(spec, {"data.crop.crop_size": "64x64x64"})
    with pytest.raises(ConfigError, match="loss.balnce_b"):
        decode(spec, {"loss.balnce_b": 3.0})


# --- bad files ---------------------------------------------------------------------------------

BASE: dict[str, Any] = {
    "name": "bad",
    "data": {"phantoms": {"count": 5}},
    "config": {"model.width": 0.125},
    "space": {"loss.balance_b": {"type": "float", "low": 2.0, "high": 4.0}},
}


def _space(**params: Any):
    return lambda d: d["space"].update(params)


BAD = {
    "unknown-param": (
        _space(**{"loss.balnce_b": {"type": "float", "low": 2.0, "high": 4.0}}),
        ["'loss.balnce_b'", "space", "accepted"],
    ),
    "num-samples-type": (lambda d: d.update(num_samples="many"), ["num_samples", "'many'", "valid integer"]),
    "choice-rejected": (
        _space(**{"model.loc_head": {"type": "choice", "values": ["integral", "softmax"]}}),
        ["model.loc_head", "'softmax'", "'integral', 'heatmap' or 'fc'"],
    ),
    "empty-space": (lambda d: d.update(space={}), ["search space is empty", "space"]),
    "low-not-below-high": (
        _space(**{"loss.balance_b": {"type": "float", "low": 4.0, "high": 2.0}}),
        ["space.loss.balance_b", "low=4.0", "'low' must be below 'high'"],
    ),
    "logfloat-low-zero": (
        _space(**{"train.lr": {"type": "logfloat", "low": 0.0, "high": 0.1}}),
        ["space.train.lr", "logfloat", "low > 0"],
    ),
    "when-non-choice": (
        _space(**{"train.lr": {"type": "logfloat", "low": 1e-3, "high": 0.1, "when": {"loss.balance_b": 3.0}}}),
        ["space.train.lr.when", "'loss.balance_b'", "must be a choice parameter listed before it"],
    ),
    "when-later": (
        _space(**{
            "train.schedule.gamma": {"type": "float", "low": 0.2, "high": 0.6, "when": {"train.schedule.kind": "step"}},
            "train.schedule.kind": {"type": "choice", "values": ["plateau", "step"]},
        }),
        ["space.train.schedule.gamma.when", "'train.schedule.kind'", "listed before it"],
    ),
    "when-unknown-value": (
        _space(**{
            "train.schedule.kind": {"type": "choice", "values": ["plateau", "step"]},
            "train.schedule.gamma": {"type": "float", "low": 0.2, "high": 0.6, "when": {"train.schedule.kind": "cos"}},
        }),
        ["space.train.schedule.gamma.when", "'cos'", "'plateau', 'step'"],
    ),
    "repeats-with-tpe": (lambda d: d.update(repeats=3), ["repeats", "'grid'", "'optuna-tpe'"]),
    "asha-with-multi": (
        lambda d: d.update(search={"algorithm": "optuna-multi"}, scheduler={"kind": "asha"}),
        ["'asha'", "optuna-multi", "kind: none"],
    ),
    "phantoms-and-root": (lambda d: d["data"].update(root="/data/verse"), ["data", "/data/verse", "exactly one of"]),
    "grid-with-float": (
        lambda d: d.update(search={"algorithm": "grid"}),
        ["space.loss.balance_b", "grid search takes choice parameters only", "'float'"],
    ),
}


def _message(exc_type: type[Exception], path: Path) -> str:
    with pytest.raises(exc_type) as info:
        load_study(path)
    message = str(info.value)
    assert "\n" not in message, message
    assert str(path) in message, message
    return message


@pytest.mark.parametrize("case", list(BAD))
def test_bad_study_gives_one_line_naming_file_field_value_and_what_is_accepted(tmp_path, case):
    change, must = BAD[case]
    study = copy.deepcopy(BASE)
    validate_spec(copy.deepcopy(study), "base")  # the base itself is fine
    change(study)
    path = tmp_path / f"{case}.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False), encoding="utf-8")
    message = _message(ConfigError, path)
    for text in must:
        assert text in message, (text, message)


@pytest.mark.parametrize(
    "case, text, exc_type, must",
    [
        ("missing", None, InputError, ["not found"]),
        ("invalid-yaml", "name: [bad\nspace: {\n", InputError, ["not valid YAML"]),
        ("a-list", "- name: bad\n- space: {}\n", ConfigError, ["must be a mapping", "list"]),
        ("empty-file", "", ConfigError, ["must be a mapping", "NoneType"]),
    ],
)
def test_unreadable_study_files(tmp_path, case, text, exc_type, must):
    path = tmp_path / f"{case}.yaml"
    if text is not None:
        path.write_text(text, encoding="utf-8")
    message = _message(exc_type, path)
    for part in must:
        assert part in message, (part, message)


def test_a_whole_ct_search_metric_needs_whole_ct_validation():
    spec = copy.deepcopy(BASE)
    spec["search"] = {"algorithm": "optuna-tpe", "metric": "val_ct_id_rate", "mode": "max"}
    with pytest.raises(ConfigError, match=r"'val_ct_id_rate' needs config 'train.whole_ct_every' > 0"):
        validate_spec(spec, "s.yaml")
    spec["config"] = {**spec.get("config", {}), "train.whole_ct_every": 4}
    assert validate_spec(spec, "s.yaml").search.metric == "val_ct_id_rate"


def test_searches_are_reproducible_unless_asked_otherwise_and_old_study_files_resume_as_they_ran(tmp_path):
    """``search.reproducible`` left out: on for every search algorithm (its price, measured on the
    quickstart, is small), off for a grid; given, it is kept. A study.json saved before the field
    existed ran Tune's way and resumes so; and a study file that leaves the field out plans as the
    same trials as a stored study that had it off (a changed default is not a changed study)."""
    import json

    from tests.study.conftest import tiny_spec, tiny_study
    from vertstudy.study.plan import _trials_part
    from vertstudy.study.runner import load_study_dir

    for algorithm in ("optuna-tpe", "random", "optuna-multi"):
        search = {"algorithm": algorithm}
        if algorithm == "optuna-multi":
            search["metrics"] = ["val_loc_error_mm", "val_id_rate"]
        assert tiny_spec(f"s-{algorithm}", tmp_path, search=search).search.reproducible, algorithm
        assert not tiny_spec(f"o-{algorithm}", tmp_path, search={**search, "reproducible": False}).search.reproducible
    grid = {"algorithm": "grid"}
    space = {"model.tasks": {"type": "choice", "values": ["loc"]}}
    assert not tiny_spec("g", tmp_path, search=grid, space=space).search.reproducible
    assert tiny_spec("g2", tmp_path, search={**grid, "reproducible": True}, space=space).search.reproducible

    study_dir = tmp_path / "old"
    study_dir.mkdir()
    saved = json.loads(tiny_spec("old", tmp_path).model_dump_json())
    del saved["search"]["reproducible"]
    (study_dir / "study.json").write_text(json.dumps(saved), encoding="utf-8")
    (study_dir / "split.json").write_text(json.dumps({"train": [], "val": [], "test": []}), encoding="utf-8")
    stored, _ = load_study_dir(str(study_dir))
    assert stored.search.reproducible is False and stored.name == "old"
    now = tiny_spec("old", tmp_path)
    assert now.search.reproducible and _trials_part(now) == _trials_part(stored)
    assert _trials_part(now) != _trials_part(tiny_spec("old", tmp_path, search={"algorithm": "random"}))
    assert tiny_study("x", tmp_path)["search"] == {"algorithm": "optuna-tpe"}  # the file leaves the field out


def test_a_resumed_study_keeps_the_defaults_it_began_with(tmp_path):
    """study.json keeps only a study's own settings; ``defaults.json`` keeps every default of the
    day it began, so a default changed since is pinned to its old value when the study is
    resumed or extended, unless the study set the field itself. The planner compares study files
    without the pins; an unreadable defaults.json is one clear error naming it."""
    import json

    from tests.study.conftest import tiny_spec
    from vertstudy.config import Config, flat_config
    from vertstudy.errors import ConfigError
    from vertstudy.study.runner import ADDED_FIELDS, DEFAULTS_FILE, load_study_dir

    spec = tiny_spec("pinned", tmp_path, config={"train.epochs": 3})
    study_dir = tmp_path / "pinned"
    study_dir.mkdir()
    (study_dir / "study.json").write_text(spec.model_dump_json(), encoding="utf-8")
    (study_dir / "split.json").write_text(json.dumps({"train": [], "val": [], "test": []}), encoding="utf-8")
    today = flat_config(Config())
    assert load_study_dir(str(study_dir))[0].base_config == spec.base_config  # no defaults.json: today's
    older = {k: v for k, v in today.items() if k not in ADDED_FIELDS}  # written before those fields existed
    then = {**older, "train.ema_decay": 0.5, "train.epochs": 99, "train.no_such_field": 1}
    (study_dir / DEFAULTS_FILE).write_text(json.dumps(then), encoding="utf-8")
    stored, _ = load_study_dir(str(study_dir))
    assert today["train.ema_decay"] != 0.5
    assert stored.base_config.train.ema_decay == 0.5  # the old default, pinned
    assert stored.base_config.train.epochs == 3  # the study's own setting wins
    assert load_study_dir(str(study_dir), pin_defaults=False)[0].config == spec.config
    # fields added since the study began are pinned to the values that behave as the code did then
    assert stored.base_config.infer.tiles_per_crop == 2 and today["infer.tiles_per_crop"] == 4
    assert stored.base_config.train.whole_ct_tiles_per_crop == 0 and stored.base_config.infer.centre_weight == 0
    assert stored.base_config.infer.kmeans_threshold is None and stored.base_config.infer.kmeans_centre_weight is None
    recorded = {**then, "infer.tiles_per_crop": 3}  # a study that recorded the field keeps its value
    (study_dir / DEFAULTS_FILE).write_text(json.dumps(recorded), encoding="utf-8")
    assert load_study_dir(str(study_dir))[0].base_config.infer.tiles_per_crop == 3
    (study_dir / DEFAULTS_FILE).write_text("{not json", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"defaults\.json: not valid JSON"):
        load_study_dir(str(study_dir))
