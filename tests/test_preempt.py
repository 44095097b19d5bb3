"""Preemption: SIGTERM/SIGUSR1 finish the current step, save latest.pt there, exit 0; a resume is exact."""
import os
import signal
import subprocess
import sys
import time

import pytest

import rmix.engine as engine
from helpers import assert_same_run, cli_train, train_args
from rmix import checkpoint
from rmix.preempt import Preemption

# jpeg_folder_4x6 (conftest): 24 train images, batch 8: 3 steps per epoch, 3 epochs (helpers.THREE_EPOCHS)


def signal_at(monkeypatch, call, sig=signal.SIGTERM):
    """Send this process `sig` while the `call`-th optimizer step runs (as a scheduler would, at any time)."""
    real, calls = engine.train_step, [0]

    def step_then_signal(*args, **kwargs):
        calls[0] += 1
        if calls[0] == call:
            os.kill(os.getpid(), sig)  # the handler only sets a flag: this step still completes
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "train_step", step_then_signal)


@pytest.mark.slow
@pytest.mark.parametrize("loader", ["dali", "torch"])
def test_sigterm_mid_epoch_saves_that_step_and_resumes_exactly(jpeg_folder_4x6, tmp_path, monkeypatch,
                                                               uninterrupted_runs, loader):
    signal_at(monkeypatch, 5)  # epoch 2, step 2 of 3
    out = tmp_path / "run"
    r = cli_train(jpeg_folder_4x6, out, "--loader", loader)
    assert r.exit_code == 0, r.output
    assert "stopped by SIGTERM at epoch 2, step 2;" in r.output and "--resume auto" in r.output
    assert "Traceback" not in r.output
    ckpt = checkpoint.read(out / "latest.pt")
    assert (ckpt["epoch"], ckpt["step"]) == (1, 2)
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the handler is the run's only
    monkeypatch.undo()
    r = cli_train(jpeg_folder_4x6, out, "--loader", loader, "--resume", "auto")
    assert r.exit_code == 0 and "resuming at epoch 2, step 2 " in r.output, r.output
    assert_same_run(out, uninterrupted_runs[loader])


@pytest.mark.slow
def test_sigusr1_at_an_epoch_end_saves_the_epoch_and_resumes_exactly(jpeg_folder_4x6, tmp_path, monkeypatch,
                                                                     uninterrupted_runs):
    signal_at(monkeypatch, 3, signal.SIGUSR1)  # the last step of epoch 1: the epoch ends, evaluates, saves
    out = tmp_path / "run"
    r = cli_train(jpeg_folder_4x6, out, "--loader", "torch")
    assert r.exit_code == 0, r.output
    assert "stopped by SIGUSR1 at the start of epoch 2;" in r.output
    ckpt = checkpoint.read(out / "latest.pt")
    assert (ckpt["epoch"], ckpt["step"]) == (1, 0)
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1
    monkeypatch.undo()
    r = cli_train(jpeg_folder_4x6, out, "--loader", "torch", "--resume", "auto")
    assert r.exit_code == 0, r.output
    assert_same_run(out, uninterrupted_runs["torch"])


@pytest.mark.slow
def test_a_signal_in_the_last_epoch_lets_the_run_finish(jpeg_folder_4x6, tmp_path, monkeypatch, uninterrupted_runs):
    signal_at(monkeypatch, 9)  # the very last step: nothing is left to resume
    out = tmp_path / "run"
    r = cli_train(jpeg_folder_4x6, out, "--loader", "torch")
    assert r.exit_code == 0 and "stopped by" not in r.output and "best val top-1" in r.output, r.output
    assert_same_run(out, uninterrupted_runs["torch"])


def test_preemption_restores_the_handlers_it_replaced():
    mine = lambda *a: None  # noqa: E731
    old = signal.signal(signal.SIGUSR1, mine)
    try:
        with Preemption() as p:
            os.kill(os.getpid(), signal.SIGUSR1)
            assert p.stop(1) and p.signal == "SIGUSR1" and p.at == 1
        assert signal.getsignal(signal.SIGUSR1) is mine
    finally:
        signal.signal(signal.SIGUSR1, old)


@pytest.mark.slow
def test_sigterm_to_the_cli_exits_0_with_the_way_to_resume(jpeg_folder_4x6, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-c", "from rmix import cli; cli.main()", *train_args(jpeg_folder_4x6, out,
                                                                                 "--loader", "torch"),
           "--epochs", "500"]  # far more than the time to the signal
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "metrics.jsonl").is_file():  # past the first epoch's end
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr and "stopped by SIGTERM at " in stderr, stderr
    assert "best val top-1" not in stdout  # not reported as a finished run
    ckpt = checkpoint.read(out / "latest.pt")
    said = stderr.split("stopped by SIGTERM at ")[1].split(";")[0]
    want = f"epoch {ckpt['epoch'] + 1}, step {ckpt['step']}" if ckpt["step"] else f"the start of epoch {ckpt['epoch'] + 1}"
    assert said == want  # the line names the checkpoint it wrote
