"""Data and code versions: what DVC and git say a run was made from.

DVC is driven through its command line (``python -m dvc``), the interface its users
run and the one DVC keeps stable; its Python internals change between releases. The
remote comes from the repo's DVC config, so a local folder, S3 or any other remote
works by configuration alone. Reading an old version's files goes through DVC's
documented Python API (``dvc.api.DVCFileSystem``), which reads the cache or the remote.

Growing the data: add subjects to the folder, then :func:`publish_data` (``fairdiffusion
data publish``) records the new version in its ``.dvc`` file, pushes it to the DVC remote
and commits the ``.dvc`` file. :func:`diff_data_versions` summarises what changed between
two such commits.
"""

from __future__ import annotations

import fnmatch
import json
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import pandas as pd
import yaml

from fairdiffusion import files
from fairdiffusion.config import DataConfig
from fairdiffusion.data.counts import count_groups
from fairdiffusion.data.formats import get_format, load_dataset
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
    text = files.read_text(dvc_file, raise_as=DataVersionError)
    try:
        document = yaml.safe_load(text) or {}
        outs = document["outs"]
        out = outs[0]
        md5 = "" if out["md5"] is None else str(out["md5"]).strip()
        if not md5:  # an empty "md5:" must not become the recorded version "None"
            raise KeyError("md5")
    except (yaml.YAMLError, ValueError, KeyError, IndexError, TypeError):
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


def require_data_md5(version: DataVersion, expected_md5: str) -> None:
    """Refuse to go on unless the checkout records the data version a run was started for.

    A run started by a ``fairdiffusion.data.published`` event names the md5 that was
    published; the worker's checkout must record that same version.

    Raises:
        DataVersionError: naming both versions and the likely causes.
    """
    if version.dvc_md5 != expected_md5:
        raise DataVersionError(
            f"this run was started for data md5 {expected_md5}, but {version.dvc_file} records "
            f"{version.dvc_md5} (commit {version.data_dvc_commit or 'none'}): the worker's checkout lacks the "
            "published commit (git pull there), or a newer version was published since (its own run follows)"
        )


@dataclass(frozen=True)
class DataPublication:
    """What :func:`publish_data` did: the version the ``.dvc`` file records now, and its commit."""

    #: False when the folder already matched its committed version: nothing was recorded, pushed or committed.
    published: bool
    dvc_md5: str
    #: The md5 the ``.dvc`` file recorded at ``HEAD`` before (None if it was not committed yet).
    previous_md5: str | None
    #: The dataset folder relative to the repository root (posix), e.g. ``data``.
    dataset: str
    data_path: str
    dvc_file: str
    #: The commit that records ``dvc_md5``: the new one, or the existing one when nothing changed.
    commit: str | None
    pushed: bool
    nfiles: int | None = None
    size: int | None = None

    def to_dict(self) -> dict[str, object]:
        """JSON-serialisable form."""
        return asdict(self)


def _committed_md5(repo: Path, pointer: str) -> str | None:
    """The md5 the committed pointer records; ``None`` when it is not committed (or not a pointer)."""
    try:
        return str(_dvc_out_at(repo, pointer, "HEAD")["md5"])
    except DataVersionError:
        return None


def _tracked_pointer(data_dir: Path, dvc_file: Path) -> DataVersion:
    """The version ``dvc_file`` records, after checking that it is the pointer of ``data_dir``."""
    if not data_dir.is_dir():
        raise DataVersionError(f"{data_dir}: no such dataset folder")
    if not dvc_file.is_file():
        raise DataVersionError(
            f"{data_dir} is not a DVC-tracked dataset ({dvc_file} not found); version it once by hand: "
            f"dvc add {data_dir.name} && git add {data_dir.name}.dvc .gitignore && git commit"
        )
    version = resolve_data_version(dvc_file)
    if (dvc_file.parent / version.path).resolve() != data_dir:
        raise DataVersionError(f"{dvc_file} tracks {dvc_file.parent / version.path}, not {data_dir}")
    return version


def _run_or_raise(done: subprocess.CompletedProcess[str], what: str, consequence: str) -> None:
    if done.returncode != 0:
        detail = " ".join((done.stderr or done.stdout).split())[-1000:]
        raise DataVersionError(f"{what} failed ({detail}); {consequence}")


def publish_data(
    data_dir: str | Path,
    dvc_file: str | Path | None = None,
    message: str | None = None,
    push: bool = True,
    check: Callable[[], None] | None = None,
) -> DataPublication:
    """Make a dataset folder's working copy a data version: ``dvc commit``, ``dvc push``, ``git commit``.

    ``dvc commit`` records the folder in its existing ``.dvc`` file and the cache (what a
    second ``dvc add`` does, whatever the pointer is named); the push comes before the git
    commit, so a commit never names data the remote lacks. Only the ``.dvc`` file and the
    ``.gitignore`` beside it are committed; anything else staged stays staged.

    Args:
        data_dir: The dataset folder, already tracked by DVC.
        dvc_file: Its pointer file (default: ``<data_dir>.dvc`` beside it).
        message: The commit message (default: names the dataset and both md5s).
        push: ``dvc push`` the new version to the repository's default DVC remote.
        check: Called once the folder is known to differ from its committed version and
            before anything is recorded; raise to refuse the publication (e.g. on a failed validation).

    Returns:
        The publication; ``published`` is False when the folder matched its committed version.

    Raises:
        DataVersionError: if the folder is not a DVC-tracked dataset in a git repository, or
            DVC or git fail (with their explanation and what state they left).
    """
    data_dir = Path(data_dir).resolve()
    dvc_file = Path(dvc_file).resolve() if dvc_file is not None else data_dir.with_name(data_dir.name + ".dvc")
    recorded = _tracked_pointer(data_dir, dvc_file)
    repo = _toplevel(dvc_file.parent)
    pointer = dvc_file.relative_to(repo).as_posix()
    previous = _committed_md5(repo, pointer)
    changes = _dvc_changes(dvc_file)
    if check is not None and (changes or recorded.dvc_md5 != previous):
        check()
    if changes:
        done = _dvc(["commit", "--force", "--quiet", dvc_file.name], cwd=dvc_file.parent)
        _run_or_raise(done, f"dvc commit {dvc_file.name}", "nothing was recorded")
    version = resolve_data_version(dvc_file)
    dataset = data_dir.relative_to(repo).as_posix()
    unchanged = version.dvc_md5 == previous

    def result(published: bool, commit: str | None, pushed: bool) -> DataPublication:
        return DataPublication(
            published=published,
            dvc_md5=version.dvc_md5,
            previous_md5=previous,
            dataset=dataset,
            data_path=str(data_dir),
            dvc_file=str(dvc_file),
            commit=commit,
            pushed=pushed,
            nfiles=version.nfiles,
            size=version.size,
        )

    if unchanged:
        return result(False, version.data_dvc_commit, False)
    if push:
        done = _dvc(["push", "--quiet", dvc_file.name], cwd=dvc_file.parent)
        _run_or_raise(
            done,
            f"dvc push {dvc_file.name}",
            f"{dvc_file.name} records md5 {version.dvc_md5} but is not committed; fix the remote and publish again",
        )
    paths = [pointer] + (
        [f"{PurePosixPath(pointer).parent / '.gitignore'}"] if (dvc_file.parent / ".gitignore").is_file() else []
    )
    text = message or f"data: publish {dataset} (md5 {version.dvc_md5}, was {previous or 'uncommitted'})"
    for args in (["add", "--", *paths], ["commit", "--quiet", "-m", text, "--", *paths]):
        done = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, check=False)
        _run_or_raise(done, f"git {args[0]}", f"{pointer} records md5 {version.dvc_md5} but is not committed")
    return result(True, _git(["rev-parse", "HEAD"], cwd=repo), push)


def resolve_code_version(path: str | Path) -> CodeVersion:
    """The git commit checked out at ``path`` and whether tracked files have changes."""
    path = Path(path)
    commit = _git(["rev-parse", "HEAD"], cwd=path)
    if commit is None:
        return CodeVersion(git_commit=None, dirty=None)
    status = _git(["status", "--porcelain", "--untracked-files=no"], cwd=path)
    return CodeVersion(git_commit=commit, dirty=bool(status))


def _toplevel(path: Path) -> Path:
    top = _git(["rev-parse", "--show-toplevel"], cwd=path)
    if not top:
        raise DataVersionError(f"{path}: not inside a git repository (a data version is a git commit of its .dvc file)")
    return Path(top)


def _dvc_out_at(repo: Path, dvc_file: str, rev: str) -> dict[str, Any]:
    done = subprocess.run(["git", "show", f"{rev}:{dvc_file}"], cwd=repo, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise DataVersionError(f"{rev}:{dvc_file}: not in git ({done.stderr.strip() or 'unknown revision'})")
    try:
        out = (yaml.safe_load(done.stdout) or {})["outs"][0]
        return {"md5": str(out["md5"]), "path": str(out.get("path", ""))}
    except (yaml.YAMLError, KeyError, IndexError, TypeError):
        raise DataVersionError(f"{rev}:{dvc_file}: not a DVC pointer file with an 'outs[0].md5' entry") from None


@dataclass(frozen=True)
class DataSnapshot:
    """The sample table of one data version, and each subject's content md5."""

    rev: str
    commit: str
    dvc_md5: str
    samples: pd.DataFrame
    #: subject -> md5 of its file (the npz for FairGenMed, else the image).
    content: dict[str, str]


def read_data_version(dvc_file: str | Path, rev: str, data: DataConfig) -> DataSnapshot:
    """Rebuild the sample table of the data version a git revision of ``dvc_file`` names.

    Only the files the table is read from (the format's metadata: for FairGenMed the
    npz files and ``data_summary.csv``, for HAM10000 and CheXpert the CSVs) are fetched,
    through DVC (its cache, else its remote), into a temporary folder.

    Raises:
        DataVersionError: if the revision, the pointer file or the data cannot be read.
    """
    from dvc.api import DVCFileSystem  # imported here: DVC takes about a second to load; only this needs it

    dvc_file = Path(dvc_file).resolve()
    repo = _toplevel(dvc_file.parent)
    pointer = dvc_file.relative_to(repo).as_posix()
    out = _dvc_out_at(repo, pointer, rev)
    commit = _git(["rev-parse", "--verify", f"{rev}^{{commit}}"], cwd=repo) or rev
    folder = PurePosixPath(pointer).parent
    data_path = out["path"] if str(folder) == "." else (folder / out["path"]).as_posix()
    try:
        fs = DVCFileSystem(str(repo), rev=commit)
        listing = fs.find(data_path, detail=True)
    except Exception as error:  # noqa: BLE001 - DVC raises many types; the message is what matters
        raise DataVersionError(f"cannot list {data_path} at {rev} with DVC ({type(error).__name__}: {error})") from None
    patterns = get_format(data.format).metadata(data)
    relative = {name: PurePosixPath(name).relative_to(data_path).as_posix() for name in listing}
    wanted = [name for name, rel in relative.items() if any(fnmatch.fnmatch(rel, p) for p in patterns)]
    content: dict[str, str] = {}
    for name, rel in relative.items():
        md5 = str(listing[name].get("md5") or "")
        content.setdefault(PurePosixPath(rel).with_suffix("").as_posix(), md5)
        content.setdefault(PurePosixPath(rel).stem, md5)
    with tempfile.TemporaryDirectory(prefix="fd-data-") as tmp:
        targets = [str(Path(tmp, relative[name])) for name in wanted]
        for target in targets:
            Path(target).parent.mkdir(parents=True, exist_ok=True)
        try:
            if wanted:
                fs.get(wanted, targets)
        except Exception as error:  # noqa: BLE001
            raise DataVersionError(
                f"cannot fetch {data_path} at {rev} through DVC ({type(error).__name__}: {error}); "
                "is it pushed to the remote, or in the local cache?"
            ) from None
        for split in [*data.train_splits, data.test_split]:
            Path(tmp, split).mkdir(exist_ok=True)
        samples = load_dataset(data, root=tmp).samples
    samples = samples.drop(columns=[c for c in ("image_path", "npz_path", "read_error") if c in samples])
    subjects = samples["subject"].astype(str)
    fingerprint = {s: content.get(s, content.get(PurePosixPath(s).name, "")) for s in subjects}
    return DataSnapshot(rev=rev, commit=commit, dvc_md5=out["md5"], samples=samples, content=fingerprint)


@dataclass(frozen=True)
class DataDiff:
    """What changed between two data versions."""

    before: dict[str, str]
    after: dict[str, str]
    n_before: int
    n_after: int
    added: list[str]
    removed: list[str]
    #: Same subject id, different content (image or labels).
    changed: list[str]
    #: Same subject, moved to another split.
    moved: list[str]
    #: ``{split set: {"attribute=group": [before, after]}}``.
    group_counts: dict[str, dict[str, list[int]]]
    #: Synthetic rows before and after, per split set.
    synthetic: dict[str, list[int]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, object]:
        """JSON-serialisable form."""
        return asdict(self)

    def render(self, limit: int = 10) -> str:
        """A readable summary: subjects added/removed/changed, then group counts before and after."""

        def listed(names: list[str]) -> str:
            if not names:
                return "none"
            return ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "")

        lines = [
            f"data diff {self.before['rev']} -> {self.after['rev']}",
            f"  md5      {self.before['dvc_md5']} -> {self.after['dvc_md5']}",
            f"  subjects {self.n_before} -> {self.n_after}",
            f"  added    {len(self.added)}: {listed(self.added)}",
            f"  removed  {len(self.removed)}: {listed(self.removed)}",
            f"  changed  {len(self.changed)}: {listed(self.changed)}",
            f"  moved    {len(self.moved)}: {listed(self.moved)}",
            "",
            f"  {'split set':9} {'group':30} {'before':>7} {'after':>7} {'change':>7}  share before -> after",
        ]
        for set_name, groups in self.group_counts.items():
            totals: dict[str, list[int]] = {}
            for key, (then, now) in groups.items():
                if "&" not in key:
                    pair = totals.setdefault(key.split("=")[0], [0, 0])
                    pair[0], pair[1] = pair[0] + then, pair[1] + now
            for key, (then, now) in groups.items():
                total = totals.get(key.split("=")[0], [0, 0])
                share = (
                    f"{then / total[0] if total[0] else 0:6.1%} -> {now / total[1] if total[1] else 0:6.1%}"
                    if "&" not in key
                    else ""
                )
                lines.append(f"  {set_name:9} {key:30} {then:7d} {now:7d} {now - then:+7d}  {share}")
        for set_name, (then, now) in self.synthetic.items():
            lines.append(f"  synthetic rows in {set_name}: {then} -> {now}")
        return "\n".join(lines)


def diff_data_versions(dvc_file: str | Path, rev_a: str, rev_b: str, data: DataConfig) -> DataDiff:
    """Compare the data versions that two git revisions of ``dvc_file`` name.

    Raises:
        DataVersionError: if either revision's data cannot be read.
    """
    before, after = read_data_version(dvc_file, rev_a, data), read_data_version(dvc_file, rev_b, data)
    a = before.samples.drop_duplicates("subject").set_index("subject")
    b = after.samples.drop_duplicates("subject").set_index("subject")
    common = a.index.intersection(b.index)
    compared = [c for c in a.columns if c in b.columns and c != "split"]
    rows_differ = (
        a.loc[common, compared].fillna("").astype(str) != b.loc[common, compared].fillna("").astype(str)
    ).any(axis=1)
    content_differs = pd.Series([before.content.get(s) != after.content.get(s) for s in common], index=common)
    changed = common[(rows_differ | content_differs).to_numpy()]
    moved = [s for s in common if a.at[s, "split"] != b.at[s, "split"]]
    split_sets = {"train": list(data.train_splits), "test": [data.test_split]}
    counts_a = count_groups(before.samples, data.attributes, split_sets)
    counts_b = count_groups(after.samples, data.attributes, split_sets)
    groups: dict[str, dict[str, list[int]]] = {}
    for row_a, row_b in zip(counts_a.itertuples(index=False), counts_b.itertuples(index=False), strict=True):
        groups.setdefault(str(row_a.split_set), {})[str(row_a.key)] = [int(row_a.count), int(row_b.count)]
    synthetic = {
        name: [
            int((t["split"].isin(splits) & (t["source"] == "synthetic")).sum()) for t in (before.samples, after.samples)
        ]
        for name, splits in split_sets.items()
    }
    return DataDiff(
        before={"rev": rev_a, "commit": before.commit, "dvc_md5": before.dvc_md5},
        after={"rev": rev_b, "commit": after.commit, "dvc_md5": after.dvc_md5},
        n_before=len(a),
        n_after=len(b),
        added=sorted(b.index.difference(a.index).astype(str)),
        removed=sorted(a.index.difference(b.index).astype(str)),
        changed=sorted(map(str, changed)),
        moved=sorted(map(str, moved)),
        group_counts=groups,
        synthetic=synthetic,
    )
