"""Time validation of a large FairGenMed dataset, and check its memory does not grow with the dataset.

The issue's promise: validating 10,000 subjects at FairGenMed's resolution (664 x 512,
made by the synthetic generator) takes at most 60 s on two CPU cores, with memory that
does not grow with the number of subjects.

The dataset is generated once (two processes, a few minutes) into a cache folder and
reused; smaller sizes are folders of links to its first subjects. Each size is then read
and validated (every suite, Data Docs included) in a fresh process, which reports its
time and its peak resident memory.

Usage: python benchmarks/bench_validation.py [--sizes 2500 10000] [--cache DIR]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

SHAPE = (664, 512)
SPLITS = {"train": 0.6, "val": 0.1, "test": 0.3}
CHUNK = 250
BUDGET_S = 60.0


def _write_chunk(root: str, split: str, first: int, count: int, seed: int) -> list[dict[str, str]]:
    from fairdiffusion.data.demo import demo_subjects
    from fairdiffusion.data.fairgenmed import write_subject

    split_dir = Path(root) / split
    subjects = demo_subjects(count, seed=seed, image_size=SHAPE)
    return [write_subject(split_dir, first + i, subject) for i, subject in enumerate(subjects)]


def generate(root: Path, n: int, processes: int) -> Path:
    """Write ``n`` synthetic subjects at 664 x 512 in the FairGenMed layout (once; reused if complete)."""
    done_marker = root / ".complete"
    if done_marker.is_file():
        return root
    root.mkdir(parents=True, exist_ok=True)
    jobs, number, seed = [], 1, 0
    for split, share in SPLITS.items():
        (root / split).mkdir(exist_ok=True)
        remaining = round(n * share)
        while remaining > 0:
            count = min(CHUNK, remaining)
            jobs.append((str(root), split, number, count, seed))
            number, seed, remaining = number + count, seed + 1, remaining - count
    started = time.perf_counter()
    rows: list[dict[str, str]] = []
    with ProcessPoolExecutor(processes) as pool:
        for chunk in pool.map(_write_chunk, *zip(*jobs, strict=True)):
            rows += chunk
            print(f"  generated {len(rows)}/{n} subjects ({time.perf_counter() - started:.0f} s)", flush=True)
    with (root / "data_summary.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    done_marker.write_text(f"{n} subjects at {SHAPE}\n")
    return root


def subset(full: Path, target: Path, n: int) -> Path:
    """A folder of links to the first ``n`` subjects of ``full`` (split proportions kept)."""
    if (target / ".complete").is_file():
        return target
    with (full / "data_summary.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    kept = []
    for split, share in SPLITS.items():
        kept += [r for r in rows if r["use"] == split][: round(n * share)]
    for row in kept:
        split, number = row["use"], row["filename"][len("data_") : -len(".npz")]
        (target / split).mkdir(parents=True, exist_ok=True)
        for name in (row["filename"], f"slo_fundus_{number}.jpg"):
            link = target / split / name
            if not link.exists():
                link.symlink_to(full / split / name)
    with (target / "data_summary.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(kept[0]))
        writer.writeheader()
        writer.writerows(kept)
    (target / ".complete").write_text(f"{len(kept)} subjects\n")
    return target


def measure(root: Path, workers: int) -> dict[str, object]:
    """Load and validate one dataset in this process; seconds and peak RSS (MiB)."""
    import great_expectations  # noqa: F401 - import cost is not validation time

    from fairdiffusion.config import FAIRGENMED_ATTRIBUTES, ValidationConfig
    from fairdiffusion.data.fairgenmed import load_fairgenmed
    from fairdiffusion.validation.suites import validate_dataset

    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    started = time.perf_counter()
    samples = load_fairgenmed(root, list(SPLITS))
    loaded = time.perf_counter()
    config = ValidationConfig(min_group_count=50, image_shape=SHAPE, workers=workers)
    with tempfile.TemporaryDirectory() as docs:
        result = validate_dataset(samples, FAIRGENMED_ATTRIBUTES, config, ["train", "val"], "test", docs_dir=docs)
    finished = time.perf_counter()
    if not result.success:
        print(result.summary(), file=sys.stderr)
    return {
        "subjects": len(samples),
        "load_s": loaded - started,
        "validate_s": finished - loaded,
        "total_s": finished - started,
        "success": float(result.success),
        "failed": [line[:160] for line in result.failed_expectations],
        "rss_after_imports_mib": baseline,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[2500, 10000])
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "fairdiffusion-bench-validation")
    parser.add_argument("--workers", type=int, default=2, help="image-decoding threads (validation.workers)")
    parser.add_argument("--processes", type=int, default=2, help="processes generating the dataset")
    parser.add_argument("--measure", type=Path, help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.measure is not None:
        print(json.dumps(measure(options.measure, options.workers)))
        return

    largest = max(options.sizes)
    print(f"dataset: {largest} subjects at {SHAPE[0]} x {SHAPE[1]} in {options.cache} (generated once)", flush=True)
    full = generate(options.cache / f"fairgenmed-{largest}", largest, options.processes)
    results = []
    for n in sorted(options.sizes):
        root = full if n == largest else subset(full, options.cache / f"fairgenmed-{largest}-first-{n}", n)
        env = dict(os.environ, OMP_NUM_THREADS="1")
        done = subprocess.run(
            [sys.executable, __file__, "--measure", str(root), "--workers", str(options.workers)],
            capture_output=True,
            text=True,
            env=env,
            check=False,
        )
        if done.returncode != 0:
            raise SystemExit(f"measuring {n} subjects failed:\n{done.stderr[-3000:]}")
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))

    print(f"\n{'subjects':>9} {'load s':>8} {'validate s':>11} {'total s':>8} {'peak RSS MiB':>13} {'passed':>7}")
    for r in results:
        print(
            f"{r['subjects']:9d} {r['load_s']:8.1f} {r['validate_s']:11.1f} {r['total_s']:8.1f} "
            f"{r['peak_rss_mib']:13.0f} {'yes' if r['success'] else 'NO':>7}"
        )
    for r in results:
        for line in r["failed"]:
            print(f"  {r['subjects']} subjects, failed: {line}")
    small, large = results[0], results[-1]
    growth = large["peak_rss_mib"] - small["peak_rss_mib"]
    ratio = large["subjects"] / small["subjects"]
    print(
        f"\nbudget: {large['subjects']} subjects in {large['total_s']:.1f} s (<= {BUDGET_S:.0f} s: "
        f"{'met' if large['total_s'] <= BUDGET_S else 'MISSED'})"
    )
    print(
        f"memory: {ratio:.0f}x the subjects, peak RSS +{growth:.0f} MiB "
        f"({small['peak_rss_mib']:.0f} -> {large['peak_rss_mib']:.0f} MiB)"
    )


if __name__ == "__main__":
    main()
