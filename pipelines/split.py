"""A split shared over ranks: this rank's samples, in which order, in how many batches, and which
epoch a loader yields next. DistributedSampler's arithmetic, exactly, for both loader kinds."""
from __future__ import annotations

from dataclasses import dataclass


def check_sharding(num_samples: int, *, train: bool, batch_size: int, rank: int, world_size: int,
                   drop_last: bool = True):
    """Validate rank/world_size/batch_size against the split size; raises ValueError."""
    if batch_size < 1:
        raise ValueError(f"--batch-size: batch_size must be >= 1, got {batch_size}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank} world_size={world_size}")
    if num_samples < world_size:
        raise ValueError(f"{num_samples} images cannot be split over {world_size} ranks")
    if train and drop_last and (num_samples // world_size) // batch_size == 0:
        raise ValueError(
            f"--batch-size {batch_size}: {num_samples} images over {world_size} ranks give no full batch of "
            f"{batch_size} (train drops the partial batch; --keep-last keeps it)")


def train_batches(num_samples: int, batch_size: int, world_size: int, drop_last: bool = True) -> int:
    """Batches per rank per train epoch, the same on every rank.

    drop_last: N // world samples per rank, full batches only (DistributedSampler(drop_last=True)
    and DataLoader(drop_last=True)). Else ceil(N / world) samples per rank, the shards padded by
    repeating samples, and a short last batch (DistributedSampler(drop_last=False) and
    DataLoader(drop_last=False), the paper's code: 2503 steps for ImageNet at 8 x 64).
    """
    if drop_last:
        return (num_samples // world_size) // batch_size
    per_rank = -(-num_samples // world_size)  # ceil: DistributedSampler pads every rank to this
    return -(-per_rank // batch_size)


def val_batches(num_samples: int, batch_size: int, world_size: int) -> int:
    """Batches per rank per val epoch: enough for the largest shard, ceil(N / world_size).

    A rank whose shard is one image shorter may get a trailing empty batch (N=0).
    """
    largest = -(-num_samples // world_size)
    return -(-largest // batch_size)


def shard_indices(num_samples: int, *, train: bool, seed: int, epoch: int, rank: int,
                  world_size: int, drop_last: bool = True) -> list[int]:
    """This rank's sample indices for one epoch, in order: DistributedSampler's split, exactly.

    Train: a permutation of all N seeded with seed + epoch (the same on every rank); with
    drop_last cut to (N // world) * world, else padded to ceil(N / world) * world by repeating
    its first indices; then every world-th from rank. Val: rank::world in file order, no
    padding (every image once). Both loader kinds read exactly these indices in this order, so
    an epoch depends on (seed, epoch, rank, world_size, drop_last) only.
    """
    import torch
    if not train:
        return list(range(rank, num_samples, world_size))
    g = torch.Generator().manual_seed(seed + epoch)
    perm = torch.randperm(num_samples, generator=g).tolist()
    if drop_last:
        return perm[rank:(num_samples // world_size) * world_size:world_size]
    total = -(-num_samples // world_size) * world_size
    perm = (perm * -(-total // num_samples))[:total]  # repeats from the start, as DistributedSampler
    return perm[rank:total:world_size]


def check_seed(seed) -> None:
    """ValueError naming `seed` outside [0, 2**31), the CLI's --seed range."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**31:
        raise ValueError(f"seed: expected an integer in [0, 2**31), got {seed!r}")


@dataclass(frozen=True)
class Share:
    """This rank's share of a split of ``num_samples``: checked on creation (`check_sharding`, `check_seed`)."""
    num_samples: int
    train: bool            # train: reshuffled each epoch from seed + epoch; val: file order, every image once
    batch_size: int        # per rank
    seed: int = 0          # the order's, and the augmentation's (rmix.pipelines.seeds)
    rank: int = 0
    world_size: int = 1
    drop_last: bool = True  # train: drop the partial batch (see `train_batches`)

    def __post_init__(self):
        check_sharding(self.num_samples, train=self.train, batch_size=self.batch_size, rank=self.rank,
                       world_size=self.world_size, drop_last=self.drop_last)
        check_seed(self.seed)

    @property
    def num_batches(self) -> int:
        """Batches per epoch on this rank, the same on every rank: ``len(loader)``."""
        if self.train:
            return train_batches(self.num_samples, self.batch_size, self.world_size, self.drop_last)
        return val_batches(self.num_samples, self.batch_size, self.world_size)

    @property
    def drops_partial(self) -> bool:
        """Whether a short last batch is dropped (train with drop_last) rather than kept."""
        return self.train and self.drop_last

    def indices(self, epoch: int) -> list[int]:
        """This rank's sample indices for ``epoch``, in reading order (`shard_indices`)."""
        return shard_indices(self.num_samples, train=self.train, seed=self.seed, epoch=epoch, rank=self.rank,
                             world_size=self.world_size, drop_last=self.drop_last)


class EpochCounter:
    """Which epoch the next `iter()` yields, and from which batch: `set_epoch`'s, or the next whole one."""

    _next_epoch = 0
    _next_start = 0

    def set_epoch(self, epoch: int, start_step: int = 0):
        """Make the next `iter()` yield epoch ``epoch`` (0-based) of an uninterrupted run.

        With ``start_step`` k it yields that epoch's batches k, k+1, ... (resuming mid-epoch):
        the same batches the whole epoch has there, augmentation included.
        """
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        if not 0 <= start_step <= len(self):
            raise ValueError(f"start_step must be in [0, {len(self)}], got {start_step}")
        self._next_epoch, self._next_start = int(epoch), int(start_step)

    def _take_epoch(self) -> tuple[int, int]:
        """(epoch, first step) for this `iter()`; the one after starts the next epoch at 0."""
        epoch, start = self._next_epoch, self._next_start
        self._next_epoch, self._next_start = epoch + 1, 0
        return epoch, start
