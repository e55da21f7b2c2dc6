"""`prefect deploy --all` registers the weekly deployment on a real Prefect server.

The server is the session's test harness (``conftest.py``), a real Prefect API in its own
process: starting another costs 20-50 s on two cores. A `prefect server start` as users run
it is exercised by ``test_data_trigger``, which deploys the same ``prefect.yaml`` to one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
PREFECT = str(Path(sys.executable).parent / "prefect")


def test_prefect_deploy_registers_the_weekly_schedule(prefect_harness: str, tmp_path: Path) -> None:
    api = prefect_harness
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env |= {"PREFECT_HOME": str(tmp_path / "home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    # FAIRDIFFUSION_CHECKOUT is the worker's, not the deployer's (README, Scheduled retraining).
    env.pop("FAIRDIFFUSION_CHECKOUT", None)
    client_env = env | {"PREFECT_API_URL": api, "COLUMNS": "250"}

    def prefect(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([PREFECT, *args], cwd=REPO, env=client_env, capture_output=True, text=True, check=False)

    assert prefect("work-pool", "create", "fairdiffusion", "--type", "process").returncode == 0
    deployed = prefect("--no-prompt", "deploy", "--all")
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    listed = prefect("deployment", "ls")
    assert listed.returncode == 0 and "weekly-retraining" in listed.stdout, listed.stderr

    request = urllib.request.Request(f"{api}/deployments/name/fairdiffusion-pipeline/weekly-retraining", method="GET")
    with urllib.request.urlopen(request, timeout=30) as response:
        deployment = json.loads(response.read())
    assert deployment["entrypoint"] == "flows/pipeline.py:fairdiffusion_pipeline"
    assert deployment["parameters"] == {"config_path": "configs/production.yaml", "per_run_outputs": True}
    assert deployment["global_concurrency_limit"]["limit"] == 1
    assert deployment["concurrency_options"]["collision_strategy"] == "ENQUEUE"
    # Filled in at deploy time from the Prefect variable (unset here: empty, the config's URI applies).
    assert deployment["job_variables"] == {"env": {"MLFLOW_TRACKING_URI": ""}}
    # Kept as written: the worker's environment names the checkout when a run starts.
    directory = deployment["pull_steps"][0]["prefect.deployments.steps.set_working_directory"]["directory"]
    assert directory == "{{ $FAIRDIFFUSION_CHECKOUT }}"
    assert [s["schedule"]["cron"] for s in deployment["schedules"]] == ["0 2 * * 1"]
    assert deployment["work_pool_name"] == "fairdiffusion"
