"""A pipeline killed with SIGKILL during training, then rerun with the same command.

``fairdiffusion run -c CONFIG`` runs as a user starts it (MLflow in SQLite, the data
pulled by DVC from a local remote), reporting to the session's Prefect test server. Once
training has written its first complete checkpoint the process is killed with SIGKILL,
which nothing can catch: its MLflow run stays RUNNING and its checkpoints stay on disk.
Then the same command runs again.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fairdiffusion import tracking
from fairdiffusion.config import load_config
from fairdiffusion.registry import schema
from fairdiffusion.registry.promotion import read_lineage
from fairdiffusion.training.checkpoints import checkpoint_step, complete_checkpoints

sys.path.insert(0, str(Path(__file__).parent))
from user_project import fast_config, write_config  # noqa: E402

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
TRACEBACK = "Traceback (most recent call last)"


def _start(command: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        # Its own session: whatever it might leave behind can be ended by group.
        return subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _wait_for_checkpoint(process: subprocess.Popen[bytes], root: Path, log: Path, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not complete_checkpoints(root):
        assert process.poll() is None, f"the run ended before training:\n{log.read_text()}"
        assert time.monotonic() < deadline, f"no checkpoint after {timeout} s:\n{log.read_text()}"
        time.sleep(0.1)


def _end_group(process: subprocess.Popen[bytes]) -> None:
    """SIGKILL what is left of the process group this test started (nothing, unless the run spawned helpers)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)


def test_a_run_killed_during_training_is_closed_and_resumed_by_the_rerun(
    prefect_harness: str, mlflow_store: str, layout_datasets: dict[str, Path], tiny_pipeline_dir: Path, tmp_path: Path
) -> None:
    """The rerun resumes training, closes the killed run as KILLED, and prints no traceback.

    Documented behaviour: with ``training.resume: latest`` the rerun *resumes* training
    from the newest complete checkpoint of the killed run (a ``.partial`` folder the kill
    may have left is ignored and removed) instead of starting again at step 0; the stages
    before and after training run again as usual, and the rerun logs to an MLflow run of
    its own. The killed process's run, still RUNNING, is ended as KILLED when the rerun
    opens its run, with the reason in ``fd.run.end_reason``; a RUNNING run whose process
    is alive, or on another host, is left alone. Exit status 0: the permissive gate passes.
    """
    data = layout_datasets["ham10000"]
    document = fast_config(tmp_path, data, {"format": "ham10000"}, tiny_pipeline_dir, mlflow_store, "killed-and-rerun")
    document["training"] |= {"max_steps": 2, "checkpoint_every": 1, "resume": "latest"}
    document["evaluation"]["clinical"] = {"enabled": False}
    config_path = write_config(tmp_path / "config.yaml", document)
    config = load_config(config_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env |= {"PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_API_URL": prefect_harness}
    command = [str(BIN / "fairdiffusion"), "run", "-c", str(config_path)]
    checkpoints = tmp_path / "train" / "checkpoints"

    killed = _start(command, env, tmp_path / "killed.log")
    try:
        _wait_for_checkpoint(killed, checkpoints, tmp_path / "killed.log")
        killed.send_signal(signal.SIGKILL)
        assert killed.wait(timeout=60) == -signal.SIGKILL
        assert not (tmp_path / "train" / "pipeline" / "model_index.json").exists(), "killed before training ended"
        resumed_step = checkpoint_step(complete_checkpoints(checkpoints)[-1])
        # Two runs the rerun must leave open: this (live) process's, and one of another host.
        live = tracking.start_run(config.tracking, "live", {schema.RUN_OWNER: tracking.process_owner()})
        remote = tracking.start_run(config.tracking, "remote", {schema.RUN_OWNER: "another-host.invalid:1:1"})

        rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, check=False)
    finally:
        _end_group(killed)

    output = rerun.stdout + rerun.stderr
    assert rerun.returncode == 0, output
    assert TRACEBACK not in output, output
    client = tracking.mlflow_client(config.tracking)
    experiment = client.get_experiment_by_name(config.tracking.experiment)
    runs = {r.info.run_id: r for r in client.search_runs([experiment.experiment_id])}
    pids = {run_id: r.data.tags.get(schema.RUN_OWNER, "::").rsplit(":", 2)[1] for run_id, r in runs.items()}
    [killed_run] = [runs[run_id] for run_id, pid in pids.items() if pid == str(killed.pid)]
    assert killed_run.info.status == "KILLED"
    assert "ended without closing it" in killed_run.data.tags[schema.RUN_END_REASON]
    assert runs[live].info.status == "RUNNING" and runs[remote].info.status == "RUNNING"
    [rerun_run] = [r for i, r in runs.items() if i not in (killed_run.info.run_id, live, remote)]
    assert rerun_run.info.status == "FINISHED"
    assert read_lineage(config.tracking, alias=schema.CHAMPION).run_id == rerun_run.info.run_id
    steps = sorted(m.step for m in client.get_metric_history(rerun_run.info.run_id, "train/loss"))
    assert steps == list(range(resumed_step + 1, 3)), f"resumed after step {resumed_step}: {steps}"
    assert (tmp_path / "train" / "pipeline" / "model_index.json").is_file()
