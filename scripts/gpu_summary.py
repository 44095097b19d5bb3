"""The summary table of a gpu_check.sh run: one row per step, its status and its headline figure.

    python scripts/gpu_summary.py gpu_results

Reads only the JSON files the check wrote (standard library, no torch), so it also runs where the
check could not.
"""
import json
import sys
from pathlib import Path


def jsonl(path):
    """The JSON objects of a .jsonl file, skipping lines that are not JSON (a killed step's half line)."""
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return rows


def figures(out: Path) -> dict:
    """step name -> its headline figure, from the files the steps wrote."""
    f = {}
    for r in jsonl(out / "bench_mix.jsonl"):
        peak = "" if r.get("peak_fraction") is None else f" ({r['peak_fraction']:.0%} of the memory's peak)"
        kernel = "" if r.get("kernel_ms") is None else f"; kernel alone {r['kernel_ms']:.3f} ms"
        gbps = "" if r.get("gbps") is None else f", {r['gbps']:.0f} GB/s{peak}"
        host = "" if r.get("host_us") is None else f"; host {r['host_us']:.0f} us a call"
        f[f"bench-mix-{r['dtype'].replace('float32', 'fp32').replace('bfloat16', 'bf16')}"] = \
            f"fused {r['fused_ms']:.3f} ms, {r['speedup']:.2f}x the unfused steps{host}{kernel}{gbps}"
    doctor = jsonl(out / "doctor.json")
    if doctor:
        checks = doctor[-1]["checks"]
        failed = [c for c in checks if c["status"] == "failed"]
        f["doctor"] = (f"{sum(c['status'] == 'ok' for c in checks)} of {len(checks)} checks ok"
                       + (f"; failed: {failed[0]['check']}: {failed[0]['detail']}" if failed else ""))
    syncs = jsonl(out / "host_syncs.jsonl")
    if syncs:
        f["host-syncs"] = ", ".join(f"{r['policy']} {r['syncs_per_step']:g} per step" for r in syncs)
    for r in jsonl(out / "bench_train.jsonl"):
        name = "bench-train-r50" + ("-compile" if r.get("compile", "none") != "none" else "")
        text = (f"none {r['none_img_s']:.0f} img/s, RM {r['rm_img_s']:.0f} img/s ({r['rm_overhead']:+.1%}), "
                f"RM fed by {r['loader']} {r['pipeline_img_s']:.0f} img/s")
        if r.get("deterministic"):
            text += f"; RM with --deterministic {r['deterministic_cost']:+.1%}"
        if r.get("compile", "none") != "none":
            none = f"none {r['none_compile_speedup']:.2f}x, " if "none_compile_speedup" in r else ""
            text += f"; compiled: {none}RM {r['rm_compile_speedup']:.2f}x eager"
        f[name] = text
    smoke = jsonl(out / "train_smoke.jsonl")
    if smoke:
        f["train-smoke"] = f"{smoke[-1]['img_s']:.0f} img/s, val top-1 {smoke[-1]['val_top1']:.1f}%"
    return f


def table(out: Path) -> str:
    summary = json.loads((out / "summary.json").read_text())
    got = figures(out)
    rows = [("step", "status", "s", "figure or reason")]
    for s in summary["steps"]:
        rows.append((s["step"], s["status"], str(s["seconds"]), got.get(s["step"]) or s.get("reason") or ""))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [f"gpu_check{' (dry run)' if summary.get('dry') else ''}: "
             f"{sum(s['status'] == 'ok' for s in summary['steps'])} of {len(summary['steps'])} steps ok"]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r[:3], widths)) + "  " + r[3] for r in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(Path(sys.argv[1] if len(sys.argv) > 1 else "gpu_results")))
