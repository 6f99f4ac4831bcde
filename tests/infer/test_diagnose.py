"""``vertstudy diagnose --sweep``: a real (tiny, briefly trained) network on real phantom files.

``bench learn`` at its tiny test size (4 phantoms at 8 mm, width 0.125, 16^3 crops, 48 crops of
training) writes the phantoms and the checkpoint; the sweep then labels the phantoms under
several inference settings from one pass of the network per case. The figures of a trained-for-
seconds network are poor: the tests check that the sweep decodes what inference and the
decomposition decode, not the accuracy.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.test_bench_learn import TINY
from vertstudy.bench.learn import bench_learn
from vertstudy.errors import ConfigError
from vertstudy.infer.diagnose import (
    SWEEP_FIELDS,
    diagnose,
    format_sweep,
    prepared_cases,
    sweep_configs,
    sweep_decoders,
)
from vertstudy.model.load import load_model
from vertstudy.model.prior import load_spine_prior


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("sweep")
    bench_learn(**TINY, crops=48, workdir=work, whole_ct_every=0)
    checkpoint = work / "run" / "best.pt"
    model, cfg = load_model(checkpoint)
    [phantoms] = list(work.glob("data-*/phantoms"))
    cases = prepared_cases(cfg, phantoms, work / "sweep-cache")
    return {"checkpoint": checkpoint, "model": model, "cfg": cfg, "cases": cases, "phantoms": phantoms}


def test_the_sweep_decodes_what_the_decomposition_decodes(trained) -> None:
    model, cfg, cases = trained["model"], trained["cfg"], trained["cases"]
    prior = load_spine_prior(trained["checkpoint"])
    rows = sweep_decoders(model, cfg, cases, {"infer.decoder": ["kmeans", "sequence"],
                                              "kmeans_threshold": [cfg.infer.kmeans_threshold, 0.5, None]}, prior)
    assert len(rows) == 6 and all(set(r) >= {"infer.decoder", "infer.kmeans_threshold", "id_rate"} for r in rows)
    figures = diagnose(model, cfg, cases, prior)
    for dec in ("kmeans", "sequence"):
        [own] = [r for r in rows
                 if r["infer.decoder"] == dec and r["infer.kmeans_threshold"] == cfg.infer.kmeans_threshold]
        np.testing.assert_equal([own["id_rate"], own["loc_error_mm"], own["false_per_case"]],
                                [figures[f"shipped_{dec}_{k}"] for k in ("id_rate", "loc_error_mm", "false_per_case")])
        assert own["as_configured"] == (dec == cfg.infer.decoder)
    # the sequence decoder does not read the K-means threshold: its three rows agree
    seq = [(r["id_rate"], r["loc_error_mm"], r["false_per_case"]) for r in rows if r["infer.decoder"] == "sequence"]
    np.testing.assert_equal(seq[0], seq[1])
    np.testing.assert_equal(seq[0], seq[2])
    keys = [(-r["id_rate"], np.nan_to_num(r["loc_error_mm"], nan=np.inf)) for r in rows]
    assert keys == sorted(keys)  # best first
    table = format_sweep(rows)
    assert table.count("\n") == 7 and table.count("* as configured") == 1 and "null" in table


def test_a_lower_vote_threshold_casts_more_votes(trained) -> None:
    """K-means predicts a class when a vote survives its threshold, so lowering it never removes a
    prediction: matched plus false predictions do not fall."""
    model, cfg, cases = trained["model"], trained["cfg"], trained["cases"]
    rows = sweep_decoders(model, cfg, cases, {"decoder": ["kmeans"], "threshold": [0.05, 0.5],
                                              "kmeans_threshold": [None], "min_votes": [1]})
    by = {r["infer.threshold"]: r for r in rows}
    vertebrae = sum(len(c.indices) for c in cases)

    def predicted(r):  # identified vertebrae are a subset of predictions; false ones are the rest
        return r["false_per_case"] * len(cases) + r["id_rate"] * vertebrae

    assert predicted(by[0.05]) >= predicted(by[0.5])
    assert predicted(by[0.05]) > 0  # at 0.05 a briefly trained network votes somewhere


@pytest.mark.parametrize(
    "grid, words",
    [
        ({"infer.stride": [[8, 8, 8]]}, ["infer.stride", "infer.kmeans_threshold"]),
        ({"infer.kmeans_threshold": [0.5, 2.0]}, ["kmeans_threshold", "2.0"]),
        ({"infer.decoder": ["kmeans", "viterbi"]}, ["decoder", "viterbi"]),
        ({"infer.min_votes": []}, ["min_votes", "no value"]),
        ({f: list(range(1, 5)) for f in ("min_votes", "seq_radius_mm", "seq_pair_weight", "centre_weight",
                                         "threshold")}, ["1024 combinations"]),
    ],
)
def test_bad_sweeps_are_refused_in_one_line(grid, words, trained) -> None:
    with pytest.raises(ConfigError) as err:
        sweep_configs(trained["cfg"].infer, grid)
    assert "\n" not in str(err.value) and all(w in str(err.value) for w in words), str(err.value)


def test_every_sweep_field_is_an_inference_field(trained) -> None:
    assert all(hasattr(trained["cfg"].infer, f) for f in SWEEP_FIELDS)


def test_cli_sweeps_a_checkpoint_on_a_folder_of_cts(trained, tmp_path) -> None:
    run = subprocess.run([sys.executable, "-m", "vertstudy.cli", "diagnose", str(trained["checkpoint"]),
                          str(trained["phantoms"]), "--sweep", "infer.kmeans_centre_weight=0,8", "--sweep",
                          "infer.decoder=kmeans", "--json"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["cases"] == 4 and len(out["sweep"]) == 2
    assert {r["infer.kmeans_centre_weight"] for r in out["sweep"]} == {0, 8}


@pytest.mark.parametrize(
    "sweep, words",
    [
        ("infer.stride=8", ["--sweep infer.stride", "accepted"]),
        ("infer.kmeans_threshold=0.5,1.5", ["kmeans_threshold", "1.5"]),
        ("kmeans_threshold", ["FIELD=V1,V2"]),
    ],
)
def test_cli_refuses_a_bad_sweep_before_preparing_anything(sweep, words, trained, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    run = subprocess.run([sys.executable, "-m", "vertstudy.cli", "diagnose", str(trained["checkpoint"]),
                          str(trained["phantoms"]), "--cache", str(cache), "--sweep", sweep],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    [line] = [ln for ln in run.stderr.splitlines() if ln.strip()]
    assert line.startswith("error:") and all(w in line for w in words), line
    assert not cache.exists() or not any(cache.iterdir())
