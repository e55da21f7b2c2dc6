"""The evaluation report: a self-contained HTML page and a Markdown summary.

Both show every metric of every slice with its interval and size, the equity-scaled
values (full size and matched size) with D, D/M, the largest gap and the worst-off
group, the clinical-semantics AUCs, bar charts per attribute (matplotlib), sample
grids of real beside generated images, the definitions and the measurement protocol.
The HTML embeds its images, so the one file can be archived or mailed and opened
anywhere. Rendering needs only an :class:`EvaluationReport` and the grid PNGs, so
``fairdiffusion report --version N`` re-renders any registered version from MLflow.
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from fairdiffusion.config import EvaluationConfig
from fairdiffusion.evaluation.comparison import BaselineComparison
from fairdiffusion.evaluation.image_metrics import INCEPTION_SCORE
from fairdiffusion.evaluation.metric_keys import reference_keys
from fairdiffusion.evaluation.results import ClinicalResult, EvaluationReport, FidelityResult
from fairdiffusion.evaluation.slices import OVERALL, SliceAnalysis

METRIC_TITLES = {"fid": "FID", "kid": "KID", INCEPTION_SCORE: "IS (1 split)"}
METRIC_DIRECTION = {"fid": "lower is better", "kid": "lower is better", INCEPTION_SCORE: "higher is better"}

DEFINITIONS = [
    (
        "Slices",
        "overall; each group of each protected attribute (race/Black); each intersection of groups "
        "of two or more attributes (race/Black/gender/Female/ethnicity/Hispanic). n is the number of "
        "test subjects in the slice: one real image and one image generated from its prompt each.",
    ),
    (
        "FID",
        "Fréchet distance between Gaussians fitted to the extractor's features of the real and the "
        "generated images of the slice: |mu_r - mu_g|^2 + Tr(S_r + S_g - 2 (S_r S_g)^1/2). Lower is "
        "better. It grows as the sample shrinks, so FIDs of slices of different sizes are not comparable.",
    ),
    (
        "KID",
        "Unbiased squared maximum mean discrepancy with the cubic polynomial kernel "
        "k(x, y) = (x.y / d + 1)^3, on the whole slice. Lower is better; unbiased, so small "
        "groups are not penalised for their size (it can be slightly negative).",
    ),
    (
        "IS (1 split)",
        "Inception Score exp(E KL(p(y|x) || p(y))) of the generated images of the slice in one split "
        "(keys is_1split_...), not the usual mean over ten splits: a small slice cannot be split ten ways, "
        "and the score depends on the split size. Only for an extractor with a classifier head. Higher is "
        "better.",
    ),
    (
        "Equity scaling",
        "For a metric with overall value M and group values M_g over one attribute, the disparity is "
        "D = sum over groups of |M - M_g|. Higher-is-better metrics (IS, AUC): ES-M = M / (1 + D); "
        "lower-is-better ones (FID, KID): ES-M = M * (1 + D) (FairDiffusion Sec. 4.2). Reported beside "
        "each ES value: D, the relative disparity D / M, the largest gap between two groups, and the "
        "worst-off group.",
    ),
    (
        "Matched sample size",
        "Each group of an attribute, and the overall set, is subsampled without replacement to the "
        "attribute's smallest group size, over seeded draws; the values are averaged over the draws and "
        "D, ES and the gap are computed from the averages. Use these to compare groups on FID.",
    ),
    (
        "Intervals",
        "Bootstrap over test subjects (seeded): each slice resampled with replacement on its own; ES, D, "
        "D/M and gaps resampled stratified by group, the overall value recomputed on the same resample; "
        "matched-size values by an m-out-of-n bootstrap. The protocol's ci_method names the interval: "
        "'bias_shifted_percentile', the bootstrap percentiles shifted by the bootstrap's bias (mean of the "
        "resamples minus the estimate; not Efron's BC or BCa), because duplicated subjects inflate FID in a "
        "resample, with bounds clipped at 0 for non-negative quantities; 'percentile', the plain "
        "percentiles; 'bca', Efron's bias-corrected and accelerated interval (scipy.stats.bootstrap, with a "
        "jackknife over subjects; matched-size values then keep 'bias_shifted_percentile'). A percentile "
        "interval is missing (nan) when fewer than half of the resamples gave a value; a BCa interval when "
        "any resample or leave-one-out sample gave none.",
    ),
    (
        "Small slices",
        "A slice with fewer images than the configured minimum is flagged (⚑): its values are reported "
        "but too uncertain to act on alone.",
    ),
    (
        "Clinical semantics (AUC)",
        "A classifier is trained on the generated images with the labels their prompts asked for and "
        "tested on the real test images (FairDiffusion Sec. 4.3). AUC is one-vs-rest, macro-averaged over "
        "the classes present in the slice (plain AUC for a binary label). ES-AUC = AUC / (1 + D).",
    ),
]


# --- formatting ----------------------------------------------------------------------------


def _num(value: object) -> str:
    if isinstance(value, str):
        return value
    number = float(value)  # type: ignore[arg-type]
    if not math.isfinite(number):
        return "–"
    if number != 0 and (abs(number) < 1e-3 or abs(number) >= 1e5):
        return f"{number:.3e}"
    return f"{number:.4g}"


def _ci(interval: Sequence[float] | None) -> str:
    if not interval or not all(math.isfinite(v) for v in interval):
        return ""
    return f"[{_num(interval[0])}, {_num(interval[1])}]"


def _with_ci(value: object, interval: Sequence[float] | None) -> str:
    bounds = _ci(interval)
    return f"{_num(value)} {bounds}".strip()


def _level(report: EvaluationReport) -> str:
    level = report.protocol.get("confidence_level")
    return f"{float(level):.0%}" if isinstance(level, int | float) else "?"


# --- tables as rows (shared by Markdown and HTML) -------------------------------------------


def _slice_rows(analysis: SliceAnalysis, titles: Mapping[str, str]) -> tuple[list[str], list[list[str]]]:
    headers = ["slice", "n", *[titles.get(m, m) for m in analysis.metric_names]]
    rows = []
    for name, values in analysis.slices.items():
        flag = " ⚑" if name in analysis.small_slices else ""
        cells = [name, f"{int(values['num_samples'])}{flag}"]
        cells += [_with_ci(values[m], analysis.intervals.get(name, {}).get(m)) for m in analysis.metric_names]
        rows.append(cells)
    return headers, rows


def _lowest_fidelity(fidelity: FidelityResult | None, attribute: str) -> str:
    """The equity tables' fidelity column: the group drawn least as prompted, and its figure."""
    item = fidelity.attributes.get(attribute) if fidelity else None
    if item is None:
        return "–"
    worst = item.worst_group
    if not item.computable or worst is None:
        return "not computable"
    shown = f"{worst.group} {_with_ci(worst.fidelity, worst.fidelity_interval)}"
    return shown if item.visible else f"{shown} (not visible in real images)"


def _equity_rows(
    analysis: SliceAnalysis, titles: Mapping[str, str], fidelity: FidelityResult | None = None
) -> tuple[list[str], list[list[str]]]:
    headers = ["metric", "attribute", "overall", "ES", "D", "D / M", "largest gap", "worst-off group"]
    headers.append("lowest prompt fidelity")
    rows = []
    for metric in analysis.metric_names:
        for attribute, stats in analysis.equity[metric].items():
            bounds = analysis.equity_intervals.get(metric, {}).get(attribute, {})
            rows.append(
                [
                    titles.get(metric, metric),
                    attribute,
                    _with_ci(analysis.slices[OVERALL][metric], analysis.intervals.get(OVERALL, {}).get(metric)),
                    _with_ci(stats["es"], bounds.get("es")),
                    _with_ci(stats["disparity"], bounds.get("disparity")),
                    _with_ci(stats["relative_disparity"], bounds.get("relative_disparity")),
                    _with_ci(stats["max_gap"], bounds.get("max_gap")),
                    str(stats["worst_group"]) or "–",
                    _lowest_fidelity(fidelity, attribute),
                ]
            )
    return headers, rows


FIDELITY_NOTE = (
    "A classifier trained on the real training images names each prompted attribute. Per group: the share of "
    "real test images classified as the group, the share of images generated from prompts naming the group "
    "classified as it, and their ratio, the fidelity (1: drawn as recognisably as real; 0: not drawn at all). "
    "This asks whether each image shows what its prompt asked for; the clinical AUC (paper Sec. 4.3) asks "
    "whether generated images teach the labels. An attribute the real images do not show beyond chance is "
    "reported, not judged."
)


def _fidelity_attribute_rows(fidelity: FidelityResult) -> tuple[list[str], list[list[str]]]:
    headers = ["attribute", "kind", "visible in real images", "real balanced acc. (chance)", "accuracy real"]
    headers += ["accuracy generated", "majority class", "margin kept", "lowest fidelity"]
    rows = []
    for name, item in fidelity.attributes.items():
        if not item.computable:
            rows.append([name, item.kind, f"not computable: {item.reason}", *["–"] * 6])
            continue
        visible = "yes" if item.visible else item.reason
        balanced = (
            f"{_with_ci(item.real_balanced_accuracy, item.real_balanced_accuracy_interval)} ({_num(item.chance)})"
        )
        rows.append(
            [name, item.kind, visible, balanced, _num(item.real_accuracy), _num(item.generated_accuracy),
             _num(item.majority_rate), _num(item.margin_retained), _lowest_fidelity(fidelity, name)]
        )  # fmt: skip
    return headers, rows


def _fidelity_group_rows(fidelity: FidelityResult) -> tuple[list[str], list[list[str]]]:
    headers = ["attribute", "group", "n", "real rate", "generated rate", "fidelity"]
    rows = []
    for name, item in fidelity.attributes.items():
        for g in item.groups:
            rows.append(
                [name, g.group, str(g.num_samples), _with_ci(g.real_rate, g.real_interval),
                 _with_ci(g.generated_rate, g.generated_interval), _with_ci(g.fidelity, g.fidelity_interval)]
            )  # fmt: skip
    return headers, rows


def _fidelity_title(fidelity: FidelityResult) -> str:
    return (
        f"Prompt fidelity: `{fidelity.classifier}` classifier trained on {fidelity.train_images} real training "
        f"images, applied to {fidelity.test_images} real and {fidelity.test_images} generated test images"
    )


def _matched_rows(analysis: SliceAnalysis, titles: Mapping[str, str]) -> tuple[list[str], list[list[str]]]:
    headers = ["metric", "attribute", "n per group", "groups (matched)", "overall", "ES", "D", "D / M", "gap"]
    headers.append("worst-off group")
    rows = []
    for attribute, matched in analysis.matched.items():
        for metric in analysis.metric_names:
            values, bounds = matched.values[metric], matched.intervals.get(metric, {})
            stats, stat_bounds = matched.equity[metric], matched.equity_intervals.get(metric, {})
            groups = "; ".join(f"{g} {_with_ci(v, bounds.get(g))}" for g, v in values.items() if g != OVERALL)
            rows.append(
                [
                    titles.get(metric, metric),
                    attribute,
                    str(matched.size),
                    groups,
                    _with_ci(values[OVERALL], bounds.get(OVERALL)),
                    _with_ci(stats["es"], stat_bounds.get("es")),
                    _with_ci(stats["disparity"], stat_bounds.get("disparity")),
                    _with_ci(stats["relative_disparity"], stat_bounds.get("relative_disparity")),
                    _with_ci(stats["max_gap"], stat_bounds.get("max_gap")),
                    str(stats["worst_group"]) or "–",
                ]
            )
    return headers, rows


def _image_titles(report: EvaluationReport) -> dict[str, str]:
    return {m: f"{METRIC_TITLES.get(m, m)} ({report.extractor})" for m in IMAGE_METRIC_ORDER}


IMAGE_METRIC_ORDER = ("fid", "kid", INCEPTION_SCORE)


BASELINE_NOTE = (
    "Each value as the run's own evaluation logged it, with its own interval; delta = this run minus the "
    "baseline. Both runs were judged on the same test subjects, so overlapping intervals do not show that "
    "a delta is noise, nor separate ones that it is not."
)


def baseline_heading(comparison: BaselineComparison) -> str:
    """The title of the baseline comparison: which run, and how it was found."""
    return f"Against the baseline: {comparison.source} (run {comparison.run_id}), same data version"


def _baseline_rows(comparison: BaselineComparison) -> tuple[list[str], list[list[str]]]:
    headers = ["metric", "baseline", "this run", "delta", "this run is"]
    rows = []
    for d in comparison.deltas:
        sign = "+" if d.delta > 0 else ""
        rows.append(
            [
                d.key,
                _with_ci(d.baseline, d.baseline_interval),
                _with_ci(d.candidate, d.candidate_interval),
                f"{sign}{_num(d.delta)}",
                d.verdict,
            ]
        )
    return headers, rows


def _baseline_markdown(comparison: BaselineComparison) -> list[str]:
    lines = ["", f"## {baseline_heading(comparison)}", "", BASELINE_NOTE, ""]
    if not comparison.deltas:
        return [*lines, "No metric key in common (evaluated with another extractor?)."]
    return lines + _md_table(*_baseline_rows(comparison))


def _baseline_html(comparison: BaselineComparison) -> str:
    parts = [
        f"<h2>{html.escape(baseline_heading(comparison))}</h2>",
        f"<p class='muted'>{html.escape(BASELINE_NOTE)}</p>",
    ]
    if not comparison.deltas:
        return "".join([*parts, "<p>No metric key in common (evaluated with another extractor?).</p>"])
    return "".join([*parts, _html_table(*_baseline_rows(comparison))])


def _protocol_rows(report: EvaluationReport) -> list[list[str]]:
    def show(value: object) -> str:
        return json.dumps(value) if isinstance(value, dict | list) else str(value)

    return [[key, show(value)] for key, value in report.protocol.items()]


# --- Markdown ---------------------------------------------------------------------------------


def _md_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h in headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return lines


def ceiling_sentence(clinical: ClinicalResult) -> str:
    """The real-trained AUCs beside the generated-trained ones: the ceiling the data allows."""
    pairs = ", ".join(
        f"{label} {clinical.analysis.slices[OVERALL][label]:.3f} (real-trained {auc:.3f})"
        for label, auc in (clinical.real_trained_auc or {}).items()
    )
    return (
        "The same classifier trained on the real training images instead scores the ceiling the data allows; "
        f"overall AUC, generated-trained (real-trained): {pairs}."
    )


def reference_lines(report: EvaluationReport) -> list[str]:
    """What puts the overall FID on a scale: the base model it started from and the real-vs-real floor."""
    keys = reference_keys(report.extractor)
    metrics, fid = report.metrics, report.metrics.get(f"fid_{report.extractor}/{OVERALL}")
    lines = []
    if keys["base"] in metrics:
        lines.append(f"Base model (fine-tuned from): FID {_num(metrics[keys['base']])}; this model: {_num(fid)}")
    if keys["floor"] in metrics:
        lines.append(
            f"Real-vs-real floor (two halves of the real test images): FID {_num(metrics[keys['floor']])}; "
            f"this model at the same halves: {_num(metrics[keys['half']])} "
            f"({_num(metrics[keys['over_floor']])} x the floor)"
        )
    return lines


def render_markdown(report: EvaluationReport, charts: Sequence[str] = ()) -> str:
    """The Markdown summary of an evaluation (images linked, not embedded)."""
    lines = [f"# Evaluation ({report.extractor} features)", ""]
    lines += [_extractor_warning(report), ""]
    quality = report.quality
    if quality is None:  # a report built from flat metrics alone
        lines += _md_table(
            ["slice", "FID", "images"],
            [[n, _num(v.get("fid", float("nan"))), str(int(v["num_samples"]))] for n, v in report.slices.items()],
        )
        return "\n".join(lines) + "\n"
    titles = _image_titles(report)
    level = _level(report)
    lines += [
        f"## Image quality per slice ({level} intervals; ⚑ = fewer than "
        f"{report.protocol.get('min_slice_size')} images)",
        "",
    ]
    lines += _md_table(*_slice_rows(quality, titles))
    if reference_lines(report):
        lines += ["", "## References", ""] + [f"- {line}" for line in reference_lines(report)]
    if report.baseline is not None:
        lines += _baseline_markdown(report.baseline)
    if report.fidelity is not None:
        lines += ["", f"## {_fidelity_title(report.fidelity)}", "", FIDELITY_NOTE, ""]
        lines += _md_table(*_fidelity_attribute_rows(report.fidelity))
        lines += [""] + _md_table(*_fidelity_group_rows(report.fidelity))
    lines += ["", "## Equity (full sample sizes)", ""]
    lines += _md_table(*_equity_rows(quality, titles, report.fidelity))
    if quality.matched:
        lines += ["", "## Equity at matched sample size", ""]
        lines += _md_table(*_matched_rows(quality, titles))
    if report.clinical is not None:
        clinical = report.clinical
        auc_titles = {label: f"AUC {label}" for label in clinical.classes}
        lines += [
            "",
            f"## Clinical semantics: `{clinical.classifier}` classifier trained on "
            f"{clinical.train_images} generated images, tested on {clinical.test_images} real images",
            "",
        ]
        lines += _md_table(*_slice_rows(clinical.analysis, auc_titles))
        lines += [""]
        lines += _md_table(*_equity_rows(clinical.analysis, auc_titles))
        if clinical.real_trained_auc:
            lines += ["", ceiling_sentence(clinical)]
    if charts:
        lines += ["", "## Charts", ""] + [f"![{Path(c).stem}]({c})" for c in charts]
    if report.grids:
        lines += ["", "## Sample grids (real left, generated right)", ""]
        lines += [f"![{attribute}]({path})" for attribute, path in report.grids.items()]
    lines += ["", "## Definitions", ""]
    lines += [f"- **{term}.** {text}" for term, text in DEFINITIONS]
    lines += ["", "## Protocol", ""]
    lines += _md_table(["key", "value"], _protocol_rows(report))
    return "\n".join(lines) + "\n"


def _extractor_warning(report: EvaluationReport) -> str:
    text = (
        f"Every image metric uses `{report.extractor}` features; it is comparable only with values "
        "of the same extractor."
    )
    if not report.extractor.startswith("inception"):
        text += " These are NOT Inception FIDs and cannot be compared with published numbers."
    return text


# --- charts and grids ---------------------------------------------------------------------------


def _bar_chart(
    analysis: SliceAnalysis,
    metric: str,
    title: str,
    attributes: Sequence[str],
    path: Path,
    chance: float | None = None,
) -> Path:
    """One metric by group, one panel per attribute: full size (and matched size) with intervals."""
    figure = Figure(figsize=(4.2 * len(attributes), 3.6), layout="constrained")
    axes = figure.subplots(1, len(attributes), squeeze=False)[0]
    higher = analysis.higher_is_better[metric]
    for ax, attribute in zip(axes, attributes, strict=True):
        keys = [k for k in analysis.slices if k.startswith(f"{attribute}/") and k.count("/") == 1]
        groups = [k.split("/", 1)[1] for k in keys]
        values = np.array([analysis.slices[k][metric] for k in keys], dtype=float)
        bounds = [analysis.intervals.get(k, {}).get(metric, [math.nan, math.nan]) for k in keys]
        matched = analysis.matched.get(attribute)
        width = 0.38 if matched else 0.7
        x = np.arange(len(keys))
        worst = str(analysis.equity[metric].get(attribute, {}).get("worst_group", ""))
        colours = ["#c0392b" if g == worst else "#4c72b0" for g in groups]
        ax.bar(x - (width / 2 if matched else 0), np.nan_to_num(values), width, color=colours, label="full size")
        _error_bars(ax, x - (width / 2 if matched else 0), values, bounds)
        if matched:
            m_values = np.array([matched.values[metric].get(g, math.nan) for g in groups], dtype=float)
            m_bounds = [matched.intervals.get(metric, {}).get(g, [math.nan, math.nan]) for g in groups]
            ax.bar(
                x + width / 2,
                np.nan_to_num(m_values),
                width,
                color="#aab8d6",
                hatch="//",
                edgecolor="#4c72b0",
                label=f"matched n={matched.size}",
            )
            _error_bars(ax, x + width / 2, m_values, m_bounds)
        for position, value in zip(x, values, strict=True):
            if not math.isfinite(value):
                ax.annotate("n/a", (position, 0), ha="center", va="bottom", fontsize=8, color="#666666")
        overall = analysis.slices[OVERALL][metric]
        if math.isfinite(overall):
            ax.axhline(overall, color="#333333", linestyle="--", linewidth=1, label="overall")
        if chance is not None:
            ax.axhline(chance, color="#999999", linestyle=":", linewidth=1, label="chance")
            ax.set_ylim(0, 1.05)
        sizes = [int(analysis.slices[k]["num_samples"]) for k in keys]
        flags = ["⚑" if k in analysis.small_slices else "" for k in keys]
        ax.set_xticks(x, [f"{g}\nn={n}{f}" for g, n, f in zip(groups, sizes, flags, strict=True)], fontsize=8)
        es = analysis.equity[metric].get(attribute, {}).get("es", math.nan)
        ax.set_title(f"{attribute}  (ES {_num(es)})", fontsize=9)
        ax.tick_params(axis="y", labelsize=8)
        ax.legend(fontsize=7, loc="best")
    figure.suptitle(f"{title} by group ({'higher' if higher else 'lower'} is better; worst-off in red)", fontsize=10)
    figure.savefig(path, dpi=100)
    return path


def _error_bars(ax: object, x: np.ndarray, values: np.ndarray, bounds: Sequence[Sequence[float]]) -> None:
    low = np.array([b[0] for b in bounds], dtype=float)
    high = np.array([b[1] for b in bounds], dtype=float)
    ok = np.isfinite(low) & np.isfinite(high) & np.isfinite(values)
    if ok.any():
        below = np.clip(values[ok] - low[ok], 0, None)
        above = np.clip(high[ok] - values[ok], 0, None)
        ax.errorbar(x[ok], values[ok], yerr=[below, above], fmt="none", ecolor="black", capsize=3, lw=1)  # type: ignore[attr-defined]


def render_charts(report: EvaluationReport, out_dir: Path) -> list[Path]:
    """Bar charts of every metric by group per attribute (image metrics, then AUC per label)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    if report.quality is not None:
        attributes = list(next(iter(report.quality.equity.values()), {}))
        titles = _image_titles(report)
        for metric in report.quality.metric_names:
            paths.append(_bar_chart(report.quality, metric, titles[metric], attributes, out_dir / f"{metric}.png"))
    if report.clinical is not None:
        analysis = report.clinical.analysis
        attributes = list(next(iter(analysis.equity.values()), {}))
        for label in analysis.metric_names:
            title = f"AUC of {label} ({report.clinical.classifier} classifier)"
            paths.append(_bar_chart(analysis, label, title, attributes, out_dir / f"auc_{label}.png", chance=0.5))
    return paths


def render_sample_grids(
    real: np.ndarray,
    generated: np.ndarray,
    groups: pd.DataFrame,
    attributes: Mapping[str, Sequence[str]],
    per_group: int,
    out_dir: Path,
) -> dict[str, Path]:
    """One PNG per attribute: a row per group, its first real images beside their generated ones."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tile = 1.1 if real.shape[1] <= 128 else 1.4
    paths = {}
    for attribute, names in attributes.items():
        figure = Figure(figsize=(tile * (2 * per_group + 1), tile * len(names) + 0.5), layout="constrained")
        axes = figure.subplots(len(names), 2 * per_group + 1, squeeze=False)
        for row, group in enumerate(names):
            members = np.flatnonzero(groups[attribute].to_numpy() == group)[:per_group]
            for column in range(2 * per_group + 1):
                ax = axes[row, column]
                ax.set_xticks([])
                ax.set_yticks([])
                ax.set_frame_on(False)
                if column == per_group:
                    continue  # a gap between the real and the generated halves
                index = column if column < per_group else column - per_group - 1
                if index >= len(members):
                    continue
                source = real if column < per_group else generated
                ax.imshow(source[members[index]], interpolation="nearest")
                if row == 0:
                    ax.set_title("real" if column < per_group else "generated", fontsize=8)
            axes[row, 0].set_ylabel(f"{group}\n(n={int((groups[attribute] == group).sum())})", fontsize=8)
            axes[row, 0].yaxis.set_visible(True)
        figure.suptitle(
            f"{attribute}: real test images (left) and images generated from their prompts (right)", fontsize=9
        )
        path = out_dir / f"grid_{attribute}.png"
        figure.savefig(path, dpi=100)
        paths[attribute] = path
    return paths


# --- HTML -----------------------------------------------------------------------------------------

_STYLE = """
body{font-family:system-ui,-apple-system,sans-serif;margin:2em auto;color:#1b1b1b;max-width:1200px;padding:0 1em}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.8em;border-bottom:1px solid #ccc}h3{font-size:1em}
table{border-collapse:collapse;margin:.5em 0;font-size:.85em}td,th{border:1px solid #ccc;padding:3px 7px;
text-align:left;vertical-align:top}th{background:#f3f3f3}td.small{background:#fff3cd}
.warn{background:#fff3cd;border:1px solid #e0c36a;padding:.5em 1em}img{max-width:100%}
dt{font-weight:600;margin-top:.5em}code{font-size:.9em}.muted{color:#666;font-size:.85em}
"""


def _html_table(headers: Sequence[str], rows: Sequence[Sequence[str]], small_column: int | None = None) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = []
    for row in rows:
        cells = []
        for index, cell in enumerate(row):
            css = ' class="small"' if small_column == index and "⚑" in cell else ""
            cells.append(f"<td{css}>{html.escape(cell)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _code_spans(escaped: str) -> str:
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", escaped)


def _embed(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<p><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"></p>'


def _worst_groups(analysis: SliceAnalysis, metric: str) -> str:
    worst = analysis.worst_groups(metric)
    return ", ".join(f"{a}: <b>{html.escape(g or '–')}</b>" for a, g in worst.items())


def render_html(report: EvaluationReport, charts: Sequence[Path], grids: Mapping[str, Path]) -> str:
    """The self-contained HTML page (charts and grids embedded as PNG data)."""
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>Evaluation ({html.escape(report.extractor)})</title><style>{_STYLE}</style></head><body>",
        f"<h1>Evaluation of {report.num_images} generated images ({html.escape(report.extractor)} features)</h1>",
        f"<p class='warn'>{_code_spans(html.escape(_extractor_warning(report)))}</p>",
    ]
    quality = report.quality
    if quality is not None:
        titles = _image_titles(report)
        level = _level(report)
        parts.append("<h2>Summary</h2><ul>")
        for metric in quality.metric_names:
            overall = _with_ci(quality.slices[OVERALL][metric], quality.intervals.get(OVERALL, {}).get(metric))
            parts.append(
                f"<li>{html.escape(titles[metric])} overall: <b>{overall}</b> ({METRIC_DIRECTION.get(metric, '')}); "
                f"worst-off groups: {_worst_groups(quality, metric)}</li>"
            )
        if report.clinical is not None:
            for label in report.clinical.analysis.metric_names:
                auc = report.clinical.analysis.slices[OVERALL][label]
                bounds = report.clinical.analysis.intervals.get(OVERALL, {}).get(label)
                parts.append(
                    f"<li>AUC {html.escape(label)} overall: <b>{_with_ci(auc, bounds)}</b>; worst-off groups: "
                    f"{_worst_groups(report.clinical.analysis, label)}</li>"
                )
        parts += [f"<li>{html.escape(line)}</li>" for line in reference_lines(report)]
        flagged = quality.small_slices
        parts.append(
            f"<li>{len(quality.slices)} slices; {len(flagged)} flagged ⚑ with fewer than "
            f"{report.protocol.get('min_slice_size')} images.</li></ul>"
        )
        if report.baseline is not None:
            parts.append(_baseline_html(report.baseline))
        if report.fidelity is not None:
            parts.append(f"<h2>{_code_spans(html.escape(_fidelity_title(report.fidelity)))}</h2>")
            parts.append(f"<p class='muted'>{html.escape(FIDELITY_NOTE)}</p>")
            parts.append(_html_table(*_fidelity_attribute_rows(report.fidelity)))
            parts.append(_html_table(*_fidelity_group_rows(report.fidelity)))
        parts.append(f"<h2>Equity (full sample sizes, {level} intervals)</h2>")
        parts.append(_html_table(*_equity_rows(quality, titles, report.fidelity)))
        if quality.matched:
            parts.append("<h2>Equity at matched sample size</h2>")
            parts.append("<p class='muted'>FID depends on sample size; compare groups here.</p>")
            parts.append(_html_table(*_matched_rows(quality, titles)))
        image_charts = [c for c in charts if not c.stem.startswith("auc_")]
        if image_charts:
            parts.append("<h2>Image quality by group</h2>")
            parts += [_embed(c, c.stem) for c in image_charts]
        parts.append(f"<h2>Every slice ({level} intervals; ⚑ small slice)</h2>")
        headers, rows = _slice_rows(quality, titles)
        parts.append(_html_table(headers, rows, small_column=1))
    if report.clinical is not None:
        clinical = report.clinical
        auc_titles = {label: f"AUC {label}" for label in clinical.classes}
        parts.append("<h2>Clinical semantics</h2>")
        parts.append(
            f"<p>A <code>{html.escape(clinical.classifier)}</code> classifier trained for {clinical.epochs} epochs on "
            f"{clinical.train_images} generated images with the labels their prompts asked for, tested on "
            f"{clinical.test_images} real test images. Classes: "
            + "; ".join(f"{html.escape(k)}: {html.escape(', '.join(v))}" for k, v in clinical.classes.items())
            + "</p>"
        )
        if clinical.real_trained_auc:
            parts.append(f"<p>{html.escape(ceiling_sentence(clinical))}</p>")
        parts.append(_html_table(*_equity_rows(clinical.analysis, auc_titles)))
        headers, rows = _slice_rows(clinical.analysis, auc_titles)
        parts.append(_html_table(headers, rows, small_column=1))
        parts += [_embed(c, c.stem) for c in charts if c.stem.startswith("auc_")]
    if grids:
        parts.append("<h2>Sample grids</h2>")
        parts += [_embed(path, f"grid {attribute}") for attribute, path in grids.items()]
    parts.append("<h2>Definitions</h2><dl>")
    parts += [f"<dt>{html.escape(term)}</dt><dd>{html.escape(text)}</dd>" for term, text in DEFINITIONS]
    parts.append("</dl><h2>Protocol</h2>")
    parts.append(_html_table(["key", "value"], _protocol_rows(report)))
    parts.append("</body></html>")
    return "\n".join(parts)


# --- writing ---------------------------------------------------------------------------------------


def render_report_files(report: EvaluationReport, out_dir: Path, grid_dir: Path | None = None) -> dict[str, Path]:
    """Write ``evaluation.json``, ``evaluation.md``, ``report.html`` and ``charts/`` for a report.

    Args:
        report: The evaluation (fresh, or read back from MLflow).
        out_dir: Folder to write to.
        grid_dir: Where the report's grid PNGs are (``report.grids`` holds paths relative
            to it); default ``out_dir``.

    Returns:
        Name -> written file.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    grid_root = grid_dir or out_dir
    grids = {a: grid_root / p for a, p in report.grids.items() if (grid_root / p).is_file()}
    if grid_root != out_dir:
        for attribute, path in list(grids.items()):
            target = out_dir / report.grids[attribute]
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
            grids[attribute] = target
    charts = render_charts(report, out_dir / "charts")
    files = {
        "json": out_dir / "evaluation.json",
        "markdown": out_dir / "evaluation.md",
        "html": out_dir / "report.html",
    }
    files["json"].write_text(json.dumps(report.to_dict(), indent=2))
    files["markdown"].write_text(render_markdown(report, [str(c.relative_to(out_dir)) for c in charts]))
    files["html"].write_text(render_html(report, charts, grids))
    return files


def write_report(
    report: EvaluationReport,
    out_dir: Path,
    real: np.ndarray,
    generated: np.ndarray,
    groups: pd.DataFrame,
    attributes: Mapping[str, Sequence[str]],
    config: EvaluationConfig,
) -> EvaluationReport:
    """Render the sample grids and every report file into ``out_dir``; returns the report with its grids."""
    grids = render_sample_grids(real, generated, groups, attributes, config.grid_images_per_group, out_dir / "grids")
    report = replace(report, grids={a: str(p.relative_to(out_dir)) for a, p in grids.items()})
    render_report_files(report, out_dir)
    return report
