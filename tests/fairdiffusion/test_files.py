"""The guarded reads: every bad file is one line naming it, raised as the project's error.

The catalogue below holds each bad input a user has reported; the fuzz test cuts and flips
bytes of a valid file of each kind and accepts only a clean read or a project error.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from fairdiffusion import files
from fairdiffusion.config import CheXpertConfig, load_config
from fairdiffusion.data.chexpert import load_chexpert
from fairdiffusion.data.fairgenmed import load_fairgenmed
from fairdiffusion.data.ham10000 import METADATA_FILE, load_ham10000
from fairdiffusion.errors import ConfigError, DatasetError, FairDiffusionError

SPLITS = {"train": 0.6, "val": 0.2, "test": 0.2}


def _snapshot(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}


def _assert_one_line(error: pytest.ExceptionInfo[FairDiffusionError], path: Path, *fragments: str) -> None:
    message = str(error.value)
    assert "\n" not in message, message
    assert message.startswith(f"{path}: "), message
    for fragment in fragments:
        assert fragment in message, message


# --- The catalogue: each reported case, through the loader a user's command calls ---------


def test_empty_fairgenmed_summary(copy_dataset: Path) -> None:
    summary = copy_dataset / "data_summary.csv"
    summary.write_bytes(b"")
    before = _snapshot(copy_dataset)
    with pytest.raises(DatasetError) as info:
        load_fairgenmed(copy_dataset, ["train"])
    _assert_one_line(info, summary, "empty file (expected a CSV with a header row)")
    assert _snapshot(copy_dataset) == before


def test_empty_ham10000_metadata(ham10000_dataset: Path, tmp_path: Path) -> None:
    root = Path(shutil.copytree(ham10000_dataset, tmp_path / "HAM10000"))
    (root / METADATA_FILE).write_bytes(b"")
    with pytest.raises(DatasetError) as info:
        load_ham10000(root, SPLITS)
    _assert_one_line(info, root / METADATA_FILE, "empty file")


def test_blank_lines_only_ham10000_metadata(ham10000_dataset: Path, tmp_path: Path) -> None:
    root = Path(shutil.copytree(ham10000_dataset, tmp_path / "HAM10000"))
    (root / METADATA_FILE).write_text("\n\n\n")
    with pytest.raises(DatasetError) as info:
        load_ham10000(root, SPLITS)
    _assert_one_line(info, root / METADATA_FILE, "no header row")


def test_latin1_ham10000_metadata(ham10000_dataset: Path, tmp_path: Path) -> None:
    root = Path(shutil.copytree(ham10000_dataset, tmp_path / "HAM10000"))
    metadata = root / METADATA_FILE
    size = metadata.stat().st_size
    with metadata.open("ab") as handle:  # a row typed in a latin-1 editor
        handle.write("HAM_9999,ISIC_9999,nv,histo,45.0,female,h\u00e9el\n".encode("latin-1"))
    with pytest.raises(DatasetError) as info:
        load_ham10000(root, SPLITS)
    _assert_one_line(info, metadata, f"not UTF-8 text (byte 0xe9 at position {size + 41}); save it as UTF-8")


def test_latin1_config(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_bytes("tracking:\n  model_name: fundus-caf\u00e9\n".encode("latin-1"))
    with pytest.raises(ConfigError) as info:
        load_config(config)
    _assert_one_line(info, config, "not UTF-8 text (byte 0xe9 at position 34); save it as UTF-8")


@pytest.mark.parametrize(
    ("cut", "expected"),
    [(0, "empty file"), (1500, "not an intact .xlsx workbook"), (None, "corrupt .xlsx workbook")],
    ids=["empty", "truncated", "flipped"],
)
def test_corrupt_chexpert_demographics(chexpert_dataset: Path, tmp_path: Path, cut: int | None, expected: str) -> None:
    root = Path(shutil.copytree(chexpert_dataset, tmp_path / "CheXpert-v1.0-small"))
    workbook = root / "CHEXPERT DEMO.xlsx"
    data = bytearray(workbook.read_bytes())
    if cut is None:  # zero 20 bytes of the worksheet's compressed XML
        start = data.index(b"xl/worksheets/sheet1.xml") + 40
        data[start : start + 20] = bytes(20)
    else:
        data = data[:cut]
    workbook.write_bytes(bytes(data))
    with pytest.raises(DatasetError) as info:
        load_chexpert(root, CheXpertConfig(), SPLITS)
    _assert_one_line(info, workbook, expected)


def test_missing_file_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        files.read_yaml(tmp_path / "absent.yaml", raise_as=ConfigError)
    _assert_one_line(info, tmp_path / "absent.yaml", "cannot be read (No such file or directory)")


def test_unparsable_yaml_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("a: [1, 2\nb: 3\n")
    with pytest.raises(DatasetError) as info:
        files.read_yaml(path)
    _assert_one_line(info, path, "not valid YAML (", "at line 2, column 2")


def test_good_files_read_as_before(tmp_path: Path) -> None:
    frame = pd.DataFrame({"a": ["1", None], "b": ["x", "y"]})
    frame.to_csv(tmp_path / "t.csv", index=False)
    frame.to_excel(tmp_path / "t.xlsx", index=False, engine="openpyxl")
    pd.testing.assert_frame_equal(files.read_csv(tmp_path / "t.csv", dtype=str), frame)
    pd.testing.assert_frame_equal(files.read_excel(tmp_path / "t.xlsx", dtype=str), frame)
    np.savez(tmp_path / "t.npz", x=np.arange(3), y=np.ones(2))
    assert list(files.load_npz(tmp_path / "t.npz", ["y", "absent"])) == ["y"]
    Image.new("RGB", (5, 4), (1, 2, 3)).save(tmp_path / "t.png")
    image = files.open_image(tmp_path / "t.png")
    assert image.size == (5, 4) and image.getpixel((0, 0)) == (1, 2, 3)
    (tmp_path / "t.yaml").write_text("a: [1, 2]\n")
    assert files.read_yaml(tmp_path / "t.yaml") == {"a": [1, 2]}


# --- The fuzz test: cut and flipped bytes of each kind of file -----------------------------


def _valid_files(folder: Path) -> dict[str, tuple[Path, Callable[[Path], Any]]]:
    rng = np.random.default_rng(0)
    table = pd.DataFrame({"PATIENT": ["patient00001", "patient00002"], "PRIMARY_RACE": ["White", "Asian"]})
    table.to_csv(folder / "valid.csv", index=False)
    table.to_excel(folder / "valid.xlsx", index=False, engine="openpyxl")
    image = rng.integers(0, 256, (16, 16), dtype=np.uint8)
    np.savez_compressed(folder / "valid.npz", slo_fundus=image, race=np.asarray(1), male=np.asarray(0))
    Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(folder / "valid.jpg", quality=90)
    (folder / "valid.yaml").write_text("data:\n  root: data/demo\n  splits: [train, val]\ntraining:\n  max_steps: 10\n")
    return {
        "csv": (folder / "valid.csv", lambda p: files.read_csv(p, dtype=str)),
        "xlsx": (folder / "valid.xlsx", lambda p: files.read_excel(p, dtype=str)),
        "npz": (folder / "valid.npz", files.load_npz),
        "jpg": (folder / "valid.jpg", files.open_image),
        "yaml": (folder / "valid.yaml", files.read_yaml),
    }


def _mutations(data: bytes, rng: np.random.Generator, count: int) -> list[bytes]:
    """Half random truncations, half one to three random byte flips."""
    mutated = []
    for index in range(count):
        if index % 2 == 0:
            mutated.append(data[: int(rng.integers(0, len(data)))])
        else:
            flipped = bytearray(data)
            for position in rng.integers(0, len(data), int(rng.integers(1, 4))):
                flipped[position] ^= int(rng.integers(1, 256))
            mutated.append(bytes(flipped))
    return mutated


@pytest.mark.parametrize("kind", ["csv", "xlsx", "npz", "jpg", "yaml"])
def test_fuzzed_files_read_cleanly_or_fail_as_one_line(tmp_path: Path, kind: str) -> None:
    valid, read = _valid_files(tmp_path)[kind]
    read(valid)  # the unmutated file reads
    rng = np.random.default_rng(sum(map(ord, kind)))
    target = tmp_path / "fuzz" / valid.name
    target.parent.mkdir()
    for case, data in enumerate(_mutations(valid.read_bytes(), rng, 12)):
        target.write_bytes(data)
        before = _snapshot(tmp_path)
        try:
            read(target)
        except FairDiffusionError as error:
            message = str(error)
            assert "\n" not in message and message.startswith(f"{target}: "), (case, message)
        except Exception as error:  # noqa: BLE001 - the point: nothing but the project's error escapes
            pytest.fail(f"{kind} case {case}: {type(error).__name__}: {error}")
        assert _snapshot(tmp_path) == before, f"{kind} case {case}: reading wrote a file"
