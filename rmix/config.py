"""The frozen configuration tree: the single source of truth that cli.py maps options onto."""
import dataclasses
import json
import math
from dataclasses import dataclass, field

from rmix.kernels import MODES
from rmix.pipelines.build import DALI_DEVICES, LOADERS, TORCH_DECODES  # noqa: F401 (the data side's choices)
from rmix.schedule import SCHEDULES

IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)  # pixel units: the op normalizes uint8
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)

# The RM code's CIFAR-10 and CIFAR-100 normalization (its dataset.py), pixel units. Its std is not
# the per-pixel std of CIFAR-10 (about 0.247): it is the widely copied per-image one.
CIFAR_MEAN = (0.4914 * 255, 0.4822 * 255, 0.4465 * 255)
CIFAR_STD = (0.2023 * 255, 0.1994 * 255, 0.2010 * 255)

# Each dataset's own normalization, for a config that names none (mean = std = ()).
# Fashion-MNIST and MNIST: the grey channel's mean and std over the training set, on all 3 channels.
FASHION_MNIST_MEAN, FASHION_MNIST_STD = (0.2860 * 255,) * 3, (0.3530 * 255,) * 3
MNIST_MEAN, MNIST_STD = (0.1307 * 255,) * 3, (0.3081 * 255,) * 3
DATASET_STATS = {"folder": (IMAGENET_MEAN, IMAGENET_STD), "wds": (IMAGENET_MEAN, IMAGENET_STD), "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
                 "cifar10": (CIFAR_MEAN, CIFAR_STD), "cifar100": (CIFAR_MEAN, CIFAR_STD),
                 "fashion-mnist": (FASHION_MNIST_MEAN, FASHION_MNIST_STD), "mnist": (MNIST_MEAN, MNIST_STD)}

# Each choice spelled once: click.Choice, validate() and the code that branches on it read these.
DATASETS = ("auto", "folder", "wds", "imagenet", "cifar10", "cifar100", "fashion-mnist", "mnist")
AUGS = ("none", "mixup", "cutmix", "recursive_mix")
INTERPOLATIONS = MODES  # RM's resize of the history batch: the fused op's modes
SMOOTHING_FORMS = ("paper", "uniform")
OPTIMIZERS = ("sgd", "adamw")
AMPS = ("auto", "none", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda")
LOGS = ("wandb",)  # --log: run logs beside metrics.jsonl (rmix.logs)
COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # torch.compile
EXPORT_FORMATS = ("torchvision", "safetensors")  # rmix export --format


@dataclass(frozen=True)
class DataConfig:
    data_dir: str = ""           # ImageFolder root holding train/ and val/; "" = the embedded set
    dataset: str = "auto"        # "auto" (detect from data_dir) | "folder" | "wds" (shards) | "imagenet" | "cifar10" | "cifar100"
                                 # | "fashion-mnist" | "mnist" (the idx files)
    loader: str = "dali"         # "dali" | "torch": same transforms, same batch contract
    dali_device: str = "auto"    # "auto" | "cpu" | "gpu" (mixed nvJPEG decode)
    torch_decode: str = "workers"  # torch loader: "workers" (PIL) | "device" (torchvision.io.decode_jpeg there)
    crop_size: int = 32          # train and val crop, pixels (224 for ImageNet)
    min_area: float = 0.25       # random-resized-crop area lower bound (0.08 for ImageNet)
    val_resize: int = 36         # val: shorter side before the centre crop (256 for ImageNet)
    aug_plus: bool = False       # colour jitter 0.4 + PCA lighting 0.1 (the paper's ImageNet recipe)
    train_per_class: int = 0     # > 0: train on the first N images of each class, in file order (val untouched)
    drop_last: bool = True       # train: drop each rank's partial last batch; False: pad the shards to
                                 # ceil(N / world) and keep a short last batch (the paper's DataLoader)
    preflight: bool = True       # decode every image once before training (cached) and name bad ones
    workers: int = 1             # DALI threads / DataLoader workers per process; on a 2-core CPU
                                 # box, more starve the model's own threads (BENCHMARKS.md)
    mean: tuple = ()             # per channel, pixel units 0-255; () = the dataset's own (DATASET_STATS)
    std: tuple = ()


@dataclass(frozen=True)
class MixConfig:
    policy: str = "recursive_mix"  # "none" | "mixup" | "cutmix" | "recursive_mix"
    alpha: float = 0.5             # RM: box side = sqrt(U(0, alpha)); Mixup/CutMix: Beta(alpha, alpha)
    omega: float = 0.5             # weight of the RoI consistency loss (RM)
    interpolate: str = "nearest"   # resize of the history batch: "nearest" | "bilinear"
    per_sample: bool = False       # one box per image instead of one per batch (our extension)
    share_fc: bool = False         # RoI head reuses the classifier instead of its own fc_roi
    shared_boxes: bool = False     # every rank draws the same boxes, lam and permutations (the paper's
                                   # code: one seed on every rank); default: a stream of its own per rank
    smoothing: float = 0.0         # label smoothing of the current one-hot labels
    smoothing_form: str = "paper"  # "paper": others get s / (K - 1) | "uniform": s / K (torch's, timm's)


@dataclass(frozen=True)
class OptimConfig:
    optimizer: str = "sgd"       # "sgd" (momentum, optionally Nesterov) | "adamw"
    lr: float = 0.1              # peak learning rate for the global batch
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    schedule: str = "cos"        # "cos" | "step" (the paper's) | "cos_prefix" (cosine restarted after warmup)
    milestones: tuple = ()       # step: epochs after which lr is multiplied by gamma
    gamma: float = 0.1
    warmup: int = 0              # epochs of linear warmup: lr * epoch / (warmup + 1)


@dataclass(frozen=True)
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    mix: MixConfig = field(default_factory=MixConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    model: str = "resnet14"      # any name of `rmix models`
    epochs: int = 30
    batch_size: int = 64         # global, per optimizer step: split evenly over the processes, then the micro-batches
    accum_steps: int = 1         # micro-batches per optimizer step, each batch_size / processes / accum_steps images;
                                 # 0 = auto: as many as keep micro_batch images a process (`accumulation`)
    micro_batch: int = 0         # read by accum_steps 0 only: the per-process batch the recipe ran with (the
                                 # paper's ImageNet: 64); a preset's, so --accum-steps K overrides it
    seed: int = 0
    device: str = "auto"         # "auto" (cuda when present) | "cpu" | "cuda"
    amp: str = "auto"            # "auto" (bf16 where native, fp16 on older GPUs, none on cpu) | "none" | "bf16" | "fp16"
    channels_last: bool = True   # only used on cuda
    compile: str = "none"        # torch.compile mode of the model and its RoI head, or "none" (eager)
    deterministic: bool = False  # cuda: deterministic kernels (bit-identical reruns, slower); else cudnn.benchmark
    out: str = ""                # run directory; "" = runs/<model>-<aug>-<time>
    resume: str = ""             # checkpoint path, or "auto" for the run directory's latest
    init_from: str = ""          # weights a new run starts from (rmix.init_from); "" = the model's own init
    init_from_sha256: str = ""   # set by train: the sha256 of the init_from (or pretrained) file it read
    pretrained: bool = False     # start from the model library's pretrained weights (torchvision's, timm's)
    pretrained_file: str = ""    # pretrained: read from this file, not the library's cache or download
    log_every: int = 20          # steps between progress updates (and step rows of TensorBoard and W&B)
    log: tuple = ()              # run logs beside metrics.jsonl (and TensorBoard when installed): ("wandb",)
    eval_every: int = 1          # evaluate every N epochs, and always after the last; best.pt follows them
    num_classes: int = 0         # derived from the data
    max_steps: int = 0           # stop each epoch after this many steps (0 = all); for smoke runs
    max_skipped_steps: int = 20  # fp16: stop after this many overflowing steps in a row
    save_every_steps: int = 0    # also write latest.pt every N steps inside an epoch (0 = epoch ends only)
    sync_bn: bool = False        # DDP: BatchNorm statistics over the global batch (CUDA only)
    dist_timeout: int = 1800     # seconds a collective waits for the other ranks before failing
    ema: float = 0.0             # weight EMA decay (timm's --model-ema-decay, e.g. 0.9998); 0 = none
    ema_warmup: bool = False     # timm's EMA warmup: decay min(ema, 1 - (1 + k) ** -2/3) at update k + 1


def to_dict(cfg) -> dict:
    """Plain JSON-able dict of a config tree (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def from_dict(d: dict, cls=TrainConfig):
    """Inverse of to_dict; unknown keys are an error that names them."""
    kw = {}
    names = {f.name: f for f in dataclasses.fields(cls)}
    for k, v in d.items():
        if k not in names:
            raise ValueError(f"config: unknown field {k!r} for {cls.__name__}")
        sub = _SUB.get((cls, k))
        if sub is not None:
            v = from_dict(v, sub)
        elif isinstance(v, list):
            v = tuple(v)
        kw[k] = v
    return cls(**kw)


_SUB = {(TrainConfig, "data"): DataConfig, (TrainConfig, "mix"): MixConfig,
        (TrainConfig, "optim"): OptimConfig}


def field_types(cls=TrainConfig, prefix="") -> dict:
    """Dotted field name -> the type of its default (bool, int, float, str, tuple), for the whole tree."""
    out = {}
    for f in dataclasses.fields(cls):
        sub = _SUB.get((cls, f.name))
        if sub is not None:
            out.update(field_types(sub, f"{prefix}{f.name}."))
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            out[prefix + f.name] = type(default)
    return out


def check_value(key: str, value, types: dict):
    """`value` as field `key` takes it (a list becomes a tuple, an int a float), or ValueError naming both."""
    want = types[key]
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if want is tuple and isinstance(value, (list, tuple)):
        return tuple(value)
    if isinstance(value, want) and not (want is int and isinstance(value, bool)):
        return value
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", tuple: "a list"}
    raise ValueError(f"{key}: expected {names.get(want, want.__name__)}, got {value!r}")


def replace(cfg, **changes):
    """dataclasses.replace that also takes dotted keys: replace(cfg, **{"mix.alpha": 1.0})."""
    nested = {}
    flat = {}
    for k, v in changes.items():
        if "." in k:
            head, rest = k.split(".", 1)
            nested.setdefault(head, {})[rest] = v
        else:
            flat[k] = v
    for head, sub in nested.items():
        flat[head] = replace(getattr(cfg, head), **sub)
    return dataclasses.replace(cfg, **flat)


def with_dataset_stats(cfg: TrainConfig, dataset: str) -> TrainConfig:
    """`cfg` with data.mean/std filled in from `dataset` (a resolved name) where it names none."""
    if cfg.data.mean and cfg.data.std:
        return cfg
    mean, std = DATASET_STATS[dataset]
    return replace(cfg, **{"data.mean": tuple(cfg.data.mean or mean), "data.std": tuple(cfg.data.std or std)})


ONLY_FOR = {  # settings one choice uses: given on the command line with another, refused (it would do nothing)
    "mix.omega": ("--aug-omega", "mix.policy", "--aug", "recursive_mix"),
    "mix.interpolate": ("--interpolate", "mix.policy", "--aug", "recursive_mix"),
    "mix.per_sample": ("--per-sample-boxes/--batch-box", "mix.policy", "--aug", "recursive_mix"),
    "optim.momentum": ("--momentum", "optim.optimizer", "--optimizer", "sgd"),
    "optim.nesterov": ("--nesterov/--no-nesterov", "optim.optimizer", "--optimizer", "sgd"),
}


def get(cfg: TrainConfig, field: str):
    """The value of a dotted field (`optim.lr`, `epochs`)."""
    for part in field.split("."):
        cfg = getattr(cfg, part)
    return cfg


def refuse_unused(cfg: TrainConfig, given: set) -> None:
    """ValueError for a setting the user gave that this run's choices do not use.

    `given`: what was typed, and what a --config file sets to other than the default; a preset's
    values stay (a preset for RM run with --aug cutmix keeps its omega, unused).
    """
    for key, (option, chooser, flag, needed) in ONLY_FOR.items():
        chosen = get(cfg, chooser)
        if key in given and chosen != needed:
            raise ValueError(f"{option}: only {flag} {needed} uses it (this run's is {chosen}); drop it")
    if "mix.smoothing_form" in given and cfg.mix.smoothing == 0:
        raise ValueError("--smoothing-form: only label smoothing uses it (--smoothing is 0); drop it or set --smoothing")
    late = late_milestones(cfg)
    if "optim.milestones" in given and late:
        raise ValueError(f"--milestones: {','.join(map(str, late))} at or after the last epoch (--epochs {cfg.epochs}) "
                         "never changes the lr; drop it or raise --epochs")


def layer(preset: dict, filed: dict, typed: dict) -> tuple[TrainConfig, set]:
    """defaults < preset < config file < command line: the run's config, and every field the user gave.

    Each layer is dotted fields. A typed setting, or a filed one other than its default, that this
    run's choices do not use is refused (a saved config.json lists every field, most at their defaults).
    """
    cfg = replace(TrainConfig(), **{**preset, **filed, **typed})
    refuse_unused(cfg, set(typed) | {k for k in filed if get(cfg, k) != get(TrainConfig(), k)})
    return cfg, set(preset) | set(filed) | set(typed)


def late_milestones(cfg: TrainConfig) -> list:
    """The step schedule's milestones that fall at or after the last epoch: they never take effect."""
    return [m for m in cfg.optim.milestones if m >= cfg.epochs] if cfg.optim.schedule == "step" else []


def accumulation(cfg: TrainConfig, world_size: int) -> int:
    """Micro-batches per optimizer step on `world_size` processes: `accum_steps`, or with 0 (auto) as many
    as make `micro_batch` images a process. ValueError (one line) where the batch does not split evenly."""
    per = cfg.batch_size // world_size
    k = cfg.accum_steps or max(1, per // cfg.micro_batch)
    if not cfg.accum_steps and per > cfg.micro_batch and per % cfg.micro_batch:
        raise ValueError(f"--accum-steps auto: --batch-size {cfg.batch_size} over {processes(world_size)} is "
                         f"{per} a process, not a whole number of --micro-batch {cfg.micro_batch}; give --accum-steps K")
    if per % k:
        raise ValueError(f"--accum-steps {k}: --batch-size {cfg.batch_size} over {processes(world_size)} is {per} "
                         f"a process, which does not split into {k} equal micro-batches")
    return k


def processes(n: int) -> str:
    return f"{n} process" + "es" * (n != 1)


def validate(cfg: TrainConfig) -> None:
    """Raise ValueError naming the option and the value for anything out of range."""
    def need(ok, option, value, why):
        if not ok:
            raise ValueError(f"{option}: {why}, got {value!r}")
    need(cfg.data.dataset in DATASETS, "--dataset", cfg.data.dataset, f"expected one of {DATASETS}")
    need(cfg.mix.policy in AUGS, "--aug", cfg.mix.policy, f"expected one of {AUGS}")
    need(cfg.data.loader in LOADERS, "--loader", cfg.data.loader, f"expected one of {LOADERS}")
    need(cfg.optim.optimizer in OPTIMIZERS, "--optimizer", cfg.optim.optimizer, f"expected one of {OPTIMIZERS}")
    need(cfg.optim.schedule in SCHEDULES, "--schedule", cfg.optim.schedule, f"expected one of {SCHEDULES}")
    need(cfg.amp in AMPS, "--amp", cfg.amp, f"expected one of {AMPS}")
    need(cfg.device in DEVICES, "--device", cfg.device, f"expected one of {DEVICES}")
    need(cfg.mix.interpolate in INTERPOLATIONS, "--interpolate", cfg.mix.interpolate,
         f"expected {' or '.join(INTERPOLATIONS)}")
    need(cfg.epochs > 0, "--epochs", cfg.epochs, "must be positive")
    need(cfg.batch_size > 0, "--batch-size", cfg.batch_size, "must be positive")
    need(cfg.accum_steps >= 0, "--accum-steps", cfg.accum_steps, "must be >= 1, or auto (0)")
    need(cfg.accum_steps <= cfg.batch_size, "--accum-steps", cfg.accum_steps,
         f"must be at most --batch-size ({cfg.batch_size}): a micro-batch holds at least one image")
    need(cfg.micro_batch >= 0, "--micro-batch", cfg.micro_batch, "must be >= 0")
    need(cfg.accum_steps or cfg.micro_batch, "--accum-steps", "auto",
         "needs --micro-batch N, the images a process takes per forward")
    need(not (cfg.pretrained and cfg.init_from), "--init-from", cfg.init_from,
         "a run starts from --init-from or from --pretrained, not both")
    need(cfg.pretrained or not cfg.pretrained_file, "--pretrained-file", cfg.pretrained_file, "needs --pretrained")
    # a 31-bit --seed: every stream is derived from it, per rank and epoch (rmix.pipelines.seeds)
    need(isinstance(cfg.seed, int) and 0 <= cfg.seed < 2**31, "--seed", cfg.seed, "must be in [0, 2**31)")
    for option, value in (("--lr", cfg.optim.lr), ("--weight-decay", cfg.optim.weight_decay),
                          ("--momentum", cfg.optim.momentum), ("--gamma", cfg.optim.gamma),
                          ("--aug-alpha", cfg.mix.alpha), ("--aug-omega", cfg.mix.omega),
                          ("--smoothing", cfg.mix.smoothing), ("--min-area", cfg.data.min_area), ("--ema", cfg.ema)):
        need(isinstance(value, (int, float)) and math.isfinite(value), option, value, "must be a finite number")
    need(cfg.optim.lr > 0, "--lr", cfg.optim.lr, "must be positive")
    need(cfg.optim.weight_decay >= 0, "--weight-decay", cfg.optim.weight_decay, "must be >= 0")
    need(0 <= cfg.optim.momentum < 1, "--momentum", cfg.optim.momentum, "must be in [0, 1)")
    need(cfg.optim.gamma > 0, "--gamma", cfg.optim.gamma, "must be positive")
    # a setting either takes effect or is refused
    sgd = cfg.optim.optimizer == "sgd"
    need(sgd or cfg.optim.momentum == OptimConfig.momentum, "--momentum", cfg.optim.momentum,
         "AdamW has no SGD momentum (its betas are torch's defaults); drop it or use --optimizer sgd")
    need(sgd or cfg.optim.nesterov == OptimConfig.nesterov, "--nesterov/--no-nesterov", cfg.optim.nesterov,
         "AdamW has no Nesterov momentum; drop it or use --optimizer sgd")
    need(not (sgd and cfg.optim.nesterov) or cfg.optim.momentum > 0, "--momentum", cfg.optim.momentum,
         "Nesterov momentum needs a momentum above 0 (or --no-nesterov)")
    step = cfg.optim.schedule == "step"
    need(all(m >= 1 for m in cfg.optim.milestones), "--milestones", ",".join(map(str, cfg.optim.milestones)),
         "each is an epoch >= 1 after which the lr decays (0 or below would decay it before the first epoch)")
    need(step or not cfg.optim.milestones, "--milestones", ",".join(map(str, cfg.optim.milestones)),
         f"only --schedule step uses milestones (this run's is {cfg.optim.schedule})")
    need(step or cfg.optim.gamma == OptimConfig.gamma, "--gamma", cfg.optim.gamma,
         f"only --schedule step uses gamma (this run's is {cfg.optim.schedule})")
    need(not step or cfg.optim.milestones or cfg.optim.gamma == OptimConfig.gamma, "--gamma", cfg.optim.gamma,
         "the step schedule multiplies by gamma at its --milestones, and none are given")
    need(cfg.optim.warmup >= 0, "--warmup", cfg.optim.warmup, "must be >= 0")
    need(cfg.optim.warmup < cfg.epochs, "--warmup", cfg.optim.warmup, f"must be below --epochs ({cfg.epochs})")
    need(0 < cfg.mix.alpha <= (1 if cfg.mix.policy == "recursive_mix" else float("inf")), "--aug-alpha",
         cfg.mix.alpha, "must be in (0, 1] for recursive_mix and > 0 otherwise")
    need(cfg.mix.omega >= 0, "--aug-omega", cfg.mix.omega, "must be >= 0")
    need(0 <= cfg.mix.smoothing < 1, "--smoothing", cfg.mix.smoothing, "must be in [0, 1)")
    need(cfg.mix.smoothing_form in SMOOTHING_FORMS, "--smoothing-form", cfg.mix.smoothing_form,
         f"expected {' or '.join(map(repr, SMOOTHING_FORMS))}")
    need(cfg.data.crop_size > 0, "--crop-size", cfg.data.crop_size, "must be positive")
    need(cfg.data.val_resize >= cfg.data.crop_size, "--val-resize", cfg.data.val_resize,
         f"must be >= --crop-size ({cfg.data.crop_size})")
    need(0 < cfg.data.min_area <= 1, "--min-area", cfg.data.min_area, "must be in (0, 1]")
    for name in ("mean", "std"):
        v = getattr(cfg.data, name)
        need(len(v) in (0, 3) and all(isinstance(x, (int, float)) for x in v), f"data.{name}", v,
             "expected 3 values in pixel units (0-255), or none for the dataset's own")
    need(all(x > 0 for x in cfg.data.std), "data.std", cfg.data.std, "must be positive")
    need(cfg.data.torch_decode in TORCH_DECODES, "--torch-decode", cfg.data.torch_decode,
         f"expected {' or '.join(map(repr, TORCH_DECODES))}")
    need(cfg.data.workers >= 0, "--workers", cfg.data.workers, "must be >= 0")
    need(cfg.compile in COMPILE_MODES, "--compile", cfg.compile, f"expected one of {', '.join(COMPILE_MODES)}")
    need(isinstance(cfg.log, tuple) and all(name in LOGS for name in cfg.log), "--log", ",".join(map(str, cfg.log)),
         f"expected names among {', '.join(LOGS)}")
    need(cfg.log_every > 0, "--log-every", cfg.log_every, "must be positive")
    need(cfg.eval_every > 0, "--eval-every", cfg.eval_every, "must be positive (epochs)")
    need(cfg.data.train_per_class >= 0, "--train-per-class", cfg.data.train_per_class, "must be >= 0 (0 = all)")
    need(cfg.max_steps >= 0, "--max-steps", cfg.max_steps, "must be >= 0")
    need(cfg.save_every_steps >= 0, "--save-every-steps", cfg.save_every_steps, "must be >= 0 (0 = epoch ends only)")
    need(cfg.max_skipped_steps >= 0, "--max-skipped-steps", cfg.max_skipped_steps, "must be >= 0")
    need(0 <= cfg.ema < 1, "--ema", cfg.ema, "must be in [0, 1) (a decay such as 0.9998; 0 = no EMA)")
    need(cfg.ema or not cfg.ema_warmup, "--ema-warmup", cfg.ema_warmup, "needs --ema DECAY")
    need(cfg.dist_timeout > 0, "--dist-timeout", cfg.dist_timeout, "must be positive (seconds)")
    need(cfg.resume != "auto" or cfg.out, "--resume", cfg.resume,
         "'auto' needs --out, a fixed run directory to look for latest.pt in (torchrun restarts rely on it)")
