"""Each group's curves over generations: one PNG per metric with one line per group of each attribute."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from fairdiffusion.evaluation.generation_curves import plot_generation_curves


@dataclass(frozen=True)
class _Summary:
    generation: int
    groups: dict[str, dict[str, float]]


def test_one_png_per_metric_with_a_panel_per_attribute(tmp_path: Path) -> None:
    summaries = [
        _Summary(
            g, {"overall": {"recall": 0.9}, "race/Asian": {"recall": 0.9 - 0.2 * g}, "gender/Male": {"recall": 0.8}}
        )
        for g in range(3)
    ]
    paths = plot_generation_curves(summaries, ["recall"], tmp_path / "out")
    assert [p.name for p in paths] == ["generations_recall.png"]
    with Image.open(paths[0]) as image:
        assert image.size[0] > image.size[1]  # two panels side by side: gender and race
    only_race = plot_generation_curves(summaries, ["recall"], tmp_path / "race", attribute="race")
    with Image.open(only_race[0]) as image:
        assert image.size[0] < 2 * image.size[1]
