"""Tests for data versions (.dvc pointer files) and code versions (git)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from fairdiffusion.config import HAM10000_ATTRIBUTES, DataConfig, PipelineConfig
from fairdiffusion.data.versioning import DataDiff, diff_data_versions, resolve_code_version, resolve_data_version
from fairdiffusion.errors import DataVersionError
from fairdiffusion.registry.skip import ChampionBaseline, config_fingerprint, decide_skip

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


def baseline(md5: str = "aa.dir", config: str | None = "c" * 64) -> ChampionBaseline:
    return ChampionBaseline(version="3", run_id="r", data_md5=md5, config_sha256=config, group_counts=None)


def test_config_fingerprint_follows_every_resolved_key() -> None:
    base = PipelineConfig()
    assert config_fingerprint(base) == config_fingerprint(PipelineConfig())
    assert len(config_fingerprint(base)) == 64
    changed = base.model_copy(update={"validation": base.validation.model_copy(update={"max_share_shift": 0.1})})
    assert config_fingerprint(changed) != config_fingerprint(base)


@pytest.mark.parametrize(
    ("champion", "force", "skip", "reason"),
    [
        (None, False, False, "no champion yet: training"),
        (baseline(md5="bb.dir"), False, False, "data changed since champion v3 (md5 bb.dir -> aa.dir)"),
        (
            baseline(config="d" * 64),
            False,
            False,
            "config changed since champion v3 (sha256 dddddddddddd -> cccccccccccc)",
        ),
        (baseline(config=None), False, False, "champion v3 recorded no config hash: training"),
        (baseline(), False, True, "are those champion v3 was trained on: nothing new to train on"),
        (baseline(), True, False, "forced: data (md5 aa.dir) and config (sha256 cccccccccccc)"),
    ],
)
def test_decide_skip(champion: ChampionBaseline | None, force: bool, skip: bool, reason: str) -> None:
    decision = decide_skip("aa.dir", "c" * 64, champion, force=force)
    assert decision.skip is skip and reason in decision.reason
    assert decision.champion_version == (champion.version if champion else None)


def test_data_diff_renders_counts_and_shares() -> None:
    diff = DataDiff(
        before={"rev": "v1", "commit": "1" * 40, "dvc_md5": "aa.dir"},
        after={"rev": "v2", "commit": "2" * 40, "dvc_md5": "bb.dir"},
        n_before=10,
        n_after=12,
        added=["s11", "s12"],
        removed=[],
        changed=["s03"],
        moved=[],
        group_counts={"train": {"race=Asian": [2, 4], "race=White": [8, 8]}},
        synthetic={"train": [0, 2], "test": [0, 0]},
    )
    text = diff.render()
    assert "data diff v1 -> v2" in text and "subjects 10 -> 12" in text
    assert "added    2: s11, s12" in text and "removed  0: none" in text and "changed  1: s03" in text
    assert "race=Asian" in text and " 20.0% ->  33.3%" in text and "+2" in text
    assert "synthetic rows in train: 0 -> 2" in text
    assert diff.to_dict()["group_counts"]["train"]["race=Asian"] == [2, 4]


def _dvc(repo: Path, *args: str) -> None:
    done = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr


@pytest.mark.slow
def test_diff_of_two_ham10000_versions_in_a_dvc_repo(ham10000_dataset: Path, tmp_path: Path, git_env: None) -> None:
    """Real git + DVC (cache only, no remote): rows removed, added and relabelled between two commits."""
    repo = tmp_path / "repo"
    init_repo(repo)
    shutil.copytree(ham10000_dataset, repo / "data")
    _dvc(repo, "init", "-q")
    _dvc(repo, "config", "core.analytics", "false")
    _dvc(repo, "add", "-q", "data")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "data v1")
    metadata = repo / "data" / "HAM10000_metadata.csv"
    table = pd.read_csv(metadata, dtype=str, keep_default_na=False)
    removed = table["image_id"].iloc[:2].tolist()
    relabelled = table["image_id"].iloc[5]
    table.loc[5, "dx"] = "mel" if table.loc[5, "dx"] != "mel" else "nv"
    new = table.iloc[10:13].assign(image_id=["ISIC_9000001", "ISIC_9000002", "ISIC_9000003"], sex="female")
    for image_id in new["image_id"]:
        shutil.copy(
            next((repo / "data").rglob("ISIC_0024316.jpg")),
            repo / "data" / "HAM10000_images_part_2" / f"{image_id}.jpg",
        )
    pd.concat([table.iloc[2:], new]).to_csv(metadata, index=False)
    _dvc(repo, "add", "-q", "data")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "data v2")

    data = DataConfig(format="ham10000", path=repo / "data", dvc_file=repo / "data.dvc", attributes=HAM10000_ATTRIBUTES)
    diff = diff_data_versions(repo / "data.dvc", "HEAD~1", "HEAD", data)

    assert (diff.n_before, diff.n_after) == (160, 161)
    assert diff.removed == sorted(removed) and diff.added == ["ISIC_9000001", "ISIC_9000002", "ISIC_9000003"]
    assert diff.changed == [relabelled] and diff.moved == []
    # The split sets (train + val, test) cover every row: females gain the 3 new rows, lose the removed ones.
    females = [sum(diff.group_counts[s]["sex=Female"][i] for s in ("train", "test")) for i in (0, 1)]
    removed_females = int((table.set_index("image_id").loc[removed, "sex"] == "female").sum())
    assert females[1] - females[0] == 3 - removed_females
    assert diff.before["dvc_md5"] != diff.after["dvc_md5"] and "added    3:" in diff.render()


def test_diff_names_a_revision_without_the_pointer_file(tmp_path: Path, git_env: None) -> None:
    repo = tmp_path / "repo"
    init_repo(repo)
    (repo / "data.dvc").write_text(DVC_FILE)
    git(repo, "add", "data.dvc")
    git(repo, "commit", "-q", "-m", "data v1")
    with pytest.raises(DataVersionError, match="nope:data.dvc: not in git"):
        diff_data_versions(repo / "data.dvc", "nope", "HEAD", DataConfig())
