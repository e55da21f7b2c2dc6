"""The fairness gate's policy: a YAML file versioned in the repo, hashed into every decision.

A policy holds absolute rules (every candidate must meet them) and non-regression rules
(a candidate may be worse than the serving champion by at most a relative tolerance).
Every rule is a typed field; a rule is off only where the policy says ``null``. A
policy that cannot be read or parsed is not an error to crash on but a reason to reject:
:func:`load_policy` raises :class:`PolicyError`, which the gate turns into a failed
decision.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fairdiffusion import files
from fairdiffusion.errors import ConfigError, FairDiffusionError


class PolicyError(FairDiffusionError):
    """The gate policy file is missing, not YAML, or breaks the policy schema."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


#: A threshold for every attribute, or one per attribute name.
PerAttribute = float | dict[str, float] | None


class AbsoluteRules(_Strict):
    """Rules every candidate must meet, champion or not."""

    #: Every group slice of every protected attribute needs this many test images.
    min_slice_size: int = Field(ge=1)
    #: Ceiling on each attribute's equity-scaled FID (lower is better).
    max_es_fid: PerAttribute
    #: Ceiling on the largest FID difference between two groups of one attribute.
    max_group_fid_gap: PerAttribute
    #: Floor on each attribute's equity-scaled AUC of the clinical-semantics classifier
    #: (needs the evaluation's AUCs; a missing AUC then fails closed).
    min_es_auc: PerAttribute = None
    #: Scale-free ceilings, which mean the same at any FID scale (a random-feature FID of
    #: 5 or an Inception FID of 50): each attribute's disparity over the overall FID
    #: (D / FID), and its largest group gap at matched sample size over the matched overall FID.
    max_relative_disparity: PerAttribute = None
    max_relative_gap: PerAttribute = None


class ReferenceRules(_Strict):
    """What a candidate must beat, so that a model that learnt nothing cannot pass."""

    #: The candidate's overall FID must be below the FID of the model it was fine-tuned
    #: from, on the same prompts and seeds, beyond its bootstrap interval (the interval's
    #: worse end below the base model's FID). Fails closed when the base was not measured.
    beat_base_model: bool = True
    #: Ceiling on the overall FID over the real-vs-real floor, both at half the test set
    #: (1 = as close to the real images as real images are to each other).
    max_fid_over_floor: float | None = Field(None, gt=0)


class NonRegressionRules(_Strict):
    """How much worse than the champion a candidate may be (relative), per metric."""

    #: Overall FID.
    fid_overall: float | None = Field(ge=0)
    #: Each attribute's ES-FID.
    es_fid: float | None = Field(ge=0)
    #: Use the evaluation's bootstrap intervals where present: fail only if the interval's
    #: better end is still beyond the tolerance, i.e. worse with the evaluation's confidence.
    use_intervals: bool = True


class MadnessRules(_Strict):
    """How much of a group's diversity or recall retraining on synthetic rows may cost.

    Models retrained on their own output lose diversity, and minority groups lose it
    first (model autophagy disorder; Mayer et al. 2024, arXiv 2405.13977). A candidate
    whose training data holds synthetic rows is compared group by group with the
    champion, or with generation 0 of a generations experiment: the relative loss of
    each group's diversity ratio and recall must stay within these tolerances. On by
    default; ``null`` turns one off.
    """

    #: Largest relative loss of a group's diversity ratio (0.2: down to 80% of the reference).
    max_diversity_loss: float | None = Field(0.2, ge=0, le=1)
    #: Largest relative loss of a group's k-NN recall.
    max_recall_loss: float | None = Field(0.2, ge=0, le=1)


class FidelityRules(_Strict):
    """The candidate draws every group as prompted (prompt fidelity; beyond the paper).

    A model that ignores who the patient is serves no group fairly, however close its
    images are to the real ones on average. Fidelity is measured by a classifier trained
    on the real training images (:mod:`fairdiffusion.evaluation.fidelity`). An attribute
    the real images do not show beyond chance is left out; one named here that was not
    measured, or could not be, fails closed. On by default.
    """

    #: Floor on every group's fidelity (generated rate / real rate of being recognised
    #: as the group). A number: every protected attribute measured; a mapping: the named
    #: attributes (protected or clinical).
    min_group_fidelity: PerAttribute = 0.8
    #: Floor on the share of the real images' accuracy margin over the majority class
    #: that the generated images keep, (generated - majority) / (real - majority). A
    #: number: every clinical label measured; a mapping: the named attributes.
    min_margin_retained: PerAttribute = 0.5


class GatePolicy(_Strict):
    """A fairness-gate policy file."""

    name: str
    absolute: AbsoluteRules
    non_regression: NonRegressionRules
    reference: ReferenceRules = ReferenceRules()
    madness: MadnessRules = MadnessRules()
    fidelity: FidelityRules = FidelityRules()


def threshold_for(value: PerAttribute, attribute: str) -> float | None:
    """The threshold of one attribute; a mapping without the attribute means the rule is off."""
    if isinstance(value, dict):
        return value.get(attribute)
    return value


def load_policy(path: str | Path) -> tuple[GatePolicy, str]:
    """Read a policy file; return it and the sha256 of its bytes.

    Raises:
        PolicyError: naming the file and every bad key.
    """
    path = Path(path)
    try:
        raw_bytes = files.read_bytes(path)
        raw = files.parse_yaml(files.decode_text(raw_bytes, path), path)
    except FairDiffusionError as error:
        raise PolicyError(f"gate policy {error}") from None
    digest = hashlib.sha256(raw_bytes).hexdigest()
    try:
        return GatePolicy.model_validate(raw), digest
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in item['loc']) or '(top level)'}: {item['msg']}" for item in error.errors()
        )
        raise PolicyError(f"gate policy {path}: {problems}") from None


def check_fidelity_attributes(path: str | Path, columns: Iterable[str]) -> None:
    """Refuse, before training, a policy whose fidelity rules name an attribute the data does not have.

    A policy that cannot be read is left to the gate, which rejects the candidate naming why.

    Raises:
        ConfigError: naming the policy file, the rule's key and the missing attribute.
    """
    try:
        policy, _ = load_policy(path)
    except PolicyError:
        return
    available = set(columns)
    for rule in ("min_group_fidelity", "min_margin_retained"):
        value = getattr(policy.fidelity, rule)
        missing = sorted(set(value) - available) if isinstance(value, dict) else []
        if missing:
            raise ConfigError(
                f"gate policy {path}: fidelity.{rule} names {', '.join(missing)}, which the sample table does not "
                f"have (its attributes and labels must be columns of the data: {', '.join(sorted(available))})"
            )
