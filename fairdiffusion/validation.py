"""Great Expectations (1.x) validation of a sample table and its images.

Each table below is judged by its own suite, so a failure names exactly what broke:
- ``samples``: the sample table (schema and types, allowed codes of every attribute and
  label, no missing protected attribute, unique subject ids, readable files, provenance:
  synthetic rows name their model, the test split is entirely real, the synthetic share
  of training is at most the ceiling);
- ``patients``: one row per patient with the splits it appears in (at most one);
- ``images``: one row per image from decoding it (decodes, layout, dtype, shape,
  intensity range, not constant, no identical image in another split);
- ``group_counts``: one row per (split set, group), for every attribute and configured
  intersection, absent groups at 0, each at or above its minimum;
- ``class_balance``: one row per (split set, group, class of the main label);
- ``group_shares``: with the counts of the champion's data, each group's share then and
  now; a move above the configured amount needs an acknowledgement in the config.

Every failed expectation is reported with a bounded sample of offending rows. With a
``docs_dir``, the run also writes Great Expectations Data Docs (HTML) there.
"""

from __future__ import annotations

import hashlib
import itertools
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError

from fairdiffusion.config import ValidationConfig
from fairdiffusion.fairgenmed import CLINICAL_LABELS
from fairdiffusion.formats import COMMON_COLUMNS, SOURCES, SampleSchema, describe_exclusions

#: How many offending rows a failure message names at most.
MAX_EXAMPLES = 5
FAIRGENMED_SCHEMA = SampleSchema("fairgenmed", dict(CLINICAL_LABELS), "glaucoma", image_ndim=2, npz_images=True)
_TEXT_COLUMNS = ["subject", "patient_id", "split", "image_path", "prompt"]
_IMAGE_COLUMNS = ["subject", "split", "file", "error", "ndim", "channels", "dtype", "shape", "min", "max", "constant"]


@dataclass(frozen=True)
class FailedExpectation:
    """One expectation that did not hold, with the rows that broke it."""

    table: str
    expectation: str
    column: str | None
    rule: str
    unexpected_count: int
    examples: list[str] = field(default_factory=list)
    #: Extra evidence, e.g. the observed share for a rule that tolerates some rows.
    detail: str = ""

    def describe(self) -> str:
        """One line: where, which rule, how many and which rows."""
        where = f"{self.table}.{self.column}" if self.column else self.table
        text = f"{where}: {self.rule} [{self.expectation}]"
        if self.unexpected_count:
            text += f" - {self.unexpected_count} row(s) break it"
        if self.detail:
            text += f" ({self.detail})"
        if self.examples:
            text += ", e.g. " + "; ".join(self.examples)
        return text


@dataclass(frozen=True)
class ReferenceCounts:
    """Group counts of an earlier data version (the current champion's), to compare shares with."""

    #: Names the version in messages, e.g. ``champion v3 (data md5 6b5ef68b)``.
    label: str
    #: ``{split set: {"attribute=group": count}}``, as :attr:`ValidationResult.group_counts`.
    group_counts: Mapping[str, Mapping[str, int]]


@dataclass(frozen=True)
class ShareShift:
    """How one group's share of its attribute moved since the reference data."""

    slice: str
    share_before: float
    share_now: float
    shift: float
    acknowledged: str | None


@dataclass(frozen=True)
class ValidationResult:
    """The outcome of every suite on one dataset."""

    success: bool
    n_subjects: int
    evaluated_expectations: int
    failed: list[FailedExpectation]
    #: ``{split set: {"attribute=group": count}}``; intersections as ``race=Asian&gender=Male``.
    group_counts: dict[str, dict[str, int]]
    format: str = "fairgenmed"
    #: One line per exclusion reason of the adapter (count and example rows).
    excluded: list[str] = field(default_factory=list)
    n_excluded: int = 0
    #: Synthetic rows: their share of training, per generating model, and in test.
    synthetic: dict[str, Any] = field(default_factory=dict)
    #: Against the reference data (``None``: there was none, e.g. no champion yet).
    reference: str | None = None
    share_shifts: list[ShareShift] = field(default_factory=list)
    #: The Data Docs folder (``index.html``), when they were built.
    data_docs: str | None = None

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
        notes = [f"  ({line})" for line in self.excluded]
        if self.success:
            return "\n".join([f"validation passed: {head}", *notes])
        lines = [f"validation FAILED: {head}"] + [f"  - {line}" for line in self.failed_expectations]
        return "\n".join(lines + notes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form for MLflow and the lineage."""
        return {
            "success": self.success,
            "format": self.format,
            "n_subjects": self.n_subjects,
            "n_excluded": self.n_excluded,
            "excluded": self.excluded,
            "evaluated_expectations": self.evaluated_expectations,
            "failed_expectations": self.failed_expectations,
            "failures": [asdict(failure) for failure in self.failed],
            "group_counts": self.group_counts,
            "synthetic": self.synthetic,
            "reference": self.reference,
            "share_shifts": [asdict(shift) for shift in self.share_shifts],
        }


@dataclass(frozen=True)
class _Check:
    """An expectation and the sentence a user reads when it fails."""

    expectation: Any
    rule: str


def _hash_pixels(array: np.ndarray) -> str:
    digest = hashlib.blake2b(f"{array.dtype}{array.shape}".encode(), digest_size=16)
    digest.update(np.ascontiguousarray(array).data.cast("B"))
    return digest.hexdigest()


def _describe_array(image: np.ndarray) -> dict[str, object]:
    channels = 1 if image.ndim == 2 else (image.shape[2] if image.ndim == 3 else None)
    empty = image.size == 0
    low = None if empty else float(image.min())
    high = None if empty else float(image.max())
    return {
        "ndim": image.ndim,
        "channels": channels,
        "dtype": str(image.dtype),
        "shape": "x".join(map(str, image.shape[:2])),
        "min": low,
        "max": high,
        "constant": bool(empty or low == high),
        "hash": _hash_pixels(image),
    }


def _check_npz_image(npz_path: str, jpg_path: str) -> dict[str, object]:
    """FairGenMed: facts of the npz ``slo_fundus`` array; the jpg beside it must decode too."""
    facts: dict[str, object] = {"file": npz_path, "error": None}
    try:
        if not zipfile.is_zipfile(npz_path):
            raise ValueError("not an npz archive")
        with np.load(npz_path, allow_pickle=False) as npz:
            facts |= _describe_array(npz["slo_fundus"])
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as error:
        facts["error"] = f"{npz_path}: {type(error).__name__}: {error}"
    try:
        with Image.open(jpg_path) as jpg:
            # A reduced-scale decode still reads every entropy-coded block, so a truncated
            # or corrupt file fails here; the full-size pixels come from the npz above.
            jpg.draft(jpg.mode, (max(1, jpg.width // 8), max(1, jpg.height // 8)))
            jpg.load()
    except (OSError, UnidentifiedImageError, ValueError) as error:
        facts["error"] = (f"{facts['error']}; " if facts["error"] else "") + f"{jpg_path}: {error}"
    return facts


def _check_image_file(path: str) -> dict[str, object]:
    facts: dict[str, object] = {"file": path, "error": None}
    try:
        with Image.open(path) as image:
            facts |= _describe_array(np.asarray(image))
    except (OSError, UnidentifiedImageError, ValueError) as error:
        facts["error"] = f"{path}: {type(error).__name__}: {error}"
    return facts


def inspect_images(samples: pd.DataFrame, schema: SampleSchema = FAIRGENMED_SCHEMA, workers: int = 2) -> pd.DataFrame:
    """Decode every subject's image; one row of facts per subject.

    Each worker holds one image at a time and keeps only its facts, so memory does not
    grow with the dataset. Decoding (zlib, JPEG) and hashing release the GIL, so threads
    run in parallel.
    """
    jobs: Iterable[tuple[str, ...]]
    if schema.npz_images:
        jobs = zip(samples["npz_path"].astype(str), samples["image_path"].astype(str), strict=True)
    else:
        jobs = ((path,) for path in samples["image_path"].astype(str))

    def check(job: tuple[str, ...]) -> dict[str, object]:
        return _check_npz_image(job[0], job[1]) if len(job) == 2 else _check_image_file(job[0])

    with ThreadPoolExecutor(max_workers=workers) as pool:
        facts = list(pool.map(check, jobs))
    frame = pd.DataFrame(facts, columns=[*_IMAGE_COLUMNS[2:], "hash"])
    frame.insert(0, "subject", samples["subject"].to_numpy())
    frame.insert(1, "split", samples["split"].to_numpy())
    frame["duplicate_in_other_split"] = _cross_split_duplicates(frame)
    return frame.drop(columns=["hash"])


def _cross_split_duplicates(images: pd.DataFrame) -> pd.Series:
    """For each image, another file with the same pixels in another split (else ``None``)."""
    known = images[images["hash"].notna()]
    spread = known.groupby("hash")["split"].nunique()
    shared = set(spread[spread > 1].index)
    result = pd.Series([None] * len(images), index=images.index, dtype=object)
    if not shared:
        return result
    rows = known[known["hash"].isin(shared)]
    for _, group in rows.groupby("hash"):
        for index, split in zip(group.index, group["split"], strict=True):
            other = group[group["split"] != split].iloc[0]
            result[index] = f"{other['file']} in {other['split']}"
    return result


def count_groups(
    samples: pd.DataFrame,
    attributes: Mapping[str, Sequence[str]],
    split_sets: Mapping[str, Sequence[str]],
    intersections: Sequence[Sequence[str]] = (),
) -> pd.DataFrame:
    """Count subjects per (split set, group), listing absent groups at 0.

    Groups are each attribute's groups, then every combination of groups of each
    intersection (``attribute`` ``race&gender``, ``group`` ``Asian&Female``).
    """
    rows = []
    combos: list[tuple[str, ...]] = [(a,) for a in attributes] + [tuple(names) for names in intersections]
    for set_name, splits in split_sets.items():
        subset = samples[samples["split"].isin(list(splits))] if "split" in samples else samples.iloc[0:0]
        for names in combos:
            present = [n for n in names if n in subset.columns]
            counts = subset.groupby(present, dropna=True).size() if len(present) == len(names) else pd.Series()
            for groups in itertools.product(*(attributes[n] for n in names)):
                key = groups if len(names) > 1 else groups[0]
                label = "&".join(f"{n}={g}" for n, g in zip(names, groups, strict=True))
                rows.append(
                    {
                        "slice": f"{set_name} {label}",
                        "split_set": set_name,
                        "attribute": "&".join(names),
                        "group": "&".join(groups),
                        "key": label,
                        "count": int(counts.get(key, 0)),
                    }
                )
    return pd.DataFrame(rows, columns=["slice", "split_set", "attribute", "group", "key", "count"])


def count_classes(
    samples: pd.DataFrame,
    attributes: Mapping[str, Sequence[str]],
    split_sets: Mapping[str, Sequence[str]],
    label: str,
    classes: Sequence[str],
) -> pd.DataFrame:
    """Subjects per (split set, group, class of ``label``), absent combinations at 0."""
    rows = []
    for set_name, splits in split_sets.items():
        subset = samples[samples["split"].isin(list(splits))]
        for attribute, groups in attributes.items():
            counts = subset.groupby([attribute, label]).size() if attribute in subset else pd.Series()
            for group in groups:
                for cls in classes:
                    rows.append(
                        {
                            "slice": f"{set_name} {attribute}={group} {label}={cls}",
                            "count": int(counts.get((group, cls), 0)),
                        }
                    )
    return pd.DataFrame(rows, columns=["slice", "count"])


def compare_shares(
    group_counts: Mapping[str, Mapping[str, int]],
    reference: Mapping[str, Mapping[str, int]],
    attributes: Mapping[str, Sequence[str]],
    acknowledged: Mapping[str, str],
) -> list[ShareShift]:
    """Each group's share of its attribute now and in the reference, per split set."""
    shifts = []
    for set_name, counts in group_counts.items():
        before = reference.get(set_name) or {}
        for attribute, groups in attributes.items():
            keys = [f"{attribute}={g}" for g in groups]
            if not all(k in before for k in keys):
                continue  # the reference did not count this attribute
            total_now = sum(counts.get(k, 0) for k in keys)
            total_before = sum(int(before[k]) for k in keys)
            if not total_now or not total_before:
                continue
            for key in keys:
                now, then = counts.get(key, 0) / total_now, int(before[key]) / total_before
                shifts.append(
                    ShareShift(
                        slice=f"{set_name} {key}",
                        share_before=round(then, 4),
                        share_now=round(now, 4),
                        shift=round(abs(now - then), 4),
                        acknowledged=acknowledged.get(key),
                    )
                )
    return shifts


def _sample_checks(
    samples: pd.DataFrame,
    attributes: Mapping[str, Sequence[str]],
    schema: SampleSchema,
    config: ValidationConfig,
    train_splits: Sequence[str],
    test_split: str,
) -> list[_Check]:
    import great_expectations as gx

    e = gx.expectations
    has = set(samples.columns)
    required = [*COMMON_COLUMNS, *(["npz_path"] if schema.npz_images else [])]
    checks = [_Check(e.ExpectColumnToExist(column=c), "required column is present") for c in required]
    for column in [c for c in _TEXT_COLUMNS if c in has]:
        checks.append(_Check(e.ExpectColumnValuesToBeOfType(column=column, type_="str"), "values are text"))
        if column != "prompt":
            checks.append(_Check(e.ExpectColumnValuesToNotBeNull(column=column), "no missing value"))
    if "prompt" in has:
        checks.append(_Check(e.ExpectColumnValuesToNotBeNull(column="prompt"), "every subject has a prompt"))
    checks.append(_Check(e.ExpectColumnValuesToBeUnique(column="subject"), "subject ids are unique"))
    if "split" in has:
        splits = [*train_splits, test_split]
        checks.append(
            _Check(e.ExpectColumnValuesToBeInSet(column="split", value_set=splits), f"split is one of {splits}")
        )
    if "read_error" in has:
        checks.append(_Check(e.ExpectColumnValuesToBeNull(column="read_error"), "every file can be found and read"))
    for attribute, groups in attributes.items():
        checks.append(_Check(e.ExpectColumnToExist(column=attribute), "protected attribute is present"))
        if attribute not in has:
            continue
        checks.append(_Check(e.ExpectColumnValuesToNotBeNull(column=attribute), "no missing protected attribute"))
        checks.append(
            _Check(
                e.ExpectColumnValuesToBeInSet(column=attribute, value_set=list(groups)),
                f"value is one of the allowed codes {list(groups)}",
            )
        )
    for label, allowed in schema.labels.items():
        checks.append(_Check(e.ExpectColumnToExist(column=label), "clinical label is present"))
        if label not in has:
            continue
        checks.append(_Check(e.ExpectColumnValuesToNotBeNull(column=label), "no missing clinical label"))
        checks.append(
            _Check(
                e.ExpectColumnValuesToBeInSet(column=label, value_set=allowed),
                f"value is one of the allowed codes {allowed}",
            )
        )
    if {"source", "split", "generated_by"} <= has:
        checks += _provenance_checks(config, train_splits, test_split)
    return checks


def _provenance_checks(config: ValidationConfig, train_splits: Sequence[str], test_split: str) -> list[_Check]:
    import great_expectations as gx

    e = gx.expectations
    checks = [
        _Check(e.ExpectColumnValuesToBeInSet(column="source", value_set=SOURCES), f"source is one of {SOURCES}"),
        _Check(
            e.ExpectColumnValuesToNotBeNull(
                column="generated_by", row_condition='source == "synthetic"', condition_parser="pandas"
            ),
            "every synthetic row names the model version that generated it",
        ),
        _Check(
            e.ExpectColumnValuesToBeInSet(
                column="source", value_set=["real"], row_condition=f"split == {test_split!r}", condition_parser="pandas"
            ),
            f"the test split '{test_split}' is entirely real (synthetic images never enter evaluation)",
        ),
    ]
    ceiling = config.max_synthetic_fraction
    if ceiling < 1:
        checks.append(
            _Check(
                e.ExpectColumnValuesToBeInSet(
                    column="source",
                    value_set=["real"],
                    mostly=1 - ceiling,
                    row_condition=f"split in {list(train_splits)!r}",
                    condition_parser="pandas",
                ),
                f"at most {ceiling:.0%} of the training rows are synthetic (validation.max_synthetic_fraction)",
            )
        )
    return checks


def _image_checks(config: ValidationConfig, schema: SampleSchema) -> list[_Check]:
    import great_expectations as gx

    e = gx.expectations
    decodes = "image decodes (npz slo_fundus and jpg)" if schema.npz_images else "image file decodes"
    checks = [_Check(e.ExpectColumnValuesToBeNull(column="error"), decodes)]
    if schema.image_ndim == 2:
        checks.append(_Check(e.ExpectColumnValuesToBeInSet(column="ndim", value_set=[2]), "image is 2-D"))
    else:
        checks.append(
            _Check(e.ExpectColumnValuesToBeInSet(column="ndim", value_set=[3]), "image is colour (H x W x channels)")
        )
        checks.append(_Check(e.ExpectColumnValuesToBeInSet(column="channels", value_set=[3]), "image is RGB"))
    checks += [
        _Check(
            e.ExpectColumnValuesToBeInSet(column="dtype", value_set=[config.image_dtype]),
            f"image dtype is {config.image_dtype}",
        ),
        _Check(
            e.ExpectColumnValuesToBeInSet(column="constant", value_set=[False]),
            "image is not constant",
        ),
    ]
    low, high = config.intensity_range
    for column, bound in (("min", {"min_value": low}), ("max", {"max_value": high})):
        checks.append(
            _Check(
                e.ExpectColumnValuesToBeBetween(column=column, **bound),
                f"every pixel lies in the intensity range [{low:g}, {high:g}]",
            )
        )
    if config.image_shape is not None:
        expected = f"{config.image_shape[0]}x{config.image_shape[1]}"
        checks.append(
            _Check(
                e.ExpectColumnValuesToBeInSet(column="shape", value_set=[expected]),
                f"image shape is {expected}",
            )
        )
    checks.append(
        _Check(
            e.ExpectColumnValuesToBeNull(column="duplicate_in_other_split"),
            "no image is repeated (same pixels) in another split",
        )
    )
    return checks


def _minimums(counts: pd.DataFrame, config: ValidationConfig) -> pd.Series:
    default = (
        counts["attribute"].str.contains("&").map({True: config.min_intersection_count, False: config.min_group_count})
    )
    return counts["key"].map(config.min_group_counts).fillna(default).astype(int)


def _count_checks(minimums: Sequence[int]) -> list[_Check]:
    import great_expectations as gx

    return [
        _Check(
            gx.expectations.ExpectColumnValuesToBeBetween(
                column="count", min_value=minimum, row_condition=f"minimum == {minimum}", condition_parser="pandas"
            ),
            f"every subgroup has at least {minimum} subjects",
        )
        for minimum in sorted(set(minimums))
    ]


class _Suites:
    """Runs one suite per table in one ephemeral Great Expectations context."""

    def __init__(self, docs_dir: Path | None) -> None:
        import great_expectations as gx

        self.context = gx.get_context(mode="ephemeral")
        self.context.variables.progress_bars = {"globally": False}
        self.docs_dir = docs_dir
        if docs_dir is not None:
            docs_dir.mkdir(parents=True, exist_ok=True)
            self.context.add_data_docs_site(
                site_name="fairdiffusion",
                site_config={
                    "class_name": "SiteBuilder",
                    "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir)},
                    "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
                },
            )
        self.evaluated = 0
        self.failed: list[FailedExpectation] = []

    def run(self, table: str, frame: pd.DataFrame, checks: list[_Check], id_column: str) -> None:
        import great_expectations as gx

        asset = self.context.data_sources.add_pandas(table).add_dataframe_asset(table)
        batch_definition = asset.add_batch_definition_whole_dataframe("all")
        suite = self.context.suites.add(
            gx.ExpectationSuite(name=f"fairdiffusion.{table}", expectations=[c.expectation for c in checks])
        )
        definition = self.context.validation_definitions.add(
            gx.ValidationDefinition(name=table, data=batch_definition, suite=suite)
        )
        result = definition.run(
            batch_parameters={"dataframe": frame},
            result_format={
                "result_format": "SUMMARY",
                "unexpected_index_column_names": [id_column] if id_column in frame.columns else [],
                "partial_unexpected_count": MAX_EXAMPLES,
            },
        )
        rules = {check.expectation.id: check.rule for check in checks}
        self.evaluated += len(result.results)
        for item in result.results:
            if not item.success:
                self.failed.append(_failure(table, item, rules, id_column))

    def build_docs(self) -> str | None:
        if self.docs_dir is None:
            return None
        self.context.build_data_docs()
        return str(self.docs_dir)


def _failure(table: str, item: Any, rules: Mapping[str, str], id_column: str) -> FailedExpectation:
    config = item.expectation_config
    details = item.result or {}
    column = config.kwargs.get("column")
    examples = []
    for entry in (details.get("partial_unexpected_index_list") or [])[:MAX_EXAMPLES]:
        value = entry.get(column) if column else None
        label = str(entry.get(id_column, "?"))
        shown = repr(value) if isinstance(value, str) else str(value)
        examples.append(f"{label} ({column}={shown})" if column and column != id_column else label)
    detail = ""
    if (config.kwargs.get("mostly") or 1) < 1 and details.get("element_count"):
        detail = f"{details.get('unexpected_percent', 0):.1f}% of {details['element_count']} rows"
    return FailedExpectation(
        table=table,
        expectation=config.type,
        column=column,
        rule=rules.get(config.id, config.type),
        unexpected_count=int(details.get("unexpected_count") or 0),
        examples=examples,
        detail=detail,
    )


def _patients(samples: pd.DataFrame) -> pd.DataFrame:
    pairs = samples[["patient_id", "split"]].dropna().drop_duplicates()
    splits = pairs.groupby("patient_id")["split"].agg(lambda s: ", ".join(sorted(map(str, s))))
    return pd.DataFrame({"patient_id": splits.index.astype(str), "splits": splits.to_numpy()})


def _synthetic_summary(samples: pd.DataFrame, train_splits: Sequence[str], test_split: str) -> dict[str, Any]:
    if not {"source", "split"} <= set(samples.columns):
        return {}
    train = samples[samples["split"].isin(list(train_splits))]
    synthetic = train[train["source"] == "synthetic"]
    by_model = synthetic["generated_by"].fillna("(unknown)").value_counts() if "generated_by" in train else {}
    return {
        "train_rows": len(train),
        "train_synthetic": len(synthetic),
        "train_fraction": round(len(synthetic) / len(train), 4) if len(train) else 0.0,
        "by_model": {str(k): int(v) for k, v in dict(by_model).items()},
        "test_synthetic": int(((samples["split"] == test_split) & (samples["source"] == "synthetic")).sum()),
    }


def validate_dataset(
    samples: pd.DataFrame,
    attributes: Mapping[str, Sequence[str]],
    config: ValidationConfig,
    train_splits: Sequence[str],
    test_split: str,
    *,
    schema: SampleSchema = FAIRGENMED_SCHEMA,
    excluded: pd.DataFrame | None = None,
    reference: ReferenceCounts | None = None,
    docs_dir: str | Path | None = None,
) -> ValidationResult:
    """Run the Great Expectations suites on a sample table and its images.

    Args:
        samples: The sample table of a dataset adapter.
        attributes: Protected attribute -> allowed groups.
        config: Thresholds (group minimums, image facts, synthetic ceiling, share shifts).
        train_splits: Splits trained on; their union must meet the group minimums.
        test_split: The evaluation split; it must meet the group minimums too.
        schema: The format's clinical labels and image layout (default: FairGenMed's).
        excluded: Rows the adapter left out (``subject``, ``reason``), reported as such.
        reference: Group counts of the data the current champion was trained on; each
            group's share may then move by at most ``config.max_share_shift`` unless
            acknowledged in ``config.acknowledged_shifts``.
        docs_dir: Write Great Expectations Data Docs (HTML, ``index.html``) here.

    Returns:
        The result; ``success`` is false when any expectation failed.
    """
    suites = _Suites(Path(docs_dir) if docs_dir is not None else None)
    split_sets = {"train": list(train_splits), "test": [test_split]}
    group_counts = count_groups(samples, attributes, split_sets, config.intersections)
    group_counts["minimum"] = _minimums(group_counts, config)
    counts: dict[str, dict[str, int]] = {}
    for row in group_counts.itertuples(index=False):
        counts.setdefault(str(row.split_set), {})[str(row.key)] = int(row.count)

    suites.run(
        "samples",
        samples,
        _sample_checks(samples, attributes, schema, config, train_splits, test_split),
        "subject",
    )
    if {"patient_id", "split"} <= set(samples.columns):
        no_two_splits = _gx("ExpectColumnValuesToNotMatchRegex", column="splits", regex=",")
        suites.run("patients", _patients(samples), [_Check(no_two_splits, "no patient is in two splits")], "patient_id")
    image_columns = ["subject", "split", "image_path", *(["npz_path"] if schema.npz_images else [])]
    if set(image_columns) <= set(samples.columns):
        images = inspect_images(samples, schema, config.workers)
        suites.run("images", images, _image_checks(config, schema), "file")
    suites.run("group_counts", group_counts, _count_checks(group_counts["minimum"].tolist()), "slice")
    main_label = config.main_label or schema.main_label
    if main_label in samples.columns and "split" in samples.columns:
        classes = schema.labels.get(main_label) or sorted(samples[main_label].dropna().astype(str).unique())
        balance = count_classes(samples, attributes, split_sets, main_label, classes)
        minimum = config.min_class_count
        rule = f"each group has every class of {main_label} (at least {minimum} each), in training and in test"
        suites.run("class_balance", balance, [_Check(_gx_between("count", min_value=minimum), rule)], "slice")
    shifts: list[ShareShift] = []
    if reference is not None:
        shifts = compare_shares(counts, reference.group_counts, attributes, config.acknowledged_shifts)
        shares = pd.DataFrame(
            {
                "change": [f"{s.slice} {s.share_before:.1%} -> {s.share_now:.1%}" for s in shifts],
                "shift": [s.shift for s in shifts],
                "acknowledged": [s.acknowledged is not None for s in shifts],
            }
        )
        limit = config.max_share_shift
        rule = (
            f"no group's share moves by more than {limit * 100:g} percentage points since {reference.label} "
            "unless acknowledged in validation.acknowledged_shifts"
        )
        moved = _gx_between("shift", max_value=limit, row_condition="not acknowledged", condition_parser="pandas")
        suites.run("group_shares", shares, [_Check(moved, rule)], "change")
    docs = suites.build_docs()
    excluded = excluded if excluded is not None else pd.DataFrame(columns=["subject", "reason"])
    return ValidationResult(
        success=not suites.failed,
        n_subjects=len(samples),
        evaluated_expectations=suites.evaluated,
        failed=suites.failed,
        group_counts=counts,
        format=schema.format,
        excluded=describe_exclusions(excluded, MAX_EXAMPLES),
        n_excluded=len(excluded),
        synthetic=_synthetic_summary(samples, train_splits, test_split),
        reference=reference.label if reference is not None else None,
        share_shifts=shifts,
        data_docs=docs,
    )


def _gx_between(column: str, **kwargs: Any) -> Any:
    return _gx("ExpectColumnValuesToBeBetween", column=column, **kwargs)


def _gx(name: str, **kwargs: Any) -> Any:
    import great_expectations as gx

    return getattr(gx.expectations, name)(**kwargs)
