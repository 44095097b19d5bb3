"""Time the fused RecursiveMix op against the paper's unfused training-loop code, same inputs.

    from rmix.bench.mix import bench_mix, format_bench
    print(format_bench(bench_mix(batch=256, size=224)))

Both sides use the paper's single box per batch. The unfused side is what the official loop does
each step: the loader's normalize pass, `F.interpolate` of the kept history into the box, a slice
assignment, the label lerp, and `clone()` of the mixed batch to keep it as the next history. The
fused side writes into one of two alternating buffers, the other being its history: no clone.

Three figures of the fused op, because on a GPU they differ: `fused_ms`, a whole call (its argument
checks, the small torch ops that prepare boxes and scales, the launch) timed back to back on the
device, as training issues it; `host_us`, the host's time to issue one call; and, with the Triton
backend, `kernel_ms`, the kernel alone: its launch arguments prepared once and the launches
replayed from a CUDA graph, so the host's time is not in it. GB/s and the fraction of the memory's
peak come from `kernel_ms`.
"""
import math
import statistics
import time

import torch
import torch.nn.functional as F

from rmix.kernels import recursive_mix

MEAN = (123.675, 116.28, 103.53)  # ImageNet, pixel units
STD = (58.395, 57.12, 57.375)
NUM_CLASSES = 1000
# Memory bandwidth in GB/s by the device name (lowercase substrings, the most specific first), where
# the device does not report its memory clock: NVIDIA's data sheets, SXM and PCIe parts apart.
PEAK_GBPS = [("h200 nvl", 4800.0), ("h200", 4800.0), ("h100 nvl", 3900.0), ("h100 pcie", 2000.0),
             ("h100", 3350.0), ("a100-pcie-40gb", 1555.0), ("a100-sxm4-40gb", 1555.0), ("a100 80gb pcie", 1935.0),
             ("a100", 2039.0)]


def peak_gbps(device_name, props=None):
    """(peak memory bandwidth in GB/s, "device" | "table") of a device, or (None, None).

    From the device's own memory clock and bus width where torch reports them (double data rate:
    2 x clock x width), else from PEAK_GBPS by name.
    """
    clock_khz, bus_bits = getattr(props, "memory_clock_rate", 0), getattr(props, "memory_bus_width", 0)
    if clock_khz and bus_bits:
        return 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9, "device"
    name = device_name.lower()
    for key, gbps in PEAK_GBPS:
        if key in name:
            return gbps, "table"
    return None, None


def paper_box(h, w, alpha, generator):
    """One (x1, y1, x2, y2) for the whole batch, the paper's rule (see DESIGN.md)."""
    r = math.sqrt(torch.rand((), generator=generator, dtype=torch.float64).item() * alpha)
    cut_w, cut_h = int(w * r), int(h * r)
    cx = int(torch.randint(0, w, (), generator=generator))
    cy = int(torch.randint(0, h, (), generator=generator))
    x1, x2 = min(max(cx - cut_w // 2, 0), w), min(max(cx + cut_w // 2, 0), w)
    y1, y2 = min(max(cy - cut_h // 2, 0), h), min(max(cy + cut_h // 2, 0), h)
    return x1, y1, x2, y2


BACK_TO_BACK = 10  # calls per CUDA timing: one call from an idle GPU would time the host's launches


def _timer(device):
    """fn -> milliseconds of one call; CUDA events on a GPU, perf_counter on the CPU.

    On a GPU the events bracket BACK_TO_BACK calls queued one after another, as in training (the
    host runs ahead): the fused op is one short kernel, shorter than the host takes to launch it and
    its small setup ops, so a single call would measure the launches, not the kernel.
    """
    if device.type == "cuda":
        def run(fn):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(BACK_TO_BACK):
                fn()
            end.record()
            torch.cuda.synchronize()  # note: a CPU-GPU sync point, once per timed batch of calls
            return start.elapsed_time(end) / BACK_TO_BACK
    else:
        def run(fn):
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3
    return run


def _kernel_timer(device, launch):
    """() -> milliseconds of one `launch()` alone, the kernel's own time on the device.

    On CUDA the launches are captured once into a CUDA graph of BACK_TO_BACK of them, and the graph's
    replays are timed with events: no host work between them, so the GPU never waits for the host.
    Where capture fails, BACK_TO_BACK plain launches are timed instead. Elsewhere (the Triton
    interpreter on a CPU): perf_counter around one launch.
    """
    if device.type != "cuda":
        def run():
            t0 = time.perf_counter()
            launch()
            return (time.perf_counter() - t0) * 1e3
        return run, "perf_counter"
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        launch()  # compiled and cached before the capture
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            for _ in range(BACK_TO_BACK):
                launch()
    except RuntimeError:  # a driver or Triton that cannot capture it: back-to-back launches
        timer = _timer(device)
        return (lambda: timer(launch)), "launches"

    def replay():
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()  # note: a CPU-GPU sync point, once per timed replay
        return start.elapsed_time(end) / BACK_TO_BACK
    return replay, "cuda graph"


def _host_us(fn, device, calls=BACK_TO_BACK):
    """Microseconds the host takes to issue one `fn()` (the device's work is not waited for inside)."""
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    t1 = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.synchronize()  # note: a CPU-GPU sync point, after the timed calls
    return (t1 - t0) * 1e6 / calls


def bench_mix(batch=256, size=224, device="cpu", reps=10, mode="nearest", out_dtype=torch.float32,
              seed=0, alpha=0.5, threads=None, backend="auto"):
    """Median milliseconds per step of the fused op and of the unfused paper code; returns a dict.

    Args:
        threads: torch CPU threads for the run (None: leave as is). 1 gives steadier figures on a
            machine that other work shares: each parallel op otherwise waits for a busy core.
        backend: the fused op's, as `rmix.kernels.recursive_mix` takes it ("auto": Triton on CUDA).
            "triton" on a CPU runs the interpreter (TRITON_INTERPRET=1), for tests of this code.
    """
    if threads is not None:
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return bench_mix(batch, size, device, reps, mode, out_dtype, seed, alpha, backend=backend)
        finally:
            torch.set_num_threads(previous)
    device = torch.device(device)
    if backend == "auto":
        backend = "triton" if device.type == "cuda" else "torch"
    g = torch.Generator().manual_seed(seed)
    n, c, h, w, k = batch, 3, size, size, NUM_CLASSES
    x1, y1, x2, y2 = paper_box(h, w, alpha, g)  # drawn first: the same box for every batch size
    for _ in range(10_000):  # time a step that pastes something
        if (x2 - x1) * (y2 - y1):
            break
        x1, y1, x2, y2 = paper_box(h, w, alpha, g)
    else:  # a side of 1 or 2 px: the paper's rule gives empty boxes only
        raise ValueError(f"--size: the paper's boxes in {size} px images paste nothing; use --size 4 or more")
    images = torch.randint(0, 256, (n, h, w, c), dtype=torch.uint8, generator=g).to(device)
    targets = torch.randint(0, k, (n,), generator=g).to(device)
    history = torch.randn(n, c, h, w, generator=g).to(device, out_dtype)
    history_targets = torch.softmax(torch.randn(n, k, generator=g), dim=1).to(device)
    boxes = torch.tensor([[x1, y1, x2, y2]] * n, device=device)
    box_fraction = (x2 - x1) * (y2 - y1) / (h * w)
    lam = 1 - box_fraction
    interp = dict(mode="nearest") if mode == "nearest" else dict(mode="bilinear", align_corners=True)
    mean = torch.tensor(MEAN, device=device).view(1, c, 1, 1)
    std = torch.tensor(STD, device=device).view(1, c, 1, 1)

    bufs = [history.clone(), torch.empty_like(history)]  # step t's output is step t+1's history

    def fused():
        prev, out = bufs
        recursive_mix(images, prev, targets, history_targets, boxes, mode=mode, num_classes=k,
                      mean=MEAN, std=STD, out=out, backend=backend)
        bufs.reverse()

    state = {"history": history.clone(), "targets": history_targets.clone()}

    def unfused():
        x = (images.permute(0, 3, 1, 2).float() - mean) / std  # the loader's normalize pass
        x[:, :, y1:y2, x1:x2] = F.interpolate(state["history"].float(), size=(y2 - y1, x2 - x1), **interp)
        soft = lam * F.one_hot(targets, k).float() + (1 - lam) * state["targets"]
        x = x.to(out_dtype)
        state["history"], state["targets"] = x.clone(), soft.clone()  # old_inputs = inputs.clone()

    timer = _timer(device)
    for fn in (fused, unfused, fused, unfused):  # warm-up: allocator, Triton compile
        fn()
    samples = {"fused": [], "unfused": []}
    for _ in range(reps):  # interleaved, so that both see the same machine load
        samples["fused"].append(timer(fused))
        samples["unfused"].append(timer(unfused))
    times = {name: statistics.median(ms) for name, ms in samples.items()}
    host_us = statistics.median(_host_us(fused, device) for _ in range(reps))

    result = {
        "fused_ms": times["fused"], "unfused_ms": times["unfused"],
        "speedup": times["unfused"] / times["fused"], "host_us": host_us, "kernel_ms": None, "kernel_timing": None,
        "batch": n, "size": size, "device": str(device), "mode": mode,
        "dtype": str(out_dtype).replace("torch.", ""), "box_fraction": box_fraction, "backend": backend,
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "gbps": None, "peak_gbps": None, "peak_source": None, "peak_fraction": None,
    }
    if backend == "triton":
        from rmix.kernels.mix_triton import _recursive_mix_kernel, bytes_moved, launch_args
        *_, grid, args, constexprs = launch_args(images, bufs[0], targets, history_targets, boxes, mode=mode,
                                                  num_classes=k, mean=MEAN, std=STD, out=bufs[1])
        kernel, how = _kernel_timer(device, lambda: _recursive_mix_kernel[grid](*args, **constexprs))
        result["kernel_ms"] = statistics.median(kernel() for _ in range(reps))
        result["kernel_timing"] = how
        if device.type == "cuda":
            moved = bytes_moved(n, c, h, w, box_fraction, 1, history.element_size(), k)
            result["gbps"] = moved / (result["kernel_ms"] * 1e-3) / 1e9
            peak, source = peak_gbps(result["device_name"], torch.cuda.get_device_properties(device))
            result.update(peak_gbps=peak, peak_source=source,
                          peak_fraction=None if peak is None else result["gbps"] / peak)
    return result


def format_bench(d):
    """A small side-by-side table of a `bench_mix` result."""
    per_s = lambda ms: d["batch"] / (ms * 1e-3)  # noqa: E731 - images per second
    lines = [
        f"recursive_mix  batch {d['batch']}  {d['size']}x{d['size']}  {d['mode']}  {d['dtype']}  "
        f"box {d['box_fraction']:.0%}",
        f"{d['device_name']} ({d['threads']} threads), torch {d['torch']}, fused backend {d['backend']}",
        f"{'':<10}{'ms':>10}{'img/s':>12}",
        f"{'fused':<10}{d['fused_ms']:>10.2f}{per_s(d['fused_ms']):>12.0f}",
        f"{'unfused':<10}{d['unfused_ms']:>10.2f}{per_s(d['unfused_ms']):>12.0f}",
        f"{'ratio':<10}{d['speedup']:>9.2f}x",
        f"fused: the host issues a call in {d['host_us']:.0f} us",
    ]
    if d.get("kernel_ms") is not None:
        lines.append(f"fused: the kernel alone {d['kernel_ms']:.3f} ms ({d['kernel_timing']})")
    if d.get("gbps") is not None:
        peak = "" if d["peak_fraction"] is None else \
            f" ({d['peak_fraction']:.0%} of {d['peak_gbps']:.0f} GB/s, from the {d['peak_source']})"
        lines.append(f"kernel: {d['gbps']:.0f} GB/s{peak}")
    return "\n".join(lines)
