"""SLURM without SLURM: rmix reads a step's variables, and scripts/slurm's sbatch script preempts,
saves, requeues and resumes, with stand-ins for srun and scontrol (tests/slurm_stub) on PATH."""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import ROOT
from rmix import checkpoint
from rmix.dist import first_host, slurm_env, slurm_port

ARGS = ["--model", "resnet8", "--crop-size", "16", "--val-resize", "20", "--workers", "1", "--batch-size", "8",
        "--epochs", "4", "--loader", "torch", "--log-every", "1"]
STEP = {"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "123456",
        "SLURM_JOB_NODELIST": "gpu[007-008]", "SLURM_NTASKS_PER_NODE": "1(x2)", "SLURM_JOB_NAME": "r50"}


@pytest.mark.parametrize("nodelist,first", [("node1", "node1"), ("gpu[003-010,017],cpu1", "gpu003"),
                                            ("rack[1-2]-n[07-08]", "rack1-n07"), ("n[1,3]", "n1"),
                                            ("host-1,host-2", "host-1"), ("x[010]", "x010")])
def test_first_host_of_a_nodelist(nodelist, first):
    assert first_host(nodelist) == first


@pytest.mark.parametrize("bad", ["", "n[1-2", "]x", "a]b", "[1-2]", "1", "12,n1"])
def test_an_unreadable_nodelist_is_one_line(bad):
    with pytest.raises(ValueError, match="SLURM_JOB_NODELIST"):
        first_host(bad)


def test_a_slurm_step_gives_torch_its_variables():
    assert slurm_env(STEP) == {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "1",
                               "MASTER_ADDR": "gpu007", "MASTER_PORT": str(15000 + 3456)}
    assert slurm_port("123456") == 18456 and slurm_port("7") == 15007


@pytest.mark.parametrize("change", [
    {"WORLD_SIZE": "2", "RANK": "0"},                     # torchrun's variables win (srun + torchrun)
    {"SLURM_NTASKS": "1"},                                 # one task: one process
    {"SLURM_JOB_NAME": "interactive"},                     # an salloc shell, as Lightning reads it
])
def test_torchrun_or_a_single_task_leave_the_environment_alone(change):
    assert slurm_env({**STEP, **change}) == {}


def test_the_sites_master_wins():
    env = slurm_env({**STEP, "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"})
    assert (env["MASTER_ADDR"], env["MASTER_PORT"]) == ("10.0.0.1", "29500")


def free_job_id():
    """A job id whose port (15000 + its last 4 digits) is free here."""
    for _ in range(50):
        job = 1000 + int.from_bytes(os.urandom(2), "little") % 9000
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", slurm_port(str(job))))
                return str(job)
            except OSError:
                continue
    pytest.skip("no free port in 15000-24999")


def sbatch(script, tmp_path, out, job, data):
    """Start `script` as sbatch would on one node of two tasks; stand-ins for srun and scontrol first on PATH."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT") and not k.startswith("SLURM_")}
    env.update(PATH=os.pathsep.join([str(ROOT / "tests/slurm_stub"), str(Path(sys.executable).parent), env["PATH"]]),
               SLURM_JOB_ID=job, SLURM_NTASKS="2", SLURM_NTASKS_PER_NODE="2", SLURM_JOB_NODELIST="localhost",
               SLURM_JOB_NAME="rmix", SLURM_CPUS_PER_TASK="2", SCONTROL_LOG=str(tmp_path / "scontrol.log"))
    return subprocess.Popen(["bash", str(ROOT / "scripts/slurm" / script), "--data-dir", str(data), *ARGS,
                             "--out", str(out)], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def finish(p, timeout=300):
    try:
        out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        pytest.fail("the sbatch script did not end")
    return p.returncode, out


def weights(run):
    return checkpoint.read(run / "latest.pt")["model"]


@pytest.mark.slow
def test_sbatch_preempts_saves_requeues_and_the_requeued_job_ends_as_an_uninterrupted_one(tmp_path, jpeg_folder_4x8):
    job = free_job_id()
    rc, out = finish(sbatch("one_node.sbatch", tmp_path, tmp_path / "ref", job, jpeg_folder_4x8))
    assert rc == 0, out
    assert not (tmp_path / "scontrol.log").exists()  # no warning, no requeue
    run = tmp_path / "run"
    p = sbatch("one_node.sbatch", tmp_path, run, job, jpeg_folder_4x8)
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None:  # SLURM's warning comes once epoch 1 is saved
        try:
            if checkpoint.read(run / "latest.pt")["epoch"] >= 1:
                break
        except (checkpoint.CheckpointError, FileNotFoundError):
            pass
        time.sleep(0.05)
    os.kill(p.pid, signal.SIGUSR1)  # --signal=B:USR1@180: to the batch script
    rc, out = finish(p)
    assert rc == 0, out
    assert (tmp_path / "scontrol.log").read_text() == f"requeue {job}\n", out  # after rmix had saved
    ckpt = checkpoint.read(run / "latest.pt")
    assert ckpt["epoch"] < 4, "the run ended before SLURM's warning"
    if ckpt["step"]:  # stopped inside an epoch: both ranks at the same step
        assert [r["step"] for r in ckpt["partial_ranks"]] == [ckpt["step"]] * 2
    assert "stopped by SIGUSR1" in out and "Traceback" not in out, out
    rc, out = finish(sbatch("one_node.sbatch", tmp_path, run, job, jpeg_folder_4x8))  # the requeued job
    assert rc == 0 and "resuming at epoch" in out, out
    want, got = weights(tmp_path / "ref"), weights(run)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0, msg=k)
    rows = [[json.loads(r)[k] for k in ("epoch", "train_loss", "val_top1")]
            for d in (tmp_path / "ref", run) for r in (d / "metrics.jsonl").read_text().splitlines()]
    assert rows[:4] == rows[4:]


@pytest.mark.parametrize("script", ["one_node.sbatch", "multi_node_srun.sbatch", "multi_node_torchrun.sbatch"])
def test_sbatch_scripts_are_valid_bash_with_the_preemption_settings(script):
    path = ROOT / "scripts/slurm" / script
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    text = path.read_text()
    assert "#SBATCH --signal=B:USR1@180" in text and "#SBATCH --requeue" in text
    assert 'scontrol requeue "$SLURM_JOB_ID"' in text and "--resume auto" in text


@pytest.mark.parametrize("env,message", [
    ({"WORLD_SIZE": "abc"}, "WORLD_SIZE='abc': not an integer"),
    ({"WORLD_SIZE": "2", "RANK": "x"}, "RANK='x': not an integer"),
    ({"WORLD_SIZE": "2", "RANK": "2"}, "RANK=2: must be below WORLD_SIZE=2"),
    ({"WORLD_SIZE": "1", "RANK": "1"}, "RANK=1: must be below WORLD_SIZE=1"),
    ({"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "-1"}, "LOCAL_RANK=-1: must be >= 0"),
    ({"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "http"}, "MASTER_PORT='http'"),
    ({"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "no.such.host.invalid", "MASTER_PORT": "29514"},
     "MASTER_ADDR=no.such.host.invalid: no such host"),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "abc"}, "SLURM_NTASKS='abc': not an integer"),
    ({"SLURM_PROCID": "zero", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "n1"}, "SLURM_PROCID='zero'"),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_STEP_NODELIST": "n[1-", "SLURM_JOB_NODELIST": "n1"},
     "SLURM_STEP_NODELIST: cannot read a host")])
def test_launch_variables_that_are_not_what_they_claim_name_themselves(monkeypatch, env, message):
    from rmix import dist
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS",
              "SLURM_STEP_NUM_TASKS", "SLURM_JOB_NODELIST", "SLURM_STEP_NODELIST", "SLURM_JOB_NAME",
              "TORCHELASTIC_USE_AGENT_STORE"):
        monkeypatch.setenv(k, "")
        monkeypatch.delenv(k)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ValueError, match=re.escape(message)):
        dist.setup("cpu", timeout_s=5)


def lone_rank(tmp_path, rank, timeout):
    """`rmix train` as rank `rank` of 2 at a free port where nobody else comes: (result, port)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TORCHELASTIC"))}
    env.update(WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    r = subprocess.run([sys.executable, "-m", "rmix", "train", "--epochs", "1", "--dist-timeout", str(timeout), "--out",
                        str(tmp_path / "run"), "--device", "cpu"], env=env, capture_output=True, text=True, timeout=120)
    return r, port


@pytest.mark.slow
def test_a_lone_rank_says_whom_it_waits_for_and_ends_in_one_line(tmp_path):
    r, port = lone_rank(tmp_path, 0, 6)
    assert r.returncode == 2, r.stderr[-2000:]
    assert f"rmix: rank 0: waiting for the other 1 process(es) of the job at 127.0.0.1:{port}" in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("Error: rank 0: the other 1 process(es) of the job did not join"), r.stderr[-2000:]


@pytest.mark.slow
def test_a_lone_non_master_rank_says_whom_it_waits_for_and_ends_in_one_line(tmp_path):
    # nothing listens at MASTER_PORT: rank 1 waits for rank 0's store, then one line (no C++ backtraces)
    r, port = lone_rank(tmp_path, 1, 4)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert lines[0] == (f"rmix: rank 1: waiting for the other 1 process(es) of the job at 127.0.0.1:{port} "
                        "(up to --dist-timeout 4 s)"), r.stderr[-2000:]
    assert len(lines) == 2 and lines[1].startswith(f"Error: rank 1: rank 0 of the job did not start its store at "
                                                   f"127.0.0.1:{port}"), r.stderr[-2000:]
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_master_port_in_use_is_named(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TORCHELASTIC"))}
        env.update(WORLD_SIZE="2", RANK="0", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        r = subprocess.run([sys.executable, "-m", "rmix", "train", "--epochs", "1", "--dist-timeout", "20", "--out",
                            str(tmp_path / "run"), "--device", "cpu"], env=env, capture_output=True, text=True,
                           timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1].startswith(f"Error: MASTER_PORT={port}: the port is in use"), r.stderr[-2000:]


@pytest.mark.parametrize("env,message", [
    ({"RANK": "1"}, "RANK=1 but WORLD_SIZE is not set"),
    ({"SLURM_PROCID": "3", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "n1"}, "SLURM_PROCID=3: must be below SLURM_NTASKS=2")])
def test_launch_variables_that_contradict_each_other_name_themselves(monkeypatch, env, message):
    test_launch_variables_that_are_not_what_they_claim_name_themselves(monkeypatch, env, message)


@pytest.mark.slow
def test_a_master_that_is_not_a_store_is_one_line(tmp_path):
    # something else listens on MASTER_PORT (a web server, say): rank 1 cannot join, and says so
    import threading
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]

    def answer():
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            conn.sendall(b"HTTP/1.0 400 Bad Request\r\n\r\n")
            conn.close()
    threading.Thread(target=answer, daemon=True).start()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TORCHELASTIC"))}
    env.update(WORLD_SIZE="2", RANK="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        r = subprocess.run([sys.executable, "-m", "rmix", "train", "--epochs", "1", "--dist-timeout", "6", "--out",
                            str(tmp_path / "run"), "--device", "cpu"], env=env, capture_output=True, text=True,
                           timeout=180)
    finally:
        server.close()
    assert r.returncode == 2, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("Error: rank 1:") and "lost contact" not in last, r.stderr[-3000:]
    # torch's store client logs ~60 C++ frames per failed read: held while joining, dropped on failure
    assert "frame #" not in r.stderr and "TCPStore" not in r.stderr, r.stderr[-3000:]
