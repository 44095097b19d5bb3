"""Losses: soft-target cross-entropy and RecursiveMix's RoI consistency term."""
import math

import torch
import torch.nn.functional as F


def soft_cross_entropy(logits, soft_targets):
    """Mean over the batch of -sum(soft_targets * log_softmax(logits)); logits (N, K), targets (N, K)."""
    return -(soft_targets * F.log_softmax(logits.float(), dim=-1)).sum(-1).mean()


def consistency_loss(roi_logits, prev_logits, lam, omega):
    """omega * mean_i (1 - lam_i) * CE(roi_logits_i, softmax(prev_logits_i)).

    With one box per batch (the paper) lam is the same for every i and this is the paper's
    `omega * (1 - lam) * CE`; per-sample boxes weight each image by its own pasted area.
    """
    target = F.softmax(prev_logits.float(), dim=-1)
    ce = -(target * F.log_softmax(roi_logits.float(), dim=-1)).sum(-1)
    return omega * ((1 - lam.float()) * ce).mean()


def mix_loss(logits, roi_logits, soft_targets, prev_logits, lam, omega, *, check_values=True):
    """The training loss: soft CE, plus the consistency term when there is a history to match.

    `check_values=False` skips reading lam and soft_targets (the trainer's come from its policy,
    and on the CPU the read would be the step's only host read, which tests/test_sync.py holds to none).

    An empty batch (N = 0) is refused: its mean loss is 0 / 0, a NaN that would reach the weights.
    The trainer never has one (a rank's training shard is padded to full size; only evaluation can
    end a rank one batch early, and it skips that batch); a loop that can get one skips the step.

    When nothing was pasted (`prev_logits is None`) the RoI logits still enter the graph with a
    zero weight, so every parameter gets a gradient every step (DDP without unused parameters).
    """
    lam = _check(logits, roi_logits, soft_targets, prev_logits, lam, omega, check_values)
    loss = soft_cross_entropy(logits, soft_targets)
    if roi_logits is None:
        return loss
    if prev_logits is None:
        return loss + 0.0 * roi_logits.float().sum()
    return loss + consistency_loss(roi_logits, prev_logits, lam, omega)


def _check(logits, roi_logits, soft_targets, prev_logits, lam, omega, check_values=True):
    """ValueError naming the argument whose shape or kind is not the batch's; `lam` as a tensor.

    Values (lam in [0, 1], targets >= 0 with rows summing to 1) only on the CPU, as
    mixing.check_targets: on a GPU reading them would make every step wait for the device.
    """
    if not torch.is_tensor(logits) or logits.dim() != 2:
        raise ValueError(f"logits: expected (N, K), got {_shape(logits)}")
    n, k = logits.shape
    if n == 0:  # a shape: no read
        raise ValueError(f"logits: an empty batch {tuple(logits.shape)}, expected N >= 1 (the mean loss over no "
                         "images is NaN); skip the step")
    for name, t in (("soft_targets", soft_targets), ("roi_logits", roi_logits), ("prev_logits", prev_logits)):
        if t is None and name != "soft_targets":
            continue
        if not torch.is_tensor(t) or tuple(t.shape) != (n, k) or not t.is_floating_point():
            raise ValueError(f"{name}: expected floats of the logits' shape ({n}, {k}), got {_shape(t)}")
    if not torch.is_tensor(lam):
        lam = torch.full((n,), float(lam), device=logits.device)
    if lam.dim() > 1 or lam.numel() not in (1, n):
        raise ValueError(f"lam: expected one value or one per image ({n}), got {_shape(lam)}")
    if not (isinstance(omega, (int, float)) and math.isfinite(omega) and omega >= 0):
        raise ValueError(f"omega: expected a finite number >= 0, got {omega!r}")
    if not check_values:
        return lam
    if lam.device.type == "cpu" and lam.numel() and not bool(((lam >= 0) & (lam <= 1)).all()):
        raise ValueError(f"lam: the kept share of each image, expected values in [0, 1], got {lam.flatten().tolist()[:8]}")
    if soft_targets.device.type == "cpu" and soft_targets.numel():
        if not bool((soft_targets >= 0).all()):
            raise ValueError(f"soft_targets: expected probabilities (>= 0), got a minimum of {soft_targets.min().item()}")
        sums = soft_targets.double().sum(-1)
        if not bool(((sums - 1).abs() <= SUM_TOLERANCE).all()):  # a row summing to 3 would weigh its CE 3 times
            raise ValueError(f"soft_targets: expected rows summing to 1 (within {SUM_TOLERANCE}), got row sums from "
                             f"{sums.min().item():.4g} to {sums.max().item():.4g}")
    return lam


SUM_TOLERANCE = 1e-3  # as mixing.check_targets: float32 sums of K probabilities


def _shape(t):
    return f"{t.dtype} {tuple(t.shape)}" if torch.is_tensor(t) else type(t).__name__


@torch.no_grad()
def topk_correct(logits, targets, ks=(1, 5)):
    """Number of rows whose target index is among the top-k logits, for each k (capped at K)."""
    maxk = min(max(ks), logits.shape[-1])
    pred = logits.topk(maxk, dim=-1).indices
    hit = pred == targets[:, None]
    return [hit[:, :min(k, maxk)].any(-1).sum() for k in ks]
