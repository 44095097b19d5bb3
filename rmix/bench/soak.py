"""`rmix bench soak`: does resident memory reach a plateau over thousands of training steps?

Method: train a small model (resnet8, 16 px crops, batch 8) with the RecursiveMix policy on a
tiny synthetic ImageFolder (4 classes x 16 train / 4 val JPEGs of 24 x 24 px, so one epoch is 8
steps) through the training core itself: `rmix.engine.train_one_epoch` then
`rmix.engine.evaluate`, epoch after epoch, as `rmix.engine.train` runs them (same loaders,
model, optimizer, policy, per-epoch lr). Each epoch's `iter()` builds a fresh pipeline for
train and another for eval (DALI: a new Pipeline and iterator, the previous one shut down), so
3,000 steps are ~375 epochs and ~750 pipeline rebuilds. Not exercised: checkpoint writes,
metrics files, preflight, DDP.

After every epoch (train + eval) the process's resident set size is sampled: /proc/self/statm
resident pages x page size (Linux). Where /proc is missing, resource.getrusage's max RSS is
used instead (a peak, which can only grow; the result says so in `rss_source`). The first
`warmup_fraction` of the epochs is warm-up (allocator pools, DALI's and torch's one-time
buffers fill); the RSS at its end is the reference. growth_pct = (max RSS after warm-up -
RSS at the end of warm-up) / RSS at the end of warm-up x 100, and memory has reached a
plateau when growth_pct < 5 (issue #8).

Only this process is measured: the torch loader runs with 0 workers by default (decoding in
this process), DALI with 1 thread (its threads live in this process). torch runs with 1 CPU
thread by default: the figure is memory, not speed, and a 2-thread run on 2 cores that another
job shares crawls (OpenMP threads spin waiting for a busy core).
"""
import gc
import math
import os
import tempfile
import time

import torch

from rmix import config as C
from rmix.bench.timing import machine_info, torch_threads
from rmix.data import make_loaders, resolve_data
from rmix.engine import (
    amp_dtype,
    build_optimizer,
    evaluate,
    make_normalize,
    make_policy,
    resolve_device,
    set_lr,
    train_one_epoch,
)
from rmix.models import build
from rmix.progress import Progress
from rmix.state import RunState

LIMIT_PCT = 5.0  # issue #8: less than 5% growth after warm-up
CLASSES, TRAIN_PER_CLASS, VAL_PER_CLASS, SIDE = 4, 16, 4, 24  # the tiny data set


def rss_bytes():
    """(resident set size in bytes, source): /proc/self/statm, else getrusage's peak RSS."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE"), "/proc/self/statm"
    except OSError:
        import resource
        import sys
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
        return peak * (1 if sys.platform == "darwin" else 1024), "getrusage max RSS (peak; /proc missing)"


def plateau(samples, warmup_epochs, limit_pct=LIMIT_PCT) -> dict:
    """The plateau check on per-epoch RSS `samples`: the first `warmup_epochs` are warm-up.

    Returns warmup_rss (the sample at the end of warm-up), final_rss, max_after (the largest
    sample after warm-up), growth_pct = (max_after - warmup_rss) / warmup_rss * 100, and
    plateau = growth_pct < limit_pct.
    """
    if not 1 <= warmup_epochs < len(samples):
        raise ValueError(f"warm-up: needs 1 <= warm-up epochs < samples, got {warmup_epochs} of {len(samples)} "
                         "(more steps, or another --warmup-fraction)")
    ref = samples[warmup_epochs - 1]
    top = max(samples[warmup_epochs:])
    growth = (top - ref) / ref * 100
    return {"warmup_rss": ref, "final_rss": samples[-1], "max_after": top, "growth_pct": growth,
            "plateau": growth < limit_pct, "limit_pct": limit_pct}


def soak(steps=3000, *, loader="dali", model="resnet8", batch=8, size=16, warmup_fraction=0.2, data_dir=None,
         workers=None, threads=1, device="cpu", seed=0, log=None) -> dict:
    """Train `steps` steps (whole epochs, so rounded up) on tiny data, sampling RSS after every epoch.

    Args:
        data_dir: an ImageFolder root [default: a tiny synthetic set written to a temporary folder].
        workers: DALI threads / DataLoader workers [default: 1 for dali, 0 for torch: in-process].
        threads: torch CPU threads during the soak (None: leave as is). 1 by default: on 2 cores
            shared with another 2-thread job, 2 torch threads ran 80 steps in 54 s, 1 in 1.7 s.
        log: a callable for progress lines, or None.
    """
    if threads is not None:
        with torch_threads(threads):
            return soak(steps, loader=loader, model=model, batch=batch, size=size, warmup_fraction=warmup_fraction,
                        data_dir=data_dir, workers=workers, threads=None, device=device, seed=seed, log=log)
    if steps < 1:
        raise ValueError(f"--steps: must be >= 1, got {steps}")
    if not 0 < warmup_fraction < 1:
        raise ValueError(f"--warmup-fraction: must be in (0, 1), got {warmup_fraction}")
    if data_dir is None:
        from rmix.pipelines.synth import synth_dataset
        with tempfile.TemporaryDirectory(prefix="rmix-soak-") as tmp:
            path = synth_dataset(os.path.join(tmp, "data"), classes=CLASSES, train_per_class=TRAIN_PER_CLASS,
                                 val_per_class=VAL_PER_CLASS, width=SIDE, height=SIDE, seed=seed)
            return soak(steps, loader=loader, model=model, batch=batch, size=size, warmup_fraction=warmup_fraction,
                        data_dir=str(path), workers=workers, threads=None, device=device, seed=seed, log=log)
    workers = (1 if loader == "dali" else 0) if workers is None else workers
    cfg = C.replace(C.TrainConfig(), model=model, batch_size=batch, device=device, seed=seed, **{
        "data.data_dir": str(data_dir), "data.loader": loader, "data.workers": workers, "data.crop_size": size,
        "data.val_resize": max(size, C.DataConfig.val_resize), "mix.policy": "recursive_mix"})
    C.validate(cfg)
    dev = resolve_device(cfg.device)
    torch.manual_seed(seed)
    root, dataset = resolve_data(cfg.data.data_dir, cfg.data.dataset)
    cfg = C.with_dataset_stats(cfg, dataset)
    train_loader, val_loader = make_loaders(cfg, root, dataset, dev)
    per_epoch = len(train_loader)
    if per_epoch == 0:
        raise ValueError(f"--batch: {root}/train has fewer than {batch} images, not one batch")
    epochs = math.ceil(steps / per_epoch)
    cfg = C.replace(cfg, epochs=epochs, num_classes=train_loader.num_classes)

    # as rmix.engine.train builds them (one process, no channels_last on the CPU)
    net = build(cfg.model, cfg.num_classes, share_fc=cfg.mix.share_fc, image_size=cfg.data.crop_size).to(dev)
    optimizer = build_optimizer(net, cfg.optim)
    amp = amp_dtype(cfg, dev)
    scaler = torch.amp.GradScaler(dev.type, enabled=amp == torch.float16)
    policy, normalize = make_policy(cfg, dev, amp), make_normalize(cfg, dev, amp)

    start_rss, source = rss_bytes()
    samples, done, val = [], 0, None
    t0 = time.perf_counter()
    for epoch in range(1, epochs + 1):
        set_lr(optimizer, cfg, epoch)
        train_loader.set_epoch(epoch - 1)
        with Progress(per_epoch, f"epoch {epoch}", enabled=False) as bar:
            sums = train_one_epoch(net, policy, train_loader, optimizer, scaler, cfg, RunState(epoch=epoch), amp, bar)
        done += int(sums[2].item()) // batch
        val = evaluate(net, val_loader, normalize, amp)
        samples.append(rss_bytes()[0])
        if log is not None and (epoch % max(1, epochs // 10) == 0 or epoch == epochs):
            log(f"epoch {epoch}/{epochs} ({done} steps, {time.perf_counter() - t0:.0f} s): "
                f"RSS {samples[-1] / 2**20:.1f} MB, val top-1 {val['top1']:.1f}%")
    seconds = time.perf_counter() - t0
    collected = gc.collect()  # garbage in reference cycles (DALI's pipeline graphs: see BENCHMARKS.md)
    after_gc = rss_bytes()[0] / 2**20

    warm = min(max(1, math.ceil(epochs * warmup_fraction)), epochs - 1) if epochs > 1 else 1
    mb = [s / 2**20 for s in samples]
    result = {"steps": done, "epochs": epochs, "steps_per_epoch": per_epoch, "pipeline_builds": 2 * epochs,
              "warmup_epochs": warm, "warmup_fraction": warmup_fraction, "rss_mb": mb,
              "start_rss_mb": start_rss / 2**20, "rss_source": source, "loader": loader, "workers": workers,
              "model": model, "batch": batch, "size": size, "data": str(root), "device": str(dev),
              "final_top1": val["top1"], "gc_collected_at_end": collected,
              "final_rss_after_gc_mb": after_gc, "seconds": seconds,
              "torch_threads": torch.get_num_threads()}
    if len(mb) > 1:
        check = plateau(mb, warm)
        result.update(warmup_rss_mb=check["warmup_rss"], final_rss_mb=check["final_rss"],
                      max_after_warmup_mb=check["max_after"], growth_pct=check["growth_pct"],
                      plateau=check["plateau"], limit_pct=check["limit_pct"])
    else:  # one epoch: nothing after warm-up to compare
        result.update(warmup_rss_mb=mb[0], final_rss_mb=mb[0], max_after_warmup_mb=None, growth_pct=None,
                      plateau=None, limit_pct=LIMIT_PCT)
    result.update(machine_info(dev))
    return result


def format_soak(d) -> str:
    """One screen: the set-up, RSS at ~10 points of the run, and the verdict."""
    mb, n = d["rss_mb"], len(d["rss_mb"])
    load = "" if not d.get("load_avg") else f", load {d['load_avg'][0]:.1f}"
    picks = sorted({0, d["warmup_epochs"] - 1, n - 1, *(round(i * (n - 1) / 9) for i in range(10))})
    lines = [
        f"soak: {d['steps']} steps ({d['epochs']} epochs of {d['steps_per_epoch']}, {d['pipeline_builds']} pipeline "
        f"builds), {d['model']}, batch {d['batch']}, {d['size']} px, recursive_mix, {d['loader']} loader "
        f"({d['workers']} workers), {d['device']}",
        f"{d['cpu_model']} ({d['cpu_count']} CPUs{load}, {d['torch_threads']} torch threads); torch {d['torch']}, "
        f"dali {d['dali']}; RSS from {d['rss_source']}; {d['seconds']:.0f} s",
        f"RSS before the first epoch {d['start_rss_mb']:.1f} MB; after epoch:",
    ]
    lines += [f"  {i + 1:>6}{' (end of warm-up)' if i == d['warmup_epochs'] - 1 else '':<17}{mb[i]:>9.1f} MB"
              for i in picks]
    if d["growth_pct"] is None:
        lines.append("one epoch only: nothing after warm-up to compare (more --steps)")
    else:
        verdict = "plateau" if d["plateau"] else "NO plateau"
        lines.append(f"warm-up {d['warmup_epochs']} epochs: {d['warmup_rss_mb']:.1f} MB; max after "
                     f"{d['max_after_warmup_mb']:.1f} MB, final {d['final_rss_mb']:.1f} MB; growth "
                     f"{d['growth_pct']:+.2f}% (limit {d['limit_pct']:.0f}%): {verdict}")
    lines.append(f"a full gc.collect() at the end freed {d['gc_collected_at_end']} objects in reference cycles; "
                 f"RSS then {d['final_rss_after_gc_mb']:.1f} MB")
    return "\n".join(lines)
