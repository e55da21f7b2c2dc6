"""FairDiffusion: fairness-gated fine-tuning of text-to-image diffusion models.

The library is orchestration-free: Prefect lives in ``tasks/`` and ``flows/``.
Importing this package has no side effects.
"""

__version__ = "0.1.0"
