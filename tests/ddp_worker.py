"""Test worker for tests/test_ddp.py: a few DDP steps with the engine's own pieces, one file per rank.

    python -m torch.distributed.run --nproc_per_node=2 --standalone tests/ddp_worker.py OUT DATA

equal(OUT/equal): a BatchNorm-free resnet8, no mixing, a fixed global batch split over the ranks;
       writes rank{r}.pt with the parameters before and after 3 steps. `equal(out, Dist())` is
       the one-process reference with the whole batch.
rm(OUT/rm):  resnet8 with BatchNorm, RecursiveMix, the torch loader over DATA for 3 steps; writes
       rank{r}.pt (parameters, buffers after dist.broadcast_buffers, the policy's box RNG) and
       rank{r}.json (evaluate's totals with the torch and the DALI val loaders).
"""
import json
import sys
from pathlib import Path

import torch

from rmix import dist
from rmix.config import IMAGENET_MEAN, IMAGENET_STD, TrainConfig, replace
from rmix.data import make_loaders
from rmix.ema import ModelEma
from rmix.engine import evaluate, train_one_epoch, wrap_ddp
from rmix.mixing import NoMix, Normalize, build_policy
from rmix.models import build
from rmix.pipelines.seeds import derive
from rmix.progress import Progress
from rmix.state import RunState

STEPS, BATCH, CLASSES, SIZE = 3, 8, 4, 16
CPU = torch.device("cpu")


def without_bn(model):
    """Every BatchNorm replaced by Identity, so a split batch computes the same gradient."""
    for name, child in model.named_children():
        if isinstance(child, torch.nn.modules.batchnorm._BatchNorm):
            setattr(model, name, torch.nn.Identity())
        else:
            without_bn(child)
    return model


def run(model, policy, loader, cfg, world, ema_decay=0.0):
    model = wrap_ddp(model, CPU, world)
    raw = model.module if world.enabled else model
    ema = ModelEma(raw, ema_decay, warmup=True) if ema_decay else None
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05, momentum=0.9,
                                nesterov=True, weight_decay=5e-4)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    with Progress(STEPS, "ddp worker", enabled=False) as bar:
        sums = train_one_epoch(model, policy, loader, optimizer, scaler, cfg, RunState(), None, bar, ema=ema)
    if ema is not None:
        raw.ema = ema  # for the caller; not a module attribute torch tracks
    return raw, dist.all_sum(sums, world)


def equal(out, world):
    torch.manual_seed(0)  # the same initial weights and data on every rank, whatever the world size
    model = without_bn(build("resnet8", CLASSES))
    model.fc_roi.requires_grad_(False)  # as the engine does without RecursiveMix
    init = {k: v.detach().clone() for k, v in model.named_parameters()}
    images = torch.randint(0, 256, (STEPS, BATCH, SIZE, SIZE, 3), dtype=torch.uint8)
    targets = torch.randint(0, CLASSES, (STEPS, BATCH))
    share = BATCH // world.world_size
    mine = slice(world.rank * share, (world.rank + 1) * share)  # this rank's share of each global batch
    loader = [(images[s, mine], targets[s, mine]) for s in range(STEPS)]
    cfg = replace(TrainConfig(), **{"mix.policy": "none"})
    raw, sums = run(model, NoMix(CLASSES, mean=IMAGENET_MEAN, std=IMAGENET_STD), loader, cfg, world)
    torch.save({"params": dict(raw.named_parameters()), "init": init, "images": sums[2].item()},
               out / f"rank{world.rank}.pt")


def rm(out, data, world):
    torch.manual_seed(0)
    cfg = replace(TrainConfig(), batch_size=BATCH, max_steps=STEPS, **{
        "data.data_dir": str(data), "data.loader": "torch", "data.workers": 0, "data.crop_size": SIZE,
        "data.val_resize": 20})
    train_loader, _ = make_loaders(cfg, data, "folder", CPU, world.rank, world.world_size)
    gen = torch.Generator().manual_seed(derive(cfg.seed, "boxes", rank=world.rank))  # as the engine: one per rank
    policy = build_policy("recursive_mix", CLASSES, alpha=0.5, omega=0.5, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                          generator=gen)
    raw, _ = run(build("resnet8", CLASSES), policy, train_loader, cfg, world, ema_decay=0.9)
    dist.broadcast_buffers(raw, world)
    dist.broadcast_buffers(raw.ema.module, world)  # as the engine does at an epoch end
    torch.save({"params": dict(raw.named_parameters()), "buffers": dict(raw.named_buffers()),
                "ema": raw.ema.state_dict()["model"], "policy_rng": gen.get_state()}, out / f"rank{world.rank}.pt")
    normalize = Normalize(IMAGENET_MEAN, IMAGENET_STD)
    totals = {}
    for loader in ("torch", "dali"):
        _, val_loader = make_loaders(replace(cfg, **{"data.loader": loader}), data, "folder", CPU, world.rank,
                                     world.world_size)
        totals[loader] = evaluate(raw, val_loader, normalize, None, world)
    for loader in ("torch", "dali"):  # the same images as WebDataset shards (prepared by the test)
        train_loader, val_loader = make_loaders(replace(cfg, **{"data.loader": loader}), data.parent / "shards",
                                                "wds", CPU, world.rank, world.world_size)
        totals[f"wds-{loader}"] = evaluate(raw, val_loader, normalize, None, world)
        totals[f"wds-{loader}"]["train_batches"] = sum(1 for _ in train_loader)
    (out / f"rank{world.rank}.json").write_text(json.dumps(totals))


if __name__ == "__main__":
    out, data = Path(sys.argv[1]), Path(sys.argv[2])
    world = dist.setup("cpu", timeout_s=120)
    for name in ("equal", "rm"):
        (out / name).mkdir(parents=True, exist_ok=True)
    equal(out / "equal", world)
    rm(out / "rm", data, world)
    dist.barrier(world)
    dist.cleanup(world)
