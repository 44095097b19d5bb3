"""The fused RecursiveMix op: properties of the torch reference, and the Triton kernel against it.

Without CUDA the Triton kernel runs through the Triton interpreter on small, irregular shapes (the
variable must be set before triton is first imported; kernels/mix_triton imports it lazily).
"""
import os
import re

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import rmix.kernels.mix_ref as mix_ref  # noqa: E402
from rmix.kernels import recursive_mix  # noqa: E402
from rmix.kernels.mix_ref import normalize, recursive_mix_ref  # noqa: E402

try:
    import triton  # noqa: F401

    from rmix.kernels import mix_triton
    from rmix.kernels.mix_triton import recursive_mix_triton
except ImportError:  # the package works without triton; only these tests need it
    mix_triton = None

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRET else "cpu"
MEAN = (123.675, 116.28, 103.53)
STD = (58.395, 57.12, 57.375)
needs_triton = pytest.mark.skipif(mix_triton is None, reason="triton is not installed")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def box_kinds(h, w):
    """Boxes touching every border, the full image, 1 pixel, empty ones; (x1, y1, x2, y2)."""
    return [
        (0, 0, w, h),                          # full image
        (0, 0, (w + 1) // 2, (h + 1) // 2),    # top-left corner
        (w // 2, h // 2, w, h),                # bottom-right corner
        (0, h // 3, 1, h),                     # left edge, 1 pixel wide
        (w // 3, 0, w, 1),                     # top edge, 1 pixel tall
        (w - 1, h - 1, w, h),                  # last pixel
        (w // 2, 0, w // 2, h),                # zero width
        (0, h // 2, w, h // 2),                # zero height
        (min(2, w), min(1, h), w - 1, h),      # interior (empty when the image is tiny)
    ]


def make_inputs(n, h, w, *, m=None, hist_hw=None, k=7, c=3, seed=0, uint8=True, boxes=None,
                hist_dtype=torch.float32, index_targets=True, device=DEVICE):
    """A batch, a history of M >= N images of another size, and per-sample boxes."""
    g = torch.Generator().manual_seed(seed)
    m = n + 2 if m is None else m
    hh, hw = hist_hw or (h + 3, w * 2 - 1)
    if uint8:
        images = torch.randint(0, 256, (n, h, w, c), dtype=torch.uint8, generator=g)
    else:
        images = torch.randn(n, c, h, w, generator=g)
    history = torch.randn(m, c, hh, hw, generator=g).to(hist_dtype)
    if index_targets:
        targets = torch.randint(0, k, (n,), generator=g)
    else:
        targets = torch.softmax(torch.randn(n, k, generator=g), dim=1)
    history_targets = torch.softmax(torch.randn(m, k, generator=g), dim=1)
    if boxes is None:
        kinds = box_kinds(h, w)
        boxes = [kinds[(i + seed) % len(kinds)] for i in range(n)]
    boxes = torch.tensor(boxes, dtype=torch.int64)
    to = lambda t: t.to(device)  # noqa: E731
    return dict(images=to(images), history=to(history), targets=to(targets),
                history_targets=to(history_targets), boxes=to(boxes), num_classes=k,
                mean=MEAN if uint8 else None, std=STD if uint8 else None)


def call(fn, inputs, **kw):
    args = {**inputs, **kw}
    return fn(args.pop("images"), args.pop("history"), args.pop("targets"),
              args.pop("history_targets"), args.pop("boxes"), **args)


def empty_out(n, c, h, w, dtype, channels_last, device=DEVICE):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty((n, c, h, w), dtype=dtype, device=device, memory_format=fmt).fill_(float("nan"))


def assert_same(got, want, mode, dtype=torch.float32):
    """Images: nearest exact, bilinear 1e-5 (fp32) or to the output dtype's precision."""
    images, soft, lam = got
    images_ref, soft_ref, lam_ref = want
    # The interpreter casts fp32 -> bf16 by truncation (a GPU and torch round to nearest even)
    exact = mode == "nearest" and not (dtype == torch.bfloat16 and INTERPRET)
    if exact:
        tol = dict(rtol=0, atol=0)
    elif dtype == torch.float32:
        tol = dict(rtol=1e-5, atol=1e-5)
    else:
        tol = {}  # assert_close's bf16/fp16 defaults: about one rounding of the output
    assert images.dtype == images_ref.dtype == dtype
    torch.testing.assert_close(images, images_ref, **tol)
    torch.testing.assert_close(soft, soft_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(lam, lam_ref, rtol=1e-6, atol=1e-6)
    assert soft.dtype == lam.dtype == torch.float32


# ---------------------------------------------------------------- the reference (the spec)

@pytest.mark.parametrize("mode", ["nearest", "bilinear"])
def test_ref_labels(mode):
    inputs = make_inputs(5, 7, 9, device="cpu")
    _, soft, lam = call(recursive_mix_ref, inputs, mode=mode)
    torch.testing.assert_close(soft.sum(1), torch.ones(5), rtol=0, atol=1e-6)
    b = inputs["boxes"]
    area = ((b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)).float()
    torch.testing.assert_close(lam, 1 - area / (7 * 9), rtol=0, atol=1e-6)
    one_hot = F.one_hot(inputs["targets"], 7).float()
    want = lam[:, None] * one_hot + (1 - lam[:, None]) * inputs["history_targets"][:5]
    torch.testing.assert_close(soft, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mode", ["nearest", "bilinear"])
def test_ref_pastes_the_resized_history_into_each_box(mode):
    inputs = make_inputs(9, 13, 5, device="cpu")  # one sample per kind of box
    out, _, _ = call(recursive_mix_ref, inputs, mode=mode)
    plain = normalize(inputs["images"], MEAN, STD, torch.float32)
    interp = dict(mode="nearest") if mode == "nearest" else dict(mode="bilinear", align_corners=True)
    for i, (x1, y1, x2, y2) in enumerate(inputs["boxes"].tolist()):
        want = plain[i].clone()
        if x2 > x1 and y2 > y1:
            want[:, y1:y2, x1:x2] = F.interpolate(inputs["history"][i:i + 1], size=(y2 - y1, x2 - x1),
                                                  **interp)[0]
        torch.testing.assert_close(out[i], want, rtol=0, atol=0)


def test_ref_empty_boxes_paste_nothing():
    inputs = make_inputs(2, 7, 9, boxes=[(3, 2, 3, 6), (1, 4, 8, 4)], device="cpu")
    out, soft, lam = call(recursive_mix_ref, inputs)
    torch.testing.assert_close(out, normalize(inputs["images"], MEAN, STD, torch.float32), rtol=0, atol=0)
    torch.testing.assert_close(lam, torch.ones(2), rtol=0, atol=0)
    torch.testing.assert_close(soft, F.one_hot(inputs["targets"], 7).float(), rtol=0, atol=0)


@pytest.mark.parametrize("uint8", [True, False])
def test_ref_without_history_is_plain_normalization(uint8):
    inputs = make_inputs(3, 7, 9, uint8=uint8, device="cpu")
    out, soft, lam = recursive_mix_ref(inputs["images"], None, inputs["targets"], None, None,
                                       num_classes=7, mean=inputs["mean"], std=inputs["std"])
    want = normalize(inputs["images"], MEAN, STD, torch.float32)
    if uint8:  # spelled out once more, as the paper's loader does it
        m, s = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
        torch.testing.assert_close(want, (inputs["images"].permute(0, 3, 1, 2).float() - m) / s)
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    torch.testing.assert_close(soft, F.one_hot(inputs["targets"], 7).float(), rtol=0, atol=0)
    torch.testing.assert_close(lam, torch.ones(3), rtol=0, atol=0)


def test_ref_does_not_modify_its_inputs():
    inputs = make_inputs(3, 7, 9, device="cpu")
    before = {k: v.clone() for k, v in inputs.items() if isinstance(v, torch.Tensor)}
    call(recursive_mix_ref, inputs, mode="bilinear")
    for k, v in before.items():
        assert torch.equal(inputs[k], v), k


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_ref_writes_out_and_returns_it(dtype, channels_last, monkeypatch):
    monkeypatch.setattr(mix_ref, "CHUNK_BYTES", 2 * 3 * 7 * 9 * 4)  # chunks of 2 samples: 2, 2, 1
    inputs = make_inputs(5, 7, 9, device="cpu")
    out = empty_out(5, 3, 7, 9, dtype, channels_last, device="cpu")
    got, _, _ = call(recursive_mix_ref, inputs, out=out, out_dtype=torch.float64)  # out's dtype wins
    assert got is out and got.is_contiguous(memory_format=torch.channels_last) == channels_last
    fresh, _, _ = call(recursive_mix_ref, inputs)  # fp32, then one rounding to dtype
    torch.testing.assert_close(out, fresh.to(dtype), rtol=0, atol=0)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("chunk", [1, 3 * 7 * 9 * 4 * 2, 1 << 30])
def test_normalize_into_is_normalize(channels_last, chunk, monkeypatch):
    monkeypatch.setattr(mix_ref, "CHUNK_BYTES", chunk)
    images = make_inputs(5, 7, 9, device="cpu")["images"]
    for dtype in (torch.float32, torch.bfloat16):
        out = empty_out(5, 3, 7, 9, dtype, channels_last, device="cpu")
        mix_ref.normalize_into(out, images, MEAN, STD)
        torch.testing.assert_close(out, normalize(images, MEAN, STD, torch.float32).to(dtype), rtol=0, atol=0)


def test_out_dtype_defaults():
    u8 = make_inputs(1, 3, 4, device="cpu")
    assert call(recursive_mix_ref, u8)[0].dtype == torch.float32
    assert call(recursive_mix_ref, u8, out_dtype=torch.bfloat16)[0].dtype == torch.bfloat16
    f16 = make_inputs(1, 3, 4, uint8=False, device="cpu")
    f16["images"] = f16["images"].half()
    assert call(recursive_mix_ref, f16)[0].dtype == torch.float16


BAD = [  # (argument replaced, value, message fragment)
    ("images", torch.zeros(2, 7, 9, dtype=torch.uint8), "images"),
    ("images", torch.zeros(2, 7, 9, 3, dtype=torch.int32), "images"),
    ("mean", (1.0, 2.0), "mean"),
    ("std", None, "std"),
    ("mode", "bicubic", "mode"),
    ("targets", torch.zeros(3, dtype=torch.int64), "targets"),
    ("targets", torch.zeros(2), "targets"),
    ("targets", torch.zeros(2, 7, 1), "targets"),
    ("history", torch.zeros(2, 4, 5, 5), "history"),
    ("history", torch.zeros(1, 3, 5, 5), "history"),
    ("history_targets", torch.zeros(4, 6), "history_targets"),
    ("history_targets", None, "history_targets"),
    ("boxes", torch.zeros(2, 5, dtype=torch.int64), "boxes"),
    ("boxes", None, "boxes"),
    ("out", torch.zeros(2, 3, 9, 7), "out"),
    ("out", torch.zeros(2, 3, 7, 9, dtype=torch.uint8), "out"),
]


def _bad_call(fn, arg, value):
    inputs = {**make_inputs(2, 7, 9, device="cpu"), "mode": "nearest"}
    inputs[arg] = value
    return call(fn, inputs)


@pytest.mark.parametrize("arg,value,match", BAD, ids=[f"{a}-{i}" for i, (a, _, _) in enumerate(BAD)])
def test_errors_name_the_argument(arg, value, match):
    with pytest.raises(ValueError, match=match):
        _bad_call(recursive_mix_ref, arg, value)


def test_ref_rejects_boxes_outside_the_image():
    with pytest.raises(ValueError, match=r"boxes\[1\]"):
        call(recursive_mix_ref, make_inputs(2, 7, 9, boxes=[(0, 0, 9, 7), (0, 0, 10, 7)], device="cpu"))


def test_dispatch():
    inputs = make_inputs(2, 7, 9, device="cpu")
    with pytest.raises(ValueError, match="backend"):
        call(recursive_mix, inputs, backend="cuda")
    for got, want in zip(call(recursive_mix, inputs), call(recursive_mix_ref, inputs)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)  # CPU tensors: the reference


# ---------------------------------------------------------------- Triton against the reference

SHAPES = [  # (n, h, w, history (h, w))
    (1, 7, 9, (4, 11)),
    (3, 13, 5, (13, 5)),
    (5, 6, 10, (17, 3)),
]


@needs_triton
@pytest.mark.parametrize("mode", ["nearest", "bilinear"])
@pytest.mark.parametrize("n,h,w,hist_hw", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_triton_matches_ref(mode, n, h, w, hist_hw, dtype, channels_last):
    inputs = make_inputs(n, h, w, hist_hw=hist_hw, seed=n)
    got = call(recursive_mix_triton, inputs, mode=mode, out=empty_out(n, 3, h, w, dtype, channels_last))
    want = call(recursive_mix_ref, inputs, mode=mode, out=empty_out(n, 3, h, w, dtype, channels_last))
    assert got[0].is_contiguous(memory_format=torch.channels_last) == channels_last
    assert_same(got, want, mode, dtype)


@needs_triton
@pytest.mark.parametrize("mode", ["nearest", "bilinear"])
@pytest.mark.parametrize("hist_hw", [(3, 4), (26, 19)])  # smaller and bigger than the images
def test_triton_every_kind_of_box(mode, hist_hw):
    inputs = make_inputs(9, 11, 8, m=12, hist_hw=hist_hw)  # per-sample boxes, one of each kind
    assert_same(call(recursive_mix_triton, inputs, mode=mode), call(recursive_mix_ref, inputs, mode=mode), mode)


@needs_triton
@pytest.mark.parametrize("mode", ["nearest", "bilinear"])
def test_triton_tiny_images(mode):
    for boxes in ([(0, 0, 1, 1)], [(0, 0, 0, 1)]):
        inputs = make_inputs(1, 1, 1, hist_hw=(3, 2), boxes=boxes)
        assert_same(call(recursive_mix_triton, inputs, mode=mode), call(recursive_mix_ref, inputs, mode=mode), mode)


@needs_triton
def test_triton_ragged_tiles_and_class_blocks(monkeypatch):
    monkeypatch.setattr(mix_triton, "BLOCK_P", 16)  # 13 x 5 = 65 pixels: 5 tiles, the last 1 pixel
    monkeypatch.setattr(mix_triton, "BLOCK_K", 16)  # 37 classes: 3 steps, the last masked
    for mode in ("nearest", "bilinear"):
        inputs = make_inputs(3, 13, 5, k=37, seed=4)
        assert_same(call(recursive_mix_triton, inputs, mode=mode), call(recursive_mix_ref, inputs, mode=mode), mode)


@needs_triton
@pytest.mark.parametrize("hist_dtype", [torch.float32, torch.bfloat16])
def test_triton_float_input_and_soft_targets(hist_dtype):
    inputs = make_inputs(3, 7, 9, uint8=False, index_targets=False, hist_dtype=hist_dtype, seed=2)
    for mode in ("nearest", "bilinear"):
        assert_same(call(recursive_mix_triton, inputs, mode=mode), call(recursive_mix_ref, inputs, mode=mode), mode)
    inputs["images"] = inputs["images"].to(torch.bfloat16)  # out defaults to the input's dtype
    assert_same(call(recursive_mix_triton, inputs), call(recursive_mix_ref, inputs), "nearest", torch.bfloat16)


@needs_triton
@pytest.mark.parametrize("uint8", [True, False])
@pytest.mark.parametrize("index_targets", [True, False])
def test_triton_without_history(uint8, index_targets):
    inputs = make_inputs(3, 5, 7, uint8=uint8, index_targets=index_targets)
    inputs.update(history=None, history_targets=None, boxes=None)
    assert_same(call(recursive_mix_triton, inputs), call(recursive_mix_ref, inputs), "nearest")


@needs_triton
def test_triton_strided_inputs():
    """Inputs that are views: NHWC bytes cropped out of a bigger batch, a channels_last history."""
    inputs = make_inputs(3, 9, 12, hist_hw=(9, 12), seed=5)
    inputs["images"] = inputs["images"][:, 1:8, 2:11]
    inputs["history"] = inputs["history"].contiguous(memory_format=torch.channels_last)
    inputs["boxes"] = torch.tensor([(0, 0, 9, 7), (1, 2, 6, 7), (8, 6, 9, 7)], device=DEVICE)
    for mode in ("nearest", "bilinear"):
        assert_same(call(recursive_mix_triton, inputs, mode=mode), call(recursive_mix_ref, inputs, mode=mode), mode)
        outs = [empty_out(3, 3, 9, 12, torch.float32, False)[:, :, 1:8, 2:11] for _ in range(2)]  # views
        got = call(recursive_mix_triton, inputs, mode=mode, out=outs[0])
        assert_same(got, call(recursive_mix_ref, inputs, mode=mode, out=outs[1]), mode)
        assert got[0] is outs[0]


@needs_triton
def test_triton_writes_out_and_does_not_touch_inputs():
    inputs = make_inputs(3, 7, 9)
    before = {k: v.clone() for k, v in inputs.items() if isinstance(v, torch.Tensor)}
    out = empty_out(3, 3, 7, 9, torch.bfloat16, True)
    assert call(recursive_mix_triton, inputs, out=out)[0] is out
    for k, v in before.items():
        assert torch.equal(inputs[k], v), k


@needs_triton
@pytest.mark.parametrize("arg,value,match", BAD, ids=[f"{a}-{i}" for i, (a, _, _) in enumerate(BAD)])
def test_triton_errors_name_the_argument(arg, value, match):
    with pytest.raises(ValueError, match=match):
        _bad_call(recursive_mix_triton, arg, value)


# ---------------------------------------------------------------- full size, on a GPU

@needs_cuda
@needs_triton
@pytest.mark.needs_cuda
@pytest.mark.parametrize("mode", ["nearest", "bilinear"])
@pytest.mark.parametrize("dtype,channels_last", [(torch.float32, False), (torch.bfloat16, True),
                                                 (torch.float16, False)])
def test_triton_full_size_on_cuda(mode, dtype, channels_last):
    n, h, w = 256, 224, 224
    g = torch.Generator().manual_seed(0)
    r = (torch.rand(n, generator=g) * 0.5).sqrt()
    cx, cy = torch.randint(0, w, (n,), generator=g), torch.randint(0, h, (n,), generator=g)
    cw, ch = (w * r).long(), (h * r).long()
    boxes = torch.stack([(cx - cw // 2).clamp(0, w), (cy - ch // 2).clamp(0, h),
                         (cx + cw // 2).clamp(0, w), (cy + ch // 2).clamp(0, h)], 1)
    boxes[:4] = torch.tensor(box_kinds(h, w)[:4])
    inputs = make_inputs(n, h, w, m=n + 3, hist_hw=(h, w), k=1000, boxes=boxes.tolist(),
                         hist_dtype=dtype, device="cuda")
    want = call(recursive_mix_ref, inputs, mode=mode, out=empty_out(n, 3, h, w, dtype, channels_last, "cuda"))
    out = empty_out(n, 3, h, w, dtype, channels_last, "cuda")
    call(recursive_mix_triton, inputs, mode=mode, out=out)  # compile, cache mean/std on the device
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # the Triton path must not sync with the host
    try:
        got = call(recursive_mix_triton, inputs, mode=mode, out=out)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert_same(got, want, mode, dtype)


@needs_triton
def test_bench_mix_times_the_prepared_kernel_alone_beside_the_whole_call():
    # the Triton backend's kernel-alone path (prepared launch arguments), here through the interpreter
    from rmix.bench.mix import bench_mix, format_bench
    d = bench_mix(batch=2, size=16, device=DEVICE, reps=2, backend="triton")
    assert d["backend"] == "triton" and d["kernel_ms"] > 0 and d["host_us"] > 0 and d["fused_ms"] > 0
    assert d["kernel_timing"] == ("cuda graph" if DEVICE == "cuda" else "perf_counter")
    assert "the kernel alone" in format_bench(d) and "issues a call in" in format_bench(d)


def test_bench_mix_refuses_sizes_where_every_box_is_empty():
    from rmix.bench.mix import bench_mix
    for size in (1, 2):
        with pytest.raises(ValueError, match="--size: the paper's boxes in"):
            bench_mix(batch=1, size=size, reps=1)
    assert bench_mix(batch=1, size=4, reps=1)["box_fraction"] > 0


@pytest.mark.parametrize("name,props,want", [
    ("NVIDIA H100 PCIe", None, (2000.0, "table")), ("NVIDIA H100 80GB HBM3", None, (3350.0, "table")),
    ("NVIDIA H100 NVL", None, (3900.0, "table")), ("NVIDIA H200", None, (4800.0, "table")),
    ("NVIDIA A100 80GB PCIe", None, (1935.0, "table")), ("NVIDIA A100-SXM4-80GB", None, (2039.0, "table")),
    ("Some GPU", None, (None, None)),
    # H100 SXM's own report: 2619 MHz HBM3 on a 5120-bit bus
    ("NVIDIA H100 80GB HBM3", type("P", (), {"memory_clock_rate": 2_619_000, "memory_bus_width": 5120}),
     (pytest.approx(3352.3, abs=0.1), "device"))])
def test_the_memory_peak_comes_from_the_device_else_from_its_name(name, props, want):
    from rmix.bench.mix import peak_gbps
    assert peak_gbps(name, props) == want


@needs_triton
def test_doctors_kernel_check_passes_and_sees_a_wrong_kernel(monkeypatch):
    # `rmix doctor`'s comparison on the GPU, run here through the interpreter at a small size
    from rmix import doctor
    status, detail = doctor.kernel_check(torch.device(DEVICE), n=3, h=9, w=7, k=13, interpreted=INTERPRET)
    assert status == "ok" and "24 variants" in detail, detail
    real = mix_triton.recursive_mix_triton

    def off_by_one(*a, **kw):  # a kernel that gets the labels slightly wrong
        out, soft, lam = real(*a, **kw)
        return out, soft, lam + 1e-3
    monkeypatch.setattr(mix_triton, "recursive_mix_triton", off_by_one)
    status, detail = doctor.kernel_check(torch.device(DEVICE), n=3, h=9, w=7, k=13, interpreted=INTERPRET)
    assert status == "failed" and "lam differ" in detail, detail


# --- what the mutation run found untested in kernels/mix_ref.py ---

def test_index_targets_take_their_class_count_from_the_history_or_ask_for_it():
    inputs = make_inputs(3, 7, 9, k=6)
    got, soft, _ = recursive_mix_ref(inputs["images"], inputs["history"], inputs["targets"], inputs["history_targets"],
                                     inputs["boxes"], mean=MEAN, std=STD)  # no num_classes: K from the history
    assert soft.shape == (3, 6)
    with pytest.raises(ValueError, match="class indices need num_classes"):
        recursive_mix_ref(inputs["images"], None, inputs["targets"], None, None, mean=MEAN, std=STD)
    with pytest.raises(ValueError, match="targets: expected 3 rows, got 2"):
        recursive_mix_ref(inputs["images"], None, inputs["targets"][:2], None, None, num_classes=6, mean=MEAN, std=STD)
    with pytest.raises(ValueError, match="targets: expected 3 rows, got 2"):  # probabilities (2, 6)
        recursive_mix_ref(inputs["images"], None, torch.full((2, 6), 1 / 6), None, None, mean=MEAN, std=STD)


def test_a_small_positive_std_is_taken_and_a_box_left_of_the_image_refused():
    inputs = make_inputs(2, 7, 9, k=4)
    out, _, _ = recursive_mix_ref(inputs["images"], None, inputs["targets"], None, None, num_classes=4,
                                  mean=(0.0,) * 3, std=(0.5,) * 3)
    torch.testing.assert_close(out, inputs["images"].permute(0, 3, 1, 2).float() / 0.5)
    for box in ([-1, 0, 4, 4], [0, -1, 4, 4], [0, 0, 10, 4], [0, 0, 4, 8]):
        boxes = torch.tensor([box, [0, 0, 2, 2]])
        with pytest.raises(ValueError, match="lies outside the 9x7 image"):
            recursive_mix_ref(inputs["images"], inputs["history"], inputs["targets"], inputs["history_targets"],
                              boxes, num_classes=4, mean=MEAN, std=STD)


def test_an_inverted_box_is_empty():
    from rmix.kernels.mix_ref import box_area
    assert box_area(torch.tensor([[5, 1, 3, 6], [1, 5, 4, 2], [2, 2, 2, 9], [1, 1, 4, 3]])).tolist() == [0, 0, 0, 6]


@pytest.mark.parametrize("boxes", [[[1, 2, 6, 9], [0, 0, 10, 12], [4, 3, 9, 5]],   # sizes differ
                                   [[0, 0, 4, 4], [2, 3, 6, 7], [5, 1, 9, 5]]])   # one size, three places
@pytest.mark.parametrize("mode", ["nearest", "bilinear"])
def test_one_box_per_image_is_pasted_image_by_image_as_the_papers_steps(mode, boxes):
    # every box non-empty and its own: each image gets its own history resized into its own box
    inputs = make_inputs(3, 12, 10, k=5, hist_hw=(12, 10), boxes=boxes)
    out, _, _ = recursive_mix_ref(inputs["images"], inputs["history"], inputs["targets"], inputs["history_targets"],
                                  inputs["boxes"], mode=mode, num_classes=5, mean=MEAN, std=STD)
    interp = dict(mode="nearest") if mode == "nearest" else dict(mode="bilinear", align_corners=True)
    for i, (x1, y1, x2, y2) in enumerate(inputs["boxes"].tolist()):
        want = normalize(inputs["images"][i:i + 1], MEAN, STD, torch.float32)
        want[:, :, y1:y2, x1:x2] = F.interpolate(inputs["history"][i:i + 1].float(), size=(y2 - y1, x2 - x1), **interp)
        torch.testing.assert_close(out[i:i + 1], want)


def test_the_kernel_timer_falls_back_to_launches_where_a_graph_cannot_be_captured(monkeypatch):
    # CUDA mocked: the capture fails, and the timer then times back-to-back launches of the kernel
    import contextlib

    from rmix.bench import mix as bench

    class Fake:
        def __init__(self, *a, **kw):
            pass

        def wait_stream(self, other):
            pass

        def record(self, stream=None):
            pass

        def elapsed_time(self, other):
            return 2.0

    @contextlib.contextmanager
    def no_capture(graph):
        raise RuntimeError("operation not permitted when stream is capturing")
        yield

    monkeypatch.setattr(torch.cuda, "Stream", Fake)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Fake())
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", Fake)
    monkeypatch.setattr(torch.cuda, "graph", no_capture)
    monkeypatch.setattr(torch.cuda, "Event", Fake)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    calls = []
    timer, how = bench._kernel_timer(torch.device("cuda", 0), lambda: calls.append(1))
    assert how == "launches"
    calls.clear()
    assert timer() == 2.0 / bench.BACK_TO_BACK and len(calls) == bench.BACK_TO_BACK


# --- bad inputs the probe found the op accepted, or answered with torch's or Triton's own error ---

def _op_inputs():
    inputs = make_inputs(4, 16, 16, k=10, device="cpu")
    inputs["history_targets"] = inputs["history_targets"][:4]
    return inputs


@pytest.mark.parametrize("arg,value,message", [
    ("targets", -F.one_hot(torch.tensor([0, 1, 2, 3]), 10).float(), "^targets: probabilities .* got a minimum of -1"),
    ("targets", torch.tensor([0, 1, 2, 10]), re.escape("targets: class indices must be in [0, 10), got 10")),
    ("targets", torch.tensor([0, 1, 2, -1]), re.escape("targets: class indices must be in [0, 10), got -1")),
    ("targets", torch.ones(4, 10, dtype=torch.long), "^targets: probabilities .* must be floats"),
    ("history_targets", torch.randn(4, 10, generator=torch.Generator().manual_seed(0)),
     "^history_targets: probabilities .* rows summing to 1"),
    ("history_targets", torch.full((4, 10), 0.2), "^history_targets: .* row sums from 2 to 2"),
    ("std", torch.tensor([0.0, 1.0, 1.0]), "^std: must be positive"),
    ("std", torch.tensor([float("nan"), 1.0, 1.0]), "^std: must be positive")])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_the_op_checks_target_and_std_values_on_the_cpu_as_the_policies_do(arg, value, message, backend):
    # -onehot targets gave label rows summing to -0.5, randn history targets rows summing to 1.42, 0.04...,
    # std 0 as a tensor non-finite images, index 10 or -1 torch's "Class values must be smaller than num_classes"
    if backend == "triton" and (mix_triton is None or not INTERPRET):  # values are read on CPU tensors only
        pytest.skip("the Triton backend on CPU tensors needs triton and its interpreter")
    inputs = {**_op_inputs(), "mean": torch.tensor(MEAN), arg: value}
    with pytest.raises(ValueError, match=message):
        call(recursive_mix, inputs, backend=backend)
    if arg == "targets":  # the same without a history
        inputs.update(history=None, history_targets=None, boxes=None)
        with pytest.raises(ValueError, match=message):
            call(recursive_mix, inputs, backend=backend)


def test_the_op_reads_no_values_with_check_values_off():
    # the policies' call: their targets and std are checked already, and a read per step would be a
    # host read in the trainer's step (tests/test_sync.py); dtypes and shapes are still checked
    from rmix.syncs import SyncCounter
    inputs = _op_inputs()
    inputs.update(targets=F.one_hot(inputs["targets"], 10).float(), std=torch.tensor(STD))  # as a policy passes
    with SyncCounter() as counter:
        call(recursive_mix, inputs, backend="torch", check_values=False)
    assert counter.reads == []
    with SyncCounter() as counter:
        call(recursive_mix, inputs, backend="torch")
    assert {where.split()[-1] for _, where in counter.reads} == {"check_labels", "_positive"}  # on: values read
    with pytest.raises(ValueError, match="^targets: probabilities"):
        call(recursive_mix, {**inputs, "targets": torch.ones(4, 10, dtype=torch.long)}, check_values=False)


@needs_triton
def test_the_triton_backend_on_cpu_tensors_outside_the_interpreter_says_what_it_needs(monkeypatch):
    # was Triton's "RuntimeError: 0 active drivers ([]). There should only be one."
    assert mix_triton.INTERPRETED == INTERPRET  # the interpreter is seen where the tests run under it
    monkeypatch.setattr(mix_triton, "INTERPRETED", False)
    with pytest.raises(ValueError, match="^backend: 'triton' needs CUDA tensors, got cpu ones .*TRITON_INTERPRET=1"):
        call(recursive_mix, _op_inputs(), backend="triton")
