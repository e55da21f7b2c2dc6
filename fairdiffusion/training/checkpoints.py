"""Training checkpoints on disk: written atomically, found, pruned.

A checkpoint is a folder ``checkpoint-<step>`` under the checkpoint root. It is written
as ``checkpoint-<step>.partial`` and renamed only after every file is in place and
``training_state.json`` (the completion marker) is written last, so a process that
dies while writing leaves a ``.partial`` folder (or a folder without the marker) that
is ignored, never loaded, and removed by the next save.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from fairdiffusion.errors import TrainingError

if TYPE_CHECKING:
    from accelerate import Accelerator

#: The completion marker and the training position of a checkpoint.
STATE_FILE = "training_state.json"
#: Part of a run's identity, so that a checkpoint of another layout is refused by name.
#: 3: the loop state, the FBP controller and the EMA are saved by this module in
#: ``custom_state.pt`` and loaded with ``weights_only=True`` (2: as accelerate custom
#: objects, which accelerate unpickles with ``weights_only=False``).
CHECKPOINT_FORMAT = 3
#: The states of the objects that accelerate does not own, in a file nothing unpickles.
CUSTOM_STATE_FILE = "custom_state.pt"
_NAME = re.compile(r"^checkpoint-(\d+)$")


class Stateful(Protocol):
    """What a checkpoint saves besides accelerate's own state: the loop state, FBP, the EMA."""

    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any, /) -> Any: ...


def checkpoint_step(folder: Path) -> int | None:
    """The step of a complete checkpoint folder, else ``None``."""
    match = _NAME.match(folder.name)
    if match is None or not (folder / STATE_FILE).is_file():
        return None
    return int(match.group(1))


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = [(step, folder) for folder in root.iterdir() if (step := checkpoint_step(folder)) is not None]
    return [folder for _, folder in sorted(found)]


def find_resume_checkpoint(resume: str | None, root: Path) -> Path | None:
    """The checkpoint ``training.resume`` names.

    Args:
        resume: ``None`` (start fresh), ``latest`` (newest complete checkpoint under
            ``root``, or a fresh start when there is none) or a checkpoint folder.
        root: The run's checkpoint folder.

    Raises:
        TrainingError: if a named folder is missing or is not a complete checkpoint.
    """
    if resume is None:
        return None
    if resume == "latest":
        found = complete_checkpoints(root)
        return found[-1] if found else None
    folder = Path(resume)
    if not folder.is_dir():
        raise TrainingError(f"training.resume: {folder} does not exist")
    if not (folder / STATE_FILE).is_file():
        raise TrainingError(
            f"training.resume: {folder} is not a complete checkpoint (no {STATE_FILE}; it was probably "
            "being written when the process stopped)"
        )
    return folder


def partial_folder(root: Path, step: int) -> Path:
    """An empty folder to write the checkpoint of ``step`` into (main process only)."""
    folder = root / f"checkpoint-{step}.partial"
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    return folder


def commit_checkpoint(partial: Path, state: dict[str, Any]) -> Path:
    """Write the completion marker, then rename the folder into place (main process only)."""
    (partial / STATE_FILE).write_text(json.dumps(state, indent=2))
    final = partial.with_name(partial.name.removesuffix(".partial"))
    if final.exists():
        shutil.rmtree(final)
    os.replace(partial, final)
    return final


def prune_checkpoints(root: Path, keep: int) -> list[Path]:
    """Remove all but the newest ``keep`` complete checkpoints, and leftover partial folders."""
    removed = complete_checkpoints(root)[:-keep]
    removed += [
        f for f in root.iterdir() if f.is_dir() and checkpoint_step(f) is None and f.name.startswith("checkpoint-")
    ]
    for folder in removed:
        shutil.rmtree(folder, ignore_errors=True)
    return removed


def set_aside_checkpoints(root: Path) -> Path | None:
    """Move an earlier run's checkpoints to ``<root>.previous`` (replacing an older set there).

    A run that starts afresh must not prune or resume into another run's checkpoints,
    and a rerun that forgot ``resume: latest`` must not destroy a crashed run's work:
    its checkpoints stay loadable from the returned folder.
    """
    if not root.is_dir() or not any(f.name.startswith("checkpoint-") for f in root.iterdir()):
        return None
    previous = root.with_name(root.name + ".previous")
    if previous.exists():
        shutil.rmtree(previous)
    os.replace(root, previous)
    return previous


def read_state(folder: Path) -> dict[str, Any]:
    """The training position stored in a complete checkpoint."""
    state: dict[str, Any] = json.loads((folder / STATE_FILE).read_text())
    return state


def save_checkpoint(
    accelerator: Accelerator,
    root: Path,
    position: dict[str, Any],
    keep: int,
    objects: Sequence[Stateful] = (),
) -> None:
    """Write the checkpoint of ``position["step"]`` on every process, then prune the old ones.

    accelerate saves the model, optimiser, LR scheduler, gradient scaler and RNG states;
    the main process saves ``objects``' state dicts (plain tensors and Python values) in
    ``custom_state.pt``. The position, written last, marks the checkpoint complete.
    """
    step = int(position["step"])
    partial = root / f"checkpoint-{step}.partial"
    if accelerator.is_main_process:
        partial_folder(root, step)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        torch.save([obj.state_dict() for obj in objects], partial / CUSTOM_STATE_FILE)
        commit_checkpoint(partial, position)
        prune_checkpoints(root, keep)
    accelerator.wait_for_everyone()


def load_checkpoint(
    accelerator: Accelerator, folder: Path, identity: Mapping[str, object], objects: Sequence[Stateful] = ()
) -> dict[str, Any]:
    """Load a complete checkpoint of this run into ``accelerator`` and ``objects``.

    Args:
        accelerator: Prepared like the one that saved it.
        folder: A complete checkpoint (see :func:`find_resume_checkpoint`).
        identity: What the checkpoint's run must agree with (data, settings, format).
        objects: The objects given to :func:`save_checkpoint`, in the same order.

    Returns:
        The checkpoint's position (``training_state.json``).

    Raises:
        TrainingError: if the checkpoint was written by a run of another identity.
    """
    position = read_state(folder)
    differing = [key for key, value in identity.items() if position["identity"].get(key) != value]
    if differing:
        raise TrainingError(
            f"training.resume: {folder} was written by a run with different {', '.join(differing)}; "
            "set training.resume: null to start afresh (its checkpoints are then moved to checkpoints.previous)"
        )
    accelerator.load_state(str(folder))
    # weights_only: tensors, containers and numbers only; a crafted file cannot run code.
    states = torch.load(folder / CUSTOM_STATE_FILE, map_location="cpu", weights_only=True)
    for obj, state in zip(objects, states, strict=True):
        obj.load_state_dict(state)
    return position
