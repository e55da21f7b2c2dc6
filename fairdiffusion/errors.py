"""Errors that reach a user as a message, never as a traceback.

Every error raised for bad input derives from :class:`FairDiffusionError`; the CLI
prints its message and exits non-zero. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class FairDiffusionError(Exception):
    """Base class for errors caused by the user's input or environment."""


class ConfigError(FairDiffusionError):
    """The configuration file is missing, unparsable or breaks a rule."""


class DatasetError(FairDiffusionError):
    """The dataset folder cannot be read as the configured format."""


class DataVersionError(FairDiffusionError):
    """The working copy of the data does not match the version DVC records."""


class ValidationFailed(FairDiffusionError):
    """The data failed its Great Expectations suite; training must not start."""

    def __init__(self, message: str, result: object | None = None) -> None:
        super().__init__(message)
        self.result = result


class TrainingError(FairDiffusionError):
    """Training stopped for a reason the user can act on (e.g. a NaN loss)."""


class RegistryError(FairDiffusionError):
    """The model registry does not hold what was asked for."""


class GateRejected(FairDiffusionError):
    """The fairness gate rejected the candidate: it is registered, never promoted.

    ``outcome`` is the run's :class:`~fairdiffusion.registry.lineage.PromotionOutcome`.
    """

    def __init__(self, message: str, outcome: object | None = None) -> None:
        super().__init__(message)
        self.outcome = outcome
