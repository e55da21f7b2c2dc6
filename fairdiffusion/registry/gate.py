"""The fairness gate: the one place that decides whether a candidate may become champion.

It fails closed. A required metric that is missing, NaN or infinite is a violation, a
champion that cannot be compared with is a violation, and every violated rule is
collected and reported at once, never only the first. Each rule family (the data
version, references that a model which learnt nothing cannot beat, slice sizes, equity
ceilings in FID units and scale-free, ES-AUC floors, non-regression against the champion)
is a function returning its checks; :func:`decide_promotion` runs them all.
Whether a passing candidate also waits for a human approval is not the gate's call but
the pipeline's (``gate.require_approval``, applied in :mod:`fairdiffusion.registry.lineage`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from fairdiffusion.evaluation.metric_keys import (
    FIDELITY_ATTRIBUTE_STEMS,
    fid_metric_names,
    fidelity_key,
    metric_key_stems,
    reference_keys,
)
from fairdiffusion.evaluation.slices import OVERALL
from fairdiffusion.registry.policy import (
    AbsoluteRules,
    FidelityRules,
    GatePolicy,
    MadnessRules,
    NonRegressionRules,
    ReferenceRules,
    threshold_for,
)


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

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GateDecision:
        """The decision :meth:`to_dict` wrote (the run's ``lineage/gate_decision.json``)."""
        return cls(**{**data, "checks": [RuleCheck(**check) for check in data.get("checks", [])]})


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def _check(
    candidate: Mapping[str, float], rule: str, metric: str, threshold: float | None, ok: bool, detail: str
) -> RuleCheck:
    return RuleCheck(rule, metric, candidate.get(metric), threshold, ok, detail)


def _missing(candidate: Mapping[str, float], metric: str) -> list[RuleCheck]:
    """A failed ``metric_present`` check if a required metric is missing, NaN or infinite, else nothing."""
    value = candidate.get(metric)
    if _finite(value):
        return []
    state = "missing" if value is None else f"not finite ({value})"
    return [_check(candidate, "metric_present", metric, None, False, f"required metric {metric} is {state}")]


def _ceiling(candidate: Mapping[str, float], rule: str, metric: str, limit: float | None, what: str) -> list[RuleCheck]:
    # A required metric is checked even when its rule is off: a NaN still fails closed.
    missing = _missing(candidate, metric)
    if missing or limit is None:
        return missing
    ok = candidate[metric] <= limit
    return [
        _check(candidate, rule, metric, limit, ok, f"{what} {candidate[metric]:.4g} {'<=' if ok else '>'} {limit:.4g}")
    ]


def check_data_version(candidate_data_md5: str | None, evaluated_data_md5: str | None) -> list[RuleCheck]:
    """The evaluation must have used the data version the candidate was trained on."""
    if candidate_data_md5 is None or evaluated_data_md5 == candidate_data_md5:
        return []
    detail = (
        f"evaluation used data version {evaluated_data_md5 or '(unrecorded)'}, "
        f"but the candidate's data version is {candidate_data_md5}"
    )
    return [RuleCheck("data_version", "", None, None, False, detail)]


def check_slices(
    candidate: Mapping[str, float], names: Mapping[str, str], attribute: str, groups: Sequence[str], min_size: int
) -> list[RuleCheck]:
    """Every group slice of an attribute has enough test images and a finite FID."""
    checks: list[RuleCheck] = []
    for group in groups:
        size_key = f"{names['n']}/{attribute}/{group}"
        size = candidate.get(size_key)
        if size is None or not math.isfinite(size) or size < min_size:
            shown = "no" if size is None else f"{size:g}"
            detail = f"slice {attribute}={group} has {shown} test images, below the minimum {min_size}"
            checks.append(_check(candidate, "min_slice_size", size_key, min_size, False, detail))
        checks += _missing(candidate, f"{names['fid']}/{attribute}/{group}")
    return checks


def check_equity_ceilings(
    candidate: Mapping[str, float], names: Mapping[str, str], attribute: str, rules: AbsoluteRules
) -> list[RuleCheck]:
    """An attribute's ES-FID and largest group FID gap stay under the policy's ceilings."""
    return _ceiling(
        candidate,
        "max_es_fid",
        f"{names['es_fid']}/{attribute}",
        threshold_for(rules.max_es_fid, attribute),
        f"ES-FID on {attribute}",
    ) + _ceiling(
        candidate,
        "max_group_fid_gap",
        f"{names['gap']}/{attribute}",
        threshold_for(rules.max_group_fid_gap, attribute),
        f"largest FID gap between {attribute} groups",
    )


def _ratio_ceiling(
    candidate: Mapping[str, float], rule: str, keys: tuple[str, str], limit: float | None, what: str
) -> list[RuleCheck]:
    """``numerator / denominator <= limit``, both required (fails closed when either is missing)."""
    if limit is None:
        return []
    numerator, denominator = keys
    missing = _missing(candidate, numerator) + _missing(candidate, denominator)
    if missing:
        return missing
    ratio = candidate[numerator] / candidate[denominator] if candidate[denominator] else math.inf
    ok = ratio <= limit
    detail = f"{what} {ratio:.4g} {'<=' if ok else '>'} {limit:.4g}"
    return [RuleCheck(rule, f"{numerator} / {denominator}", ratio, limit, ok, detail)]


def check_scale_free(
    candidate: Mapping[str, float], extractor: str, attribute: str, rules: AbsoluteRules
) -> list[RuleCheck]:
    """An attribute's D / FID and matched-size gap / matched overall FID stay under the ceilings."""
    stems = metric_key_stems("fid", extractor)
    limit = threshold_for(rules.max_relative_disparity, attribute)
    disparity = (
        []
        if limit is None
        else _ceiling(
            candidate,
            "max_relative_disparity",
            f"{stems['relative_disparity']}/{attribute}",
            limit,
            f"FID disparity over overall FID (D / FID) on {attribute}",
        )
    )
    gap = _ratio_ceiling(
        candidate,
        "max_relative_gap",
        (f"{stems['max_gap_matched']}/{attribute}", f"{stems['matched_overall']}/{attribute}"),
        threshold_for(rules.max_relative_gap, attribute),
        f"largest {attribute} group FID gap over overall FID (matched sizes)",
    )
    return disparity + gap


def _beats_base(candidate: Mapping[str, float], overall: str, base_key: str) -> RuleCheck:
    """The overall FID's interval high (its point if no interval) below the base model's FID; fails closed."""
    base = candidate.get(base_key)
    if base is None or not math.isfinite(base):
        detail = f"the base model's FID ({base_key}) was not measured: cannot show the candidate beats it"
        return _check(candidate, "beat_base_model", base_key, None, False, detail)
    high, point = candidate.get(f"ci_high/{overall}"), candidate.get(overall)
    worse_end = high if high is not None and math.isfinite(high) else point
    if worse_end is None or not math.isfinite(worse_end):
        detail = f"no finite overall FID ({overall}) to compare with the base model's {base:.4g}"
        return _check(candidate, "beat_base_model", overall, base, False, detail)
    ok = worse_end < base
    detail = f"overall FID interval high {worse_end:.4g} {'<' if ok else '>='} base model's FID {base:.4g}"
    if not ok:
        detail += ": the fine-tune is not better than the model it started from"
    return _check(candidate, "beat_base_model", overall, base, ok, detail)


def check_reference(candidate: Mapping[str, float], extractor: str, rules: ReferenceRules) -> list[RuleCheck]:
    """The candidate beats its base model beyond the interval, and stays within the floor ratio."""
    keys, overall = reference_keys(extractor), f"{fid_metric_names(extractor)['fid']}/{OVERALL}"
    checks: list[RuleCheck] = []
    if rules.beat_base_model:
        checks.append(_beats_base(candidate, overall, keys["base"]))
    if rules.max_fid_over_floor is not None:
        limit = rules.max_fid_over_floor
        checks += _ceiling(candidate, "max_fid_over_floor", keys["over_floor"], limit, "FID over real-vs-real floor")
    return checks


def check_es_auc(candidate: Mapping[str, float], attribute: str, floor: float | None) -> list[RuleCheck]:
    """Every ES-AUC of an attribute meets the floor; with a floor set, at least one must exist."""
    if floor is None:
        return []
    keys = sorted(k for k in candidate if k.startswith("es_auc_") and k.endswith(f"/{attribute}"))
    if not keys:
        return [
            _check(candidate, "min_es_auc", f"es_auc_*/{attribute}", floor, False, f"no ES-AUC metric for {attribute}")
        ]
    checks: list[RuleCheck] = []
    for key in keys:
        missing = _missing(candidate, key)
        if missing:
            checks += missing
            continue
        ok = candidate[key] >= floor
        checks.append(
            _check(
                candidate, "min_es_auc", key, floor, ok, f"{key} {candidate[key]:.4g} {'>=' if ok else '<'} {floor:.4g}"
            )
        )
    return checks


def _measured_fidelity(candidate: Mapping[str, float]) -> dict[str, bool]:
    """Attribute -> whether its fidelity could be computed, from ``fidelity_computable/<attribute>``."""
    stem = FIDELITY_ATTRIBUTE_STEMS["computable"] + "/"
    return {k.removeprefix(stem): bool(v) for k, v in candidate.items() if k.startswith(stem)}


def _fidelity_targets(value: object, default_to: Sequence[str]) -> dict[str, float]:
    if value is None:
        return {}
    if isinstance(value, dict):
        return {str(k): float(v) for k, v in value.items() if v is not None}
    return dict.fromkeys(default_to, float(value))  # type: ignore[arg-type]


def _fidelity_groups(candidate: Mapping[str, float], attribute: str) -> list[str]:
    prefix = fidelity_key("fidelity", attribute, "")
    return [k.removeprefix(prefix) for k in candidate if k.startswith(prefix)]


def _fidelity_floor(candidate: Mapping[str, float], attribute: str, floor: float) -> list[RuleCheck]:
    """Every group of one visible attribute is drawn as prompted at least ``floor`` as often as real images show it."""
    groups = _fidelity_groups(candidate, attribute)
    if not groups:
        detail = f"prompt fidelity of {attribute}: no group's fidelity was measured"
        return [_check(candidate, "min_group_fidelity", fidelity_key("fidelity", attribute, "*"), floor, False, detail)]
    checks = []
    for group in groups:
        key = fidelity_key("fidelity", attribute, group)
        value, real = candidate.get(key), candidate.get(fidelity_key("real_rate", attribute, group), math.nan)
        generated = candidate.get(fidelity_key("generated_rate", attribute, group), math.nan)
        if not _finite(value):
            detail = f"prompt fidelity of {attribute}={group} is {value}: its real images are never recognised"
            checks.append(_check(candidate, "min_group_fidelity", key, floor, False, detail))
            continue
        ok = value >= floor  # type: ignore[operator]
        detail = (
            f"prompt fidelity of {attribute}={group} {value:.2f} {'>=' if ok else '<'} {floor:.2f}: "
            f"{generated:.0%} of images prompted as {group} are recognised as {group}, against {real:.0%} "
            "of the real images"
        )
        checks.append(_check(candidate, "min_group_fidelity", key, floor, ok, detail))
    return checks


def _margin_floor(candidate: Mapping[str, float], attribute: str, floor: float) -> list[RuleCheck]:
    key = fidelity_key("margin_retained", attribute)
    missing = _missing(candidate, key)
    if missing:
        return missing
    ok = candidate[key] >= floor
    # Context for the reason only: shown as nan when absent, never a crash of the gate.
    real, generated, majority = (
        candidate.get(fidelity_key(stat, attribute), math.nan)
        for stat in ("real_accuracy", "generated_accuracy", "majority_rate")
    )
    detail = (
        f"prompt fidelity of {attribute}: generated images keep {candidate[key]:.2f} of the real images' margin "
        f"over the majority class ({'>=' if ok else '<'} {floor:.2f}; accuracy real {real:.2f}, generated "
        f"{generated:.2f}, majority {majority:.2f})"
    )
    return [_check(candidate, "min_margin_retained", key, floor, ok, detail)]


def check_fidelity(
    candidate: Mapping[str, float], attributes: Mapping[str, Sequence[str]], rules: FidelityRules
) -> list[RuleCheck]:
    """The candidate draws every group as prompted (fails closed; invisible attributes are left out, by name).

    ``min_group_fidelity`` as a number covers every protected attribute, ``min_margin_retained``
    as a number every measured clinical label; a mapping names its attributes.
    """
    measured = _measured_fidelity(candidate)
    clinical = [a for a in measured if a not in attributes]
    per_rule = [
        ("min_group_fidelity", _fidelity_targets(rules.min_group_fidelity, list(attributes)), _fidelity_floor),
        ("min_margin_retained", _fidelity_targets(rules.min_margin_retained, clinical), _margin_floor),
    ]
    checks: list[RuleCheck] = []
    for rule, targets, judge in per_rule:
        for attribute, floor in targets.items():
            visible_key = fidelity_key("visible", attribute)
            if attribute not in measured:
                detail = f"prompt fidelity of {attribute} was not measured: cannot show the model draws it as prompted"
                checks.append(_check(candidate, rule, fidelity_key("computable", attribute), floor, False, detail))
            elif not measured[attribute]:
                detail = f"prompt fidelity of {attribute} is not computable (see the evaluation report)"
                checks.append(_check(candidate, rule, fidelity_key("computable", attribute), floor, False, detail))
            elif not candidate.get(visible_key):
                detail = f"{attribute} is not visible in the real images beyond chance: left out of {rule}"
                checks.append(_check(candidate, rule, visible_key, floor, True, detail))
            else:
                checks += judge(candidate, attribute, floor)
    return checks


def check_non_regression(
    candidate: Mapping[str, float],
    champion: Mapping[str, float],
    keys: Sequence[tuple[str, float | None]],
    tolerances: NonRegressionRules,
    champion_version: str | None,
) -> list[RuleCheck]:
    """Each (metric, relative tolerance) is at most that much worse than the champion's.

    With ``use_intervals``, the candidate's bootstrap interval's better end is judged, so
    a candidate fails only if it is worse with the evaluation's confidence. A champion
    without the metric fails closed: the candidate cannot be shown to be no worse.
    """
    checks: list[RuleCheck] = []
    for key, tolerance in keys:
        if tolerance is None:
            continue
        reference = champion.get(key)
        if reference is None or not _finite(reference):
            detail = f"champion v{champion_version} has no finite {key}; cannot show the candidate is no worse"
            checks.append(_check(candidate, "non_regression", key, None, False, detail))
            continue
        if not _finite(candidate.get(key)):
            continue  # already reported as missing
        limit = reference * (1 + tolerance)
        value = candidate[key]
        better_end = candidate.get(f"ci_low/{key}") if tolerances.use_intervals else None
        judged = better_end if better_end is not None and _finite(better_end) else value
        basis = f"interval low {judged:.4g}" if judged is not value else f"{value:.4g}"
        detail = (
            f"{key} {basis} vs champion v{champion_version} {reference:.4g} "
            f"(tolerance {tolerance:.0%}, limit {limit:.4g})"
        )
        checks.append(_check(candidate, "non_regression", key, limit, judged <= limit, detail))
    return checks


def _group_loss(
    candidate: Mapping[str, float], reference: Mapping[str, float], key: str, tolerance: float, label: str
) -> RuleCheck:
    """One group's relative loss of a higher-is-better metric (``<metric>_<x>/<attr>/<group>``); fails closed."""
    metric, group = key.split("_", 1)[0], "=".join(key.split("/")[1:3])
    rule, before, now = f"madness_{metric}", reference.get(key), candidate.get(key)
    if before is None or not math.isfinite(before) or before <= 0:
        detail = f"MADness: {label} has no usable {key} ({before}); cannot show {group} kept its {metric}"
        return _check(candidate, rule, key, None, False, detail)
    if now is None or not math.isfinite(now):
        return _check(candidate, rule, key, None, False, f"MADness: required metric {key} is {now}")
    loss = 1 - now / before
    ok = loss <= tolerance
    detail = (
        f"MADness: {group} lost {max(loss, 0.0):.0%} of its {metric} vs {label} "
        f"({before:.3g} -> {now:.3g}; tolerance {tolerance:.0%})"
    )
    return _check(candidate, rule, key, before * (1 - tolerance), ok, detail)


def check_madness(
    candidate: Mapping[str, float],
    reference: Mapping[str, float] | None,
    label: str,
    attributes: Mapping[str, Sequence[str]],
    extractor: str,
    rules: MadnessRules,
) -> list[RuleCheck]:
    """No group loses more of its diversity ratio or recall than the policy tolerates (Mayer et al. 2024).

    Applies to a candidate trained on synthetic rows. ``reference`` is generation 0 of a
    generations experiment, else the champion; without one the candidate fails closed.
    """
    configured = [("diversity", rules.max_diversity_loss), ("recall", rules.max_recall_loss)]
    tolerances = [(metric, t) for metric, t in configured if t is not None]
    if not tolerances:
        return []
    if reference is None:
        detail = "MADness: trained on synthetic rows, but no champion or generation 0 to compare its groups with"
        return [RuleCheck("madness", "", None, None, False, detail)]
    checks: list[RuleCheck] = []
    for attribute, groups in attributes.items():
        for group in groups:
            for metric, tolerance in tolerances:
                key = f"{metric_key_stems(metric, extractor)['value']}/{attribute}/{group}"
                checks.append(_group_loss(candidate, reference, key, tolerance, label))
    return checks


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
    synthetic_share: float | None = None,
    generation0: Mapping[str, float] | None = None,
) -> GateDecision:
    """Judge a candidate's metrics against the policy's absolute rules and the champion.

    Every rule family runs and every violation is reported; the candidate passes only
    if no check failed.

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
        synthetic_share: The share of synthetic rows in the candidate's training data;
            above 0, the MADness guard compares every group's diversity ratio and recall
            with ``generation0`` when given, else with the champion.
        generation0: Flat metrics of generation 0 of a generations experiment.

    Returns:
        The decision; ``passed`` only if every check passed.
    """
    if policy is None:
        reason = f"gate policy cannot be used: {policy_error or 'no policy'}"
        checks = [RuleCheck("policy", "", None, None, False, reason)]
        return GateDecision(False, checks, {}, champion_version, [reason], policy_hash)

    names = fid_metric_names(extractor)
    rules = policy.absolute
    overall_key = f"{names['fid']}/{OVERALL}"
    checks = check_data_version(candidate_data_md5, evaluated_data_md5)
    checks += _missing(candidate, overall_key)
    checks += check_reference(candidate, extractor, policy.reference)
    # Attribute by attribute, so the reasons read in the order of the attributes.
    for attribute, groups in attributes.items():
        checks += check_slices(candidate, names, attribute, groups, rules.min_slice_size)
        checks += check_equity_ceilings(candidate, names, attribute, rules)
        checks += check_scale_free(candidate, extractor, attribute, rules)
        checks += check_es_auc(candidate, attribute, threshold_for(rules.min_es_auc, attribute))
    checks += check_fidelity(candidate, attributes, policy.fidelity)
    if champion is not None:
        tolerances = policy.non_regression
        compared = [(overall_key, tolerances.fid_overall)]
        compared += [(f"{names['es_fid']}/{a}", tolerances.es_fid) for a in attributes]
        checks += check_non_regression(candidate, champion, compared, tolerances, champion_version)
    if synthetic_share:
        reference, label = (generation0, "generation 0") if generation0 is not None else (champion, "the champion")
        label = label if generation0 is not None or champion_version is None else f"champion v{champion_version}"
        checks += check_madness(candidate, reference, label, attributes, extractor, policy.madness)

    reasons = [c.detail for c in checks if not c.passed]
    return GateDecision(
        passed=not reasons,
        checks=checks,
        policy=policy.model_dump(mode="json") | {"extractor": extractor},
        compared_with_version=champion_version,
        reasons=reasons,
        policy_hash=policy_hash,
    )
