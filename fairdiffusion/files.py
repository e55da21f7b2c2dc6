"""The one guarded path by which the tool reads a user's files.

Every CSV, workbook, npz, image and YAML file a user hands the tool is read here, so an
empty, truncated, wrongly encoded or unparsable file becomes one line naming the file and
what is wrong, raised as a :class:`~fairdiffusion.errors.FairDiffusionError` (the CLI
prints it and exits 1), never a parser's traceback. Each reader takes the error type its
caller reports (``DatasetError`` for data, ``ConfigError`` for the configuration).

Reading never writes: a bad file fails before anything downstream starts.
"""

from __future__ import annotations

import re
import struct
import zipfile
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from xml.etree.ElementTree import ParseError as XMLParseError

import numpy as np
import pandas as pd
import yaml
from PIL import Image

from fairdiffusion.errors import DatasetError, FairDiffusionError

ErrorType = type[FairDiffusionError]

# What corrupt bytes make each parser raise. The parsers document few of these: the lists
# come from the fuzz test (tests/fairdiffusion/data/test_files.py), which flips and cuts
# bytes of a valid file of each kind and fails on any exception not caught here.
_CSV_ERRORS = (pd.errors.ParserError, ValueError, OverflowError)
_XLSX_ERRORS = (
    zipfile.BadZipFile,
    zlib.error,
    XMLParseError,  # a SyntaxError subclass: a part of the workbook is not well-formed XML
    KeyError,  # a part the workbook's manifest names is absent from the archive
    NotImplementedError,  # zipfile: a flipped header asks for a compression it lacks
    ValueError,
    TypeError,
    AttributeError,
    IndexError,
    EOFError,
    OverflowError,
    struct.error,
)
_NPZ_ERRORS = (
    zipfile.BadZipFile,
    zlib.error,
    NotImplementedError,
    ValueError,
    KeyError,
    EOFError,
    OverflowError,
    struct.error,
)
_IMAGE_ERRORS = (
    Image.DecompressionBombError,
    SyntaxError,  # PIL's plugins raise it for a malformed header
    ValueError,
    EOFError,
    IndexError,
    TypeError,
    OverflowError,
    struct.error,
    zlib.error,
)
_YAML_ERRORS = (yaml.YAMLError, ValueError, OverflowError, RecursionError)


def _one_line(text: object, limit: int = 200) -> str:
    """A parser's message on one line, bounded (some quote the offending input)."""
    line = re.sub(r"\s+", " ", str(text)).strip()
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _described(error: Exception) -> str:
    kind = "zlib.error" if isinstance(error, zlib.error) else type(error).__name__
    return f"{kind}: {_one_line(error)}"


def _cannot_read(path: Path, error: OSError, raise_as: ErrorType) -> FairDiffusionError:
    return raise_as(f"{path}: cannot be read ({_one_line(error.strerror or error)})")


def _encoding_name(encoding: str) -> str:
    return "UTF-8" if encoding.lower().replace("_", "-") in ("utf-8", "utf8", "utf-8-sig") else encoding


def _not_text(path: Path, data: bytes, encoding: str, raise_as: ErrorType) -> FairDiffusionError:
    """Name the first byte that is not ``encoding`` text, and how to fix it."""
    name = _encoding_name(encoding)
    try:
        data.decode(encoding)
    except UnicodeDecodeError as error:
        byte = data[error.start]
        return raise_as(f"{path}: not {name} text (byte 0x{byte:02x} at position {error.start}); save it as {name}")
    except LookupError:
        return raise_as(f"{path}: unknown text encoding '{encoding}'")
    return raise_as(f"{path}: not {name} text; save it as {name}")


def read_bytes(path: str | Path, *, raise_as: ErrorType = DatasetError) -> bytes:
    """A file's bytes.

    Raises:
        FairDiffusionError: of type ``raise_as``, if the file cannot be read.
    """
    path = Path(path)
    try:
        return path.read_bytes()
    except OSError as error:
        raise _cannot_read(path, error, raise_as) from None


def decode_text(data: bytes, path: str | Path, encoding: str = "utf-8", *, raise_as: ErrorType = DatasetError) -> str:
    """Bytes read from ``path`` as ``encoding`` text (line endings kept as they are).

    Raises:
        FairDiffusionError: of type ``raise_as``, naming the first byte that is not ``encoding``.
    """
    try:
        return data.decode(encoding)
    except (UnicodeDecodeError, LookupError):
        raise _not_text(Path(path), data, encoding, raise_as) from None


def read_text(path: str | Path, encoding: str = "utf-8", *, raise_as: ErrorType = DatasetError) -> str:
    """A text file's contents.

    Raises:
        FairDiffusionError: of type ``raise_as``, if the file cannot be read or is not ``encoding`` text.
    """
    return decode_text(read_bytes(path, raise_as=raise_as), path, encoding, raise_as=raise_as)


def parse_yaml(text: str | bytes, path: str | Path, *, raise_as: ErrorType = DatasetError) -> Any:
    """Parse YAML read from ``path``; ``None`` for an empty document.

    Raises:
        FairDiffusionError: of type ``raise_as``, with the parser's problem and its line.
    """
    try:
        return yaml.safe_load(text)
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = error.problem or error.context or "unparsable"
        raise raise_as(f"{path}: not valid YAML ({_one_line(problem)}{where})") from None
    except _YAML_ERRORS as error:
        raise raise_as(f"{path}: not valid YAML ({_one_line(error)})") from None


def read_yaml(path: str | Path, *, raise_as: ErrorType = DatasetError) -> Any:
    """A UTF-8 YAML file, parsed; ``None`` for an empty file.

    Raises:
        FairDiffusionError: of type ``raise_as``, if the file cannot be read, is not UTF-8
            text or is not YAML.
    """
    return parse_yaml(read_text(path, raise_as=raise_as), path, raise_as=raise_as)


def _require_content(path: Path, expected: str, raise_as: ErrorType) -> None:
    try:
        size = path.stat().st_size
    except OSError as error:
        raise _cannot_read(path, error, raise_as) from None
    if size == 0:
        raise raise_as(f"{path}: empty file (expected {expected})")


def read_csv(path: str | Path, *, raise_as: ErrorType = DatasetError, **kwargs: Any) -> pd.DataFrame:
    """A UTF-8 CSV file with a header row, read by :func:`pandas.read_csv` (``kwargs`` passed on).

    Raises:
        FairDiffusionError: of type ``raise_as``, if the file is empty, cannot be read, is
            not UTF-8 text or is not CSV.
    """
    path = Path(path)
    expected = "a CSV with a header row"
    _require_content(path, expected, raise_as)
    try:
        return pd.read_csv(path, **kwargs)
    except pd.errors.EmptyDataError:
        raise raise_as(f"{path}: no header row (expected {expected})") from None
    except UnicodeDecodeError:
        # pandas reports the position within a buffer; decode again to name the file's byte.
        raise _not_text(path, read_bytes(path, raise_as=raise_as), kwargs.get("encoding", "utf-8"), raise_as) from None
    except OSError as error:
        raise _cannot_read(path, error, raise_as) from None
    except _CSV_ERRORS as error:
        raise raise_as(f"{path}: not a readable CSV ({_one_line(error)})") from None


def read_excel(path: str | Path, *, raise_as: ErrorType = DatasetError, **kwargs: Any) -> pd.DataFrame:
    """The first sheet of an .xlsx workbook, read by :func:`pandas.read_excel` with openpyxl.

    Raises:
        FairDiffusionError: of type ``raise_as``, if the file is empty, cannot be read or is
            not an intact workbook.
    """
    path = Path(path)
    _require_content(path, "an .xlsx workbook", raise_as)
    if not zipfile.is_zipfile(path):
        raise raise_as(
            f"{path}: not an intact .xlsx workbook (cannot be opened as a zip archive: truncated, or not a workbook)"
        )
    try:
        return pd.read_excel(path, engine="openpyxl", **kwargs)
    except OSError as error:
        raise _cannot_read(path, error, raise_as) from None
    except _XLSX_ERRORS as error:
        raise raise_as(f"{path}: corrupt .xlsx workbook ({_described(error)})") from None


def load_npz(
    path: str | Path, keys: Iterable[str] | None = None, *, raise_as: ErrorType = DatasetError
) -> dict[str, np.ndarray]:
    """The arrays of an npz archive (only ``keys``, those present, when given), read eagerly.

    Pickled arrays are refused, so an archive cannot run code.

    Raises:
        FairDiffusionError: of type ``raise_as``, if the file is empty, not an npz archive,
            or an array in it is truncated or corrupt.
    """
    path = Path(path)
    _require_content(path, "an npz archive", raise_as)
    if not zipfile.is_zipfile(path):
        raise raise_as(f"{path}: not an npz archive (cannot be opened as a zip file)")
    try:
        with np.load(path, allow_pickle=False) as npz:
            names = npz.files if keys is None else [key for key in keys if key in npz.files]
            return {name: npz[name] for name in names}
    except OSError as error:
        raise _cannot_read(path, error, raise_as) from None
    except _NPZ_ERRORS as error:
        raise raise_as(f"{path}: cannot read npz ({_described(error)})") from None


def open_image(path: str | Path, *, scale: int = 1, raise_as: ErrorType = DatasetError) -> Image.Image:
    """An image file, fully decoded into memory (the file is closed on return).

    Args:
        path: The image file (any format PIL reads).
        scale: Decode at ``1/scale`` of the size where the format allows it (JPEG draft
            mode); every compressed block is still read, so corruption still shows.
        raise_as: The error type to raise.

    Raises:
        FairDiffusionError: of type ``raise_as``, if the file is empty, not an image, or
            truncated or corrupt.
    """
    path = Path(path)
    _require_content(path, "an image", raise_as)
    try:
        with Image.open(path) as image:
            if scale > 1:
                image.draft(image.mode, (max(1, image.width // scale), max(1, image.height // scale)))
            image.load()
            return image
    except OSError as error:  # includes PIL's UnidentifiedImageError and "image file is truncated"
        raise raise_as(f"{path}: not a readable image ({_one_line(error)})") from None
    except _IMAGE_ERRORS as error:
        raise raise_as(f"{path}: corrupt image ({_described(error)})") from None
