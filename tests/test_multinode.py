"""Two nodes on one machine: two torchrun launchers meeting at a c10d rendezvous (gloo), and ranks
started with only the variables a Kubernetes PyTorchJob sets. Each result is compared bit for bit
with the 2-process standalone run of the same world size."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import ROOT, TWO_EPOCHS_TORCH, launch, launch_env
from rmix import checkpoint


@pytest.fixture(scope="module")
def standalone(jpeg_folder_4x8, tmp_path_factory):
    """The reference: `torchrun --standalone --nproc_per_node 2`, 3 epochs."""
    cwd = tmp_path_factory.mktemp("standalone")
    rc, out = launch(["-m", "rmix", "train", "--data-dir", jpeg_folder_4x8, *TWO_EPOCHS_TORCH, "--epochs", "3",
                      "--out", "run"], cwd=cwd)
    assert rc == 0, out
    return cwd / "run"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node(args, cwd, port, *, env=None, torchrun=()):
    """One node's torchrun: 1 rank, a c10d rendezvous of 2 nodes at 127.0.0.1:port."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
           "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "job", *torchrun,
           *[str(a) for a in args]]
    # each agent counts its restarts, and a node whose rank did not fail restarts with count 0: torch's
    # per-attempt keys in the shared store then mix rounds (pytorch#135712); a store per round avoids it
    env = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1", **(env or {})}
    return subprocess.Popen(cmd, cwd=cwd, env=launch_env(env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def wait_all(procs, timeout=300):
    outs = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                kill_tree(q.pid)
            pytest.fail("a node did not end")
        outs.append((p.returncode, out))
    return outs


def descendants(pid):
    """pid's children, grandchildren, ... from /proc (torchrun's ranks run in sessions of their own)."""
    parents = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            parents.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        kids = parents.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def kill_tree(pid):
    """A node lost: the launcher and every process under it, at once."""
    for p in [pid, *descendants(pid)]:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def same_run(got, want):
    w, g = checkpoint.read(want / "latest.pt"), checkpoint.read(got / "latest.pt")
    assert g["epoch"] == w["epoch"]
    for k in w["model"]:
        torch.testing.assert_close(g["model"][k], w["model"][k], rtol=0, atol=0, msg=k)
    rows = [[[json.loads(r)[k] for k in ("epoch", "train_loss", "val_top1")]
             for r in (d / "metrics.jsonl").read_text().splitlines()] for d in (got, want)]
    assert rows[0] == rows[1]


def train_args(data, *extra):
    return [ROOT / "tests/ddp_cli.py", "train", "--data-dir", data, *TWO_EPOCHS_TORCH, "--epochs", "3", "--out", "run",
            "--resume", "auto", *extra]


@pytest.mark.slow
def test_two_nodes_train_as_one_standalone_job(jpeg_folder_4x8, standalone, tmp_path):
    port = free_port()
    outs = wait_all([node(train_args(jpeg_folder_4x8), tmp_path, port), node(train_args(jpeg_folder_4x8), tmp_path,
                                                                             port)])
    assert all(rc == 0 for rc, _ in outs), outs
    same_run(tmp_path / "run", standalone)


@pytest.mark.slow
def test_a_killed_rank_on_one_node_restarts_both_and_the_job_ends_as_if_uninterrupted(jpeg_folder_4x8, standalone,
                                                                                      tmp_path):
    port = free_port()
    # the rank of whichever node holds rank 1 SIGKILLs itself as epoch 2 starts, once (the marker)
    env = {"RMIX_TEST_CRASH_EPOCH": "2", "RMIX_TEST_CRASH_MARKER": str(tmp_path / "crashed")}
    restarts = ["--max-restarts", "1"]
    outs = wait_all([node(train_args(jpeg_folder_4x8), tmp_path, port, env=env, torchrun=restarts),
                     node(train_args(jpeg_folder_4x8), tmp_path, port, env=env, torchrun=restarts)])
    assert all(rc == 0 for rc, _ in outs), outs
    assert (tmp_path / "crashed").is_file() and any("resuming at epoch 2" in out for _, out in outs), outs
    same_run(tmp_path / "run", standalone)


@pytest.mark.slow
def test_a_lost_node_ends_the_job_on_the_other_and_both_relaunched_continue_exactly(jpeg_folder_4x8, standalone,
                                                                                    tmp_path):
    port = free_port()
    args = train_args(jpeg_folder_4x8, "--dist-timeout", "20")
    rdzv = ["--rdzv_conf", "join_timeout=30,close_timeout=10"]
    first = node(args, tmp_path, port, torchrun=rdzv)
    time.sleep(2)  # the first node hosts the rendezvous store; the second is the one lost
    second = node(args, tmp_path, port, torchrun=rdzv)
    deadline = time.time() + 300
    while time.time() < deadline and not (tmp_path / "run/metrics.jsonl").is_file():
        time.sleep(0.1)  # epoch 1 saved: lose the node during epoch 2
    kill_tree(second.pid)
    (rc, out), = wait_all([first], timeout=120)  # within --dist-timeout and the rendezvous' timeouts, or it fails
    assert rc != 0, out
    errors = [line for line in out.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and "another process of the job" in errors[0], out
    second.communicate()
    port = free_port()
    outs = wait_all([node(args, tmp_path, port), node(args, tmp_path, port)])
    assert all(rc == 0 for rc, _ in outs), outs
    same_run(tmp_path / "run", standalone)


@pytest.mark.slow
def test_ranks_started_with_a_pytorchjobs_variables_train_as_torchrun_does(jpeg_folder_4x8, standalone, tmp_path):
    # Kubeflow's PyTorchJob (no elastic policy) sets MASTER_ADDR, MASTER_PORT, WORLD_SIZE and RANK in each pod
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, "-m", "rmix", "train", "--data-dir", str(jpeg_folder_4x8),
                               *TWO_EPOCHS_TORCH, "--epochs", "3",
                               "--out", "run"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env=launch_env({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
                                                         "WORLD_SIZE": "2", "RANK": str(r)}), start_new_session=True)
             for r in (0, 1)]
    outs = wait_all(procs)
    assert all(rc == 0 for rc, _ in outs), outs
    same_run(tmp_path / "run", standalone)
