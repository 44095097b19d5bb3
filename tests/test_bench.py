"""`rmix bench data` and `rmix bench train` at tiny sizes: they run and report their keys.

Speed is measured by `rmix bench`, never asserted here: only that every figure is there and positive.
"""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

from rmix.bench.data import bench_data, subset, train_split
from rmix.bench.timing import StepTimer, cpu_seconds, machine_info
from rmix.cli import cli
from rmix.pipelines import scan_image_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_json(args):
    r = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)  # progress lines go to stderr


def positive(d, keys):
    for k in keys:
        assert isinstance(d[k], (int, float)) and math.isfinite(d[k]) and d[k] > 0, (k, d[k])


@pytest.mark.slow
def test_bench_data_reports_every_loader(jpeg_folder_2x8_64x48):
    d = run_json(["bench", "data", "--data-dir", str(jpeg_folder_2x8_64x48), "--size", "32", "--batch", "4",
                  "--reps", "2", "--threads", "1", "--json"])
    rates = ["dali_img_s", "torch_pil_img_s", "torch_v2_img_s", "decode_only_img_s"]
    ratios = ["dali_vs_decode_only", "dali_vs_torch_pil", "dali_vs_torch_v2"]
    positive(d, rates + ratios + ["threads", "batch", "cpu_count"])
    assert d["images"] == 16 and d["batches"] == 4 and d["threads"] == 1 and d["batch"] == 4
    assert d["dali_vs_torch_pil"] == pytest.approx(d["dali_img_s"] / d["torch_pil_img_s"])
    assert all(len(p) == 2 for p in d["passes"].values())  # the warm-up pass is not among them
    for k in ("torch", "torchvision", "dali", "pillow", "cpu_model", "date"):
        assert d[k], k


def test_bench_data_on_shards_compares_them_with_the_same_images_as_files(jpeg_folder_2x8_64x48, tmp_path):
    from rmix.pipelines.prepare import prepare_folder
    prepare_folder(str(jpeg_folder_2x8_64x48), str(tmp_path / "w"), shard_size=3, say=lambda t: None)
    d = run_json(["bench", "data", "--data-dir", str(tmp_path / "w"), "--size", "32", "--batch", "4", "--reps", "1",
                  "--threads", "1", "--images", "12", "--json"])
    assert d["mode"] == "shards" and d["images"] == 12 and d["files"] == 12
    positive(d, [f"{k}_img_s" for k in ("torch_files", "torch_wds", "dali_files", "dali_wds")] +
             ["dali_wds_vs_files", "torch_wds_vs_files"])
    assert d["dali_wds_vs_files"] == pytest.approx(d["dali_wds_img_s"] / d["dali_files_img_s"])
    r = CliRunner().invoke(cli, ["bench", "data", "--data-dir", str(tmp_path / "w"), "--size", "32", "--batch", "4",
                                 "--reps", "1", "--threads", "1", "--images", "12"])
    assert "dali shards / files" in r.output


def test_bench_data_without_dali_compares_the_torchvision_loaders(jpeg_folder_2x8_64x48, monkeypatch):
    monkeypatch.setitem(sys.modules, "rmix.pipelines.dali", None)  # its import now fails, as without DALI
    d = bench_data(jpeg_folder_2x8_64x48, size=32, batch=4, reps=1, threads=1)
    assert set(d["skipped"]) == {"dali", "decode_only"} and "dali_img_s" not in d and "dali_vs_torch_pil" not in d
    positive(d, ["torch_pil_img_s", "torch_v2_img_s"])


def test_bench_data_errors_are_one_line(jpeg_folder_2x8_64x48):
    r = CliRunner().invoke(cli, ["bench", "data", "--data-dir", str(jpeg_folder_2x8_64x48), "--batch", "8",
                                 "--images", "4"])
    assert r.exit_code == 2 and "--images: must be >= 8" in r.output
    r = CliRunner().invoke(cli, ["bench", "data", "--data-dir", str(jpeg_folder_2x8_64x48 / "missing")])
    assert r.exit_code == 2 and "is not a directory" in r.output
    r = CliRunner().invoke(cli, ["bench", "data", "--data-dir", str(jpeg_folder_2x8_64x48), "--batch", "32",
                                 "--images", "64"])
    assert r.exit_code == 2 and "not one batch of 32" in r.output


def test_subset_spreads_files_over_classes(jpeg_folder_2x8_64x48, tmp_path):
    split = train_split(jpeg_folder_2x8_64x48)
    assert split == jpeg_folder_2x8_64x48 / "train" and train_split(split) == split
    small = subset(scan_image_folder(split), 6, tmp_path)
    assert len(small.files) == 6 and small.classes == scan_image_folder(split).classes
    assert all(os.path.islink(os.path.join(small.root, f)) for f in small.files)


TRAIN_KEYS = ["none_img_s", "rm_img_s", "synthetic_img_s", "pipeline_img_s", "none_ms", "rm_ms", "pipeline_ms",
              "none_mix_ms", "rm_mix_ms"]


@pytest.mark.parametrize("loader,workers", [("dali", 1), ("torch", 0)])
def test_bench_train_reports_overheads(jpeg_folder_2x8_64x48, loader, workers):
    d = run_json(["bench", "train", "--model", "resnet8", "--size", "16", "--batch", "8", "--steps", "3",
                  "--warmup", "1", "--data-dir", str(jpeg_folder_2x8_64x48), "--loader", loader,
                  "--workers", str(workers), "--threads", "1", "--json"])
    positive(d, TRAIN_KEYS)
    # 2 batches per epoch: the pipeline run went through epochs
    assert d["rm_overhead"] == pytest.approx(d["rm_ms"] / d["none_ms"] - 1)
    assert d["loader_overhead"] == pytest.approx(d["pipeline_ms"] / d["rm_ms"] - 1)
    assert d["num_classes"] == 2 and d["loader"] == loader and d["amp"] == "none" and d["torch_threads"] == 1
    assert torch.get_num_threads() >= 1  # restored after the run


def test_bench_train_text_output(jpeg_folder_2x8_64x48):
    r = CliRunner().invoke(cli, ["bench", "train", "--size", "16", "--batch", "4", "--steps", "1", "--warmup", "0",
                                 "--data-dir", str(jpeg_folder_2x8_64x48), "--workers", "1"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "RM overhead" in r.stdout and "recursive_mix, dali" in r.stdout


def test_timing_helpers():
    timer = StepTimer("cpu")
    for _ in range(2):
        with timer:
            sum(range(1000))
    ms = timer.results()
    assert len(ms) == 2 and all(m >= 0 for m in ms)
    a = cpu_seconds()
    b = cpu_seconds()
    assert a is None or 0 <= a <= b
    info = machine_info()
    assert info["cpu_count"] >= 1 and info["device_name"] == "cpu"


def test_gpu_check_script_parses():
    subprocess.run(["bash", "-n", os.path.join(ROOT, "scripts", "gpu_check.sh")], check=True)


# --- bench contention: runs sharing the CPU (rmix/bench/contention.py) ---
def test_contention_child_env_sets_only_the_policy(monkeypatch):
    from rmix.bench.contention import child_env
    monkeypatch.setenv("GOMP_SPINCOUNT", "10000")  # as the rmix command sets it for itself
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert "GOMP_SPINCOUNT" not in child_env("rmix") and "OMP_WAIT_POLICY" not in child_env("rmix")
    assert child_env("libgomp")["GOMP_SPINCOUNT"] == "300000" and "OMP_WAIT_POLICY" not in child_env("libgomp")
    assert child_env("passive")["OMP_WAIT_POLICY"] == "PASSIVE" and "GOMP_SPINCOUNT" not in child_env("passive")
    assert child_env("spin:500")["GOMP_SPINCOUNT"] == "500"


@pytest.mark.slow
def test_contention_runs_alone_and_together():
    d = run_json(["bench", "contention", "--epochs", "1", "--max-steps", "1", "--procs", "2",
                  "--policies", "rmix,spin:1000", "--json"])
    assert set(d["policies"]) == {"rmix", "spin:1000"} and d["env"]["spin:1000"] == {"GOMP_SPINCOUNT": "1000"}
    for r in d["policies"].values():
        positive(r, ["alone_median_s", "together_median_s", "together_over_alone"])
        assert len(r["alone_s"]) == len(r["together_s"]) == 1
        assert "alone_over_libgomp_alone" not in r  # no libgomp run to compare with


@pytest.mark.parametrize("args,needle", [(["--policies", "spinny"], "--policies"), (["--procs", "0"], "--procs"),
                                         (["--policies", ""], "--policies")])
def test_contention_bad_input_is_one_line(args, needle):
    r = CliRunner().invoke(cli, ["bench", "contention", *args])
    assert r.exit_code == 2 and needle in r.output and len(r.output.strip().splitlines()) == 1, r.output
