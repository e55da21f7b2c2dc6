"""``fairdiffusion generations``: arguments, the flow it starts, and its ``--json`` summary."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fairdiffusion.cli import main
from fairdiffusion.registry.generations import GenerationSummary


def _exit_code(args: list[str]) -> int:
    with pytest.raises(SystemExit) as done:
        main(args)
    return int(done.value.code or 0)


def test_an_unknown_regime_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("{}\n")
    assert _exit_code(["generations", "-c", str(config), "--regime", "bogus"]) == 2
    assert "synthetic-only, augment, fresh" in capsys.readouterr().err


def test_the_verb_runs_the_flow_and_writes_the_summaries(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import flows.generations

    calls = []
    summary = GenerationSummary(0, "r0", None, "fresh", 0.0, {"overall": {"fid": 1.0}}, True)

    def fake_flow(config_path: str, generations: int, regime: str) -> list[GenerationSummary]:
        calls.append((config_path, generations, regime))
        return [summary]

    monkeypatch.setattr(flows.generations, "fairdiffusion_generations", fake_flow)
    config, out = tmp_path / "c.yaml", tmp_path / "out.json"
    config.write_text("{}\n")
    args = ["generations", "-c", str(config), "--generations", "4", "--regime", "fresh", "--json", str(out)]
    assert _exit_code(args) == 0
    assert calls == [(str(config), 4, "fresh")]
    assert json.loads(out.read_text())[0]["run_id"] == "r0"
