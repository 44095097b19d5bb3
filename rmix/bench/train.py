"""Training-step throughput: RecursiveMix against no mixing, and the real input pipeline against batches in memory.

    from rmix.bench.train import bench_train, format_bench
    print(format_bench(bench_train(model="resnet8", size=32)))

Every step is `rmix.engine.train_step`, the engine's own: mix, forward under autocast, loss,
backward, optimizer step, remember. Three runs of one model (the same initial weights), one
process, one configuration:
- none and rm: `--aug none` and `--aug recursive_mix` on the same uint8 batches already on the
  device, their steps interleaved (none, rm, none, rm, ...) so both see the same machine load.
  rm_overhead = rm step time / none step time - 1: the share of step time RM adds (the fused op's
  paste, the RoI head, the consistency loss).
- pipeline: recursive_mix fed by the real loader (`rmix.data.make_loader`, as `rmix train` builds
  it), the wait for each batch inside the step's time. loader_overhead = pipeline step time /
  in-memory rm step time - 1: what the loader costs the step (0 when it keeps up).
Medians over `steps` steps after `warmup` steps; on CUDA, CUDA events read once at the end.
"""
import copy
import os

import torch

from rmix import config as C
from rmix.bench.timing import StepTimer, machine_info, median, torch_threads
from rmix.data import CIFAR_DIRS, make_loader, resolve_data
from rmix.engine import (
    amp_dtype,
    build_optimizer,
    compile_model,
    make_policy,
    resolve_device,
    set_determinism,
    train_step,
)
from rmix.models import build

SYNTHETIC_BATCHES = 4  # distinct in-memory batches, cycled
# What `deterministic_cost` measures: the runners share one process, and cuBLAS reads its workspace
# setting (CUBLAS_WORKSPACE_CONFIG=:4096:8, which --deterministic sets) once, when the process makes
# its first handle; so every runner here has it, and its share of the cost is not in the figure.
DETERMINISTIC_COVERS = ("cuDNN's deterministic algorithms and torch's deterministic ops, not cuBLAS's fixed "
                        "workspace, which every run of the process has")


class TimedPolicy:
    """A policy whose calls are timed into `timer`; everything else goes to the policy."""

    def __init__(self, policy, timer):
        self._policy, self._timer = policy, timer

    def __call__(self, images, targets):
        with self._timer:
            return self._policy(images, targets)

    def __getattr__(self, name):
        return getattr(self._policy, name)


class Runner:
    """One model, optimizer, scaler and policy, built as `rmix.engine.train` builds them."""

    def __init__(self, cfg, aug, num_classes, device, model, compile_mode="none", deterministic=False):
        self.rm = aug == "recursive_mix"
        self.deterministic = deterministic  # its steps run with `--deterministic`'s settings
        if not self.rm and hasattr(model, "fc_roi"):
            model.fc_roi.requires_grad_(False)  # as the engine: unused without RM
        self.optimizer = build_optimizer(model, cfg.optim)
        self.model = compile_model(model, compile_mode)
        self.amp = amp_dtype(cfg, device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp == torch.float16)
        self.channels_last = cfg.channels_last and device.type == "cuda"
        policy = make_policy(C.replace(cfg, num_classes=num_classes), device, self.amp, name=aug)
        self.step_timer, self.mix_timer = StepTimer(device), StepTimer(device)
        self.policy = TimedPolicy(policy, self.mix_timer)
        self.omega = cfg.mix.omega
        model.train()

    def step(self, images, targets):
        """One training step of the engine on uint8 (N, H, W, 3) images and (N,) targets."""
        train_step(self.model, self.policy, images, targets, self.optimizer, self.scaler, self.amp, self.omega,
                   rm=self.rm)


def bench_config(model, *, batch, size, device, amp, channels_last, data_dir, loader, workers, seed,
                 compile_mode="none", torch_decode="workers"):
    """The TrainConfig of the benchmark: `rmix train`'s defaults with these options."""
    return C.replace(C.TrainConfig(), model=model, batch_size=batch, device=device, amp=amp,
                     channels_last=channels_last, seed=seed, compile=compile_mode, **{
                         "data.data_dir": data_dir or "", "data.loader": loader, "data.workers": workers,
                         "data.torch_decode": torch_decode,
                         "data.crop_size": size, "data.val_resize": max(size, C.DataConfig.val_resize),
                         "data.min_area": 0.08 if size >= 128 else C.DataConfig.min_area})


def _batches_forever(loader, policy):
    """The loader's batches, epoch after epoch; the history is cleared at each epoch start, as the engine does."""
    while True:
        policy.reset()
        yield from loader


def bench_train(model="resnet8", *, batch=128, size=32, steps=20, warmup=5, device="cpu", amp="auto",
                channels_last=False, data_dir=None, loader="dali", workers=2, seed=0, threads=None,
                compile_mode="none", torch_decode="workers", deterministic=False, compiled="both", log=None) -> dict:
    """Median training-step times: none vs recursive_mix in memory, and recursive_mix fed by the loader.

    Args:
        data_dir: ImageFolder root or CIFAR folder for the pipeline run [default: the embedded set];
            the in-memory batches have its number of classes.
        loader: "dali" or "torch"; workers: its threads / DataLoader workers; torch_decode: the torch
            loader's decode, "workers" (PIL) or "device" (torchvision.io.decode_jpeg, nvJPEG on a GPU).
        threads: torch CPU threads for the run (None: leave as is). 1 gives steadier figures on a
            machine that other work shares: each parallel op otherwise waits for a busy core.
        compile_mode: a torch.compile mode ("default", ...): none and recursive_mix also run
            compiled, interleaved with the eager runs, and the pipeline run is compiled; "none": eager only.
        compiled: "both" (none and recursive_mix compiled) or "rm" (recursive_mix alone: one graph to
            compile, for a run with a short time limit).
        deterministic: recursive_mix also runs with `rmix train --deterministic`'s settings (deterministic
            kernels), interleaved with the others, which run as `rmix train` does by default (cudnn.benchmark).
            Its cost leaves out cuBLAS's workspace setting: see DETERMINISTIC_COVERS.
        log: a callable for progress lines, or None.
    """
    if threads is not None:
        with torch_threads(threads):
            return bench_train(model, batch=batch, size=size, steps=steps, warmup=warmup, device=device, amp=amp,
                               channels_last=channels_last, data_dir=data_dir, loader=loader, workers=workers,
                               seed=seed, compile_mode=compile_mode, torch_decode=torch_decode,
                               deterministic=deterministic, compiled=compiled, log=log)
    for name, value, low in (("--batch", batch, 1), ("--size", size, 8), ("--steps", steps, 1),
                             ("--warmup", warmup, 0), ("--workers", workers, 0)):
        if value < low:
            raise ValueError(f"{name}: must be >= {low}, got {value}")
    if compiled not in ("both", "rm"):
        raise ValueError(f"--compiled: expected 'both' or 'rm', got {compiled!r}")
    dev = resolve_device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", torch.cuda.current_device())
    if deterministic:  # cuBLAS reads it when its first handle is made, before any runner's matmul
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    cfg = bench_config(model, batch=batch, size=size, device=dev.type, amp=amp, channels_last=channels_last,
                       data_dir=data_dir, loader=loader, workers=workers, seed=seed, compile_mode=compile_mode,
                       torch_decode=torch_decode)
    C.validate(cfg)
    root, dataset = resolve_data(cfg.data.data_dir, cfg.data.dataset)
    cfg = C.with_dataset_stats(cfg, dataset)
    if dataset in CIFAR_DIRS and size != 32:
        raise ValueError(f"--size: {dataset} batches are 32 px, got --size {size}")
    train_loader = make_loader(cfg, root, dataset, dev, train=True)
    k = train_loader.num_classes

    torch.manual_seed(seed)
    net = build(cfg.model, k, share_fc=cfg.mix.share_fc, image_size=size).to(dev)
    if cfg.channels_last and dev.type == "cuda":
        net = net.to(memory_format=torch.channels_last)
    # the same initial weights for every run; the pipeline run continues the in-memory rm run (compiled
    # with --compile: the first steps of each compiled runner compile it, inside the warm-up)
    runners = {"none": Runner(cfg, "none", k, dev, copy.deepcopy(net))}
    if compile_mode != "none":
        if compiled == "both":
            runners["none_compiled"] = Runner(cfg, "none", k, dev, copy.deepcopy(net), compile_mode)
        runners["rm"] = Runner(cfg, "recursive_mix", k, dev, copy.deepcopy(net))
        runners["rm_compiled"] = Runner(cfg, "recursive_mix", k, dev, net, compile_mode)
    else:
        runners["rm"] = Runner(cfg, "recursive_mix", k, dev, net)
    if deterministic:
        runners["rm_deterministic"] = Runner(cfg, "recursive_mix", k, dev, copy.deepcopy(runners["rm"].model),
                                             deterministic=True)
    piped = runners["rm_compiled" if compile_mode != "none" else "rm"]

    g = torch.Generator().manual_seed(seed)
    batches = [(torch.randint(0, 256, (batch, size, size, 3), dtype=torch.uint8, generator=g).to(dev),
                torch.randint(0, k, (batch,), generator=g).to(dev)) for _ in range(SYNTHETIC_BATCHES)]
    if log is not None:
        log(f"in memory: {warmup} + {steps} steps each of {', '.join(runners)}, interleaved")
    for i in range(warmup + steps):
        images, targets = batches[i % SYNTHETIC_BATCHES]
        for runner in runners.values():
            set_determinism(runner.deterministic, dev)  # outside the timer; as `rmix train` sets it
            with runner.step_timer:
                runner.step(images, targets)

    if log is not None:
        log(f"pipeline ({cfg.data.loader}, {workers} workers): {warmup} + {steps} steps of recursive_mix"
            + (f", compiled ({compile_mode})" if compile_mode != "none" else ""))
    set_determinism(False, dev)  # the pipeline run: `rmix train`'s default
    pipe_timer = StepTimer(dev)
    feed = _batches_forever(train_loader, piped.policy)
    for _ in range(warmup + steps):
        with pipe_timer:
            images, targets = next(feed)
            piped.step(images, targets)
    feed.close()
    del train_loader

    def ms(timer):
        return median(timer.results()[warmup:])

    def mix_ms(runner):  # the policy call of every step; the pipeline run added more to rm's list
        return median(runner.mix_timer.results()[warmup:warmup + steps])

    none, rm = runners["none"], runners["rm"]
    none_ms, rm_ms, pipe_ms = ms(none.step_timer), ms(rm.step_timer), ms(pipe_timer)
    result = {
        "none_ms": none_ms, "rm_ms": rm_ms, "pipeline_ms": pipe_ms,
        "none_img_s": batch / none_ms * 1e3, "rm_img_s": batch / rm_ms * 1e3,
        "rm_overhead": rm_ms / none_ms - 1,
        "synthetic_img_s": batch / rm_ms * 1e3, "pipeline_img_s": batch / pipe_ms * 1e3,
        "loader_overhead": pipe_ms / ms(piped.step_timer) - 1,
        "none_mix_ms": mix_ms(none), "rm_mix_ms": mix_ms(rm),
        "model": cfg.model, "batch": batch, "size": size, "steps": steps, "warmup": warmup,
        "device": str(dev), "amp": {None: "none", torch.bfloat16: "bf16", torch.float16: "fp16"}[rm.amp],
        "channels_last": rm.channels_last, "loader": cfg.data.loader, "workers": workers,
        "data": str(root), "dataset": dataset, "num_classes": k, "torch_threads": torch.get_num_threads(),
        "compile": compile_mode, "torch_decode": cfg.data.torch_decode, "deterministic": deterministic,
    }
    if deterministic:  # the same run, batches and interleaving: what --deterministic costs
        dm = ms(runners["rm_deterministic"].step_timer)
        result.update({"rm_deterministic_ms": dm, "rm_deterministic_img_s": batch / dm * 1e3,
                       "deterministic_cost": dm / rm_ms - 1, "deterministic_cost_covers": DETERMINISTIC_COVERS})
    if compile_mode != "none":  # ratios against eager, same run, same batches, interleaved steps
        cr = ms(runners["rm_compiled"].step_timer)
        result.update({"compiled": compiled, "rm_compiled_ms": cr, "rm_compiled_img_s": batch / cr * 1e3,
                       "rm_compile_speedup": rm_ms / cr})
        if compiled == "both":
            cn = ms(runners["none_compiled"].step_timer)
            result.update({"none_compiled_ms": cn, "none_compiled_img_s": batch / cn * 1e3,
                           "none_compile_speedup": none_ms / cn, "rm_compiled_overhead": cr / cn - 1})
    result.update(machine_info(dev))
    return result


def format_bench(d) -> str:
    """A side-by-side table of a `bench_train` result."""
    load = "" if not d.get("load_avg") else f", load {d['load_avg'][0]:.1f}"

    def rate(img_s):
        return f"{img_s:>9.0f}" if img_s >= 100 else f"{img_s:>9.2f}"

    lines = [
        f"train step: {d['model']}, batch {d['batch']}, {d['size']} px, amp {d['amp']}, "
        f"channels_last {d['channels_last']}, {d['device']} ({d['device_name']}), median of {d['steps']} steps "
        f"after {d['warmup']}",
        f"{d['cpu_model']} ({d['cpu_count']} CPUs{load}, {d['torch_threads']} torch threads); torch {d['torch']}",
        f"{'':<24}{'ms/step':>9}{'img/s':>9}{'mix ms':>9}",
        f"{'none, in memory':<24}{d['none_ms']:>9.2f}{rate(d['none_img_s'])}{d['none_mix_ms']:>9.2f}",
        f"{'recursive_mix, in memory':<24}{d['rm_ms']:>9.2f}{rate(d['rm_img_s'])}{d['rm_mix_ms']:>9.2f}",
    ]
    if d.get("deterministic"):
        lines.append(f"{'recursive_mix, determ.':<24}{d['rm_deterministic_ms']:>9.2f}{rate(d['rm_deterministic_img_s'])}")
    if d.get("compile", "none") != "none":
        if "none_compiled_ms" in d:
            lines.append(f"{'none, compiled':<24}{d['none_compiled_ms']:>9.2f}{rate(d['none_compiled_img_s'])}")
        lines.append(f"{'recursive_mix, compiled':<24}{d['rm_compiled_ms']:>9.2f}{rate(d['rm_compiled_img_s'])}")
    piped = "recursive_mix, " + d["loader"] + (" (compiled)" if d.get("compile", "none") != "none" else "")
    lines += [
        f"{piped:<24}{d['pipeline_ms']:>9.2f}{rate(d['pipeline_img_s'])}",
        f"RM overhead {d['rm_overhead']:+.1%} of step time   loader overhead {d['loader_overhead']:+.1%} "
        f"({d['loader']}, {d['workers']} workers, {d['data']})",
    ]
    if d.get("deterministic"):
        lines.append(f"--deterministic costs {d['deterministic_cost']:+.1%} of recursive_mix's step time "
                     f"({d['deterministic_cost_covers']})")
    if d.get("compile", "none") != "none" and "none_compile_speedup" in d:
        lines.append(f"--compile {d['compile']}: none {d['none_compile_speedup']:.2f}x, recursive_mix "
                     f"{d['rm_compile_speedup']:.2f}x eager speed; RM overhead compiled {d['rm_compiled_overhead']:+.1%}")
    elif d.get("compile", "none") != "none":
        lines.append(f"--compile {d['compile']}: recursive_mix {d['rm_compile_speedup']:.2f}x eager speed")
    return "\n".join(lines)
