"""What integration tests share: Prefect's test harness, and an MLflow store and a DVC project made once.

The harness (a real Prefect API server in its own process, SQLite in a temporary
folder) is started once per session and every module uses it: each start costs 12-15 s
on two cores. No module may start a harness of its own: nested under the session's, one
(``test_pipeline``'s, once) saw its events fail to send and its promotion's concurrency
lease fail to renew (410). Modules keep apart by MLflow store, model and artifact names.
Creating an MLflow SQLite store or a DVC project costs a few seconds: those are made
once per session too.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from user_project import make_dvc_project, write_subset  # noqa: E402


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[str]:
    """Flows in this process report to a temporary Prefect server; yields its API URL (for subprocesses)."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"  # no telemetry calls (no network here)
    with prefect_test_harness(server_startup_timeout=300):
        yield str(PREFECT_API_URL.value())


@pytest.fixture(scope="session")
def mlflow_store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The tracking URI of a SQLite MLflow store whose schema is created once (its migrations cost seconds).

    Tests that share it keep apart by experiment and registered-model names.
    """
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    MlflowClient(uri).search_experiments()  # creates the tables
    return uri


@pytest.fixture(scope="session")
def layout_datasets(
    tmp_path_factory: pytest.TempPathFactory, ham10000_dataset: Path, chexpert_dataset: Path
) -> dict[str, Path]:
    """Small HAM10000 and CheXpert datasets in their public layouts, in one DVC-versioned repo.

    Pushed to a local remote, then removed with the cache: the first flow that needs one
    pulls it. Keyed by ``data.format``; each ``.dvc`` file is beside its folder.
    """
    subsets = tmp_path_factory.mktemp("subsets")
    ham = write_subset(ham10000_dataset, subsets / ham10000_dataset.name, "ham10000")
    chexpert = write_subset(chexpert_dataset, subsets / chexpert_dataset.name, "chexpert")
    ham_copy, chexpert_copy = make_dvc_project(tmp_path_factory.mktemp("layouts"), [ham, chexpert])
    return {"ham10000": ham_copy, "chexpert": chexpert_copy}
