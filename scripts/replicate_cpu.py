#!/usr/bin/env python3
"""Small-scale replications on a CPU: none / mixup / cutmix / recursive_mix x 3 seeds, then their
section of docs/RESULTS.md (mean ± std over seeds, per-seed values, wall time, curves).

    python scripts/replicate_cpu.py --preset cpu-fashion [--out runs/replication-fashion] [--seeds 0 1 2]
    python scripts/replicate_cpu.py --preset cpu-shapes  [--report-only]

Each run resumes where it stopped (--resume auto), so the script can be started again after an
interruption, in another session too; a finished run is not touched. --report-only rebuilds the
section from the runs there are (a table with fewer runs than planned says "partial").
Run it beside other work with one thread: OMP_NUM_THREADS=1 (the presets use one loader thread).
"""
import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

# Mixup and CutMix alpha 1.0: their papers' CIFAR settings. RM: each preset's own alpha and omega
# (cpu-fashion: the paper's CIFAR setting, alpha 0.5 omega 0.1; cpu-shapes: 0.5 and 0.5).
METHODS = {"none": [], "mixup": ["--aug-alpha", "1.0"], "cutmix": ["--aug-alpha", "1.0"], "recursive_mix": []}
SETUPS = {
    "cpu-fashion": dict(out="results/fashion", curves="results_fashion_curves.png",
                        title="Fashion-MNIST, 300 training images a class",
                        what="Test top-1 (%) on the full Fashion-MNIST test set (10,000 images) after training on "
                             "the first 300 images of each class (3,000; `--train-per-class 300`), ResNet-14, "
                             "100 epochs, batch 64, SGD Nesterov lr 0.1, the paper's cosine, weight decay 5e-4, "
                             "pad 4 + crop 28 + flip, the last partial batch kept, evaluated every 5 epochs; "
                             "RM alpha 0.5, omega 0.1"),
    "cpu-shapes": dict(out="results/shapes", curves="results_shapes_curves.png",
                       title="The embedded set, fixed (distractors are not other classes shrunk)",
                       what="Validation top-1 (%) on the embedded dataset (10 classes, 100 train + 100 val images "
                            "per class, 32 px crops), ResNet-14, 30 epochs; RM alpha 0.5, omega 0.5"),
}


def command(preset, method, seed, out):
    return ["rmix", "train", "--preset", preset, "--aug", method, *METHODS[method], "--seed", str(seed),
            "--out", str(out / f"{method}-s{seed}"), "--resume", "auto"]


def finished(run_dir: Path) -> bool:
    cfg = run_dir / "config.json"
    if not cfg.is_file():
        return False
    epochs = json.loads(cfg.read_text())["epochs"]
    return any(json.loads(line)["epoch"] == epochs for line in _lines(run_dir / "metrics.jsonl"))


def _lines(path: Path):
    return path.read_text().splitlines() if path.is_file() else []


def run_one(preset, method, seed, out):
    """Train (or resume) one method and seed."""
    run(command(preset, method, seed, out), out / f"{method}-s{seed}")


def run(cmd, run_dir: Path):
    """Run `cmd`, which trains (or resumes) into `run_dir`, unless finished; adds its wall time to RUN/wall.json."""
    if finished(run_dir):
        return
    print("+", " ".join(cmd), flush=True)
    t0 = time.time()
    subprocess.run(cmd, check=True)
    wall = run_dir / "wall.json"
    done = json.loads(wall.read_text())["seconds"] if wall.is_file() else 0.0
    wall.write_text(json.dumps({"seconds": done + time.time() - t0}) + "\n")


def summarize(out, seeds):
    """method -> list of per-seed dicts (best, final, epochs done, wall seconds), finished runs only."""
    rows = {}
    for method in METHODS:
        rows[method] = []
        for seed in seeds:
            run_dir = out / f"{method}-s{seed}"
            if not finished(run_dir):
                continue
            epochs = [json.loads(line) for line in _lines(run_dir / "metrics.jsonl")]
            scored = [e["val_top1"] for e in epochs if e["val_top1"] is not None]
            wall = run_dir / "wall.json"
            rows[method].append({"seed": seed, "best": max(scored), "final": epochs[-1]["val_top1"],
                                 "train": epochs[-1]["train_top1"],
                                 "wall": json.loads(wall.read_text())["seconds"] if wall.is_file() else None})
    return rows


def fmt(xs):
    if not xs:
        return "n/a"
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{statistics.mean(xs):.2f} ± {sd:.2f}"


def section(preset, out, seeds, curves):
    import torch
    setup = SETUPS[preset]
    rows = summarize(out, seeds)
    done = sum(len(r) for r in rows.values())
    planned = len(METHODS) * len(seeds)
    state = "" if done == planned else f" (partial: {done} of {planned} runs finished)"
    lines = [f"<!-- {preset}: written by scripts/replicate_cpu.py; the text after the end marker is kept -->",
             f"## {setup['title']}{state}", "",
             f"{setup['what']}; mean ± std over seeds {', '.join(map(str, seeds))}. Preset `{preset}`.", "",
             f"Written {datetime.date.today()}; machine: {platform.machine()}, {os.cpu_count()} cores, one torch "
             f"thread; Python {platform.python_version()}, torch {torch.__version__}.", "",
             "| method | best top-1 | final top-1 | final train top-1 | per seed: best / final | wall per run |",
             "|---|---|---|---|---|---|"]
    for method, rs in rows.items():
        per_seed = ", ".join(f"s{r['seed']} {r['best']:.2f} / {r['final']:.2f}" for r in rs) or "n/a"
        walls = [r["wall"] for r in rs if r["wall"] is not None]
        wall = f"{statistics.mean(walls) / 60:.1f} min" if walls else "n/a"
        lines.append(f"| {method} | {fmt([r['best'] for r in rs])} | {fmt([r['final'] for r in rs])} | "
                     f"{fmt([r['train'] for r in rs])} | {per_seed} | {wall} |")
    lines += ["", "Commands (one per method and seed; `OMP_NUM_THREADS=1`):", "", "```bash"]
    lines += [" ".join(command(preset, m, "$SEED", out)) for m in METHODS]
    lines += [f"rmix plot {' '.join(str(out / f'{m}-s{seeds[0]}') for m in METHODS)} --out docs/{curves}",
              "```", "", f"![curves, seed {seeds[0]}]({curves})", "", f"<!-- end {preset} -->"]
    return "\n".join(lines), rows


def write_section(path: Path, preset: str, text: str):
    """Replace this preset's marked section of `path` (or append it); everything else stays."""
    old = path.read_text() if path.exists() else "# Small-scale replications on a CPU\n"
    begin, end = f"<!-- {preset}:", f"<!-- end {preset} -->"
    if begin in old and end in old:
        head, rest = old.split(begin, 1)
        tail = rest.split(end, 1)[1]
        new = head + text + tail
    else:
        new = old.rstrip("\n") + "\n\n" + text + "\n"
    path.write_text(new)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=list(SETUPS), default="cpu-fashion")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--report", type=Path, default=Path("docs/RESULTS.md"))
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args()
    setup = SETUPS[args.preset]
    out = args.out or Path(setup["out"])
    if not args.report_only:
        for seed in args.seeds:  # seed by seed: a partial table still compares every method
            for method in args.methods:
                run_one(args.preset, method, seed, out)
                write_report(args, out, setup)
    write_report(args, out, setup)


def write_report(args, out, setup):
    runs = [str(out / f"{m}-s{args.seeds[0]}") for m in METHODS
            if (out / f"{m}-s{args.seeds[0]}" / "metrics.jsonl").exists()]
    if runs:
        subprocess.run(["rmix", "plot", *runs, "--out", str(args.report.parent / setup["curves"]),
                        "--title", setup["title"]], check=False)
    text, rows = section(args.preset, out, args.seeds, setup["curves"])
    write_section(args.report, args.preset, text)
    for method, rs in rows.items():
        print(f"{method:<14} best {fmt([r['best'] for r in rs]):>14}  final {fmt([r['final'] for r in rs]):>14}  "
              f"({len(rs)} runs)", flush=True)


if __name__ == "__main__":
    sys.exit(main())
