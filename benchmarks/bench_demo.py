"""Time the README's promises from a fresh clone: installation, `make demo`, `make test`.

Clones the current commit into a temporary folder (so nothing of this checkout's
.venv, outputs or DVC cache is reused), then times, in one run and side by side:
  install            make install (venv + pinned dependencies)
  demo (fair)        make demo: the whole pipeline, method fair
  demo (baseline)    the same config with training.method: baseline
  test               make test (the venv already exists, so this is the suite alone)
and prints a table with the budgets the foundation issue sets.

Usage: python benchmarks/bench_demo.py [--skip-test] [--keep]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
BUDGETS = {"install": 300.0, "demo (fair)": 300.0, "install + test": 900.0}


def timed(label: str, args: list[str], cwd: Path, results: dict[str, float], ok: tuple[int, ...] = (0,)) -> None:
    print(f"--- {label}: {' '.join(args)}", flush=True)
    started = time.perf_counter()
    done = subprocess.run(args, cwd=cwd, capture_output=True, text=True, check=False)
    results[label] = time.perf_counter() - started
    if done.returncode not in ok:
        print(done.stdout[-3000:], done.stderr[-3000:], sep="\n")
        raise SystemExit(f"{label} failed (exit {done.returncode})")
    print(f"    {results[label]:.1f} s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-test", action="store_true", help="skip make test")
    parser.add_argument("--keep", action="store_true", help="keep the temporary clone")
    options = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="fd-bench-"))
    clone = workdir / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    results: dict[str, float] = {}
    try:
        timed("install", ["make", "install"], clone, results)
        timed("demo (fair)", ["make", "demo"], clone, results)
        quality = demo_quality(clone)
        baseline = yaml.safe_load((clone / "configs" / "demo.yaml").read_text())
        baseline["training"]["method"] = "baseline"
        baseline["training"]["output_dir"] = "outputs/train-baseline"
        baseline["evaluation"]["output_dir"] = "outputs/eval-baseline"
        (clone / "outputs" / "baseline.yaml").write_text(yaml.safe_dump(baseline))
        timed(
            "demo (baseline)",
            [".venv/bin/fairdiffusion", "run", "--config", "outputs/baseline.yaml"],
            clone,
            results,
            ok=(0, 1),  # 1: the gate rejected the baseline; the run itself completed
        )
        if not options.skip_test:
            timed("test", ["make", "test"], clone, results)
            results["install + test"] = results["install"] + results["test"]
    finally:
        if not options.keep:
            shutil.rmtree(workdir, ignore_errors=True)

    print("\n| step | seconds | budget | within |")
    print("|---|---:|---:|---|")
    for label, seconds in results.items():
        budget = BUDGETS.get(label)
        within = "" if budget is None else ("yes" if seconds <= budget else "NO")
        print(f"| {label} | {seconds:.1f} | {'' if budget is None else f'{budget:.0f}'} | {within} |")
    print("\n| the demo's champion | value |\n|---|---:|")
    for label, value in quality.items():
        print(f"| {label} | {value:.4g} |")
    sys.stdout.flush()


def demo_quality(clone: Path) -> dict[str, float]:
    """What the demo's model draws (benchmarks/demo_quality.py, run in the clone)."""
    args = [".venv/bin/python", "benchmarks/demo_quality.py"]
    done = subprocess.run(args, cwd=clone, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        print(done.stderr[-2000:])
        return {}
    return json.loads(done.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
