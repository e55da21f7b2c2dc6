"""A seeded generator of SYNTHETIC fundus data in the exact FairGenMed layout.

No patient data: every subject, label and image is drawn from a seeded random
generator. The images are simple renderings whose appearance depends on the clinical
labels (cup-to-disc ratio, vision loss), and slightly on race (background pigment), so
a model has something real to learn and subgroup metrics have something to measure.
Subgroups are imbalanced the way FairGenMed is (one race near 10%, few Hispanic).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from fairdiffusion.data.fairgenmed import NewSubject

RACES = [(0, 0.10), (1, 0.20), (2, 0.70)]  # Asian, Black, White
RACE_STRINGS = {0: "Asian", 1: "Black or African American", 2: "White or Caucasian"}
_PIGMENT = {0: 6.0, 1: -18.0, 2: 10.0}
_CUP_RATIO = {"normal": 0.30, "borderline": 0.50, "abnormal": 0.72}
_VISION_DIM = {"normal": 0.0, "mild": 10.0, "moderate": 22.0, "severe": 38.0}

DEMO_README = """# FairGenMed demo data (SYNTHETIC)

Every subject in this folder is synthetic: made by `fairdiffusion.data.demo`
(seed {seed}), not taken from any patient. It follows the FairGenMed layout
(split folders of `data_XXXXX.npz` + `slo_fundus_XXXXX.jpg`, and `data_summary.csv`)
so the pipeline reads it exactly as it reads the real download.

Subjects: {counts}.
"""


@dataclass(frozen=True)
class DemoDatasetSpec:
    """Size and seed of a synthetic FairGenMed dataset."""

    train: int = 240
    val: int = 40
    test: int = 120
    image_size: int = 64
    seed: int = 20240
    #: Share of npz files that store race as FairGenMed's strings instead of codes.
    string_race_share: float = 0.2


def _race_code(labels: dict[str, object]) -> int:
    code = labels["race"]
    assert isinstance(code, int)
    return code


def _sample_labels(rng: np.random.Generator) -> dict[str, object]:
    race = int(rng.choice([r for r, _ in RACES], p=[p for _, p in RACES]))
    glaucoma = int(rng.random() < 0.5)
    if glaucoma:
        cdr = str(rng.choice(["normal", "borderline", "abnormal"], p=[0.15, 0.35, 0.5]))
        md = str(rng.choice(["normal", "mild", "moderate", "severe"], p=[0.2, 0.35, 0.25, 0.2]))
    else:
        cdr = str(rng.choice(["normal", "borderline", "abnormal"], p=[0.75, 0.2, 0.05]))
        md = str(rng.choice(["normal", "mild", "moderate", "severe"], p=[0.8, 0.15, 0.04, 0.01]))
    return {
        "race": race,
        "male": int(rng.random() < 0.45),
        "hispanic": int(rng.random() < 0.10),
        "glaucoma": glaucoma,
        "age": float(np.clip(rng.normal(61, 14), 18, 95)),
        "language": int(rng.choice([0, 1, 2], p=[0.9, 0.07, 0.03])),
        "maritalstatus": int(rng.integers(0, 6)),
        "md": float(-{"normal": 0.5, "mild": 3.5, "moderate": 8.0, "severe": 15.0}[md] + rng.normal(0, 1)),
        "cdr_status": cdr,
        "md_severity": md,
        "se_status": str(rng.choice(["positive", "neutral", "negative"], p=[0.25, 0.45, 0.30])),
        "rnflt_status": str(rng.choice(["normal", "borderline", "abnormal"], p=[0.6, 0.25, 0.15])),
    }


def render_fundus(labels: dict[str, object], size: int | tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Render one synthetic SLO fundus image (2-D uint8) whose look follows its labels.

    Args:
        labels: One subject's labels (see ``_sample_labels``).
        size: The side of a square image, or (height, width); FairGenMed's is (664, 512).
        rng: Draws the disc position, the vessels and the noise.
    """
    height, width = (size, size) if isinstance(size, int) else size
    scale = min(height, width)
    # Normalised coordinates: the fundus field is a circle in the middle of the image.
    yy = (np.arange(height, dtype=np.float64)[:, None] - (height - scale) / 2) / scale
    xx = (np.arange(width, dtype=np.float64)[None, :] - (width - scale) / 2) / scale
    yy, xx = np.broadcast_arrays(yy, xx)
    centre = 0.5
    field = (yy - centre) ** 2 + (xx - centre) ** 2 < 0.47**2
    radius = np.hypot(yy - centre, xx - centre)
    image = 85.0 + _PIGMENT[_race_code(labels)] + 25.0 * (1 - 2 * radius)

    disc_y, disc_x = 0.5 + rng.normal(0, 0.03), 0.66 + rng.normal(0, 0.03)
    disc_r = 0.11 + rng.normal(0, 0.008)
    distance = np.hypot(yy - disc_y, xx - disc_x)
    image += 70.0 * np.exp(-((distance / disc_r) ** 4))
    cup_r = disc_r * _CUP_RATIO[str(labels["cdr_status"])]
    image += 55.0 * np.exp(-((distance / cup_r) ** 4))

    for k in range(4):  # vessels arcing away from the disc
        angle = rng.uniform(0, 2 * np.pi) if k > 1 else (np.pi / 2 + k * np.pi)
        curvature = rng.normal(0, 1.5)
        t = np.linspace(0, 0.6, 200)
        path_y = disc_y + t * np.sin(angle) + curvature * t**2 * np.cos(angle)
        path_x = disc_x - t * np.abs(np.cos(angle)) - 0.1 * t
        d = _distance_to_path(yy, xx, path_y, path_x, scale)
        near = np.isfinite(d)
        image[near] -= 40.0 * np.exp(-((d[near] * scale / 0.9) ** 2))

    image -= _VISION_DIM[str(labels["md_severity"])] * (0.6 + 0.4 * radius * 2)
    image += rng.normal(0, 5.0, image.shape)
    image = np.where(field, image, 0.0)
    return np.clip(image, 0, 255).astype(np.uint8)


#: Pixels farther than this from a vessel's centre line are left as they are: the
#: vessel's darkening there, 40 * exp(-(8 / 0.9) ** 2) ~ 1e-33, is below float64's
#: resolution at any intensity, so the image is the same as with exact distances.
_VESSEL_REACH_PX = 8


def _distance_to_path(yy: np.ndarray, xx: np.ndarray, path_y: np.ndarray, path_x: np.ndarray, scale: int) -> np.ndarray:
    """Each pixel's distance to the nearest path point, computed only near the path (else inf)."""
    height, width = yy.shape
    offset_y, offset_x = (height - scale) / 2, (width - scale) / 2
    reach = np.arange(-_VESSEL_REACH_PX, _VESSEL_REACH_PX + 1)
    rows = np.rint(path_y * scale + offset_y).astype(np.int64)[:, None, None] + reach[None, :, None]
    cols = np.rint(path_x * scale + offset_x).astype(np.int64)[:, None, None] + reach[None, None, :]
    rows, cols = np.broadcast_arrays(rows, cols)
    inside = (rows >= 0) & (rows < height) & (cols >= 0) & (cols < width)
    point = np.broadcast_to(np.arange(len(path_y))[:, None, None], rows.shape)[inside]
    rows, cols = rows[inside], cols[inside]
    distance = np.full((height, width), np.inf)
    np.minimum.at(distance, (rows, cols), np.hypot(yy[rows, cols] - path_y[point], xx[rows, cols] - path_x[point]))
    return distance


def generate_demo_dataset(out_dir: str | Path, spec: DemoDatasetSpec | None = None) -> Path:
    """Write a synthetic FairGenMed dataset to ``out_dir`` (created; must be empty or absent).

    Returns:
        The dataset folder.
    """
    spec = spec or DemoDatasetSpec()
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out}: refusing to overwrite a non-empty folder")
    rng = np.random.default_rng(spec.seed)
    summary_rows: list[dict[str, object]] = []
    number = 0
    for split, count in (("train", spec.train), ("val", spec.val), ("test", spec.test)):
        split_dir = out / split
        split_dir.mkdir(parents=True, exist_ok=True)
        for _ in range(count):
            number += 1
            labels = _sample_labels(rng)
            image = render_fundus(labels, spec.image_size, rng)
            race: object = labels["race"]
            if rng.random() < spec.string_race_share:
                race = np.str_(RACE_STRINGS[_race_code(labels)])
            name = f"data_{number:05d}.npz"
            np.savez_compressed(
                split_dir / name,
                slo_fundus=image,
                race=np.asarray(race),
                male=np.asarray(labels["male"]),
                hispanic=np.asarray(labels["hispanic"]),
                glaucoma=np.asarray(labels["glaucoma"]),
                age=np.asarray(labels["age"]),
                language=np.asarray(labels["language"]),
                maritalstatus=np.asarray(labels["maritalstatus"]),
                md=np.asarray(labels["md"]),
            )
            Image.fromarray(image).save(split_dir / f"slo_fundus_{number:05d}.jpg", quality=95)
            summary_rows.append(
                {
                    "filename": name,
                    "use": split,
                    "md_severity": labels["md_severity"],
                    "cdr_status": labels["cdr_status"],
                    "near_vision_refraction_stage": labels["se_status"],
                    "rnflt_status": labels["rnflt_status"],
                    "origin": "synthetic (fairdiffusion.data.demo)",
                }
            )
    with (out / "data_summary.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(summary_rows[0]))
        writer.writeheader()
        writer.writerows(summary_rows)
    counts = f"train {spec.train}, val {spec.val}, test {spec.test}"
    (out / "README.md").write_text(DEMO_README.format(seed=spec.seed, counts=counts))
    return out


def demo_subjects(
    count: int, seed: int, image_size: int | tuple[int, int] = 64, race: str | None = None
) -> list[NewSubject]:
    """Synthetic subjects drawn like the demo's, to grow a dataset with :func:`fairdiffusion.data.fairgenmed.add_subjects`.

    Args:
        count: How many subjects.
        seed: Seeds labels and images.
        image_size: Side of a square image, or (height, width).
        race: Make every subject this race (e.g. to shift a group's share); ``None``: as the demo draws.
    """
    rng = np.random.default_rng(seed)
    races = {"Asian": 0, "Black": 1, "White": 2}
    subjects = []
    for _ in range(count):
        labels = _sample_labels(rng)
        if race is not None:
            labels["race"] = races[race]
        subjects.append(
            NewSubject(
                image=render_fundus(labels, image_size, rng),
                race=["Asian", "Black", "White"][_race_code(labels)],
                gender=["Female", "Male"][int(labels["male"])],  # type: ignore[call-overload]
                ethnicity=["Non-Hispanic", "Hispanic"][int(labels["hispanic"])],  # type: ignore[call-overload]
                glaucoma=["non-glaucoma", "glaucoma"][int(labels["glaucoma"])],  # type: ignore[call-overload]
                md_severity=str(labels["md_severity"]),
                cdr_status=str(labels["cdr_status"]),
                se_status=str(labels["se_status"]),
                rnflt_status=str(labels["rnflt_status"]),
            )
        )
    return subjects
