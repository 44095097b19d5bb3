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

from cli import cli
from rmix import checkpoint
from rmix.synth import synth_dataset

TINY = ["--epochs", "3", "--batch-size", "8", "--crop-size", "16", "--val-resize", "20", "--model", "resnet8",
        "--workers", "1", "--log-every", "1"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return synth_dataset(tmp_path_factory.mktemp("d") / "tiny", classes=4, train_per_class=6, val_per_class=3,
                         width=24, height=24)


def train_args(data, out, *extra):
    return ["train", "--data-dir", str(data), "--out", str(out), *TINY, *extra]


def weights(run_dir):
    return checkpoint.read(run_dir / "latest.pt")["model"]


@pytest.mark.parametrize("loader", ["dali", "torch"])
def test_sigkill_then_resume_is_bit_identical(tiny, tmp_path, loader):
    ref = tmp_path / "ref"
    r = CliRunner().invoke(cli, train_args(tiny, ref, "--loader", loader), catch_exceptions=False)
    assert r.exit_code == 0, r.output
    run = tmp_path / "killed"
    cmd = [sys.executable, "-c", "import cli; cli.main()", *train_args(tiny, run, "--loader", loader)]
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
    r = CliRunner().invoke(cli, train_args(tiny, run, "--loader", loader, "--resume", "auto"), catch_exceptions=False)
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


def test_non_finite_loss_stops_before_the_step(tiny, tmp_path, monkeypatch):
    import rmix.engine as engine
    real = engine.mix_loss
    calls = {"n": 0}

    def poisoned(*a, **kw):
        calls["n"] += 1
        loss = real(*a, **kw)
        return loss * float("nan") if calls["n"] == 5 else loss  # epoch 2 (3 steps per epoch), step 1
    monkeypatch.setattr(engine, "mix_loss", poisoned)
    out = tmp_path / "run"
    r = CliRunner().invoke(cli, train_args(tiny, out))
    assert r.exit_code == 1
    assert "epoch 2, step 1" in r.output and "non-finite" in r.output
    assert checkpoint.read(out / "latest.pt")["epoch"] == 1  # nothing written after the bad step


def test_preflight_refuses_bad_files_and_names_them(tiny, tmp_path):
    import shutil
    data = tmp_path / "data"
    shutil.copytree(tiny, data)
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
    (["--device", "tpu"], "--device"), (["--amp", "fp8"], "--amp"), (["--dataset", "mnist"], "--dataset"),
    (["--resume", "/no/such/ckpt.pt"], "/no/such/ckpt.pt"), (["--resume", "auto"], "--resume"),
    (["--preset", "imagenet-r51"], "--preset"), (["--config", "/no/such.toml"], "--config"),
    (["--max-skipped-steps", "-1"], "--max-skipped-steps"), (["--dist-timeout", "0"], "--dist-timeout"),
]


@pytest.mark.parametrize("args,needle", BAD_INPUTS, ids=[" ".join(a) for a, _ in BAD_INPUTS])
def test_bad_train_input(tiny, tmp_path, args, needle):
    base = ["train", "--data-dir", str(tiny), "--batch-size", "8", "--epochs", "1"]
    if args[0] != "--resume" or args[1] != "auto":
        base += ["--out", str(tmp_path / "run")]
    r = CliRunner().invoke(cli, base + args)
    assert r.exit_code == 2, (r.exit_code, r.output)
    out = r.output.strip()
    assert needle in out and len(out.splitlines()) == 1 and "Traceback" not in out, out
    assert not (tmp_path / "run" / "latest.pt").exists()
