"""Tests for the typed pipeline configuration."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from fairdiffusion.config import (
    FAIRGENMED_ATTRIBUTES,
    PipelineConfig,
    TrackingConfig,
    TrainingConfig,
    config_to_dict,
    load_config,
    parse_config,
)
from fairdiffusion.errors import ConfigError

VALID = {
    "data": {"path": "some/data", "train_splits": ["train"], "test_split": "test", "max_subjects_per_split": 3},
    "validation": {"min_group_count": 2, "image_shape": [32, 32]},
    "training": {"method": "baseline", "max_steps": 4, "learning_rate": 0.001},
    "evaluation": {"extractor": {"name": "randcnn", "dim": 16}},
    "gate": {"policy": "policies/strict.yaml", "require_approval": True},
}


def write_yaml(path: Path, document: object) -> Path:
    path.write_text(yaml.safe_dump(document))
    return path


def test_load_valid_config(tmp_path: Path) -> None:
    config = load_config(write_yaml(tmp_path / "ok.yaml", VALID))
    assert isinstance(config, PipelineConfig)
    assert config.data.path == Path("some/data")
    assert config.data.train_splits == ["train"] and config.data.max_subjects_per_split == 3
    assert config.validation.image_shape == (32, 32) and config.validation.min_group_count == 2
    assert config.training.method == "baseline" and config.training.max_steps == 4
    assert config.evaluation.extractor.name == "randcnn" and config.evaluation.extractor.dim == 16
    assert config.gate.policy == Path("policies/strict.yaml") and config.gate.require_approval is True
    # Omitted keys take their defaults.
    assert config.training.fbp.time_window == 30
    assert config.data.attributes == FAIRGENMED_ATTRIBUTES
    assert config_to_dict(config)["validation"]["image_shape"] == [32, 32]


def test_bundled_demo_config_loads() -> None:
    config = load_config(Path(__file__).resolve().parents[2] / "configs" / "demo.yaml")
    assert config.evaluation.extractor.name == "domain" and config.model.dvc_file == Path("base-model.dvc")


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert load_config(path) == PipelineConfig()


@pytest.mark.parametrize(
    ("document", "key", "fragment"),
    [
        ({"training": {"max_step": 4}}, "training.max_step", "Extra inputs are not permitted"),
        ({"bogus_section": {}}, "bogus_section", "Extra inputs are not permitted"),
        ({"training": {"max_steps": "many"}}, "training.max_steps", "integer"),
        ({"training": {"max_steps": 0}}, "training.max_steps", "greater than or equal to 1"),
        ({"training": {"method": "magic"}}, "training.method", "'fair', 'baseline', 'reweight' or 'balanced'"),
        ({"evaluation": {"extractor": {"dim": "x"}}}, "evaluation.extractor.dim", "integer"),
        ({"validation": {"image_shape": [32]}}, "validation.image_shape", ""),
        ({"data": {"attributes": {"race": ["Asian"]}}}, "data.attributes", "two or more distinct groups"),
    ],
)
def test_bad_key_or_value_names_the_dotted_key(tmp_path: Path, document: dict, key: str, fragment: str) -> None:
    path = write_yaml(tmp_path / "bad.yaml", document)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert str(path) in message
    assert f"  - {key}" in message
    assert fragment in message


def test_every_bad_key_is_reported_at_once(tmp_path: Path) -> None:
    path = write_yaml(tmp_path / "bad.yaml", {"training": {"max_steps": "x", "batch_size": 0}, "gate": {"typo": 1}})
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    for key in ("training.max_steps", "training.batch_size", "gate.typo"):
        assert key in message


def test_test_split_inside_train_splits(tmp_path: Path) -> None:
    path = write_yaml(tmp_path / "overlap.yaml", {"data": {"train_splits": ["train", "test"], "test_split": "test"}})
    with pytest.raises(ConfigError, match=r"data\.test_split 'test' is also a training split"):
        load_config(path)


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="configuration file not found") as info:
        load_config(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "42\n"])
def test_non_mapping_yaml(tmp_path: Path, text: str) -> None:
    path = tmp_path / "list.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(path)


def test_unparsable_yaml(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("training: {max_steps: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)


def test_relative_sqlite_uri_is_made_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    uri = TrackingConfig(tracking_uri="sqlite:///outputs/mlflow.db").resolved_tracking_uri()
    assert uri == f"sqlite:///{(tmp_path / 'outputs' / 'mlflow.db').resolve()}"
    assert uri.startswith("sqlite:////")


def test_absolute_and_non_sqlite_uris_are_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert TrackingConfig(tracking_uri="sqlite:////abs/x.db").resolved_tracking_uri() == "sqlite:////abs/x.db"
    assert TrackingConfig(tracking_uri="http://mlflow:5000").resolved_tracking_uri() == "http://mlflow:5000"


def test_environment_tracking_uri_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.example:5000")
    assert TrackingConfig().resolved_tracking_uri() == "http://tracking.example:5000"
    # A relative sqlite URI from the environment is made absolute too.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///env.db")
    assert TrackingConfig().resolved_tracking_uri() == f"sqlite:///{(tmp_path / 'env.db').resolve()}"


@pytest.mark.parametrize(
    ("old", "value", "new"),
    [
        ("fair_time_window", 30, "training.fbp.time_window"),
        ("fair_exploitation_rate", 0.95, "training.fbp.exploitation_rate"),
        ("ucb_beta", 0.1, "training.fbp.ucb_beta"),
        ("fair_fit_lag", 1, "training.fbp.fit_lag"),
        ("fair_warn_windows", 5, "training.fbp.warn_windows"),
        ("validation_every", 10, "training.sampling.every"),
        ("validation_images_per_group", 2, "training.sampling.images_per_group"),
        ("validation_inference_steps", 20, "training.sampling.inference_steps"),
    ],
)
def test_a_moved_training_key_names_its_new_place(tmp_path: Path, old: str, value: object, new: str) -> None:
    path = write_yaml(tmp_path / "old.yaml", {"training": {"max_steps": 4, old: value}})
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value)
    assert f"training.{old} moved to {new}" in str(info.value)


def test_every_moved_key_is_reported_at_once_and_in_python_too() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"training": {"fair_time_window": 2, "validation_every": 5}}, source="old.yaml")
    assert "training.fair_time_window moved to training.fbp.time_window" in str(info.value)
    assert "training.validation_every moved to training.sampling.every" in str(info.value)
    with pytest.raises(ValueError, match="training.fair_fit_lag moved to training.fbp.fit_lag"):
        TrainingConfig(fair_fit_lag=1)


def test_fbp_and_sampling_sections() -> None:
    training = parse_config(
        {"training": {"fbp": {"time_window": 4, "fit_lag": 3}, "sampling": {"every": 2, "images_per_group": 1}}}
    ).training
    assert (training.fbp.time_window, training.fbp.fit_lag, training.fbp.exploitation_rate) == (4, 3, 0.95)
    assert (training.sampling.every, training.sampling.images_per_group, training.sampling.inference_steps) == (
        2,
        1,
        20,
    )
    with pytest.raises(ConfigError, match=r"training\.fbp: .*fit_lag 4 must be below time_window 4"):
        parse_config({"training": {"fbp": {"time_window": 4, "fit_lag": 4}}})


def test_the_renamed_ci_method_names_the_key_and_its_new_value(tmp_path: Path) -> None:
    path = write_yaml(tmp_path / "old.yaml", {"evaluation": {"ci_method": "bias_corrected"}})
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert str(path) in message
    assert "  - evaluation.ci_method: 'bias_corrected' was renamed 'bias_shifted_percentile'" in message
    assert "not Efron's BC or BCa" in message and "Value error" not in message
    for value in ("bias_shifted_percentile", "percentile", "bca"):
        assert parse_config({"evaluation": {"ci_method": value}}).evaluation.ci_method == value
    assert PipelineConfig().evaluation.ci_method == "bias_shifted_percentile"
