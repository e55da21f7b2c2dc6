"""Subjects per group and per class: what validation checks and data diffs compare."""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence

import pandas as pd


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
