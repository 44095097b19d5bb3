"""The training core: `train` builds everything from a TrainConfig and runs the epochs in the run directory."""
import contextlib
import json
import math
import os
import time
from pathlib import Path

import torch

from rmix import checkpoint, dist, init_from, pretrained, resume, rundir
from rmix import config as C
from rmix.config import TrainConfig, replace, to_dict, validate
from rmix.data import ARRAY_SETS, DATASET_KINDS, check_classes, make_loader, make_loaders, resolve_data, sharded
from rmix.ema import ModelEma
from rmix.guard import StepGuard, TrainingError, nonfinite, step_skipping
from rmix.logs import RunLogs, check_backends, metrics_rows
from rmix.losses import mix_loss, soft_cross_entropy, topk_correct
from rmix.mixing import Normalize, build_policy, roi_boxes, smooth
from rmix.models import build, check_input_size
from rmix.optim import build_optimizer, set_lr
from rmix.pipelines import DecodeError, seeds
from rmix.preempt import Preemption
from rmix.progress import Progress
from rmix.state import Checkpoints, RunState


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


def compile_mode_for(mode: str, world, accum: int = 1) -> tuple[str, str | None]:
    """(the mode to compile with, a line saying why it changed or None): no CUDA graphs under torchrun or
    with micro-batches."""
    if mode not in DDP_COMPILE or not (world.enabled or accum > 1):
        return mode, None
    to = DDP_COMPILE[mode]
    if accum > 1:  # each replay's gradient outputs become param.grad and the next replay overwrites them
        return to, (f"--compile {mode}: its CUDA graphs keep only the last micro-batch's gradients of an "
                    f"--accum-steps {accum} step (pytorch#169545, #96693); compiling with {to!r} instead")
    return to, (f"--compile {mode}: its CUDA graphs under torchrun hit open torch problems (pytorch#139207, "
                f"#113809); compiling with {to!r} instead")


def default_run_dir(cfg) -> Path:
    return Path("runs") / f"{cfg.model}-{cfg.mix.policy}-{time.strftime('%Y%m%d-%H%M%S')}"


def wrap_ddp(model, device, world, sync_bn=False):
    """`model` in DistributedDataParallel under torchrun (several processes); unchanged on one.

    The module inside is `model` itself: SyncBatchNorm's conversion swaps its BatchNorm children in
    place and keeps their parameters and buffers, so what holds `model` (the EMA, the checkpoints) holds
    what trains."""
    if not world.enabled:
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


def build_model(cfg, device):
    """The model as `train` trains it, on `device`: the RoI head frozen without RecursiveMix (unused, so
    DDP sees no unused gradients), channels_last on CUDA when asked."""
    model = build(cfg.model, cfg.num_classes, share_fc=cfg.mix.share_fc, image_size=cfg.data.crop_size).to(device)
    if cfg.mix.policy != "recursive_mix" and hasattr(model, "fc_roi"):
        model.fc_roi.requires_grad_(False)
    if cfg.channels_last and device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model


def make_policy(cfg, device, amp, rank=0, name=None):
    """The training policy as `train` uses it: cfg.mix's settings, images out in the autocast dtype and
    layout; one history and box RNG per rank.

    `name`: another policy than cfg.mix.policy (benchmarks compare them on one config).
    """
    gen = torch.Generator().manual_seed(seeds.derive(cfg.seed, "boxes", rank=0 if cfg.mix.shared_boxes else rank))
    name = name or cfg.mix.policy
    return build_policy(name, cfg.num_classes, **mix_settings(cfg, name), generator=gen, mean=cfg.data.mean,
                        std=cfg.data.std, **_layout(cfg, device, amp))


def make_normalize(cfg, device, amp):
    """Evaluation's input transform: the data's mean and std, out in the dtype and layout the policy gives."""
    return Normalize(cfg.data.mean, cfg.data.std, **_layout(cfg, device, amp))


def _layout(cfg, device, amp):
    return dict(out_dtype=amp or torch.float32, channels_last=cfg.channels_last and device.type == "cuda")


def mix_settings(cfg, name):
    """build_policy's settings for policy `name` from cfg.mix: RecursiveMix's own (omega, interpolate,
    per_sample) only for it, as build_policy refuses them elsewhere (a preset's omega with --aug cutmix stays unused)."""
    own = dict(omega=cfg.mix.omega, interpolate=cfg.mix.interpolate, per_sample=cfg.mix.per_sample) \
        if name == "recursive_mix" else {}
    return dict(alpha=cfg.mix.alpha, smoothing=cfg.mix.smoothing, smoothing_form=cfg.mix.smoothing_form, **own)


def train_step(model, policy, images, targets, optimizer, scaler, amp, omega, *, rm, accum=1):
    """One optimizer step on a batch: for each of its `accum` micro-batches mix, forward under autocast,
    loss, backward, remember; then the step.

    The micro-batches are the batch cut in `accum` equal parts (an epoch's last partial batch: parts
    differing by one image at most). Each one's loss is scaled by its share of the batch (1/accum
    when equal), so the summed gradient is the whole batch's mean; under DDP only the last backward
    all-reduces (`no_sync` before it). RecursiveMix's history is the previous micro-batch: the
    paper's per-iteration history, an iteration being one forward.
    Returns (loss, logits, soft_targets, bad) over the whole batch: the loss (the last micro-batch's
    graph; the value is the batch's mean), the logits and mixed targets of every image, and a
    one-element device tensor, nonzero when the update was skipped (a non-finite loss or gradient;
    with fp16, GradScaler's overflow). No value is read back to the host: the skip happens in the
    fused optimizer's kernel, and rmix.guard.StepGuard reports it later.
    `rm`: the policy is RecursiveMix (the model also returns roi_logits).
    """
    n = images.shape[0]
    if n == 0:
        raise ValueError("train_step: an empty batch (each rank's share of an epoch is whole batches)")
    parts = [(x, y) for x, y in zip(images.tensor_split(accum), targets.tensor_split(accum)) if len(y)]
    losses, all_logits, all_targets = [], [], []
    for i, (x, y) in enumerate(parts):
        last = i == len(parts) - 1
        with contextlib.nullcontext() if last else _no_sync(model):  # DDP: all-reduce once, at the last backward
            torch.compiler.cudagraph_mark_step_begin()  # --compile reduce-overhead: a new forward, new graph outputs
            out = policy(x, y)
            h, w = out.images.shape[-2:]
            with torch.autocast(out.images.device.type, dtype=amp, enabled=amp is not None):
                if rm:
                    logits, roi_logits = model(out.images, roi_boxes(out, h, w))
                else:
                    logits, roi_logits = model(out.images), None
                loss = mix_loss(logits, roi_logits, out.soft_targets, getattr(policy, "prev_logits", None),
                                out.lam, omega, check_values=False)
            if len(parts) > 1:
                loss = loss * (len(y) / n)  # its share of the batch's mean
            scaler.scale(loss).backward()  # under DDP, after the last: the same gradients on every rank
        policy.remember(out.images, out.soft_targets, logits)  # the next micro-batch's history
        losses.append(loss)
        # copied where there are more: the next forward's CUDA-graph replay (--compile reduce-overhead) reuses its outputs
        all_logits.append(logits.detach().clone() if len(parts) > 1 else logits)
        all_targets.append(out.soft_targets)
    if len(parts) > 1:
        loss = losses[-1] + sum(part.detach() for part in losses[:-1])
        logits, soft_targets = torch.cat(all_logits), torch.cat(all_targets)
    else:
        soft_targets = out.soft_targets
    if scaler.is_enabled():  # fp16: GradScaler finds overflows and skips on the device (fused optimizer)
        scale = scaler._get_scale_async().clone()
        scaler.step(optimizer)
        scaler.update()
        bad = (scaler._get_scale_async() < scale).float()  # the scaler backs off exactly when it skips
    else:  # every rank sees the same all-reduced gradients, so every rank skips the same steps
        bad = nonfinite(loss, optimizer)
        step_skipping(optimizer, bad)
    optimizer.zero_grad(set_to_none=True)
    return loss, logits, soft_targets, bad


def _no_sync(model):
    """DDP's no_sync (through torch.compile's wrapper too); nothing to hold back without DDP."""
    no_sync = getattr(model, "no_sync", None)
    return no_sync() if no_sync is not None else contextlib.nullcontext()


def train_one_epoch(model, policy, loader, optimizer, scaler, cfg, state, amp, progress, *, guard=None, stop=None,
                    ema=None, checkpoints=None, accum=1):
    """One pass over `loader` in epoch `state.epoch` (rmix.state.RunState), from step `state.step` on;
    advances `state` (steps, sums, images) and returns this rank's summed (loss, correct, images) as a tensor.

    `state.step` > 0 continues a pass that a mid-epoch checkpoint cut: the loader was set to
    start there (`loader.set_epoch(e, step)`), the policy keeps the history it was given, and
    `state` carries the statistics so far.
    `checkpoints` (rmix.state.Checkpoints) saves the state every `cfg.save_every_steps` steps (the
    last step's save is the epoch end's); `stop(steps_done, last)` after that ends the pass early
    when true (preemption, rmix.preempt).
    `guard` (rmix.guard.StepGuard, carried across epochs by train()) holds the bad steps on the
    device; it is read at the sync points below and raises TrainingError there. `ema`
    (rmix.ema.ModelEma) is updated after each optimizer step. `accum`: micro-batches per step
    (`train_step`); a step is one loader batch, so steps, checkpoints and `--max-steps` count optimizer steps.

    Sync points (where the host waits for the device), and nowhere else in the loop:
    - the progress line, every `cfg.log_every` steps and at the last: the loss, and the guard;
    - a mid-epoch checkpoint (`--save-every-steps`): the guard first, then the state it saves;
    - under torchrun, the preemption flag's all-reduce every `cfg.log_every` steps (rmix.preempt);
    - the end of the pass: the guard, and the summed statistics.
    """
    model.train()
    if state.step == 0:
        policy.reset()  # the paper's code clears the history at each epoch start
    rm = cfg.mix.policy == "recursive_mix"
    fp16 = scaler.is_enabled()
    guard = StepGuard(cfg.max_skipped_steps) if guard is None else guard
    batches = iter(loader)
    end = min(len(loader), cfg.max_steps or len(loader))  # --max-steps ends every epoch early
    for step in range(state.step, end):
        try:
            images, targets = next(batches)
        except StopIteration:
            break
        except DecodeError as e:  # DALI cannot skip a bad sample: stop, naming the batch's files
            which = ", ".join(e.bad_files) if e.bad_files else f"one of {len(e.files)} files"
            raise TrainingError(f"cannot decode {which} at epoch {state.epoch}, step {step + 1} ({e.reason}); "
                                f"the batch's files: {', '.join(e.files)}; run `rmix data check`") from None
        loss, logits, soft_targets, bad = train_step(model, policy, images, targets, optimizer, scaler, amp,
                                                     cfg.mix.omega, rm=rm, accum=accum)
        guard.update(step, bad, loss, fp16)
        if ema is not None:
            ema.update()  # device ops only (rmix.ema)
        n = images.shape[0]
        correct = (logits.argmax(-1) == soft_targets.argmax(-1)).sum()
        stats = torch.stack([loss.detach().double() * n, correct.double()])
        # summed on the device: no CPU-GPU sync per step for the statistics
        state.sums = stats if state.sums is None else state.sums.to(stats.device) + stats
        state.seen += n
        state.step = done = step + 1
        saves = bool(cfg.save_every_steps) and done % cfg.save_every_steps == 0
        if done % cfg.log_every == 0 or saves:  # (the last step: after the loop)
            guard.check(state.epoch)  # note: a CPU-GPU sync point
        progress.update(n, loss=loss.detach(), lr=optimizer.param_groups[0]["lr"])
        if saves and done < end and checkpoints is not None:
            checkpoints.save_mid_epoch(state)
        if stop is not None and stop(done, last=done == end):
            break
    guard.check(state.epoch)  # note: a CPU-GPU sync point; also before a preemption's checkpoint
    sums = state.sums.cpu() if state.sums is not None else torch.zeros(2, dtype=torch.float64)
    return torch.cat([sums, torch.tensor([state.seen], dtype=torch.float64)])


@torch.no_grad()
def evaluate(model, loader, normalize, amp, world=dist.Dist()):
    """Top-1 / top-5 in percent and mean loss over every image of `loader`, summed over ranks.

    `normalize` (rmix.mixing.Normalize): the loader's images as the model takes them."""
    model.eval()
    sums = None  # summed where the logits are: the pass reads nothing back until its end
    for images, targets in loader:
        if len(targets) == 0:  # a rank's share of the val set can end one batch early
            continue
        x = normalize(images)
        with torch.autocast(x.device.type, dtype=amp, enabled=amp is not None):
            logits = model(x)
        c1, c5 = topk_correct(logits, targets)
        # the plain cross-entropy: one-hot targets, never smoothed
        loss = soft_cross_entropy(logits, smooth(targets, logits.shape[-1], 0.0)) * len(targets)
        batch = torch.stack([c1.double(), c5.double(), loss.double(), loss.new_full((), len(targets)).double()])
        sums = batch if sums is None else sums + batch
    sums = torch.zeros(4, dtype=torch.float64) if sums is None else sums
    sums = dist.all_sum(sums.to(_reduce_device(world)), world).cpu()  # note: the pass's one CPU-GPU sync
    n = max(sums[3].item(), 1)
    top5 = 100 * sums[1].item() / n if getattr(loader, "num_classes", 6) > 5 else None  # with <= 5 classes: always 100
    return {"top1": 100 * sums[0].item() / n, "top5": top5,
            "loss": _finite(sums[2].item() / n), "images": int(sums[3].item())}


def _finite(x):
    """None for inf/NaN, so metrics and --json stay valid JSON."""
    return x if math.isfinite(x) else None


def _reduce_device(world):
    return torch.device("cuda") if world.enabled and torch.distributed.get_backend() == "nccl" else torch.device("cpu")


def train(cfg: TrainConfig, *, given=None, allow_changes=()) -> dict:
    """Train as `cfg` says; returns {"best_top1", "final_top1", "run_dir", ...}.

    On resume the run continues with its saved config: `given` names the fields the user set this
    time (None: all of cfg), `allow_changes` the fields that may then differ (see rmix.resume).
    What the run opens is closed however it ends (`cleanup`, last opened first closed): the logs
    (a run that raised is marked failed), the loaders' workers, the process group (left when the
    run ends well), rank 0's hold on the run directory, the preemption signal handlers.
    """
    validate(cfg)
    check_backends(cfg.log)  # every rank, before anything starts: a --log backend that is not installed
    check_input_size(cfg.model, 2, cfg.data.crop_size, share_fc=cfg.mix.share_fc)  # before --out is created
    device = resolve_device(cfg.device)
    world = dist.setup(device.type, cfg.dist_timeout)
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    set_determinism(cfg.deterministic, device)
    show = world.is_main  # the console lines and progress bars
    with contextlib.ExitStack() as cleanup:
        preempt = cleanup.enter_context(Preemption(world, _reduce_device(world), every=cfg.log_every))  # save, exit 0
        seeds.seed_process(cfg.seed, world.rank)  # every stream of the run: pipelines/seeds.py's table

        # the run directory, this run's before anything is written; one this call created and trained nothing in goes
        run_dir = Path(cfg.out or dist.broadcast_object(str(default_run_dir(cfg)), world))  # rank 0's clock
        claim, trained = _claim_run_dir(run_dir, cfg, world), False
        if claim is not None:
            cleanup.callback(lambda: claim.release(failed=not trained))
        cleanup.enter_context(_process_group(world))

        # start or resume: the checkpoint to go on from, and the run's config (the saved one, on resume)
        cfg, ckpt, path, changes = resume.resolve(cfg, run_dir, given=given, allow=allow_changes)
        accum = C.accumulation(cfg, world.world_size)  # micro-batches per optimizer step: the run's own setting
        if ckpt is not None and ckpt["epoch"] >= cfg.epochs and not ckpt.get("step"):
            return _complete(cfg, ckpt, Path(path).parent, run_dir, world)
        # a new run's --init-from or --pretrained: read now, so a file that holds no weights stops it before anything runs;
        # config.json records the file's digest. A resumed run's weights are its checkpoint's.
        source = None if ckpt is not None else init_from.read(cfg.init_from) if cfg.init_from else \
            pretrained.read(cfg.model, cfg.pretrained_file, cfg.data.crop_size) if cfg.pretrained else None
        if ckpt is None:
            cfg = replace(cfg, init_from_sha256=source.sha256 if source else "")

        # the data
        root, dataset = resolve_data(cfg.data.data_dir, cfg.data.dataset)
        _check_data(cfg, root, dataset, ckpt, path, changes, world)
        train_loader, val_loader = make_loaders(cfg, root, dataset, device, world.rank, world.world_size)
        cleanup.callback(_close_loaders, train_loader, val_loader)  # their workers stop now, not at exit
        if train_loader.num_classes < 2:
            raise ValueError(f"--data-dir: {root} has {train_loader.num_classes} class; classification needs at "
                             "least 2 (top-1 would be 100% whatever the model learns)")
        detected = cfg.data.dataset == "auto" and cfg.data.data_dir  # said below, once everything is checked
        cfg = replace(C.with_dataset_stats(cfg, dataset), num_classes=train_loader.num_classes, out=str(run_dir),
                      **{"data.data_dir": str(root), "data.dataset": dataset})
        data = {"train_samples": train_loader.num_samples, "classes": train_loader.classes}  # the same data?

        # model, optimizer, loss scale, policies, EMA; the state a checkpoint restores; then DDP and compile
        raw_model = build_model(cfg, device)  # saved, exported and evaluated: plain keys, eager
        loaded = init_from.load(raw_model, source, cfg.model, data["classes"]) if source else None  # before the EMA
        optimizer = build_optimizer(raw_model, cfg.optim)
        amp = amp_dtype(cfg, device)
        scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
        policy, normalize = make_policy(cfg, device, amp, world.rank), make_normalize(cfg, device, amp)
        ema = ModelEma(raw_model, cfg.ema, cfg.ema_warmup) if cfg.ema else None
        checkpoints = Checkpoints(cfg, world, run_dir, raw_model, optimizer, scaler, policy, ema, data, device)
        state = checkpoints.restore(ckpt, path) if ckpt is not None else RunState()
        mode, why = compile_mode_for(cfg.compile, world, accum)
        model = compile_model(wrap_ddp(raw_model, device, world, sync_bn=cfg.sync_bn), mode)

        # the run's files: config.json (a resume keeps the original), changes.jsonl, the logs; the main rank's
        if world.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            if ckpt is None or not (run_dir / "config.json").is_file():
                (run_dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=2) + "\n")
            resume.record(run_dir, state.epoch, state.step, changes)
        # metrics.jsonl (trimmed to latest.pt's epochs on resume), TensorBoard, --log's
        logs = cleanup.enter_context(RunLogs(run_dir, to_dict(cfg), state.epoch, backends=cfg.log, show=show,
                                             enabled=world.is_main))
        if show:  # everything checked: say what was read and where the run goes, before its first step
            _say_start(cfg, run_dir, device, why, detected, ckpt, path, state, loaded, world.world_size, accum)

        # the epochs
        guard = StepGuard(cfg.max_skipped_steps)  # bad steps, on the device, across epoch boundaries
        history, final, preempted = [], None, None
        while state.epoch <= cfg.epochs:
            epoch = state.epoch
            lr = set_lr(optimizer, cfg, epoch)
            train_loader.set_epoch(epoch - 1, state.step)  # epochs count from 0 there; replays exactly on resume
            state.start_clock()
            steps = min(len(train_loader), cfg.max_steps or len(train_loader))  # --max-steps ends every epoch early
            with Progress(max(steps - state.step, 0), f"epoch {epoch}/{cfg.epochs}", enabled=show,
                          every=cfg.log_every, on_log=logs.step_logger(epoch, steps, state.step)) as bar:
                sums = train_one_epoch(model, policy, train_loader, optimizer, scaler, cfg, state, amp, bar,
                                       guard=guard, stop=preempt.stop, ema=ema, checkpoints=checkpoints, accum=accum)
            if preempt.signal and preempt.at < steps:  # stopped inside the epoch: save at that step
                checkpoints.save_mid_epoch(state)
                preempted = {"signal": preempt.signal, "epoch": epoch, "step": preempt.at}
                break
            sums = dist.all_sum(sums.to(_reduce_device(world)), world).cpu()
            seconds = state.elapsed()
            evaluated = epoch % cfg.eval_every == 0 or epoch == cfg.epochs
            val = _val_scores(raw_model, val_loader, normalize, amp, world, evaluated)
            val_ema = None if ema is None else _val_scores(ema.module, val_loader, normalize, amp, world, evaluated)
            row, score, best_of = _epoch_row(epoch, lr, sums, seconds, val, val_ema, evaluated)
            final = val["top1"] if evaluated else final  # the model's; the EMA's is in the row
            history.append(row)
            is_best = evaluated and score > state.best_top1  # with --ema: the better of the model and its EMA
            state.best_top1 = max(state.best_top1, score) if evaluated else state.best_top1
            logs.epoch(row)  # metrics.jsonl first (a resume trims rows past latest.pt), then the others
            checkpoints.save_epoch_end(state, is_best, best_of)
            logs.announce(row, state.best_top1)  # the console line once the epoch is on disk
            dist.barrier(world)
            state.next_epoch()
            if state.epoch <= cfg.epochs and (preempt.signal or preempt.stop(0, last=True)):  # a signal during eval
                preempted = {"signal": preempt.signal, "epoch": state.epoch, "step": 0}
                break
        trained = True
        return {"best_top1": state.best_top1, "final_top1": final, "run_dir": str(run_dir), "epochs": history,
                "config": to_dict(cfg), "rank": world.rank, "preempted": preempted}


def _claim_run_dir(run_dir, cfg, world):
    """Rank 0's hold on `run_dir` (rmix.rundir.claim: checked, created, locked), None on the other ranks;
    a refusal is every rank's ValueError."""
    lock, refusal = None, None
    if world.is_main:
        try:
            lock = rundir.claim(run_dir, resume=bool(cfg.resume), resume_from=cfg.resume or "")
        except ValueError as e:
            refusal = str(e)
    refusal = dist.broadcast_object(refusal, world)
    if refusal:
        dist.cleanup(world)
        raise ValueError(refusal)
    return lock


@contextlib.contextmanager
def _process_group(world):
    """torch.distributed's process group, left when the run ends well; a rank that raises just exits
    (torchrun's agent then ends the others)."""
    yield
    dist.cleanup(world)


def _close_loaders(*loaders):
    for loader in loaders:
        getattr(loader, "close", lambda: None)()


def _complete(cfg, ckpt, run_dir, out, world):
    """`--resume` of a run that has trained all its epochs: nothing to do, said so.

    `run_dir` is the checkpoint's own: a complete run resumed into another --out (`out`) leaves that empty."""
    rows = [json.loads(line) for line in metrics_rows(run_dir / "metrics.jsonl")]
    final = next((r["val_top1"] for r in reversed(rows) if r.get("val_top1") is not None), None)
    if world.is_main:
        elsewhere = f", and nothing is written to --out {out}" if Path(out) != run_dir else ""
        Progress.line(f"{run_dir} is complete: {ckpt['epoch']} of {cfg.epochs} epochs trained; nothing to do{elsewhere} "
                      "(--allow-changes epochs --epochs N trains on)")
    return {"best_top1": ckpt["best_top1"], "final_top1": final, "run_dir": str(run_dir), "epochs": rows,
            "config": to_dict(cfg), "rank": world.rank, "complete": True}


def _check_data(cfg, root, dataset, ckpt, path, changes, world):
    """Refuse, before a loader starts: another loader inside an epoch of shards, image-file settings that
    array data would not apply, unreadable images (--preflight)."""
    if ckpt is not None and ckpt.get("step") and "data.loader" in changes and sharded(root, dataset):
        was, now = changes["data.loader"]
        raise ValueError(f"--loader {now}: {path} stopped inside epoch {ckpt['epoch'] + 1} of shards read by {was}, "
                         f"whose order {now} does not share; resume that epoch with --loader {was}, or change "
                         "the loader at an epoch's end")
    if dataset in ARRAY_SETS:
        _array_settings(cfg, root, dataset)
    if cfg.data.preflight and dataset not in ARRAY_SETS:
        preflight(cfg, root, dataset, world)


def preflight(cfg, root, dataset, world):
    """Refuse to start on unreadable images (rank 0 decodes, cached; every rank learns the verdict)."""
    from rmix.pipelines.preflight import check, summary
    result = None
    if world.is_main:
        decoder = "dali" if cfg.data.loader == "dali" else "pil"
        splits = [(str(root), "train"), (str(root), "val")] if sharded(root, dataset) else [root / "train", root / "val"]
        result = check(splits, decoder, max(cfg.data.workers, 1))
    result = dist.broadcast_object(result, world)
    if result["bad"]:
        raise ValueError(f"--data-dir: {summary(result)}; see `rmix data check {root}`")


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


def _say_start(cfg, run_dir, device, why, detected, ckpt, path, state, loaded, processes, accum):
    """The lines said before the first step: what was read, where the run goes, what it resumes or
    starts from (`loaded`: rmix.init_from.load's line), how a step's batch is accumulated."""
    if detected:
        Progress.line(f"--data-dir {cfg.data.data_dir}: read as {DATASET_KINDS.get(cfg.data.dataset, cfg.data.dataset)}, "
                      "from its files (--dataset names it otherwise)")
    Progress.line(f"run directory: {run_dir}")
    if loaded:
        Progress.line(loaded)
    if ckpt is not None:
        resume.say_what_it_lacks(run_dir, path, ckpt)
        edited = resume.config_json_differs(run_dir, to_dict(cfg), path)  # changes.jsonl has this one
        if edited:  # settings edited (or damaged) by hand since: the checkpoint's are the run's
            Progress.line(edited)
    if accum > 1 or not cfg.accum_steps:
        per = cfg.batch_size // processes
        how = (f"--accum-steps auto (a micro-batch of {cfg.micro_batch} a process)" if not cfg.accum_steps
               else f"--accum-steps {accum}")
        Progress.line(f"{how}: each optimizer step's batch of {cfg.batch_size} is {C.processes(processes)} x "
                      f"{accum} micro-batch{'es' * (accum > 1)} of {per // accum}")
    if cfg.amp == "auto" and device.type == "cuda":
        Progress.line("--amp auto: {} ({})".format(*auto_amp(device)))
    if why:
        Progress.line(why)
    if C.late_milestones(cfg):  # a preset's schedule cut short by --epochs: kept, but said
        Progress.line(f"milestones {','.join(map(str, cfg.optim.milestones))}: "
                      f"{','.join(map(str, C.late_milestones(cfg)))} at or after the last epoch ({cfg.epochs}) "
                      "never change the lr")
    if state.epoch > 1 or state.step:
        at = f", step {state.step}" if state.step else ""
        Progress.line(f"resuming at epoch {state.epoch}{at} (best val top-1 so far {max(state.best_top1, 0):.2f}%)")


NOT_EVALUATED = {"top1": None, "top5": None, "loss": None}


def _val_scores(module, val_loader, normalize, amp, world, evaluated):
    """`evaluate(module)` with rank 0's BatchNorm statistics (the ones saved), or none this epoch."""
    dist.broadcast_buffers(module, world)
    return evaluate(module, val_loader, normalize, amp, world) if evaluated else dict(NOT_EVALUATED)


def _epoch_row(epoch, lr, sums, seconds, val, val_ema, evaluated):
    """(the epoch's metrics row, the score it offers best.pt, whose score that is: "model" or with --ema "ema",
    None where the epoch was not evaluated). `sums`: (loss * images, correct, images) summed over ranks."""
    row = {"epoch": epoch, "lr": lr, "train_loss": _finite(sums[0].item() / sums[2].item()),
           "train_top1": 100 * sums[1].item() / sums[2].item(), "val_top1": val["top1"],
           "val_top5": val["top5"], "val_loss": val["loss"], "img_s": sums[2].item() / seconds}
    score, best_of = val["top1"], "model"
    if val_ema is not None:
        row.update(val_top1_ema=val_ema["top1"], val_top5_ema=val_ema["top5"], val_loss_ema=val_ema["loss"])
        if evaluated and val_ema["top1"] > val["top1"]:
            score, best_of = val_ema["top1"], "ema"
        row["best_of"] = best_of if evaluated else None
    return row, score, best_of if evaluated else None


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
    normalize = Normalize(cfg.data.mean, cfg.data.std)
    r = evaluate(net, val_loader, normalize, amp_dtype(cfg, dev))
    return {**r, "model": cfg.model, "checkpoint": str(path), "data_dir": str(root), "ema": bool(ema)}
