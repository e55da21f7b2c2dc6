"""Publishing a data version: the real DVC (local remote) and git in a temporary repository."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fairdiffusion.data.versioning import DataPublication, publish_data, require_data_md5, resolve_data_version
from fairdiffusion.errors import DataVersionError

GIT_ENV = {
    "GIT_AUTHOR_NAME": "Test",
    "GIT_AUTHOR_EMAIL": "test@example.com",
    "GIT_COMMITTER_NAME": "Test",
    "GIT_COMMITTER_EMAIL": "test@example.com",
    "GIT_CONFIG_NOSYSTEM": "1",
}


def run(repo: Path, *args: str) -> str:
    done = subprocess.run(list(args), cwd=repo, capture_output=True, text=True, check=False)
    assert done.returncode == 0, f"{args}: {done.stdout}\n{done.stderr}"
    return done.stdout.strip()


def dvc(repo: Path, *args: str) -> str:
    return run(repo, sys.executable, "-m", "dvc", *args)


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A git repo whose ``data`` folder DVC tracks (v1 committed and pushed to ``../remote``); made once."""
    root = tmp_path_factory.mktemp("publish-template")
    with pytest.MonkeyPatch.context() as env:
        for key, value in GIT_ENV.items():
            env.setenv(key, value)
        repo = root / "repo"
        (repo / "data").mkdir(parents=True)
        (repo / "data" / "a.txt").write_text("a\n")
        run(repo, "git", "init", "-q")
        run(repo, "git", "config", "commit.gpgsign", "false")
        dvc(repo, "init", "-q")
        dvc(repo, "config", "core.analytics", "false")
        # In config.local (git ignores it), so that a copy can point at its own remote.
        dvc(repo, "remote", "add", "--local", "-d", "local", str(root / "remote"))
        dvc(repo, "add", "-q", "data")
        dvc(repo, "push", "-q")
        run(repo, "git", "add", "-A")
        run(repo, "git", "commit", "-qm", "data v1")
    return root


@pytest.fixture
def repo(template: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private copy of the template repo and its remote (the DVC config names the copy's remote)."""
    for key, value in {**GIT_ENV, "GIT_CEILING_DIRECTORIES": str(tmp_path)}.items():
        monkeypatch.setenv(key, value)
    shutil.copytree(template / "remote", tmp_path / "remote")
    repo = Path(shutil.copytree(template / "repo", tmp_path / "repo", symlinks=True))
    config = repo / ".dvc" / "config.local"
    config.write_text(config.read_text().replace(str(template / "remote"), str(tmp_path / "remote")))
    return repo


def head(repo: Path) -> str:
    return run(repo, "git", "rev-parse", "HEAD")


def remote_has(tmp_path: Path, md5: str) -> bool:
    """Whether the local DVC remote holds a directory object (``<md5>.dir``)."""
    digest = md5.removesuffix(".dir")
    return (tmp_path / "remote" / "files" / "md5" / digest[:2] / f"{digest[2:]}.dir").is_file()


def test_publish_records_pushes_and_commits_only_the_pointer(repo: Path, tmp_path: Path) -> None:
    before = resolve_data_version(repo / "data.dvc")
    (repo / "data" / "b.txt").write_text("b\n")
    (repo / "notes.txt").write_text("staged, not mine to commit\n")
    run(repo, "git", "add", "notes.txt")

    publication = publish_data(repo / "data", message="data v2: b")

    assert isinstance(publication, DataPublication) and publication.published and publication.pushed
    assert publication.previous_md5 == before.dvc_md5 != publication.dvc_md5
    assert publication.dataset == "data" and publication.nfiles == 2
    assert publication.dvc_md5 == resolve_data_version(repo / "data.dvc").dvc_md5
    assert publication.commit == head(repo)
    assert run(repo, "git", "log", "-1", "--format=%s") == "data v2: b"
    assert run(repo, "git", "show", "--name-only", "--format=", "HEAD").split() == ["data.dvc"]
    assert run(repo, "git", "status", "--porcelain") == "A  notes.txt"  # still staged, not committed
    assert remote_has(tmp_path, publication.dvc_md5)
    assert run(repo, sys.executable, "-m", "dvc", "status", "data.dvc").startswith("Data and pipelines are up to date")


def test_publishing_unchanged_data_does_nothing(repo: Path) -> None:
    commit = head(repo)
    calls: list[str] = []
    publication = publish_data(repo / "data", check=lambda: calls.append("checked"))
    assert not publication.published and not publication.pushed
    assert publication.commit == commit == head(repo) and publication.dvc_md5 == publication.previous_md5
    assert calls == []  # nothing to check when nothing changed


def test_a_refusing_check_leaves_everything_as_it_was(repo: Path) -> None:
    (repo / "data" / "bad.txt").write_text("fails validation\n")
    pointer = (repo / "data.dvc").read_text()
    commit = head(repo)

    def refuse() -> None:
        raise DataVersionError("data fails validation")

    with pytest.raises(DataVersionError, match="fails validation"):
        publish_data(repo / "data", check=refuse)
    assert (repo / "data.dvc").read_text() == pointer and head(repo) == commit


def test_no_push_commits_without_pushing(repo: Path, tmp_path: Path) -> None:
    (repo / "data" / "c.txt").write_text("c\n")
    publication = publish_data(repo / "data", push=False)
    assert publication.published and not publication.pushed and publication.commit == head(repo)
    assert not remote_has(tmp_path, publication.dvc_md5)


def test_a_pointer_added_but_not_committed_is_published(repo: Path, tmp_path: Path) -> None:
    """`dvc add` was run by hand and the commit forgotten: publishing pushes and commits it."""
    (repo / "data" / "d.txt").write_text("d\n")
    dvc(repo, "add", "-q", "data")
    publication = publish_data(repo / "data")
    assert publication.published and publication.commit == head(repo) and remote_has(tmp_path, publication.dvc_md5)
    assert run(repo, "git", "status", "--porcelain") == ""


def test_a_failed_push_commits_nothing_and_a_retry_publishes(repo: Path, tmp_path: Path) -> None:
    (repo / "data" / "e.txt").write_text("e\n")
    commit = head(repo)
    dvc(repo, "remote", "modify", "--local", "local", "url", "/proc/no-such-remote")
    with pytest.raises(DataVersionError, match="dvc push data.dvc failed .* not committed"):
        publish_data(repo / "data")
    assert head(repo) == commit
    dvc(repo, "remote", "modify", "--local", "local", "url", str(tmp_path / "remote"))
    publication = publish_data(repo / "data")
    assert publication.published and publication.commit != commit and remote_has(tmp_path, publication.dvc_md5)


def test_a_folder_dvc_does_not_track_is_refused(repo: Path) -> None:
    (repo / "other").mkdir()
    with pytest.raises(DataVersionError, match="other is not a DVC-tracked dataset .*dvc add other"):
        publish_data(repo / "other")
    with pytest.raises(DataVersionError, match="no such dataset folder"):
        publish_data(repo / "absent")
    with pytest.raises(DataVersionError, match="tracks .*/data, not .*/other"):
        publish_data(repo / "other", dvc_file=repo / "data.dvc")


def test_the_run_refuses_another_data_version_than_its_event_named(repo: Path) -> None:
    version = resolve_data_version(repo / "data.dvc")
    require_data_md5(version, version.dvc_md5)
    with pytest.raises(DataVersionError, match="started for data md5 0123.dir, but .*data.dvc records"):
        require_data_md5(version, "0123.dir")


def test_a_dataset_outside_git_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    (tmp_path / "data").mkdir()
    (tmp_path / "data.dvc").write_text("outs:\n- md5: 0123.dir\n  path: data\n")
    with pytest.raises(DataVersionError, match="not inside a git repository"):
        publish_data(tmp_path / "data")
