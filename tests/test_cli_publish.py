"""``fairdiffusion data publish`` as a user runs it: exit status, one-line errors, what was published and sent.

A real git repository with the synthetic FairGenMed data under DVC (local remote), made
once and copied per test. The event's delivery to a live server is covered by
``tests/integration/test_data_trigger.py``.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

CLI = Path(sys.executable).with_name("fairdiffusion")
GIT_ENV = {
    "GIT_AUTHOR_NAME": "Test",
    "GIT_AUTHOR_EMAIL": "test@example.com",
    "GIT_COMMITTER_NAME": "Test",
    "GIT_COMMITTER_EMAIL": "test@example.com",
    "GIT_CONFIG_NOSYSTEM": "1",
}
CONFIG = "data:\n  path: data\n  dvc_file: data.dvc\nvalidation:\n  min_group_count: 2\n  image_shape: [32, 32]\n"
TRACEBACK = "Traceback (most recent call last)"


def run(repo: Path, *args: str) -> str:
    done = subprocess.run(list(args), cwd=repo, capture_output=True, text=True, check=False, env=os.environ | GIT_ENV)
    assert done.returncode == 0, f"{args}: {done.stdout}\n{done.stderr}"
    return done.stdout.strip()


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory, valid_dataset: Path) -> Path:
    """``repo/`` (data v1 committed, pushed to ``remote/`` as config.local names it); made once."""
    root = tmp_path_factory.mktemp("publish-cli")
    repo = root / "repo"
    shutil.copytree(valid_dataset, repo / "data")
    (repo / "config.yaml").write_text(CONFIG)
    run(repo, "git", "init", "-q")
    for args in (
        ["init", "-q"],
        ["remote", "add", "--local", "-d", "local", str(root / "remote")],
        ["add", "-q", "data"],
    ):
        run(repo, sys.executable, "-m", "dvc", *args)
    run(repo, sys.executable, "-m", "dvc", "push", "-q")
    run(repo, "git", "add", "-A")
    run(repo, "git", "-c", "commit.gpgsign=false", "commit", "-qm", "data v1")
    return root


@pytest.fixture
def repo(template: Path, tmp_path: Path) -> Path:
    shutil.copytree(template / "remote", tmp_path / "remote")
    repo = Path(shutil.copytree(template / "repo", tmp_path / "repo"))
    local = repo / ".dvc" / "config.local"
    local.write_text(local.read_text().replace(str(template / "remote"), str(tmp_path / "remote")))
    return repo


def publish(repo: Path, *args: str, api_url: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))} | GIT_ENV
    env |= {"PREFECT_HOME": str(repo.parent / "prefect-home"), "GIT_CEILING_DIRECTORIES": str(repo.parent)}
    env |= {"PREFECT_API_URL": api_url} if api_url else {}
    command = [str(CLI), "data", "publish", *args]
    return subprocess.run(command, cwd=repo, env=env, capture_output=True, text=True, timeout=300, check=False)


def grow(repo: Path) -> None:
    from fairdiffusion.data.demo import demo_subjects
    from fairdiffusion.data.fairgenmed import add_subjects

    add_subjects(repo / "data", "train", demo_subjects(2, seed=7, image_size=32))


def unreachable_api() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/api"  # nothing listens once the socket is closed


def one_error_line(done: subprocess.CompletedProcess[str]) -> str:
    assert TRACEBACK not in done.stderr + done.stdout
    lines = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, done.stderr
    return lines[0]


def head(repo: Path) -> str:
    return run(repo, "git", "rev-parse", "HEAD")


def test_a_folder_dvc_does_not_track_is_refused_in_one_line(repo: Path) -> None:
    (repo / "incoming").mkdir()
    done = publish(repo, "incoming", "-c", "config.yaml")
    assert done.returncode == 1
    assert "incoming is not a DVC-tracked dataset" in one_error_line(done)
    done = publish(repo, "absent")
    assert done.returncode == 1 and "absent: no such dataset folder" in one_error_line(done)


def test_nothing_changed_exits_0_and_sends_nothing(repo: Path) -> None:
    commit = head(repo)
    # An unreachable server would fail the command if an event were attempted.
    done = publish(repo, "-c", "config.yaml", api_url=unreachable_api())
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"Nothing to publish: data matches data.dvc as committed in {commit}")
    assert "no event sent" in done.stdout and head(repo) == commit
    done = publish(repo, "-c", "config.yaml", "--json")
    result = json.loads(done.stdout)
    assert done.returncode == 0 and result["published"] is False and result["event"] is None


def test_data_that_fails_validation_is_not_published(repo: Path) -> None:
    grow(repo)
    bad = sorted((repo / "data" / "train").glob("data_*.npz"))[1]
    bad.write_bytes(b"garbage, not an npz archive")
    pointer, commit = (repo / "data.dvc").read_text(), head(repo)
    done = publish(repo, "-c", "config.yaml")
    assert done.returncode == 1
    assert one_error_line(done) == "error: data fails validation: nothing published"
    assert "validation FAILED" in done.stderr and bad.stem in done.stderr  # the failed rules, above the error
    assert (repo / "data.dvc").read_text() == pointer and head(repo) == commit


def test_without_a_prefect_api_the_data_is_published_and_no_event_sent(repo: Path) -> None:
    grow(repo)
    done = publish(repo, "-c", "config.yaml", "-m", "data v2: two subjects")
    assert done.returncode == 0, done.stderr
    assert f"Committed      : data.dvc in {head(repo)}" in done.stdout
    assert "Pushed         : to the DVC remote" in done.stdout
    assert "Event          : fairdiffusion.data.published not sent (PREFECT_API_URL is not set)" in done.stdout
    assert run(repo, "git", "log", "-1", "--format=%s") == "data v2: two subjects"


def test_an_event_that_cannot_be_sent_exits_1_after_publishing(repo: Path) -> None:
    grow(repo)
    api = unreachable_api()
    done = publish(repo, "--config", "config.yaml", "--json", "--no-push", api_url=api)
    assert done.returncode == 1
    result = json.loads(done.stdout)  # the publication still prints: the data is versioned
    assert result["published"] and not result["pushed"] and result["commit"] == head(repo)
    assert result["event"]["sent"] is False and result["event"]["api_url"] == api
    line = one_error_line(done)
    assert f"data published (commit {head(repo)}), but the event fairdiffusion.data.published did not reach" in line
    assert f"--param data_md5={result['dvc_md5']}" in line


def test_usage_errors_exit_2(repo: Path) -> None:
    done = publish(repo, "--bogus")
    assert done.returncode == 2 and TRACEBACK not in done.stderr
