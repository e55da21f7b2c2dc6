"""The one naming scheme of flat metric keys (MLflow and the gate); see :mod:`fairdiffusion.evaluation.slices`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from fairdiffusion.evaluation.slices import OVERALL, SliceAnalysis

#: Key stem of a slice's image count: ``num_samples/<slice>``.
NUM_SAMPLES = "num_samples"


def interval_keys(key: str) -> tuple[str, str]:
    """The keys of ``key``'s bootstrap bounds: ``("ci_low/<key>", "ci_high/<key>")``."""
    return f"ci_low/{key}", f"ci_high/{key}"


def fid_metric_names(extractor: str) -> dict[str, str]:
    """The FID key stems the gate reads, taken from :func:`metric_key_stems` so both name alike."""
    stems = metric_key_stems("fid", extractor)
    return {
        "fid": stems["value"],
        "es_fid": stems["es"],
        "gap": stems["max_gap"],
        "disparity": stems["disparity"],
        "n": NUM_SAMPLES,
    }


def metric_key_stems(metric: str, tag: str) -> dict[str, str]:
    """Key stems of one metric: ``metric_key_stems("fid", "randcnn32")["es"] == "es_fid_randcnn32"``.

    ``tag`` is the extractor's name for image metrics and ``<classifier>/<label>`` for AUC.
    """
    return {
        "value": f"{metric}_{tag}",
        "es": f"es_{metric}_{tag}",
        "disparity": f"{metric}_disparity_{tag}",
        "relative_disparity": f"{metric}_rel_disparity_{tag}",
        "max_gap": f"{metric}_gap_{tag}",
        "matched": f"{metric}_matched_{tag}",
        "matched_overall": f"{metric}_matched_overall_{tag}",
        "es_matched": f"es_{metric}_matched_{tag}",
        "disparity_matched": f"{metric}_disparity_matched_{tag}",
        "relative_disparity_matched": f"{metric}_rel_disparity_matched_{tag}",
        "max_gap_matched": f"{metric}_gap_matched_{tag}",
    }


_EQUITY_STATS = ("es", "disparity", "relative_disparity", "max_gap")


def flatten_analysis(analysis: SliceAnalysis, tags: Mapping[str, tuple[str, str]]) -> dict[str, float]:
    """MLflow-ready metrics of an analysis, with ``ci_low/K`` and ``ci_high/K`` beside each K.

    Args:
        analysis: The analysis to flatten.
        tags: Analysis metric -> (key metric name, tag): ``{"fid": ("fid", "randcnn32")}``
            for image metrics, ``{"glaucoma": ("auc", "small/glaucoma")}`` for AUC.
    """
    flat: dict[str, float] = {}

    def put(key: str, value: float | str, interval: Sequence[float] | None = None) -> None:
        flat[key] = float(value)
        if interval is not None:
            low, high = interval_keys(key)
            flat[low], flat[high] = float(interval[0]), float(interval[1])

    for metric in analysis.metric_names:
        name, tag = tags[metric]
        stems = metric_key_stems(name, tag)
        for slice_name, values in analysis.slices.items():
            put(f"{stems['value']}/{slice_name}", values[metric], analysis.intervals.get(slice_name, {}).get(metric))
        for attribute, stats in analysis.equity[metric].items():
            bounds = analysis.equity_intervals.get(metric, {}).get(attribute, {})
            for stat in _EQUITY_STATS:
                put(f"{stems[stat]}/{attribute}", stats[stat], bounds.get(stat))
        for attribute, matched in analysis.matched.items():
            bounds_of = matched.intervals.get(metric, {})
            for group, value in matched.values[metric].items():
                key = (
                    f"{stems['matched_overall']}/{attribute}"
                    if group == OVERALL
                    else f"{stems['matched']}/{attribute}/{group}"
                )
                put(key, value, bounds_of.get(group))
            stats, bounds = matched.equity[metric], matched.equity_intervals.get(metric, {})
            for stat in _EQUITY_STATS:
                put(f"{stems[stat + '_matched']}/{attribute}", stats[stat], bounds.get(stat))
    return flat


def flatten_slice_sizes(analysis: SliceAnalysis) -> dict[str, float]:
    """``num_samples/<slice>``, ``small_slice/<slice>`` and ``matched_n/<attr>``."""
    flat = {f"{NUM_SAMPLES}/{name}": float(values["num_samples"]) for name, values in analysis.slices.items()}
    flat |= {f"small_slice/{name}": float(name in analysis.small_slices) for name in analysis.slices}
    flat |= {f"matched_n/{attribute}": float(m.size) for attribute, m in analysis.matched.items()}
    return flat


def flatten_metrics(
    slices: Mapping[str, Mapping[str, float]],
    equity: Mapping[str, Mapping[str, float | str]],
    extractor: str,
) -> dict[str, float]:
    """The FID keys the gate reads: ``fid_<x>/overall``, ``fid_<x>/race/Asian``, ``es_fid_<x>/race``..."""
    names = fid_metric_names(extractor)
    flat: dict[str, float] = {}
    for slice_name, values in slices.items():
        flat[f"{names['fid']}/{slice_name}"] = float(values["fid"])
        flat[f"{names['n']}/{slice_name}"] = float(values["num_samples"])
    for attribute, scaled in equity.items():
        flat[f"{names['es_fid']}/{attribute}"] = float(scaled["es"])
        flat[f"{names['gap']}/{attribute}"] = float(scaled["max_gap"])
        flat[f"{names['disparity']}/{attribute}"] = float(scaled["disparity"])
    return flat


def reference_keys(extractor: str) -> dict[str, str]:
    """Keys of the references the gate compares a candidate with (one extractor's FIDs, overall).

    ``floor``: real-vs-real FID between two disjoint halves of the test images;
    ``half``: the candidate's FID at the same halves (real half A vs generated half B);
    ``over_floor``: ``half / floor``, a scale-free quality (1 = as good as real data);
    ``base``: the FID of the model the candidate was fine-tuned from, on the same prompts.
    """
    return {
        "floor": f"floor_fid_{extractor}/{OVERALL}",
        "half": f"fid_half_{extractor}/{OVERALL}",
        "over_floor": f"fid_over_floor_{extractor}/{OVERALL}",
        "base": f"ref_base_fid_{extractor}/{OVERALL}",
    }


def flatten_manifold(table: Mapping[str, Mapping[str, float]], extractor: str) -> dict[str, float]:
    """``precision_<x>/<slice>``, ``recall_<x>/<slice>`` and ``diversity_<x>/<slice>`` of
    :func:`fairdiffusion.evaluation.manifold.compute_manifold_slices`' table."""
    return {
        f"{metric_key_stems(metric, extractor)['value']}/{slice_name}": float(value)
        for slice_name, values in table.items()
        for metric, value in values.items()
        if metric != "num_samples"
    }


#: Prompt fidelity's key stems: per group ``<stem>/<attribute>/<group>``, per attribute ``<stem>/<attribute>``.
FIDELITY = "fidelity"
FIDELITY_GROUP_STEMS = {
    "fidelity": FIDELITY,
    "real_rate": "fidelity_real_rate",
    "generated_rate": "fidelity_generated_rate",
}
FIDELITY_ATTRIBUTE_STEMS = {
    "computable": "fidelity_computable",
    "visible": "fidelity_visible",
    "worst": "fidelity_worst",
    "real_balanced_accuracy": "fidelity_real_balanced_accuracy",
    "real_accuracy": "fidelity_real_accuracy",
    "generated_accuracy": "fidelity_generated_accuracy",
    "majority_rate": "fidelity_majority_rate",
    "margin_retained": "fidelity_margin_retained",
}


def fidelity_key(stat: str, attribute: str, group: str | None = None) -> str:
    """``fidelity_key("fidelity", "race", "Asian") == "fidelity/race/Asian"``; attribute stats take no group."""
    if group is None:
        return f"{FIDELITY_ATTRIBUTE_STEMS[stat]}/{attribute}"
    return f"{FIDELITY_GROUP_STEMS[stat]}/{attribute}/{group}"


def real_trained_auc_key(classifier: str, label: str) -> str:
    """``auc_real_trained/<classifier>/<label>``: the clinical classifier's AUC when trained on real images."""
    return f"auc_real_trained/{classifier}/{label}"
