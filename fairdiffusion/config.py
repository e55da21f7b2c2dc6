"""The one typed configuration of a pipeline run.

A run is described by a single YAML file (see ``configs/demo.yaml``), validated here
up front so that a bad key or value is reported by its dotted path before anything
runs. Library functions receive the typed sections they need, never a dict.

Relative paths in a config are resolved against the directory the command runs in
(the project root), which is how ``make demo`` and the Prefect deployment use them.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from fairdiffusion import files
from fairdiffusion.errors import ConfigError

#: FairGenMed's protected attributes and their groups, in the order the paper uses.
FAIRGENMED_ATTRIBUTES: dict[str, list[str]] = {
    "race": ["Asian", "Black", "White"],
    "gender": ["Female", "Male"],
    "ethnicity": ["Non-Hispanic", "Hispanic"],
}
#: HAM10000's attributes as the paper uses them (FairDiffusion Sec. 4.1): sex and age group.
HAM10000_ATTRIBUTES: dict[str, list[str]] = {
    "sex": ["Female", "Male"],
    "age_group": ["under 60", "60 or older"],
}
#: CheXpert's attributes as the paper uses them: sex and race (Asian, Black, White).
CHEXPERT_ATTRIBUTES: dict[str, list[str]] = {
    "sex": ["Female", "Male"],
    "race": ["Asian", "Black", "White"],
}
#: Every attribute each dataset format can provide (a config picks a subset).
FORMAT_ATTRIBUTES: dict[str, dict[str, list[str]]] = {
    "fairgenmed": FAIRGENMED_ATTRIBUTES,
    "ham10000": HAM10000_ATTRIBUTES,
    "chexpert": CHEXPERT_ATTRIBUTES | {"ethnicity": ["Non-Hispanic", "Hispanic"]},
}
#: The attributes a format uses when the config names none.
DEFAULT_ATTRIBUTES: dict[str, dict[str, list[str]]] = {
    "fairgenmed": FAIRGENMED_ATTRIBUTES,
    "ham10000": HAM10000_ATTRIBUTES,
    "chexpert": CHEXPERT_ATTRIBUTES,
}
#: CheXpert's 14 observations, as the columns of its train.csv and valid.csv name them.
CHEXPERT_OBSERVATIONS = (
    "No Finding",
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


_FRONTAL: tuple[Literal["Frontal", "Lateral"], ...] = ("Frontal",)


class CheXpertConfig(_Section):
    """CheXpert specifics: which observation the prompt names, and the demographics table."""

    #: The observation the prompt names (paper: Pleural Effusion). Uncertain (-1) and
    #: blank count as negative, as the paper does.
    target: Literal[CHEXPERT_OBSERVATIONS] = "Pleural Effusion"  # type: ignore[valid-type]
    #: The demographics table (PATIENT, PRIMARY_RACE, ETHNICITY), CSV or the published
    #: xlsx; relative to ``data.path``.
    demographics: Path = Path("CHEXPERT DEMO.xlsx")
    #: Views kept (``Frontal/Lateral`` column).
    views: list[Literal["Frontal", "Lateral"]] = Field(default_factory=lambda: list(_FRONTAL), min_length=1)


class DataConfig(_Section):
    """Where the dataset lives, how it is versioned and how it is read."""

    #: ``fairgenmed`` (npz + data_summary.csv), ``ham10000`` (HAM10000_metadata.csv and
    #: the image folders) or ``chexpert`` (train.csv/valid.csv + demographics).
    format: Literal["fairgenmed", "ham10000", "chexpert"] = "fairgenmed"
    path: Path = Path("data")
    #: The DVC pointer file that names the dataset version; its folder is the DVC repo.
    dvc_file: Path = Path("data.dvc")
    #: Run ``dvc pull`` before checking the working copy (off when data is already local).
    pull: bool = True
    #: DVC remote to pull from; ``None`` uses the repo's default remote.
    remote: str | None = None
    #: Protected attribute -> groups; omitted: the format's (FairGenMed: race, gender,
    #: ethnicity; HAM10000: sex, age_group; CheXpert: sex, race).
    attributes: dict[str, list[str]] = Field(default_factory=lambda: copy.deepcopy(FAIRGENMED_ATTRIBUTES))
    train_splits: list[str] = Field(default_factory=lambda: ["train", "val"])
    test_split: str = "test"
    #: Use at most this many subjects per split (``None``: all). For smoke runs.
    max_subjects_per_split: int | None = None
    #: HAM10000 and CheXpert publish no usable split: each lesion (HAM10000) or patient
    #: (CheXpert) goes to a split by a hash of its id and ``split_seed``, in these
    #: proportions. A hash, not a shuffle, so growing the data never moves an existing
    #: lesion or patient to another split. Keys: the training splits and the test split.
    split_fractions: dict[str, float] = Field(default_factory=lambda: {"train": 0.7, "val": 0.1, "test": 0.2})
    split_seed: int = 0
    chexpert: CheXpertConfig = CheXpertConfig()

    @model_validator(mode="before")
    @classmethod
    def _format_default_attributes(cls, data: Any) -> Any:
        if isinstance(data, dict) and "attributes" not in data:
            defaults = DEFAULT_ATTRIBUTES.get(str(data.get("format", "fairgenmed")))
            if defaults is not None:
                data = {**data, "attributes": copy.deepcopy(defaults)}
        return data

    @field_validator("attributes")
    @classmethod
    def _attributes_have_groups(cls, value: dict[str, list[str]], info: ValidationInfo) -> dict[str, list[str]]:
        if not value:
            raise ValueError("at least one protected attribute is required")
        for name, groups in value.items():
            if len(groups) < 2 or len(set(groups)) != len(groups):
                raise ValueError(f"attribute '{name}' needs two or more distinct groups")
        known = FORMAT_ATTRIBUTES.get(str(info.data.get("format")))
        if known is not None:
            for name in value:
                if name not in known:
                    raise ValueError(
                        f"'{name}' is not an attribute of format '{info.data.get('format')}' "
                        f"(it provides {', '.join(known)})"
                    )
        return value

    @field_validator("split_fractions")
    @classmethod
    def _fractions_sum_to_one(cls, value: dict[str, float]) -> dict[str, float]:
        if any(fraction <= 0 for fraction in value.values()):
            raise ValueError("every split fraction must be above 0")
        if abs(sum(value.values()) - 1.0) > 1e-6:
            raise ValueError(f"split fractions must add up to 1 (they add up to {sum(value.values()):g})")
        return value

    @model_validator(mode="after")
    def _fractions_name_the_splits(self) -> DataConfig:
        if self.format != "fairgenmed":
            wanted = {*self.train_splits, self.test_split}
            if set(self.split_fractions) != wanted:
                raise ValueError(
                    f"split_fractions names {sorted(self.split_fractions)} but format '{self.format}' "
                    f"needs exactly the training and test splits {sorted(wanted)}"
                )
        return self


class ValidationConfig(_Section):
    """Thresholds of the Great Expectations suites."""

    #: Every group of every protected attribute needs at least this many subjects,
    #: in the training splits and in the test split separately.
    min_group_count: int = Field(5, ge=1)
    #: Per-group minimums that replace the ones above, keyed like ``race=Asian`` (or an
    #: intersection, ``race=Asian&gender=Female``).
    min_group_counts: dict[str, int] = Field(default_factory=dict)
    #: Intersections of attributes whose every combination of groups is counted too,
    #: e.g. ``[[race, gender]]``.
    intersections: list[list[str]] = Field(default_factory=list)
    #: The minimum of each intersection group, in training and in test.
    min_intersection_count: int = Field(1, ge=1)
    #: The main clinical label; ``None``: the format's (FairGenMed: glaucoma; HAM10000
    #: and CheXpert: diagnosis). Each group needs both of its classes, in training and
    #: in test, else the group's AUC is undefined.
    main_label: str | None = None
    #: Each group needs at least this many subjects of each class of the main label.
    min_class_count: int = Field(1, ge=1)
    #: Expected (height, width) of every image; ``None``: all images share one shape,
    #: whatever it is; ``any``: mixed sizes are accepted (training resizes every image).
    image_shape: tuple[int, int] | Literal["any"] | None = None
    image_dtype: str = "uint8"
    #: Every pixel value lies in [low, high].
    intensity_range: tuple[float, float] = (0, 255)
    #: Rows whose ``source`` is ``synthetic`` may make up at most this share of the
    #: training splits (the test split must be entirely real). Bounds a self-consuming loop.
    max_synthetic_fraction: float = Field(0.2, ge=0, le=1)
    #: ... and of each group's training rows (every group of every attribute): a minority
    #: topped up with synthetic images is where self-consuming retraining does its damage
    #: first (Mayer et al. 2024). 0.5: no group is more synthetic than real.
    max_synthetic_fraction_per_group: float = Field(0.5, ge=0, le=1)
    #: Compared with the data the current champion was trained on, no group's share of
    #: its attribute (in training or in test) may move by more than this (0.05: five
    #: percentage points) ...
    max_share_shift: float = Field(0.05, ge=0, le=1)
    #: ... unless acknowledged here: ``race=Asian: "why"`` (the reason is recorded).
    acknowledged_shifts: dict[str, str] = Field(default_factory=dict)
    #: Threads that decode images (zlib, JPEG and hashing release the GIL).
    workers: int = Field(2, ge=1)

    @field_validator("intersections")
    @classmethod
    def _intersections_pair_attributes(cls, value: list[list[str]]) -> list[list[str]]:
        for names in value:
            if len(names) < 2 or len(set(names)) != len(names):
                raise ValueError(f"{names}: an intersection needs two or more distinct attributes")
        return value

    @field_validator("acknowledged_shifts")
    @classmethod
    def _acknowledgements_give_reasons(cls, value: dict[str, str]) -> dict[str, str]:
        for key, reason in value.items():
            if "=" not in key:
                raise ValueError(f"'{key}': name a group as attribute=group, e.g. race=Asian")
            if not str(reason).strip():
                raise ValueError(f"'{key}': an acknowledgement needs a reason")
        return value

    @model_validator(mode="after")
    def _range_is_ordered(self) -> ValidationConfig:
        low, high = self.intensity_range
        if low > high:
            raise ValueError(f"intensity_range [{low:g}, {high:g}] is empty")
        return self


class ModelConfig(_Section):
    """Which Stable Diffusion pipeline to fine-tune."""

    #: Architecture presets need no download: ``tiny`` builds a small pipeline from the
    #: real diffusers classes (random weights; tests, CPU); ``sd-1.5`` and ``sd-2.1`` are
    #: the real architectures at true size with random weights (throughput measurements).
    #: Anything else is a local folder or a hub id for ``from_pretrained`` (real weights).
    pretrained: str = "tiny"
    #: Where the ``tiny`` pipeline is written and loaded back from.
    tiny_dir: Path = Path("outputs/tiny-sd")
    #: Hub downloads happen only when this is true and ``pretrained`` names a hub id.
    allow_download: bool = False
    #: The ``.dvc`` file that versions ``pretrained`` when it is a local folder (the demo's
    #: ``base-model.dvc``): pulled and checked like the data, its md5 recorded in the lineage.
    #: ``None``: ``pretrained`` is not versioned by this repo (a preset or a hub id).
    dvc_file: Path | None = None
    #: ``dvc pull`` the base model before checking it (off when it is already local).
    pull: bool = True


class DistributedConfig(_Section):
    """How many training processes run, and how the training task starts them."""

    #: Processes per machine, one per GPU. With 1 process on 1 machine training runs
    #: inside the calling process; otherwise the training task launches a subprocess.
    num_processes: int = Field(1, ge=1)
    num_machines: int = Field(1, ge=1)
    #: This machine's rank (0 on the machine that runs the flow).
    machine_rank: int = Field(0, ge=0)
    main_process_ip: str = "127.0.0.1"
    main_process_port: int = Field(29500, ge=1, le=65535)
    #: ``accelerate`` (``accelerate launch``, GPUs) or ``torchrun`` (also CPU processes over
    #: gloo, which ``accelerate launch --cpu`` does not start here).
    launcher: Literal["accelerate", "torchrun"] = "accelerate"

    @model_validator(mode="after")
    def _rank_in_range(self) -> DistributedConfig:
        if self.machine_rank >= self.num_machines:
            raise ValueError(f"machine_rank {self.machine_rank} must be below num_machines {self.num_machines}")
        return self


class FBPConfig(_Section):
    """Fair Bayesian Perturbation (FairDiffusion Sec. 3.2), used when ``training.method`` is ``fair``."""

    #: GP refit period in optimiser steps (the paper: 30).
    time_window: int = Field(30, ge=2)
    #: Weight kept on the GP's sigma at every step; the rest is uniform exploration (the paper: 0.95).
    exploitation_rate: float = Field(0.95, ge=0, le=1)
    #: Exploration weight of the UCB acquisition function.
    ucb_beta: float = Field(0.1, ge=0)
    #: 0: the paper's exact order (the GP is fitted on the training thread when a window
    #: closes). k > 0: fitted on a background thread and applied k steps late (staleness k
    #: steps; see :mod:`fairdiffusion.training.fbp`).
    fit_lag: int = Field(0, ge=0)
    #: Warn when sigma sits at a bound, or the subgroup loss gap stays flat, this many windows.
    warn_windows: int = Field(5, ge=2)

    # Variants: each is a departure from the paper, off by default (the defaults are the
    # paper). The reasons come from a simulation of the controller with FairGenMed-like
    # groups (issue 11); fairdiffusion.training.fbp_variants documents each in full.

    #: ``step`` (paper): one GP point per step, y = minus the summed group loss gaps of
    #: that step's batch. ``window``: one GP point per window (x: the mean of the sigmas
    #: used in it), y from the group means over the whole window of losses divided by
    #: their timestep bucket's mean over the window. Why: the per-step gap is noise
    #: (spread ~0.08 against a group effect ~0.003), mostly from the timestep draw, and it
    #: is measured before the step that uses the sigma. Needs ``history_windows`` >= 2.
    objective: Literal["step", "window"] = "step"
    #: Equal-width buckets of the scheduler's training timesteps (``objective: window``).
    timestep_buckets: int = Field(10, ge=1)
    #: The GP is fitted on the points of the last K windows (paper: 1, the current one).
    #: Why: one window is 30 points in 7+ dimensions along a one-dimensional path.
    history_windows: int = Field(1, ge=1)
    #: ``uniform`` (paper): sigma <- rho sigma + (1 - rho) U(0,1) every step.
    #: ``candidate``: sigma <- rho sigma + (1 - rho) clip(c + candidate_noise N(0,1), 0, 1),
    #: c the last GP optimum. Why: mixing toward U(0,1) pulls sigma to 0.5 (it stayed in
    #: [0.38, 0.60] when the GP's targets were 0.1 and 0.9).
    mix_toward: Literal["uniform", "candidate"] = "uniform"
    #: Standard deviation of the exploration around the candidate (``mix_toward: candidate``).
    candidate_noise: float = Field(0.1, gt=0, le=1)
    #: ``gaussian`` (paper): w = 1 + sum_a sigma eps (negative for 12% of samples at sigma
    #: 0.5, i.e. gradient ascent). ``lognormal``: w = exp(sum_a (sigma eps - sigma^2 / 2)),
    #: mean 1 and always positive. ``clipped``: the paper's w clipped at 0, then divided by
    #: its mean over the global batch (so the loss scale stays that of the other arms).
    weights: Literal["gaussian", "lognormal", "clipped"] = "gaussian"
    #: The GP also tunes a weight mean offset per group (the first group of each attribute
    #: is the reference, offset 0), so a group can be up-weighted on average. Why: with
    #: the paper's weights E[w] = 1 whatever sigma is: only the variance is controlled.
    mean_shift: bool = False
    #: Bound of the summed offsets: a sample's mean weight stays in [1 - m, 1 + m]
    #: (lognormal: [e^-m, e^m]); each attribute's offsets lie in [-m / A, m / A].
    mean_shift_max: float = Field(0.5, gt=0, lt=1)

    @model_validator(mode="after")
    def _lag_inside_window(self) -> FBPConfig:
        if self.fit_lag >= self.time_window:
            raise ValueError(f"fit_lag {self.fit_lag} must be below time_window {self.time_window}")
        return self

    @model_validator(mode="after")
    def _window_objective_has_history(self) -> FBPConfig:
        if self.objective == "window" and self.history_windows < 2:
            raise ValueError(
                "history_windows must be at least 2 with objective: window (one GP point per window; 10 or more "
                f"is sensible), got {self.history_windows}"
            )
        return self

    def is_paper(self) -> bool:
        """Whether every variant knob is at the paper's setting."""
        return all(getattr(self, name) == field.default for name, field in _FBP_VARIANT_FIELDS.items())


#: The knobs of FBPConfig that depart from the paper (their defaults are the paper's).
_FBP_VARIANT_FIELDS = {
    name: field
    for name, field in FBPConfig.model_fields.items()
    if name not in {"time_window", "exploitation_rate", "ucb_beta", "fit_lag", "warn_windows"}
}


class SamplingConfig(_Section):
    """Validation grids: generated samples per subgroup, logged while training runs."""

    #: A grid of generated samples per subgroup every this many steps, as an MLflow
    #: artifact (``None``: none).
    every: int | None = Field(None, ge=1)
    images_per_group: int = Field(2, ge=1)
    inference_steps: int = Field(20, ge=1)


#: Flat ``training`` keys that moved into a nested section, and where they are now.
MOVED_TRAINING_KEYS: dict[str, str] = {
    "fair_time_window": "training.fbp.time_window",
    "fair_exploitation_rate": "training.fbp.exploitation_rate",
    "ucb_beta": "training.fbp.ucb_beta",
    "fair_fit_lag": "training.fbp.fit_lag",
    "fair_warn_windows": "training.fbp.warn_windows",
    "validation_every": "training.sampling.every",
    "validation_images_per_group": "training.sampling.images_per_group",
    "validation_inference_steps": "training.sampling.inference_steps",
}


def moved_training_keys(training: object) -> list[str]:
    """One message per moved key that a ``training`` mapping still uses, naming its new place."""
    if not isinstance(training, dict):
        return []
    return [f"training.{key} moved to {new}" for key, new in MOVED_TRAINING_KEYS.items() if key in training]


class MadRegularizerConfig(_Section):
    """The MADness regulariser (Mayer et al. 2024; the math in ``fairdiffusion/training/mad.py``).

    Penalises, per group with uniform group weights, the discrepancy between the update of
    the effective LoRA weights ``(alpha / r) B A`` estimated on real data and the one
    estimated on the model's own samples (drawn without gradients). Needs ``lora_rank``.
    """

    #: lambda; 0 (the default) turns it off.
    weight: float = Field(0.0, ge=0)
    #: eta of the one-step estimator ``dW - eta * dL/d(dW)``.
    step_size: float = Field(1.0, gt=0)
    #: Synthetic images drawn per step (one per real prompt of the batch when ``None``).
    synthetic_batch_size: int | None = Field(None, ge=1)
    #: Denoising steps (DDIM, no guidance) of the no-gradient sampling of the synthetic batch.
    inference_steps: int = Field(10, ge=1)
    #: A new synthetic batch every this many optimiser steps (1: every step, as the paper's
    #: ``D_S ~ p_theta`` asks); in between, the last one is reused with fresh noise.
    refresh_every: int = Field(1, ge=1)


class TrainingConfig(_Section):
    """Fine-tuning of the UNet, with or without Fair Bayesian Perturbation."""

    #: ``fair``: Fair Bayesian Perturbation (``fbp``). ``baseline``: plain fine-tuning.
    #: ``reweight``: each sample's loss times a fixed weight inversely proportional to
    #: its group's frequency in the training rows (mean 1 over them). ``balanced``: the
    #: data loader draws rows (seeded, with replacement) so that every group is equally
    #: likely; losses unweighted. Groups of both: ``balance_attributes``.
    method: Literal["fair", "baseline", "reweight", "balanced"] = "fair"
    #: ``reweight`` and ``balanced``: a group is one combination of these attributes'
    #: groups present in the training rows (``None``: all of ``data.attributes``).
    #: Ignored by the other methods.
    balance_attributes: list[str] | None = Field(None, min_length=1)
    #: Cap on a group's weight (``reweight``) or on its sampling rate relative to a row
    #: drawn uniformly (``balanced``); the weights are then rescaled to mean 1, repeatedly,
    #: until none exceeds it. A tiny intersectional group (1 row in 360 among 12 groups
    #: would get 30) must not dominate the gradient. ``None``: no cap.
    max_group_weight: float | None = Field(10.0, ge=1)
    output_dir: Path = Path("outputs/train")
    resolution: int = Field(32, ge=8)
    #: Images per process and per micro-step; the global batch is
    #: ``batch_size * processes * gradient_accumulation_steps``.
    batch_size: int = Field(8, ge=1)
    #: Optimiser steps.
    max_steps: int = Field(60, ge=1)
    learning_rate: float = Field(1e-4, gt=0)
    #: A diffusers scheduler (``diffusers.optimization.get_scheduler``).
    lr_scheduler: Literal[
        "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"
    ] = "constant"
    lr_warmup_steps: int = Field(0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    gradient_accumulation_steps: int = Field(1, ge=1)
    #: ``fp16`` needs a GPU; ``bf16`` works on recent GPUs and on the CPU.
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    #: Recompute UNet activations in the backward pass: less memory, about 30% more time.
    gradient_checkpointing: bool = False
    #: Exponential moving average of the trained weights (diffusers' ``EMAModel``); the
    #: saved pipeline then holds the EMA weights.
    use_ema: bool = False
    ema_decay: float = Field(0.9999, gt=0, lt=1)
    #: ``None``: as the pretrained noise scheduler says (SD 2.1: ``v_prediction``).
    prediction_type: Literal["epsilon", "v_prediction"] | None = None
    #: Offset noise (Guttenberg 2023; diffusers' ``--noise_offset``, which the authors' script
    #: inherits, default 0): a per-image, per-channel constant times this is added to the
    #: noise, so the model can move an image's mean brightness, what the demo's groups differ
    #: in most. 0: plain noise, as the paper, and the demo: its base is trained with zero
    #: terminal SNR, which fixed the same brightness leak at its root (issue 26).
    noise_offset: float = Field(0.0, ge=0)
    #: Train the text encoder with the UNet (diffusers' DreamBooth ``--train_text_encoder``).
    #: A departure from the paper, whose script freezes it: SD's CLIP encoder already gives
    #: "Asian" and "White" distinct meanings, the demo's small random one does not.
    #: Measured on the demo (issue 26): with it frozen, no fine-tune taught the model the
    #: rare group (recognised in 0-15% of its images); trained, in 70-100%. The saved
    #: pipeline holds the trained encoder. Full fine-tuning of the encoder, also with LoRA.
    #: With ``mad_regularizer``, the penalty is on the UNet's adapter updates; the encoder
    #: gets its gradient through the prompt embeddings those updates read.
    train_text_encoder: bool = False
    #: Share of training prompts replaced by the empty prompt (diffusers' SDXL and
    #: ControlNet scripts: ``--proportion_empty_prompts``), so the model keeps the
    #: unconditional prediction that classifier-free guidance extrapolates from. 0, as the
    #: paper's script (SD's unconditional prediction was learnt in pretraining). A departure
    #: worth taking when the text encoder trains: the empty prompt's embedding then moves,
    #: and guidance extrapolates from a prediction nothing trained. Measured on the demo
    #: (issue 26, 300 steps, text encoder trained): 0 -> vision-loss margin kept 0.31, the
    #: brightest group drawn 16 grey levels too bright; 0.1 -> 1.06, within 1 level.
    proportion_empty_prompts: float = Field(0.0, ge=0, lt=1)
    #: Min-SNR loss weighting (Hang et al. 2023); ``None``: unweighted. 5.0 is the usual value.
    snr_gamma: float | None = Field(None, gt=0)
    #: LoRA adapters on the UNet's attention projections (peft); ``None``: full fine-tuning.
    #: The saved pipeline has the adapters merged; ``<output_dir>/lora`` keeps them alone.
    lora_rank: int | None = Field(None, ge=1)
    #: LoRA scaling numerator; ``None``: equal to ``lora_rank``.
    lora_alpha: float | None = Field(None, gt=0)
    #: Resize the short side to ``resolution``, then crop the centre (else a random crop).
    center_crop: bool = True
    #: Off by default: a horizontal flip swaps the laterality (left/right eye) of a fundus image.
    random_flip: bool = False
    dataloader_num_workers: int = Field(0, ge=0)
    seed: int = 0
    #: Metrics go to MLflow every this many steps (and at every FBP window).
    log_every: int = Field(10, ge=1)
    #: A checkpoint every this many steps and at the end (``None``: none, no resume).
    checkpoint_every: int | None = Field(500, ge=1)
    #: Complete checkpoints kept in ``<output_dir>/checkpoints`` (oldest removed first).
    checkpoints_total_limit: int = Field(3, ge=1)
    #: ``latest``: continue from the newest complete checkpoint (fresh start if none);
    #: a path: continue from that checkpoint; ``None``: start fresh.
    resume: str | None = None
    fbp: FBPConfig = FBPConfig()
    sampling: SamplingConfig = SamplingConfig()
    distributed: DistributedConfig = DistributedConfig()
    mad_regularizer: MadRegularizerConfig = MadRegularizerConfig()

    @model_validator(mode="before")
    @classmethod
    def _no_moved_keys(cls, data: Any) -> Any:
        # For Python callers; a YAML file is checked by parse_config first, with a cleaner message.
        moved = moved_training_keys(data)
        if moved:
            raise ValueError("; ".join(moved))
        return data

    @model_validator(mode="after")
    def _consistent(self) -> TrainingConfig:
        if self.lora_rank is None and self.lora_alpha is not None:
            raise ValueError("lora_alpha needs lora_rank")
        if self.mad_regularizer.weight > 0 and self.lora_rank is None:
            raise ValueError("mad_regularizer.weight > 0 needs lora_rank: the penalty is on the LoRA updates")
        if self.mad_regularizer.weight > 0 and self.gradient_checkpointing:
            raise ValueError(
                "mad_regularizer.weight > 0 does not work with gradient_checkpointing "
                "(the penalty back-propagates twice)"
            )
        return self

    @field_validator("balance_attributes")
    @classmethod
    def _distinct_balance_attributes(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and len(set(value)) != len(value):
            raise ValueError(f"{value}: name each attribute once")
        return value


class ExtractorConfig(_Section):
    """The image feature network behind every FID. Its name is in every metric's name."""

    #: ``inception``: the standard FID Inception-v3 TorchScript network, loaded only from
    #: ``weights`` or the usual cache, never fetched; the choice wherever its weights exist.
    #: ``domain``: the fundus encoder trained with the base model on its pretraining set
    #: only (``weights``: the base bundle folder, default ``base-model``); metrics named
    #: ``fid_fundus-enc64/...``. ``randcnn``: a fixed, seeded random conv net that needs no
    #: weights; it measures little on fundus images, kept for comparison.
    name: Literal["randcnn", "inception", "domain"] = "inception"
    dim: int = Field(32, ge=2)
    weights: Path | None = None


class ClinicalConfig(_Section):
    """Clinical semantics (paper Sec. 4.3): a classifier trained on the generated images
    with the labels their prompts asked for, tested on the real test images (AUC)."""

    enabled: bool = True
    #: Prompted labels to predict; each gets AUC overall, per group, and ES-AUC.
    #: ``None``: FairGenMed's (glaucoma, md_severity, cdr_status, se_status) that the
    #: sample table has; a named label missing from the table is an error.
    labels: list[str] | None = None
    #: ``small``: a compact CNN trained from scratch (CPU, the demo). ``efficientnet`` /
    #: ``vit``: transformers' EfficientNet / ViT fine-tuned from ``weights`` (GPU advised).
    classifier: Literal["small", "efficientnet", "vit"] = "small"
    #: Local folder (or, with ``allow_download``, hub id) of the efficientnet/vit weights.
    weights: str | None = None
    allow_download: bool = False
    #: Images are resized (antialiased) to this size for the classifier.
    resolution: int = Field(64, ge=16)
    epochs: int = Field(30, ge=1)
    batch_size: int = Field(32, ge=1)
    learning_rate: float = Field(1e-3, gt=0)
    seed: int = 0

    @model_validator(mode="after")
    def _pretrained_needs_weights(self) -> ClinicalConfig:
        if self.enabled and self.classifier != "small" and self.weights is None:
            raise ValueError(f"classifier '{self.classifier}' needs weights (a local folder or a hub id)")
        return self


class FidelityConfig(ClinicalConfig):
    """Prompt fidelity (beyond the paper): does the model draw the patient its prompt describes?

    A classifier trained on the *real* training images (the reverse of the clinical AUC's
    direction) predicts every prompted attribute; per group, the rate at which generated
    images prompted as that group are classified as it, over the same rate on the real
    test images, is the group's fidelity. ``labels`` names the attributes measured
    (``None``: every protected attribute and every clinical label the table has).
    """

    #: Epochs of the real-image classifier (one fit per data version, cached).
    epochs: int = Field(30, ge=1)
    #: An attribute counts as visible in the real images when the lower end of the
    #: interval of the classifier's balanced accuracy on the real test images exceeds chance
    #: (1 / classes) by this margin; an attribute that is not is reported, never gated.
    visible_margin: float = Field(0.1, ge=0, lt=1)


#: ``evaluation.ci_method`` values that were renamed, and their new names.
RENAMED_CI_METHODS: dict[str, str] = {"bias_corrected": "bias_shifted_percentile"}


class EvaluationConfig(_Section):
    """Generation of test images and the subgroup metrics computed on them."""

    output_dir: Path = Path("outputs/eval")
    extractor: ExtractorConfig = ExtractorConfig()
    #: Paper: 75 steps, guidance 7.5 (FairDiffusion Sec. 4.1).
    num_inference_steps: int = Field(20, ge=1)
    guidance_scale: float = Field(7.5, ge=0)
    batch_size: int = Field(16, ge=1)
    #: Image i is generated with seed ``seed + i``, whatever the batch size.
    seed: int = 1234
    #: ``auto``: CUDA when present, else the CPU.
    device: Literal["auto", "cpu", "cuda"] = "auto"
    #: ``auto``: fp16 on a GPU, fp32 on the CPU.
    precision: Literal["auto", "fp32", "fp16", "bf16"] = "auto"
    #: Size images are resized to (antialiased) before feature extraction.
    feature_resolution: int = Field(64, ge=16)
    #: Also report every intersection of groups of two or more attributes.
    intersections: bool = True
    #: Slices with fewer test images are flagged in the report.
    min_slice_size: int = Field(10, ge=1)
    #: Bootstrap resamples per slice and per attribute (0: no intervals).
    bootstrap_resamples: int = Field(1000, ge=0)
    confidence_level: float = Field(0.95, gt=0, lt=1)
    #: ``bias_shifted_percentile``: percentiles shifted by the bootstrap's estimate of
    #: bias (FID is inflated in a resample); not Efron's BC or BCa. ``percentile``: plain
    #: percentiles. ``bca``: Efron's bias-corrected and accelerated interval, computed by
    #: ``scipy.stats.bootstrap`` (a jackknife per slice: slower for large slices).
    ci_method: Literal["bias_shifted_percentile", "percentile", "bca"] = "bias_shifted_percentile"
    #: Seeded subsamples per attribute for matched-sample-size values (0: none).
    matched_draws: int = Field(20, ge=0)
    #: Real and generated images per group in the report's sample grids.
    grid_images_per_group: int = Field(4, ge=1)
    #: Features are cached here by (model, data, extractor); ``None``: ``<output_dir>/cache``.
    cache_dir: Path | None = None
    clinical: ClinicalConfig = ClinicalConfig()
    fidelity: FidelityConfig = FidelityConfig()

    @field_validator("ci_method", mode="before")
    @classmethod
    def _no_renamed_ci_method(cls, value: Any) -> Any:
        if isinstance(value, str) and value in RENAMED_CI_METHODS:
            new = RENAMED_CI_METHODS[value]
            raise PydanticCustomError(
                "renamed_value",
                "'{old}' was renamed '{new}' (a percentile interval shifted by the bootstrap's bias, "
                "not Efron's BC or BCa); write evaluation.ci_method: {new}, or bca for Efron's BCa",
                {"old": value, "new": new},
            )
        return value


class GateConfig(_Section):
    """The fairness gate: its policy file and whether a person must approve a pass."""

    #: The policy YAML (rules and tolerances), versioned in the repo; its sha256 is
    #: recorded with every decision. See ``policies/`` and :mod:`fairdiffusion.registry.policy`.
    policy: Path = Path("policies/demo.yaml")
    #: When true, a passing candidate waits for ``fairdiffusion approve``.
    require_approval: bool = False


class TrackingConfig(_Section):
    """MLflow tracking and registry. ``MLFLOW_TRACKING_URI`` in the environment wins."""

    tracking_uri: str = "sqlite:///outputs/mlflow.db"
    artifact_root: Path = Path("outputs/mlartifacts")
    experiment: str = "fairdiffusion"
    #: Every gate decision, approval, override and rollback is one immutable run here.
    audit_experiment: str = "fairdiffusion-audit"
    model_name: str = "fairdiffusion"
    #: Where the promotion lock is taken (:mod:`fairdiffusion.registry.locking`):
    #: ``None`` means the tracking store itself, which works for ``sqlite:///`` and
    #: database URIs. With an MLflow server (``http://``), name its backend store here.
    lock_uri: str | None = None

    def resolved_tracking_uri(self) -> str:
        """The tracking URI in force: the environment's, else the config's, made absolute."""
        uri = os.environ.get("MLFLOW_TRACKING_URI") or self.tracking_uri
        prefix = "sqlite:///"
        if uri.startswith(prefix) and not uri[len(prefix) :].startswith("/"):
            uri = prefix + str(Path(uri[len(prefix) :]).resolve())
        return uri


class GenerationsConfig(_Section):
    """The self-consuming retraining experiment (``fairdiffusion generations``; Mayer et al. 2024).

    Generation 0 trains on the real data; each later one on images its predecessor
    generated for the training prompts (with provenance), mixed with real data by the
    regime, and is evaluated on the same real test set. Never read by the pipeline.
    """

    #: Where each generation's dataset folder, model and report go (``generation-<g>/``).
    output_dir: Path = Path("outputs/generations")
    #: The MLflow experiment of the generation runs; ``None``: ``<tracking.experiment>-generations``.
    #: The generations never touch the registry: no version of them becomes champion.
    experiment: str | None = None
    #: The synthetic-share ceiling of the experiment's data, overall and per group. ``None``
    #: keeps ``validation``'s ceilings, which every regime but a tiny ``augment`` breaks at
    #: generation 1: lifting them takes this explicit key, recorded on every generation run.
    max_synthetic_share: float | None = Field(None, ge=0, le=1)
    #: ``fresh`` regime: the share of the real training rows drawn anew for each generation.
    fresh_fraction: float = Field(0.5, gt=0, le=1)


class PipelineConfig(_Section):
    """Everything one pipeline run needs."""

    data: DataConfig = DataConfig()
    validation: ValidationConfig = ValidationConfig()
    model: ModelConfig = ModelConfig()
    training: TrainingConfig = TrainingConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    gate: GateConfig = GateConfig()
    tracking: TrackingConfig = TrackingConfig()
    generations: GenerationsConfig = GenerationsConfig()

    @model_validator(mode="after")
    def _splits_are_disjoint(self) -> PipelineConfig:
        if self.data.test_split in self.data.train_splits:
            raise ValueError(f"data.test_split '{self.data.test_split}' is also a training split")
        return self

    @model_validator(mode="after")
    def _validation_names_configured_groups(self) -> PipelineConfig:
        attributes = self.data.attributes
        for names in self.validation.intersections:
            unknown = [name for name in names if name not in attributes]
            if unknown:
                raise ValueError(f"validation.intersections: {unknown} not in data.attributes {list(attributes)}")
        for field, keys in (
            ("acknowledged_shifts", self.validation.acknowledged_shifts),
            ("min_group_counts", self.validation.min_group_counts),
        ):
            for key in keys:
                for part in key.split("&"):
                    attribute, _, group = part.partition("=")
                    if group not in attributes.get(attribute, []):
                        raise ValueError(f"validation.{field}: '{key}' names no group of data.attributes")
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
    moved = moved_training_keys(raw.get("training"))
    if moved:
        raise ConfigError(f"{source}: invalid configuration\n" + "\n".join(f"  - {line}" for line in moved))
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(_format_pydantic_error(source, error)) from None


def load_config(path: str | Path) -> PipelineConfig:
    """Read and validate a pipeline configuration from YAML.

    Raises:
        ConfigError: if the file is missing, is not UTF-8 text, is not YAML, or breaks a rule.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: configuration file not found")
    return parse_config(files.read_yaml(path, raise_as=ConfigError), source=str(path))


def config_to_dict(config: PipelineConfig) -> dict[str, object]:
    """A JSON-serialisable dict of the resolved config, for lineage."""
    return config.model_dump(mode="json")


def with_run_output_dirs(config: PipelineConfig, run_key: str) -> PipelineConfig:
    """The config with training and evaluation writing under ``<output_dir>/<run_key>``.

    Two runs never share a folder (nor resume each other's checkpoints); the feature cache
    stays where it was, shared, since its keys name model, data and extractor.
    """
    if not run_key or "/" in run_key or run_key in {".", ".."}:
        raise ConfigError(f"run key '{run_key}': must be one folder name")
    evaluation = config.evaluation
    cache_dir = evaluation.cache_dir or Path(evaluation.output_dir) / "cache"
    return config.model_copy(
        update={
            "training": config.training.model_copy(update={"output_dir": Path(config.training.output_dir) / run_key}),
            "evaluation": evaluation.model_copy(
                update={"output_dir": Path(evaluation.output_dir) / run_key, "cache_dir": cache_dir}
            ),
        }
    )
