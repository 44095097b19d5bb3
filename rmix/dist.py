"""torch.distributed as torchrun sets it up: NCCL on GPUs, gloo on CPUs. Nothing home-made.

Launch with `torchrun --nproc_per_node=N --no-python rmix train ...` (multi-node: docs/DISTRIBUTED.md).
A dead rank is torchrun's to report: its elastic agent tears the other ranks down and exits
non-zero naming the rank; the process-group timeout bounds any collective that waits longer.

Without torchrun, a SLURM step of one task per process (`srun --ntasks-per-node=G rmix train`,
what Lightning and submitit users run) is understood from SLURM's variables, as Lightning reads
them: rank SLURM_PROCID of SLURM_NTASKS, local rank SLURM_LOCALID, the master the first host of
SLURM_JOB_NODELIST on a port derived from SLURM_JOB_ID. torchrun's variables win when both are set
(`srun torchrun ...`: one torchrun per node).
"""
import contextlib
import datetime
import os
import re
import socket
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from rmix.pipelines.errors import one_line


@dataclass(frozen=True)
class Dist:
    """This process's place in the job (torchrun's RANK, WORLD_SIZE, LOCAL_RANK); one process is rank 0 of 1.
    Passed around as `world`."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self):
        return self.world_size > 1

    @property
    def is_main(self):
        return self.rank == 0


def setup(device_type: str, timeout_s: float = 1800) -> Dist:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); a no-op otherwise.

    Args:
        timeout_s: how long a collective may wait for the other ranks before it raises.
    """
    os.environ.update(slurm_env(os.environ))
    world_size = env_int(os.environ, "WORLD_SIZE", 1, low=1)
    if "WORLD_SIZE" not in os.environ and env_int(os.environ, "RANK", 0, low=0) > 0:
        raise ValueError(f"RANK={os.environ['RANK']} but WORLD_SIZE is not set: launch with torchrun, or set both")
    if "WORLD_SIZE" in os.environ and env_int(os.environ, "RANK", 0, low=0) >= world_size:
        raise ValueError(f"RANK={os.environ['RANK']}: must be below WORLD_SIZE={world_size}")
    if world_size <= 1:
        return Dist()
    rank = env_int(os.environ, "RANK", None, low=0)
    if rank is None:
        raise ValueError(f"WORLD_SIZE={world_size} but RANK is not set: launch with torchrun, or set RANK and MASTER_ADDR")
    if rank >= world_size:
        raise ValueError(f"RANK={rank}: must be below WORLD_SIZE={world_size}")
    local = env_int(os.environ, "LOCAL_RANK", 0, low=0)
    if "MASTER_PORT" in os.environ and env_int(os.environ, "MASTER_PORT", None, low=1) > 65535:
        raise ValueError(f"MASTER_PORT={os.environ['MASTER_PORT']}: must be at most 65535")
    if device_type == "cuda":
        # before init: NCCL binds each rank to its own GPU. A SLURM task bound to one GPU
        # (--gpus-per-task=1) sees it as cuda:0 whatever its local rank.
        local = local % torch.cuda.device_count()
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        timeout = datetime.timedelta(seconds=timeout_s)
        if os.environ.get("MASTER_ADDR"):  # torch's store would print C++ backtraces, then a timeout
            try:
                socket.getaddrinfo(os.environ["MASTER_ADDR"], None)
            except (socket.gaierror, UnicodeError):
                raise ValueError(f"MASTER_ADDR={os.environ['MASTER_ADDR']}: no such host (cannot resolve it)") \
                    from None
        at = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
        with _stderr_held() as visible, \
                _said_while_waiting(f"rank {rank}: waiting for the other {world_size - 1} process(es) of the job at {at} "
                                    f"(up to --dist-timeout {timeout_s:g} s)", after=min(WAIT_SAY_S, timeout_s / 2),
                                    stream=visible):
            try:
                store = _attempt_store(timeout)
                where = dict(store=store, rank=rank, world_size=world_size) if store else {}
                if device_type == "cuda":
                    where["device_id"] = torch.device("cuda", local)  # NCCL's barrier then knows its device
                if rank > 0 and store is None:
                    _wait_for_master(rank, world_size, at, timeout_s)
                dist.init_process_group(backend, timeout=timeout, **where)
            except (RuntimeError, dist.DistError) as e:
                text = str(e)
                if "address already in use" in text.lower() or "EADDRINUSE" in text:
                    raise ValueError(f"MASTER_PORT={os.environ.get('MASTER_PORT')}: the port is in use on "
                                     f"{os.environ.get('MASTER_ADDR')}; choose another (torchrun --master-port)") \
                        from None
                if "timed out" in text.lower() or "timeout" in text.lower():
                    raise ValueError(f"rank {rank}: the other {world_size - 1} process(es) of the job did not join at {at} "
                                     f"within --dist-timeout {timeout_s:g} s; start them all (WORLD_SIZE={world_size})") \
                        from None
                first = one_line(e, 200, typed=False, ellipsis=False, first_line=True)
                raise ValueError(f"rank {rank}: cannot join the job at {at} ({first}); check MASTER_ADDR and "
                                 f"MASTER_PORT, and that every process of the job starts (WORLD_SIZE={world_size})") from None
    return Dist(dist.get_rank(), dist.get_world_size(), local)


def _wait_for_master(rank, world_size, at, timeout_s):
    """Until MASTER_ADDR:MASTER_PORT accepts a connection: rank 0's store is up.

    Waited for here, not in torch's store client, whose every failed try logs a C++ backtrace.
    """
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not addr or not port:
        return  # torch names what is missing
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection((addr, int(port)), timeout=min(2.0, timeout_s)).close()
            return
        except socket.gaierror:
            raise ValueError(f"MASTER_ADDR={addr}: no such host (cannot resolve it)") from None
        except OSError:
            if time.monotonic() >= deadline:
                raise ValueError(f"rank {rank}: rank 0 of the job did not start its store at {at} within "
                                 f"--dist-timeout {timeout_s:g} s; start them all (WORLD_SIZE={world_size})") from None
            time.sleep(0.2)


WAIT_SAY_S = 15.0  # a rendezvous longer than this is said, once: the job waits, and for whom


@contextlib.contextmanager
def _stderr_held():
    """The block's stderr (fd 2: torch's C++ store logs a backtrace of some 60 frames for a peer that is
    no store) kept aside: written out if the block succeeds, dropped if it raises, whose one line says
    what failed. Yields a stream to the terminal's stderr for what must show meanwhile."""
    sys.stderr.flush()
    saved = os.dup(2)
    visible = os.fdopen(os.dup(saved), "w")
    ok = False
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield visible
            ok = True
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            visible.close()
            held.seek(0)
            data = held.read()
            if ok and data:
                os.write(2, data)


@contextlib.contextmanager
def _said_while_waiting(line, after=None, stream=None):
    """Print `line` once (stderr, or `stream`) if the block is still running `after` seconds on; silent otherwise."""
    timer = threading.Timer(WAIT_SAY_S if after is None else after,
                            lambda: print(f"rmix: {line}", file=stream or sys.stderr, flush=True))
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def env_int(env, name, default, low=None):
    """An integer environment variable, or `default` where unset; ValueError naming it where it is not one."""
    text = env.get(name)
    if text is None or text == "":
        return default
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{name}={text!r}: not an integer") from None
    if low is not None and value < low:
        raise ValueError(f"{name}={value}: must be >= {low}")
    return value


def slurm_env(env) -> dict:
    """torch.distributed's variables from a SLURM step's, where no launcher set them; else {}.

    Only a step of several tasks counts (srun with one task per process): a batch script or an
    interactive allocation (job name bash/interactive, as Lightning reads it) is one process.
    MASTER_ADDR/MASTER_PORT already in the environment win (a site's own choice).
    """
    if "WORLD_SIZE" in env or "SLURM_PROCID" not in env or env.get("SLURM_JOB_NAME") in ("bash", "interactive"):
        return {}
    tasks_var = "SLURM_STEP_NUM_TASKS" if env.get("SLURM_STEP_NUM_TASKS") else "SLURM_NTASKS"
    tasks = env_int(env, tasks_var, 1, low=1)
    if tasks <= 1:
        return {}
    procid = env_int(env, "SLURM_PROCID", 0, low=0)
    if procid >= tasks:
        raise ValueError(f"SLURM_PROCID={procid}: must be below {tasks_var}={tasks}")
    local = env_int(env, "SLURM_LOCALID", 0, low=0)
    nodes_var = "SLURM_STEP_NODELIST" if env.get("SLURM_STEP_NODELIST") else "SLURM_JOB_NODELIST"
    nodes = env.get(nodes_var)
    if not nodes and "MASTER_ADDR" not in env:
        raise ValueError("SLURM: SLURM_PROCID and SLURM_NTASKS are set but SLURM_JOB_NODELIST is not; "
                         "set MASTER_ADDR to the first node's address")
    return {"RANK": str(procid), "WORLD_SIZE": str(tasks), "LOCAL_RANK": str(local),
            "LOCAL_WORLD_SIZE": re.split(r"[(,]", env.get("SLURM_NTASKS_PER_NODE", ""))[0] or "1",  # "2(x3)"
            "MASTER_ADDR": env.get("MASTER_ADDR") or first_host(nodes, nodes_var),
            "MASTER_PORT": env.get("MASTER_PORT") or str(slurm_port(env.get("SLURM_JOB_ID", "0")))}


def first_host(nodelist: str, variable: str = "SLURM_JOB_NODELIST") -> str:
    """The first host of a SLURM hostlist: "gpu[003-010,017],cpu1" -> "gpu003" (`scontrol show hostnames`)."""
    nodelist = nodelist.strip()
    first = re.match(r"([^,\[\]]*(?:\[[^\]]*\][^,\[\]]*)*)", nodelist).group(1)  # up to a top-level comma
    host = re.sub(r"\[([^],-]+)[^]]*\]", r"\1", first)  # each bracket: its first number, padding kept
    if not host or "[" in host or "]" in host or nodelist[len(first):][:1] not in ("", ",") \
            or first.startswith("[") or host.isdigit():  # a range with no name, or a bare number: no host
        raise ValueError(f"{variable}: cannot read a host from {nodelist!r}")
    return host


def slurm_port(job_id: str) -> int:
    """A port the job's tasks agree on without talking: 15000 + the job id's last 4 digits (Lightning's rule),
    so two jobs sharing a node rarely collide."""
    digits = re.sub(r"\D", "", job_id)[-4:]
    return 15000 + int(digits or 0)


def _attempt_store(timeout):
    """torchrun's own store with a prefix per restart, or None where torch builds a fresh one.

    torchrun's agent hosts one store for the whole job, and a restarted rank can read the previous
    attempt's addresses there and fail to connect, or hang (pytorch/pytorch#135712; seen with
    torch 2.14 and gloo in 3 of 4 restarts). TORCHELASTIC_RESTART_COUNT keeps the attempts apart.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    if os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE")) != os.environ.get("WORLD_SIZE") \
            and os.environ.get("RANK") == "0":
        # several nodes: each agent counts its own restarts (a node whose ranks did not fail restarts
        # with count 0), so attempts cannot be told apart by that count, here or in torch itself
        print("rmix: multi-node torchrun shares one store across restarts; set TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 "
              "in torchrun's environment, or a restart after a failure can hang (pytorch#135712)", flush=True)
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                          timeout=timeout)
    return dist.PrefixStore(f"rmix/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def all_sum(t: torch.Tensor, world: Dist) -> torch.Tensor:
    """Sum a tensor over ranks (in place); identity on one process."""
    if world.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_object(obj, world: Dist):
    """Rank 0's `obj` (any picklable value) on every rank, e.g. a run directory chosen by the clock."""
    if not world.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_to_main(obj, world: Dist):
    """[obj of rank 0, obj of rank 1, ...] on rank 0, None elsewhere; [obj] on one process.

    For large objects (a mid-epoch checkpoint's RecursiveMix history): only rank 0 receives.
    """
    if not world.enabled:
        return [obj]
    out = [None] * world.world_size if world.is_main else None
    dist.gather_object(obj, out, dst=0)
    return out


@torch.no_grad()
def broadcast_buffers(module: torch.nn.Module, world: Dist):
    """Copy rank 0's buffers (BatchNorm running stats) to every rank, in place.

    DDP broadcasts them at each training forward, so after the last step every rank holds its
    own; this makes evaluation use the model that rank 0 saves.
    """
    if world.enabled:
        for b in module.buffers():
            dist.broadcast(b, src=0)


def barrier(world: Dist):
    if world.enabled:
        dist.barrier()


def cleanup(world: Dist):
    if world.enabled and dist.is_initialized():
        dist.destroy_process_group()
