"""Tests of the ``fairdiffusion`` console script, run as a user runs it (a subprocess)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

CLI = Path(sys.executable).with_name("fairdiffusion")
ATTRIBUTE_KEYS = {
    "subject",
    "patient_id",
    "split",
    "image_path",
    "prompt",
    "race",
    "gender",
    "ethnicity",
    "source",
    "generated_by",
}


def run_cli(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = os.environ | {"TOKENIZERS_PARALLELISM": "false", "DO_NOT_TRACK": "1"}
    return subprocess.run(
        [str(CLI), *map(str, args)], cwd=cwd, capture_output=True, text=True, env=env, timeout=120, check=False
    )


@pytest.fixture
def config_file(tmp_path: Path, demo_min_group_count: int) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(f"validation:\n  min_group_count: {demo_min_group_count}\n  image_shape: [32, 32]\n")
    return path


def test_console_script_is_installed() -> None:
    assert CLI.is_file(), f"{CLI} missing: install the package (pip install -e .)"


def test_validate_clean_dataset(valid_dataset: Path, config_file: Path, tmp_path: Path) -> None:
    done = run_cli("validate", valid_dataset, "--config", config_file, "--docs", tmp_path / "docs", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "validation passed" in done.stdout
    assert "on 80 subjects" in done.stdout
    assert f"Data Docs: {tmp_path / 'docs' / 'index.html'}" in done.stdout
    assert "fairdiffusion.samples" in (tmp_path / "docs" / "index.html").read_text()


def test_validate_corrupted_dataset(copy_dataset: Path, config_file: Path, tmp_path: Path) -> None:
    bad = sorted((copy_dataset / "train").glob("data_*.npz"))[1]
    bad.write_bytes(b"garbage, not an npz archive")
    done = run_cli("validate", copy_dataset, "--config", config_file, cwd=tmp_path)
    assert done.returncode != 0
    assert "validation FAILED" in done.stderr
    assert "Traceback" not in done.stderr and "Traceback" not in done.stdout
    assert str(bad) in done.stderr  # the file
    assert bad.stem in done.stderr  # the subject
    assert "every file can be found and read" in done.stderr  # the rule
    assert "image decodes" in done.stderr


def test_data_show_json(valid_dataset: Path, config_file: Path, tmp_path: Path) -> None:
    done = run_cli("data", "show", valid_dataset, "--json", "--config", config_file, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 80
    records = [json.loads(line) for line in lines]
    assert all(set(record) == ATTRIBUTE_KEYS for record in records)
    assert {r["split"] for r in records} == {"train", "val", "test"}
    assert {r["race"] for r in records} == {"Asian", "Black", "White"}
    first = records[0]
    assert first["subject"] == "data_00001"
    assert first["prompt"].startswith(f"SLO fundus image of a {first['race']} {first['gender']} {first['ethnicity']} ")


def test_bad_config_is_one_message(valid_dataset: Path, tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("training:\n  max_steps: lots\n")
    done = run_cli("validate", valid_dataset, "--config", config, cwd=tmp_path)
    assert done.returncode == 1
    assert done.stderr.startswith("error: ")
    assert "training.max_steps" in done.stderr and "Traceback" not in done.stderr


def test_missing_dataset_folder_is_one_message(config_file: Path, tmp_path: Path) -> None:
    done = run_cli("data", "show", tmp_path / "absent", "--json", "--config", config_file, cwd=tmp_path)
    assert done.returncode == 1
    assert "dataset folder not found" in done.stderr and str(tmp_path / "absent") in done.stderr
    assert "Traceback" not in done.stderr


def test_data_show_ham10000_lists_the_table_and_exclusions(ham10000_dataset: Path, tmp_path: Path) -> None:
    root = Path(shutil.copytree(ham10000_dataset, tmp_path / "HAM10000"))
    metadata = root / "HAM10000_metadata.csv"
    metadata.write_text(metadata.read_text().replace(",male,", ",unknown,", 1))
    done = run_cli("data", "show", root, "--format", "ham10000", "--json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in done.stdout.strip().splitlines()]
    assert len(records) == 159 and {"sex", "age_group", "prompt", "image_path"} <= set(records[0])
    assert records[0]["prompt"].startswith(f"Dermoscopic image of a {records[0]['sex']} ")
    assert "1 row(s) excluded: unknown sex ('unknown')" in done.stderr
    text = run_cli("data", "show", root, "--format", "ham10000", cwd=tmp_path)
    assert "159 subjects" in text.stdout and "1 row(s) excluded" in text.stdout


def test_validate_chexpert_with_format(chexpert_dataset: Path, tmp_path: Path) -> None:
    done = run_cli("validate", chexpert_dataset, "--format", "chexpert", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "validation passed" in done.stdout and "on 200 subjects" in done.stdout


def test_demo_prints_a_skip_clearly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """A rerun with nothing changed says it skipped, why, and how to retrain anyway."""
    import flows.pipeline
    from fairdiffusion import cli
    from fairdiffusion.registry import schema
    from fairdiffusion.registry.lineage import PromotionOutcome

    reason = "data (md5 6b5ef68bcbaf) and config (sha256 0123456789ab) are those champion v1 was trained on"
    calls = []

    def fake_pipeline(config_path: str, force: bool) -> PromotionOutcome:
        calls.append(force)
        return PromotionOutcome(
            model_name="fairdiffusion",
            version="1",
            promoted=False,
            passed=False,
            status=schema.STATUS_SKIPPED,
            reasons=[f"{reason}: nothing new to train on"],
            compared_with_version="1",
            run_id="abc123",
            report_path="",
        )

    monkeypatch.setattr(flows.pipeline, "fairdiffusion_pipeline", fake_pipeline)
    config = tmp_path / "config.yaml"
    config.write_text("{}\n")
    cli._run_pipeline(config)
    printed = capsys.readouterr().out
    assert calls == [False]
    assert "Skipped        : nothing trained, nothing registered" in printed
    assert f"  - {reason}: nothing new to train on" in printed
    assert "Champion       : fairdiffusion v1 (unchanged)" in printed
    assert f"{schema.SKIPPED}=true" in printed and "--force" in printed
    assert "Gate decision" not in printed


def test_a_rejected_gate_prints_the_reasons_and_exits_1(monkeypatch, tmp_path: Path, capsys) -> None:
    import typer

    import flows.pipeline
    from fairdiffusion import cli
    from fairdiffusion.registry import schema
    from fairdiffusion.registry.lineage import PromotionOutcome

    def fake_pipeline(config_path: str, force: bool) -> PromotionOutcome:
        return PromotionOutcome(
            model_name="fairdiffusion",
            version="2",
            promoted=False,
            passed=False,
            status=schema.STATUS_REJECTED,
            reasons=["overall FID interval high 4.5 >= base model's FID 4.4"],
            compared_with_version=None,
            run_id="abc123",
            report_path="outputs/eval/evaluation.md",
        )

    monkeypatch.setattr(flows.pipeline, "fairdiffusion_pipeline", fake_pipeline)
    config = tmp_path / "config.yaml"
    config.write_text("{}\n")
    with pytest.raises(typer.Exit) as stopped:
        cli._run_pipeline(config)
    assert stopped.value.exit_code == 1
    printed = capsys.readouterr().out
    assert "Gate decision  : FAILED: not promoted (fairdiffusion v2)" in printed
    assert "  - overall FID interval high 4.5 >= base model's FID 4.4" in printed


def test_a_flow_ending_rejected_prints_the_decision_and_exits_1(call_main, monkeypatch, tmp_path: Path) -> None:
    """The flow's Rejected state raises GateRejected; the CLI prints the outcome it carries, no traceback."""
    import flows.pipeline
    from fairdiffusion.errors import GateRejected
    from fairdiffusion.registry import schema

    def fake_pipeline(config_path: str, force: bool):
        raise GateRejected("gate rejected fairdiffusion v2", _fake_outcome(schema.STATUS_REJECTED))

    monkeypatch.setattr(flows.pipeline, "fairdiffusion_pipeline", fake_pipeline)
    config = tmp_path / "config.yaml"
    config.write_text("{}\n")
    code, out, err = call_main("run", "--config", config)
    assert code == 1 and "Gate decision  : FAILED: not promoted (fairdiffusion v2)" in out
    assert "  - a reason" in out and "Traceback" not in err


def _emptied(root: Path, name: str) -> Path:
    (root / name).write_bytes(b"")
    return root / name


def _latin1_config(root: Path) -> Path:
    path = root / "latin1.yaml"
    path.write_bytes("tracking:\n  model_name: fundus-caf\u00e9\n".encode("latin-1"))
    return path


def _corrupt_workbook(root: Path) -> Path:
    path = root / "CHEXPERT DEMO.xlsx"
    path.write_bytes(path.read_bytes()[:1500])
    return path


@pytest.mark.parametrize(
    "case",
    ["empty data_summary.csv", "empty HAM10000_metadata.csv", "latin-1 config", "corrupt CheXpert xlsx"],
)
def test_bad_input_catalogue(
    case: str, valid_dataset: Path, ham10000_dataset: Path, chexpert_dataset: Path, tmp_path: Path
) -> None:
    """Each reported bad file: exit 1, one line naming the file, no traceback, nothing written."""
    data = tmp_path / "data"
    work = tmp_path / "work"
    work.mkdir()
    if case == "empty data_summary.csv":
        root = Path(shutil.copytree(valid_dataset, data))
        bad, args, expected = _emptied(root, "data_summary.csv"), ["data", "show", root], "empty file"
    elif case == "empty HAM10000_metadata.csv":
        root = Path(shutil.copytree(ham10000_dataset, data))
        bad = _emptied(root, "HAM10000_metadata.csv")
        args, expected = ["data", "show", root, "--format", "ham10000"], "empty file"
    elif case == "latin-1 config":
        bad = _latin1_config(tmp_path)
        args, expected = ["validate", valid_dataset, "--config", bad], "not UTF-8 text (byte 0xe9 at position 34)"
    else:
        root = Path(shutil.copytree(chexpert_dataset, data))
        bad = _corrupt_workbook(root)
        args, expected = ["validate", root, "--format", "chexpert"], "not an intact .xlsx workbook"
    done = run_cli(*args, cwd=work)
    assert done.returncode == 1, done.stderr
    assert done.stderr == f"error: {bad}: {done.stderr.split(': ', 2)[2]}" and done.stderr.count("\n") == 1
    assert expected in done.stderr and "Traceback" not in done.stderr + done.stdout
    assert not any(work.iterdir())  # no outputs/, nothing half-written


def test_audit_model_name_with_quotes(tmp_path: Path) -> None:
    """A quote in --model is searched for as text; a value MLflow cannot search for is one line."""
    from mlflow import MlflowClient

    (tmp_path / "outputs").mkdir()  # the default tracking store, with an audit trail to search
    MlflowClient(f"sqlite:///{tmp_path}/outputs/mlflow.db").create_experiment("fairdiffusion-audit")
    quoted = run_cli("audit", "--history", "--model", "fd'x", cwd=tmp_path)
    assert quoted.returncode == 0, quoted.stderr
    assert "Traceback" not in quoted.stderr + quoted.stdout
    both = tmp_path / "both"
    both.mkdir()
    done = run_cli("audit", "--history", "--model", "fd'\"x", cwd=both)
    assert done.returncode == 1 and done.stderr.startswith("error: model name ")
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr + done.stdout
    assert not any(both.iterdir())


# --- main() itself: exit status 0 success or skip, 1 bad input / failed validation / rejected gate, 2 usage ---

USAGE_ERRORS = {
    "bare invocation": [],
    "bare group": ["data"],
    "unknown verb": ["bogus"],
    "unknown sub-verb": ["data", "bogus"],
    "unknown option": ["audit", "--bogus"],
    "unknown option before the verb": ["--bogus", "audit"],
    "missing argument": ["validate"],
    "missing required option": ["approve", "--version", "3"],
    "option without its value": ["validate", "--format"],
    "bad option value": ["base", "build", "--seed", "abc"],
    "extra argument": ["audit", "extra"],
}


@pytest.fixture
def call_main(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]):
    """``fairdiffusion.cli.main(argv)`` in this process: (exit status, stdout, stderr)."""
    from fairdiffusion import cli

    for name, value in cli_environment().items():
        monkeypatch.setenv(name, value)  # main() only sets defaults; keep this process's environment as it was

    def call(*args: str | Path) -> tuple[int, str, str]:
        with pytest.raises(SystemExit) as stopped:
            cli.main([str(arg) for arg in args])
        captured = capsys.readouterr()
        code = stopped.value.code
        return (code if isinstance(code, int) else 1), captured.out, captured.err

    return call


def cli_environment() -> dict[str, str]:
    return {
        "TOKENIZERS_PARALLELISM": "false",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    }


@pytest.mark.parametrize("args", list(USAGE_ERRORS.values()), ids=list(USAGE_ERRORS))
def test_usage_error_exits_2_without_traceback(args: list[str], call_main) -> None:
    code, out, err = call_main(*args)
    assert code == 2, out + err
    assert "Usage: fairdiffusion" in out + err or "requires an argument" in err  # the latter: typer gives no usage
    assert "Traceback" not in out + err


@pytest.mark.parametrize("args", [["--help"], ["validate", "--help"], ["data", "show", "--help"], ["run", "--help"]])
def test_help_exits_0(args: list[str], call_main) -> None:
    code, out, err = call_main(*args)
    assert code == 0 and "Usage: fairdiffusion" in out and not err


def test_help_names_the_exit_statuses_and_the_default_config(call_main) -> None:
    _, out, _ = call_main("--help")
    assert "Exit status: 0" in out and "2 usage" in out
    assert "library's defaults" in out


def test_version_prints_the_package_version(call_main) -> None:
    from importlib.metadata import version

    assert call_main("--version") == (0, f"fairdiffusion {version('fairdiffusion')}\n", "")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["promote", "--version", "1", "--reason", "why"], "error: promote: the fairness gate decides"),
        (["run", "--config", "absent.yaml"], "error: absent.yaml: configuration file not found"),
    ],
)
def test_bad_input_exits_1_with_one_line(args: list[str], message: str, call_main, monkeypatch, tmp_path) -> None:
    monkeypatch.chdir(tmp_path)
    code, out, err = call_main(*args)
    assert code == 1 and err.startswith(message) and err.count("\n") == 1 and not out


def test_console_script_version_and_usage_error(tmp_path: Path) -> None:
    """The installed entry point behaves as main() does: no traceback, exit 2 for usage."""
    from importlib.metadata import version

    shown = run_cli("--version", cwd=tmp_path)
    assert shown.returncode == 0 and shown.stdout == f"fairdiffusion {version('fairdiffusion')}\n"
    bad = run_cli("audit", "--bogus", cwd=tmp_path)
    assert bad.returncode == 2 and "No such option: --bogus" in bad.stderr
    assert "Traceback" not in bad.stderr + bad.stdout


def test_validate_json(valid_dataset: Path, config_file: Path, call_main) -> None:
    code, out, err = call_main("validate", valid_dataset, "--config", config_file, "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["success"] is True and result["n_subjects"] == 80 and result["failures"] == []
    assert result["data_docs"] is None and "group_counts" in result


def test_validate_json_on_a_failure_exits_1(copy_dataset: Path, config_file: Path, call_main) -> None:
    bad = sorted((copy_dataset / "train").glob("data_*.npz"))[1]
    bad.write_bytes(b"garbage")
    code, out, _ = call_main("validate", copy_dataset, "--config", config_file, "--json")
    result = json.loads(out)
    assert code == 1 and result["success"] is False
    assert any(f["table"] == "images" and str(bad) in " ".join(f["examples"]) for f in result["failures"])


def test_validate_default_config_ignores_the_working_directory(valid_dataset: Path, call_main, monkeypatch, tmp_path):
    """A configs/demo.yaml in the current folder is not the default: the library's defaults are."""
    decoy = tmp_path / "configs" / "demo.yaml"
    decoy.parent.mkdir()
    decoy.write_text("validation:\n  min_group_count: 1000\n  image_shape: [64, 64]\n")
    monkeypatch.chdir(tmp_path)
    code, out, _ = call_main("validate", valid_dataset, "--json")
    failures = json.loads(out)["failed_expectations"]
    # The library's min_group_count (5) fails the fixture's 4 test Asian subjects, and nothing else.
    assert code == 1 and len(failures) == 1
    assert "at least 5 subjects" in failures[0] and "test race=Asian" in failures[0]


def _fake_outcome(status: str):
    from fairdiffusion.registry.lineage import PromotionOutcome

    return PromotionOutcome(
        model_name="fairdiffusion",
        version="2",
        promoted=False,
        passed=status != "rejected",
        status=status,
        reasons=["a reason"],
        compared_with_version="1",
        run_id="abc123",
        report_path="outputs/eval/evaluation.md",
    )


@pytest.mark.parametrize(("verb", "status", "exit_code"), [("run", "rejected", 1), ("demo", "skipped", 0)])
def test_pipeline_json_outcome(verb: str, status: str, exit_code: int, call_main, monkeypatch, tmp_path) -> None:
    """stdout is the outcome alone (what the flow prints goes to stderr); the exit status follows it."""
    import flows.pipeline
    from fairdiffusion.registry import schema

    assert status in {schema.STATUS_REJECTED, schema.STATUS_SKIPPED}

    def fake_pipeline(config_path: str, force: bool):
        print("flow chatter")
        return _fake_outcome(status)

    monkeypatch.setattr(flows.pipeline, "fairdiffusion_pipeline", fake_pipeline)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "demo.yaml").write_text("{}\n")
    args = ["run", "--config", "configs/demo.yaml"] if verb == "run" else ["demo"]
    code, out, err = call_main(*args, "--json")
    outcome = json.loads(out)
    assert code == exit_code and "flow chatter" in err
    assert {k: outcome[k] for k in ("status", "version", "run_id", "passed", "reasons")} == {
        "status": status,
        "version": "2",
        "run_id": "abc123",
        "passed": status != "rejected",
        "reasons": ["a reason"],
    }
    assert outcome["tracking_uri"].startswith("sqlite:///")


def test_approve_json_prints_the_decision_record(call_main, monkeypatch, tmp_path) -> None:
    from types import SimpleNamespace

    from fairdiffusion.registry import promotion

    record = {"model": "fairdiffusion", "version": "2", "decision": "approval", "actor": "alice", "reasons": ["ok"]}
    seen = []

    def fake_approve(tracking, version: str, reason: str, actor: str) -> SimpleNamespace:
        seen.append((tracking.model_name, version, reason, actor))
        return SimpleNamespace(
            model="fairdiffusion", version="2", actor="alice", champion_before="1", to_dict=lambda: record
        )

    monkeypatch.setattr(promotion, "approve_version", fake_approve)
    monkeypatch.chdir(tmp_path)
    code, out, err = call_main("approve", "--version", "2", "--reason", "ok", "--approver", "alice", "--json")
    assert code == 0, err
    printed = json.loads(out)
    # The approval event (its delivery is tested against a real server in test_data_trigger.py).
    assert printed.pop("event")["event"] == "fairdiffusion.model.approved"
    assert printed == record and seen == [("fairdiffusion", "2", "ok", "alice")]
