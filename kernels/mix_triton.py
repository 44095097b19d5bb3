"""The fused RecursiveMix op as one Triton kernel launch; `kernels/mix_ref.py` is its spec.

Grid (N, cdiv(H W, BLOCK_P)): program (i, b) owns pixels [b BLOCK_P, (b + 1) BLOCK_P) of sample i,
all C channels. Each pixel is either pasted (inside boxes[i]: gathered from history[i], nearest or
bilinear) or its own (normalized from the uint8 input), cast and stored through the output's
strides, so NCHW and channels_last buffers both work. Programs (i, 0) also write soft[i, :] and
lam[i]. Boxes stay on the device: no host sync anywhere on this path.

Import this module only where Triton is installed (`kernels.recursive_mix` does so lazily).
"""
import torch
import triton
import triton.language as tl
from triton.runtime.jit import JITFunction

from rmix.kernels.mix_ref import check_inputs, resolve_out

# Pixels per program (times BLOCK_C channels), 8 values per thread at Triton's 4 warps. ptxas for sm_90
# (tests/test_triton_aot.py), u8 in, bf16 channels_last out: 1024 spilled every bilinear launch (255
# registers + 348 bytes); 256 needs 48 registers (nearest) and 94 (bilinear), no spill, so enough
# warps stay resident to keep HBM busy. Tests lower it further to get ragged tiles.
BLOCK_P = 256
BLOCK_K = 1024  # classes per step of a program's label loop


@triton.jit
def _recursive_mix_kernel(
    img_ptr, hist_ptr, out_ptr, tgt_ptr, htgt_ptr, soft_ptr, lam_ptr,
    box_ptr, scale_ptr, mean_ptr, std_ptr,
    C, H, W, HIN, WIN, K,
    s_in_n, s_in_c, s_in_y, s_in_x,      # images, in (n, c, y, x) order whatever the layout
    s_h_n, s_h_c, s_h_y, s_h_x,          # history
    s_o_n, s_o_c, s_o_y, s_o_x,          # out
    s_t_n, s_t_k, s_ht_n, s_ht_k,        # targets, history_targets
    HAS_HISTORY: tl.constexpr, NORMALIZE: tl.constexpr, BILINEAR: tl.constexpr,
    INDEX_TARGETS: tl.constexpr, IN_FLAT: tl.constexpr, OUT_FLAT: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
):
    n = tl.program_id(0)
    pblock = tl.program_id(1)
    n64 = n.to(tl.int64)  # sample offsets of a big batch overflow int32
    offs = pblock * BLOCK_P + tl.arange(0, BLOCK_P)
    chan = tl.arange(0, BLOCK_C)
    pmask = offs < H * W
    cmask = chan < C
    mask = pmask[:, None] & cmask[None, :]
    y = offs // W
    x = offs % W

    if HAS_HISTORY:
        bx1 = tl.load(box_ptr + n * 4 + 0)
        by1 = tl.load(box_ptr + n * 4 + 1)
        bx2 = tl.load(box_ptr + n * 4 + 2)
        by2 = tl.load(box_ptr + n * 4 + 3)
        inside = (x >= bx1) & (x < bx2) & (y >= by1) & (y < by2) & pmask  # empty box: never
    else:
        inside = offs < 0

    # own pixels: read only outside the box (masked lanes fetch nothing)
    # a FLAT plane has y stride = W x stride (NCHW, NHWC): offs * x stride, which the compiler
    # can see is contiguous and vectorize; otherwise (crops, views) y and x strides apart
    in_pix = offs * s_in_x if IN_FLAT else y * s_in_y + x * s_in_x
    src = img_ptr + n64 * s_in_n + chan[None, :] * s_in_c + in_pix[:, None]
    val = tl.load(src, mask=mask & ~inside[:, None], other=0).to(tl.float32)
    if NORMALIZE:
        m = tl.load(mean_ptr + chan, mask=cmask, other=0.0)
        s = tl.load(std_ptr + chan, mask=cmask, other=1.0)
        num, den = tl.broadcast(val - m[None, :], s[None, :])  # div_rn does not broadcast
        val = tl.math.div_rn(num, den)  # IEEE division, as torch's `/` (plain `/` may approximate)

    if HAS_HISTORY:
        # source coordinates in history[n]; per-sample fp32 scales come from torch (see _scales)
        scale_y = tl.load(scale_ptr + n * 2 + 0)
        scale_x = tl.load(scale_ptr + n * 2 + 1)
        dy = tl.where(inside, y - by1, 0).to(tl.float32)
        dx = tl.where(inside, x - bx1, 0).to(tl.float32)
        hmask = mask & inside[:, None]
        hist = hist_ptr + n64 * s_h_n + chan[None, :] * s_h_c
        if BILINEAR:
            fy = dy * scale_y  # align_corners=True: src = dst (in - 1) / (out - 1)
            fx = dx * scale_x
            y0 = tl.minimum(tl.floor(fy).to(tl.int32), HIN - 1)
            x0 = tl.minimum(tl.floor(fx).to(tl.int32), WIN - 1)
            y1 = tl.minimum(y0 + 1, HIN - 1)
            x1 = tl.minimum(x0 + 1, WIN - 1)
            ly = (fy - y0.to(tl.float32))[:, None]
            lx = (fx - x0.to(tl.float32))[:, None]
            v00 = tl.load(hist + (y0 * s_h_y + x0 * s_h_x)[:, None], mask=hmask, other=0).to(tl.float32)
            v01 = tl.load(hist + (y0 * s_h_y + x1 * s_h_x)[:, None], mask=hmask, other=0).to(tl.float32)
            v10 = tl.load(hist + (y1 * s_h_y + x0 * s_h_x)[:, None], mask=hmask, other=0).to(tl.float32)
            v11 = tl.load(hist + (y1 * s_h_y + x1 * s_h_x)[:, None], mask=hmask, other=0).to(tl.float32)
            pasted = (1 - ly) * ((1 - lx) * v00 + lx * v01) + ly * ((1 - lx) * v10 + lx * v11)
        else:
            # PyTorch's nearest: src = min(floor(dst * (float)in / out), in - 1), all fp32
            sy = tl.minimum(tl.floor(dy * scale_y).to(tl.int32), HIN - 1)
            sx = tl.minimum(tl.floor(dx * scale_x).to(tl.int32), WIN - 1)
            pasted = tl.load(hist + (sy * s_h_y + sx * s_h_x)[:, None], mask=hmask, other=0).to(tl.float32)
        val = tl.where(inside[:, None], pasted, val)

    out_pix = offs * s_o_x if OUT_FLAT else y * s_o_y + x * s_o_x
    dst = out_ptr + n64 * s_o_n + chan[None, :] * s_o_c + out_pix[:, None]
    tl.store(dst, val.to(out_ptr.dtype.element_ty), mask=mask)

    # labels: one program per sample writes lam[n] and soft[n, :]
    if pblock == 0:
        if HAS_HISTORY:
            area = tl.maximum(bx2 - bx1, 0) * tl.maximum(by2 - by1, 0)
            lam = (1.0 - area.to(tl.float64) / (H * W)).to(tl.float32)  # as the spec: fp64, then fp32
        else:
            lam = 1.0
        tl.store(lam_ptr + n, lam)
        tgt_row = tgt_ptr + n64 * s_t_n  # row pointers once, outside the loop
        htgt_row = htgt_ptr + n64 * s_ht_n
        soft_row = soft_ptr + n64 * K
        if INDEX_TARGETS:
            t = tl.load(tgt_row)
        # a while loop, not range(0, K, BLOCK_K): Triton 3.6's interpreter takes a runtime range bound
        # with int() of a 1-element array, which numpy 2.4 refuses (a constant trip count instead
        # unrolls, and spills one bilinear variant on sm_80)
        k0 = 0
        while k0 < K:
            ks = k0 + tl.arange(0, BLOCK_K)
            kmask = ks < K
            if INDEX_TARGETS:
                own = (ks == t).to(tl.float32)
            else:
                own = tl.load(tgt_row + ks * s_t_k, mask=kmask, other=0).to(tl.float32)
            if HAS_HISTORY:
                prev = tl.load(htgt_row + ks * s_ht_k, mask=kmask, other=0).to(tl.float32)
                own = lam * own + (1.0 - lam) * prev
            tl.store(soft_row + ks, own, mask=kmask)
            k0 += BLOCK_K


# Under TRITON_INTERPRET=1 (set before triton is first imported) @triton.jit makes an interpreted
# function, which runs on CPU tensors; a compiled kernel needs CUDA ones.
INTERPRETED = not isinstance(_recursive_mix_kernel, JITFunction)


def bytes_moved(N, C, H, W, box_fraction, in_bytes, out_bytes, K):
    """Bytes the kernel must move: own pixels outside the box, history inside it, the output, labels.

    The history is the previous output, so its elements are `out_bytes` wide; nearest reads about one
    history element per pasted pixel (bilinear's 4 taps mostly hit cache). Labels: read targets
    (int64) and history_targets (fp32), write soft (fp32) and lam; boxes are negligible.
    """
    pixels = N * C * H * W
    image = pixels * ((1 - box_fraction) * in_bytes + box_fraction * out_bytes + out_bytes)
    labels = N * (8 + 4 * K + 4 * K + 4 + 16)
    return int(image + labels)


_CONSTS = {}


def _channel_consts(values, device):
    """mean/std as a cached fp32 device tensor (one H2D copy per distinct value, not per call)."""
    if isinstance(values, torch.Tensor):
        return values.to(device=device, dtype=torch.float32).contiguous()
    key = (tuple(float(v) for v in values), str(device))
    if key not in _CONSTS:
        _CONSTS[key] = torch.tensor(key[0], dtype=torch.float32, device=device)
    return _CONSTS[key]


def _scales(boxes, hin, win, mode):
    """Per-sample fp32 (scale_y, scale_x), (N, 2), computed by torch on the device.

    torch's division is IEEE; Triton's fp32 `/` on a GPU may not be, and nearest's indices must be
    bit-exact. Empty boxes get a harmless scale (their programs paste nothing).
    """
    bh = (boxes[:, 3] - boxes[:, 1]).to(torch.float32)
    bw = (boxes[:, 2] - boxes[:, 0]).to(torch.float32)
    # tensor / tensor: a true division (`int / tensor` would be reciprocal() * int, off by an ulp)
    size_in = torch.stack([torch.full_like(bh, hin), torch.full_like(bw, win)], dim=1)
    size_out = torch.stack([bh, bw], dim=1)
    if mode == "nearest":
        return torch.div(size_in, size_out.clamp(min=1))
    # bilinear, align_corners=True: (in - 1) / (out - 1), and 0 when the box is 1 pixel tall/wide
    scale = torch.div(size_in - 1, (size_out - 1).clamp(min=1))
    return torch.where(size_out > 1, scale, torch.zeros_like(scale))


def launch_args(images, history, targets, history_targets, boxes, *, mode="nearest", num_classes=None,
                mean=None, std=None, out=None, out_dtype=None, check_values=True):
    """What `recursive_mix_triton` launches, without launching: (out, soft, lam, grid, args, constexprs).

    `args` are the kernel's runtime arguments in order, `constexprs` its compile-time ones (BILINEAR
    only where something is pasted: one variant less to compile); the
    ahead-of-time compile test (tests/test_triton_aot.py) builds each variant from these, so it
    compiles exactly what this launcher can produce.
    """
    n, c, h, w, k, nhwc = check_inputs(images, history, targets, history_targets, boxes, mode,
                                       num_classes, mean, std, check_values)
    out = resolve_out(images, out, out_dtype, (n, c, h, w))
    device = images.device
    soft = torch.empty((n, k), dtype=torch.float32, device=device)
    lam = torch.empty((n,), dtype=torch.float32, device=device)
    in_strides = ((images.stride(0), images.stride(3), images.stride(1), images.stride(2)) if nhwc
                  else images.stride())
    if nhwc:
        mean_t, std_t = _channel_consts(mean, device), _channel_consts(std, device)
    else:
        mean_t = std_t = out  # never read: float input passes through
    if history is not None:
        boxes_d = boxes.to(device=device, dtype=torch.int32).contiguous()
        scale = _scales(boxes_d, history.shape[2], history.shape[3], mode)
        hin, win = history.shape[2], history.shape[3]
        h_strides, ht_strides = history.stride(), history_targets.stride()
        hist, htgt = history, history_targets
    else:
        boxes_d = scale = hist = htgt = out  # never read
        hin = win = 1
        h_strides, ht_strides = (0, 0, 0, 0), (0, 0)
    index_targets = targets.dim() == 1
    t_strides = (targets.stride(0), 0) if index_targets else targets.stride()

    block_p = max(16, min(BLOCK_P, triton.next_power_of_2(h * w)))
    block_k = max(16, min(BLOCK_K, triton.next_power_of_2(k)))
    grid = (n, max(1, triton.cdiv(h * w, block_p)))  # >= 1 block: it writes the labels
    args = (images, hist, out, targets, htgt, soft, lam, boxes_d, scale, mean_t, std_t,
            c, h, w, hin, win, k, *in_strides, *h_strides, *out.stride(), *t_strides, *ht_strides)
    constexprs = dict(
        HAS_HISTORY=history is not None, NORMALIZE=nhwc, BILINEAR=mode == "bilinear" and history is not None,
        INDEX_TARGETS=index_targets, IN_FLAT=in_strides[2] == w * in_strides[3],
        OUT_FLAT=out.stride(2) == w * out.stride(3),
        BLOCK_P=block_p, BLOCK_C=triton.next_power_of_2(c), BLOCK_K=block_k)
    return out, soft, lam, grid, args, constexprs


def recursive_mix_triton(images, history, targets, history_targets, boxes, *, mode="nearest",
                         num_classes=None, mean=None, std=None, out=None, out_dtype=None, check_values=True):
    """Triton version of `kernels.mix_ref.recursive_mix_ref`; same arguments, returns and errors.

    Unlike the reference, boxes are not checked against the image (that would sync): a box pixel
    outside the image is simply not written, and the resize still uses the whole box.
    CUDA tensors only, unless Triton's interpreter runs the kernel (TRITON_INTERPRET=1).
    """
    if not images.is_cuda and not INTERPRETED:
        raise ValueError(f"backend: 'triton' needs CUDA tensors, got {images.device.type} ones (use backend='torch', "
                         "or Triton's interpreter: TRITON_INTERPRET=1 set before triton is first imported)")
    out, soft, lam, grid, args, constexprs = launch_args(
        images, history, targets, history_targets, boxes, mode=mode, num_classes=num_classes,
        mean=mean, std=std, out=out, out_dtype=out_dtype, check_values=check_values)
    if images.shape[0] > 0:
        _recursive_mix_kernel[grid](*args, **constexprs)
    return out, soft, lam
