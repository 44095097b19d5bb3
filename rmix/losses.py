"""Losses: soft-target cross-entropy and RecursiveMix's RoI consistency term."""
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


def mix_loss(logits, roi_logits, soft_targets, prev_logits, lam, omega):
    """The training loss: soft CE, plus the consistency term when there is a history to match.

    When nothing was pasted (`prev_logits is None`) the RoI logits still enter the graph with a
    zero weight, so every parameter gets a gradient every step (DDP without unused parameters).
    """
    loss = soft_cross_entropy(logits, soft_targets)
    if roi_logits is None:
        return loss
    if prev_logits is None:
        return loss + 0.0 * roi_logits.float().sum()
    return loss + consistency_loss(roi_logits, prev_logits, lam, omega)


@torch.no_grad()
def topk_correct(logits, targets, ks=(1, 5)):
    """Number of rows whose target index is among the top-k logits, for each k (capped at K)."""
    maxk = min(max(ks), logits.shape[-1])
    pred = logits.topk(maxk, dim=-1).indices
    hit = pred == targets[:, None]
    return [hit[:, :min(k, maxk)].any(-1).sum() for k in ks]
