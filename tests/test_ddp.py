"""DDP under torchrun on CPU (gloo): real processes, a tiny dataset, two ranks.

The workers are tests/ddp_worker.py (engine pieces, one file per rank) and tests/ddp_cli.py
(`rmix train` with crash hooks read from the environment by the wrapper, not the library).
"""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from helpers import ROOT, TWO_EPOCHS_TORCH, launch, launch_env
from rmix import checkpoint, dist
from rmix.config import TrainConfig, replace, validate
from rmix.engine import wrap_ddp
from rmix.logs import trim_metrics as _trim_metrics
from rmix.models import build


@pytest.fixture(scope="module")
def worker_run(jpeg_folder_4x8, tmp_path_factory):
    """tests/ddp_worker.py on 2 ranks; its val set has 11 images, so one rank's shard is one short."""
    tmp = tmp_path_factory.mktemp("worker")
    data = tmp / "data"
    shutil.copytree(jpeg_folder_4x8, data)
    next((data / "val").glob("*/*")).unlink()
    from rmix.pipelines.prepare import prepare_folder
    prepare_folder(str(data), str(tmp / "shards"), shard_size=5, say=lambda t: None)
    rc, out = launch([ROOT / "tests/ddp_worker.py", tmp, data], cwd=tmp)
    assert rc == 0, out
    return tmp


@pytest.mark.slow
def test_two_ranks_match_one_process_with_the_global_batch(worker_run, tmp_path):
    import ddp_worker  # tests/ is on sys.path: pytest's default (prepend) import mode
    with torch.random.fork_rng():
        ddp_worker.equal(tmp_path, dist.Dist())  # the reference: one process, the whole batch
    ref = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r0, r1 = (torch.load(worker_run / f"equal/rank{r}.pt", weights_only=True) for r in (0, 1))
    assert ref["images"] == r0["images"] == 24  # the train sums are all-reduced: 3 steps of the global 8
    for name, p in ref["params"].items():
        assert torch.equal(r0["params"][name], r1["params"][name]), name  # each rank saw half the batch
        torch.testing.assert_close(r0["params"][name], p, rtol=1e-5, atol=1e-6, msg=name)
    moved = max((p - ref["init"][n]).abs().max().item() for n, p in ref["params"].items())
    assert moved > 1e-3  # the comparison is not between untouched weights


@pytest.mark.slow
def test_recursive_mix_ranks_stay_identical(worker_run):
    r0, r1 = (torch.load(worker_run / f"rm/rank{r}.pt", weights_only=True) for r in (0, 1))
    for name, p in r0["params"].items():
        assert torch.equal(p, r1["params"][name]), name
    for name, b in r0["buffers"].items():  # running stats: rank 0's, after dist.broadcast_buffers
        assert torch.equal(b, r1["buffers"][name]), name
    assert not torch.equal(r0["policy_rng"], r1["policy_rng"])  # one box stream (and history) per rank
    for name, e in r0["ema"].items():  # one EMA per rank, the same on both
        assert torch.equal(e, r1["ema"][name]), name
    assert not torch.equal(r0["ema"]["fc.weight"], r0["params"]["fc.weight"])  # it is an average, not a copy


@pytest.mark.slow
@pytest.mark.parametrize("loader", ["torch", "dali", "wds-torch", "wds-dali"])
def test_validation_counts_every_image_once_over_ranks(worker_run, loader):
    v0, v1 = (json.loads((worker_run / f"rm/rank{r}.json").read_text())[loader] for r in (0, 1))
    assert v0 == v1 and v0["images"] == 11
    if loader.startswith("wds"):  # 32 train images, 16 a rank, batch 4 a rank: 4 steps on both
        assert v0["train_batches"] == 4


@pytest.mark.slow
def test_a_dead_rank_fails_the_job_and_names_it(jpeg_folder_4x8, tmp_path):
    (tmp_path / "results").mkdir()
    env = {"RMIX_TEST_CRASH_EPOCH": "2", "RMIX_TEST_RESULTS": "results", "RMIX_TEST_SKEW_CLOCK": "1"}
    t0 = time.monotonic()
    rc, out = launch([ROOT / "tests/ddp_cli.py", "train", "--data-dir", jpeg_folder_4x8, *TWO_EPOCHS_TORCH],
                     cwd=tmp_path, env=env)
    assert rc != 0, out
    assert re.search(r"rank\s*:\s*1 \(local_rank: 1\)\s*\n\s*exitcode\s*:\s*-9", out), out  # torchrun's summary
    assert time.monotonic() - t0 < 100
    # no --out: every rank trains into the directory rank 0 chose, though their clocks disagree
    dirs = [p.name for p in (tmp_path / "runs").iterdir()]
    assert dirs == ["clock-of-rank-0"]
    for r in (0, 1):
        assert json.loads((tmp_path / f"results/rank{r}.json").read_text())["out"] == "runs/clock-of-rank-0"
    rows = (tmp_path / "runs/clock-of-rank-0/metrics.jsonl").read_text().splitlines()
    assert [json.loads(row)["epoch"] for row in rows] == [1]  # written once, by rank 0


@pytest.mark.slow
def test_a_stalled_rank_is_bounded_by_dist_timeout(jpeg_folder_4x8, tmp_path):
    env = {"RMIX_TEST_CRASH_EPOCH": "1", "RMIX_TEST_CRASH_HOW": "stall"}  # after DDP's first collectives
    t0 = time.monotonic()
    rc, out = launch([ROOT / "tests/ddp_cli.py", "train", "--data-dir", jpeg_folder_4x8, *TWO_EPOCHS_TORCH,
                      "--out", "run", "--dist-timeout", "20"], cwd=tmp_path, env=env)
    assert rc != 0, out
    assert time.monotonic() - t0 < 100  # the stalled rank sleeps 600 s; rank 0 gives up after 20
    assert re.search(r"rank\s*:\s*0 \(local_rank: 0\)\s*\n\s*exitcode\s*:\s*1\b", out), out


@pytest.mark.slow
def test_torchrun_restart_resumes_from_latest(jpeg_folder_4x8, tmp_path):
    env = {"RMIX_TEST_CRASH_EPOCH": "2", "RMIX_TEST_CRASH_MARKER": "crashed"}
    rc, out = launch([ROOT / "tests/ddp_cli.py", "train", "--data-dir", jpeg_folder_4x8, *TWO_EPOCHS_TORCH,
                      "--out", "run",
                      "--resume", "auto"], cwd=tmp_path, torchrun=["--max-restarts", "1"], env=env, timeout=300)
    assert rc == 0, out
    assert (tmp_path / "crashed").is_file() and "exitcode: -9" in out  # it did crash once
    run = tmp_path / "run"
    rows = [json.loads(row) for row in (run / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows] == [1, 2]
    ckpt = checkpoint.read(run / "latest.pt")
    assert ckpt["epoch"] == 2
    rngs = [r["policy"] for r in ckpt["rng_ranks"]]  # each rank's own RecursiveMix box stream, for the next resume
    assert len(rngs) == 2 and not torch.equal(*rngs)
    assert torch.equal(ckpt["rng"]["policy"], rngs[0])  # "rng", as older checkpoints hold it, is rank 0's
    assert out.count("best val top-1") >= 1


@pytest.mark.slow
@pytest.mark.parametrize("batch", [[], ["--keep-last", "--batch-size", "12"]], ids=["drop-last", "keep-last"])
def test_restart_from_a_mid_epoch_checkpoint_is_exact(jpeg_folder_4x8, tmp_path, batch):
    # keep-last: 16 images a rank, 6 a batch: steps of 6, 6 and a short 4, the last after the restart
    args = [ROOT / "tests/ddp_cli.py", "train", "--data-dir", jpeg_folder_4x8, *TWO_EPOCHS_TORCH, *batch,
            "--save-every-steps", "1", "--resume", "auto"]
    rc, out = launch(args + ["--out", "ref"], cwd=tmp_path)
    assert rc == 0, out
    # rank 1 dies right after step 2 of epoch 2 (4 steps per epoch; 3 with keep-last): rank 0 has saved steps 1 and 2 by then,
    # or is saving step 2 (the atomic save then leaves step 1's)
    env = {"RMIX_TEST_CRASH_EPOCH": "2", "RMIX_TEST_CRASH_STEP": "2", "RMIX_TEST_CRASH_MARKER": "crashed"}
    rc, out = launch(args + ["--out", "run"], cwd=tmp_path, torchrun=["--max-restarts", "1"], env=env, timeout=300)
    assert rc == 0, out
    assert (tmp_path / "crashed").is_file() and "exitcode: -9" in out
    assert re.search(r"resuming at epoch 2, step [12] ", out), out  # from a mid-epoch checkpoint
    want, got = checkpoint.read(tmp_path / "ref/latest.pt"), checkpoint.read(tmp_path / "run/latest.pt")
    for k in want["model"]:
        torch.testing.assert_close(got["model"][k], want["model"][k], rtol=0, atol=0, msg=k)
    rows = [[json.loads(r)[k] for k in ("epoch", "train_loss", "val_top1")]
            for r in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert rows == [[json.loads(r)[k] for k in ("epoch", "train_loss", "val_top1")]
                    for r in (tmp_path / "ref/metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_sigterm_to_one_rank_stops_both_at_the_same_step_and_resumes_exactly(jpeg_folder_4x8, tmp_path):
    args = [ROOT / "tests/ddp_cli.py", "train", "--data-dir", jpeg_folder_4x8, *TWO_EPOCHS_TORCH, "--log-every", "2",
            "--resume", "auto"]
    rc, out = launch(args + ["--out", "ref"], cwd=tmp_path)
    assert rc == 0, out
    # rank 1 alone is sent SIGTERM after step 1 of epoch 2; the ranks agree every 2 steps (--log-every)
    env = {"RMIX_TEST_CRASH_EPOCH": "2", "RMIX_TEST_CRASH_STEP": "1", "RMIX_TEST_CRASH_HOW": "term",
           "RMIX_TEST_CRASH_MARKER": "signalled"}
    rc, out = launch(args + ["--out", "run"], cwd=tmp_path, env=env, timeout=300)
    assert rc == 0, out
    assert (tmp_path / "signalled").is_file() and "Traceback" not in out
    assert out.count("stopped by SIGTERM at epoch 2, step 2;") == 1, out  # one line, from rank 0
    ckpt = checkpoint.read(tmp_path / "run/latest.pt")
    assert (ckpt["epoch"], ckpt["step"]) == (1, 2)
    assert [r["step"] for r in ckpt["partial_ranks"]] == [2, 2]  # both ranks' state, at the same step
    rc, out = launch(args + ["--out", "run"], cwd=tmp_path, env=env, timeout=300)
    assert rc == 0 and "resuming at epoch 2, step 2 " in out, out
    want, got = checkpoint.read(tmp_path / "ref/latest.pt"), checkpoint.read(tmp_path / "run/latest.pt")
    for k in want["model"]:
        torch.testing.assert_close(got["model"][k], want["model"][k], rtol=0, atol=0, msg=k)


@pytest.mark.slow
def test_sigterm_to_torchrun_reaches_every_rank_and_its_loader_workers(jpeg_folder_4x8, tmp_path):
    # torchrun forwards SIGTERM with killpg: the DataLoader workers get it too and must not die of it
    environ = launch_env()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", str(ROOT / "tests/ddp_cli.py"),
           "train", "--data-dir", str(jpeg_folder_4x8), *TWO_EPOCHS_TORCH, "--epochs", "500", "--out", "run"]
    p = subprocess.Popen(cmd, cwd=tmp_path, env=environ, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (tmp_path / "run/metrics.jsonl").is_file():
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    try:
        out, _ = p.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        pytest.fail("the ranks did not stop")
    assert "killed by signal" not in out and "[rank" not in out, out  # no rank failed
    assert out.count("stopped by SIGTERM at ") == 1, out
    ckpt = checkpoint.read(tmp_path / "run/latest.pt")
    said = out.split("stopped by SIGTERM at ")[1].split(";")[0]
    assert said == (f"epoch {ckpt['epoch'] + 1}, step {ckpt['step']}" if ckpt["step"] else
                    f"the start of epoch {ckpt['epoch'] + 1}")


def test_sync_bn_on_cpu_is_a_clear_error():
    model = build("resnet8", 4)
    with pytest.raises(ValueError, match="--sync-bn"):
        wrap_ddp(model, torch.device("cpu"), dist.Dist(rank=0, world_size=2), sync_bn=True)
    assert wrap_ddp(model, torch.device("cpu"), dist.Dist(), sync_bn=True) is model  # one process: nothing to sync


@pytest.mark.parametrize("changes,needle", [
    ({"resume": "auto"}, "--out"),  # a torchrun restart must find the same run directory
    ({"dist_timeout": 0}, "--dist-timeout"),
])
def test_distributed_options_are_validated(changes, needle):
    with pytest.raises(ValueError, match=needle):
        validate(replace(TrainConfig(), **changes))
    validate(replace(TrainConfig(), resume="auto", out="runs/x"))


def test_one_process_helpers_are_identities():
    d = dist.Dist()
    t = torch.arange(3.0)
    assert dist.all_sum(t, d) is t and dist.broadcast_object("x", d) == "x" and dist.gather_to_main(1, d) == [1]


def test_resume_trims_metrics_of_epochs_to_run_again(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"epoch": e}) + "\n" for e in (1, 2, 3)))
    _trim_metrics(path, 3)  # latest.pt holds epoch 2: a crash came after row 3 but before its checkpoint
    assert [json.loads(row)["epoch"] for row in path.read_text().splitlines()] == [1, 2]
    _trim_metrics(tmp_path / "absent.jsonl", 1)


@pytest.mark.heavy  # two ranks compile the model with inductor's C++ backend on one core each (minutes)
def test_compile_under_torchrun_trains_and_saves_plain_keys(jpeg_folder_4x8, tmp_path):
    rc, out = launch([ROOT / "tests/ddp_cli.py", "train", "--data-dir", jpeg_folder_4x8, *TWO_EPOCHS_TORCH,
                      "--epochs", "1", "--max-steps", "2", "--compile", "--out", "run"], cwd=tmp_path, timeout=900)
    assert rc == 0, out
    ckpt = torch.load(tmp_path / "run/latest.pt", weights_only=True)
    assert not any("_orig_mod" in k or k.startswith("module.") for k in ckpt["model"])
    build("resnet8", 4).load_state_dict(ckpt["model"], strict=True)


@pytest.mark.slow
@pytest.mark.parametrize("mode,want", [("reduce-overhead", "default"), ("max-autotune", "max-autotune-no-cudagraphs")])
def test_cuda_graph_compile_modes_are_mapped_under_torchrun(jpeg_folder_4x8, tmp_path, mode, want):
    env = {"RMIX_TEST_NO_COMPILE": "1", "RMIX_TEST_RESULTS": str(tmp_path)}
    rc, out = launch([ROOT / "tests/ddp_cli.py", "train", "--data-dir", jpeg_folder_4x8, *TWO_EPOCHS_TORCH,
                      "--epochs", "1", "--max-steps", "1", "--compile", mode, "--out", "run"], cwd=tmp_path, env=env)
    assert rc == 0, out
    said = [line for line in out.splitlines() if line.startswith(f"--compile {mode}:")]
    assert len(said) == 1 and f"compiling with {want!r} instead" in said[0], out  # once, by rank 0
    assert [json.loads((tmp_path / f"compile{r}.json").read_text())["mode"] for r in (0, 1)] == [want, want]
    assert json.loads((tmp_path / "run/config.json").read_text())["compile"] == mode  # the run keeps what was asked


@pytest.mark.slow
def test_rmix_train_on_shards_under_torchrun(jpeg_folder_4x8, tmp_path):
    from rmix.pipelines.prepare import prepare_folder
    prepare_folder(str(jpeg_folder_4x8), str(tmp_path / "shards"), shard_size=7, say=lambda t: None)
    for loader in ("dali", "torch"):
        args = [ROOT / "tests/ddp_cli.py", "train", "--data-dir", tmp_path / "shards", *TWO_EPOCHS_TORCH,
                "--loader", loader, "--out", f"run-{loader}"]
        rc, out = launch(args, cwd=tmp_path)
        assert rc == 0, out
        rows = [json.loads(r) for r in (tmp_path / f"run-{loader}/metrics.jsonl").read_text().splitlines()]
        assert [r["epoch"] for r in rows] == [1, 2]
        assert checkpoint.read(tmp_path / f"run-{loader}/best.pt")["config"]["data"]["dataset"] == "wds"


@pytest.mark.slow
def test_accumulation_all_reduces_once_an_optimizer_step(jpeg_folder_4x8, tmp_path):
    # batch 8 over 2 ranks on 32 images: 4 steps an epoch; with --accum-steps 2, two forwards and backwards
    # a step, and DDP's all-reduce only in the last (no_sync before it): as many bucket all-reduces as without
    counts = {}
    for k in (1, 2):
        results = tmp_path / f"results{k}"
        results.mkdir()
        rc, out = launch([ROOT / "tests/ddp_cli.py", "train", "--data-dir", jpeg_folder_4x8, *TWO_EPOCHS_TORCH,
                          "--accum-steps", str(k), "--out", f"run{k}"], cwd=tmp_path,
                         env={"RMIX_TEST_COUNT_REDUCE": "1", "RMIX_TEST_RESULTS": str(results)})
        assert rc == 0, out
        counts[k] = [json.loads((results / f"reduce{r}.json").read_text())["buckets"] for r in (0, 1)]
    assert counts[1][0] >= 8 and counts[1][0] % 8 == 0  # 8 steps, each its buckets
    assert counts[2] == counts[1] == [counts[1][0]] * 2
