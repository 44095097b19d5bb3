#!/usr/bin/env python3
"""Fine-tuning on a CPU (issue 39): ResNet-14 pretrained on the embedded set, then fine-tuned on
Fashion-MNIST (300 images a class) with none / cutmix / recursive_mix, each also from scratch,
3 seeds; then its section of docs/RESULTS.md.

    python scripts/finetune_cpu.py [--out results/finetune] [--seeds 0 1 2] [--report-only]

The settings were fixed before any run: the pretraining is `--preset cpu-shapes --aug none --seed 0`
(the embedded set, 30 epochs); every fine-tuning run is `--preset cpu-fashion-finetune` (30 epochs,
lr 0.05), from that one checkpoint's weights (`--init-from .../latest.pt`) or from scratch, with
CutMix alpha 1.0 and RM the preset's alpha 0.5, omega 0.1. Runs resume (--resume auto); a finished
one is not touched. Run it beside other work with one thread: OMP_NUM_THREADS=1.
"""
import argparse
import datetime
import json
import os
import platform
import statistics
import sys
from pathlib import Path

from replicate_cpu import _lines, finished, fmt, run, write_section

PRESET = "cpu-fashion-finetune"
METHODS = {"none": [], "cutmix": ["--aug-alpha", "1.0"], "recursive_mix": []}
STARTS = ("pretrained", "scratch")
PRETRAIN = ["--preset", "cpu-shapes", "--aug", "none", "--seed", "0"]


def pretrain_command(out):
    return ["rmix", "train", *PRETRAIN, "--out", str(out / "pretrain-shapes"), "--resume", "auto"]


def command(start, method, seed, out):
    init = ["--init-from", str(out / "pretrain-shapes" / "latest.pt")] if start == "pretrained" else []
    return ["rmix", "train", "--preset", PRESET, "--aug", method, *METHODS[method], *init, "--seed", str(seed),
            "--out", str(out / start / f"{method}-s{seed}"), "--resume", "auto"]


def scores(run_dir: Path):
    rows = [json.loads(line) for line in _lines(run_dir / "metrics.jsonl")]
    scored = [r["val_top1"] for r in rows if r["val_top1"] is not None]
    wall = run_dir / "wall.json"
    return {"best": max(scored), "final": rows[-1]["val_top1"], "train": rows[-1]["train_top1"],
            "wall": json.loads(wall.read_text())["seconds"] if wall.is_file() else None}


def section(out: Path, seeds) -> str:
    import torch
    done = {(s, m, seed): scores(out / s / f"{m}-s{seed}") for s in STARTS for m in METHODS for seed in seeds
            if finished(out / s / f"{m}-s{seed}")}
    planned = len(STARTS) * len(METHODS) * len(seeds)
    state = "" if len(done) == planned else f" (partial: {len(done)} of {planned} runs finished)"
    pre = out / "pretrain-shapes"
    pre_line = (f"The pretraining run reached {scores(pre)['final']:.2f}% val top-1 on the embedded set "
                f"(best {scores(pre)['best']:.2f}%)." if finished(pre) else "The pretraining run has not finished.")
    lines = [f"<!-- {PRESET}: written by scripts/finetune_cpu.py; the text after the end marker is kept -->",
             f"## Fine-tuning on Fashion-MNIST from weights pretrained on the embedded set{state}", "",
             "Test top-1 (%) on the full Fashion-MNIST test set (10,000 images) after 30 epochs on the first 300 "
             "training images of each class, ResNet-14, batch 64, SGD Nesterov lr 0.05, cosine, weight decay 5e-4, "
             "evaluated every 5 epochs; CutMix alpha 1.0, RM alpha 0.5 and omega 0.1. `pretrained`: every run "
             "starts from the same ResNet-14 trained 30 epochs on the embedded set without mixing (its classifier "
             "and RoI head fresh: the source has 10 classes of shapes); `scratch`: the same command without "
             f"--init-from. Mean ± std over seeds {', '.join(map(str, seeds))}. Preset `{PRESET}`. {pre_line}", "",
             f"Written {datetime.date.today()}; machine: {platform.machine()}, {os.cpu_count()} cores, one torch "
             f"thread; Python {platform.python_version()}, torch {torch.__version__}.", "",
             "| start | method | best top-1 | final top-1 | final train top-1 | per seed: best / final | wall per run |",
             "|---|---|---|---|---|---|---|"]
    for s in STARTS:
        for m in METHODS:
            rs = [(seed, done[s, m, seed]) for seed in seeds if (s, m, seed) in done]
            per_seed = ", ".join(f"s{seed} {r['best']:.2f} / {r['final']:.2f}" for seed, r in rs) or "n/a"
            walls = [r["wall"] for _, r in rs if r["wall"] is not None]
            wall = f"{statistics.mean(walls) / 60:.1f} min" if walls else "n/a"
            lines.append(f"| {s} | {m} | {fmt([r['best'] for _, r in rs])} | {fmt([r['final'] for _, r in rs])} | "
                         f"{fmt([r['train'] for _, r in rs])} | {per_seed} | {wall} |")
    lines += ["", "Commands (`OMP_NUM_THREADS=1`; the pretraining once, then one per start, method and seed):", "",
              "```bash", " ".join(pretrain_command(out))]
    lines += [" ".join(command(s, m, "$SEED", out)) for s in STARTS for m in METHODS]
    lines += ["```", "", f"<!-- end {PRESET} -->"]
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("results/finetune"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--report", type=Path, default=Path("docs/RESULTS.md"))
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args()
    if not args.report_only:
        run(pretrain_command(args.out), args.out / "pretrain-shapes")
        for seed in args.seeds:  # seed by seed: a partial table still compares every arm
            for start in STARTS:
                for method in METHODS:
                    run(command(start, method, seed, args.out), args.out / start / f"{method}-s{seed}")
                    write_section(args.report, PRESET, section(args.out, args.seeds))
    write_section(args.report, PRESET, section(args.out, args.seeds))


if __name__ == "__main__":
    sys.exit(main())
