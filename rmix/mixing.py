"""Mixing policies: NoMix, Mixup, CutMix and RecursiveMix, one interface, one fused op underneath.

    policy = RecursiveMix(num_classes=10, mean=MEAN, std=STD)
    out = policy(images, targets)          # MixOut(images, soft_targets, boxes, lam)
    h, w = out.images.shape[-2:]
    logits, roi_logits = model(out.images, roi_boxes(out, h, w))
    loss = mix_loss(logits, roi_logits, out.soft_targets, policy.prev_logits, out.lam, omega)
    ...
    policy.remember(out.images, out.soft_targets, logits)

Images are uint8 (N, H, W, C) straight from a pipeline (then mean/std, pixel units, are
required) or float (N, C, H, W) already normalized. Outputs are always normalized float NCHW.
Evaluation's input goes through `Normalize`, the same normalization with nothing mixed.
"""
import inspect
import math
from typing import NamedTuple

import torch

from rmix.config import INTERPOLATIONS, SMOOTHING_FORMS
from rmix.kernels import recursive_mix
from rmix.kernels.mix_ref import check_box_values, check_labels


class MixOut(NamedTuple):
    images: torch.Tensor        # (N, C, H, W) float, normalized, mixed
    soft_targets: torch.Tensor  # (N, K) float32, rows sum to 1
    boxes: torch.Tensor         # (N, 4) int64 (x1, y1, x2, y2) pixels; all zero where nothing was pasted
    lam: torch.Tensor           # (N,) float32, fraction of each image that is its own




def smooth(targets, num_classes, smoothing, form="paper"):
    """Class indices (N,) or probabilities (N, K) -> float32 (N, K), label-smoothed.

    "paper": the true class keeps 1 - s and every other class gets s / (K - 1) (the RM code's
    `smooth_one_hot`); "uniform": 1 - s + s / K and s / K (torch's `label_smoothing`, timm's).
    Probabilities p are smoothed the same way, linearly: p (1 - s) + (1 - p) s / (K - 1), or
    p (1 - s) + s / K. Rows still sum to 1.
    """
    if form not in SMOOTHING_FORMS:
        raise ValueError(f"smoothing form: expected one of {SMOOTHING_FORMS}, got {form!r}")
    check_targets(targets, num_classes)
    if targets.dim() == 1:
        # not F.one_hot: it reads the indices' min and max back to check them (a sync on a GPU)
        idx = targets.long()[:, None]
        soft = torch.zeros(targets.shape[0], num_classes, device=targets.device).scatter_(1, idx, 1.0)
    else:  # (N, K) probabilities: check_targets refused every other shape
        soft = targets.float()
    if not smoothing or num_classes < 2:
        return soft
    if form == "paper":
        return soft * (1 - smoothing) + (1 - soft) * (smoothing / (num_classes - 1))
    return soft * (1 - smoothing) + smoothing / num_classes


def check_targets(targets, num_classes):
    """ValueError unless `targets` are integer class indices (N,) in [0, K) or probabilities (N, K).

    dtype and shape always; values only on the CPU, where reading them costs no host-device sync
    (on a GPU the step must not wait for a check: the trainer's labels are checked where they are read).
    The fused op checks its targets and history_targets with the same function (kernels/mix_ref.py).
    """
    check_labels(targets, num_classes, "targets")


def check_boxes(boxes, n, h, w):
    """Given boxes as int64 (n, 4) or (4,) -> (rows, 4), refused unless integer (x1, y1, x2, y2) pixel boxes
    inside the w x h image, as the fused op refuses them (kernels/mix_ref.py check_box_values).

    dtype and shape always; values only on the CPU (given boxes are host tensors or lists).
    """
    boxes = torch.as_tensor(boxes)
    if boxes.is_floating_point() or boxes.is_complex() or boxes.dtype == torch.bool:
        raise ValueError(f"boxes: expected integer pixel coordinates (x1, y1, x2, y2), got {boxes.dtype}")
    if boxes.shape[-1:] != (4,) or boxes.dim() > 2:
        raise ValueError(f"boxes: expected ({n}, 4) or (4,) (x1, y1, x2, y2), got {tuple(boxes.shape)}")
    boxes = boxes.reshape(-1, 4).to(torch.int64)
    if boxes.device.type == "cpu":
        check_box_values(boxes.tolist(), h, w)
    return boxes


def sample_beta(alpha, generator=None):
    """One draw of Beta(alpha, alpha) from a torch.Generator (torch's Beta takes none).

    a / (a + b) of two Gamma(alpha) draws; where both underflow to 0.0 (alpha below ~0.01), the
    ratio of their logs: the draw is then near 0 or 1, never the 0.5 that 0 / 0 would suggest.
    """
    a, log_a = _sample_gamma(alpha, generator)
    b, log_b = _sample_gamma(alpha, generator)
    if a + b > 0:
        return a / (a + b)
    d = log_b - log_a
    return 0.0 if d > 700 else 1.0 / (1.0 + math.exp(d))


def _sample_gamma(shape, generator):
    """(one Gamma(shape) draw, its log). Marsaglia and Tsang (2000); shape < 1 is boosted:
    G(a) = G(a + 1) * U ** (1 / a), whose log stays finite where the draw itself underflows."""
    boost, log_boost = 1.0, 0.0
    if shape < 1:
        u = _rand(generator)
        boost, log_boost = u ** (1.0 / shape), math.log(max(u, 1e-300)) / shape
        shape += 1.0
    d = shape - 1.0 / 3
    c = 1.0 / math.sqrt(9 * d)
    while True:
        x = torch.randn((), generator=generator).item()
        v = (1 + c * x) ** 3
        if v <= 0:
            continue
        u = _rand(generator)
        if math.log(max(u, 1e-300)) < 0.5 * x * x + d - d * v + d * math.log(v):
            return d * v * boost, math.log(d * v) + log_boost


def _rand(generator):
    return torch.rand((), generator=generator, dtype=torch.float64).item()


def _randint(high, n, generator):
    return torch.randint(0, high, (n,), generator=generator)


def to_device(t, device):
    """A tensor drawn on the host (boxes, permutations) onto the device without waiting for it.

    A plain `.to(cuda)` from pageable memory synchronizes the stream: the host would wait for every
    queued kernel before the copy. Asynchronous, the bytes are staged at once and the host goes on.
    """
    return t.to(device, non_blocking=True)


def clip_boxes(cx, cy, cut_w, cut_h, h, w):
    """The paper's clipping: (cx +- cut_w // 2, cy +- cut_h // 2) clipped to the image, int64 (N, 4)."""
    x1 = (cx - cut_w // 2).clamp(0, w)
    x2 = (cx + cut_w // 2).clamp(0, w)
    y1 = (cy - cut_h // 2).clamp(0, h)
    y2 = (cy + cut_h // 2).clamp(0, h)
    return torch.stack([x1, y1, x2, y2], dim=1).long()


class _Policy:
    """What every policy shares: normalization, label smoothing, output dtype and layout, RNG."""

    def __init__(self, num_classes, alpha=1.0, *, smoothing=0.0, smoothing_form="paper", mean=None, std=None,
                 out_dtype=torch.float32, channels_last=False, generator=None, backend="auto"):
        if isinstance(num_classes, bool) or not hasattr(num_classes, "__index__") or num_classes < 1:
            raise ValueError(f"num_classes: must be an integer >= 1, got {num_classes!r}")
        if not (math.isfinite(alpha) and alpha > 0):  # inf or nan: the Beta sampler would never return
            raise ValueError(f"alpha: must be a finite number > 0, got {alpha}")
        if not 0 <= smoothing < 1:
            raise ValueError(f"smoothing: must be in [0, 1), got {smoothing}")
        if smoothing_form not in SMOOTHING_FORMS:
            raise ValueError(f"smoothing_form: expected one of {SMOOTHING_FORMS}, got {smoothing_form!r}")
        _check_std(std)
        self.num_classes, self.alpha, self.smoothing = num_classes, alpha, smoothing
        self.smoothing_form = smoothing_form
        self.mean, self.std = mean, std
        self.out_dtype, self.channels_last = out_dtype, channels_last
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)
        self.backend = backend

    def _empty(self, n, c, h, w, device):
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        return torch.empty((n, c, h, w), dtype=self.out_dtype, device=device, memory_format=fmt)

    def _normalize(self, images, targets, out=None):
        """Normalized float NCHW images and smoothed soft targets, via the fused op with no history."""
        n, c, h, w = _dims(images)
        out = self._empty(n, c, h, w, images.device) if out is None else out
        soft = self._soft(targets, n, images.device)
        x, soft, lam = recursive_mix(images, None, soft, None, None, mean=self.mean, std=self.std,
                                     out=out, backend=self.backend, check_values=False)  # checked: _soft, __init__
        return x, soft, lam

    def _soft(self, targets, n, device):
        """Smoothed float32 (N, K) targets on `device`, for a batch of `n` images."""
        if targets.dim() not in (1, 2) or targets.shape[0] != n:
            raise ValueError(f"targets: expected ({n},) indices or ({n}, {self.num_classes}) probabilities "
                             f"for a batch of {n} images, got {tuple(targets.shape)}")
        return smooth(targets, self.num_classes, self.smoothing, self.smoothing_form).to(device)

    def reset(self):
        """Forget any state (only RecursiveMix has some)."""

    def remember(self, images, soft_targets, logits):
        """Called after the forward pass (only RecursiveMix uses it)."""

    def state_dict(self) -> dict:
        """What resuming inside an epoch needs besides the generator (RecursiveMix: the history)."""
        return {}

    def load_state_dict(self, state: dict, device=None):
        """Restore `state_dict()`, tensors onto `device` (where the next batch will be)."""


def _dims(images):
    if images.dim() != 4:
        raise ValueError(f"images: expected a batched input with 4 dims, but got {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        n, h, w, c = images.shape
    else:
        n, c, h, w = images.shape
    return n, c, h, w


def _no_boxes(n, device):
    return torch.zeros((n, 4), dtype=torch.int64, device=device)


def _check_std(std):
    if std is not None and not bool((torch.as_tensor(std, dtype=torch.float64).cpu() > 0).all()):
        raise ValueError(f"std: must be positive (it divides every pixel), got {std}")  # once, at construction


class Normalize:
    """Evaluation's input transform: `images` as the model takes them, `(x - mean) / std` in float
    (N, C, H, W) of `out_dtype` (channels_last if asked), the numbers the policies give; nothing mixed.

    images: uint8 (N, H, W, C) in pixel units (0-255), or float (N, C, H, W) already normalized (cast).
    """

    def __init__(self, mean, std, out_dtype=torch.float32, channels_last=False):
        _check_std(std)
        self.mean, self.std, self.out_dtype, self.channels_last = mean, std, out_dtype, channels_last

    def __call__(self, images):
        n, c, h, w = _dims(images)
        if images.dtype == torch.uint8 and (self.mean is None or self.std is None):
            raise ValueError("uint8 images need mean and std (in pixel units, 0-255)")
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        out = torch.empty((n, c, h, w), dtype=self.out_dtype, device=images.device, memory_format=fmt)
        one_class = torch.ones((n, 1), dtype=torch.float32, device=images.device)  # the op mixes labels too
        return recursive_mix(images, None, one_class, None, None, mean=self.mean, std=self.std, out=out,
                             check_values=False)[0]  # the fused op (Triton on CUDA), as the policies normalize


class NoMix(_Policy):
    """Normalize and one-hot (smoothed) labels; lam = 1: `--aug none`."""

    def __call__(self, images, targets):
        x, soft, lam = self._normalize(images, targets)
        return MixOut(x, soft, _no_boxes(x.shape[0], x.device), lam)


class Mixup(_Policy):
    """Mixup (Zhang et al. 2018): x = lam x + (1 - lam) x[perm], lam ~ Beta(alpha, alpha) per batch.

    `lam` given: one number in [0, 1] (or a one-element tensor) for the whole batch, as the paper's
    Mixup; no per-image lam (out.lam repeats the one value).
    """

    def __call__(self, images, targets, lam=None):
        if lam is not None:
            lam = _one_lam(lam)
        x, soft, _ = self._normalize(images, targets)
        n = x.shape[0]
        lam = sample_beta(self.alpha, self.generator) if lam is None else lam
        perm = to_device(torch.randperm(n, generator=self.generator), x.device)
        x = x.mul(lam).add_(x[perm], alpha=1 - lam)  # x[perm] is a copy, so in place is safe
        soft = soft * lam + soft[perm] * (1 - lam)
        lam_t = torch.full((n,), lam, dtype=torch.float32, device=x.device)
        return MixOut(x, soft, _no_boxes(n, x.device), lam_t)


def _one_lam(lam):
    """A given Mixup lam as a float in [0, 1], else ValueError naming it."""
    if isinstance(lam, torch.Tensor):
        if lam.numel() != 1:
            raise ValueError(f"lam: expected one number in [0, 1] for the whole batch (Mixup has no per-image lam), "
                             f"got a tensor of shape {tuple(lam.shape)}")
        if lam.is_complex() or lam.dtype == torch.bool:
            raise ValueError(f"lam: expected one number in [0, 1], got a {lam.dtype} tensor")
    elif isinstance(lam, bool) or not isinstance(lam, (int, float)):
        raise ValueError(f"lam: expected one number in [0, 1], got {type(lam).__name__} {lam!r}")
    value = float(lam)
    if not 0.0 <= value <= 1.0:  # NaN fails too
        raise ValueError(f"lam: expected one number in [0, 1] (the share of each image kept), got {value}")
    return value


class CutMix(_Policy):
    """CutMix (Yun et al. 2019): paste the same box of x[perm]; lam from the clipped area."""

    def __call__(self, images, targets, boxes=None):
        """`boxes`: (N, 4) or (4,) (x1, y1, x2, y2), one box for the whole batch (the paper's CutMix)."""
        x, soft, _ = self._normalize(images, targets)
        n, _, h, w = x.shape
        if n == 0:  # nothing to mix (a rank's empty last batch)
            return MixOut(x, soft, _no_boxes(0, x.device), torch.ones(0, device=x.device))
        if boxes is None:
            lam = sample_beta(self.alpha, self.generator)
            r = math.sqrt(1.0 - lam)
            cx, cy = _randint(w, 1, self.generator), _randint(h, 1, self.generator)
            boxes = clip_boxes(cx, cy, int(w * r), int(h * r), h, w).expand(n, 4)
        else:  # given: one box, as the paper's CutMix pastes (read on the host: given boxes are few)
            boxes = check_boxes(torch.as_tensor(boxes).cpu(), n, h, w)
            if len(boxes) not in (1, n) or not bool((boxes == boxes[:1]).all()):
                raise ValueError(f"boxes: CutMix pastes one box into the whole batch, got {len(boxes)} boxes "
                                 f"{'that differ' if len(boxes) == n else f'for {n} images'}; RecursiveMix "
                                 "(per_sample=True) takes one box per image")
            boxes = boxes[:1].expand(n, 4)
        x1, y1, x2, y2 = boxes[0].tolist()  # one box per batch, as the paper (drawn on the host)
        perm = to_device(torch.randperm(n, generator=self.generator), x.device)
        x[:, :, y1:y2, x1:x2] = x[perm, :, y1:y2, x1:x2]
        lam = 1.0 - max(x2 - x1, 0) * max(y2 - y1, 0) / (h * w)
        soft = soft * lam + soft[perm] * (1 - lam)
        lam_t = torch.full((n,), lam, dtype=torch.float32, device=x.device)
        return MixOut(x, soft, to_device(boxes.to(torch.int64).contiguous(), x.device), lam_t)


class RecursiveMix(_Policy):
    """RecursiveMix (Yang et al. 2022): paste the whole previous mixed batch, resized, into a box.

    History (mixed images, mixed soft targets, logits) is kept on the object: `remember` it after
    the forward pass, `reset` it at each epoch start. While it is empty nothing is pasted (lam = 1).
    A second call without `remember` (or `reset`) in between raises: it would mix a stale history.
    The output buffer of step t is the history of step t+1, so two buffers alternate: no clone.
    """

    def __init__(self, num_classes, alpha=0.5, omega=0.5, interpolate="nearest", per_sample=False,
                 smoothing=0.0, generator=None, **kw):
        if not 0 < alpha <= 1:
            raise ValueError(f"alpha: RecursiveMix needs 0 < alpha <= 1 (area ratio), got {alpha}")
        if not (math.isfinite(omega) and omega >= 0):
            raise ValueError(f"omega: must be a finite number >= 0, got {omega}")
        if interpolate not in INTERPOLATIONS:
            raise ValueError(f"interpolate: expected {' or '.join(map(repr, INTERPOLATIONS))}, got {interpolate!r}")
        super().__init__(num_classes, alpha, smoothing=smoothing, generator=generator, **kw)
        self.omega, self.interpolate, self.per_sample = omega, interpolate, per_sample
        self._buffers = []
        self.reset()

    STATE_KEYS = ("history", "history_targets", "history_logits")  # of state_dict(), all required to load

    def reset(self):
        """Forget the history (the trainer calls this at each epoch start, as the paper's code)."""
        self.history = self.history_targets = self.history_logits = None
        self.prev_logits = None  # logits of the history rows used by the last call, for the loss
        self._called = False  # called since the last remember/reset: a second call is an error

    def remember(self, images, soft_targets, logits):
        """Keep this step's mixed batch as the next step's history (images and targets detached, not copied)."""
        n = images.shape[0]
        if logits is not None and tuple(logits.shape) != (n, self.num_classes):
            raise ValueError(f"logits: expected ({n}, {self.num_classes}) for this batch, got {tuple(logits.shape)}")
        self._called = False
        self.history = images.detach()
        self.history_targets = soft_targets.detach().float()
        # N x K: cheap; a CUDA-graph replay reuses the logits' memory. None: a loop without the
        # consistency term (rmix.timm_mix), where prev_logits stays None
        self.history_logits = None if logits is None else logits.detach().clone()

    def state_dict(self) -> dict:
        return {"history": self.history, "history_targets": self.history_targets,
                "history_logits": self.history_logits}

    def load_state_dict(self, state: dict, device=None):
        if not isinstance(state, dict):
            raise ValueError(f"state: expected a dict with the keys {list(self.STATE_KEYS)}, got {type(state).__name__}")
        missing = [k for k in self.STATE_KEYS if k not in state]
        unexpected = sorted(map(str, set(state) - set(self.STATE_KEYS)))
        if missing or unexpected:
            raise ValueError(f"state: expected the keys {list(self.STATE_KEYS)} of RecursiveMix.state_dict(), "
                             f"got {sorted(map(str, state))} (missing {missing}, unexpected {unexpected})")

        def put(t):
            return None if t is None else t.to(device) if device is not None else t
        self.history, self.history_targets, self.history_logits = (
            put(state["history"]), put(state["history_targets"]), put(state["history_logits"]))
        self._called = False

    def sample_boxes(self, n, h, w):
        """Boxes with side sqrt(U(0, alpha)) of the image side: one for the batch, or one per image."""
        m = n if self.per_sample else 1
        r = (torch.rand(m, generator=self.generator, dtype=torch.float64) * self.alpha).sqrt()
        cut_w, cut_h = (w * r).long(), (h * r).long()  # int() truncates, as the paper
        cx, cy = _randint(w, m, self.generator), _randint(h, m, self.generator)
        return clip_boxes(cx, cy, cut_w, cut_h, h, w).expand(n, 4).contiguous()

    def __call__(self, images, targets, boxes=None):
        n, c, h, w = _dims(images)
        if boxes is not None:  # checked on the host, as CutMix's (the Triton backend does not check them)
            boxes = check_boxes(boxes, n, h, w)
        if self._called:  # else this batch would mix with a stale history, or with none at all
            raise RuntimeError("RecursiveMix called twice without remember(): call policy.remember(out.images, "
                               "out.soft_targets, logits) after each step's forward pass (reset() starts over)")
        if self.history is None:
            self.prev_logits = None
            x, soft, lam = self._normalize(images, targets, out=self._buffer(n, c, h, w, images.device))
            self._called = True  # only once it mixed: a refused batch can be retried
            return MixOut(x, soft, _no_boxes(n, x.device), lam)
        if self.history.shape[0] < n:
            raise ValueError(f"history: holds {self.history.shape[0]} images, the batch has {n}; "
                             "call reset() when the batch size grows")
        boxes = self.sample_boxes(n, h, w) if boxes is None else boxes
        boxes = to_device(boxes, images.device)
        soft = self._soft(targets, n, images.device)
        x, soft, lam = recursive_mix(images, self.history, soft, self.history_targets, boxes,
                                     mode=self.interpolate, mean=self.mean, std=self.std,
                                     out=self._buffer(n, c, h, w, images.device), backend=self.backend,
                                     check_values=False)  # targets checked by _soft; the history is ours
        self.prev_logits = None if self.history_logits is None else self.history_logits[:n]
        self._called = True
        return MixOut(x, soft, boxes, lam)

    def _buffer(self, n, c, h, w, device):
        # Reuse a buffer of the right shape that is not the history being read; keep that history's and this one.
        hist = self.history.data_ptr() if self.history is not None else None
        for b in self._buffers:
            if b.shape == (n, c, h, w) and b.device == device and b.data_ptr() != hist:
                return b
        b = self._empty(n, c, h, w, device)
        self._buffers = [x for x in self._buffers if x.data_ptr() == hist] + [b]
        return b


POLICIES = {"none": NoMix, "mixup": Mixup, "cutmix": CutMix, "recursive_mix": RecursiveMix}


# RecursiveMix's own settings (rmix/config.py's ONLY_FOR: --aug-omega, --interpolate, --per-sample-boxes)
RM_ONLY = ("omega", "interpolate", "per_sample")


def build_policy(name, num_classes, *, alpha, omega=0.5, interpolate="nearest", per_sample=False,
                 **kw):
    """The policy called `name` ("none" | "mixup" | "cutmix" | "recursive_mix").

    omega, interpolate and per_sample are RecursiveMix's: another policy refuses a value that
    differs from RecursiveMix's default (it would do nothing), as the CLI refuses those options.
    A caller holding a config for any policy passes them only for "recursive_mix".
    """
    if name not in POLICIES:
        raise ValueError(f"aug: expected one of {tuple(POLICIES)}, got {name!r}")
    if name == "recursive_mix":
        return RecursiveMix(num_classes, alpha, omega, interpolate, per_sample, **kw)
    defaults = inspect.signature(RecursiveMix.__init__).parameters
    for key, value in zip(RM_ONLY, (omega, interpolate, per_sample)):
        default = defaults[key].default
        if value != default:  # NaN differs too
            raise ValueError(f"{key}: only recursive_mix uses it, got {value!r} for {name} "
                             f"(the default {default!r} or nothing); drop it")
    return POLICIES[name](num_classes, alpha, **kw)


def roi_boxes(out: MixOut, h, w):
    """Boxes for the RoI head: the pasted box, or the whole image where nothing was pasted.

    The full-image box keeps every RoI-head parameter in the graph every step (with zero loss
    weight, since lam = 1 there), so DDP needs no find_unused_parameters.
    """
    b = out.boxes
    empty = (b[:, 2] <= b[:, 0]) | (b[:, 3] <= b[:, 1])
    full = torch.zeros_like(b)  # (0, 0, w, h) written on the device: no host-to-device copy
    full[:, 2], full[:, 3] = w, h
    return torch.where(empty[:, None], full, b)
