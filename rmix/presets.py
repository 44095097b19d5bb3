"""Named recipes: the paper's commands (../shared/seed) to the hyper-parameter, as TrainConfig overlays.

The CIFAR recipe adds the 5-epoch warmup that the paper's published logs show (epoch 1 runs at
lr 0.041667 = 0.25 / 6) although its README command omits --warmup. The ImageNet command has no
--nesterov, so plain momentum; the CIFAR one has it. Both keep the last partial batch, as the
paper's DataLoader (drop_last=False: 2503 steps per ImageNet epoch at 512, 782 per CIFAR epoch at
64), and normalize CIFAR with the paper's constants (the dataset's default, config.CIFAR_MEAN).
"""
from rmix import config as C

_CIFAR = {
    "model": "pyramidnet_200_240", "epochs": 300, "batch_size": 64,
    "optim.lr": 0.25, "optim.schedule": "step", "optim.milestones": (150, 225), "optim.gamma": 0.1,
    "optim.warmup": 5, "optim.weight_decay": 1e-4, "optim.momentum": 0.9, "optim.nesterov": True,
    "mix.policy": "recursive_mix", "mix.alpha": 0.5, "mix.omega": 0.1, "data.drop_last": False,
}
_IMAGENET = {
    "model": "resnet50", "epochs": 300, "batch_size": 512, "data.dataset": "imagenet",
    "optim.lr": 0.2, "optim.schedule": "cos", "optim.warmup": 5, "optim.weight_decay": 1e-4,
    "optim.momentum": 0.9, "optim.nesterov": False, "data.aug_plus": True,
    "data.crop_size": 224, "data.min_area": 0.08, "data.val_resize": 256, "data.workers": 8,
    "data.drop_last": False, "mix.policy": "recursive_mix", "mix.alpha": 0.5, "mix.omega": 0.5,
    # 512 on the paper's 8 GPUs is 64 a GPU: on fewer, accumulate to the same 512 a step (and 64 a forward)
    "accum_steps": 0, "micro_batch": 64,
}

PRESETS = {
    # The CPU-sized comparison of docs/RESULTS.md: the embedded set, ResNet-14, 30 epochs (a few
    # minutes on 2 cores); scripts/replicate_cpu.py runs it with each --aug and 3 seeds.
    "cpu-shapes": ("the embedded dataset on a CPU: ResNet-14, 30 epochs, batch 64 (docs/RESULTS.md)",
                   {"model": "resnet14", "epochs": 30, "batch_size": 64, "optim.lr": 0.1,
                    "optim.schedule": "cos", "optim.weight_decay": 5e-4, "data.workers": 1,
                    "mix.policy": "recursive_mix", "mix.alpha": 0.5, "mix.omega": 0.5}),
    # The Fashion-MNIST replication of docs/RESULTS.md, settings fixed by issue 17 before any run: the
    # first 300 training images of each class, the full 10,000-image test set, ResNet-14, 100 epochs.
    # The last partial batch is kept, as the paper's DataLoader. scripts/replicate_cpu.py runs each --aug.
    "cpu-fashion": ("Fashion-MNIST on a CPU: 300 images a class, ResNet-14, 100 epochs, batch 64 (docs/RESULTS.md)",
                    {"model": "resnet14", "epochs": 100, "batch_size": 64, "data.dataset": "fashion-mnist",
                     "data.train_per_class": 300, "data.workers": 1, "data.drop_last": False, "eval_every": 5,
                     "optim.lr": 0.1, "optim.schedule": "cos", "optim.nesterov": True, "optim.momentum": 0.9,
                     "optim.weight_decay": 5e-4, "mix.policy": "recursive_mix", "mix.alpha": 0.5,
                     "mix.omega": 0.1}),
    # Fine-tuning on Fashion-MNIST (docs/RESULTS.md, settings fixed by issue 39 before any run): the
    # cpu-fashion data and model, 30 epochs at lr 0.05, from `--init-from` weights or from scratch alike.
    # scripts/finetune_cpu.py pretrains ResNet-14 on the embedded set and runs both arms.
    "cpu-fashion-finetune": ("fine-tuning on Fashion-MNIST on a CPU: 300 images a class, ResNet-14, 30 epochs at lr "
                             "0.05; give --init-from (docs/TRAINING.md)",
                             {"model": "resnet14", "epochs": 30, "batch_size": 64, "data.dataset": "fashion-mnist",
                              "data.train_per_class": 300, "data.workers": 1, "data.drop_last": False,
                              "eval_every": 5, "optim.lr": 0.05, "optim.schedule": "cos", "optim.nesterov": True,
                              "optim.momentum": 0.9, "optim.weight_decay": 5e-4, "mix.policy": "recursive_mix",
                              "mix.alpha": 0.5, "mix.omega": 0.1}),
    "cifar10-pyramidnet200-rm": ("the paper's CIFAR-10 command (97.65% top-1, mean of 3 runs)",
                                 {**_CIFAR, "data.dataset": "cifar10"}),
    "cifar100-pyramidnet200-rm": ("the CIFAR-10 recipe on CIFAR-100",
                                  {**_CIFAR, "data.dataset": "cifar100"}),
    "imagenet-r50-rm": ("the paper's ImageNet command (79.20% top-1)", _IMAGENET),
    "imagenet-r50-baseline": ("the same schedule without mixing (table: 76.32%)",
                              {**_IMAGENET, "mix.policy": "none"}),
    # Mixup alpha 0.2: Zhang et al.'s ImageNet ResNet-50 setting (alpha in [0.1, 0.4] works best there)
    "imagenet-r50-mixup": ("the same schedule with Mixup, alpha 0.2 (table: 77.42%)",
                           {**_IMAGENET, "mix.policy": "mixup", "mix.alpha": 0.2}),
    # CutMix alpha 1.0: Yun et al.'s ImageNet setting (area ratio ~ U(0, 1))
    "imagenet-r50-cutmix": ("the same schedule with CutMix, alpha 1.0 (table: 78.60%)",
                            {**_IMAGENET, "mix.policy": "cutmix", "mix.alpha": 1.0}),
}


def fields(name: str) -> dict:
    """The dotted fields preset `name` sets."""
    if name not in PRESETS:
        raise ValueError(f"--preset: unknown preset {name!r}; expected one of {', '.join(sorted(PRESETS))}")
    return PRESETS[name][1]


def preset(name: str) -> C.TrainConfig:
    """The TrainConfig of preset `name`."""
    return C.replace(C.TrainConfig(), **fields(name))
