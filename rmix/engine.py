"""The training core: build everything from a TrainConfig, run the epochs, keep the run directory."""
import functools
import json
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from rmix import checkpoint, dist, resume, rundir
from rmix import config as C
from rmix.config import TrainConfig, replace, to_dict, validate
from rmix.data import ARRAY_SETS, DATASET_KINDS, check_classes, make_loader, make_loaders, resolve_data, sharded
from rmix.ema import ModelEma
from rmix.guard import StepGuard, TrainingError, nonfinite, step_skipping
from rmix.logs import RunLogs, check_backends, metrics_rows
from rmix.losses import mix_loss, soft_cross_entropy, topk_correct
from rmix.mixing import NoMix, build_policy, roi_boxes
from rmix.models import build, check_input_size
from rmix.pipelines import DecodeError
from rmix.preempt import Preemption
from rmix.progress import Progress
from rmix.schedule import lr_at


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device: cuda was asked for but no CUDA device is available")
    return torch.device(name)


def auto_amp(device) -> tuple[str, str]:
    """What `--amp auto` means on `device`, and why: bf16 where the GPU computes it natively
    (compute capability 8.0 on: Ampere, Hopper, ...), fp16 with the loss scaler on older GPUs
    (Volta, Turing: bf16 is emulated there, or refused), fp32 on the CPU."""
    if device.type != "cuda":
        return "none", f"fp32 on {device.type}"
    major, minor = torch.cuda.get_device_capability(device)
    if major >= 8:
        return "bf16", f"sm_{major}{minor} computes bf16 natively"
    return "fp16", f"sm_{major}{minor} has no native bf16; fp16 with the loss scaler"


def amp_dtype(cfg, device):
    """The autocast dtype, or None for fp32."""
    amp = cfg.amp if cfg.amp != "auto" else auto_amp(device)[0]
    return {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def set_determinism(deterministic: bool, device) -> None:
    """`--deterministic`: the same kernels every run (cuDNN's deterministic algorithms, cuBLAS's
    fixed workspace, torch's deterministic ops); else cuDNN benchmarks and keeps the fastest
    algorithms for the run's fixed shapes. The CPU is deterministic either way.

    Ops with no deterministic CUDA kernel only warn (`warn_only`): torchvision's roi_align then
    takes its deterministic path (a torch.compile'd one: the first step compiles it), and adaptive
    average pooling to 1x1 (one add per input element) is deterministic in fact though torch flags it.
    """
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS starts in this process
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = device.type == "cuda" and not deterministic
    torch.use_deterministic_algorithms(deterministic, warn_only=True)


# torch.compile modes that capture CUDA graphs, and what a run under torchrun compiles instead:
# BatchNorm + DDP + CUDA graphs skip or slow down (pytorch#139207, #113809), until a multi-GPU
# run shows them working.
DDP_COMPILE = {"reduce-overhead": "default", "max-autotune": "max-autotune-no-cudagraphs"}


def compile_mode_for(mode: str, d) -> tuple[str, str | None]:
    """(the mode to compile with, a line saying why it changed or None)."""
    if not d.enabled or mode not in DDP_COMPILE:
        return mode, None
    to = DDP_COMPILE[mode]
    return to, (f"--compile {mode}: its CUDA graphs under torchrun hit open torch problems (pytorch#139207, "
                f"#113809); compiling with {to!r} instead")


def build_optimizer(model, o):
    """SGD or AdamW, fused: their kernels take `found_inf` and skip a bad step on the device."""
    params = [p for p in model.parameters() if p.requires_grad]
    if o.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov,
                              weight_decay=o.weight_decay, fused=True)
    else:
        opt = torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay, fused=True)
    init_momentum(opt)
    return opt


def init_momentum(optimizer):
    """Zero SGD momentum buffers before the first step. Fused SGD allocates them uninitialized on its
    first step and fills them in its kernel, which a skipped step never runs: the next step would then
    read garbage. With dampening 0, `buf = momentum * 0 + grad` is the first step's `buf = grad`, exactly."""
    if not isinstance(optimizer, torch.optim.SGD):
        return
    for g in optimizer.param_groups:
        if g["momentum"] and not g["dampening"]:
            for p in g["params"]:
                optimizer.state[p].setdefault("momentum_buffer", torch.zeros_like(p))


def match_param_layout(optimizer):
    """Lay each per-parameter state tensor (momentum, Adam's moments) out as its parameter is:
    same device, dtype and strides. `Optimizer.load_state_dict` keeps the saved strides, so a
    checkpoint of a channels_last CUDA run resumed on the CPU (or the reverse) would hand the
    fused kernels a buffer laid out unlike its parameter: CUDA's fused SGD/AdamW refuse it, and
    the CPU's fused SGD walks the two in different element orders (wrong momentum, silently).
    Scalars (Adam's `step`) are left where torch put them."""
    for p, state in optimizer.state.items():
        for k, v in state.items():
            if isinstance(v, torch.Tensor) and v.shape == p.shape and (
                    v.stride() != p.stride() or v.device != p.device or v.dtype != p.dtype):
                state[k] = torch.empty_like(p).copy_(v)  # empty_like keeps p's strides (preserve_format)


def default_run_dir(cfg) -> Path:
    return Path("runs") / f"{cfg.model}-{cfg.mix.policy}-{time.strftime('%Y%m%d-%H%M%S')}"


def wrap_ddp(model, device, d, sync_bn=False):
    """`model` in DistributedDataParallel under torchrun (several processes); unchanged on one."""
    if not d.enabled:
        return model
    if sync_bn:
        if device.type != "cuda":  # torch's SyncBatchNorm raises on CPU tensors (checked with torch 2.14)
            raise ValueError(f"--sync-bn: SyncBatchNorm needs CUDA devices, this run is on {device.type}; "
                             "drop --sync-bn (each rank then normalizes over its own share of the batch)")
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)  # keeps the Parameter objects
    # no find_unused_parameters: every trainable parameter gets a gradient every step (see roi_boxes)
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None)


def compile_model(model, mode):
    """torch.compile(model, mode=mode), RoI head included (it is part of forward); unchanged for "none".

    Compile the DDP wrapper, not the module inside it: TorchDynamo then splits the graph at DDP's
    bucket boundaries, so the all-reduces still overlap the backward pass. The module itself keeps
    its parameters, so checkpoints and exports of it have no `_orig_mod.` prefix.
    """
    if mode == "none":
        return model
    return torch.compile(model, mode=mode)


def build_policies(cfg, device, amp, rank=0, name=None):
    """(training policy, evaluation normalizer) as `train` uses them; one history and box RNG per rank.

    `name`: another policy than cfg.mix.policy (benchmarks compare them on one config).
    """
    kw = dict(mean=cfg.data.mean, std=cfg.data.std, out_dtype=amp or torch.float32,
              channels_last=cfg.channels_last and device.type == "cuda")
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + (0 if cfg.mix.shared_boxes else rank))
    name = name or cfg.mix.policy
    policy = build_policy(name, cfg.num_classes, **mix_settings(cfg, name), generator=gen, **kw)
    return policy, NoMix(cfg.num_classes, **kw)


def mix_settings(cfg, name):
    """build_policy's settings for policy `name` from cfg.mix: RecursiveMix's own (omega, interpolate,
    per_sample) only for it, as build_policy refuses them elsewhere (a preset's omega with --aug cutmix stays unused)."""
    own = dict(omega=cfg.mix.omega, interpolate=cfg.mix.interpolate, per_sample=cfg.mix.per_sample) \
        if name == "recursive_mix" else {}
    return dict(alpha=cfg.mix.alpha, smoothing=cfg.mix.smoothing, smoothing_form=cfg.mix.smoothing_form, **own)


def set_lr(optimizer, cfg, epoch) -> float:
    """The paper's per-epoch learning rate (1-based epoch) into every param group; returns it."""
    lr = lr_at(epoch, cfg.optim.lr, cfg.epochs, schedule=cfg.optim.schedule, warmup=cfg.optim.warmup,
               milestones=cfg.optim.milestones, gamma=cfg.optim.gamma)
    for g in optimizer.param_groups:
        g["lr"] = lr
    return lr


def train_step(model, policy, images, targets, optimizer, scaler, amp, omega, *, rm):
    """One optimizer step on a batch: mix, forward under autocast, loss, backward, step, remember.

    Returns (loss, logits, out, bad): the loss (not detached), the logits, the policy's MixOut,
    and a one-element device tensor, nonzero when the update was skipped (a non-finite loss or
    gradient; with fp16, GradScaler's overflow). No value is read back to the host: the skip
    happens in the fused optimizer's kernel, and rmix.guard.StepGuard reports it later.
    `rm`: the policy is RecursiveMix (the model also returns roi_logits).
    """
    torch.compiler.cudagraph_mark_step_begin()  # --compile reduce-overhead: a new step, new graph outputs
    out = policy(images, targets)
    h, w = out.images.shape[-2:]
    with torch.autocast(out.images.device.type, dtype=amp, enabled=amp is not None):
        if rm:
            logits, roi_logits = model(out.images, roi_boxes(out, h, w))
        else:
            logits, roi_logits = model(out.images), None
        loss = mix_loss(logits, roi_logits, out.soft_targets, getattr(policy, "prev_logits", None),
                        out.lam, omega, check_values=False)
    scaler.scale(loss).backward()  # under DDP the gradients are now the same on every rank
    if scaler.is_enabled():  # fp16: GradScaler finds overflows and skips on the device (fused optimizer)
        scale = scaler._get_scale_async().clone()
        scaler.step(optimizer)
        scaler.update()
        bad = (scaler._get_scale_async() < scale).float()  # the scaler backs off exactly when it skips
    else:  # every rank sees the same all-reduced gradients, so every rank skips the same steps
        bad = nonfinite(loss, optimizer)
        step_skipping(optimizer, bad)
    optimizer.zero_grad(set_to_none=True)
    policy.remember(out.images, out.soft_targets, logits)
    return loss, logits, out, bad


def train_one_epoch(model, policy, loader, optimizer, scaler, cfg, epoch, amp, progress, *, start_step=0,
                    sums=None, seen=0, on_step=None, guard=None, stop=None, ema=None):
    """One pass over `loader`; returns summed (loss, correct, images) as a tensor.

    `start_step` > 0 continues a pass that a mid-epoch checkpoint cut: the loader was set to
    start there (`loader.set_epoch(e, start_step)`), the policy keeps the history it was given,
    and `sums`/`seen` carry the statistics so far.
    `on_step(steps_done, sums, seen)` runs after each optimizer step (mid-epoch checkpoints);
    `stop(steps_done, last)` after that ends the pass early when true (preemption, rmix.preempt).
    `guard` (rmix.guard.StepGuard, carried across epochs by train()) holds the bad steps on the
    device; it is read at the sync points below and raises TrainingError there. `ema`
    (rmix.ema.ModelEma) is updated after each optimizer step.

    Sync points (where the host waits for the device), and nowhere else in the loop:
    - the progress line, every `cfg.log_every` steps and at the last: the loss, and the guard;
    - a mid-epoch checkpoint (`--save-every-steps`): the guard first, then the state it saves;
    - under torchrun, the preemption flag's all-reduce every `cfg.log_every` steps (rmix.preempt);
    - the end of the pass: the guard, and the summed statistics.
    """
    model.train()
    if start_step == 0:
        policy.reset()  # the paper's code clears the history at each epoch start
    rm = cfg.mix.policy == "recursive_mix"
    fp16 = scaler.is_enabled()
    guard = StepGuard(cfg.max_skipped_steps) if guard is None else guard
    batches = iter(loader)
    end = min(len(loader), cfg.max_steps or len(loader))  # --max-steps ends every epoch early
    for step in range(start_step, end):
        try:
            images, targets = next(batches)
        except StopIteration:
            break
        except DecodeError as e:  # DALI cannot skip a bad sample: stop, naming the batch's files
            which = ", ".join(e.bad_files) if e.bad_files else f"one of {len(e.files)} files"
            raise TrainingError(f"cannot decode {which} at epoch {epoch}, step {step + 1} ({e.reason}); "
                                f"the batch's files: {', '.join(e.files)}; run `rmix data check`") from None
        loss, logits, out, bad = train_step(model, policy, images, targets, optimizer, scaler, amp,
                                            cfg.mix.omega, rm=rm)
        guard.update(step, bad, loss, fp16)
        if ema is not None:
            ema.update()  # device ops only (rmix.ema)
        n = images.shape[0]
        correct = (logits.argmax(-1) == out.soft_targets.argmax(-1)).sum()
        stats = torch.stack([loss.detach().double() * n, correct.double()])
        # summed on the device: no CPU-GPU sync per step for the statistics
        sums, seen = (stats if sums is None else sums.to(stats.device) + stats), seen + n
        done = step + 1
        saves = bool(cfg.save_every_steps) and done % cfg.save_every_steps == 0
        if done % cfg.log_every == 0 or saves:  # (the last step: after the loop)
            guard.check(epoch)  # note: a CPU-GPU sync point
        progress.update(n, loss=loss.detach(), lr=optimizer.param_groups[0]["lr"])
        if on_step is not None:
            on_step(done, sums, seen)
        if stop is not None and stop(done, last=done == end):
            break
    guard.check(epoch)  # note: a CPU-GPU sync point; also before a preemption's checkpoint
    sums = sums.cpu() if sums is not None else torch.zeros(2, dtype=torch.float64)
    return torch.cat([sums, torch.tensor([seen], dtype=torch.float64)])


@torch.no_grad()
def evaluate(model, loader, normalize, amp, d=dist.Dist(), progress=None):
    """Top-1 / top-5 in percent and mean loss over every image of `loader`, summed over ranks."""
    model.eval()
    sums = None  # summed where the logits are: the pass reads nothing back until its end
    for images, targets in loader:
        if len(targets) == 0:  # a rank's share of the val set can end one batch early
            continue
        x = normalize(images, targets)
        with torch.autocast(x.images.device.type, dtype=amp, enabled=amp is not None):
            logits = model(x.images)
        c1, c5 = topk_correct(logits, targets)
        loss = soft_cross_entropy(logits, x.soft_targets) * len(targets)
        batch = torch.stack([c1.double(), c5.double(), loss.double(), loss.new_full((), len(targets)).double()])
        sums = batch if sums is None else sums + batch
        if progress is not None:
            progress.update(len(targets))
    sums = torch.zeros(4, dtype=torch.float64) if sums is None else sums
    sums = dist.all_sum(sums.to(_reduce_device(d)), d).cpu()  # note: the pass's one CPU-GPU sync
    n = max(sums[3].item(), 1)
    top5 = 100 * sums[1].item() / n if getattr(loader, "num_classes", 6) > 5 else None  # with <= 5 classes: always 100
    return {"top1": 100 * sums[0].item() / n, "top5": top5,
            "loss": _finite(sums[2].item() / n), "images": int(sums[3].item())}


def _finite(x):
    """None for inf/NaN, so metrics and --json stay valid JSON."""
    return x if math.isfinite(x) else None


def _reduce_device(d):
    return torch.device("cuda") if d.enabled and torch.distributed.get_backend() == "nccl" else torch.device("cpu")


def rng_state(policy):
    """Every random stream of this process, as plain data (loads with weights_only=True)."""
    return {"python": random.getstate(), "torch": torch.get_rng_state(),
            "numpy": [v.tolist() if hasattr(v, "tolist") else v for v in np.random.get_state()],
            "policy": policy.generator.get_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_initialized() else None}


def train(cfg: TrainConfig, *, show_progress=None, given=None, allow_changes=()) -> dict:
    """Train as `cfg` says; returns {"best_top1", "final_top1", "run_dir", ...}.

    On resume the run continues with its saved config: `given` names the fields the user set this
    time (None: all of cfg), `allow_changes` the fields that may then differ (see rmix.resume).
    """
    validate(cfg)
    check_backends(cfg.log)  # every rank, before anything starts: a --log backend that is not installed
    check_input_size(cfg.model, 2, cfg.data.crop_size, share_fc=cfg.mix.share_fc)  # before --out is created
    device = resolve_device(cfg.device)
    d = dist.setup(device.type, cfg.dist_timeout)
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    set_determinism(cfg.deterministic, device)
    with Preemption(d, _reduce_device(d), every=cfg.log_every) as preempt:  # SIGTERM/SIGUSR1: save, exit 0
        return _claim_and_train(cfg, d, device, show_progress, given, allow_changes, preempt)


def _claim_and_train(cfg, d, device, show_progress, given, allow_changes, preempt):
    random.seed(cfg.seed + d.rank)
    np.random.seed(cfg.seed + d.rank)
    torch.manual_seed(cfg.seed + d.rank)
    run_dir = Path(cfg.out or dist.broadcast_object(str(default_run_dir(cfg)), d))  # rank 0's clock
    lock, refusal = None, None
    if d.is_main:  # before anything is written: the run directory is this run's, or nothing starts
        try:
            lock = rundir.claim(run_dir, resume=bool(cfg.resume), resume_from=cfg.resume or "")
        except ValueError as e:
            refusal = str(e)
    refusal = dist.broadcast_object(refusal, d)
    if refusal:
        dist.cleanup(d)
        raise ValueError(refusal)
    trained = False
    try:
        result = _train(cfg, d, device, run_dir, show_progress, given, allow_changes, preempt)
        trained = not result.get("complete")  # a complete run resumed: an --out this call created goes again
        return result
    finally:
        if lock is not None:
            lock.release(failed=not trained)


def _train(cfg, d, device, run_dir, show_progress, given, allow_changes, preempt):
    """`train` in the run directory it holds."""
    show = d.is_main if show_progress is None else (show_progress and d.is_main)
    ckpt, path, changes = None, None, {}
    if cfg.resume:
        path = run_dir / "latest.pt" if cfg.resume == "auto" else Path(cfg.resume)
        if cfg.resume != "auto" or path.is_file():
            try:
                ckpt = checkpoint.read(path)
            except checkpoint.CheckpointError as e:  # a latest.pt cut short: say what is left to go on from
                best = path.with_name("best.pt")
                if path.name != "latest.pt" or not best.is_file():
                    raise
                raise checkpoint.CheckpointError(f"{e}; `--resume {best}` continues from best.pt's epoch") from None
            if ckpt["foreign"]:
                raise checkpoint.CheckpointError(f"{path}: not an rmix training checkpoint (cannot resume from it)")
            cfg, changes = resume.merge(cfg, C.from_dict(ckpt["config"]), path, given=given, allow=allow_changes)
            metrics_rows(run_dir / "metrics.jsonl")  # a bad row is refused before anything is written
            if ckpt["epoch"] >= cfg.epochs and not ckpt.get("step"):
                return _complete(cfg, ckpt, Path(path).parent, show, d, out=run_dir)
        else:  # auto with nothing to continue from: a fresh start, if the directory holds no run's results
            cfg = _fresh_start(cfg, run_dir, given, allow_changes)
    root, dataset = resolve_data(cfg.data.data_dir, cfg.data.dataset)
    if ckpt is not None and ckpt.get("step") and "data.loader" in changes and sharded(root, dataset):
        was, now = changes["data.loader"]
        raise ValueError(f"--loader {now}: {path} stopped inside epoch {ckpt['epoch'] + 1} of shards read by {was}, "
                         f"whose order {now} does not share; resume that epoch with --loader {was}, or change "
                         "the loader at an epoch's end")
    if dataset in ARRAY_SETS:
        _array_settings(cfg, root, dataset)
    if cfg.data.preflight and dataset not in ARRAY_SETS:
        preflight(cfg, root, dataset, d)
    train_loader, val_loader = make_loaders(cfg, root, dataset, device, d.rank, d.world_size)
    try:
        return _train_with(cfg, d, device, run_dir, show, ckpt, path, changes, root, dataset, preempt,
                           train_loader, val_loader)
    finally:  # whatever ends the run: loader workers stop now, not at the interpreter's exit
        for loader in (train_loader, val_loader):
            getattr(loader, "close", lambda: None)()


def _train_with(cfg, d, device, run_dir, show, ckpt, path, changes, root, dataset, preempt,
                train_loader, val_loader):
    """`_train` with its loaders."""
    if train_loader.num_classes < 2:
        raise ValueError(f"--data-dir: {root} has {train_loader.num_classes} class; classification needs at least 2 "
                         "(top-1 would be 100% whatever the model learns)")
    detected = cfg.data.dataset == "auto" and cfg.data.data_dir  # said below, once everything is checked
    cfg = replace(C.with_dataset_stats(cfg, dataset), num_classes=train_loader.num_classes, out=str(run_dir),
                  **{"data.data_dir": str(root), "data.dataset": dataset})

    data = {"train_samples": train_loader.num_samples, "classes": train_loader.classes}  # the same data?
    model = build(cfg.model, cfg.num_classes, share_fc=cfg.mix.share_fc, image_size=cfg.data.crop_size).to(device)
    if cfg.mix.policy != "recursive_mix" and hasattr(model, "fc_roi"):
        model.fc_roi.requires_grad_(False)  # unused without RM: frozen, so DDP sees no unused grads
    channels_last = cfg.channels_last and device.type == "cuda"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, cfg.optim)
    amp = amp_dtype(cfg, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    policy, normalize = build_policies(cfg, device, amp, d.rank)

    start, best, history, partial = 1, -1.0, [], None
    if ckpt is not None:
        start, best, partial = _resume(cfg, ckpt, path, data, model, optimizer, scaler, policy, device, d)
    model = wrap_ddp(model, device, d, sync_bn=cfg.sync_bn)
    raw_model = model.module if d.enabled else model  # saved, exported and evaluated: plain keys, eager
    ema = ModelEma(raw_model, cfg.ema, cfg.ema_warmup) if cfg.ema else None
    if ema is not None and ckpt is not None and ckpt.get("ema") is not None:
        ema.load_state_dict(ckpt["ema"])  # else --allow-changes ema: it starts from the resumed model
    mode, why = compile_mode_for(cfg.compile, d)
    model = compile_model(model, mode)
    if d.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if ckpt is None or not (run_dir / "config.json").is_file():  # a resume keeps the original
            (run_dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=2) + "\n")
        resume.record(run_dir, start, partial["step"] if partial else 0, changes)
    # metrics.jsonl (trimmed to latest.pt's epochs on resume), TensorBoard, --log's; the main rank's only
    logs = RunLogs(run_dir, to_dict(cfg), start, backends=cfg.log, show=show, enabled=d.is_main)
    saver = Saver(cfg, d, run_dir, raw_model, optimizer, scaler, policy, data, ema)
    final = None
    if show:  # everything checked: say what was read and where the run goes, before its first step
        if detected:
            Progress.line(f"--data-dir {root}: read as {DATASET_KINDS.get(dataset, dataset)}, from its files "
                          "(--dataset names it otherwise)")
        Progress.line(f"run directory: {run_dir}")
        if ckpt is not None:
            _say_what_the_resume_lacks(run_dir, path, ckpt)
            edited = resume.config_json_differs(run_dir, to_dict(cfg), path)  # changes.jsonl has this one
            if edited:  # settings edited (or damaged) by hand since: the checkpoint's are the run's
                Progress.line(edited)
        if cfg.amp == "auto" and device.type == "cuda":
            Progress.line("--amp auto: {} ({})".format(*auto_amp(device)))
        if why:
            Progress.line(why)
        if C.late_milestones(cfg):  # a preset's schedule cut short by --epochs: kept, but said
            Progress.line(f"milestones {','.join(map(str, cfg.optim.milestones))}: "
                          f"{','.join(map(str, C.late_milestones(cfg)))} at or after the last epoch ({cfg.epochs}) "
                          "never change the lr")
    if show and (start > 1 or partial):
        at = f", step {partial['step']}" if partial else ""
        Progress.line(f"resuming at epoch {start}{at} (best val top-1 so far {max(best, 0):.2f}%)")

    try:  # the logs are closed however the loop ends; W&B records a run that raised as failed
        guard = StepGuard(cfg.max_skipped_steps)  # bad steps, on the device, across epoch boundaries
        preempted = None
        for epoch in range(start, cfg.epochs + 1):
            lr = set_lr(optimizer, cfg, epoch)
            part, partial = partial or {"step": 0, "sums": None, "seen": 0, "seconds": 0.0}, None
            train_loader.set_epoch(epoch - 1, part["step"])  # epochs count from 0 there; replays exactly on resume
            t0 = time.perf_counter() - part["seconds"]
            steps = min(len(train_loader), cfg.max_steps or len(train_loader))  # --max-steps ends every epoch early
            on_step = functools.partial(saver.every, epoch, best, t0, steps) if cfg.save_every_steps else None
            with Progress(max(steps - part["step"], 0), f"epoch {epoch}/{cfg.epochs}", enabled=show,
                          every=cfg.log_every, on_log=logs.step_logger(epoch, steps, part["step"])) as bar:
                sums = train_one_epoch(model, policy, train_loader, optimizer, scaler, cfg, epoch, amp, bar,
                                       start_step=part["step"], sums=part["sums"], seen=part["seen"],
                                       on_step=on_step, guard=guard, stop=preempt.stop, ema=ema)
            if preempt.signal and preempt.at < steps:  # stopped inside the epoch: save at that step
                saver.mid_epoch(epoch, best, t0, preempt.at, sums[:2], int(sums[2].item()))
                preempted = {"signal": preempt.signal, "epoch": epoch, "step": preempt.at}
                break
            sums = dist.all_sum(sums.to(_reduce_device(d)), d).cpu()
            seconds = time.perf_counter() - t0
            dist.broadcast_buffers(raw_model, d)  # evaluate (and save) rank 0's BatchNorm statistics
            evaluated = epoch % cfg.eval_every == 0 or epoch == cfg.epochs
            val = evaluate(raw_model, val_loader, normalize, amp, d) if evaluated else \
                {"top1": None, "top5": None, "loss": None}
            row = {"epoch": epoch, "lr": lr, "train_loss": _finite(sums[0].item() / sums[2].item()),
                   "train_top1": 100 * sums[1].item() / sums[2].item(), "val_top1": val["top1"],
                   "val_top5": val["top5"], "val_loss": val["loss"], "img_s": sums[2].item() / seconds}
            score, best_of = val["top1"], "model"
            if ema is not None:
                dist.broadcast_buffers(ema.module, d)  # rank 0's averaged statistics, as the model's
                val_ema = evaluate(ema.module, val_loader, normalize, amp, d) if evaluated else \
                    {"top1": None, "top5": None, "loss": None}
                row.update(val_top1_ema=val_ema["top1"], val_top5_ema=val_ema["top5"], val_loss_ema=val_ema["loss"])
                if evaluated and val_ema["top1"] > val["top1"]:
                    score, best_of = val_ema["top1"], "ema"
                row["best_of"] = best_of if evaluated else None
            final = val["top1"] if evaluated else final  # the model's; the EMA's is in the row
            history.append(row)
            ranks = dist.gather_to_main({"rng": rng_state(policy)}, d)  # each rank's own stream, for --resume
            if d.is_main:
                is_best = evaluated and score > best  # with --ema: the better of the model and its EMA
                best = max(best, score) if evaluated else best
                logs.epoch(row)  # metrics.jsonl first (a resume trims rows past latest.pt), then the others
                saver.epoch_end(epoch, best, ranks, is_best, best_of if evaluated else None)
                logs.announce(row, best)  # the console line once the epoch is on disk
            elif evaluated:
                best = max(best, score)
            dist.barrier(d)
            if epoch < cfg.epochs and (preempt.signal or preempt.stop(0, last=True)):  # a signal during eval
                preempted = {"signal": preempt.signal, "epoch": epoch + 1, "step": 0}
                break
    except BaseException:
        logs.close(exit_code=1)
        raise
    logs.close()
    dist.cleanup(d)
    return {"best_top1": best, "final_top1": final, "run_dir": str(run_dir), "epochs": history,
            "config": to_dict(cfg), "rank": d.rank, "preempted": preempted}


@dataclass(frozen=True)
class Saver:
    """What a checkpoint of this run is made of (fixed for the whole run) and where it goes."""
    cfg: TrainConfig
    d: dist.Dist
    run_dir: Path
    raw_model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    policy: object
    data: dict
    ema: object

    def every(self, epoch, best, t0, steps, done, sums, seen):
        """train_one_epoch's `on_step` under --save-every-steps; the last step's save is the epoch end's."""
        if done % self.cfg.save_every_steps == 0 and done < steps:
            self.mid_epoch(epoch, best, t0, done, sums, seen)

    def mid_epoch(self, epoch, best, t0, done, sums, seen):
        """latest.pt after `done` steps of `epoch` (started at perf_counter `t0`): each rank's state so far."""
        mine = {"rng": rng_state(self.policy), "policy": _to_cpu(self.policy.state_dict()), "step": done,
                "sums": sums.cpu(), "seen": seen, "seconds": time.perf_counter() - t0}
        ranks = dist.gather_to_main(mine, self.d)  # each rank's own history and streams
        if self.d.is_main:
            checkpoint.save(self.run_dir / "latest.pt", self._payload(epoch - 1, best, ranks, step=done))

    def epoch_end(self, epoch, best, ranks, is_best, best_of):
        """latest.pt (and best.pt when `is_best`) after `epoch`; main rank only."""
        payload = self._payload(epoch, best, ranks, best_of=best_of)
        checkpoint.save(self.run_dir / "latest.pt", payload)
        if is_best:
            checkpoint.save(self.run_dir / "best.pt", payload)

    def _payload(self, epoch, best, ranks, step=0, best_of=None):
        return _payload(self.raw_model, self.optimizer, self.scaler, self.cfg, epoch, best, ranks, self.data,
                        step=step, ema=self.ema, best_of=best_of)


def _payload(raw_model, optimizer, scaler, cfg, epoch, best, ranks, data, step=0, ema=None, best_of=None):
    """A training checkpoint: `epoch` complete epochs and `step` steps of the next; per-rank state.

    With --ema: "ema" ({"model": its state dict, "updates", ...}, rank 0's) and, at an epoch end,
    "best_of": which of the two scored `best_top1`'s candidate this epoch ("model" or "ema").
    """
    payload = {"model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
               "scaler": scaler.state_dict(), "epoch": epoch, "step": step, "best_top1": best,
               "config": to_dict(cfg), "rng": ranks[0]["rng"], "rng_ranks": [r["rng"] for r in ranks],
               "data": data}
    if ema is not None:
        payload["ema"] = ema.state_dict()
        payload["best_of"] = best_of
    if step:  # mid-epoch: what each rank needs to continue at `step` exactly
        payload["partial_ranks"] = [{k: v for k, v in r.items() if k != "rng"} for r in ranks]
    return payload


def _to_cpu(state):
    return {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in state.items()}


def preflight(cfg, root, dataset, d):
    """Refuse to start on unreadable images (rank 0 decodes, cached; every rank learns the verdict)."""
    from rmix.pipelines.preflight import check, summary
    result = None
    if d.is_main:
        decoder = "dali" if cfg.data.loader == "dali" else "pil"
        splits = [(str(root), "train"), (str(root), "val")] if sharded(root, dataset) else [root / "train", root / "val"]
        result = check(splits, decoder, max(cfg.data.workers, 1))
    result = dist.broadcast_object(result, d)
    if result["bad"]:
        raise ValueError(f"--data-dir: {summary(result)}; see `rmix data check {root}`")


def _resume(cfg, ckpt, path, data, model, optimizer, scaler, policy, device, d=dist.Dist()):
    """Load model/optimizer/RNG state from `ckpt`; returns (first epoch to run, best top-1 so far, partial).

    partial: None after an epoch-end checkpoint; after a mid-epoch one (--save-every-steps)
    this rank's {"step", "sums", "seen", "seconds"} (its RecursiveMix history is restored here).
    """
    saved = ckpt["config"]
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
    if was.get("train_samples") not in (None, data["train_samples"]) and d.is_main:
        Progress.line(f"--data-dir: {cfg.data.data_dir} now holds {data['train_samples']} training images, "
                      f"{path} was trained on {was['train_samples']}: the run goes on over the new set, "
                      "not as it would have without the change")
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    match_param_layout(optimizer)  # saved by a run on another device or memory format
    for g in optimizer.param_groups:  # checkpoints before the fused optimizer saved fused=None
        g["fused"], g["foreach"] = True, None
    init_momentum(optimizer)
    if ckpt["scaler"] and scaler.is_enabled():  # {} from a run without fp16 (a CPU, bf16): a fresh scale
        scaler.load_state_dict(ckpt["scaler"])
    states = ckpt.get("rng_ranks", [ckpt["rng"]])
    if len(states) == d.world_size:  # else another world size: keep this run's per-rank seeds
        rng = states[d.rank]
        random.setstate(rng["python"])
        torch.set_rng_state(rng["torch"])
        kind, keys, *rest = rng["numpy"]
        np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))
        policy.generator.set_state(rng["policy"])
        if rng.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    partial = None
    if ckpt.get("step", 0):
        parts = ckpt["partial_ranks"]
        if len(parts) != d.world_size:  # another split of the data: no exact continuation exists
            raise ValueError(f"--resume: {path} was saved at step {ckpt['step']} of epoch {ckpt['epoch'] + 1} "
                             f"by {len(parts)} processes, this run has {d.world_size}; resume with as many")
        partial = _at_the_same_image(parts[d.rank], saved["batch_size"] // len(parts), cfg.batch_size // d.world_size,
                                     path, ckpt)
        policy.load_state_dict(partial["policy"], device)
        history = partial["policy"].get("history")
        if history is not None and history.shape[0] < cfg.batch_size // d.world_size:
            policy.reset()  # a bigger batch than the history holds: the next step starts one, as an epoch does
            if d.is_main:
                Progress.line(f"--batch-size {cfg.batch_size}: the saved history holds {history.shape[0]} images a "
                              "process; the next step pastes nothing, as an epoch's first does")
    return ckpt["epoch"] + 1, ckpt["best_top1"], partial


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


# Image-file settings that arrays (CIFAR, MNIST) do not use: their images are the set's own size,
# padded and cropped to it (train) or taken whole (val), decoded by no one.
IMAGE_FILE_SETTINGS = {"crop_size": "--crop-size", "val_resize": "--val-resize", "min_area": "--min-area",
                       "aug_plus": "--aug-plus", "torch_decode": "--torch-decode"}


def _array_settings(cfg, root, dataset):
    """ValueError naming a setting the run records but an array dataset would not apply."""
    default = C.DataConfig()
    unused = [flag for name, flag in IMAGE_FILE_SETTINGS.items() if getattr(cfg.data, name) != getattr(default, name)]
    if unused:
        raise ValueError(f"{', '.join(unused)}: {dataset} ({root}) is read as arrays of its own image size, which "
                         f"{'these do' if len(unused) > 1 else 'this does'} not change; drop "
                         f"{'them' if len(unused) > 1 else 'it'}")


def _say_what_the_resume_lacks(run_dir, path, ckpt):
    """Rows of the epochs latest.pt covers that metrics.jsonl lacks, and a best.pt left elsewhere: said once."""
    have = {json.loads(line)["epoch"] for line in metrics_rows(run_dir / "metrics.jsonl")}
    missing = [e for e in range(1, ckpt["epoch"] + 1) if e not in have]
    elsewhere = Path(path).resolve().parent != run_dir.resolve()
    if missing and elsewhere:
        best = f" (best val top-1 {ckpt['best_top1']:.2f}%)" if ckpt.get("best_top1", -1) >= 0 else ""
        Progress.line(f"--resume {path}: epochs 1-{ckpt['epoch']} were trained into {Path(path).parent}; their "
                      f"metrics rows and best.pt stay there{best}, and this run writes its own best.pt when an "
                      "epoch beats that")
    elif missing:
        shown = ",".join(map(str, missing[:8])) + (",..." if len(missing) > 8 else "")
        Progress.line(f"{run_dir / 'metrics.jsonl'}: no rows for epochs {shown}, which latest.pt covers; they stay "
                      "missing (the run goes on from latest.pt)")


def _fresh_start(cfg, run_dir, given, allow_changes):
    """`--resume auto` where no latest.pt is: the run starts at epoch 1 if nothing of a run would be lost.

    A directory with results (metrics rows, best.pt, a checkpoint) but no latest.pt is refused: a
    fresh start would trim its metrics and overwrite its best.pt. One with only the config.json of
    a run that died before its first checkpoint (and at most epoch 1's row, written just before it)
    starts that run again, with that config: options given now must agree with it (or be allowed),
    as on any resume.
    """
    there = [name for name in rundir.RUN_FILES if (run_dir / name).exists()]
    there += sorted(p.name for p in run_dir.glob("*.pt") if p.name not in there)
    rows = metrics_rows(run_dir / "metrics.jsonl")
    # epoch 1's row is written just before its latest.pt: a kill between the two leaves that row alone,
    # which a resume from latest.pt would trim too. A second row, or any .pt, means a checkpoint was there.
    first_save_lost = there == ["config.json", "metrics.jsonl"] and len(rows) <= 1
    if any(name != "config.json" for name in there) and not first_save_lost:
        best = run_dir / "best.pt"
        hint = f"`--resume {best}` continues from best.pt's epoch, " if best.is_file() else ""
        raise ValueError(f"--resume auto: {run_dir} holds a run ({', '.join(there)}) but no latest.pt to continue "
                         f"from; {hint}a new --out starts afresh")
    if there:  # config.json (and epoch 1's row, to be trimmed): the same run, from its start
        saved = C.from_dict(json.loads((run_dir / "config.json").read_text()))
        cfg, _ = resume.merge(cfg, saved, run_dir / "config.json", given=given, allow=allow_changes)
    return cfg


def _complete(cfg, ckpt, run_dir, show, d, out=None):
    """`--resume` of a run that has trained all its epochs: nothing to do, said so.

    `run_dir` is the checkpoint's own: a complete run resumed into another --out (`out`) leaves that empty."""
    rows = [json.loads(line) for line in metrics_rows(run_dir / "metrics.jsonl")]
    final = next((r["val_top1"] for r in reversed(rows) if r.get("val_top1") is not None), None)
    if show:
        elsewhere = f", and nothing is written to --out {out}" if out is not None and Path(out) != run_dir else ""
        Progress.line(f"{run_dir} is complete: {ckpt['epoch']} of {cfg.epochs} epochs trained; nothing to do{elsewhere} "
                      "(--allow-changes epochs --epochs N trains on)")
    dist.cleanup(d)
    return {"best_top1": ckpt["best_top1"], "final_top1": final, "run_dir": str(run_dir), "epochs": rows,
            "config": to_dict(cfg), "rank": d.rank, "complete": True}


def evaluate_checkpoint(path, *, data_dir=None, dataset=None, model=None, loader=None, batch_size=None,
                        device="auto", ema=False):
    """Evaluate a checkpoint (rmix's, or the paper's layout with `model`) on the val split.

    `ema`: its EMA weights (`--ema` runs; timm's `state_dict_ema`) instead of the model's."""
    from rmix.models import load_state_dict_flexible, model_family
    ckpt = checkpoint.read(path)
    if ckpt["foreign"]:
        if model is None:
            raise ValueError(f"--model: {path} has no rmix config, so name its model (see `rmix models`)")
        cfg = TrainConfig(model=model)
        if model_family(model) == "imagenet":  # the paper's ImageNet eval: resize 256, centre crop 224
            cfg = replace(cfg, **{"data.crop_size": 224, "data.val_resize": 256})
        # the paper's checkpoints have fc_roi unless trained with a shared fc
        shared = not any(k.split(".")[-2:-1] == ["fc_roi"] for k in checkpoint.model_state(ckpt))
        cfg = replace(cfg, **{"mix.share_fc": shared})
    else:
        cfg = C.from_dict(ckpt["config"])
    if dataset not in (None, "auto", cfg.data.dataset) and data_dir is None:
        data_dir = ""  # another kind of data than the checkpoint's own folder: its default place, or --data-dir asked
    changes = {k: v for k, v in (("model", model), ("batch_size", batch_size), ("device", device),
                                 ("data.data_dir", data_dir), ("data.loader", loader),
                                 ("data.dataset", dataset)) if v is not None}
    cfg = replace(cfg, **changes)
    dev = resolve_device(cfg.device)
    root, dataset = resolve_data(cfg.data.data_dir, cfg.data.dataset)
    cfg = C.with_dataset_stats(cfg, dataset)  # the paper's checkpoints: the dataset's own normalization
    val_loader = make_loader(cfg, root, dataset, dev, train=False)
    num_classes = val_loader.num_classes
    if not ckpt["foreign"] and cfg.num_classes and cfg.num_classes != num_classes:
        raise ValueError(f"--data-dir: {root} has {num_classes} classes, the checkpoint was trained on {cfg.num_classes}")
    if not ckpt["foreign"]:
        check_classes((ckpt.get("data") or {}).get("classes"), val_loader.classes, f"--checkpoint: {path}",
                      "the checkpoint", f"{root}'s val split")
    net = build(cfg.model, num_classes, share_fc=cfg.mix.share_fc, image_size=cfg.data.crop_size).to(dev)
    state = checkpoint.ema_state(ckpt, path) if ema else checkpoint.model_state(ckpt)
    try:
        load_state_dict_flexible(net, state)
    except ValueError as e:
        raise checkpoint.CheckpointError(f"{path}: {e}") from None
    normalize = NoMix(num_classes, mean=cfg.data.mean, std=cfg.data.std)
    r = evaluate(net, val_loader, normalize, amp_dtype(cfg, dev))
    return {**r, "model": cfg.model, "checkpoint": str(path), "data_dir": str(root), "ema": bool(ema)}
