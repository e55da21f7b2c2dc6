"""Tests for data versions (.dvc pointer files) and code versions (git)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from fairdiffusion.errors import DataVersionError
from fairdiffusion.versioning import resolve_code_version, resolve_data_version

DVC_FILE = """\
outs:
- md5: 3f2a9c0e1b7d4a5f6e8c9b0a1d2e3f40.dir
  size: 123456
  nfiles: 321
  hash: md5
  path: data
"""


@pytest.fixture
def git_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Git commits work without a global identity and never see an enclosing repo."""
    for key, value in {
        "GIT_AUTHOR_NAME": "Test",
        "GIT_AUTHOR_EMAIL": "test@example.com",
        "GIT_COMMITTER_NAME": "Test",
        "GIT_COMMITTER_EMAIL": "test@example.com",
        "GIT_CEILING_DIRECTORIES": str(tmp_path.parent),
        "GIT_CONFIG_NOSYSTEM": "1",
    }.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("GIT_DIR", raising=False)
    monkeypatch.delenv("GIT_WORK_TREE", raising=False)


def git(repo: Path, *args: str) -> str:
    done = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, check=True)
    return done.stdout.strip()


def init_repo(repo: Path) -> None:
    repo.mkdir(exist_ok=True)
    git(repo, "init", "-q")
    git(repo, "config", "commit.gpgsign", "false")


def test_data_version_from_dvc_file(tmp_path: Path, git_env: None) -> None:
    path = tmp_path / "data.dvc"
    path.write_text(DVC_FILE)
    version = resolve_data_version(path)
    assert version.dvc_md5 == "3f2a9c0e1b7d4a5f6e8c9b0a1d2e3f40.dir"
    assert version.path == "data"
    assert version.nfiles == 321 and version.size == 123456
    assert version.dvc_file == str(path.resolve())
    assert version.data_dvc_commit is None  # not in a git repo
    assert version.to_dict()["dvc_md5"] == version.dvc_md5


def test_data_version_records_the_commit_that_changed_the_dvc_file(tmp_path: Path, git_env: None) -> None:
    repo = tmp_path / "repo"
    init_repo(repo)
    (repo / "data.dvc").write_text(DVC_FILE)
    git(repo, "add", "data.dvc")
    git(repo, "commit", "-q", "-m", "data v1")
    first = git(repo, "rev-parse", "HEAD")
    (repo / "other.txt").write_text("unrelated")
    git(repo, "add", "other.txt")
    git(repo, "commit", "-q", "-m", "unrelated change")
    assert resolve_data_version(repo / "data.dvc").data_dvc_commit == first
    assert git(repo, "rev-parse", "HEAD") != first


@pytest.mark.parametrize(
    "text",
    [
        "outs: []\n",
        "stages: {}\n",
        "outs:\n- path: data\n",
        "outs:\n- md5:\n  path: data\n",
        "outs:\n- md5: ''\n  path: data\n",
        "outs: not-a-list\n",
        "just text\n",
        "outs: [unclosed\n",
        "",
    ],
)
def test_malformed_dvc_file(tmp_path: Path, text: str) -> None:
    path = tmp_path / "data.dvc"
    path.write_text(text)
    with pytest.raises(DataVersionError, match=r"not a DVC pointer file with an 'outs\[0\].md5' entry") as info:
        resolve_data_version(path)
    assert str(path.resolve()) in str(info.value)


def test_dvc_file_with_two_outputs(tmp_path: Path) -> None:
    path = tmp_path / "data.dvc"
    path.write_text("outs:\n- md5: aa\n  path: a\n- md5: bb\n  path: b\n")
    with pytest.raises(DataVersionError, match="tracks 2 outputs; expected exactly one"):
        resolve_data_version(path)


def test_missing_dvc_file(tmp_path: Path) -> None:
    with pytest.raises(DataVersionError, match="DVC pointer file not found") as info:
        resolve_data_version(tmp_path / "absent.dvc")
    assert "absent.dvc" in str(info.value)


def test_code_version_and_dirty_flag(tmp_path: Path, git_env: None) -> None:
    repo = tmp_path / "code"
    init_repo(repo)
    (repo / "module.py").write_text("x = 1\n")
    git(repo, "add", "module.py")
    git(repo, "commit", "-q", "-m", "first")
    head = git(repo, "rev-parse", "HEAD")

    clean = resolve_code_version(repo)
    assert clean.git_commit == head and len(head) == 40
    assert clean.dirty is False

    (repo / "untracked.txt").write_text("untracked files do not count")
    assert resolve_code_version(repo).dirty is False

    (repo / "module.py").write_text("x = 2\n")
    dirty = resolve_code_version(repo)
    assert dirty.git_commit == head and dirty.dirty is True
    assert dirty.to_dict() == {"git_commit": head, "dirty": True}

    git(repo, "commit", "-q", "-am", "second")
    after = resolve_code_version(repo)
    assert after.dirty is False and after.git_commit != head


def test_code_version_outside_a_repo(tmp_path: Path, git_env: None) -> None:
    version = resolve_code_version(tmp_path)
    assert version.git_commit is None and version.dirty is None
