"""Great Expectations (1.x) validation of a sample table and its images.

Three tables are judged, each by its own suite, so a failure names exactly what broke:
- ``samples``: the sample table (schema, allowed codes, no missing protected
  attribute, unique subject ids, readable npz files);
- ``group_counts``: one row per (split set, attribute, group), every configured group
  present even at count 0, each at or above the configured minimum;
- ``images``: one row per subject from decoding its npz image and its jpg (decodes,
  2-D, uint8, expected shape).

Every failed expectation is reported with a bounded sample of offending subjects.
"""

from __future__ import annotations

import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError

from fairdiffusion.config import ValidationConfig
from fairdiffusion.fairgenmed import CLINICAL_LABELS

#: How many offending rows a failure message names at most.
MAX_EXAMPLES = 5
_REQUIRED_COLUMNS = ["subject", "split", "npz_path", "image_path", "prompt"]


@dataclass(frozen=True)
class FailedExpectation:
    """One expectation that did not hold, with the rows that broke it."""

    table: str
    expectation: str
    column: str | None
    rule: str
    unexpected_count: int
    examples: list[str] = field(default_factory=list)

    def describe(self) -> str:
        """One line: where, which rule, how many and which rows."""
        where = f"{self.table}.{self.column}" if self.column else self.table
        text = f"{where}: {self.rule} [{self.expectation}]"
        if self.unexpected_count:
            text += f" - {self.unexpected_count} row(s) break it"
        if self.examples:
            text += ", e.g. " + "; ".join(self.examples)
        return text


@dataclass(frozen=True)
class ValidationResult:
    """The outcome of every suite on one dataset."""

    success: bool
    n_subjects: int
    evaluated_expectations: int
    failed: list[FailedExpectation]
    group_counts: dict[str, dict[str, int]]

    @property
    def failed_expectations(self) -> list[str]:
        """Each failure as one readable line (the lineage's ``failed_expectations``)."""
        return [failure.describe() for failure in self.failed]

    def summary(self) -> str:
        """A readable report of the run, listing every failure."""
        head = (
            f"{self.evaluated_expectations - len(self.failed)}/{self.evaluated_expectations} "
            f"expectations passed on {self.n_subjects} subjects"
        )
        if self.success:
            return f"validation passed: {head}"
        lines = [f"validation FAILED: {head}"] + [f"  - {line}" for line in self.failed_expectations]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form for MLflow and the lineage."""
        return {
            "success": self.success,
            "n_subjects": self.n_subjects,
            "evaluated_expectations": self.evaluated_expectations,
            "failed_expectations": self.failed_expectations,
            "failures": [asdict(failure) for failure in self.failed],
            "group_counts": self.group_counts,
        }


@dataclass(frozen=True)
class _Check:
    """An expectation and the sentence a user reads when it fails."""

    expectation: Any
    rule: str


def inspect_images(samples: pd.DataFrame) -> pd.DataFrame:
    """Decode every subject's npz image and jpg; one row of facts per subject.

    Reads one image at a time, so memory does not grow with the dataset.
    """
    rows = []
    for subject, npz_path, jpg_path in samples[["subject", "npz_path", "image_path"]].itertuples(index=False):
        row: dict[str, object] = {"subject": subject, "file": npz_path, "error": None}
        try:
            if not zipfile.is_zipfile(npz_path):
                raise ValueError("not an npz archive")
            with np.load(npz_path, allow_pickle=False) as npz:
                image = npz["slo_fundus"]
            row.update(ndim=image.ndim, dtype=str(image.dtype), shape="x".join(map(str, image.shape)))
            row["constant"] = bool(image.size == 0 or image.min() == image.max())
        except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as error:
            row.update(ndim=None, dtype=None, shape=None, constant=None)
            row["error"] = f"{npz_path}: {type(error).__name__}: {error}"
        try:
            with Image.open(jpg_path) as jpg:
                jpg.load()
        except (OSError, UnidentifiedImageError) as error:
            row["error"] = (f"{row['error']}; " if row["error"] else "") + f"{jpg_path}: {error}"
        rows.append(row)
    return pd.DataFrame(rows, columns=["subject", "file", "error", "ndim", "dtype", "shape", "constant"])


def count_groups(
    samples: pd.DataFrame,
    attributes: Mapping[str, Sequence[str]],
    split_sets: Mapping[str, Sequence[str]],
) -> pd.DataFrame:
    """Count subjects per (split set, attribute, group), listing absent groups at 0."""
    rows = []
    for set_name, splits in split_sets.items():
        subset = samples[samples["split"].isin(list(splits))]
        for attribute, groups in attributes.items():
            counts = subset[attribute].value_counts() if attribute in subset else pd.Series()
            for group in groups:
                rows.append(
                    {
                        "slice": f"{set_name} {attribute}={group}",
                        "split_set": set_name,
                        "attribute": attribute,
                        "group": group,
                        "count": int(counts.get(group, 0)),
                    }
                )
    return pd.DataFrame(rows, columns=["slice", "split_set", "attribute", "group", "count"])


def _sample_checks(samples: pd.DataFrame, attributes: Mapping[str, Sequence[str]]) -> list[_Check]:
    import great_expectations as gx

    e = gx.expectations
    checks = [_Check(e.ExpectColumnToExist(column=c), "required column is present") for c in _REQUIRED_COLUMNS]
    checks.append(_Check(e.ExpectColumnValuesToBeUnique(column="subject"), "subject ids are unique"))
    checks.append(
        _Check(
            e.ExpectColumnValuesToBeNull(column="read_error"),
            "every npz file can be opened and read",
        )
    )
    for attribute, groups in attributes.items():
        checks.append(_Check(e.ExpectColumnToExist(column=attribute), "protected attribute is present"))
        checks.append(_Check(e.ExpectColumnValuesToNotBeNull(column=attribute), "no missing protected attribute"))
        checks.append(
            _Check(
                e.ExpectColumnValuesToBeInSet(column=attribute, value_set=list(groups)),
                f"value is one of the allowed codes {list(groups)}",
            )
        )
    for label, allowed in CLINICAL_LABELS.items():
        if label not in samples.columns:
            continue
        checks.append(_Check(e.ExpectColumnValuesToNotBeNull(column=label), "no missing clinical label"))
        checks.append(
            _Check(
                e.ExpectColumnValuesToBeInSet(column=label, value_set=allowed),
                f"value is one of the allowed codes {allowed}",
            )
        )
    return checks


def _image_checks(shape: tuple[int, int] | None) -> list[_Check]:
    import great_expectations as gx

    e = gx.expectations
    checks = [
        _Check(e.ExpectColumnValuesToBeNull(column="error"), "image decodes (npz slo_fundus and jpg)"),
        _Check(e.ExpectColumnValuesToBeInSet(column="ndim", value_set=[2]), "image is 2-D"),
        _Check(
            e.ExpectColumnValuesToBeInSet(column="dtype", value_set=["uint8"]),
            "image dtype is uint8",
        ),
        _Check(
            e.ExpectColumnValuesToBeInSet(column="constant", value_set=[False]),
            "image is not constant",
        ),
    ]
    if shape is not None:
        expected = f"{shape[0]}x{shape[1]}"
        checks.append(
            _Check(
                e.ExpectColumnValuesToBeInSet(column="shape", value_set=[expected]),
                f"image shape is {expected}",
            )
        )
    return checks


def _run_suite(
    context: Any, table: str, frame: pd.DataFrame, checks: list[_Check], id_column: str
) -> tuple[int, list[FailedExpectation]]:
    import great_expectations as gx

    asset = context.data_sources.add_pandas(table).add_dataframe_asset(table)
    batch = asset.add_batch_definition_whole_dataframe("all").get_batch(batch_parameters={"dataframe": frame})
    suite = gx.ExpectationSuite(name=f"fairdiffusion.{table}")
    for check in checks:
        suite.add_expectation(check.expectation)
    suite = context.suites.add(suite)
    result = batch.validate(
        suite,
        result_format={
            "result_format": "COMPLETE",
            "unexpected_index_column_names": [id_column] if id_column in frame.columns else [],
            "partial_unexpected_count": MAX_EXAMPLES,
        },
    )
    rules = {check.expectation.id: check.rule for check in checks}
    failed = []
    for item in result.results:
        if item.success:
            continue
        config = item.expectation_config
        details = item.result or {}
        examples = []
        for entry in (details.get("unexpected_index_list") or [])[:MAX_EXAMPLES]:
            column = config.kwargs.get("column")
            value = entry.get(column) if column else None
            label = str(entry.get(id_column, "?"))
            shown = repr(value) if isinstance(value, str) else str(value)
            examples.append(f"{label} ({column}={shown})" if column and column != id_column else label)
        failed.append(
            FailedExpectation(
                table=table,
                expectation=config.type,
                column=config.kwargs.get("column"),
                rule=rules.get(config.id, config.type),
                unexpected_count=int(details.get("unexpected_count") or 0),
                examples=[str(e) for e in examples],
            )
        )
    return len(result.results), failed


def validate_dataset(
    samples: pd.DataFrame,
    attributes: Mapping[str, Sequence[str]],
    config: ValidationConfig,
    train_splits: Sequence[str],
    test_split: str,
) -> ValidationResult:
    """Run the Great Expectations suites on a sample table and its images.

    Args:
        samples: The sample table of a dataset adapter.
        attributes: Protected attribute -> allowed groups.
        config: Thresholds (minimum group count, expected image shape).
        train_splits: Splits trained on; their union must meet the group minimum.
        test_split: The evaluation split; it must meet the group minimum too.

    Returns:
        The result; ``success`` is false when any expectation failed.
    """
    import great_expectations as gx

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = {"globally": False}
    split_sets = {"train": list(train_splits), "test": [test_split]}
    group_counts = count_groups(samples, attributes, split_sets)
    present = [c for c in _REQUIRED_COLUMNS if c in samples.columns]
    images = inspect_images(samples) if len(present) == len(_REQUIRED_COLUMNS) else pd.DataFrame()

    total, failed = _run_suite(context, "samples", samples, _sample_checks(samples, attributes), "subject")
    n, more = _run_suite(
        context,
        "group_counts",
        group_counts,
        [
            _Check(
                gx.expectations.ExpectColumnValuesToBeBetween(column="count", min_value=config.min_group_count),
                f"every subgroup has at least {config.min_group_count} subjects",
            )
        ],
        "slice",
    )
    total, failed = total + n, failed + more
    if not images.empty:
        n, more = _run_suite(context, "images", images, _image_checks(config.image_shape), "file")
        total, failed = total + n, failed + more
    counts: dict[str, dict[str, int]] = {}
    for row in group_counts.itertuples(index=False):
        counts.setdefault(str(row.split_set), {})[f"{row.attribute}={row.group}"] = int(row.count)
    return ValidationResult(
        success=not failed,
        n_subjects=len(samples),
        evaluated_expectations=total,
        failed=failed,
        group_counts=counts,
    )
