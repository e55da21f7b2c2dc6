"""Starting training: in this process, or as ``accelerate launch`` / ``torchrun`` processes.

One process on one machine trains in the calling process (no start-up cost: the demo
and single-GPU runs). Otherwise :func:`run_training` writes a launch spec (the resolved
config, the training rows, the MLflow run), starts the launcher as a subprocess with
the configured number of processes, streams its output line by line, and reads back
the main process's :class:`~fairdiffusion.training.results.TrainingResult`. Each process runs
``python -m fairdiffusion.training.launch --spec <file>`` (:func:`main`).

On other machines of a multi-node run, start the same command by hand with that
machine's ``--machine_rank`` / ``--node_rank`` (see the README).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import pandas as pd
import torch

from fairdiffusion import tracking
from fairdiffusion.config import DistributedConfig, PipelineConfig, config_to_dict, parse_config
from fairdiffusion.errors import FairDiffusionError, TrainingError
from fairdiffusion.training.loop import train_unet
from fairdiffusion.training.results import TrainingResult

OutputCallback = Callable[[str], None]


def needs_launcher(distributed: DistributedConfig) -> bool:
    """Whether training needs more than the calling process."""
    return distributed.num_processes * distributed.num_machines > 1


def launch_command(distributed: DistributedConfig, mixed_precision: str, spec: Path) -> list[str]:
    """The command that starts every training process of this machine.

    Args:
        distributed: Process counts, rendezvous address and launcher.
        mixed_precision: ``training.mixed_precision`` (``accelerate launch`` wants it too).
        spec: The launch spec written by :func:`run_training`.
    """
    worker = ["-m", "fairdiffusion.training.launch", "--spec", str(spec)]
    if distributed.launcher == "torchrun":
        return [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={distributed.num_processes}",
            f"--nnodes={distributed.num_machines}",
            f"--node_rank={distributed.machine_rank}",
            f"--master_addr={distributed.main_process_ip}",
            f"--master_port={distributed.main_process_port}",
            *worker,
        ]
    total = distributed.num_processes * distributed.num_machines
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        f"--num_processes={total}",
        f"--num_machines={distributed.num_machines}",
        f"--machine_rank={distributed.machine_rank}",
        f"--main_process_ip={distributed.main_process_ip}",
        f"--main_process_port={distributed.main_process_port}",
        f"--mixed_precision={mixed_precision}",
        "--dynamo_backend=no",
    ]
    if torch.cuda.is_available():
        command.append("--multi_gpu")
    else:
        command.append("--cpu")
    return [*command, *worker]


def _metrics_logger(config: PipelineConfig, run_id: str | None) -> Callable[[dict[str, float], int], None] | None:
    if run_id is None:
        return None
    return lambda metrics, step: tracking.log_metrics(config.tracking, run_id, metrics, step)


def _artifact_logger(config: PipelineConfig, run_id: str | None) -> Callable[[Path, str], None] | None:
    if run_id is None:
        return None
    return lambda folder, path: tracking.log_artifacts(config.tracking, run_id, folder, path)


def run_training(
    samples: pd.DataFrame,
    source: str,
    config: PipelineConfig,
    run_id: str | None,
    on_output: OutputCallback = print,
    extra_env: Mapping[str, str] | None = None,
) -> TrainingResult:
    """Train with the configured number of processes, logging to the MLflow run.

    Args:
        samples: The training rows.
        source: ``model.pretrained`` resolved (:func:`fairdiffusion.models.loading.resolve_pretrained`).
        config: The whole configuration (training, attributes, tracking).
        run_id: MLflow run that metrics and validation grids go to; ``None``: not logged.
        on_output: Receives each line the training processes print.
        extra_env: Variables added to the training processes' environment.

    Raises:
        TrainingError: with the training's own message, or the exit status and the
            last lines of output when the processes died without one.
    """
    training = config.training
    if not needs_launcher(training.distributed):
        return train_unet(
            samples,
            config.data.attributes,
            source,
            training,
            log_metrics=_metrics_logger(config, run_id),
            log_artifact=_artifact_logger(config, run_id),
            allow_download=config.model.allow_download,
        )
    folder = Path(training.output_dir) / "launch"
    folder.mkdir(parents=True, exist_ok=True)
    columns = ["image_path", "prompt", *config.data.attributes]
    samples[columns].to_json(folder / "samples.json", orient="records")
    for stale in ("result.json", "error.json"):
        (folder / stale).unlink(missing_ok=True)
    spec = folder / "spec.json"
    spec.write_text(
        json.dumps({"config": config_to_dict(config), "source": source, "run_id": run_id, "folder": str(folder)})
    )
    command = launch_command(training.distributed, training.mixed_precision, spec)
    on_output("launching: " + " ".join(command))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(extra_env or {})}
    tail: deque[str] = deque(maxlen=40)
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1, env=env
    ) as process:
        assert process.stdout is not None
        for line in process.stdout:
            line = line.rstrip()
            if line:
                tail.append(line)
                on_output(line)
        returncode = process.wait()
    if (folder / "error.json").is_file():
        raise TrainingError(json.loads((folder / "error.json").read_text())["message"])
    if returncode != 0 or not (folder / "result.json").is_file():
        raise TrainingError(f"training processes exited with status {returncode}; last output:\n" + "\n".join(tail))
    return TrainingResult.from_dict(json.loads((folder / "result.json").read_text()))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of one training process (``python -m fairdiffusion.training.launch --spec FILE``)."""
    parser = argparse.ArgumentParser(description="One FairDiffusion training process.")
    parser.add_argument("--spec", required=True, type=Path, help="launch spec written by run_training")
    options = parser.parse_args(argv)
    spec = json.loads(options.spec.read_text())
    folder = Path(spec["folder"])
    config = parse_config(spec["config"], source=str(options.spec))
    samples = pd.read_json(folder / "samples.json", orient="records", dtype=False)
    run_id = spec["run_id"]
    is_main = int(os.environ.get("RANK", "0")) == 0
    try:
        result = train_unet(
            samples,
            config.data.attributes,
            spec["source"],
            config.training,
            log_metrics=_metrics_logger(config, run_id),
            log_artifact=_artifact_logger(config, run_id),
            allow_download=config.model.allow_download,
        )
    except FairDiffusionError as error:
        if is_main:
            (folder / "error.json").write_text(json.dumps({"message": str(error)}))
        print(f"fairdiffusion: error: {error}", file=sys.stderr)
        return 1
    if is_main:
        (folder / "result.json").write_text(json.dumps(result.to_dict()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
