"""Whether a scheduled run has anything new to train on, compared with the champion."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from fairdiffusion.config import PipelineConfig, config_to_dict


def config_fingerprint(config: PipelineConfig) -> str:
    """sha256 of the resolved config (every key, defaults included): what a run was asked to do."""
    text = json.dumps(config_to_dict(config), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class ChampionBaseline:
    """What the current champion was trained on, as its run recorded it."""

    version: str
    run_id: str
    data_md5: str | None
    config_sha256: str | None
    #: ``group_counts`` of the champion's validation (``None`` if it recorded none).
    group_counts: dict[str, dict[str, int]] | None


@dataclass(frozen=True)
class SkipDecision:
    """Whether a run has anything new to train on, and why."""

    skip: bool
    reason: str
    champion_version: str | None


def decide_skip(
    data_md5: str, config_sha256: str, champion: ChampionBaseline | None, force: bool = False
) -> SkipDecision:
    """Skip a run whose data version and config are exactly those the champion was trained on.

    Args:
        data_md5: The md5 the ``.dvc`` file records for this run's data.
        config_sha256: :func:`config_fingerprint` of this run's config.
        champion: The current champion's baseline; ``None`` when there is no champion.
        force: Train even when nothing changed.
    """
    if champion is None:
        return SkipDecision(False, "no champion yet: training", None)
    version = champion.version
    if champion.data_md5 != data_md5:
        before = (champion.data_md5 or "unrecorded")[:12]
        return SkipDecision(False, f"data changed since champion v{version} (md5 {before} -> {data_md5[:12]})", version)
    if champion.config_sha256 is None:
        return SkipDecision(False, f"champion v{version} recorded no config hash: training", version)
    if champion.config_sha256 != config_sha256:
        return SkipDecision(
            False,
            f"config changed since champion v{version} (sha256 {champion.config_sha256[:12]} -> {config_sha256[:12]})",
            version,
        )
    same = (
        f"data (md5 {data_md5[:12]}) and config (sha256 {config_sha256[:12]}) are those "
        f"champion v{version} was trained on"
    )
    if force:
        return SkipDecision(False, f"forced: {same}", version)
    return SkipDecision(True, f"{same}: nothing new to train on", version)
