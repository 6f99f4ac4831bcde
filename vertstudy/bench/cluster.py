"""``vertstudy bench cluster``: what more worker nodes buy, and how fast a dead one is replaced.

Both parts run real local multi-node clusters (:mod:`vertstudy.localcluster`: a head with no
CPUs and worker nodes of 1 CPU each, token authentication on) and real studies of the real
network at smoke scale, side by side in one invocation:

- **throughput**: the same study (``trials`` trials of ``epochs`` epochs, up to 2 at a time) on
  a cluster of 1 worker node, then on one of 2 worker nodes. Trials per minute are counted from
  the first trial's start to the last trial's end (Tune callback times); the phantoms and the
  cache are prepared once beforehand, so both runs do the same work.
- **recovery**: 2 trials on a cluster of 3 worker nodes (one idle). When both trials have
  reported epoch ``kill_at``, the node of one of them is SIGKILLed; Tune callbacks time, from
  the kill: Ray reporting the trial failed (``detect_s``), the trial started again
  (``restart_s``), and its first result on another node (``first_result_s``), which includes
  restoring the checkpoint and training one epoch (``epoch_s``, the trial's median before the kill);
  ``epochs_redone``: epochs reported before the kill that the trial trained again (its last
  checkpoint can be one report behind what the driver has seen).
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path
from typing import Any

from ray import tune

from vertstudy.bench import format_figures, smoke_study, work_folder


def _spec(storage: Path, name: str, trials: int, epochs: int, grid: bool = False):
    """The bench's study: random B (throughput), or a grid of ``trials`` B values (recovery)."""
    if grid:
        space = {"loss.balance_b": {"type": "choice", "values": [2.0 + i / 10 for i in range(trials)]}}
        return smoke_study(storage, name, "bench cluster", trials=1, epochs=epochs, space=space, algorithm="grid",
                           max_retries=2)
    return smoke_study(storage, name, "bench cluster", trials=trials, epochs=epochs, max_retries=2)


def _connect(cluster) -> None:
    import ray

    from vertstudy.study.compat import reload_auth_token

    # this process talks to several clusters, each with its own token, which Ray reads only from
    # the environment: the benchmark's one write to it, then Ray reads the new token
    os.environ.update({k: v for k, v in cluster.env().items() if k != "RAY_ADDRESS"})
    reload_auth_token()
    ray.init(address=cluster.address, log_to_driver=False, logging_level="ERROR")


def _throughput(work: Path, workers: int, trials: int, epochs: int, log) -> dict[str, float]:
    import pyarrow.parquet as pq
    import ray

    from vertstudy.localcluster import start_local_cluster, stop_local_cluster
    from vertstudy.study.runner import run_study

    root = work / f"c{workers}"
    cluster = start_local_cluster(root, workers=workers, cpus_per_worker=1, object_store_mb=80, log=lambda _: None)
    watch = _Watch(root, kill_at=None)
    try:
        _connect(cluster)
        t0 = time.perf_counter()
        result = run_study(_spec(work / "st", f"tp{workers}", trials, epochs), progress=False, callbacks=(watch,))
        wall = time.perf_counter() - t0
        rows = pq.read_table(Path(result.study_dir) / "trials.parquet").to_pylist()
    finally:
        ray.shutdown()
        stop_local_cluster(root, log=lambda _: None)
    starts = [e[0] for e in watch.events if e[1] == "start"]
    ends = [e[0] for e in watch.events if e[1] == "complete"]
    span = max(ends) - min(starts)
    nodes = len({r["node"] for r in rows})
    log(f"{workers} worker node(s): {len(rows)} trials in {span:.1f} s on {nodes} node(s)")
    return {"span_s": span, "wall_s": wall, "trials_per_min": 60.0 * len(rows) / span, "nodes_used": nodes,
            "completed": sum(r["status"] == "completed" for r in rows)}


class _Watch(tune.Callback):
    """A Tune callback that times trial events and SIGKILLs the node of the first trial once
    both trials have reported epoch ``kill_at`` (never when ``kill_at`` is None)."""

    def __init__(self, root: Path, kill_at: int | None):
        self.root, self.kill_at = root, kill_at
        self.events: list[tuple[float, str, str, Any, Any]] = []
        self.epoch: dict[str, int] = {}
        self.killed: tuple[float, str, int, int] | None = None  # time, trial, worker index, epoch

    def _log(self, kind: str, trial, epoch=None, node=None) -> None:
        self.events.append((time.time(), kind, trial.trial_id, epoch, node))

    def on_trial_start(self, iteration, trials, trial, **info):
        self._log("start", trial)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._log("complete", trial)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._log("error", trial)

    def on_trial_recover(self, iteration, trials, trial, **info):
        self._log("recover", trial)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        from vertstudy.localcluster import kill_worker, load_cluster

        self._log("result", trial, result.get("epoch"), result.get("node"))
        if "epoch" in result:
            self.epoch[trial.trial_id] = int(result["epoch"])
        if self.kill_at and self.killed is None and len(self.epoch) == 2 and min(self.epoch.values()) >= self.kill_at:
            index = next(n.index for n in load_cluster(self.root).workers() if n.node_id == result["node"])
            self.killed = (time.time(), trial.trial_id, index, int(result["epoch"]))
            kill_worker(self.root, index)


def _recovery(work: Path, epochs: int, kill_at: int, log) -> dict[str, float]:
    import ray

    from vertstudy.localcluster import load_cluster, start_local_cluster, stop_local_cluster
    from vertstudy.study.runner import run_study

    root = work / "ck"
    cluster = start_local_cluster(root, workers=3, cpus_per_worker=1, object_store_mb=80, log=lambda _: None)
    watch = _Watch(root, kill_at)
    try:
        _connect(cluster)
        result = run_study(_spec(work / "st", "recover", 2, epochs, grid=True), progress=False,
                           callbacks=(watch,))
    finally:
        ray.shutdown()
        stop_local_cluster(root, log=lambda _: None)
    if watch.killed is None:
        raise RuntimeError("the trials ended before both reached the kill epoch; raise --epochs")
    t_kill, victim, index, kill_epoch = watch.killed
    dead = next(n.node_id for n in load_cluster(root).nodes if n.index == index)
    after = [e for e in watch.events if e[2] == victim and e[0] >= t_kill]
    before = [e for e in watch.events if e[2] == victim and e[0] < t_kill and e[1] == "result" and e[3]]
    epoch_times = [b[0] - a[0] for a, b in zip(before, before[1:])]

    def first(kind: str, new_node: bool = False) -> float:
        hit = next((e for e in after if e[1] == kind and (not new_node or (e[4] and e[4] != dead))), None)
        return hit[0] - t_kill if hit else float("nan")

    resumed = next((e[3] for e in after if e[1] == "result" and e[3] and e[4] != dead), None)
    figures = {
        "epochs_redone": kill_epoch - (resumed - 1) if resumed else float("nan"),
        "detect_s": min((t for t in (first("error"), first("recover")) if t == t), default=float("nan")),
        "restart_s": first("start"),
        "first_result_s": first("result", new_node=True),
        "epoch_s": statistics.median(epoch_times) if epoch_times else float("nan"),
        "completed": result.counts.get("completed", 0),
    }
    for e in after[:6]:
        log(f"  +{e[0] - t_kill:6.2f} s  {e[1]:<8} {e[2]} epoch {e[3]} node {str(e[4])[:8]}")
    log(f"worker {index} killed with trial {victim} at epoch {kill_epoch}: detected after "
        f"{figures['detect_s']:.2f} s, restarted after {figures['restart_s']:.2f} s, first result on another node "
        f"after {figures['first_result_s']:.2f} s")
    return figures


def bench_cluster(trials: int = 6, epochs: int = 16, recovery_epochs: int = 12, kill_at: int = 3,
                  workdir: Path | None = None, log=print) -> dict[str, float]:
    """The figures (see the module docstring)."""
    from vertstudy.study.dataset import materialize

    # always a new short folder (Ray's socket paths), under --workdir when given
    with work_folder(None, "vs-bc-", str(workdir) if workdir else "/tmp") as work:
        spec = _spec(work / "st", "prep", trials, epochs)
        materialize(spec.data, spec.base_config, work / "st", progress=False)  # phantoms + cache, once
        one = _throughput(work, 1, trials, epochs, log)
        two = _throughput(work, 2, trials, epochs, log)
        rec = _recovery(work, recovery_epochs, kill_at, log)
    return {
        "trials": trials, "epochs_per_trial": epochs,
        "one_worker_trials_per_min": one["trials_per_min"], "two_workers_trials_per_min": two["trials_per_min"],
        "two_to_one_worker_ratio": two["trials_per_min"] / one["trials_per_min"],
        "one_worker_span_s": one["span_s"], "two_workers_span_s": two["span_s"],
        "two_workers_nodes_used": two["nodes_used"],
        "recovery_detect_s": rec["detect_s"], "recovery_restart_s": rec["restart_s"],
        "recovery_first_result_s": rec["first_result_s"], "recovery_epoch_s": rec["epoch_s"],
        "recovery_epochs_redone": rec["epochs_redone"],
    }


def format_table(figures: dict[str, float]) -> str:
    return format_figures("bench cluster (local multi-node Ray, smoke-scale trials)", figures)
