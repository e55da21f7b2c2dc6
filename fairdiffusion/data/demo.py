"""A seeded generator of SYNTHETIC fundus data in the exact FairGenMed layout.

No patient data: every subject, label and image is drawn from a seeded random
generator. The images are renderings whose appearance depends on the clinical labels
(cup-to-disc ratio, vision loss) and on race, so a model has something real to learn and
subgroup metrics have something to measure. Subgroups are imbalanced the way FairGenMed
is (one race near 10%, few Hispanic).

The group effect is deliberate (see ``data/README.md``): the rare group (Asian, ~10%) has
a darker fundus with a *tessellated* texture, the radial stripes of visible choroidal
vessels that real fundus photos show more often in East Asian, myopic eyes. The base
model's pretraining set (:mod:`fairdiffusion.data.pretraining`) has no tessellation, so a
fine-tune has to learn this group's look from its few subjects.
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
_PIGMENT = {0: -12.0, 1: -18.0, 2: 10.0}
#: Strength of the tessellated (radial choroidal stripe) texture per race code.
_TESSELLATION = {0: 12.0, 1: 0.0, 2: 0.0}
_CUP_RATIO = {"normal": 0.30, "borderline": 0.50, "abnormal": 0.72}
_VISION_DIM = {"normal": 0.0, "mild": 10.0, "moderate": 22.0, "severe": 38.0}

DEMO_README = """# FairGenMed demo data (SYNTHETIC)

Every subject in this folder is synthetic: made by `fairdiffusion.data.demo`
(`fairdiffusion data make-demo`, seed {seed}), not taken from any patient. It follows the
FairGenMed layout (split folders of `data_XXXXX.npz` + `slo_fundus_XXXXX.jpg`, and
`data_summary.csv`) so the pipeline reads it exactly as it reads the real download.

Subjects: {counts}.

## How each subject is drawn

1. **Demographics.** Race: Asian 10%, Black 20%, White 70% (FairGenMed-like imbalance);
   male 45%; Hispanic 10%. A fifth of the npz files store race as FairGenMed's strings.
2. **Clinical labels.** Glaucoma 50%; given glaucoma or not, the cup-to-disc status
   (normal / borderline / abnormal) and the vision-loss severity are drawn with the
   published tendencies (glaucoma: larger cups, more loss); refraction (se) status and
   RNFLT status independently.
3. **Image (64 x 64 grayscale SLO).** A circular fundus field whose brightness falls
   off from the centre; an optic disc right of centre (every eye a right eye, one camera)
   whose cup grows with the cup-to-disc status; four vessels arcing from the disc; a
   dimming with the vision-loss severity; Gaussian noise.
4. **The group effect (deliberate).** The look depends on race: the background pigment
   is darker for Black (-18) and Asian (-12) than for White (+10) subjects, and **Asian
   subjects' fundus is tessellated**: radial choroidal stripes (14 around the fovea),
   as real fundus photos show more often in East Asian, myopic eyes. So the rare group
   (10%) is visually distinct: a model has to learn its look from few subjects.

The base model never saw these images: it was pretrained on a separate generated set
(`fairdiffusion.data.pretraining`) whose look varies at random (pigment, brightness, left
and right eyes, stripe textures of other counts), independent of any demographic word.
"""


@dataclass(frozen=True)
class DemoDatasetSpec:
    """Size and seed of a synthetic FairGenMed dataset."""

    train: int = 320
    val: int = 40
    #: 200 test subjects: about 20 in the rare group, enough for a per-group FID with an interval.
    test: int = 200
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


@dataclass(frozen=True)
class Appearance:
    """How a fundus looks apart from its clinical labels: the camera and the eye.

    The demo derives it from race (:func:`demo_appearance`); the pretraining set draws it
    at random, independent of any group.
    """

    pigment: float = 0.0
    tessellation: float = 0.0
    #: Stripes around the fovea of a tessellated fundus.
    tessellation_stripes: float = 14.0
    brightness: float = 0.0
    #: ``right``: the disc right of centre (as every demo image); ``left``: mirrored.
    eye: str = "right"


def demo_appearance(labels: dict[str, object]) -> Appearance:
    """The demo dataset's look of a subject: its race's pigment and tessellation, one camera, right eyes."""
    race = _race_code(labels)
    return Appearance(pigment=_PIGMENT[race], tessellation=_TESSELLATION[race])


def render_fundus(
    labels: dict[str, object],
    size: int | tuple[int, int],
    rng: np.random.Generator,
    appearance: Appearance | None = None,
) -> np.ndarray:
    """Render one synthetic SLO fundus image (2-D uint8) whose look follows its labels.

    Args:
        labels: One subject's labels (see ``_sample_labels``).
        size: The side of a square image, or (height, width); FairGenMed's is (664, 512).
        rng: Draws the disc position, the vessels and the noise.
        appearance: Pigment, texture, brightness and eye; ``None``: :func:`demo_appearance`.
    """
    look = appearance or demo_appearance(labels)
    height, width = (size, size) if isinstance(size, int) else size
    scale = min(height, width)
    # Normalised coordinates: the fundus field is a circle in the middle of the image.
    yy = (np.arange(height, dtype=np.float64)[:, None] - (height - scale) / 2) / scale
    xx = (np.arange(width, dtype=np.float64)[None, :] - (width - scale) / 2) / scale
    yy, xx = np.broadcast_arrays(yy, xx)
    centre = 0.5
    field = (yy - centre) ** 2 + (xx - centre) ** 2 < 0.47**2
    radius = np.hypot(yy - centre, xx - centre)
    image = 85.0 + look.pigment + look.brightness + 25.0 * (1 - 2 * radius)
    if look.tessellation:
        # Radial stripes around the fovea, fading towards it: a tessellated fundus. No
        # random draw, so a group's texture leaves every other subject's images as they were.
        polar = np.arctan2(yy - centre, xx - centre)
        image += (
            look.tessellation
            * np.sin(look.tessellation_stripes * polar + 4 * np.sin(20 * radius))
            * np.clip(radius * 4, 0, 1)
        )

    side = 1.0 if look.eye == "right" else -1.0
    disc_y, disc_x = 0.5 + rng.normal(0, 0.03), 0.5 + side * (0.16 + rng.normal(0, 0.03))
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
        path_x = disc_x - side * (t * np.abs(np.cos(angle)) + 0.1 * t)
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
    """Synthetic subjects drawn like the demo's, to grow a dataset with ``add_subjects``.

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
