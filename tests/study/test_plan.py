"""The ``--scale cpu`` profile of the ablation files and the planner that runs several study files
as one: the shipped table files' specs, their shared phantoms and held-out cases, each
configuration trained once, and the run / skip / resume of ``study run A.yaml B.yaml ...``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.study.conftest import tiny_spec, tiny_study
from vertstudy.config import flat_config, load_config
from vertstudy.errors import ConfigError
from vertstudy.study.plan import configuration_key, plan_studies, planned_trials, run_planned, study_state
from vertstudy.study.spec import (
    CPU_CONFIG,
    RUN_ONLY_FIELDS,
    cpu_scale,
    load_study,
    total_trials,
    validate_spec,
)

STUDIES = Path(__file__).resolve().parents[2] / "studies"
TABLES = [STUDIES / f"table{i}.yaml" for i in range(1, 5)]


def profile() -> list:
    return [cpu_scale(load_study(p)) for p in TABLES]


def trial_signature(cfg) -> str:
    """A trial's configuration with its seed, without the run-only fields (what the report compares)."""
    flat = flat_config(cfg)
    return json.dumps({k: v for k, v in flat.items() if k == "seed" or k not in RUN_ONLY_FIELDS}, sort_keys=True,
                      default=str)


@pytest.mark.parametrize("path", TABLES, ids=lambda p: p.stem)
def test_the_cpu_profile_of_every_table_file_validates(path):
    spec = cpu_scale(load_study(path))
    again = validate_spec(spec.model_dump(mode="json"), f"{path} (--scale cpu)")
    assert again.name == f"{path.stem}-cpu" and again.repeats == 3 and again.search.is_grid
    cfg = load_config(again.config)
    assert cfg.model.width == 0.25 and cfg.data.prep.spacing_mm == 4.0 and cfg.data.crop.crop_size == (48, 32, 32)
    assert cfg.train.device == "cpu" and cfg.train.workers == 0 and cfg.train.select_on == "val_ct"
    assert cfg.train.amp == "auto"  # bf16 where the CPU has it, not the file's GPU-only `true`
    assert cfg.train.epochs == CPU_CONFIG["train.epochs"] and cfg.train.whole_ct_every > 0
    assert again.resources.cpus == 1 and again.resources.gpus == 0 and again.concurrency == 2
    assert again.scheduler.kind == "none"  # ablations train every trial fully
    # the file's own ablated field survives, with the paper's values
    assert set(again.space) == set(load_study(path).space)


def test_a_search_study_has_no_cpu_profile():
    with pytest.raises(ConfigError, match="quickstart.yaml is the CPU-sized search|run studies/quickstart.yaml"):
        cpu_scale(load_study(STUDIES / "search.yaml"))


def test_a_cpu_override_of_a_study_file_is_checked_and_applied():
    raw = yaml.safe_load((STUDIES / "table1.yaml").read_text(encoding="utf-8"))
    spec = cpu_scale(validate_spec({**raw, "cpu": {"train.epochs": 3}}, "t1"))
    assert load_config(spec.config).train.epochs == 3
    with pytest.raises(ConfigError, match="t1: cpu"):
        validate_spec({**raw, "cpu": {"train.epochs": 0}}, "t1")


def test_every_table_shares_one_phantom_set_and_the_same_20_held_out_cases():
    specs = profile()
    data = {s.data.model_dump_json() for s in specs}
    assert len(data) == 1  # same phantoms (count, seed, preset), same split, same cache
    spec = specs[0]
    assert spec.data.phantoms.count >= 60 and spec.data.phantoms.preset == "coarse"
    assert spec.data.split.counts(spec.data.phantoms.count) == (4, 20)
    assert {load_config(s.config).data.prep.model_dump_json() for s in specs} == {
        load_config(spec.config).data.prep.model_dump_json()}  # one preprocessed cache


def test_equal_data_specs_materialize_the_same_held_out_entries_once(tmp_path):
    """The real materialization: two studies of the profile, shrunk alike to 5 phantoms, get the
    same cache entries in every part of the split, from one phantom set written once."""
    from vertstudy.study.dataset import materialize

    small = profile()[0].data.model_copy(update={
        "phantoms": profile()[0].data.phantoms.model_copy(update={"count": 5}),
        "split": profile()[0].data.split.model_copy(update={"val": 1, "test": 2}),
    })
    first, last = (s.model_copy(update={"data": small}) for s in (profile()[0], profile()[3]))
    a = materialize(first.data, first.base_config, tmp_path, progress=False)
    sets = tmp_path / "_phantoms"
    written = {p.name: p.stat().st_mtime_ns for p in sets.iterdir() if p.is_dir()}
    b = materialize(last.data, last.base_config, tmp_path, progress=False)
    assert (a.train, a.val, a.test) == (b.train, b.val, b.test) and len(a.test) == 2
    assert {p.name: p.stat().st_mtime_ns for p in sets.iterdir() if p.is_dir()} == written
    assert list(written) == ["coarse-s0-n5"]  # one set, written once


def test_the_profile_trains_each_configuration_of_the_four_tables_once():
    specs = profile()
    plans = plan_studies(specs)
    ran = {p.asked.name: p.spec for p in plans}
    # Table III's two rows are Table I's integral row and Table II's Bi-LSTM row; Table IV is that row too
    assert ran["table3-cpu"] is None and ran["table4-cpu"] is None
    assert {k: total_trials(v) for k, v in ran.items() if v} == {"table1-cpu": 9, "table2-cpu": 6}
    trained = [trial_signature(c) for p in plans if p.spec for c in planned_trials(p.spec)]
    assert len(trained) == len(set(trained)) == 15  # 5 configurations x 3 seeds, none twice
    asked = {trial_signature(c) for s in specs for c in planned_trials(s)}
    assert set(trained) == asked  # and every trial some table asks for is trained
    shared = {p.asked.name: {json.dumps(pt, sort_keys=True): by for pt, by in p.shared} for p in plans}
    assert shared["table3-cpu"] == {'{"model.tasks": "loc"}': "table1-cpu", '{"model.tasks": "loc+cls"}': "table2-cpu"}
    assert shared["table4-cpu"] == {"{}": "table2-cpu"}
    assert "nothing to train" in plans[2].describe() and "trained by table1-cpu" in plans[2].describe()


def test_the_paper_scale_files_share_the_same_configurations():
    plans = plan_studies([load_study(p) for p in TABLES])
    assert [p.spec is None for p in plans] == [False, False, True, True]


def _grid(name, store, space, **fields):
    base = {"search": {"algorithm": "grid"}, "num_samples": 1, "wandb": {"mode": "disabled"}}
    choices = {k: {"type": "choice", "values": v} for k, v in space.items()}
    return tiny_spec(name, store, **{**base, **fields, "space": choices})


def test_a_grid_drops_a_value_only_when_every_point_with_it_is_trained_earlier(tmp_path):
    tasks = {"model.tasks": ["loc", "loc+cls"]}
    a = _grid("a", tmp_path, tasks)  # (loc, integral) and (loc+cls, integral)
    b = _grid("b", tmp_path, {**tasks, "model.loc_head": ["integral", "fc"]})
    (pa, pb) = plan_studies([a, b])
    assert pa.spec is a and not pa.shared
    assert pb.spec.space["model.loc_head"].values == ["fc"] and pb.spec.space["model.tasks"].values == tasks[
        "model.tasks"]
    assert sorted(pt["model.tasks"] for pt, by in pb.shared if by == "a") == ["loc", "loc+cls"] and not pb.again
    # only (loc, integral) trained before: no value can go, the point is trained again and said so
    c = _grid("c", tmp_path, {"model.tasks": ["loc"]})
    (_, pb2) = plan_studies([c, b])
    assert pb2.spec is b and pb2.again == ({"model.tasks": "loc", "model.loc_head": "integral"},)
    assert "trained again: model.tasks=loc, model.loc_head=integral" in pb2.describe()


def test_same_configuration_means_same_data_config_and_seeds_but_not_where_it_runs(tmp_path):
    a = _grid("a", tmp_path, {"model.tasks": ["loc"]})
    faster = _grid("a2", tmp_path, {"model.tasks": ["loc"]}, config={"train.workers": 2, "infer.batch_size": 8})
    assert plan_studies([a, faster])[1].spec is None  # run-only fields differ: the same training
    other_data = _grid("a3", tmp_path, {"model.tasks": ["loc"]},
                       data={"phantoms": {"count": 5, "seed": 1}, "split": {"val": 1, "test": 1}})
    more_seeds = _grid("a4", tmp_path, {"model.tasks": ["loc"]}, repeats=2)
    other_lr = _grid("a5", tmp_path, {"model.tasks": ["loc"]}, config={"train.lr": 0.02})
    for later in (other_data, more_seeds, other_lr):
        assert plan_studies([a, later])[1].spec is later, later.name
    assert configuration_key(a, {"model.tasks": "loc"}) == configuration_key(faster, {"model.tasks": "loc"})
    search = tiny_spec("tpe", tmp_path)
    assert plan_studies([a, search])[1].spec is search  # search studies run as they are
    with pytest.raises(ConfigError, match="'a' is given twice"):
        plan_studies([a, a])


# -- a real run of two planned studies: run, skip, resume, refuse -----------------------------
@pytest.mark.slow
def test_several_files_run_once_then_skip_finished_and_resume_interrupted(ray_cluster, storage, tmp_path, capsys):
    """``a`` trains the integral loc+cls network; ``b`` asks for it (bilstm) and for none-lstm, so it trains
    none-lstm only, and its trial fails once with no retry left (an unfinished study). The second run skips
    ``a`` and resumes ``b``, whose trial then completes; the third, through the CLI, runs nothing and prints the
    report command; a changed file is refused before anything runs."""
    from vertstudy.cli import main

    grid = {"search": {"algorithm": "grid"}, "num_samples": 1, "wandb": {"mode": "disabled"}}
    raw_a = tiny_study("pa", storage, **grid, space={"model.tasks": {"type": "choice", "values": ["loc+cls"]}})
    raw_b = tiny_study("pb", storage, **grid, max_retries=0, inject_failure_at_epoch=1,
                       space={"model.classifier": {"type": "choice", "values": ["bilstm", "none-lstm"]}})
    a, b = validate_spec(raw_a, "pa"), validate_spec(raw_b, "pb")
    plans = plan_studies([a, b])
    assert plans[1].spec.space["model.classifier"].values == ["none-lstm"]

    first = run_planned(plans, address=ray_cluster, progress=False)
    assert [(o.name, o.action) for o in first] == [("pa", "ran"), ("pb", "ran")]
    assert first[0].result.counts == {"completed": 1} and first[1].result.counts == {"error": 1}
    assert study_state(plans[0].spec)[0] == "finished" and study_state(plans[1].spec)[0] == "unfinished"
    # a trial that ended for good keeps best.pt but not the resume state; the errored one keeps both
    def kept(study_dir: str) -> list[str]:
        return sorted(p.name for p in (Path(study_dir) / "ray").glob("*/checkpoint_*/*/*.pt"))
    assert kept(first[0].study_dir) == ["best.pt"] * 2
    assert kept(first[1].study_dir) == ["best.pt", "last.pt"]
    assert first[0].result.freed_bytes > 0 and first[1].result.freed_bytes == 0
    trials_a = Path(first[0].study_dir) / "trials.parquet"
    stamp = trials_a.stat().st_mtime_ns
    baseline_b = {n: (Path(first[1].study_dir) / f"{n}.parquet").read_bytes() for n in ("baseline", "cases")}
    for name in baseline_b:  # as if the driver had been killed before it wrote them: the resume writes them
        (Path(first[1].study_dir) / f"{name}.parquet").unlink()

    said = []
    second = run_planned(plan_studies([a, b]), address=ray_cluster, progress=False, say=said.append)
    assert [(o.name, o.action) for o in second] == [("pa", "finished"), ("pb", "resumed")]
    assert second[1].result.counts == {"completed": 1} and trials_a.stat().st_mtime_ns == stamp
    assert any("pa: every trial has ended" in s for s in said) and any(s.startswith("pb: resuming") for s in said)
    assert {n: (Path(first[1].study_dir) / f"{n}.parquet").read_bytes() for n in baseline_b} == baseline_b

    files = []
    for raw in (raw_a, raw_b):
        path = tmp_path / f"{raw['name']}.yaml"
        path.write_text(yaml.safe_dump(raw), encoding="utf-8")
        files.append(str(path))
    assert main(["study", "run", *files, "--address", ray_cluster, "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "pb: 1 trials (model.classifier: none-lstm x 1 seed(s)); model.classifier=bilstm is trained by pa" in out
    assert out.count("every trial has ended") == 2
    assert f"report: vertstudy report {first[0].study_dir} {first[1].study_dir} --out reports/pa-pb-" in out

    changed = validate_spec({**raw_a, "config": {**raw_a["config"], "train.epochs": 3}}, "pa")
    with pytest.raises(ConfigError, match="pa.* differs in config"):
        run_planned(plan_studies([changed, b]), address=ray_cluster, progress=False)
