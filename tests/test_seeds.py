"""One seeding scheme (rmix.pipelines.seeds): every stream from (seed, stream, rank, epoch), none shared."""
import random

import numpy as np
import pytest
import torch

from rmix import config as C
from rmix.engine import make_policy
from rmix.pipelines import Share, seeds
from rmix.pipelines.torch_loader import ShardBatchSampler


def test_no_two_ranks_or_seeds_share_a_stream():
    # the old formulas' collisions: seed * 1000 + rank (seed 0 rank 1000 = seed 1 rank 0), seed + rank
    assert seeds.derive(0, "boxes", rank=1000) != seeds.derive(1, "boxes", rank=0)
    assert seeds.derive(0, "process", rank=1) != seeds.derive(1, "process", rank=0)
    keys = [(s, st, r, e) for s in range(6) for st in seeds.STREAMS for r in range(6) for e in range(6)]
    values = {seeds.derive(s, st, rank=r, epoch=e) for s, st, r, e in keys}
    assert len(values) == len(keys)
    assert seeds.derive(3, "boxes", rank=2) == seeds.derive(3, "boxes", rank=2)  # stable across calls


def test_seeds_fit_their_generators():
    for st in seeds.STREAMS:
        assert 0 <= seeds.derive(2**31 - 1, st, rank=7, epoch=299) < 2**63
        assert 0 <= seeds.derive(2**31 - 1, st, rank=7, epoch=299, bits=31) < 2**31
    with pytest.raises(ValueError, match="stream"):
        seeds.derive(0, "shuffle")


def test_seed_process_seeds_the_three_global_generators():
    saved = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
    try:
        s = seeds.derive(5, "process", rank=3)
        seeds.seed_process(5, 3)
        got = random.random(), np.random.random(), torch.rand(1).item()
        random.seed(s)
        np.random.seed(s & 0xFFFF_FFFF)
        torch.manual_seed(s)
        assert got == (random.random(), np.random.random(), torch.rand(1).item())
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])
        torch.random.set_rng_state(saved[2])


@pytest.mark.parametrize("shared", [False, True])
def test_the_policy_draws_boxes_from_the_boxes_stream(shared):
    cfg = C.replace(C.TrainConfig(), num_classes=10, seed=4, **{"mix.shared_boxes": shared})
    policy = make_policy(cfg, torch.device("cpu"), None, rank=2)
    want = torch.Generator().manual_seed(seeds.derive(4, "boxes", rank=0 if shared else 2))
    assert torch.equal(policy.generator.get_state(), want.get_state())


def test_the_torch_loader_draws_augmentation_from_its_stream():
    share = Share(12, train=True, batch_size=3, seed=6, rank=1, world_size=2)
    sampler = ShardBatchSampler(share)
    sampler.set_epoch(4)
    got = [seed for batch in sampler for _, seed in batch]
    every = np.random.default_rng(seeds.derive(6, "torch_augment", epoch=4)).integers(0, 2**63 - 1, size=12)
    assert got == every[share.indices(4)].tolist()


def test_dali_pipelines_are_seeded_per_rank_and_epoch():
    from rmix.pipelines import Backend
    from rmix.pipelines.dali import _pipe_args
    share = Share(12, train=True, batch_size=3, seed=6, rank=1, world_size=2)
    assert _pipe_args(share, Backend("dali"), None, 5)["seed"] == seeds.derive(6, "dali_augment", rank=1, epoch=5,
                                                                                bits=31)
