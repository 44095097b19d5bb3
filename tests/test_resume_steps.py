"""Mid-epoch checkpoints (--save-every-steps): a run cut inside an epoch resumes at that step exactly."""
import signal
import subprocess
import sys
import time

import pytest
import torch

from helpers import THREE_EPOCHS, Cut, assert_same_run, cli_train
from rmix import checkpoint

# jpeg_folder_4x6 (conftest): 24 train images, batch 8: 3 steps per epoch, so --save-every-steps 1 saves
# after steps 1 and 2


@pytest.mark.slow
@pytest.mark.parametrize("loader", ["dali", "torch"])
def test_cut_after_a_mid_epoch_save_resumes_exactly(jpeg_folder_4x6, tmp_path, monkeypatch, uninterrupted_runs, loader):
    real = checkpoint.save

    def save_then_cut(path, payload):  # the process dies right after epoch 2's step-2 checkpoint
        real(path, payload)
        if payload["epoch"] == 1 and payload["step"] == 2:
            raise Cut

    monkeypatch.setattr(checkpoint, "save", save_then_cut)
    out = tmp_path / "cut"
    start = time.perf_counter()
    r = cli_train(jpeg_folder_4x6, out, "--loader", loader, "--save-every-steps", "1")
    wall = time.perf_counter() - start
    assert isinstance(r.exception, Cut), r.output
    ckpt = checkpoint.read(out / "latest.pt")
    assert (ckpt["epoch"], ckpt["step"]) == (1, 2)
    assert 0 < ckpt["partial_ranks"][0]["seconds"] < wall  # the epoch's seconds so far, carried to its img/s
    history = ckpt["partial_ranks"][0]["policy"]["history"]
    assert history is not None and history.shape[0] == 8  # RecursiveMix's history travels along
    monkeypatch.setattr(checkpoint, "save", real)
    r = cli_train(jpeg_folder_4x6, out, "--loader", loader, "--save-every-steps", "1", "--resume", "auto")
    assert r.exit_code == 0, r.output
    assert "now holds" not in r.output  # the same data: no change to report
    assert checkpoint.read(out / "latest.pt")["step"] == 0  # the last save is the epoch end
    assert_same_run(out, uninterrupted_runs[loader])


@pytest.mark.slow
def test_sigkill_with_mid_epoch_saves_resumes_exactly(jpeg_folder_4x6, tmp_path, uninterrupted_runs):
    out = tmp_path / "killed"
    cmd = [sys.executable, "-c", "from rmix import cli; cli.main()", "train", "--data-dir", str(jpeg_folder_4x6),
           "--out", str(out), *THREE_EPOCHS, "--loader", "dali", "--save-every-steps", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:  # wait for a mid-epoch checkpoint of epoch 2
        try:
            ckpt = checkpoint.read(out / "latest.pt")
            if ckpt["epoch"] == 1 and ckpt["step"] > 0:
                break
        except (checkpoint.CheckpointError, FileNotFoundError):
            pass
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)  # wherever it is by now: a step, a save, or the epoch end
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before the kill"
    r = cli_train(jpeg_folder_4x6, out, "--loader", "dali", "--save-every-steps", "1", "--resume", "auto")
    assert r.exit_code == 0, r.output
    assert_same_run(out, uninterrupted_runs["dali"])


def test_save_every_steps_must_not_be_negative(jpeg_folder_4x6, tmp_path):
    r = cli_train(jpeg_folder_4x6, tmp_path / "x", "--save-every-steps", "-2")
    assert r.exit_code == 2 and "--save-every-steps" in r.output and "-2" in r.output
    assert len(r.output.strip().splitlines()) == 1


def test_policy_state_round_trips():
    from rmix.mixing import NoMix, RecursiveMix
    rm = RecursiveMix(3, generator=torch.Generator().manual_seed(0))
    x = torch.rand(4, 3, 8, 8)
    y = torch.tensor([0, 1, 2, 0])
    out = rm(x, y)
    rm.remember(out.images, out.soft_targets, torch.randn(4, 3))
    state = {k: v.clone() for k, v in rm.state_dict().items()}
    other = RecursiveMix(3, generator=torch.Generator().manual_seed(0))
    other.load_state_dict(state)
    gen = rm.generator.get_state()
    a = rm(x.flip(0), y.flip(0))
    other.generator.set_state(gen)
    b = other(x.flip(0), y.flip(0))
    assert torch.equal(a.images, b.images) and torch.equal(a.soft_targets, b.soft_targets)
    assert torch.equal(rm.prev_logits, other.prev_logits)
    assert NoMix(3).state_dict() == {}
