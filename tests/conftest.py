"""Shared fixtures: small synthetic datasets in each format's layout and a tiny Stable Diffusion pipeline.

All are written once per session into a temporary folder; tests that mutate a dataset
copy it first (see ``copy_dataset``). The HAM10000 and CheXpert writers follow the
public releases' layouts (file names, columns, value codes) with made-up rows.
"""

from __future__ import annotations

import csv
import fcntl
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from fairdiffusion.data.demo import DemoDatasetSpec, generate_demo_dataset

#: Seed 131 gives every group at least 4 subjects in train+val and in test:
#: train+val race Asian 7 / Black 11 / White 32, Female 26 / Male 24, Non-Hispanic 45 / Hispanic 5;
#: test race Asian 7 / Black 7 / White 16, Female 16 / Male 14, Non-Hispanic 26 / Hispanic 4.
DEMO_SPEC = DemoDatasetSpec(train=40, val=10, test=30, image_size=32, seed=131)
#: The smallest subgroup of DEMO_SPEC (test Hispanic); validation.min_group_count above it fails.
DEMO_MIN_GROUP = 4
#: Seed 25 also passes every default expectation, including both glaucoma classes in every
#: group (seed 131's test Hispanic subjects all have glaucoma):
#: train+val race Asian 5 / Black 14 / White 31, Female 25 / Male 25, Non-Hispanic 43 / Hispanic 7;
#: test race Asian 4 / Black 5 / White 21, Female 15 / Male 15, Non-Hispanic 21 / Hispanic 9.
VALID_SPEC = DemoDatasetSpec(train=40, val=10, test=30, image_size=32, seed=25)


REPO = Path(__file__).resolve().parents[1]


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist, give each worker its share of the cores for torch's thread pools.

    Each worker's torch would otherwise start as many threads as there are cores, and ``make
    test``'s two workers would run four busy threads on two cores. Set before torch loads (the
    worker has not imported it yet), so subprocesses such as ``torchrun`` inherit it too.
    """
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        share = max(1, len(os.sched_getaffinity(0)) // workers)
        for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ.setdefault(variable, str(share))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Files with ``slow`` tests first, each file's tests in their own order.

    ``make test`` hands whole files to pytest-xdist workers in collection order; a slow file
    collected last (the integration tests sort after the unit tests) keeps one worker busy
    for minutes after the other has finished.
    """
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)  # stable: file and test order kept


class _LiveStderr:
    """Writes to whatever ``sys.stderr`` is at the moment of writing."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()

    def __getattr__(self, name: str) -> object:
        return getattr(sys.stderr, name)


@pytest.fixture(autouse=True)
def _log_handlers_on_a_live_stream() -> None:
    """Point the console handlers of logging at ``sys.stderr`` as it is at each write.

    Prefect, transformers and diffusers each create a stream handler the first time they log,
    keeping the ``sys.stderr`` of that moment. When that moment falls in a test that captures
    output (``capsys``, ``capfd``, or a pytest-xdist worker's capture), pytest later closes the
    stream, and every later log line of that library fails with "I/O operation on closed file".
    Which test comes first depends on the order, so this runs before every test.
    """
    live = _LiveStderr()
    for logger in [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]:
        for handler in getattr(logger, "handlers", []):
            if type(handler) is logging.StreamHandler or hasattr(handler, "console"):
                handler.stream = live  # not setStream: it would flush a closed stream first
            if hasattr(handler, "console"):  # Prefect's handler prints through a rich console
                handler.console.file = live


@pytest.fixture(scope="session")
def pulled_checkout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``dvc pull`` the demo data and base model into this checkout, as ``make demo`` does; yields its root.

    Pulled under a file lock in the folder every pytest-xdist worker's temporary folder
    sits in: two workers pulling into one repo at once would fail on DVC's own lock.
    """
    lock_path = tmp_path_factory.getbasetemp().parent / "dvc-pull.lock"
    with lock_path.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed
        done = subprocess.run(
            [str(Path(sys.executable).parent / "dvc"), "pull", "-q", "data.dvc", "base-model.dvc"],
            cwd=REPO,
            capture_output=True,
            text=True,
        )
    assert done.returncode == 0, done.stderr
    return REPO


@pytest.fixture(scope="session")
def demo_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic FairGenMed folder (train 40, val 10, test 30; 32x32 images). Do not modify."""
    return generate_demo_dataset(tmp_path_factory.mktemp("fairgenmed") / "data", DEMO_SPEC)


@pytest.fixture(scope="session")
def valid_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic FairGenMed folder that passes every default expectation (80 subjects). Do not modify."""
    return generate_demo_dataset(tmp_path_factory.mktemp("fairgenmed-valid") / "data", VALID_SPEC)


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight Stable Diffusion pipeline in diffusers layout. Do not modify."""
    from fairdiffusion.models.tiny import build_tiny_pipeline

    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny-sd") / "pipeline")


@pytest.fixture(scope="session")
def demo_min_group_count() -> int:
    """The smallest subgroup size of ``demo_dataset``: a ``validation.min_group_count`` it just meets."""
    return DEMO_MIN_GROUP


@pytest.fixture
def copy_dataset(valid_dataset: Path, tmp_path: Path) -> Path:
    """A private copy of ``valid_dataset`` that a test may corrupt."""
    return Path(shutil.copytree(valid_dataset, tmp_path / "data"))


def _noise_image(rng: np.random.Generator, shape: tuple[int, ...]) -> Image.Image:
    pixels = rng.integers(20, 230, shape, dtype=np.uint8)
    return Image.fromarray(pixels)


def write_ham10000(root: Path, records: list[dict[str, str]], seed: int = 0, missing: set[str] = frozenset()) -> Path:
    """A HAM10000 release folder: ``HAM10000_metadata.csv`` and 24 x 32 RGB jpgs in the two part folders.

    Each record holds the metadata columns; images of ``missing`` ids are not written.
    """
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    columns = ["lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization"]
    columns += [c for c in ("source", "generated_by") if any(c in r for r in records)]
    with (root / "HAM10000_metadata.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(records)
    for index, record in enumerate(records):
        if record["image_id"] in missing:
            continue
        part = root / f"HAM10000_images_part_{1 + index % 2}"
        part.mkdir(exist_ok=True)
        _noise_image(rng, (24, 32, 3)).save(part / f"{record['image_id']}.jpg", quality=90)
    return root


def ham10000_records(n_lesions: int = 120, seed: int = 0) -> list[dict[str, str]]:
    """Metadata of ``n_lesions`` lesions (every third with a second image), balanced by sex, age and dx."""
    rng = np.random.default_rng(seed)
    dx_codes = ["nv", "mel", "bkl", "bcc", "akiec", "df", "vasc"]
    records = []
    image = 24306
    for lesion in range(n_lesions):
        common = {
            "lesion_id": f"HAM_{lesion:07d}",
            "dx": dx_codes[lesion % len(dx_codes)],
            "dx_type": "histo",
            "age": str(float(rng.choice([25, 40, 55, 60, 70, 85]))),
            "sex": ["male", "female"][(lesion // 2) % 2],
            "localization": "back",
        }
        for _ in range(1 + (lesion % 3 == 0)):
            records.append({"image_id": f"ISIC_{image:07d}", **common})
            image += 1
    return records


#: CheXpert's observation columns, in the order of its CSVs.
CHEXPERT_OBSERVATIONS = [
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
    "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
    "Fracture", "Support Devices",
]  # fmt: skip


def write_chexpert(
    root: Path,
    rows: list[dict[str, str]],
    demographics: list[dict[str, str]],
    demographics_name: str = "CHEXPERT DEMO.xlsx",
    seed: int = 0,
) -> Path:
    """A CheXpert folder: train.csv/valid.csv (by each row's ``_file``), 20 x 16 grayscale jpgs, demographics."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    columns = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *CHEXPERT_OBSERVATIONS]
    columns += [c for c in ("source", "generated_by") if any(c in r for r in rows)]
    for name in ("train.csv", "valid.csv"):
        selected = [r for r in rows if r.get("_file", "train.csv") == name]
        if not selected and name == "valid.csv":
            continue
        with (root / name).open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns, restval="", extrasaction="ignore")
            writer.writeheader()
            writer.writerows(selected)
    for row in rows:
        relative = Path(*Path(row["Path"]).parts[1:])
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        _noise_image(rng, (20, 16)).save(root / relative, quality=90)
    table = pd.DataFrame(demographics, columns=["PATIENT", "GENDER", "AGE_AT_CXR", "PRIMARY_RACE", "ETHNICITY"])
    if demographics_name.endswith(".xlsx"):
        table.to_excel(root / demographics_name, index=False, engine="openpyxl")
    else:
        table.to_csv(root / demographics_name, index=False)
    return root


def chexpert_rows(n_patients: int = 100, target: str = "Pleural Effusion") -> tuple[list[dict], list[dict]]:
    """Label rows (two studies per patient, a lateral view for every fifth) and demographics."""
    races = ["White", "Black or African American", "Asian", "White, non-Hispanic", "Asian - Historical Conv"]
    values = ["1.0", "0.0", "-1.0", "", "1.0", "0.0"]
    rows, demographics = [], []
    for patient in range(1, n_patients + 1):
        name = f"patient{patient:05d}"
        sex = ["Male", "Female"][patient % 2]
        demographics.append(
            {
                "PATIENT": name,
                "GENDER": sex,
                "AGE_AT_CXR": "50",
                "PRIMARY_RACE": races[(patient // 2) % len(races)],
                "ETHNICITY": ["Non-Hispanic/Non-Latino", "Hispanic/Latino"][patient % 3 == 0],
            }
        )
        for study in (1, 2):
            row = {"Path": f"CheXpert-v1.0-small/train/{name}/study{study}/view1_frontal.jpg", "Sex": sex}
            row |= {"Age": "50", "Frontal/Lateral": "Frontal", "AP/PA": "AP"}
            row |= dict.fromkeys(CHEXPERT_OBSERVATIONS, "")
            row[target] = values[(patient + study) % len(values)]
            rows.append(row)
        if patient % 5 == 0:
            lateral = dict(rows[-1], Path=f"CheXpert-v1.0-small/train/{name}/study1/view2_lateral.jpg")
            rows.append(lateral | {"Frontal/Lateral": "Lateral", "AP/PA": ""})
    return rows, demographics


@pytest.fixture(scope="session")
def ham10000_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A HAM10000 release folder (120 lesions, 160 images) that passes validation. Do not modify."""
    return write_ham10000(tmp_path_factory.mktemp("ham10000") / "HAM10000", ham10000_records())


@pytest.fixture(scope="session")
def chexpert_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CheXpert folder (100 patients, 220 images, xlsx demographics) that passes validation. Do not modify."""
    rows, demographics = chexpert_rows()
    return write_chexpert(tmp_path_factory.mktemp("chexpert") / "CheXpert-v1.0-small", rows, demographics)
