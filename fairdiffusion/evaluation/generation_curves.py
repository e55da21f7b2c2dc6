"""Each group's curves over self-consuming generations: one PNG per metric, one line per group."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol


class _Generation(Protocol):
    @property
    def generation(self) -> int: ...

    @property
    def groups(self) -> dict[str, dict[str, float]]: ...


def plot_generation_curves(
    summaries: Sequence[_Generation], metrics: Sequence[str], out_dir: Path, attribute: str | None = None
) -> list[Path]:
    """Writes ``generations_<metric>.png`` in ``out_dir``; returns the paths.

    Args:
        summaries: One per generation, with ``groups``: slice name -> metric -> value.
        metrics: The metrics to plot (e.g. ``fid``, ``recall``, ``diversity``).
        out_dir: Where the PNGs go (created).
        attribute: Only this attribute's groups (``race`` plots ``race/*``) and ``overall``;
            ``None``: every slice, one panel per attribute.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    out_dir.mkdir(parents=True, exist_ok=True)
    names = list(summaries[0].groups) if summaries else []
    attributes = sorted({n.split("/")[0] for n in names if "/" in n})
    if attribute is not None:
        attributes = [attribute]
    written = []
    for metric in metrics:
        figure, axes = plt.subplots(1, len(attributes), figsize=(4 * len(attributes), 3), squeeze=False)
        for axis, current in zip(axes[0], attributes, strict=True):
            for name in (n for n in names if n == "overall" or n.startswith(f"{current}/")):
                points = [(s.generation, s.groups[name][metric]) for s in summaries]
                style = {"color": "black", "linestyle": "--"} if name == "overall" else {}
                axis.plot(*zip(*points, strict=True), marker="o", label=name, **style)
            axis.set(title=current, xlabel="generation", ylabel=metric)
            axis.xaxis.set_major_locator(MaxNLocator(integer=True))
            axis.legend(fontsize="small")
        path = out_dir / f"generations_{metric}.png"
        figure.tight_layout()
        figure.savefig(path)
        plt.close(figure)
        written.append(path)
    return written
