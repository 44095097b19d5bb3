"""torch.distributed as torchrun sets it up: NCCL on GPUs, gloo on CPUs. Nothing home-made.

Launch with `torchrun --nproc_per_node=N cli.py train ...` (multi-node: docs/DISTRIBUTED.md).
A dead rank is torchrun's to report: its elastic agent tears the other ranks down and exits
non-zero naming the rank; the process-group timeout bounds any collective that waits longer.
"""
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
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
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device_type == "cuda":
        torch.cuda.set_device(local)  # before init: NCCL binds each rank to its own GPU
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        timeout = datetime.timedelta(seconds=timeout_s)
        store = _attempt_store(timeout)
        where = dict(store=store, rank=int(os.environ["RANK"]), world_size=world) if store else {}
        dist.init_process_group(backend, timeout=timeout, **where)
    return Dist(dist.get_rank(), dist.get_world_size(), local)


def _attempt_store(timeout):
    """torchrun's own store with a prefix per restart, or None where torch builds a fresh one.

    torchrun's agent hosts one store for the whole job, and a restarted rank can read the previous
    attempt's addresses there and fail to connect, or hang (pytorch/pytorch#135712; seen with
    torch 2.14 and gloo in 3 of 4 restarts). TORCHELASTIC_RESTART_COUNT keeps the attempts apart.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                          timeout=timeout)
    return dist.PrefixStore(f"rmix/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def all_sum(t: torch.Tensor, d: Dist) -> torch.Tensor:
    """Sum a tensor over ranks (in place); identity on one process."""
    if d.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_object(obj, d: Dist):
    """Rank 0's `obj` (any picklable value) on every rank, e.g. a run directory chosen by the clock."""
    if not d.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_to_main(obj, d: Dist):
    """[obj of rank 0, obj of rank 1, ...] on rank 0, None elsewhere; [obj] on one process.

    For large objects (a mid-epoch checkpoint's RecursiveMix history): only rank 0 receives.
    """
    if not d.enabled:
        return [obj]
    out = [None] * d.world_size if d.is_main else None
    dist.gather_object(obj, out, dst=0)
    return out


@torch.no_grad()
def broadcast_buffers(module: torch.nn.Module, d: Dist):
    """Copy rank 0's buffers (BatchNorm running stats) to every rank, in place.

    DDP broadcasts them at each training forward, so after the last step every rank holds its
    own; this makes evaluation use the model that rank 0 saves.
    """
    if d.enabled:
        for b in module.buffers():
            dist.broadcast(b, src=0)


def barrier(d: Dist):
    if d.enabled:
        dist.barrier()


def cleanup(d: Dist):
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()
