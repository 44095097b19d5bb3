"""Counting host syncs: the reads of a device value that make the host wait for the GPU.

On a GPU every read of a device value (`.item()`, `bool(t)`, `nonzero`, ...) waits for the queued
work. `SyncCounter` sees those ops as torch's dispatcher runs them, on the CPU too, so a read added
to the training step shows without a GPU (tests/test_sync.py, `rmix doctor`). On a GPU,
`cuda_sync_warnings` asks torch's own sync-debug mode instead; it sees the synchronizing CUDA calls
torch makes (value reads, blocking copies), not the waits inside nvJPEG, DALI or the allocator.

Each read is attributed to the innermost frame of rmix's own code, found by module name
(`rmix`, `rmix.*`), never by file path: a checkout or a virtual environment may live anywhere.
"""
from __future__ import annotations

import contextlib
import sys
import warnings

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# ops that hand a device value to the host (and so wait for the device)
SYNC_OPS = frozenset({
    "_local_scalar_dense", "is_nonzero", "item", "nonzero", "equal", "allclose", "masked_select", "unique",
    "_unique", "_unique2", "unique_consecutive", "unique_dim", "repeat_interleave", "bincount", "histc",
    "_assert_async"})
# rmix.mixing's reads of host values, which are no device reads: scalars drawn with the policy's CPU
# generator (also on a GPU run), and labels checked only where they are host tensors
HOST_DRAWS = frozenset({("rmix.mixing", "_rand"), ("rmix.mixing", "_sample_gamma"),
                        ("rmix.mixing", "check_targets")})


def is_rmix(module: str | None) -> bool:
    return module == "rmix" or (module or "").startswith("rmix.")


def frames(start=None):
    """(module, function, file name, line) of each frame from `start` outwards (innermost first)."""
    frame = start or sys._getframe(1)
    while frame is not None:
        yield frame.f_globals.get("__name__"), frame.f_code.co_name, frame.f_code.co_filename, frame.f_lineno
        frame = frame.f_back


def rmix_caller(start=None) -> str:
    """'module:line function' of the innermost frame of rmix's code, or '?'."""
    for module, name, _, line in frames(start):
        if is_rmix(module):
            return f"{module}:{line} {name}"
    return "?"


class SyncCounter(TorchDispatchMode):
    """Counts the ops of SYNC_OPS run inside it, each with the rmix frame it came from.

    `ignore`: module names whose own reads are not the code's under test (a test's checks): a read
    whose innermost frame outside torch is in one of them is not counted.
    """

    def __init__(self, ignore=()):
        super().__init__()
        self.reads = []   # [(op name, "module:line function")]
        self._ignore = frozenset(ignore)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in SYNC_OPS:
            stack = list(frames(sys._getframe(1)))
            caller = next((m for m, _, _, _ in stack if not _is_torch(m)), None)
            host_draw = any((m, name) in HOST_DRAWS for m, name, _, _ in stack)
            if not host_draw and caller not in self._ignore:
                self.reads.append((func.overloadpacket.__name__, rmix_caller(sys._getframe(1))))
        return func(*args, **(kwargs or {}))


def _is_torch(module: str | None) -> bool:
    return module is not None and (module == "torch" or module.startswith("torch."))


@contextlib.contextmanager
def cuda_sync_warnings():
    """Yields a list that fills with torch's sync-debug warnings raised inside (CUDA only)."""
    caught_all = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield caught_all
        finally:
            torch.cuda.set_sync_debug_mode("default")
            caught_all.extend(w for w in caught if "synchroniz" in str(w.message))
