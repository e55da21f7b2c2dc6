"""Does the MADness regulariser slow the decay of the worst-off group over self-consuming generations?

    python benchmarks/bench_generations.py [--quick] [--generations 5] [--steps 80] [--seed S] [--out DIR]

Runs ``fairdiffusion generations`` (``flows/generations.py``) on the demo data and base model
for every arm (baseline, FBP, and each with ``training.mad_regularizer``) and every regime
(``synthetic-only``, ``augment``); all arms fine-tune LoRA adapters (rank 8), which the
regulariser needs, with the demo's other training settings. Per generation and per race
group it records FID, k-NN recall and the diversity ratio on the real test set, and
prints the table, the worst-off group's decay per arm, and writes ``generations.json``,
``generations.md`` and one PNG per regime and metric under ``--out``.

The regulariser arms use ``MAD_SETTINGS`` (lambda from ``--mad-weight``; the math is in
``fairdiffusion/training/mad.py``). ``--quick`` (2 generations, 2 steps, 120 subjects per
split, few inference steps) checks the plumbing; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fairdiffusion.registry.generations import GenerationSummary  # noqa: E402

HEADLINE = "race"
REGIMES = ("synthetic-only", "augment")
ARMS: dict[str, dict] = {
    "baseline": {"method": "baseline"},
    "fbp": {"method": "fair"},
    "baseline+reg": {"method": "baseline", "mad_regularizer": {}},
    "fbp+reg": {"method": "fair", "mad_regularizer": {}},
}
#: lambda: at the base model, the penalty's gradient is then about half the loss's (measured:
#: |grad P| / |grad L| = 0.14 at lambda 1, eta 1, batch 8). A new synthetic batch every 5 steps.
MAD_SETTINGS = {"weight": 4.0, "step_size": 1.0, "inference_steps": 10, "refresh_every": 5}
#: ``--seed S`` moves the evaluation's image seeds (and so the synthetic data's, derived from
#: them) by S times this, far past the 100,003 per generation that tasks.generations adds.
SEED_STRIDE = 10_000_019


def arm_config(arm: str, regime: str, args: argparse.Namespace) -> Path:
    """The demo config with the arm's training, the benchmark's budgets and its own outputs."""
    document = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    out = Path(args.out) / arm / regime
    training = {**ARMS[arm]}
    if "mad_regularizer" in training:
        training["mad_regularizer"] = {**MAD_SETTINGS, "weight": args.mad_weight}
        if args.quick:
            training["mad_regularizer"]["inference_steps"] = 2
    document["training"].update({"max_steps": args.steps, "lora_rank": 8, "checkpoint_every": None, **training})
    document["training"]["output_dir"] = str(out / "train")
    evaluation = document["evaluation"]
    if args.seed is not None:  # a replicate: other training draws, and other generated images
        document["training"]["seed"] = args.seed
        evaluation["seed"] = evaluation.get("seed", 1234) + SEED_STRIDE * args.seed
    evaluation.update({"output_dir": str(out / "eval"), "clinical": {"enabled": False}})
    # The curves use point estimates of the race groups only: no intersections, and a
    # token bootstrap (its intervals are not read here), so 40 evaluations fit the budget.
    evaluation.update({"bootstrap_resamples": 20, "matched_draws": 2, "intersections": False})
    if args.quick:  # the first 120 subjects of each split (both classes per group), cheaper still
        document["data"]["max_subjects_per_split"] = 120
        evaluation.update({"num_inference_steps": 2, "bootstrap_resamples": 10})
    document["tracking"].update(
        {"tracking_uri": f"sqlite:///{Path(args.out).resolve() / 'mlflow.db'}", "artifact_root": str(out / "mlruns")}
    )
    document["generations"] = {"output_dir": str(out / "generations"), "max_synthetic_share": 1.0}
    path = out / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(document))
    return path


def curve_rows(arm: str, regime: str, summaries: list[GenerationSummary]) -> list[dict[str, object]]:
    """One row per (generation, race group): FID, recall, diversity."""
    return [
        {"arm": arm, "regime": regime, "generation": s.generation, "group": name, **values}
        for s in summaries
        for name, values in s.groups.items()
        if name.startswith(f"{HEADLINE}/")
    ]


def worst_off(rows: list[dict[str, object]], arm: str, regime: str) -> dict[str, object]:
    """The group whose recall fell most (last generation over generation 0; ties: diversity), and both falls."""
    mine = [r for r in rows if r["arm"] == arm and r["regime"] == regime]
    last = max(int(r["generation"]) for r in mine)

    def ratio(group: object, metric: str) -> float:
        first = next(float(r[metric]) for r in mine if r["group"] == group and r["generation"] == 0)
        final = next(float(r[metric]) for r in mine if r["group"] == group and r["generation"] == last)
        return final / first if first else math.nan

    groups = sorted({r["group"] for r in mine}, key=str)
    # Recall, not diversity: an under-trained model's diversity ratio starts above 1, and its
    # fall is then no loss; recall is what a collapsing group loses (measured, README).
    worst = min(groups, key=lambda g: (math.isnan(ratio(g, "recall")), ratio(g, "recall"), ratio(g, "diversity")))
    return {
        "arm": arm,
        "regime": regime,
        "group": worst,
        "diversity_kept": ratio(worst, "diversity"),
        "recall_kept": ratio(worst, "recall"),
        "generations": last,
    }


def markdown(rows: list[dict[str, object]], worst: list[dict[str, object]]) -> str:
    lines = [
        "| arm | regime | generation | group | FID | recall | diversity | prompt fidelity |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['arm']} | {r['regime']} | {r['generation']} | {r['group']} | {float(r['fid']):.3f} | "
        f"{float(r['recall']):.3f} | {float(r['diversity']):.3f} | {float(r.get('fidelity', math.nan)):.2f} |"
        for r in rows
    ]
    lines += ["", "| arm | regime | worst-off group | diversity kept | recall kept |", "|---|---|---|---|---|"]
    lines += [
        f"| {w['arm']} | {w['regime']} | {w['group']} | {float(w['diversity_kept']):.2f} | "
        f"{float(w['recall_kept']):.2f} |"
        for w in worst
    ]
    return "\n".join(lines)


def plot_curves(rows: list[dict[str, object]], out: Path) -> list[Path]:
    """One PNG per (regime, metric): a panel per arm, a line per race group."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    written = []
    arms = sorted({str(r["arm"]) for r in rows})
    for regime in sorted({str(r["regime"]) for r in rows}):
        for metric in ("fid", "recall", "diversity"):
            figure, axes = plt.subplots(1, len(arms), figsize=(4 * len(arms), 3), squeeze=False)
            for axis, arm in zip(axes[0], arms, strict=True):
                mine = [r for r in rows if r["arm"] == arm and r["regime"] == regime]
                for group in sorted({str(r["group"]) for r in mine}):
                    points = sorted((int(r["generation"]), float(r[metric])) for r in mine if r["group"] == group)
                    axis.plot(*zip(*points, strict=True), marker="o", label=group)
                axis.set(title=arm, xlabel="generation", ylabel=metric)
                axis.xaxis.set_major_locator(MaxNLocator(integer=True))
            axes[0][0].legend()
            path = out / f"{regime}_{metric}.png"
            figure.tight_layout()
            figure.savefig(path)
            plt.close(figure)
            written.append(path)
    return written


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 generations, 2 steps: plumbing only")
    parser.add_argument("--generations", type=int, default=5)
    # 80 LoRA steps per generation. At 60, five synthetic-only generations cost White no
    # recall (0.57 -> 0.59, 2026-12-03): no decay for the regulariser to slow. At 80 the
    # decay shows (0.57 -> 0.35), and the 40 trainings, half with the regulariser's
    # second-order step, took 44 min on 2 quiet CPU cores (README, "Self-consuming").
    # Measured on the rebuilt base (2026-12-08): 80 LoRA steps do not teach the rare group
    # (its fidelity at generation 0 is 0.00), so its decay here is not that of a drawn group.
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--mad-weight", type=float, default=MAD_SETTINGS["weight"], help="lambda of the +reg arms")
    parser.add_argument(
        "--seed",
        type=int,
        default=None,
        help="a replicate: training.seed S and the evaluation's image seeds moved by S (default: the demo's)",
    )
    parser.add_argument("--out", default=str(ROOT / "outputs" / "bench_generations"))
    args = parser.parse_args(argv)
    if args.quick:
        args.generations, args.steps = 2, 2
    from fairdiffusion.cli import quiet_environment

    quiet_environment()  # before Prefect's server starts: no telemetry heartbeat on an offline machine
    from flows.generations import fairdiffusion_generations

    rows: list[dict[str, object]] = []
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    for regime in REGIMES:
        for arm in ARMS:
            arm_started = time.perf_counter()
            summaries = fairdiffusion_generations(str(arm_config(arm, regime, args)), args.generations, regime)
            seconds[f"{arm} / {regime}"] = round(time.perf_counter() - arm_started, 1)
            rows += curve_rows(arm, regime, summaries)
            partial = Path(args.out) / "generations.partial.json"  # what is done so far, if the run is cut short
            partial.write_text(json.dumps({"rows": rows}, indent=2, default=str))
    worst = [worst_off(rows, arm, regime) for regime in REGIMES for arm in ARMS]
    out = Path(args.out)
    settings = {
        "generations": args.generations,
        "steps": args.steps,
        "seed": args.seed,
        "mad": {**MAD_SETTINGS, "weight": args.mad_weight},
    }
    wall = {"total_s": round(time.perf_counter() - started, 1), "per_arm_s": seconds}
    result = {"rows": rows, "worst_off": worst, "settings": settings, "wall": wall}
    (out / "generations.json").write_text(json.dumps(result, indent=2, default=str))
    table = markdown(rows, worst)
    (out / "generations.md").write_text(table + "\n")
    result["plots"] = [str(p) for p in plot_curves(rows, out)]
    print(table)
    print(f"\nwall time: {wall['total_s'] / 60:.1f} min; per arm (s): {seconds}")
    return result


if __name__ == "__main__":
    main()
