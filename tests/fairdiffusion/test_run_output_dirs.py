"""Per-run output folders (the deployment's ``per_run_outputs``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fairdiffusion.config import PipelineConfig, parse_config, with_run_output_dirs
from fairdiffusion.errors import ConfigError


def test_training_and_evaluation_write_under_the_run_key_and_the_cache_stays_shared() -> None:
    config = parse_config({"training": {"output_dir": "out/train"}, "evaluation": {"output_dir": "out/eval"}})
    run = with_run_output_dirs(config, "5f0c")
    assert run.training.output_dir == Path("out/train/5f0c")
    assert run.evaluation.output_dir == Path("out/eval/5f0c")
    assert run.evaluation.cache_dir == Path("out/eval/cache")
    assert config.training.output_dir == Path("out/train"), "the original is unchanged"
    assert run.model_dump(exclude={"training", "evaluation"}) == config.model_dump(exclude={"training", "evaluation"})


def test_a_configured_cache_folder_is_kept() -> None:
    config = parse_config({"evaluation": {"cache_dir": "/shared/cache"}})
    assert with_run_output_dirs(config, "r").evaluation.cache_dir == Path("/shared/cache")


@pytest.mark.parametrize("key", ["", "a/b", ".."])
def test_a_run_key_must_be_one_folder_name(key: str) -> None:
    with pytest.raises(ConfigError, match="one folder name"):
        with_run_output_dirs(PipelineConfig(), key)
