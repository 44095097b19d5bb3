"""The fused RecursiveMix op in plain torch: the spec of the Triton kernel, and the CPU path.

One call turns the loader's batch into the model's input:
    out[i] = normalize(images[i]) outside boxes[i]
    out[i][box] = resize(history[i], box size)          (history is already normalized)
    soft[i] = lam[i] * onehot(targets[i]) + (1 - lam[i]) * history_targets[i]
    lam[i]  = 1 - box_area[i] / (H W)
Memory traffic (uint8 NHWC in, dtype D out): read N H W C bytes ; read about box_fraction of the
history ; write N H W C sizeof(D). The unfused way (normalize, clone, interpolate, slice-assign)
moves each float image three to four times.
"""
import torch
import torch.nn.functional as F

from rmix.kernels import MODES


def check_inputs(images, history, targets, history_targets, boxes, mode, num_classes, mean, std,
                 check_values=True):
    """Validate shapes and dtypes; return (N, C, H, W, K, channels_last_input).

    With `check_values`, also the values of the CPU tensors among targets, history_targets and a
    tensor std (a device tensor's values are never read: that would make the host wait for it).
    The policies pass False: they check their labels and std themselves, once.
    """
    if images.dim() != 4:
        raise ValueError(f"images: expected a batched input with 4 dims, but got {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        n, h, w, c = images.shape  # pipelines emit NHWC bytes
        if mean is None or std is None:
            raise ValueError("uint8 images need mean and std (in pixel units, 0-255)")
        nhwc = True
    elif images.is_floating_point():
        n, c, h, w = images.shape
        nhwc = False
    else:
        raise ValueError(f"images: expected uint8 (N, H, W, C) or float (N, C, H, W), got {images.dtype}")
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    if targets.dim() == 1:
        if targets.is_floating_point():
            raise ValueError("targets: class indices must be an integer tensor")
        if num_classes is None:
            k = history_targets.shape[1] if history_targets is not None else None
            if k is None:
                raise ValueError("targets: class indices need num_classes")
        else:
            k = num_classes
    elif targets.dim() == 2:
        k = targets.shape[1]
    else:
        raise ValueError(f"targets: expected (N,) or (N, K), got {tuple(targets.shape)}")
    if targets.shape[0] != n:
        raise ValueError(f"targets: expected {n} rows, got {targets.shape[0]}")
    check_labels(targets, k, "targets", values=check_values)
    if history is not None:
        if history.dim() != 4 or history.shape[0] < n or history.shape[1] != c:
            raise ValueError(f"history: expected (M >= {n}, {c}, h, w), got {tuple(history.shape)}")
        if (history_targets is None or history_targets.dim() != 2 or history_targets.shape[0] < n
                or history_targets.shape[1] != k):
            got = None if history_targets is None else tuple(history_targets.shape)
            raise ValueError(f"history_targets: expected (M >= {n}, {k}), got {got}")
        check_labels(history_targets[:n], k, "history_targets", values=check_values)
        if boxes is None or tuple(boxes.shape) != (n, 4):
            raise ValueError(f"boxes: expected ({n}, 4), got {None if boxes is None else tuple(boxes.shape)}")
    for name, v in (("mean", mean), ("std", std)):
        if v is not None and len(v) != c:  # most often the images' layout, not the statistics
            layout = "uint8 (N, H, W, C)" if nhwc else "float (N, C, H, W)"
            raise ValueError(f"images: read as {layout}, {tuple(images.shape)} has {c} channels but {name} has "
                             f"{len(v)} values; uint8 batches are (N, H, W, C), float ones (N, C, H, W)")
    if std is not None and not _positive(std, check_values):
        raise ValueError(f"std: must be positive (it divides every pixel), got {std}")
    return n, c, h, w, k, nhwc


def _positive(std, check_values):
    """False where std has a value <= 0 (or NaN) that can be read without a sync: host numbers always,
    a CPU tensor with check_values; a device tensor's values are not read."""
    if isinstance(std, torch.Tensor):
        if std.device.type != "cpu" or not check_values:
            return True
        return bool((std.double() > 0).all())
    return all(float(s) > 0 for s in std)  # host values: no sync


def check_labels(targets, k, name="targets", values=True):
    """ValueError unless `targets` are integer class indices (N,) in [0, k) or probabilities (N, k)
    (floats >= 0, each row summing to 1 within 1e-3); the message starts with `name`.

    dtype and shape always; values only where `values` is set and the tensor is on the CPU, where
    reading them costs no host-device sync. rmix.mixing.check_targets is this for the policies.
    """
    if targets.dim() == 1:
        if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
            raise ValueError(f"{name}: class indices must be integers, got {targets.dtype} "
                             f"(probabilities go as (N, {k}))")
        if values and targets.device.type == "cpu" and targets.numel():
            lo, hi = int(targets.min()), int(targets.max())
            if lo < 0 or hi >= k:
                raise ValueError(f"{name}: class indices must be in [0, {k}), got {lo if lo < 0 else hi}")
    elif targets.dim() == 2 and targets.shape[1] == k:
        if not targets.is_floating_point():
            raise ValueError(f"{name}: probabilities (N, {k}) must be floats, got {targets.dtype}")
        if values and targets.device.type == "cpu" and targets.numel():
            sums = targets.double().sum(1)
            lo = targets.min().item()
            if not (lo >= 0 and bool(((sums - 1).abs() <= 1e-3).all())):  # NaN fails both
                raise ValueError(f"{name}: probabilities (N, {k}) must be >= 0 with rows summing to 1, got a "
                                 f"minimum of {lo:.4g} and row sums from {sums.min().item():.4g} to "
                                 f"{sums.max().item():.4g}")
    else:
        raise ValueError(f"{name}: expected (N,) indices or (N, {k}) probabilities, got {tuple(targets.shape)}")


def check_box_values(boxes, h, w):
    """ValueError naming the first of `boxes` (host lists (x1, y1, x2, y2)) that reaches outside the
    w x h image; empty and inverted boxes inside it paste nothing and pass."""
    for i, (x1, y1, x2, y2) in enumerate(boxes):
        if min(x1, y1) < 0 or x2 > w or y2 > h:
            raise ValueError(f"boxes[{i}]: {list(boxes[i])} lies outside the {w}x{h} image "
                             f"(expected 0 <= x1, x2 <= {w} and 0 <= y1, y2 <= {h})")


def box_area(boxes):
    """Clipped area of (x1, y1, x2, y2) boxes; empty or inverted boxes have area 0."""
    b = boxes.to(torch.int64)
    return (b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)


def mix_lam(boxes, h, w):
    """lam = 1 - box_area / (H W), float64 (N,)."""
    return 1.0 - box_area(boxes).to(torch.float64) / (h * w)


def soft_targets(targets, k, dtype=torch.float32):
    """(N,) indices or (N, K) probabilities -> float (N, K)."""
    if targets.dim() == 1:
        return F.one_hot(targets.long(), k).to(dtype)
    return targets.to(dtype)


def normalize(images, mean, std, dtype):
    """uint8 NHWC -> (x - mean) / std as float NCHW; float NCHW passes through (cast)."""
    if images.dtype != torch.uint8:
        return images.to(dtype)
    m = torch.as_tensor(mean, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
    # read N H W C bytes ; write N C H W floats (a strided view, no extra copy of the input)
    return ((images.permute(0, 3, 1, 2).float() - m) / s).to(dtype)


CHUNK_BYTES = 16 << 20  # fp32 scratch per step when out isn't fp32: small enough to stay in cache


def normalize_into(out, images, mean, std):
    """out[:] = normalize(images, mean, std, float32), cast to out's dtype; the same numbers.

    Equal to `out.copy_(normalize(...))` without its whole-batch float temporaries: an fp32 `out`
    is converted, shifted and scaled in place; other dtypes go through a cache-sized fp32 scratch,
    chunk by chunk (few chunks: every op is a parallel region, and a busy CPU makes each one wait).
    """
    if images.dtype != torch.uint8:
        return out.copy_(images)
    n, h, w, c = images.shape
    m = torch.as_tensor(mean, dtype=torch.float32, device=images.device)
    s = torch.as_tensor(std, dtype=torch.float32, device=images.device)
    if out.permute(0, 2, 3, 1).is_contiguous():  # channels_last: rows of W C values, like the input
        src, dst = images.reshape(n, h, w * c), out.permute(0, 2, 3, 1).view(n, h, w * c)
        m, s = m.repeat(w), s.repeat(w)  # a contiguous last dim keeps sub_/div_ vectorized
    else:
        src, dst = images.permute(0, 3, 1, 2), out
        m, s = m.view(c, 1, 1), s.view(c, 1, 1)
    if out.dtype == torch.float32:
        step, scratch = max(n, 1), None  # in place
    else:
        step = n if images.is_cuda else CHUNK_BYTES // max(1, 4 * c * h * w)
        step = max(1, min(n, step))
        scratch = torch.empty((step,) + tuple(dst.shape[1:]), dtype=torch.float32, device=out.device)
    for i in range(0, n, step):
        d = dst[i:i + step]
        t = d if scratch is None else scratch[:d.shape[0]]
        # read N H W C bytes ; write, then twice read+write, N C H W floats
        t.copy_(src[i:i + step]).sub_(m).div_(s)
        if t is not d:
            d.copy_(t)  # one rounding to out's dtype, as the spec's copy_
    return out


def resolve_out(images, out, out_dtype, shape):
    """The output buffer: `out` (checked; its dtype wins), else a new NCHW one of out_dtype
    (default float32 for uint8 images, else the images' dtype)."""
    if out is not None:
        if tuple(out.shape) != tuple(shape):
            raise ValueError(f"out: expected shape {tuple(shape)}, got {tuple(out.shape)}")
        if not out.is_floating_point():
            raise ValueError(f"out: expected a floating point buffer, got {out.dtype}")
        return out
    if out_dtype is None:
        out_dtype = torch.float32 if images.dtype == torch.uint8 else images.dtype
    return torch.empty(shape, dtype=out_dtype, device=images.device)


def recursive_mix_ref(images, history, targets, history_targets, boxes, *, mode="nearest",
                      num_classes=None, mean=None, std=None, out=None, out_dtype=None, check_values=True):
    """Torch reference of `kernels.recursive_mix`; returns (mixed_images, mixed_targets, lam).

    Args:
        images: uint8 (N, H, W, C) with mean/std, or float (N, C, H, W).
        history: float (M >= N, C, h, w), the previous *mixed* batch, or None (no paste).
        targets: int (N,) with num_classes, or float (N, K).
        history_targets: float (M, K), the previous mixed soft targets.
        boxes: int (N, 4) pixel boxes (x1, y1, x2, y2) into which history[i] is resized.
        out: optional (N, C, H, W) buffer (any dtype and memory format) to write into.
        check_values: check the values of CPU targets, history_targets and std (see check_inputs).
    """
    n, c, h, w, k, _ = check_inputs(images, history, targets, history_targets, boxes, mode,
                                    num_classes, mean, std, check_values)
    out = resolve_out(images, out, out_dtype, (n, c, h, w))
    normalize_into(out, images, mean, std)
    soft = soft_targets(targets, k)
    if history is None:
        return out, soft, torch.ones(n, dtype=torch.float32, device=images.device)

    lam = mix_lam(boxes, h, w).to(device=images.device)
    soft = lam[:, None].float() * soft + (1 - lam[:, None].float()) * history_targets[:n].float()
    # note: this is a CPU-GPU sync point (box sizes decide the interpolate shapes)
    bx = boxes.to(torch.int64).cpu().tolist()
    groups = {}
    check_box_values(bx, h, w)
    for i, (x1, y1, x2, y2) in enumerate(bx):
        if x2 > x1 and y2 > y1:
            groups.setdefault((y2 - y1, x2 - x1), []).append(i)
    interp = dict(mode="nearest") if mode == "nearest" else dict(mode="bilinear", align_corners=True)
    for size, idx in groups.items():
        # one interpolate per distinct box size: read len(idx) h w C ; write the boxes
        src = history[:n] if len(idx) == n else history[idx]
        if mode == "bilinear":  # nearest only copies values: no need for a float copy of the history
            src = src.float()
        pasted = F.interpolate(src, size=size, **interp)
        if len(idx) == n and len({tuple(bx[i]) for i in idx}) == 1:  # one box for the batch: one copy
            x1, y1, x2, y2 = bx[0]
            out[:, :, y1:y2, x1:x2] = pasted
            continue
        for j, i in enumerate(idx):
            x1, y1, x2, y2 = bx[i]
            out[i, :, y1:y2, x1:x2] = pasted[j]
    return out, soft.float(), lam.float()
