"""scripts/gpu_check.sh on a machine without a GPU: a dry run and a GPU-less run say why each step was
skipped, write valid JSON and print the summary table; the table reads real results the same way."""
import json
import os
import re
import subprocess
import sys

import pytest

from helpers import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
import gpu_summary  # noqa: E402

STEPS = ["doctor", "kernels", "host-syncs", "bench-mix-fp32", "bench-mix-bf16", "train-smoke", "synth-jpegs",
         "bench-train-r50", "bench-train-r50-compile"]


def check(tmp_path, **env):
    out = tmp_path / "out"
    r = subprocess.run(["bash", str(ROOT / "scripts/gpu_check.sh")], cwd=tmp_path, capture_output=True, text=True,
                       env={**os.environ, "OUT": str(out), "RMIX_PYTHON": sys.executable, **env}, timeout=300)
    return r, out


@pytest.mark.slow
def test_dry_run_skips_every_step_with_a_reason(tmp_path):
    r, out = check(tmp_path, GPU_CHECK_DRY="1")
    assert r.returncode == 0, r.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dry"] is True and [s["step"] for s in summary["steps"]] == STEPS
    assert all(s["status"] == "skipped" and "dry run" in s["reason"] for s in summary["steps"])
    json.loads((out / "versions.json").read_text())
    assert r.stdout.splitlines()[0] == "gpu_check (dry run): 0 of 9 steps ok"
    assert len(r.stdout.splitlines()) == 2 + len(STEPS)  # the table, and nothing else on stdout
    assert len(list(out.iterdir())) <= 8  # the device tool returns no more


@pytest.mark.slow
@pytest.mark.parametrize("budget", [510, 900])
def test_the_steps_limits_fit_the_budget_and_none_is_starved(tmp_path, budget):
    r, out = check(tmp_path, GPU_CHECK_DRY="1", BUDGET_S=str(budget))
    assert r.returncode == 0, r.stderr
    steps = json.loads((out / "summary.json").read_text())["steps"]
    limits = {s["step"]: s["limit_s"] for s in steps}
    shares = dict(re.findall(r"\[([\w-]+)\]=(\d+)", re.search(r"SHARES=\(([^)]*)\)",
                                                            (ROOT / "scripts/gpu_check.sh").read_text()).group(1)))
    assert sum(int(v) for v in shares.values()) == 100 and set(limits) <= set(shares)
    assert sum(limits.values()) <= budget  # every step running to its limit still ends in time
    for name, limit in limits.items():  # each gets at least its share, and enough to do something
        assert limit >= budget * int(shares[name]) // 100 and limit >= 20, (name, limit)


@pytest.mark.slow
def test_without_a_gpu_each_step_says_so(tmp_path):
    r, out = check(tmp_path, CUDA_VISIBLE_DEVICES="")
    assert r.returncode == 0, r.stderr
    steps = json.loads((out / "summary.json").read_text())["steps"]
    assert [s["step"] for s in steps] == STEPS
    assert all(s["status"] == "skipped" and "no CUDA device" in s["reason"] for s in steps), steps


def test_summary_table_reads_the_steps_figures(tmp_path):
    steps = [{"step": s, "status": "ok", "rc": 0, "seconds": 3, "reason": ""} for s in STEPS]
    steps[-1].update(status="timeout", rc=124, reason="no result within 240s")
    (tmp_path / "summary.json").write_text(json.dumps({"budget_s": 510, "dry": False, "steps": steps}))
    (tmp_path / "bench_mix.jsonl").write_text(json.dumps(
        {"dtype": "bfloat16", "fused_ms": 0.21, "gbps": 2900.0, "peak_fraction": 0.6, "speedup": 6.5, "host_us": 95.0,
         "kernel_ms": 0.04}) + "\n")
    (tmp_path / "doctor.json").write_text(json.dumps({"ok": False, "checks": [
        {"check": "torch", "status": "ok", "detail": ""},
        {"check": "decode: DALI nvJPEG vs CPU", "status": "failed", "detail": "mean |difference| 9.00"}]}) + "\n")
    (tmp_path / "host_syncs.jsonl").write_text("".join(json.dumps({"policy": p, "syncs_per_step": 0.0}) + "\n"
                                                       for p in ("recursive_mix", "none")) + '{"half a li')
    (tmp_path / "bench_train.jsonl").write_text(json.dumps(
        {"compile": "none", "none_img_s": 3000, "rm_img_s": 2900, "rm_overhead": 0.034, "loader": "torch",
         "pipeline_img_s": 2500, "deterministic": True, "deterministic_cost": 0.12}) + "\n")
    (tmp_path / "train_smoke.jsonl").write_text(json.dumps({"img_s": 5000.0, "val_top1": 31.5}) + "\n")
    text = gpu_summary.table(tmp_path)
    assert text.splitlines()[0] == "gpu_check: 8 of 9 steps ok"
    assert ("fused 0.210 ms, 6.50x the unfused steps; host 95 us a call; kernel alone 0.040 ms, 2900 GB/s "
            "(60% of the memory's peak)") in text
    assert "1 of 2 checks ok; failed: decode: DALI nvJPEG vs CPU: mean |difference| 9.00" in text
    assert "recursive_mix 0 per step, none 0 per step" in text
    assert "none 3000 img/s, RM 2900 img/s (+3.4%), RM fed by torch 2500 img/s; RM with --deterministic +12.0%" in text
    assert "bench-train-r50-compile  timeout  3  no result within 240s" in text
    assert "5000 img/s, val top-1 31.5%" in text


@pytest.mark.slow
def test_gpu_sync_refuses_without_cuda():
    r = subprocess.run([sys.executable, str(ROOT / "scripts/gpu_sync.py")], capture_output=True, text=True,
                       env={**os.environ, "CUDA_VISIBLE_DEVICES": ""}, timeout=120)
    assert r.returncode == 1 and json.loads(r.stdout) == {"error": "no CUDA device"}
