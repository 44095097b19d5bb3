"""Reliability: exact resume after SIGKILL, the non-finite guard, the preflight, and bad CLI input."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from click.testing import CliRunner

from helpers import train_args
from rmix import checkpoint
from rmix.cli import cli


def weights(run_dir):
    return checkpoint.read(run_dir / "latest.pt")["model"]


@pytest.mark.slow
@pytest.mark.parametrize("loader", ["dali", "torch"])
def test_sigkill_then_resume_is_bit_identical(jpeg_folder_4x6, tmp_path, loader):
    ref = tmp_path / "ref"
    r = CliRunner().invoke(cli, train_args(jpeg_folder_4x6, ref, "--loader", loader), catch_exceptions=False)
    assert r.exit_code == 0, r.output
    run = tmp_path / "killed"
    cmd = [sys.executable, "-c", "from rmix import cli; cli.main()", *train_args(jpeg_folder_4x6, run,
                                                                                 "--loader", loader)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        m = run / "metrics.jsonl"
        if m.exists() and m.read_text().count("\n") >= 1:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # wherever it is: mid-epoch or mid-save
    proc.wait()
    done = (run / "metrics.jsonl").read_text().count("\n")
    assert proc.returncode == -signal.SIGKILL and done < 3, "the run finished before the kill"
    r = CliRunner().invoke(cli, train_args(jpeg_folder_4x6, run, "--loader", loader,
                                           "--resume", "auto"), catch_exceptions=False)
    assert r.exit_code == 0, r.output
    want, got = weights(ref), weights(run)
    assert want.keys() == got.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0, msg=k)
    epochs = [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3]


SAVER = """
import sys, torch
from rmix import checkpoint
payload = {"model": {"w": torch.randn(4_000_000)}, "epoch": 0}
for i in range(10_000):
    payload["epoch"] = i
    checkpoint.save(sys.argv[1], payload)
"""


@pytest.mark.slow
def test_sigkill_during_save_leaves_a_readable_checkpoint(tmp_path):
    path = tmp_path / "latest.pt"
    for delay in (0.0, 0.07, 0.16):
        before = path.stat().st_mtime_ns if path.exists() else 0
        proc = subprocess.Popen([sys.executable, "-c", SAVER, str(path)])
        deadline = time.time() + 120
        while time.time() < deadline and not (path.exists() and path.stat().st_mtime_ns != before):
            time.sleep(0.01)
        time.sleep(delay)  # somewhere inside the next save (each takes about 0.1-0.3 s)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL
        checkpoint.read(path)  # never half-written: the rename is the commit


def test_non_finite_loss_stops_before_the_step(jpeg_folder_4x6, tmp_path, monkeypatch):
    import rmix.engine as engine
    real = engine.mix_loss
    calls = {"n": 0}

    def poisoned(*a, **kw):
        calls["n"] += 1
        loss = real(*a, **kw)
        return loss * float("nan") if calls["n"] == 5 else loss  # epoch 2 (3 steps per epoch), step 1
    monkeypatch.setattr(engine, "mix_loss", poisoned)
    out = tmp_path / "run"
    r = CliRunner().invoke(cli, train_args(jpeg_folder_4x6, out))
    assert r.exit_code == 1
    assert "epoch 2, step 2" in r.output and "non-finite" in r.output
    assert checkpoint.read(out / "latest.pt")["epoch"] == 1  # nothing written after the bad step


def test_preflight_refuses_bad_files_and_names_them(jpeg_folder_4x6, tmp_path):
    import shutil
    data = tmp_path / "data"
    shutil.copytree(jpeg_folder_4x6, data)
    bad = data / "train" / sorted(os.listdir(data / "train"))[0] / "zz_broken.jpg"
    bad.write_bytes(b"")
    r = CliRunner().invoke(cli, train_args(data, tmp_path / "run"))
    assert r.exit_code == 2 and "zz_broken.jpg (zero-byte)" in r.output
    assert len(r.output.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


BAD_INPUTS = [
    (["--epochs", "0"], "--epochs"), (["--epochs", "-3"], "--epochs"), (["--batch-size", "0"], "--batch-size"),
    (["--batch-size", "x"], "--batch-size"), (["--lr", "0"], "--lr"), (["--lr", "-1"], "--lr"),
    (["--aug", "fancymix"], "--aug"), (["--aug-alpha", "0"], "--aug-alpha"), (["--aug-alpha", "1.5"], "--aug-alpha"),
    (["--aug-omega", "-0.5"], "--aug-omega"), (["--interpolate", "cubic"], "--interpolate"),
    (["--smoothing", "1.0"], "--smoothing"), (["--crop-size", "0"], "--crop-size"),
    (["--val-resize", "8", "--crop-size", "16"], "--val-resize"), (["--min-area", "1.5"], "--min-area"),
    (["--workers", "-1"], "--workers"), (["--loader", "ffcv"], "--loader"), (["--optimizer", "lamb"], "--optimizer"),
    (["--schedule", "poly"], "--schedule"), (["--warmup", "5", "--epochs", "3"], "--warmup"),
    (["--milestones", "1,x"], "--milestones"), (["--model", "resnet9000"], "resnet9000"),
    (["--device", "tpu"], "--device"), (["--amp", "fp8"], "--amp"), (["--dataset", "svhn"], "--dataset"),
    (["--resume", "/no/such/ckpt.pt"], "/no/such/ckpt.pt"), (["--resume", "auto"], "--resume"),
    (["--preset", "imagenet-r51"], "--preset"), (["--config", "/no/such.toml"], "--config"),
    (["--max-skipped-steps", "-1"], "--max-skipped-steps"), (["--dist-timeout", "0"], "--dist-timeout"),
]


@pytest.mark.parametrize("args,needle", BAD_INPUTS, ids=[" ".join(a) for a, _ in BAD_INPUTS])
def test_bad_train_input(jpeg_folder_4x6, tmp_path, args, needle):
    base = ["train", "--data-dir", str(jpeg_folder_4x6), "--batch-size", "8", "--epochs", "1"]
    if args[0] != "--resume" or args[1] != "auto":
        base += ["--out", str(tmp_path / "run")]
    r = CliRunner().invoke(cli, base + args)
    assert r.exit_code == 2, (r.exit_code, r.output)
    out = r.output.strip()
    assert needle in out and len(out.splitlines()) == 1 and "Traceback" not in out, out
    assert not (tmp_path / "run" / "latest.pt").exists()


# --- fp16: GradScaler skips overflowing steps; rmix stops after --max-skipped-steps of them in a row ---
# 3 steps per epoch on `jpeg_folder_4x6` (24 images, batch 8). CPU autocast fp16 and the CPU GradScaler work on
# torch 2.14, so these run the real scaler: the poisoned loss (x 1e8) stays finite in fp32, but its
# scaled gradient overflows fp16 in the backward pass, so GradScaler skips the step and backs off.
FP16 = ["--amp", "fp16", "--device", "cpu"]


def _overflow_on(monkeypatch, poisoned_call):
    """Make the mix_loss calls (counted from 1) that `poisoned_call(n)` picks overflow fp16.

    Returns the log of train_step calls: (epoch, step, skipped, parameters unchanged, scale before).
    """
    import rmix.engine as engine
    real_loss, real_step = engine.mix_loss, engine.train_step
    calls, log = {"n": 0}, []

    def overflowing(*a, **kw):
        calls["n"] += 1
        loss = real_loss(*a, **kw)
        return loss * 1e8 if poisoned_call(calls["n"]) else loss

    def spy(model, policy, images, targets, optimizer, scaler, *a, **kw):
        before, scale = [p.detach().clone() for p in model.parameters()], scaler.get_scale()
        result = real_step(model, policy, images, targets, optimizer, scaler, *a, **kw)
        unchanged = all(torch.equal(b, p) for b, p in zip(before, model.parameters()))
        epoch, step = divmod(len(log), 3)  # 3 steps per epoch
        log.append((epoch + 1, step, bool(result[3]), unchanged, scale))
        return result
    monkeypatch.setattr(engine, "mix_loss", overflowing)
    monkeypatch.setattr(engine, "train_step", spy)
    return log


def _error_line(output):
    lines = [line for line in output.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1 and "Traceback" not in output, output
    return lines[0]


def test_fp16_overflow_every_step_stops_after_max_skipped_steps(jpeg_folder_4x6, tmp_path, monkeypatch):
    log = _overflow_on(monkeypatch, lambda n: n >= 4)  # every step from epoch 2, step 0 on
    out = tmp_path / "run"
    r = CliRunner().invoke(cli, train_args(jpeg_folder_4x6, out, *FP16, "--max-skipped-steps", "2"))
    assert r.exit_code == 1, r.output
    line = _error_line(r.output)
    assert "3 steps in a row at epoch 2, step 3" in line and "--max-skipped-steps 2" in line, line
    # epoch 1 trained normally; then exactly max_skipped_steps + 1 = 3 skips, and nothing after them
    assert [(e, s, skipped) for e, s, skipped, _, _ in log] == [
        (1, 0, False), (1, 1, False), (1, 2, False), (2, 0, True), (2, 1, True), (2, 2, True)]
    assert [unchanged for *_, unchanged, _ in log] == [False] * 3 + [True] * 3  # the scaler skipped them
    assert [scale for *_, scale in log] == [65536.0] * 4 + [32768.0, 16384.0]  # and backed off each time
    ckpt = checkpoint.read(out / "latest.pt")
    assert ckpt["epoch"] == 1 and ckpt["scaler"]["scale"] == 65536.0  # nothing written after the skips
    assert [json.loads(x)["epoch"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1]


def test_fp16_isolated_overflows_do_not_stop_the_run(jpeg_folder_4x6, tmp_path, monkeypatch):
    log = _overflow_on(monkeypatch, lambda n: n % 2 == 0)  # one step in every two overflows
    out = tmp_path / "run"
    r = CliRunner().invoke(cli, train_args(jpeg_folder_4x6, out, *FP16, "--max-skipped-steps", "1"))
    assert r.exit_code == 0, r.output  # the counter resets after each good step
    skipped = [s for _, _, s, _, _ in log]
    assert skipped == [False, True] * 4 + [False]  # 9 steps: exactly the poisoned ones were skipped
    assert [unchanged for *_, unchanged, _ in log] == skipped  # a skipped step left the weights as they were
    assert [scale for *_, scale in log] == [65536.0, 65536.0, 32768.0, 32768.0, 16384.0, 16384.0,
                                            8192.0, 8192.0, 4096.0]
    ckpt = checkpoint.read(out / "latest.pt")
    assert ckpt["epoch"] == 3 and ckpt["scaler"]["scale"] == 4096.0  # 4 skips: 65536 / 2**4
    assert [json.loads(x)["epoch"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_fp16_skipped_steps_are_counted_across_epochs(jpeg_folder_4x6, tmp_path, monkeypatch):
    log = _overflow_on(monkeypatch, lambda n: True)  # every step overflows: the weights never change
    out = tmp_path / "run"
    r = CliRunner().invoke(cli, train_args(jpeg_folder_4x6, out, *FP16, "--max-skipped-steps", "3"))
    assert r.exit_code == 1, r.output  # the 4th skip in a row is epoch 2's first step
    assert "4 steps in a row at epoch 2, step 1" in _error_line(r.output)
    assert len(log) == 4 and all(s for _, _, s, _, _ in log)
    assert checkpoint.read(out / "latest.pt")["epoch"] == 1  # epoch 1's 3 skips were within the limit


# --- a JPEG that stops decoding between two runs: caught by the preflight, else named mid-epoch ---
def _cut_after_scan_start(path, keep=8):
    """Keep a JPEG's headers and the first `keep` bytes of its scan data: both decoders fail on it,
    and DALI names it (a data error, unlike a header error)."""
    data = path.read_bytes()
    sos = data.index(b"\xff\xda")
    path.write_bytes(data[:sos + 2 + int.from_bytes(data[sos + 2:sos + 4], "big") + keep])


@pytest.mark.parametrize("loader", ["dali", "torch"])
def test_decode_error_mid_run_stops_and_keeps_the_checkpoint(jpeg_folder_4x6, tmp_path, loader):
    import shutil

    from rmix.config import TrainConfig
    from rmix.pipelines import scan_image_folder, shard_indices
    data = tmp_path / "data"
    shutil.copytree(jpeg_folder_4x6, data)
    out = tmp_path / "run"
    r = CliRunner().invoke(cli, train_args(data, out, "--loader", loader, "--epochs", "1"))
    assert r.exit_code == 0, r.output
    latest, metrics = (out / "latest.pt").read_bytes(), (out / "metrics.jsonl").read_text()
    index = scan_image_folder(data.resolve() / "train")
    order = shard_indices(len(index.files), train=True, seed=TrainConfig().seed, epoch=1, rank=0, world_size=1)
    bad = os.path.join(index.root, index.files[order[9]])  # 0-based epoch 1 = epoch 2; position 9: step 1
    batch = [os.path.join(index.root, index.files[i]) for i in order[8:16]]
    _cut_after_scan_start(tmp_path / bad)
    resume = train_args(data, out, "--loader", loader, "--epochs", "2", "--resume", "auto",
                        "--allow-changes", "epochs")

    r = CliRunner().invoke(cli, resume)  # the preflight refuses it before training
    assert r.exit_code == 2, r.output
    assert f"{bad} (truncated)" in _error_line(r.output) and "epoch 2/" not in r.output

    r = CliRunner().invoke(cli, [*resume, "--no-preflight"])
    assert r.exit_code == 1, r.output
    line = _error_line(r.output)
    assert f"cannot decode {bad} at epoch 2, step 2" in line, line
    assert all(f in line for f in batch), line  # the batch's files, for `rmix data check`
    assert (out / "latest.pt").read_bytes() == latest and checkpoint.read(out / "latest.pt")["epoch"] == 1
    assert (out / "metrics.jsonl").read_text() == metrics
