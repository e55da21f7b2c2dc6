"""The one typed configuration of a pipeline run.

A run is described by a single YAML file (see ``configs/demo.yaml``), validated here
up front so that a bad key or value is reported by its dotted path before anything
runs. Library functions receive the typed sections they need, never a dict.

Relative paths in a config are resolved against the directory the command runs in
(the project root), which is how ``make demo`` and the Prefect deployment use them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fairdiffusion.errors import ConfigError

#: FairGenMed's protected attributes and their groups, in the order the paper uses.
FAIRGENMED_ATTRIBUTES: dict[str, list[str]] = {
    "race": ["Asian", "Black", "White"],
    "gender": ["Female", "Male"],
    "ethnicity": ["Non-Hispanic", "Hispanic"],
}


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataConfig(_Section):
    """Where the dataset lives, how it is versioned and how it is read."""

    format: Literal["fairgenmed"] = "fairgenmed"
    path: Path = Path("data")
    #: The DVC pointer file that names the dataset version; its folder is the DVC repo.
    dvc_file: Path = Path("data.dvc")
    #: Run ``dvc pull`` before checking the working copy (off when data is already local).
    pull: bool = True
    #: DVC remote to pull from; ``None`` uses the repo's default remote.
    remote: str | None = None
    attributes: dict[str, list[str]] = Field(default_factory=lambda: dict(FAIRGENMED_ATTRIBUTES))
    train_splits: list[str] = Field(default_factory=lambda: ["train", "val"])
    test_split: str = "test"
    #: Use at most this many subjects per split (``None``: all). For smoke runs.
    max_subjects_per_split: int | None = None

    @field_validator("attributes")
    @classmethod
    def _attributes_have_groups(cls, value: dict[str, list[str]]) -> dict[str, list[str]]:
        if not value:
            raise ValueError("at least one protected attribute is required")
        for name, groups in value.items():
            if len(groups) < 2 or len(set(groups)) != len(groups):
                raise ValueError(f"attribute '{name}' needs two or more distinct groups")
        return value


class ValidationConfig(_Section):
    """Thresholds of the Great Expectations suite."""

    #: Every group of every protected attribute needs at least this many subjects,
    #: in the training splits and in the test split separately.
    min_group_count: int = Field(5, ge=1)
    #: Expected (height, width) of every image; ``None`` accepts any 2-D shape.
    image_shape: tuple[int, int] | None = None


class ModelConfig(_Section):
    """Which Stable Diffusion pipeline to fine-tune."""

    #: ``tiny`` builds a small pipeline from the real diffusers classes (random weights,
    #: no download); anything else is a local folder or a hub id for ``from_pretrained``.
    pretrained: str = "tiny"
    #: Where the ``tiny`` pipeline is written and loaded back from.
    tiny_dir: Path = Path("outputs/tiny-sd")
    #: Hub downloads happen only when this is true and ``pretrained`` names a hub id.
    allow_download: bool = False


class TrainingConfig(_Section):
    """Fine-tuning of the UNet, with or without Fair Bayesian Perturbation."""

    method: Literal["fair", "baseline"] = "fair"
    output_dir: Path = Path("outputs/train")
    resolution: int = Field(32, ge=8)
    batch_size: int = Field(8, ge=1)
    max_steps: int = Field(60, ge=1)
    learning_rate: float = Field(1e-4, gt=0)
    max_grad_norm: float = Field(1.0, gt=0)
    seed: int = 0
    log_every: int = Field(10, ge=1)
    #: Fair Bayesian Perturbation (paper Sec. 3.2): GP refit period in steps.
    fair_time_window: int = Field(30, ge=2)
    #: Weight kept on the GP's sigma at every step; the rest is uniform exploration.
    fair_exploitation_rate: float = Field(0.95, ge=0, le=1)
    ucb_beta: float = Field(0.1, ge=0)


class ExtractorConfig(_Section):
    """The image feature network behind every FID. Its name is in every metric's name."""

    #: ``randcnn``: a fixed, seeded random conv net that needs no weights (demo only;
    #: not comparable with published FIDs). ``inception``: the standard FID Inception-v3
    #: TorchScript network, loaded only from ``weights`` or the usual cache, never fetched.
    name: Literal["randcnn", "inception"] = "inception"
    dim: int = Field(32, ge=2)
    weights: Path | None = None


class EvaluationConfig(_Section):
    """Generation of test images and the subgroup metrics computed on them."""

    output_dir: Path = Path("outputs/eval")
    extractor: ExtractorConfig = ExtractorConfig()
    num_inference_steps: int = Field(20, ge=1)
    guidance_scale: float = Field(7.5, ge=0)
    batch_size: int = Field(16, ge=1)
    seed: int = 1234
    #: Size images are resized to (antialiased) before feature extraction.
    feature_resolution: int = Field(64, ge=16)


class GateConfig(_Section):
    """Fairness gate: every rule is on unless its threshold is set to ``null``."""

    #: Ceiling on each attribute's equity-scaled FID.
    max_es_fid: float | None = Field(None, gt=0)
    #: Ceiling on the largest FID difference between two groups of one attribute.
    max_group_fid_gap: float | None = Field(None, gt=0)
    #: Every slice used by a rule needs at least this many test images.
    min_slice_size: int = Field(3, ge=1)
    #: Candidate may be at most this much worse (relative) than the champion on
    #: overall FID and on each attribute's ES-FID.
    regression_tolerance: float = Field(0.10, ge=0)


class TrackingConfig(_Section):
    """MLflow tracking and registry. ``MLFLOW_TRACKING_URI`` in the environment wins."""

    tracking_uri: str = "sqlite:///outputs/mlflow.db"
    artifact_root: Path = Path("outputs/mlartifacts")
    experiment: str = "fairdiffusion"
    model_name: str = "fairdiffusion"

    def resolved_tracking_uri(self) -> str:
        """The tracking URI in force: the environment's, else the config's, made absolute."""
        uri = os.environ.get("MLFLOW_TRACKING_URI") or self.tracking_uri
        prefix = "sqlite:///"
        if uri.startswith(prefix) and not uri[len(prefix) :].startswith("/"):
            uri = prefix + str(Path(uri[len(prefix) :]).resolve())
        return uri


class PipelineConfig(_Section):
    """Everything one pipeline run needs."""

    data: DataConfig = DataConfig()
    validation: ValidationConfig = ValidationConfig()
    model: ModelConfig = ModelConfig()
    training: TrainingConfig = TrainingConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    gate: GateConfig = GateConfig()
    tracking: TrackingConfig = TrackingConfig()

    @model_validator(mode="after")
    def _splits_are_disjoint(self) -> PipelineConfig:
        if self.data.test_split in self.data.train_splits:
            raise ValueError(f"data.test_split '{self.data.test_split}' is also a training split")
        return self


def _format_pydantic_error(source: str, error: ValidationError) -> str:
    lines = [f"{source}: invalid configuration"]
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"]) or "(top level)"
        lines.append(f"  - {key}: {item['msg']}")
    return "\n".join(lines)


def parse_config(raw: object, source: str = "<config>") -> PipelineConfig:
    """Validate an already-parsed YAML document.

    Raises:
        ConfigError: naming every bad key and the rule it breaks.
    """
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections")
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(_format_pydantic_error(source, error)) from None


def load_config(path: str | Path) -> PipelineConfig:
    """Read and validate a pipeline configuration from YAML.

    Raises:
        ConfigError: if the file is missing, is not YAML, or breaks a rule.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: configuration file not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML ({error})") from None
    return parse_config(raw, source=str(path))


def config_to_dict(config: PipelineConfig) -> dict[str, object]:
    """A JSON-serialisable dict of the resolved config, for lineage."""
    return config.model_dump(mode="json")
