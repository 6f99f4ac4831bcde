"""``vertstudy bench learn`` at a tiny size: real phantoms, the real trainer and whole-CT validator.

Each run writes 4 phantoms at 8 mm (2 train, 1 validation, 1 held out) and trains a width-0.125
network with an 8-state LSTM on 16^3 crops for one epoch (or four): a few seconds each.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from vertstudy.bench.learn import (
    bench_learn,
    format_table,
    minutes_to_rate,
    plot_learning,
    read_learn_figures,
    whole_ct_curve,
)
from vertstudy.checkpoint import load_checkpoint
from vertstudy.cli import main
from vertstudy.data.cache import load_entry
from vertstudy.errors import InputError

TINY = {"train_cases": 3, "val_cases": 1, "test_cases": 1, "width": 0.125, "crop_size": (16, 16, 16),
        "spacing_mm": 8.0, "progress": False, "overrides": {"model.lstm_hidden": 8}}
TINY_CLI = ["--train-cases", "3", "--val-cases", "1", "--test-cases", "1", "--width", "0.125",
            "--crop", "16", "16", "16", "--spacing-mm", "8", "--set", "model.lstm_hidden=8"]


def _prepared(work: Path) -> list:
    """The prepared cases a run left in ``work``, by case id."""
    entries = [load_entry(meta.parent) for meta in work.glob("data-*/cache/cases/*/*/meta.json")]
    return sorted(entries, key=lambda c: c.case_id)


def _same_data(a: list, b: list) -> bool:
    return len(a) == len(b) and all(
        x.volume().shape == y.volume().shape and np.array_equal(x.volume(), y.volume())
        and np.array_equal(x.indices, y.indices) and np.allclose(x.zyx_vox, y.zyx_vox)
        for x, y in zip(a, b)
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """Three one-epoch runs: seeds (phantom 0, train 0), (phantom 1, train 0) through the CLI, and
    (phantom 0, train 1) with whole-CT validation off; figures, prepared cases, checkpoint seed."""
    out = {}
    for name, phantom_seed, seed in (("p0t0", 0, 0), ("p1t0", 1, 0), ("p0t1", 0, 1)):
        work = tmp_path_factory.mktemp(name)
        if name == "p1t0":  # through the command line: --phantom-seed and --seed reach bench_learn
            buf = io.StringIO()
            with contextlib.redirect_stdout(buf):
                code = main(["bench", "learn", *TINY_CLI, "--crops", "8", "--phantom-seed", str(phantom_seed),
                             "--seed", str(seed), "--workdir", str(work), "--json", "--plot", str(work / "curve.png")])
            assert code == 0
            figures = json.loads(buf.getvalue().strip().splitlines()[-1])
        else:
            figures = bench_learn(**TINY, crops=8, phantom_seed=phantom_seed, seed=seed, workdir=work,
                                  whole_ct_every=0 if name == "p0t1" else 5)
        out[name] = {"figures": figures, "cases": _prepared(work),
                     "ckpt_seed": load_checkpoint(work / "run" / "last.pt")["config"]["seed"],
                     "select_on": load_checkpoint(work / "run" / "last.pt")["config"]["train"]["select_on"]}
    return out


def test_phantom_seed_changes_the_phantoms_and_training_seed_does_not(runs) -> None:
    assert len(runs["p0t0"]["cases"]) == 4
    assert _same_data(runs["p0t0"]["cases"], runs["p0t1"]["cases"])  # another training seed: the same CTs
    assert not _same_data(runs["p0t0"]["cases"], runs["p1t0"]["cases"])  # another phantom seed: other CTs
    for name, (phantom_seed, train_seed) in {"p0t0": (0, 0), "p1t0": (1, 0), "p0t1": (0, 1)}.items():
        figures = runs[name]["figures"]
        assert (figures["phantom_seed"], figures["train_seed"]) == (phantom_seed, train_seed), name
        assert figures["cases_train_val_test"] == "2/1/1"
        from vertstudy.train.trainer import training_precision

        assert figures["precision"] == training_precision(torch.device("cpu"), "auto")  # what it trained in


def test_training_seed_sets_the_initialisation_and_phantom_seed_does_not(runs) -> None:
    # the trainer seeds the initial weights and the crop order from config ``seed`` alone
    assert [runs[n]["ckpt_seed"] for n in ("p0t0", "p1t0", "p0t1")] == [0, 0, 1]
    # same CTs, another training seed: another first epoch
    assert runs["p0t0"]["figures"]["first_epoch_loss"] != runs["p0t1"]["figures"]["first_epoch_loss"]


def test_whole_ct_validation_is_timed_and_can_be_turned_off(runs) -> None:
    on, off = runs["p0t0"]["figures"], runs["p0t1"]["figures"]
    assert on["whole_ct_every"] == 5 and on["whole_ct_validations"] == 1  # epoch 1 always evaluates
    assert on["whole_ct_s"] > 0 and on["whole_ct_share_of_training"] == pytest.approx(on["whole_ct_s"] / on["epochs_s"])
    [[epoch, minutes, rate]] = on["val_ct_curve"]
    assert epoch == 1 and minutes == pytest.approx(on["epochs_s"] / 60, abs=1e-3) and 0 <= rate <= 1
    assert on["minutes_to_85"] is None or on["minutes_to_85"] == pytest.approx(on["epochs_s"] / 60)
    assert off["whole_ct_every"] == 0 and off["whole_ct_validations"] == 0 and off["val_ct_curve"] == []
    assert off["minutes_to_85"] is None and math.isnan(off["whole_ct_s_per_validation"])
    assert "off (whole_ct_every 0)" in format_table(off)
    assert "whole-CT validation curve" in format_table(on)


def test_resumed_run_records_the_epochs_it_evaluated(tmp_path) -> None:
    """A time budget trains 2 epochs (the pace is the second's: the first carries the warm-up),
    then resumes to ``max_epochs`` (here 5): with every 3rd, epochs 1, 2 (the end of the first
    run), 3 and 5 (the resumed run's last) are evaluated, 4 is not."""
    figures = bench_learn(**TINY, minutes=60.0, max_epochs=5, whole_ct_every=3, workdir=tmp_path)
    assert figures["epochs"] == 5 and figures["whole_ct_validations"] == 4
    assert [p[0] for p in figures["val_ct_curve"]] == [1, 2, 3, 5]
    minutes = [p[1] for p in figures["val_ct_curve"]]
    assert minutes == sorted(minutes) and minutes[-1] == pytest.approx(figures["epochs_s"] / 60, abs=1e-3)


def test_a_budget_sized_from_a_slow_second_epoch_is_topped_up() -> None:
    """The pace after the warm epochs is their mean: 30 minutes sized from a 5 s second epoch
    (360 epochs) that then ran at 4 s left 6 minutes, 90 epochs more; nothing once under 2 % is left."""
    from vertstudy.bench.learn import top_up

    history = [{"wall_s": 7.0}, {"wall_s": 5.0}] + [{"wall_s": 4.0}] * 358  # 1,444 s of 1,800
    assert top_up(history, 30.0, 2) == 89  # 356 s left at 4.0 s
    assert top_up(history + [{"wall_s": 4.0}] * 89, 30.0, 2) == 0  # 0 s left: done
    assert top_up([{"wall_s": 7.0}, {"wall_s": 5.0}], 30.0, 2) == 0  # no paced epoch yet


def test_a_cosine_schedule_is_sized_from_its_first_epoch() -> None:
    """Cosine rates depend on the number of epochs, so a time budget fixes it after 1 epoch;
    the other schedules are sized after 2."""
    from vertstudy.bench.learn import learn_config, warm_epochs

    def cfg(kind):
        return learn_config(0.125, (16, 16, 16), 8.0, 1e-3, 0, 0, {"train.schedule.kind": kind}, 0)

    assert [warm_epochs(cfg(k)) for k in ("plateau", "step", "cosine")] == [2, 2, 1]


def test_whole_ct_validation_does_not_change_what_is_trained(tmp_path) -> None:
    """Validating every epoch on whole CTs consumes no random numbers and leaves the weights alone:
    the same losses and held-out figures as without it (best.pt chosen the same way in both: on
    whole-CT validation, the default when it runs, it could be another epoch)."""
    a = bench_learn(**TINY, crops=24, whole_ct_every=0, workdir=tmp_path / "off")
    b = bench_learn(**{**TINY, "overrides": {**TINY["overrides"], "train.select_on": "val_loss"}}, crops=24,
                    whole_ct_every=1, workdir=tmp_path / "every")
    assert a["epochs"] == b["epochs"] == 3 and b["whole_ct_validations"] == 3
    for key in ("last_epoch_loss", "best_val_loss", "best_epoch", "test_loc_error_mm_kmeans", "test_id_rate"):
        assert a[key] == b[key] or (math.isnan(a[key]) and math.isnan(b[key])), key


def _history(rates: list[float], wall_s: float = 30.0) -> list[dict]:
    return [{"epoch": e, "wall_s": wall_s, "val_ct_id_rate": r} for e, r in enumerate(rates, start=1)]


def test_minutes_to_85_counts_evaluated_epochs_only() -> None:
    # evaluated at 1, 3, 5: the 0.9 of epoch 3 is repeated at 4 by the trainer, and counts once, at 3
    history = _history([0.1, 0.1, 0.9, 0.9, 0.95])
    curve = whole_ct_curve(history, {1, 3, 5})
    assert [(p["epoch"], p["train_min"]) for p in curve] == [(1, 0.5), (3, 1.5), (5, 2.5)]
    assert minutes_to_rate(curve) == 1.5
    # a value at an epoch that did not evaluate never counts (epochs 2 and 3 were not evaluated),
    # though the time of every epoch does
    history = _history([0.5, 0.9, 0.9, 0.86])
    assert minutes_to_rate(whole_ct_curve(history, {1, 4})) == 2.0
    # the threshold is inclusive; the evaluated set may be the dict of seconds per evaluated epoch
    assert minutes_to_rate(whole_ct_curve(_history([0.85]), {1: 3.0})) == 0.5


def test_minutes_to_85_is_none_when_never_reached() -> None:
    assert minutes_to_rate(whole_ct_curve(_history([0.1, 0.84, 0.2]), {1, 2, 3})) is None
    assert minutes_to_rate(whole_ct_curve(_history([math.nan, 0.9]), {1})) is None  # 0.9 never evaluated
    assert minutes_to_rate(whole_ct_curve(_history([0.9, 0.9]), set())) is None  # validation off
    assert minutes_to_rate([]) is None


@pytest.mark.parametrize(
    "args, option",
    [
        (("--phantom-seed", "-1"), "--phantom-seed"),
        (("--phantom-seed", "one"), "--phantom-seed"),
        (("--whole-ct-every", "-2"), "--whole-ct-every"),
        (("--test-cases", "0"), "--test-cases"),
        (("--val-cases", "3"), "--val-cases"),
        (("--whole-ct-every", "0", "--set", "train.select_on=val_ct"), "--whole-ct-every"),
        (("--plot", "curves.txt"), "--plot"),
    ],
)
def test_cli_rejects_bad_values_in_one_line(args, option, tmp_path) -> None:
    run = subprocess.run([sys.executable, "-m", "vertstudy.cli", "bench", "learn", *TINY_CLI, *args,
                          "--workdir", str(tmp_path / "w")], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    error_lines = [ln for ln in run.stderr.splitlines() if "error" in ln]
    assert len(error_lines) == 1 and option in error_lines[0], run.stderr
    assert args[1] in error_lines[0]
    assert not (tmp_path / "w").exists()


def test_plot_draws_the_run_and_saved_runs_together(runs, tmp_path) -> None:
    """--plot writes this run's whole-CT validation curve; `bench plot` draws saved runs together."""
    import matplotlib.image

    figures = runs["p1t0"]["figures"]
    own = Path(figures["plot"])
    assert own.name == "curve.png" and not list(own.parent.glob(".curve.png*"))  # no temporary left
    image = matplotlib.image.imread(own)
    assert image.ndim == 3 and image.shape[0] > 300 and image.shape[1] > 500
    # the same run drawn again: the same bytes (the figures are byte-reproducible)
    assert plot_learning(tmp_path / "again.png", [figures]).read_bytes() == own.read_bytes()
    saved = []
    for name in ("p0t0", "p1t0"):  # as a user saves them: a BOM, CRLF and a blank line
        saved.append(tmp_path / f"{name}.json")
        saved[-1].write_bytes(b"\xef\xbb\xbf" + json.dumps(runs[name]["figures"]).encode() + b"\r\n\r\n")
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["bench", "plot", *map(str, saved), "--out", str(tmp_path / "both.png")]) == 0
    both = matplotlib.image.imread(tmp_path / "both.png")
    assert buf.getvalue().strip() == str(tmp_path / "both.png")
    assert both.shape == image.shape and not np.array_equal(both, image)  # the other run's line is drawn


@pytest.mark.parametrize("args, words", [
    (("missing.json", "--out", "c.png"), ["missing.json", "no such file"]),
    (("log.txt", "--out", "c.png"), ["log.txt", "val_ct_curve"]),
    (("log.txt", "--out", "c.svg"), ["--out", "c.svg", ".png"]),
])
def test_bench_plot_refuses_bad_input_in_one_line(args, words, tmp_path) -> None:
    (tmp_path / "log.txt").write_text("epoch 1 loss 3.2\n", encoding="utf-8")
    run = subprocess.run([sys.executable, "-m", "vertstudy.cli", "bench", "plot", *args], capture_output=True,
                         text=True, timeout=120, cwd=tmp_path)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    [line] = [ln for ln in run.stderr.splitlines() if ln.strip()]
    assert all(w in line for w in words), line
    assert not list(tmp_path.glob("*.png")) and not list(tmp_path.glob(".c.*"))


def test_earlier_runs_are_read_from_what_json_printed(tmp_path) -> None:
    good = {"train_seed": 1, "val_ct_curve": [[1, 0.1, 0.25], [5, 0.5, 0.9]]}
    log = tmp_path / "log.txt"
    log.write_text("training...\r\n\r\n" + json.dumps(good) + "\r\n\r\n", encoding="utf-8-sig")
    assert read_learn_figures(log) == good
    for name, text, problem in (("none.json", None, "no such file"),
                                ("empty.json", "", "val_ct_curve"),
                                ("table.txt", "epoch  train min\n1  0.1", "val_ct_curve"),
                                ("other.json", json.dumps({"trials": 3}), "val_ct_curve"),
                                ("cut.json", json.dumps(good)[:-8], "val_ct_curve"),
                                ("bad-point.json", json.dumps({"val_ct_curve": [[1, "x", 0.2]]}), "val_ct_curve")):
        path = tmp_path / name
        if text is not None:
            path.write_text(text, encoding="utf-8")
        with pytest.raises(InputError, match=problem) as err:
            read_learn_figures(path)
        assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_best_pt_is_chosen_on_whole_ct_validation_when_it_runs(runs) -> None:
    """As in the quickstart and --scale cpu; the crop loss (the paper's) without whole-CT validation."""
    assert runs["p0t0"]["select_on"] == runs["p1t0"]["select_on"] == "val_ct"
    assert runs["p0t1"]["select_on"] == "val_loss"
