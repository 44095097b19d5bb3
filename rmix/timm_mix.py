"""RecursiveMix as a drop-in `mixup_fn`: timm's `Mixup` interface, and a torchvision v2-style batch
transform, for training loops that are not rmix's.

    from rmix.timm_mix import RecursiveMixup
    mixup_fn = RecursiveMixup(num_classes=1000, alpha=0.5, label_smoothing=0.1)
    ...
    for epoch in range(epochs):
        mixup_fn.reset()                           # the paper clears the history at each epoch start
        for input, target in loader:
            input, target = mixup_fn(input, target)   # float NCHW (normalized) or uint8 NHWC
            output = model(input)
            loss = SoftTargetCrossEntropy()(output, target)

This is timm's `input, target = mixup_fn(input, target)` line, with timm's `label_smoothing`
(``1 - s + s / K`` on the true class, ``s / K`` elsewhere) and `mixup_enabled` switch
(`--mixup-off-epoch`), and the same call as torchvision's `v2.CutMix` / `v2.MixUp` in the loop:
``images, labels = rm(images, labels)``. It must run in the training loop, on the trainer's
process, not in a DataLoader's `collate_fn`: the history is the trainer's previous batch, which a
worker never sees (each would keep its own), so inside a worker it raises.

What it does is `rmix.mixing.RecursiveMix` itself: the previous call's mixed batch, resized into
a box of side ``sqrt(U(0, alpha))`` of the image, labels mixed by area, history kept here. The
returned batch lives in one of two buffers that alternate, so it is overwritten two calls later
(clone it to keep it; timm's own Mixup also mixes in place).

Without `roi_logits` this is RecursiveMix's history paste alone. The paper's second part, the
consistency loss on the pasted region, needs the model's prediction for that box (an RoI head,
`rmix.models`): a loop that has one passes ``box`` to it and adds `consistency(roi_logits)` after
calling `observe(logits)` each step. docs/RESULTS.md has what each part gives on Fashion-MNIST.
"""
import torch

from rmix.losses import consistency_loss
from rmix.mixing import RecursiveMix, _dims, roi_boxes


class RecursiveMixup:
    """timm-compatible RecursiveMix: ``x, soft_target = fn(x, target)``.

    Args:
        num_classes: K (timm's name and default).
        alpha: the box's area bound, side sqrt(U(0, alpha)) (the paper: 0.5).
        omega: the consistency loss weight, for `consistency` (the paper: 0.5 on ImageNet).
        label_smoothing: timm's (uniform) smoothing of the current labels, default 0.1 as timm's.
        interpolate: "nearest" (the paper) or "bilinear" resize of the history.
        per_sample: one box per image instead of one per batch.
        mean, std: per-channel pixel-unit statistics, for uint8 NHWC input (normalized here);
            float NCHW input is taken as already normalized.
        generator: a torch.Generator for the boxes (default: seeded 0), as rmix's policy's.
    """

    def __init__(self, num_classes=1000, alpha=0.5, omega=0.5, label_smoothing=0.1, interpolate="nearest",
                 per_sample=False, mean=None, std=None, generator=None):
        self.policy = RecursiveMix(num_classes, alpha, omega, interpolate, per_sample, smoothing=label_smoothing,
                                   smoothing_form="uniform", mean=mean, std=std, generator=generator)
        self.num_classes, self.label_smoothing = num_classes, label_smoothing
        self.mixup_enabled = True  # timm's switch: False gives smoothed one-hot labels and no paste
        self.out = None            # the last call's rmix.mixing.MixOut (boxes, lam)

    def reset(self):
        """Forget the history (call at each epoch start, as the paper's code does)."""
        self.policy.reset()

    def __call__(self, x, target):
        if torch.utils.data.get_worker_info() is not None:
            raise RuntimeError("RecursiveMixup runs in the training loop, not in a DataLoader worker: its "
                               "history is the trainer's previous batch, which a worker never sees")
        if target.dim() != 1:
            raise ValueError(f"target: expected class indices (N,), got shape {tuple(target.shape)}")
        if not self.mixup_enabled:
            self.reset()
        else:
            self._fit_history(x)
        out = self.policy(x, target)
        if self.mixup_enabled:
            # the next call pastes this batch; logits only once `observe` gives them
            self.policy.remember(out.images, out.soft_targets, None)
        else:
            self.policy.reset()  # mixing off: no history to keep, and no remember() to wait for
        self.out = out
        return out.images, out.soft_targets

    def _fit_history(self, x):
        """A history that cannot be pasted into this batch (more images, another size) is dropped."""
        h = self.policy.history
        if h is None:
            return
        n, c, hh, ww = _dims(x)  # uint8 NHWC or float NCHW
        if h.shape[0] < n or tuple(h.shape[1:]) != (c, hh, ww) or h.device != x.device:
            self.policy.reset()

    @property
    def box(self) -> torch.Tensor:
        """The last call's boxes for an RoI head: the pasted box, or the whole image where none was."""
        h, w = self.out.images.shape[-2:]
        return roi_boxes(self.out, h, w)

    def observe(self, logits):
        """The model's logits for the last batch: the next call's consistency target."""
        if self.policy.history is not None:
            self.policy.history_logits = logits.detach().clone()

    def consistency(self, roi_logits) -> torch.Tensor:
        """The paper's second term for the last batch: omega * (1 - lam) * CE(roi_logits, softmax(prev logits)).

        Zero (in the graph) where nothing was pasted or the previous step's logits were not observed.
        """
        prev = self.policy.prev_logits
        if prev is None:
            return 0.0 * roi_logits.float().sum()
        return consistency_loss(roi_logits, prev, self.out.lam, self.policy.omega)
