"""The Ray behaviour :mod:`vertstudy.study.compat` assumes, checked against the installed Ray: a
Ray upgrade that changes it fails here, by name, instead of mixing studies in the field."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from vertstudy.study.compat import (
    StagingTurn,
    init_local_ray,
    mark_completed,
    reload_auth_token,
    session_artifacts_dir,
    staging_stamp,
)


@pytest.fixture(scope="module")
def ray_session(short_dir):
    import ray

    init_local_ray(1, short_dir / "ray", object_store_mb=80)
    yield
    ray.shutdown()


def storage_context(path: Path):
    from ray.train._internal.storage import StorageContext

    return StorageContext(storage_path=str(path), experiment_dir_name="ray")


def test_tune_stages_a_driver_in_a_folder_named_by_the_second_it_started(ray_session, tmp_path):
    before = staging_stamp()
    context = storage_context(tmp_path)
    after = staging_stamp()
    staging = Path(context.experiment_driver_staging_path)
    assert staging.parent.parent.parent == session_artifacts_dir()
    assert staging.parent.name == "ray" and staging.name == "driver_artifacts"
    assert before <= staging.parts[-3] <= after, "Tune no longer names the staging folder by date_str()"


def test_drivers_taking_turns_get_staging_folders_of_their_own(ray_session, tmp_path):
    folders = []
    for _ in range(3):  # back to back, as fast as drivers started together would be
        with StagingTurn() as turn:
            folders.append(storage_context(tmp_path).experiment_driver_staging_path)
            turn.setup()  # Tune calls it once the staging folder is named: the next driver may go
    assert len(set(folders)) == 3, folders


def test_a_staging_turn_pickles_without_its_lock(ray_session):
    import pickle

    with StagingTurn() as turn:
        copy = pickle.loads(pickle.dumps(turn))
    assert copy._lock is None and turn._lock is None


def test_a_finished_optuna_trial_ignores_late_results():
    from ray.tune.search.optuna import OptunaSearch

    search = OptunaSearch(space={"b": optuna.distributions.FloatDistribution(2.0, 4.0)}, metric="m", mode="min")
    search.suggest("t1")
    mark_completed(search, "t1")
    search.on_trial_result("t1", {"m": 1.0})  # would report to a trial Optuna already holds finished
    search.on_trial_complete("t1", {"m": 1.0})
    assert search._ot_study.trials[0].state == optuna.trial.TrialState.RUNNING  # untouched: ignored


def test_an_embedded_ray_keeps_its_session_in_the_folder_given(ray_session, short_dir):
    assert session_artifacts_dir().is_relative_to(short_dir / "ray"), session_artifacts_dir()


def test_ray_can_be_told_to_read_its_token_again(ray_session):
    reload_auth_token()  # the private names it uses exist and accept being called


def test_the_staging_turn_is_a_tune_callback_importable_by_name():
    import pickle

    from ray.tune import Callback

    from vertstudy.study import compat

    assert issubclass(compat.StagingTurn, Callback) and compat.StagingTurn is StagingTurn
    assert type(pickle.loads(pickle.dumps(StagingTurn()))) is StagingTurn


LIGHT_DRIVER = """
import json, os, sys
from vertstudy.study.compat import driver_environment
os.environ.update(driver_environment(os.environ))
from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback, TBXLoggerCallback
from ray.tune.utils.callback import _create_default_callbacks
import vertstudy.infer.evaluate, vertstudy.study.runner as runner
from vertstudy.study.spec import validate_spec
from tests.study.conftest import tiny_study
spec = validate_spec(tiny_study("light", sys.argv[1]), "light")
callbacks = _create_default_callbacks(runner._callbacks(spec, sys.argv[1] + "/light", {}, progress=False))
print(json.dumps({kind.__name__: sum(isinstance(c, kind) for c in callbacks)
                  for kind in (JsonLoggerCallback, CSVLoggerCallback, TBXLoggerCallback)}
                 | {m: m in sys.modules for m in ("torch", "sklearn", "tensorboardX")}))
"""


def test_a_study_driver_writes_result_json_and_imports_neither_torch_nor_tensorboardx(tmp_path):
    """Tune's CSV and TensorBoard loggers stay off (driver_environment), its JSON logger (the
    tables' result.json) is on exactly once, and the driver's modules, the baseline's included,
    import neither torch nor sklearn: a driver process does not pay seconds for them."""
    import json
    import subprocess
    import sys

    env = {k: v for k, v in __import__("os").environ.items() if k != "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"}
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", LIGHT_DRIVER, str(tmp_path)], capture_output=True, text=True,
                         cwd=root, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    found = json.loads(out.stdout.strip().splitlines()[-1])
    assert found == {"JsonLoggerCallback": 1, "CSVLoggerCallback": 0, "TBXLoggerCallback": 0,
                     "torch": False, "sklearn": False, "tensorboardX": False}, found


def _saved_trial(trial_id: str, folder: Path, indices: list[int]) -> list[str]:
    """One ``trial_data`` entry of Ray's experiment state: a trial whose checkpoint manager
    (``num_to_keep=2``) registered checkpoints ``indices`` under ``folder``, as Ray's driver does."""
    import json

    import pyarrow.fs as pafs
    from ray.train._internal.checkpoint_manager import _CheckpointManager
    from ray.train._internal.session import _TrainingResult
    from ray.tune import Checkpoint, CheckpointConfig
    from ray.tune.trainable.metadata import _TrainingRunMetadata

    metadata = _TrainingRunMetadata()
    metadata.checkpoint_manager = _CheckpointManager(CheckpointConfig(num_to_keep=2))
    for i in indices:
        path = folder / trial_id / f"checkpoint_{i:06d}"
        path.mkdir(parents=True, exist_ok=True)
        metadata.checkpoint_manager.register_checkpoint(_TrainingResult(
            Checkpoint(str(path), filesystem=pafs.LocalFileSystem()), {"training_iteration": i + 1}))
    return [json.dumps({"trial_id": trial_id}), metadata.get_json_state()]


def test_a_saved_state_naming_deleted_checkpoints_falls_back_to_kept_ones_or_none(tmp_path):
    """Ray deletes checkpoints beyond ``num_to_keep`` when a newer one registers, and its saved
    state may be older than the deletion: ``forget_lost_checkpoints`` points such a trial at the
    newest of its recorded checkpoints still there, or at none (Tune then starts it afresh), and
    leaves the others alone. What Ray restores from the rewritten entries says the same."""
    import json

    from ray.tune.experiment import Trial

    from vertstudy.study.compat import forget_lost_checkpoints

    state = {"trial_data": [_saved_trial(t, tmp_path, [0, 1, 2]) for t in ("a", "b", "c")]}
    assert not (tmp_path / "a" / "checkpoint_000000").exists()  # Ray deleted it (num_to_keep=2)
    before = json.loads(json.dumps(state))
    (tmp_path / "b" / "checkpoint_000002").rmdir()  # the latest lost, the one before kept
    for name in ("checkpoint_000001", "checkpoint_000002"):  # every recorded one lost
        (tmp_path / "c" / name).rmdir()
    (tmp_path / "c" / "checkpoint_000003").mkdir()  # a newer one the state does not name: not used

    def exists(trial_id: str, name: str) -> bool:
        return (tmp_path / trial_id / name).is_dir()

    changed = forget_lost_checkpoints(state, exists)
    assert changed == [("b", "checkpoint_000002", "checkpoint_000001"), ("c", "checkpoint_000002", "")]
    assert state["trial_data"][0] == before["trial_data"][0]
    restored = {}
    for entry in state["trial_data"]:
        trial = Trial("vertstudy_compat_check", stub=True, trial_id=json.loads(entry[0])["trial_id"])
        trial.restore_run_metadata(entry[1])
        restored[trial.trial_id] = trial.checkpoint and Path(trial.checkpoint.path).name
    assert restored == {"a": "checkpoint_000002", "b": "checkpoint_000001", "c": None}
    assert forget_lost_checkpoints(state, exists) == []  # nothing left to forget
