"""Weight EMA (`--ema DECAY`): timm's ModelEmaV3 arithmetic, on the device, resumable exactly.

After each optimizer step every floating-point tensor of the model's state (parameters and
BatchNorm statistics) is pulled toward the model, ``ema += (1 - d) * (model - ema)``, in one
foreach lerp; integer buffers (``num_batches_tracked``) are copied. The decay of update k
(1-based) is timm's: 0 for the first (the EMA becomes the model), then ``DECAY``, or with
``--ema-warmup`` ``min(DECAY, 1 - (1 + (k - 1)) ** (-2/3))`` (timm's ``use_warmup``,
``warmup_gamma=1``, ``warmup_power=2/3``), which lets early, fast-moving weights through.
The decay is a host number from the update count, so an update needs no host sync.

Under DDP every rank keeps its own EMA: the parameters are the same on every rank, so their
averages are; the BatchNorm statistics are each rank's, and rank 0's are broadcast with the
model's at each epoch end (before evaluating and saving), as the model's are.
"""
import copy

import torch

WARMUP_POWER = 2 / 3


def ema_decay(decay: float, update: int, warmup: bool) -> float:
    """The decay of the `update`-th update (1-based), as timm's ModelEmaV3.get_decay(step=update)."""
    t = update - 1
    if t <= 0:
        return 0.0
    if warmup:
        return max(min(1 - (1 + t) ** -WARMUP_POWER, decay), 0.0)
    return decay


class ModelEma:
    """An averaged copy of `source` (the unwrapped model: not DDP, not compiled)."""

    def __init__(self, source: torch.nn.Module, decay: float, warmup: bool = False):
        self.source, self.decay, self.warmup = source, float(decay), bool(warmup)
        self.module = copy.deepcopy(source).eval().requires_grad_(False)
        self.updates = 0
        self._pairs()

    def _pairs(self):
        mine, theirs = self.module.state_dict(keep_vars=True), self.source.state_dict(keep_vars=True)
        floats = [k for k, v in mine.items() if v.is_floating_point()]
        self._lerp = ([mine[k].data for k in floats], [theirs[k].data for k in floats])
        self._copy = [(mine[k].data, theirs[k].data) for k in mine if k not in set(floats)]

    @torch.no_grad()
    def update(self):
        self.updates += 1
        d = ema_decay(self.decay, self.updates, self.warmup)
        torch._foreach_lerp_(self._lerp[0], self._lerp[1], 1.0 - d)  # device ops only
        for mine, theirs in self._copy:
            mine.copy_(theirs)

    def state_dict(self) -> dict:
        return {"model": {k: v.detach().clone() for k, v in self.module.state_dict().items()},
                "updates": self.updates, "decay": self.decay, "warmup": self.warmup}

    def load_state_dict(self, state: dict):
        self.module.load_state_dict(state["model"])
        self.updates = int(state["updates"])
