"""Data and code versions: what DVC and git say a run was made from.

DVC is driven through its command line (``python -m dvc``), the interface its users
run and the one DVC keeps stable; its Python internals change between releases. The
remote comes from the repo's DVC config, so a local folder, S3 or any other remote
works by configuration alone.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from fairdiffusion.errors import DataVersionError


@dataclass(frozen=True)
class DataVersion:
    """The dataset version a ``.dvc`` pointer file names."""

    dvc_md5: str
    data_dvc_commit: str | None
    path: str
    dvc_file: str
    nfiles: int | None = None
    size: int | None = None

    def to_dict(self) -> dict[str, object]:
        """JSON-serialisable form for the lineage."""
        return asdict(self)


@dataclass(frozen=True)
class CodeVersion:
    """The git commit of the code that ran, and whether the tree had local changes."""

    git_commit: str | None
    dirty: bool | None

    def to_dict(self) -> dict[str, object]:
        """JSON-serialisable form for the lineage."""
        return asdict(self)


def _git(args: list[str], cwd: Path) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def resolve_data_version(dvc_file: str | Path) -> DataVersion:
    """Read the md5 a ``.dvc`` file records and the git commit that last changed it.

    Raises:
        DataVersionError: if the file is missing or is not a single-output ``.dvc`` file.
    """
    dvc_file = Path(dvc_file).resolve()
    if not dvc_file.is_file():
        raise DataVersionError(f"{dvc_file}: DVC pointer file not found (run 'dvc add' on the data first)")
    try:
        document = yaml.safe_load(dvc_file.read_text()) or {}
        outs = document["outs"]
        out = outs[0]
        md5 = "" if out["md5"] is None else str(out["md5"]).strip()
        if not md5:  # an empty "md5:" must not become the recorded version "None"
            raise KeyError("md5")
    except (yaml.YAMLError, KeyError, IndexError, TypeError):
        raise DataVersionError(f"{dvc_file}: not a DVC pointer file with an 'outs[0].md5' entry") from None
    if len(outs) != 1:
        raise DataVersionError(f"{dvc_file}: tracks {len(outs)} outputs; expected exactly one dataset folder")
    commit = _git(["log", "-1", "--format=%H", "--", dvc_file.name], cwd=dvc_file.parent) or None
    return DataVersion(
        dvc_md5=md5,
        data_dvc_commit=commit,
        path=str(out.get("path", "")),
        dvc_file=str(dvc_file),
        nfiles=out.get("nfiles"),
        size=out.get("size"),
    )


def _dvc(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, capture_output=True, text=True, check=False)


def pull_data(dvc_file: str | Path, remote: str | None = None) -> None:
    """``dvc pull`` the dataset a ``.dvc`` file names. Never forces over local changes.

    Raises:
        DataVersionError: with DVC's own explanation when the pull fails.
    """
    dvc_file = Path(dvc_file).resolve()
    args = ["pull", dvc_file.name] + (["--remote", remote] if remote else [])
    done = _dvc(args, cwd=dvc_file.parent)
    if done.returncode != 0:
        reason = (done.stderr or done.stdout).strip().splitlines()
        detail = "\n    ".join(line for line in reason if line.strip())[-2000:]
        raise DataVersionError(f"dvc pull {dvc_file.name} failed in {dvc_file.parent}:\n    {detail}")


def _dvc_changes(dvc_file: Path) -> list[tuple[str, str]]:
    """(change, output) pairs that ``dvc status`` reports for one ``.dvc`` file."""
    done = _dvc(["status", dvc_file.name, "--json"], cwd=dvc_file.parent)
    if done.returncode != 0:
        raise DataVersionError(f"dvc status {dvc_file.name} failed: {done.stderr.strip()}")
    try:
        status = json.loads(done.stdout.strip() or "{}")
    except json.JSONDecodeError:
        raise DataVersionError(f"dvc status gave unreadable output: {done.stdout[:200]}") from None
    changes: list[tuple[str, str]] = []
    for stage in status.values():
        for entry in stage:
            if not isinstance(entry, dict):
                changes.append((str(entry), dvc_file.name))
                continue
            for outs in entry.values():
                if isinstance(outs, dict):
                    changes.extend((str(kind), str(out)) for out, kind in outs.items())
                else:
                    changes.append((str(outs), dvc_file.name))
    return changes


def verify_data(dvc_file: str | Path, allow_missing: bool = False) -> None:
    """Refuse data whose working copy differs from the version the ``.dvc`` file records.

    Args:
        dvc_file: The pointer file.
        allow_missing: Accept data that is absent (not yet pulled) but not data that
            is present and modified; used before ``dvc pull``, which never overwrites.

    Raises:
        DataVersionError: naming what DVC reports as changed.
    """
    dvc_file = Path(dvc_file).resolve()
    changes = _dvc_changes(dvc_file)
    if allow_missing:
        changes = [(kind, out) for kind, out in changes if kind not in {"deleted", "not in cache"}]
    if changes:
        described = "; ".join(f"{out} {kind}" for kind, out in changes)
        raise DataVersionError(
            f"the data tracked by {dvc_file.name} differs from its recorded version "
            f"(md5 {resolve_data_version(dvc_file).dvc_md5}): {described}. "
            "Refusing to run on unversioned data: 'dvc add' and commit the change, or "
            "'dvc checkout --force' to restore the recorded version."
        )


def resolve_code_version(path: str | Path) -> CodeVersion:
    """The git commit checked out at ``path`` and whether tracked files have changes."""
    path = Path(path)
    commit = _git(["rev-parse", "HEAD"], cwd=path)
    if commit is None:
        return CodeVersion(git_commit=None, dirty=None)
    status = _git(["status", "--porcelain", "--untracked-files=no"], cwd=path)
    return CodeVersion(git_commit=commit, dirty=bool(status))
