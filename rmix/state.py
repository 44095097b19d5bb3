"""Where a run is (`RunState`), and the one place its checkpoints are written and read (`Checkpoints`).

A training checkpoint (the file itself: rmix.checkpoint) holds the weights, the optimizer, the loss
scale, `epoch` complete epochs and `step` steps of the next, the best val top-1, the config, the data
trained on, every rank's random streams (`rng_ranks`; `rng` is rank 0's) and with --ema the EMA.
Saved inside an epoch, it also holds each rank's share of that epoch (`partial_ranks`: its RecursiveMix
history, summed loss and correct, images seen, seconds), so that a resume goes on at the same image
with the same random numbers.
"""
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from rmix import checkpoint, dist
from rmix.config import TrainConfig, accumulation, to_dict
from rmix.data import check_classes
from rmix.ema import ModelEma
from rmix.optim import load_optimizer_state
from rmix.progress import Progress


@dataclass
class RunState:
    """Where the run is: what a checkpoint keeps besides the weights; the training loop advances it."""
    epoch: int = 1                    # the epoch being trained, 1-based; the ones before it are complete
    step: int = 0                     # optimizer steps of `epoch` done
    best_top1: float = -1.0           # best val top-1 so far, in percent; -1 before any evaluation
    sums: torch.Tensor | None = None  # this rank's summed (loss * images, correct) in `epoch`: float64 (2,)
    seen: int = 0                     # images this rank trained on in `epoch`
    seconds: float = 0.0              # training seconds `epoch` had before this process took it up
    _t0: float = field(default=0.0, init=False, repr=False, compare=False)  # perf_counter() as `epoch` began

    def start_clock(self):
        """Time `epoch` from now on, counting the `seconds` it had before (a mid-epoch resume's)."""
        self._t0 = time.perf_counter() - self.seconds

    def elapsed(self) -> float:
        """Training seconds of `epoch` so far."""
        return time.perf_counter() - self._t0

    def next_epoch(self):
        """`epoch` is done: the next one starts at its first step, with nothing summed."""
        self.epoch, self.step, self.sums, self.seen, self.seconds = self.epoch + 1, 0, None, 0, 0.0


def capture_rng(policy) -> dict:
    """Every random stream of this process, as plain data (loads with weights_only=True)."""
    return {"python": random.getstate(), "torch": torch.get_rng_state(),
            "numpy": [v.tolist() if hasattr(v, "tolist") else v for v in np.random.get_state()],
            "policy": policy.generator.get_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_initialized() else None}


def restore_rng(rng: dict, policy):
    """Set every stream `capture_rng` took; CUDA's only from a saved CUDA state, where there is CUDA."""
    random.setstate(rng["python"])
    torch.set_rng_state(rng["torch"])
    kind, keys, *rest = rng["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))
    policy.generator.set_state(rng["policy"])
    if rng.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])


@dataclass(frozen=True)
class Checkpoints:
    """Every checkpoint of a run, written and read here (timm's CheckpointSaver): RUN/latest.pt at each
    epoch's end, and best.pt when the epoch beats the best; latest.pt inside an epoch under
    --save-every-steps and at a preemption. What a checkpoint is made of is fixed for the whole run.
    Each save is called on every rank (each gives its own streams); rank 0 writes."""
    cfg: TrainConfig
    world: dist.Dist
    run_dir: Path
    model: torch.nn.Module           # unwrapped (no DDP, not compiled): plain keys
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    policy: object                   # its box generator, and RecursiveMix's history
    ema: ModelEma | None
    data: dict                       # {"train_samples", "classes"}: tells a resume whether the data is the same
    device: torch.device             # where a restored history goes: where the batches are

    def save_mid_epoch(self, state: RunState):
        """latest.pt after `state.step` steps of `state.epoch`, with each rank's share of the epoch so far."""
        mine = {"rng": capture_rng(self.policy), "policy": _to_cpu(self.policy.state_dict()), "step": state.step,
                "sums": state.sums.cpu(), "seen": state.seen, "seconds": state.elapsed()}
        ranks = dist.gather_to_main(mine, self.world)  # each rank's own history and streams
        if self.world.is_main:
            checkpoint.save(self.run_dir / "latest.pt", self._payload(state.epoch - 1, state, ranks, step=state.step))

    def save_epoch_end(self, state: RunState, is_best: bool, best_of=None):
        """latest.pt after `state.epoch`, and best.pt when `is_best`. `best_of` (--ema): which of the model and
        its EMA scored this epoch's candidate for best ("model" or "ema"); None where it was not evaluated."""
        ranks = dist.gather_to_main({"rng": capture_rng(self.policy)}, self.world)  # each rank's own stream
        if self.world.is_main:
            payload = self._payload(state.epoch, state, ranks, best_of=best_of)
            checkpoint.save(self.run_dir / "latest.pt", payload)
            if is_best:
                checkpoint.save(self.run_dir / "best.pt", payload)

    def restore(self, ckpt: dict, path) -> RunState:
        """Weights, optimizer, loss scale, random streams, policy history and EMA from `ckpt` (read from
        `path`); returns where the run stopped. ValueError where `ckpt` cannot continue this run's data."""
        self._check_same_data(ckpt, path)
        self.model.load_state_dict(ckpt["model"])
        load_optimizer_state(self.optimizer, ckpt["optimizer"])
        if ckpt["scaler"] and self.scaler.is_enabled():  # {} from a run without fp16 (a CPU, bf16): a fresh scale
            self.scaler.load_state_dict(ckpt["scaler"])
        streams = ckpt.get("rng_ranks", [ckpt["rng"]])
        if len(streams) == self.world.world_size:  # else another world size: keep this run's per-rank seeds
            restore_rng(streams[self.world.rank], self.policy)
        state = RunState(epoch=ckpt["epoch"] + 1, best_top1=ckpt["best_top1"])
        if ckpt.get("step", 0):
            self._restore_mid_epoch(ckpt, path, state)
        if self.ema is not None:
            if ckpt.get("ema") is not None:
                self.ema.load_state_dict(ckpt["ema"])
            else:  # --allow-changes ema: it starts from the resumed model
                self.ema.module.load_state_dict(self.model.state_dict())
        return state

    def _check_same_data(self, ckpt, path):
        cfg, saved, data = self.cfg, ckpt["config"], self.data
        if saved.get("num_classes") != cfg.num_classes:
            raise ValueError(f"--resume: {path} was trained with {saved.get('num_classes')} classes, "
                             f"{cfg.data.data_dir} has {cfg.num_classes}")
        was = ckpt.get("data") or {}
        check_classes(was.get("classes"), data["classes"], f"--resume: {path}", "the checkpoint", str(cfg.data.data_dir))
        if saved["data"]["data_dir"] != cfg.data.data_dir and ckpt.get("data") != data:
            raise ValueError(f"--resume: {path} was trained on {saved['data']['data_dir']}, this run reads "
                             f"{cfg.data.data_dir}, and its training split differs (or the checkpoint cannot tell); "
                             "--allow-changes data_dir takes another path to the same data, not other data: resume "
                             "on the run's own --data-dir, or train on the new one with a new --out")
        if was.get("train_samples") not in (None, data["train_samples"]) and self.world.is_main:
            Progress.line(f"--data-dir: {cfg.data.data_dir} now holds {data['train_samples']} training images, "
                          f"{path} was trained on {was['train_samples']}: the run goes on over the new set, "
                          "not as it would have without the change")

    def _restore_mid_epoch(self, ckpt, path, state):
        """This rank's share of the epoch a mid-epoch checkpoint cut (its history restored into the policy)."""
        parts, world, batch = ckpt["partial_ranks"], self.world, self.cfg.batch_size // self.world.world_size
        micro = batch // accumulation(self.cfg, world.world_size)  # what the next forward takes
        if len(parts) != world.world_size:  # another split of the data: no exact continuation exists
            raise ValueError(f"--resume: {path} was saved at step {ckpt['step']} of epoch {ckpt['epoch'] + 1} "
                             f"by {len(parts)} processes, this run has {world.world_size}; resume with as many")
        part = _at_the_same_image(parts[world.rank], ckpt["config"]["batch_size"] // len(parts), batch, path, ckpt)
        state.step, state.sums, state.seen, state.seconds = part["step"], part["sums"], part["seen"], part["seconds"]
        self.policy.load_state_dict(part["policy"], self.device)
        history = part["policy"].get("history")
        if history is not None and history.shape[0] < micro:
            self.policy.reset()  # a bigger batch than the history holds: the next step starts one, as an epoch does
            if world.is_main:  # named by what changed: the micro-batches, or the batch
                how = f"--accum-steps {self.cfg.accum_steps or 'auto'}" if ckpt["config"].get("accum_steps", 1) != \
                    self.cfg.accum_steps else f"--batch-size {self.cfg.batch_size}"
                Progress.line(f"{how}: the saved history holds {history.shape[0]} images "
                              f"a process, a forward now takes {micro}; the next step pastes nothing, as an "
                              "epoch's first does")

    def _payload(self, epoch, state, ranks, step=0, best_of=None):
        """A training checkpoint: `epoch` complete epochs and `step` steps of the next; per-rank state.

        With --ema: "ema" ({"model": its state dict, "updates", ...}, rank 0's) and "best_of".
        """
        payload = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                   "scaler": self.scaler.state_dict(), "epoch": epoch, "step": step, "best_top1": state.best_top1,
                   "config": to_dict(self.cfg), "rng": ranks[0]["rng"], "rng_ranks": [r["rng"] for r in ranks],
                   "data": self.data}
        if self.ema is not None:
            payload["ema"] = self.ema.state_dict()
            payload["best_of"] = best_of
        if step:  # mid-epoch: what each rank needs to continue at `step` exactly
            payload["partial_ranks"] = [{k: v for k, v in r.items() if k != "rng"} for r in ranks]
        return payload


def _at_the_same_image(partial, saved_batch, batch, path, ckpt):
    """A mid-epoch state continued with another per-process batch size: the step at the same image.

    The loaders address batches by step, so step k of batch b starts at image k * b of the epoch's
    order on this process; with `batch` the same image is step seen / batch, which must be whole.
    """
    if batch == saved_batch:
        return partial
    seen = partial["seen"]
    if seen % batch:
        fits = [b for b in range(1, seen + 1) if seen % b == 0]
        near = sorted(sorted(fits, key=lambda b: abs(math.log(b / batch)))[:6])  # the six nearest the one asked
        raise ValueError(f"--batch-size: {path} stopped after {seen} images of epoch {ckpt['epoch'] + 1} on each "
                         f"process; a batch of {batch} a process cannot continue at that image (per-process batch "
                         f"sizes that can, nearest {batch}: {', '.join(map(str, near))}; the saved one, {saved_batch}, "
                         "always can), or resume from an epoch's end")
    return {**partial, "step": seen // batch}


def _to_cpu(state):
    return {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in state.items()}
