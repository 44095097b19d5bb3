"""Every launch of the fused Triton kernel compiles for Hopper (sm_90) and Ampere (sm_80), without spills.

No GPU is needed: `kernels.mix_triton.launch_args` builds the exact arguments of each launch the
trainer can make (on CPU tensors), Triton specializes and compiles them for the target, and its
bundled ptxas reports registers and spills (kernels/aot.py). The interpreter tests
(tests/test_kernels.py) check the arithmetic; these check that it lowers.
"""
import itertools

import pytest
import torch

triton = pytest.importorskip("triton")

from rmix.kernels import mix_triton  # noqa: E402
from rmix.kernels.aot import compile_launch, parse_ptxas  # noqa: E402

MEAN, STD = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)
OUT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# ptxas may cap a small kernel at 32 registers, the count at which 2048 threads fit on an SM
# (65536 / 2048, sm_80 and sm_90), and spill a word or two to get there: a trade it makes for full
# occupancy, the spilled word staying in L1. Only that is accepted; any other spill fails.
OCCUPANCY_REGISTERS, OCCUPANCY_SPILL_BYTES = 32, 8
SIZES = {"imagenet": (224, 1000), "cifar": (32, 100), "mnist": (28, 10)}  # (side, classes)


def launch(*, uint8, out_dtype, channels_last, index_targets, mode, history, size="imagenet", n=2):
    """(args, constexprs) of the launch that these inputs make, as the trainer's policies call it."""
    side, k = SIZES[size]
    g = torch.Generator().manual_seed(0)
    if uint8:  # pipelines' batches: uint8 NHWC, normalized in the kernel
        images = torch.randint(0, 256, (n, side, side, 3), dtype=torch.uint8, generator=g)
    else:  # a user's float NCHW batch, already normalized
        images = torch.randn(n, 3, side, side, generator=g)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    out = torch.empty(n, 3, side, side, dtype=OUT_DTYPES[out_dtype]).to(memory_format=fmt)
    hist = torch.randn(n, 3, side, side).to(OUT_DTYPES[out_dtype]).to(memory_format=fmt) if history else None
    targets = torch.randint(0, k, (n,)) if index_targets else torch.softmax(torch.randn(n, k), 1)
    htgt = torch.softmax(torch.randn(n, k), 1) if history else None
    boxes = torch.tensor([[3, 5, side // 2, side - 1]] * n) if history else None
    *_, args, constexprs = mix_triton.launch_args(
        images, hist, targets, htgt, boxes, mode=mode, num_classes=k, mean=MEAN if uint8 else None,
        std=STD if uint8 else None, out=out)
    return args, constexprs


def variants(size="imagenet"):
    """Every distinct launch: input, output dtype, layout, targets, interpolation, history."""
    seen = {}
    for uint8, dt, cl, idx, mode, hist in itertools.product(
            (True, False), OUT_DTYPES, (False, True), (True, False), ("nearest", "bilinear"), (True, False)):
        args, constexprs = launch(uint8=uint8, out_dtype=dt, channels_last=cl, index_targets=idx, mode=mode,
                                  history=hist, size=size)
        name = (f"{'u8' if uint8 else 'f32'}-in {dt}-out {'nhwc' if cl else 'nchw'} "
                f"{'index' if idx else 'soft'} {mode if hist else 'no-history'} {size}")
        key = (tuple(sorted(constexprs.items())),
               tuple(str(a.dtype) if isinstance(a, torch.Tensor) else (a == 1, a % 16 == 0) for a in args))
        seen.setdefault(key, (name, args, constexprs))  # the same specialization compiles once
    return list(seen.values())


def check(capability, size):
    failures, reports = [], []
    for name, args, constexprs in variants(size):
        try:
            r = compile_launch(mix_triton._recursive_mix_kernel, args, constexprs, capability=capability)
        except Exception as e:  # noqa: BLE001 - every variant is tried, all failures named
            failures.append(f"{name}: {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}")
            continue
        reports.append((name, r["registers"]))
        occupancy_trade = r["registers"] == OCCUPANCY_REGISTERS and r["spill_bytes"] <= OCCUPANCY_SPILL_BYTES
        if r["spill_bytes"] and not occupancy_trade:
            failures.append(f"{name}: {r['spill_bytes']} bytes spilled, {r['stack_bytes']} bytes of stack")
    return failures, reports


@pytest.mark.slow
@pytest.mark.parametrize("capability", [90, 80], ids=["sm_90", "sm_80"])
def test_every_launch_compiles_without_spills(capability):
    failures, reports = check(capability, "imagenet")
    assert not failures, "\n".join(failures)
    assert len(reports) == 72  # 2 inputs x 3 dtypes x 2 layouts x 2 target kinds x (2 modes + no history)


@pytest.mark.slow
@pytest.mark.parametrize("size", ["cifar", "mnist"])
def test_small_image_launches_compile_without_spills(size):
    failures, reports = check(90, size)
    assert not failures, "\n".join(failures)


@pytest.mark.slow
def test_a_planted_spill_is_caught():
    # the same kernel squeezed into 32 registers (ptxas must spill): what the tests above look for
    args, constexprs = launch(uint8=True, out_dtype="bf16", channels_last=True, index_targets=True,
                              mode="bilinear", history=True)
    r = compile_launch(mix_triton._recursive_mix_kernel, args, constexprs, capability=90, maxnreg=32)
    assert r["spill_bytes"] > OCCUPANCY_SPILL_BYTES and r["registers"] <= 32, r["log"]


def test_a_planted_compile_error_is_caught():
    @triton.jit
    def broken(x_ptr, BLOCK: triton.language.constexpr):
        offs = triton.language.arange(0, BLOCK)  # BLOCK = 3: not a power of 2, which Triton refuses
        triton.language.store(x_ptr + offs, offs)

    with pytest.raises(Exception, match="power of 2|arange"):
        compile_launch(broken, (torch.zeros(4, dtype=torch.int32),), {"BLOCK": 3}, capability=90)


def test_ptxas_log_parsing():
    log = ("ptxas info    : Function properties for k\n    8 bytes stack frame, 12 bytes spill stores, "
           "16 bytes spill loads\nptxas info    : Used 255 registers, used 1 barriers\n")
    assert {k: v for k, v in parse_ptxas(log).items() if k != "log"} == \
        {"registers": 255, "stack_bytes": 8, "spill_bytes": 28}
    with pytest.raises(ValueError, match="no register report"):
        parse_ptxas("ptxas fatal : bad input")
