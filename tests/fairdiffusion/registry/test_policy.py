"""Tests for the gate policy file: parsing, hashing and readable errors."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from fairdiffusion.errors import ConfigError
from fairdiffusion.registry.policy import PolicyError, check_fidelity_attributes, load_policy, threshold_for

REPO = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize("name", ["demo.yaml", "production.yaml"])
def test_shipped_policies_parse_and_hash(name: str) -> None:
    path = REPO / "policies" / name
    policy, digest = load_policy(path)
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    assert policy.absolute.min_slice_size >= 1


def test_per_attribute_thresholds() -> None:
    assert threshold_for({"race": 15.0}, "race") == 15.0
    assert threshold_for({"race": 15.0}, "gender") is None
    assert threshold_for(20.0, "gender") == 20.0


def test_policy_errors_name_the_file_and_key(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(PolicyError, match="nope.yaml: cannot be read"):
        load_policy(missing)
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: [unclosed\n")
    with pytest.raises(PolicyError, match="broken.yaml: not valid YAML"):
        load_policy(broken)
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "name: x\nabsolute: {min_slice_size: 0, max_es_fid: 1, max_group_fid_gap: 1, typo: 3}\n"
        "non_regression: {fid_overall: 0.1, es_fid: 0.1}\n"
    )
    with pytest.raises(PolicyError) as error:
        load_policy(bad)
    assert "absolute.min_slice_size" in str(error.value) and "absolute.typo" in str(error.value)


def test_a_rule_left_out_is_an_error_not_a_silent_default(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text("name: x\nabsolute: {min_slice_size: 3}\nnon_regression: {fid_overall: 0.1, es_fid: 0.1}\n")
    with pytest.raises(PolicyError, match="absolute.max_es_fid"):
        load_policy(path)


def test_latin1_policy_is_a_policy_error(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes("name: caf\u00e9\n".encode("latin-1"))
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    assert str(info.value) == f"gate policy {path}: not UTF-8 text (byte 0xe9 at position 9); save it as UTF-8"


@pytest.mark.parametrize("name", ["demo.yaml", "production.yaml"])
def test_shipped_policies_turn_the_fidelity_rule_on(name: str) -> None:
    policy, _ = load_policy(REPO / "policies" / name)
    assert policy.fidelity.min_group_fidelity is not None and policy.fidelity.min_margin_retained is not None


def test_a_fidelity_rule_naming_an_attribute_the_data_lacks_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(
        "name: x\nabsolute: {min_slice_size: 3, max_es_fid: null, max_group_fid_gap: null}\n"
        "non_regression: {fid_overall: 0.1, es_fid: 0.1}\n"
        "fidelity: {min_group_fidelity: {race: 0.8, skin_tone: 0.8}}\n"
    )
    with pytest.raises(ConfigError) as error:
        check_fidelity_attributes(path, ["race", "gender", "cdr_status"])
    assert "fidelity.min_group_fidelity names skin_tone" in str(error.value) and str(path) in str(error.value)
    check_fidelity_attributes(path, ["race", "skin_tone"])  # both columns present: fine
    unreadable = tmp_path / "broken.yaml"
    unreadable.write_text("name: [unclosed\n")
    check_fidelity_attributes(unreadable, ["race"])  # left to the gate, which rejects naming why
