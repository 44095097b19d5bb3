"""Every random stream of a run comes from its one `--seed`, through `derive`; which generator each
stream seeds, per rank and per epoch, is the table in docs/DEVELOPMENT.md ("Seeds").

`derive` hashes (seed, stream, rank, epoch) with numpy's SeedSequence, so no two (seed, rank) pairs
share a stream (`seed + rank` and `seed * 1000 + rank` did: seed 0 rank 1 was seed 1 rank 0). The
train order is not here: it stays torch's DistributedSampler's `seed + epoch` (rmix.pipelines.split),
the order torch's sampler and the paper's code give that seed.
"""
from __future__ import annotations

STREAMS = ("process", "boxes", "dali_augment", "dali_reader", "torch_augment")


def derive(seed: int, stream: str, *, rank: int = 0, epoch: int = 0, bits: int = 63) -> int:
    """The seed of `stream` for this rank and epoch: 63 bits for torch's and numpy's generators (signed
    64-bit seeds), 31 for DALI's (it reads 32)."""
    import numpy as np
    if stream not in STREAMS:
        raise ValueError(f"stream must be one of {', '.join(STREAMS)}, got {stream!r}")
    hi, lo = np.random.SeedSequence([seed, STREAMS.index(stream), rank, epoch]).generate_state(2)
    return (int(hi) << 32 | int(lo)) >> (64 - bits)


def seed_process(seed: int, rank: int) -> None:
    """Python's, numpy's and torch's global generators for this rank (the "process" stream)."""
    import random

    import numpy as np
    import torch
    s = derive(seed, "process", rank=rank)
    random.seed(s)
    np.random.seed(s & 0xFFFF_FFFF)  # numpy's legacy global generator takes 32 bits
    torch.manual_seed(s)
