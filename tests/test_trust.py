"""Trust: a run directory belongs to one run, resume means the same run, and mistakes are one line.

Each test makes the mistake a user makes (train into a finished run, two runs into one --out, a
full disk, a changed --lr on resume, a bad config file) and checks what was already written is
byte-for-byte what it was.
"""
import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from helpers import RESNET8_16PX
from rmix import checkpoint
from rmix.cli import cli

TWO_EPOCHS_DEFAULT_LOG = ["--epochs", "2", *RESNET8_16PX]  # --log-every left at its default


def train(data, out, *extra):
    return CliRunner().invoke(cli, ["train", "--data-dir", str(data), "--out", str(out), *TWO_EPOCHS_DEFAULT_LOG,
                                    *extra])


def snapshot(run_dir):
    """{name: sha256} of every file in the run directory."""
    return {str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run_dir.rglob("*")) if p.is_file()}


def one_error_line(output):
    lines = [line for line in output.strip().splitlines() if line.startswith("Error:")]
    assert len(lines) == 1 and "Traceback" not in output, output
    return lines[0]


@pytest.fixture(scope="module")
def finished(jpeg_folder_4x6, tmp_path_factory):
    """A finished 2-epoch run (copied by each test that changes it)."""
    out = tmp_path_factory.mktemp("runs") / "done"
    r = train(jpeg_folder_4x6, out)
    assert r.exit_code == 0, r.output
    return out


def copy_run(finished, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    return run


def test_training_into_a_finished_run_is_refused_and_changes_nothing(jpeg_folder_4x6, finished, tmp_path):
    run = copy_run(finished, tmp_path)
    before = snapshot(run)
    r = train(jpeg_folder_4x6, run)
    assert r.exit_code == 2
    line = one_error_line(r.output)
    assert str(run) in line and "already holds a run" in line and "--resume auto" in line
    assert snapshot(run) == before


def test_resuming_a_finished_run_says_it_is_complete(jpeg_folder_4x6, finished, tmp_path):
    run = copy_run(finished, tmp_path)
    before = snapshot(run)
    r = train(jpeg_folder_4x6, run, "--resume", "auto")
    assert r.exit_code == 0, r.output
    assert "is complete: 2 of 2 epochs trained" in r.output and "Traceback" not in r.output
    assert snapshot(run) == before


HOLDER = """
import fcntl, os, sys, time
f = open(sys.argv[1], "a+")
fcntl.lockf(f, fcntl.LOCK_EX)
f.write(f"{os.getpid()}\\n"); f.flush()
print("locked", flush=True)
time.sleep(600)
"""


def test_a_second_run_into_a_live_run_directory_is_refused_naming_the_pid(jpeg_folder_4x6, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run / ".lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        r = train(jpeg_folder_4x6, run)
        assert r.exit_code == 2
        line = one_error_line(r.output)
        assert f"in use by another rmix run (pid {holder.pid})" in line, line
        assert sorted(os.listdir(run)) == [".lock"]  # nothing of the refused run was written
        r = train(jpeg_folder_4x6, run, "--resume", "auto")  # a resume is refused the same way
        assert r.exit_code == 2 and f"pid {holder.pid}" in r.output
    finally:
        holder.kill()
        holder.wait()
    # the holder died (SIGKILL): the kernel dropped its lock, so the stale .lock blocks nothing
    r = train(jpeg_folder_4x6, run)
    assert r.exit_code == 0, r.output
    assert (run / "latest.pt").is_file()


@pytest.mark.slow
def test_two_runs_started_together_one_is_refused(jpeg_folder_4x6, tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-c", "from rmix import cli; cli.main()", "train", "--data-dir", str(jpeg_folder_4x6),
           "--out", str(run), *TWO_EPOCHS_DEFAULT_LOG, "--epochs", "1"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], outs
    refused = outs[[p.returncode for p in procs].index(2)]
    assert "in use by another rmix run" in refused or "already holds a run" in refused, refused
    epochs = [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1]  # one run's rows, not two interleaved


def test_out_naming_a_file_is_one_line(jpeg_folder_4x6, tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("mine\n")
    r = train(jpeg_folder_4x6, f)
    assert r.exit_code == 2 and "is a file, not a directory" in one_error_line(r.output)
    assert f.read_text() == "mine\n"


def test_read_only_out_is_one_line(jpeg_folder_4x6, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)],
                                           capture_output=True).returncode != 0:
        pytest.skip("needs root to mount a read-only tmpfs (root ignores chmod)")
    try:
        for out in (ro, ro / "run"):
            r = train(jpeg_folder_4x6, out)
            assert r.exit_code == 2, r.output
            line = one_error_line(r.output)
            assert str(out) in line and ("not writable" in line or "Read-only" in line), line
    finally:
        subprocess.run(["umount", str(ro)], check=False)


def test_a_full_disk_during_training_keeps_the_last_checkpoint(jpeg_folder_4x6, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = checkpoint._write

    def filling(f, data):
        calls["n"] += 1
        if calls["n"] >= 3:  # epoch 1 wrote latest.pt and best.pt; epoch 2's latest.pt finds the disk full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(f, data)
    monkeypatch.setattr(checkpoint, "_write", filling)
    run = tmp_path / "run"
    r = train(jpeg_folder_4x6, run)
    assert r.exit_code == 1
    line = one_error_line(r.output)
    assert "latest.pt" in line and "No space left on device" in line and "intact" in line, line
    assert checkpoint.read(run / "latest.pt")["epoch"] == 1
    assert not [p for p in os.listdir(run) if p.startswith(".tmp-")]  # no half-written file left behind


def test_resume_with_another_setting_is_refused_listing_it(jpeg_folder_4x6, finished, tmp_path):
    run = copy_run(finished, tmp_path)
    before = snapshot(run)
    r = train(jpeg_folder_4x6, run, "--resume", "auto", "--lr", "0.5", "--epochs", "3")
    assert r.exit_code == 2
    line = one_error_line(r.output)
    assert "optim.lr: saved 0.1, now 0.5" in line and "epochs: saved 2, now 3" in line, line
    assert "--allow-changes" in line
    r = train(jpeg_folder_4x6, run, "--resume", "auto", "--aug", "cutmix", "--allow-changes", "aug")
    assert r.exit_code == 2
    assert "mix.policy cannot change in a run" in one_error_line(r.output)
    assert snapshot(run) == before


def test_an_allowed_change_continues_and_is_recorded(jpeg_folder_4x6, finished, tmp_path):
    run = copy_run(finished, tmp_path)
    config = (run / "config.json").read_bytes()
    r = train(jpeg_folder_4x6, run, "--resume", "auto", "--epochs", "3", "--allow-changes", "epochs")
    assert r.exit_code == 0, r.output
    assert [json.loads(x)["epoch"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert (run / "config.json").read_bytes() == config  # the run's original settings stay its record
    rows = [json.loads(x) for x in (run / "changes.jsonl").read_text().splitlines()]
    assert rows == [{"from_epoch": 3, "step": 0, "changes": {"epochs": [2, 3]}}]


def test_a_resume_that_repeats_the_same_settings_is_not_a_change(jpeg_folder_4x6, tmp_path):
    run = tmp_path / "run"
    assert train(jpeg_folder_4x6, run, "--epochs", "1").exit_code == 0
    r = train(jpeg_folder_4x6, run, "--resume", "auto", "--epochs", "1", "--workers", "0")  # workers: runtime, free
    assert r.exit_code == 0 and "complete" in r.output, r.output
    assert not (run / "changes.jsonl").exists()


@pytest.mark.parametrize("text,needle", [
    ('epochs = "three"\n', 'epochs: expected an integer, got \'three\''),
    ("batch_size = 8.5\n", "batch_size: expected an integer, got 8.5"),
    ("learnig_rate = 0.1\n", "unknown key 'learnig_rate' at the top level"),
    ("[optim]\nlearnig_rate = 0.1\n", "unknown key 'learnig_rate' in [optim]; valid keys there: gamma, lr,"),
    ("[optim]\nmomentun = 0.9\n", "unknown key 'momentun' in [optim] (did you mean 'momentum'?)"),
    ("[optimiser]\nlr = 0.1\n", "unknown table [optimiser]"),
])
def test_bad_config_files_are_one_line(jpeg_folder_4x6, tmp_path, text, needle):
    cfg = tmp_path / "run.toml"
    cfg.write_text(text)
    r = CliRunner().invoke(cli, ["train", "--config", str(cfg), "--data-dir", str(jpeg_folder_4x6),
                                 "--out", str(tmp_path / "r")])
    assert r.exit_code == 2
    assert needle in one_error_line(r.output)
    assert not (tmp_path / "r").exists()


def test_config_files_take_the_options_names(jpeg_folder_4x6, tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text('lr = 0.05\naug-alpha = 0.3\nepochs = 1\nbatch-size = 8\nmodel = "resnet8"\n'
                   "crop-size = 16\nval-resize = 20\n")
    run = tmp_path / "r"
    r = CliRunner().invoke(cli, ["train", "--config", str(cfg), "--data-dir", str(jpeg_folder_4x6), "--out", str(run)])
    assert r.exit_code == 0, r.output
    saved = json.loads((run / "config.json").read_text())
    assert saved["optim"]["lr"] == 0.05 and saved["mix"]["alpha"] == 0.3 and saved["batch_size"] == 8


def test_a_one_class_dataset_is_refused(jpeg_folder_4x6, tmp_path):
    data = tmp_path / "one"
    for split in ("train", "val"):
        first = sorted(os.listdir(jpeg_folder_4x6 / split))[0]
        shutil.copytree(jpeg_folder_4x6 / split / first, data / split / first)
    r = train(data, tmp_path / "run", "--batch-size", "2")
    assert r.exit_code == 2
    assert "has 1 class" in one_error_line(r.output)
    assert not (tmp_path / "run").exists()  # the run directory it created is removed again


def test_what_is_not_a_checkpoint_says_so(tmp_path):
    text = tmp_path / "notes.pt"
    text.write_text("epoch 3: 91%\n")
    with pytest.raises(checkpoint.CheckpointError, match="not a checkpoint"):
        checkpoint.read(text)
    with pytest.raises(checkpoint.CheckpointError, match="is a directory"):
        checkpoint.read(tmp_path)


@pytest.mark.slow
def test_ctrl_c_names_the_resume(tmp_path, jpeg_folder_4x6):
    cmd = [sys.executable, "-c", "from rmix import cli; cli.main()", "train", "--data-dir", str(jpeg_folder_4x6),
           "--out", str(tmp_path / "r"), *TWO_EPOCHS_DEFAULT_LOG, "--epochs", "200"]
    # Ctrl-C's disposition restored: a suite started in the background (`cmd &`) inherits SIGINT ignored,
    # and Python then installs no handler in the child, rightly (nohup'ed runs ignore Ctrl-C)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 300
    while time.time() < deadline and not (tmp_path / "r" / ".lock").exists():
        time.sleep(0.05)
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)  # as Ctrl-C, to the trainer only
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 1, out
    assert "Aborted!" in out and "--resume auto" in out and "Traceback" not in out, out


def test_the_documented_checkpoint_snippet_loads_a_real_run(finished):
    import re
    from pathlib import Path
    text = (Path(__file__).resolve().parents[1] / "docs" / "RUNS.md").read_text()
    code = re.search(r"loaded the usual way.*?```python\n(.*?)```", text, re.S).group(1)
    ns = {}
    exec(code.replace("runs/rm/best.pt", str(finished / "best.pt")), ns)
    assert ns["ckpt"]["epoch"] >= 1 and set(ns["model"].state_dict()) == set(ns["ckpt"]["model"])


def test_the_cli_bounds_openmp_spinning_before_torch_loads_and_keeps_a_users_value():
    code = "import os, sys; from rmix import cli; print(os.environ['GOMP_SPINCOUNT'])"
    env = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"}
    assert subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True).stdout.strip() == "10000"
    env["GOMP_SPINCOUNT"] = "500"
    assert subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True).stdout.strip() == "500"
