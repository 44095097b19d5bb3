"""Learning-rate schedules, evaluated once per epoch as the paper's code does."""
import math

SCHEDULES = ("cos", "step", "cos_prefix")


def lr_at(epoch, base_lr, epochs, *, schedule="cos", warmup=0, milestones=(), gamma=0.1):
    """Learning rate of 1-based `epoch`: the paper's `adjust_learning_rate`, term for term.

    Warmup epochs 1..warmup: base_lr * epoch / (warmup + 1) (the paper's logs: epoch 1 of a
    5-epoch warmup at lr 0.25 runs at 0.041667). Then "step": base_lr * gamma ** (number of
    milestones already passed), so milestones (150, 225) give epochs 151-225 at 0.1x;
    "cos": base_lr * (1 + cos(pi (epoch - 1) / epochs)) / 2, the cosine over all the epochs
    that warmup only overrides (epoch 6 of 300 at lr 0.2: 0.199863, as the paper's ImageNet log);
    "cos_prefix": the cosine restarted after warmup, from base_lr at epoch warmup + 1 (timm's
    warmup_prefix=True; not the paper's; equal to "cos" without warmup).
    """
    if epoch < 1 or epoch > epochs:
        raise ValueError(f"epoch: expected 1..{epochs}, got {epoch}")
    if epoch <= warmup:
        return base_lr * epoch / (warmup + 1)
    if schedule == "step":
        return base_lr * gamma ** sum(epoch > m for m in milestones)
    if schedule == "cos":
        return 0.5 * base_lr * (1 + math.cos(math.pi * (epoch - 1) / epochs))
    if schedule == "cos_prefix":
        t = (epoch - warmup - 1) / (epochs - warmup)
        return 0.5 * base_lr * (1 + math.cos(math.pi * t))
    raise ValueError(f"schedule: expected one of {SCHEDULES}, got {schedule!r}")
