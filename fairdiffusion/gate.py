"""The fairness gate: the one place that decides whether a candidate may become champion.

It fails closed. A required metric that is missing, NaN or infinite is a violation, a
champion that cannot be compared with is a violation, and every violated rule is
collected and reported at once, never only the first.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

from fairdiffusion.config import GateConfig
from fairdiffusion.metrics import OVERALL, fid_metric_names


@dataclass(frozen=True)
class RuleCheck:
    """One rule applied to one value."""

    rule: str
    metric: str
    value: float | None
    threshold: float | None
    passed: bool
    detail: str


@dataclass(frozen=True)
class GateDecision:
    """The verdict, every rule that was checked, and the reasons for a failure."""

    passed: bool
    checks: list[RuleCheck]
    policy: dict[str, object]
    compared_with_version: str | None = None
    reasons: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        """JSON-serialisable form for the registry and the audit."""
        return asdict(self)


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def decide_promotion(
    candidate: Mapping[str, float],
    champion: Mapping[str, float] | None,
    attributes: Mapping[str, Sequence[str]],
    extractor: str,
    config: GateConfig,
    champion_version: str | None = None,
) -> GateDecision:
    """Judge a candidate's metrics against the absolute rules and the champion.

    Args:
        candidate: The candidate's flat metrics (``fid_<x>/overall``, ``es_fid_<x>/race``...).
        champion: The current champion's flat metrics, or ``None`` when there is none
            (the first model is judged by the absolute rules alone).
        attributes: Protected attribute -> groups; every group's slice is required.
        extractor: The feature extractor's name; only metrics of that extractor count.
        config: Thresholds and the regression tolerance.
        champion_version: The champion's registry version, recorded with the decision.

    Returns:
        The decision; ``passed`` only if every check passed.
    """
    names = fid_metric_names(extractor)
    checks: list[RuleCheck] = []

    def check(rule: str, metric: str, threshold: float | None, ok: bool, detail: str) -> None:
        value = candidate.get(metric)
        checks.append(RuleCheck(rule, metric, value, threshold, ok, detail))

    def require_finite(metric: str) -> bool:
        value = candidate.get(metric)
        if _finite(value):
            return True
        state = "missing" if value is None else f"not finite ({value})"
        check("metric_present", metric, None, False, f"required metric {metric} is {state}")
        return False

    overall_key = f"{names['fid']}/{OVERALL}"
    require_finite(overall_key)
    for attribute, groups in attributes.items():
        for group in groups:
            size_key = f"{names['n']}/{attribute}/{group}"
            size = candidate.get(size_key)
            if size is None or not math.isfinite(size) or size < config.min_slice_size:
                check(
                    "min_slice_size",
                    size_key,
                    config.min_slice_size,
                    False,
                    f"slice {attribute}={group} has {size if size is not None else 'no'} test images, "
                    f"below the minimum {config.min_slice_size}",
                )
            require_finite(f"{names['fid']}/{attribute}/{group}")
        es_key, gap_key = f"{names['es_fid']}/{attribute}", f"{names['gap']}/{attribute}"
        if require_finite(es_key) and config.max_es_fid is not None:
            ok = candidate[es_key] <= config.max_es_fid
            check(
                "max_es_fid",
                es_key,
                config.max_es_fid,
                ok,
                f"ES-FID on {attribute} {candidate[es_key]:.4g} {'<=' if ok else '>'} {config.max_es_fid:.4g}",
            )
        if require_finite(gap_key) and config.max_group_fid_gap is not None:
            ok = candidate[gap_key] <= config.max_group_fid_gap
            check(
                "max_group_fid_gap",
                gap_key,
                config.max_group_fid_gap,
                ok,
                f"largest FID gap between {attribute} groups {candidate[gap_key]:.4g} "
                f"{'<=' if ok else '>'} {config.max_group_fid_gap:.4g}",
            )

    if champion is not None:
        tolerance = config.regression_tolerance
        for key in [overall_key] + [f"{names['es_fid']}/{a}" for a in attributes]:
            reference = champion.get(key)
            if not _finite(reference):
                check(
                    "non_regression",
                    key,
                    None,
                    False,
                    f"champion v{champion_version} has no finite {key}; cannot show the candidate is no worse",
                )
                continue
            if not _finite(candidate.get(key)):
                continue  # already reported as missing
            limit = float(reference) * (1 + tolerance)  # type: ignore[arg-type]
            ok = candidate[key] <= limit
            check(
                "non_regression",
                key,
                limit,
                ok,
                f"{key} {candidate[key]:.4g} vs champion v{champion_version} {reference:.4g} "
                f"(tolerance {tolerance:.0%}, limit {limit:.4g})",
            )

    reasons = [c.detail for c in checks if not c.passed]
    policy = config.model_dump(mode="json") | {"extractor": extractor}
    return GateDecision(
        passed=not reasons,
        checks=checks,
        policy=policy,
        compared_with_version=champion_version,
        reasons=reasons,
    )
