"""Preemption: SIGTERM and SIGUSR1 ask a run to stop at the next step boundary and save there.

SLURM, Kubernetes and spot instances send SIGTERM (SLURM's `--signal` often SIGUSR1) some
seconds before SIGKILL. The handler only sets a flag; the training loop asks `stop(step)` after
each optimizer step. Under torchrun the signal may reach one rank only, so the ranks agree by an
all-reduce (max) of the flag, and only every `every` steps and at the epoch's last step, since the
reduce is a sync point on a GPU; every rank then stops after the same step.
"""
import signal
import threading

import torch

from rmix import dist

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preemption:
    """A context that catches SIGNALS; `stop(step, last)` says whether the run should stop now."""

    def __init__(self, world=dist.Dist(), device=torch.device("cpu"), every=1):
        self.world, self.device, self.every = world, device, every
        self.received = None  # the signal's number, set by the handler
        self.signal = None    # its name, once the loop has agreed to stop on it
        self.at = None        # the step of the epoch it stopped after
        self._old = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # signal.signal works only there
            for s in SIGNALS:
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, old in self._old.items():
            signal.signal(s, old)
        self._old = {}

    def _handle(self, signum, frame):
        self.received = signum

    def stop(self, step, last=False) -> bool:
        """After `step` steps of an epoch (`last`: its final step): stop here? Same answer on every rank."""
        if not self.world.enabled:
            got = self.received
        elif step % self.every == 0 or last:
            flag = torch.tensor([self.received or 0], dtype=torch.int64, device=self.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            got = int(flag.item()) or None  # note: a sync point, every `every` steps only
        else:
            return False
        if got:
            self.signal, self.at = signal.Signals(got).name, step
        return bool(got)
