"""What training returns: plain dataclasses, importable without torch."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

#: Steps at the start of a session left out of the steady-state timing (compilation,
#: allocator warm-up, the first batches' file cache misses).
WARMUP_STEPS = 3


@dataclass(frozen=True)
class TrainingTiming:
    """How fast the loop ran. Steady figures leave out the first :data:`WARMUP_STEPS` steps.

    Attributes:
        loop_seconds: Wall time of the training loop (no model loading, no final save).
        steady_steps: Steps in the steady-state figures.
        steady_seconds: Their wall time, checkpoints and validation grids excluded.
        median_step_seconds: Median optimiser-step time over the steady steps.
        samples_per_second: Global training samples per second over the steady steps.
        fbp_seconds: Time the training thread spent inside the FBP controller (weights,
            observations, and GP fits unless they run on a background thread).
        checkpoint_seconds: Time spent writing checkpoints.
        validation_seconds: Time spent generating validation grids.
        peak_memory_bytes: Peak GPU memory allocated by tensors; ``None`` on the CPU.
        fbp_setup_seconds: Time the FBP controller's construction spent, before the loop,
            importing botorch and warming up its first fit (0 once the process has paid it).
    """

    loop_seconds: float
    steady_steps: int
    steady_seconds: float
    median_step_seconds: float
    samples_per_second: float
    fbp_seconds: float
    checkpoint_seconds: float
    validation_seconds: float
    peak_memory_bytes: int | None
    fbp_setup_seconds: float = 0.0


@dataclass(frozen=True)
class FBPWindowSummary:
    """One closed FBP window as training reports it (1-based training steps).

    The controller's own record (:class:`fairdiffusion.training.fbp.FBPWindowRecord`,
    0-based, with the sigma it chose) goes to ``fbp_trajectory.json``; this is the
    summary in the :class:`TrainingResult`, with each attribute's loss gap.

    Attributes:
        step: The training step that closed the window.
        applied_step: The training step whose update first used the window's sigma.
        acquisition: UCB value at the chosen sigma; ``None`` when the fit failed.
        gaps: Loss gap (max - min group mean loss) per attribute at the closing step.
        fit_failed: Whether the window closed without a usable GP optimum.
        reason: Why the fit was skipped or failed, else ``None``.
    """

    step: int
    applied_step: int
    acquisition: float | None
    gaps: dict[str, float]
    fit_failed: bool = False
    reason: str | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FBPWindowSummary:
        """The inverse of ``dataclasses.asdict``."""
        return cls(**data)


@dataclass(frozen=True)
class TrainingLogRecord:
    """The training losses by group since the previous record; one record per log step.

    Made at every step that logs to MLflow (every ``log_every`` steps, at every FBP
    window and at the last step), whether or not anything is logged. The losses are
    pooled over every sample of the steps since the previous record, so a record's group
    means rest on ``steps`` batches, not one (``log_every: 1`` gives one per step).

    Attributes:
        step: The training step (1-based) the record was made at.
        steps: Optimiser steps pooled (since the previous record).
        loss: Mean unweighted per-sample loss over them: comparable between methods
            (the optimised, weighted loss is ``train/loss`` in MLflow).
        group_losses: Mean unweighted loss per group, keyed ``attribute/group``; a group
            with no sample in those steps is left out.
        group_samples: The samples behind each mean, keyed like ``group_losses``.
        gaps: Max minus min of the group means, per attribute.
        sigma: ``method: fair``: the perturbation scales that weighted step ``step``'s
            losses (in ``TrainingResult.sigma_names`` order); else ``None``.
        mean_shift: ``method: fair`` with ``fbp.mean_shift``: the per-group weight mean
            offsets of step ``step``, in the same order; else ``None``.
    """

    step: int
    steps: int
    loss: float
    group_losses: dict[str, float]
    group_samples: dict[str, int]
    gaps: dict[str, float]
    sigma: list[float] | None = None
    mean_shift: list[float] | None = None


@dataclass(frozen=True)
class TrainingResult:
    """Where the trained pipeline is and how training went."""

    model_dir: str
    method: str
    steps: int
    final_loss: float
    seconds: float
    sigma_names: list[str]
    final_sigma: list[float] | None
    windows: list[FBPWindowSummary]
    #: Signs that FBP is not working (sigma at a bound, a flat loss gap), once each.
    warnings: list[str] = field(default_factory=list)
    #: The checkpoint this run continued from, if it resumed.
    resumed_from: str | None = None
    #: The LoRA adapters alone (diffusers format), when ``training.lora_rank`` is set.
    lora_dir: str | None = None
    timing: TrainingTiming | None = None
    #: The losses by group (and FBP's sigma) at every log step, oldest first: for plots.
    history: list[TrainingLogRecord] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        """JSON-serialisable form."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainingResult:
        """The inverse of :meth:`to_dict` (what the launcher reads back from its processes)."""
        timing = data.get("timing")
        return cls(
            **data
            | {
                "windows": [FBPWindowSummary.from_dict(w) for w in data["windows"]],
                "timing": None if timing is None else TrainingTiming(**timing),
                "history": [TrainingLogRecord(**record) for record in data.get("history", [])],
            }
        )
