"""``vertstudy bench study`` runs its three sides (plain Optuna, the platform, bare Tune) on a real
local Ray cluster and its figures add up (no timing is asserted: benchmarks are commands)."""

from __future__ import annotations

import pytest

from vertstudy.bench.study import bench_study


def test_bench_study_runs_every_side_and_its_overheads_add_up(ray_cluster, tmp_path):
    figures = bench_study(trials=2, concurrency=2, epochs=1, wandb="offline", workdir=tmp_path, progress=False)
    assert figures["trials_completed"] == figures["bare_tune_trials_completed"] == 2
    plain, platform, bare = figures["plain_optuna_s"], figures["platform_s"], figures["bare_tune_s"]
    assert plain > 0 and platform > 0 and bare > 0
    assert figures["overhead_per_trial_s"] == pytest.approx((platform - plain) * 2 / 2)
    assert figures["bare_tune_overhead_per_trial_s"] == pytest.approx((bare - plain) * 2 / 2)
    assert figures["vertstudy_overhead_per_trial_s"] + figures["bare_tune_overhead_per_trial_s"] == pytest.approx(
        figures["overhead_per_trial_s"])
    assert figures["ray_local_start_s"] < 0.5  # the test's cluster was reused, not a second one started
    # the plain and the bare-Tune trials really trained: each left its best.pt in a folder of its own
    assert len(list(tmp_path.glob("tmp*/best.pt"))) == 2 + 2
    assert (tmp_path / "bare-tune" / "bare").is_dir()
