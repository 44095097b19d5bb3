"""The frozen configuration tree: the single source of truth that cli.py maps options onto."""
import dataclasses
import json
from dataclasses import dataclass, field

IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)  # pixel units: the op normalizes uint8
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)

CIFAR_MEAN = (125.3, 123.0, 113.9)  # the CutMix / RM code's CIFAR normalization, pixel units
CIFAR_STD = (63.0, 62.1, 66.7)

DATASETS = ("auto", "folder", "imagenet", "cifar10", "cifar100")
AUGS = ("none", "mixup", "cutmix", "recursive_mix")
LOADERS = ("dali", "torch")
OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cos", "step")
AMPS = ("auto", "none", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class DataConfig:
    data_dir: str = ""           # ImageFolder root holding train/ and val/; "" = the embedded set
    dataset: str = "auto"        # "auto" (detect from data_dir) | "folder" | "imagenet" | "cifar10" | "cifar100"
    loader: str = "dali"         # "dali" | "torch": same transforms, same batch contract
    dali_device: str = "auto"    # "auto" | "cpu" | "gpu" (mixed nvJPEG decode)
    crop_size: int = 32          # train and val crop, pixels (224 for ImageNet)
    min_area: float = 0.25       # random-resized-crop area lower bound (0.08 for ImageNet)
    val_resize: int = 36         # val: shorter side before the centre crop (256 for ImageNet)
    aug_plus: bool = False       # colour jitter 0.4 + PCA lighting 0.1 (the paper's ImageNet recipe)
    preflight: bool = True       # decode every image once before training (cached) and name bad ones
    workers: int = 1             # DALI threads / DataLoader workers per process; on a 2-core CPU
                                 # box, more starve the model's own threads (355 vs 122 img/s)
    mean: tuple = IMAGENET_MEAN  # per channel, pixel units 0-255
    std: tuple = IMAGENET_STD


@dataclass(frozen=True)
class MixConfig:
    policy: str = "recursive_mix"  # "none" | "mixup" | "cutmix" | "recursive_mix"
    alpha: float = 0.5             # RM: box side = sqrt(U(0, alpha)); Mixup/CutMix: Beta(alpha, alpha)
    omega: float = 0.5             # weight of the RoI consistency loss (RM)
    interpolate: str = "nearest"   # resize of the history batch: "nearest" | "bilinear"
    per_sample: bool = False       # one box per image instead of one per batch (our extension)
    share_fc: bool = False         # RoI head reuses the classifier instead of its own fc_roi
    smoothing: float = 0.0         # label smoothing of the current one-hot labels


@dataclass(frozen=True)
class OptimConfig:
    optimizer: str = "sgd"       # "sgd" (momentum, optionally Nesterov) | "adamw"
    lr: float = 0.1              # peak learning rate for the global batch
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    schedule: str = "cos"        # "cos" | "step", evaluated once per epoch as the paper's code
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
    batch_size: int = 64         # global: split evenly over the processes
    seed: int = 0
    device: str = "auto"         # "auto" (cuda when present) | "cpu" | "cuda"
    amp: str = "auto"            # "auto" (bf16 on cuda, none on cpu) | "none" | "bf16" | "fp16"
    channels_last: bool = True   # only used on cuda
    out: str = ""                # run directory; "" = runs/<model>-<aug>-<time>
    resume: str = ""             # checkpoint path, or "auto" for the run directory's latest
    log_every: int = 20          # steps between progress updates
    num_classes: int = 0         # derived from the data
    max_steps: int = 0           # stop each epoch after this many steps (0 = all); for smoke runs
    max_skipped_steps: int = 20  # fp16: stop after this many overflowing steps in a row
    save_every_steps: int = 0    # also write latest.pt every N steps inside an epoch (0 = epoch ends only)
    sync_bn: bool = False        # DDP: BatchNorm statistics over the global batch (CUDA only)
    dist_timeout: int = 1800     # seconds a collective waits for the other ranks before failing


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
    need(cfg.mix.interpolate in ("nearest", "bilinear"), "--interpolate", cfg.mix.interpolate,
         "expected nearest or bilinear")
    need(cfg.epochs > 0, "--epochs", cfg.epochs, "must be positive")
    need(cfg.batch_size > 0, "--batch-size", cfg.batch_size, "must be positive")
    need(cfg.optim.lr > 0, "--lr", cfg.optim.lr, "must be positive")
    need(cfg.optim.weight_decay >= 0, "--weight-decay", cfg.optim.weight_decay, "must be >= 0")
    need(cfg.optim.warmup >= 0, "--warmup", cfg.optim.warmup, "must be >= 0")
    need(cfg.optim.warmup < cfg.epochs, "--warmup", cfg.optim.warmup, f"must be below --epochs ({cfg.epochs})")
    need(0 < cfg.mix.alpha <= (1 if cfg.mix.policy == "recursive_mix" else float("inf")), "--aug-alpha",
         cfg.mix.alpha, "must be in (0, 1] for recursive_mix and > 0 otherwise")
    need(cfg.mix.omega >= 0, "--aug-omega", cfg.mix.omega, "must be >= 0")
    need(0 <= cfg.mix.smoothing < 1, "--smoothing", cfg.mix.smoothing, "must be in [0, 1)")
    need(cfg.data.crop_size > 0, "--crop-size", cfg.data.crop_size, "must be positive")
    need(cfg.data.val_resize >= cfg.data.crop_size, "--val-resize", cfg.data.val_resize,
         f"must be >= --crop-size ({cfg.data.crop_size})")
    need(0 < cfg.data.min_area <= 1, "--min-area", cfg.data.min_area, "must be in (0, 1]")
    need(cfg.data.workers >= 0, "--workers", cfg.data.workers, "must be >= 0")
    need(cfg.log_every > 0, "--log-every", cfg.log_every, "must be positive")
    need(cfg.max_steps >= 0, "--max-steps", cfg.max_steps, "must be >= 0")
    need(cfg.save_every_steps >= 0, "--save-every-steps", cfg.save_every_steps, "must be >= 0 (0 = epoch ends only)")
    need(cfg.max_skipped_steps >= 0, "--max-skipped-steps", cfg.max_skipped_steps, "must be >= 0")
    need(cfg.dist_timeout > 0, "--dist-timeout", cfg.dist_timeout, "must be positive (seconds)")
    need(cfg.resume != "auto" or cfg.out, "--resume", cfg.resume,
         "'auto' needs --out, a fixed run directory to look for latest.pt in (torchrun restarts rely on it)")
