"""Great Expectations (1.x) validation of a sample table and its images.

Each table below is judged by its own suite, so a failure names exactly what broke:
- ``samples``: the sample table (schema and types, allowed codes of every attribute and
  label, no missing protected attribute, unique subject ids, readable files, provenance:
  synthetic rows name their model, the test split is entirely real, the synthetic share
  of training is at most the ceiling);
- ``synthetic_shares``: one row per training group, its synthetic share at most the
  per-group ceiling;
- ``patients``: one row per patient with the splits it appears in (at most one);
- ``images``: one row per image from decoding it (decodes, layout, dtype, shape,
  intensity range, not constant, no identical image in another split);
- ``group_counts``: one row per (split set, group), for every attribute and configured
  intersection, absent groups at 0, each at or above its minimum;
- ``class_balance``: one row per (split set, group, class of the main label);
- ``group_shares``: with the counts of the champion's data, each group's share then and
  now; a move above the configured amount needs an acknowledgement in the config.

Every failed expectation is reported with a bounded sample of offending rows. With a
``docs_dir``, the run also writes Great Expectations Data Docs (HTML) there, readable
offline (``offline_docs``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from fairdiffusion.config import ValidationConfig
from fairdiffusion.data.counts import count_classes, count_groups
from fairdiffusion.data.fairgenmed import SCHEMA as FAIRGENMED_SCHEMA
from fairdiffusion.data.table import COMMON_COLUMNS, SOURCES, SampleSchema, describe_exclusions
from fairdiffusion.validation.integrity import inspect_images
from fairdiffusion.validation.offline_docs import make_docs_offline
from fairdiffusion.validation.result import FailedExpectation, ReferenceCounts, ShareShift, ValidationResult

#: How many offending rows a failure message names at most.
MAX_EXAMPLES = 5
_TEXT_COLUMNS = ["subject", "patient_id", "split", "image_path", "prompt"]


@dataclass(frozen=True)
class _Check:
    """An expectation and the sentence a user reads when it fails."""

    expectation: Any
    rule: str


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


def _shape_checks(config: ValidationConfig, shapes: pd.Series) -> list[_Check]:
    """The configured shape; unset, the most common one, so that all images share one shape."""
    import great_expectations as gx

    if isinstance(config.image_shape, tuple):
        expected = f"{config.image_shape[0]}x{config.image_shape[1]}"
        rule = f"image shape is {expected}"
    elif config.image_shape is None:
        seen = shapes.dropna().astype(str).value_counts().sort_index().sort_values(ascending=False, kind="stable")
        if seen.empty:
            return []
        expected = str(seen.index[0])
        listed = ", ".join(f"{shape} ({count})" for shape, count in seen.head(MAX_EXAMPLES).items())
        more = f" and {len(seen) - MAX_EXAMPLES} more" if len(seen) > MAX_EXAMPLES else ""
        rule = (
            f"all images share one shape (validation.image_shape unset; seen {listed}{more}; "
            "set validation.image_shape to [height, width], or to any for mixed sizes)"
        )
    else:  # "any": training resizes every image, so mixed sizes are accepted on purpose
        return []
    return [_Check(gx.expectations.ExpectColumnValuesToBeInSet(column="shape", value_set=[expected]), rule)]


def _image_checks(config: ValidationConfig, schema: SampleSchema, shapes: pd.Series) -> list[_Check]:
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
    checks += _shape_checks(config, shapes)
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
        make_docs_offline(self.docs_dir)
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


def synthetic_group_shares(
    samples: pd.DataFrame, attributes: Mapping[str, Sequence[str]], train_splits: Sequence[str]
) -> pd.DataFrame:
    """One row per group present in training: its training rows, synthetic rows and synthetic share."""
    train = samples[samples["split"].isin(list(train_splits))]
    synthetic = train["source"] == "synthetic"
    rows = []
    for attribute in [a for a in attributes if a in train.columns]:
        for group, is_synthetic in synthetic.groupby(train[attribute]):
            rows.append(
                {
                    "group": f"train {attribute}={group}",
                    "rows": len(is_synthetic),
                    "synthetic": int(is_synthetic.sum()),
                    "share": round(float(is_synthetic.mean()), 4),
                }
            )
    return pd.DataFrame(rows, columns=["group", "rows", "synthetic", "share"])


def _run_synthetic_group_shares(
    suites: _Suites,
    samples: pd.DataFrame,
    attributes: Mapping[str, Sequence[str]],
    config: ValidationConfig,
    train_splits: Sequence[str],
) -> None:
    if not {"source", "split"} <= set(samples.columns) or config.max_synthetic_fraction_per_group >= 1:
        return
    ceiling = config.max_synthetic_fraction_per_group
    rule = (
        f"at most {ceiling:.0%} of each group's training rows are synthetic "
        "(validation.max_synthetic_fraction_per_group)"
    )
    shares = synthetic_group_shares(samples, attributes, train_splits)
    suites.run("synthetic_shares", shares, [_Check(_gx_between("share", max_value=ceiling), rule)], "group")


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
        suites.run("images", images, _image_checks(config, schema, images["shape"]), "file")
    suites.run("group_counts", group_counts, _count_checks(group_counts["minimum"].tolist()), "slice")
    _run_class_balance(suites, samples, attributes, schema, config, split_sets)
    _run_synthetic_group_shares(suites, samples, attributes, config, train_splits)
    shifts = _run_share_shifts(suites, counts, reference, attributes, config) if reference is not None else []
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


def _run_class_balance(
    suites: _Suites,
    samples: pd.DataFrame,
    attributes: Mapping[str, Sequence[str]],
    schema: SampleSchema,
    config: ValidationConfig,
    split_sets: Mapping[str, list[str]],
) -> None:
    main_label = config.main_label or schema.main_label
    if main_label not in samples.columns or "split" not in samples.columns:
        return
    classes = schema.labels.get(main_label) or sorted(samples[main_label].dropna().astype(str).unique())
    balance = count_classes(samples, attributes, split_sets, main_label, classes)
    minimum = config.min_class_count
    rule = f"each group has every class of {main_label} (at least {minimum} each), in training and in test"
    suites.run("class_balance", balance, [_Check(_gx_between("count", min_value=minimum), rule)], "slice")


def _run_share_shifts(
    suites: _Suites,
    counts: Mapping[str, Mapping[str, int]],
    reference: ReferenceCounts,
    attributes: Mapping[str, Sequence[str]],
    config: ValidationConfig,
) -> list[ShareShift]:
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
    return shifts


def _gx_between(column: str, **kwargs: Any) -> Any:
    return _gx("ExpectColumnValuesToBeBetween", column=column, **kwargs)


def _gx(name: str, **kwargs: Any) -> Any:
    import great_expectations as gx

    return getattr(gx.expectations, name)(**kwargs)
