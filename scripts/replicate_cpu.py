#!/usr/bin/env python3
"""Small-scale replication on a CPU: none / mixup / cutmix / recursive_mix x 3 seeds on the
embedded dataset (preset cpu-shapes), then docs/RESULTS.md with mean and std over seeds.

    python scripts/replicate_cpu.py [--out runs/replication] [--seeds 0 1 2] [--report-only]

Each run resumes if interrupted (--resume auto); --report-only rebuilds the report from the runs.
"""
import argparse
import datetime
import json
import platform
import statistics
import subprocess
import sys
from pathlib import Path

# Mixup and CutMix alpha 1.0: their papers' CIFAR settings; RM: the preset's alpha 0.5, omega 0.5.
METHODS = {"none": [], "mixup": ["--aug-alpha", "1.0"], "cutmix": ["--aug-alpha", "1.0"], "recursive_mix": []}


def command(method, seed, out):
    return ["rmix", "train", "--preset", "cpu-shapes", "--aug", method, *METHODS[method], "--seed", str(seed),
            "--out", str(out / f"{method}-s{seed}"), "--resume", "auto"]


def summarize(out, seeds):
    rows = {}
    for method in METHODS:
        best, final = [], []
        for seed in seeds:
            m = out / f"{method}-s{seed}" / "metrics.jsonl"
            if not m.exists():
                continue
            epochs = [json.loads(line) for line in m.read_text().splitlines()]
            best.append(max(e["val_top1"] for e in epochs))
            final.append(epochs[-1]["val_top1"])
        rows[method] = (best, final)
    return rows


def fmt(xs):
    if not xs:
        return "n/a"
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{statistics.mean(xs):.2f} ± {sd:.2f}"


def report(out, seeds, path):
    import torch
    rows = summarize(out, seeds)
    lines = ["# Small-scale replication on a CPU", "",
             f"Date: {datetime.date.today()}; machine: {platform.machine()}, {__import__('os').cpu_count()} cores; "
             f"Python {platform.python_version()}, torch {torch.__version__}.", "",
             "Validation top-1 (%) on the embedded dataset (10 classes, 100 train + 100 val images per class, "
             "32 px crops), ResNet-14, 30 epochs, mean ± std over seeds " + ", ".join(map(str, seeds)) + ".", "",
             "| method | best val top-1 | final val top-1 | runs |", "|---|---|---|---|"]
    for method, (best, final) in rows.items():
        lines.append(f"| {method} | {fmt(best)} | {fmt(final)} | {len(best)} |")
    lines += ["", "Commands (one per method and seed):", "", "```bash"]
    lines += [" ".join(command(m, "$SEED", out)) for m in METHODS]
    lines += ["rmix plot " + " ".join(str(out / f"{m}-s{seeds[0]}") for m in METHODS) + " --out docs/results_curves.png",
              "```", "", "![curves](results_curves.png)", ""]
    # the generated part is everything before the first "## " section: the written analysis stays
    old = path.read_text() if path.exists() else ""
    kept = old[old.index("\n## ") + 1:] if "\n## " in old else ""
    path.write_text("\n".join(lines) + ("\n" + kept if kept else ""))
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/replication"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--report", type=Path, default=Path("docs/RESULTS.md"))
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args()
    if not args.report_only:
        for seed in args.seeds:
            for method in args.methods:
                print("+", " ".join(command(method, seed, args.out)), flush=True)
                subprocess.run(command(method, seed, args.out), check=True)
    subprocess.run(["rmix", "plot", *[str(args.out / f"{m}-s{args.seeds[0]}") for m in METHODS
                                      if (args.out / f"{m}-s{args.seeds[0]}" / "metrics.jsonl").exists()],
                    "--out", str(args.report.parent / "results_curves.png")], check=False)
    rows = report(args.out, args.seeds, args.report)
    for method, (best, final) in rows.items():
        print(f"{method:<14} best {fmt(best):>14}  final {fmt(final):>14}")


if __name__ == "__main__":
    sys.exit(main())
