"""Plots of the fairness benchmark: per-group loss curves, the loss-gap trajectory, sigma trajectories.

Each run's training history is a list of per-log-step records (``step``, ``group_losses``
keyed ``<attribute>/<group>``, and the ``sigma`` in force, ``None`` outside FBP).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _smooth(values: np.ndarray, width: int = 5) -> np.ndarray:
    if len(values) < width:
        return values
    kernel = np.ones(width)
    filled = np.nan_to_num(values, nan=np.nanmean(values))
    # Divided by the window actually covered, so the ends are not pulled towards 0.
    return np.convolve(filled, kernel, mode="same") / np.convolve(np.ones_like(filled), kernel, mode="same")


def _series(history: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    steps = np.array([r["step"] for r in history], dtype=float)
    values = np.array([r["group_losses"].get(key, np.nan) for r in history], dtype=float)
    return steps, values


def _groups(history: list[dict], attribute: str) -> list[str]:
    keys = {k for r in history for k in r["group_losses"] if k.startswith(f"{attribute}/")}
    return sorted(keys)


def plot_group_losses(runs: dict, attribute: str, out: Path) -> Path:
    """One panel per arm (first seed): each group's smoothed training loss over steps."""
    arms = list(runs)
    figure, axes = plt.subplots(1, len(arms), figsize=(3.2 * len(arms), 3), sharey=True, squeeze=False)
    for axis, arm in zip(axes[0], arms, strict=True):
        history = next(iter(runs[arm].values()))["history"]
        for key in _groups(history, attribute):
            steps, values = _series(history, key)
            axis.plot(steps, _smooth(values), label=key.split("/", 1)[1])
        axis.set_title(arm)
        axis.set_xlabel("step")
    axes[0][0].set_ylabel("training loss (smoothed)")
    axes[0][-1].legend(fontsize=7)
    return _save(figure, out / f"loss_by_{attribute}_group.png")


def plot_gap(runs: dict, attribute: str, out: Path) -> Path:
    """The largest per-group loss gap of ``attribute`` over steps, mean over seeds, per arm."""
    figure, axis = plt.subplots(figsize=(6, 3.5))
    for arm, by_seed in runs.items():
        curves = []
        for run in by_seed.values():
            history = run["history"]
            stacked = np.stack([_series(history, k)[1] for k in _groups(history, attribute)])
            curves.append(np.nanmax(stacked, axis=0) - np.nanmin(stacked, axis=0))
        steps = _series(next(iter(by_seed.values()))["history"], "")[0]
        axis.plot(steps, _smooth(np.mean(curves, axis=0)), label=arm)
    axis.set_xlabel("step")
    axis.set_ylabel(f"{attribute} loss gap (max - min group)")
    axis.legend(fontsize=7)
    return _save(figure, out / f"loss_gap_{attribute}.png")


def plot_sigma(runs: dict, out: Path) -> Path | None:
    """Each FBP arm's sigma in force over steps (first seed), one line per group."""
    fbp = {arm: next(iter(s.values())) for arm, s in runs.items() if next(iter(s.values()))["history"][0]["sigma"]}
    if not fbp:
        return None
    figure, axes = plt.subplots(1, len(fbp), figsize=(3.2 * len(fbp), 3), sharey=True, squeeze=False)
    for axis, (arm, run) in zip(axes[0], fbp.items(), strict=True):
        steps = np.array([r["step"] for r in run["history"]])
        sigma = np.array([r["sigma"] for r in run["history"]], dtype=float)
        for index, name in enumerate(run["sigma_names"]):
            axis.plot(steps, sigma[:, index], label=name, linewidth=1)
        axis.set_title(arm)
        axis.set_xlabel("step")
    axes[0][0].set_ylabel("sigma in force")
    axes[0][-1].legend(fontsize=6)
    return _save(figure, out / "sigma.png")


def _save(figure: plt.Figure, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def plot_histories(runs: dict, attribute: str, out: Path) -> list[Path]:
    """Every plot of the benchmark, written under ``out``; returns their paths."""
    paths = [plot_group_losses(runs, attribute, out), plot_gap(runs, attribute, out), plot_sigma(runs, out)]
    return [p for p in paths if p is not None]
