"""The fairness gate: the one place that decides whether a candidate may become champion.

It fails closed. A required metric that is missing, NaN or infinite is a violation, a
champion that cannot be compared with is a violation, and every violated rule is
collected and reported at once, never only the first.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

from fairdiffusion.evaluation.metric_keys import fid_metric_names
from fairdiffusion.evaluation.slices import OVERALL
from fairdiffusion.registry.policy import GatePolicy, threshold_for


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
    policy_hash: str | None = None

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
    policy: GatePolicy | None,
    *,
    policy_hash: str | None = None,
    policy_error: str | None = None,
    champion_version: str | None = None,
    candidate_data_md5: str | None = None,
    evaluated_data_md5: str | None = None,
) -> GateDecision:
    """Judge a candidate's metrics against the policy's absolute rules and the champion.

    Args:
        candidate: The candidate's flat metrics (``fid_<x>/overall``, ``es_fid_<x>/race``,
            optionally ``ci_low/<key>`` and ``ci_high/<key>`` bootstrap bounds).
        champion: The current champion's flat metrics, or ``None`` when there is none
            (the first model is judged by the absolute rules alone).
        attributes: Protected attribute -> groups; every group's slice is required.
        extractor: The feature extractor's name; only metrics of that extractor count.
        policy: The parsed policy, or ``None`` when it could not be parsed.
        policy_hash: sha256 of the policy file, recorded with the decision.
        policy_error: Why the policy could not be parsed (the candidate is then rejected).
        champion_version: The champion's registry version, recorded with the decision.
        candidate_data_md5: The data version the candidate was trained on.
        evaluated_data_md5: The data version its test split came from.

    Returns:
        The decision; ``passed`` only if every check passed.
    """
    names = fid_metric_names(extractor)
    checks: list[RuleCheck] = []

    def check(rule: str, metric: str, threshold: float | None, ok: bool, detail: str) -> None:
        checks.append(RuleCheck(rule, metric, candidate.get(metric), threshold, ok, detail))

    def require_finite(metric: str) -> bool:
        value = candidate.get(metric)
        if _finite(value):
            return True
        state = "missing" if value is None else f"not finite ({value})"
        check("metric_present", metric, None, False, f"required metric {metric} is {state}")
        return False

    def ceiling(rule: str, metric: str, limit: float | None, what: str) -> None:
        if require_finite(metric) and limit is not None:
            ok = candidate[metric] <= limit
            check(rule, metric, limit, ok, f"{what} {candidate[metric]:.4g} {'<=' if ok else '>'} {limit:.4g}")

    if policy is None:
        reason = f"gate policy cannot be used: {policy_error or 'no policy'}"
        checks.append(RuleCheck("policy", "", None, None, False, reason))
        return GateDecision(False, checks, {}, champion_version, [reason], policy_hash)

    if candidate_data_md5 is not None and evaluated_data_md5 != candidate_data_md5:
        checks.append(
            RuleCheck(
                "data_version",
                "",
                None,
                None,
                False,
                f"evaluation used data version {evaluated_data_md5 or '(unrecorded)'}, "
                f"but the candidate's data version is {candidate_data_md5}",
            )
        )

    rules = policy.absolute
    overall_key = f"{names['fid']}/{OVERALL}"
    require_finite(overall_key)
    for attribute, groups in attributes.items():
        for group in groups:
            size_key = f"{names['n']}/{attribute}/{group}"
            size = candidate.get(size_key)
            if size is None or not math.isfinite(size) or size < rules.min_slice_size:
                shown = "no" if size is None else f"{size:g}"
                check(
                    "min_slice_size",
                    size_key,
                    rules.min_slice_size,
                    False,
                    f"slice {attribute}={group} has {shown} test images, below the minimum {rules.min_slice_size}",
                )
            require_finite(f"{names['fid']}/{attribute}/{group}")
        ceiling(
            "max_es_fid",
            f"{names['es_fid']}/{attribute}",
            threshold_for(rules.max_es_fid, attribute),
            f"ES-FID on {attribute}",
        )
        ceiling(
            "max_group_fid_gap",
            f"{names['gap']}/{attribute}",
            threshold_for(rules.max_group_fid_gap, attribute),
            f"largest FID gap between {attribute} groups",
        )
        floor = threshold_for(rules.min_es_auc, attribute)
        if floor is not None:
            auc_keys = sorted(k for k in candidate if k.startswith("es_auc_") and k.endswith(f"/{attribute}"))
            if not auc_keys:
                check("min_es_auc", f"es_auc_*/{attribute}", floor, False, f"no ES-AUC metric for {attribute}")
            for key in auc_keys:
                if require_finite(key):
                    ok = candidate[key] >= floor
                    check("min_es_auc", key, floor, ok, f"{key} {candidate[key]:.4g} {'>=' if ok else '<'} {floor:.4g}")

    if champion is not None:
        tolerances = policy.non_regression
        compared = [(overall_key, tolerances.fid_overall)]
        compared += [(f"{names['es_fid']}/{a}", tolerances.es_fid) for a in attributes]
        for key, tolerance in compared:
            if tolerance is None:
                continue
            reference = champion.get(key)
            if reference is None or not _finite(reference):
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
            limit = reference * (1 + tolerance)
            value = candidate[key]
            better_end = candidate.get(f"ci_low/{key}") if tolerances.use_intervals else None
            judged = better_end if better_end is not None and _finite(better_end) else value
            ok = judged <= limit
            basis = f"interval low {judged:.4g}" if judged is not value else f"{value:.4g}"
            check(
                "non_regression",
                key,
                limit,
                ok,
                f"{key} {basis} vs champion v{champion_version} {reference:.4g} "
                f"(tolerance {tolerance:.0%}, limit {limit:.4g})",
            )

    reasons = [c.detail for c in checks if not c.passed]
    return GateDecision(
        passed=not reasons,
        checks=checks,
        policy=policy.model_dump(mode="json") | {"extractor": extractor},
        compared_with_version=champion_version,
        reasons=reasons,
        policy_hash=policy_hash,
    )
