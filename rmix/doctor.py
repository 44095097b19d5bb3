"""`rmix doctor`: what this machine has for rmix, whether the pieces match, and whether rmix's data
and mixing paths compute here what their references compute. One table; each line ok or what failed.

    rmix doctor            # the table; exit 1 if a check failed
    rmix doctor --json     # {"versions": {...}, "checks": [{"check", "status", "detail", "seconds"}], "ok": bool}

Other tools report versions (`python -m torch.utils.collect_env`, `accelerate env`, DeepSpeed's
`ds_report`); this one also runs each GPU path against its reference, on the user's own machine:
- versions, and whether they match: torchvision's operators load with this torch, DALI's CUDA
  build is torch's CUDA major;
- the fused mixing op: on a GPU the Triton kernel against the torch reference, for every output
  dtype (fp32, bf16, fp16), interpolation (nearest, bilinear) and layout the trainer uses (nearest
  bit for bit, bilinear within one rounding, as tests/test_kernels.py); on a CPU the torch
  reference against the paper's unfused steps;
- decoding: DALI's decoder on this device against DALI's CPU decoder (on a CPU: against PIL), and
  the torch loader's decode on the device against the CPU's, over the embedded set's images,
  within DECODE_TOLERANCE;
- training: STEPS steps of the default model on each loader, with the host syncs of the steps
  counted (torch's sync-debug mode on a GPU, rmix.syncs.SyncCounter on a CPU: neither sees waits
  inside nvJPEG, DALI or the allocator), and the images per second.
"""
from __future__ import annotations

import importlib.metadata
import math
import platform
import time
from typing import NamedTuple

import numpy as np
import torch

from rmix.bench.mix import MEAN, STD  # ImageNet's, in pixel units
from rmix.config import INTERPOLATIONS
from rmix.pipelines.errors import one_line

STEPS = 20
# Decoders differ by their IDCT and chroma upsampling, resizes by their rounding: mean |difference|
# in grey levels (0..255) over all pixels. Observed on the embedded set: DALI CPU vs PIL 0.0,
# the torch loader's CPU decode + resize vs PIL's ~1 (tests/test_device_decode.py allows 3).
DECODE_TOLERANCE = {"decode": 1.5, "decode + resize": 3.0}


class Line(NamedTuple):
    check: str
    status: str   # "ok" | "failed" | "warning" | "needs a GPU" | "skipped"
    detail: str
    seconds: float = 0.0


def _dist_version(*names):
    """(distribution name, version) of the first installed of `names`, else (None, None)."""
    for name in names:
        try:
            return name, importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None, None


def _dali_dist():
    """(distribution, version) of the installed DALI wheel (its name carries its CUDA build)."""
    names = [d.metadata["Name"] for d in importlib.metadata.distributions()
             if (d.metadata["Name"] or "").lower().startswith("nvidia-dali")]
    return _dist_version(*sorted(names))


def versions(device: torch.device) -> dict:
    """Python, torch and its CUDA and cuDNN, torchvision, Triton, DALI (and its build), TorchCodec, numpy, GPU."""
    dali_name, dali = _dali_dist()
    v = {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
         "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
         "torchvision": _dist_version("torchvision")[1], "triton": _dist_version("triton")[1],
         "dali": dali, "dali_wheel": dali_name, "torchcodec": _dist_version("torchcodec")[1],
         "numpy": np.__version__, "device": str(device)}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        v.update(gpu=props.name, capability=f"sm_{props.major}{props.minor}",
                 gpu_memory_gb=round(props.total_memory / 2**30, 1))
    return v


def version_lines(v: dict) -> list[Line]:
    """Whether the installed pieces match each other."""
    lines = []
    cuda = f"CUDA {v['torch_cuda']}" if v["torch_cuda"] else "CPU build"
    lines.append(Line("torch", "ok", f"{v['torch']} ({cuda}, cuDNN {v['cudnn']})"))
    try:  # the RoI head's op: a torchvision built for another torch fails to register its operators
        import torchvision.ops  # noqa: F401
        torch.ops.torchvision.roi_align  # noqa: B018
        lines.append(Line("torchvision", "ok", f"{v['torchvision']}: its operators load with this torch"))
    except Exception as e:  # noqa: BLE001 - reported
        lines.append(Line("torchvision", "failed", f"{v['torchvision']}: its operators do not load with torch "
                                                   f"{v['torch']} ({type(e).__name__}: {e}); install the matching pair"))
    if v["dali"] is None:
        from rmix.pipelines import dali_wheel
        lines.append(Line("DALI", "warning", f"not installed: --loader dali needs `pip install {dali_wheel()}`; "
                                             "--loader torch works without it"))
    else:
        build = (v["dali_wheel"] or "").rsplit("cuda", 1)[-1]  # "nvidia-dali-cuda130" -> "130"
        torch_major = (v["torch_cuda"] or "").split(".")[0]
        if v["torch_cuda"] and build[:-1] != torch_major:
            lines.append(Line("DALI", "failed", f"{v['dali']} is {v['dali_wheel']}, torch is CUDA {v['torch_cuda']}: "
                                                "two CUDA runtimes in one process; `pip uninstall "
                                                f"{v['dali_wheel']} && pip install nvidia-dali-cuda{torch_major}0`"))
        else:
            lines.append(Line("DALI", "ok", f"{v['dali']} ({v['dali_wheel']}"
                                            + (f", torch's CUDA {torch_major})" if v["torch_cuda"] else ")")))
    if v["triton"] is None:
        status = "warning" if v["device"].startswith("cuda") else "ok"
        lines.append(Line("Triton", status, "not installed: the fused op runs as torch ops (slower on a GPU)"))
    else:
        lines.append(Line("Triton", "ok", v["triton"]))
    return lines


def _timed(check, fn) -> Line:
    t0 = time.perf_counter()
    try:
        status, detail = fn()
    except Exception as e:  # noqa: BLE001 - a check that breaks is a failed line, not a traceback
        status, detail = "failed", f"{type(e).__name__}: {one_line(e, 300, typed=False, ellipsis=False)}"
    return Line(check, status, detail, round(time.perf_counter() - t0, 2))


# --- the fused op ---------------------------------------------------------------------------------

def _mix_inputs(n, h, w, k, device, out_dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, h, w, 3), dtype=torch.uint8, generator=g)
    history = torch.randn(n, 3, h, w, generator=g).to(out_dtype)  # the previous step's output
    soft = torch.softmax(torch.randn(n, k, generator=g), 1)
    history_soft = torch.softmax(torch.randn(n, k, generator=g), 1)
    # every kind of box: the full image, edges, one pixel, empty, interior
    kinds = [(0, 0, w, h), (w // 2, h // 2, w, h), (0, h // 3, 1, h), (w - 1, h - 1, w, h), (w // 2, 0, w // 2, h),
             (3, 2, w - 4, h - 1), (0, 0, (w + 1) // 2, (h + 1) // 2), (w // 3, 0, w, 1)]
    boxes = torch.tensor([kinds[i % len(kinds)] for i in range(n)], dtype=torch.int64)
    return [t.to(device) for t in (images, history, soft, history_soft, boxes)]




def _kernel_tolerance(mode, dtype, interpreted=False) -> dict:
    """What tests/test_kernels.py holds the kernel to: nearest exact (the interpreter, which truncates
    fp32 -> bf16, aside), bilinear 1e-5 in fp32 or one rounding of a bf16/fp16 output; labels 1e-6."""
    if mode == "nearest" and not (interpreted and dtype == torch.bfloat16):
        return dict(rtol=0, atol=0)
    return dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else {}


def kernel_check(device, n=16, h=61, w=75, k=1000, interpreted=False) -> tuple[str, str]:
    """The Triton kernel on `device` against the torch reference, every variant the trainer runs.

    `interpreted`: the Triton interpreter on a CPU (tests), whose bf16 casts truncate."""
    from rmix.kernels import recursive_mix
    from rmix.kernels.mix_ref import recursive_mix_ref
    variants = bad = 0
    worst = ""
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for mode in INTERPOLATIONS:
            for channels_last in (False, True):
                for first_step in (False, True):  # the epoch's first step has no history
                    images, history, soft, history_soft, boxes = _mix_inputs(n, h, w, k, device, dtype)
                    fmt = torch.channels_last if channels_last else torch.contiguous_format
                    history = history.contiguous(memory_format=fmt)  # laid out as the output it was
                    if first_step:
                        history = history_soft = boxes = None
                    outs = [torch.empty(n, 3, h, w, dtype=dtype, device=device).contiguous(memory_format=fmt)
                            for _ in range(2)]
                    got = recursive_mix(images, history, soft, history_soft, boxes, mode=mode, mean=MEAN, std=STD,
                                        out=outs[0], backend="triton")
                    want = recursive_mix_ref(images, history, soft, history_soft, boxes, mode=mode, mean=MEAN,
                                             std=STD, out=outs[1])
                    variants += 1
                    tolerances = (_kernel_tolerance(mode, dtype, interpreted), dict(rtol=1e-6, atol=1e-6),
                                  dict(rtol=1e-6, atol=1e-6))
                    for name, a, b, tol in zip(("images", "soft targets", "lam"), got, want, tolerances):
                        try:
                            torch.testing.assert_close(a, b, **tol)
                        except AssertionError:
                            bad += 1
                            diff = (a.float() - b.float()).abs().max().item()
                            worst = worst or (f"{str(dtype)[6:]} {mode} {'NHWC' if channels_last else 'NCHW'}"
                                              f"{' first step' if first_step else ''}: {name} differ by up to {diff:g}")
    if bad:
        return "failed", f"{bad} outputs of {variants} variants differ from the torch reference; first: {worst}"
    return "ok", (f"Triton = torch reference (nearest exact, bilinear within one rounding): {variants} variants "
                  f"(fp32, bf16, fp16 x nearest, bilinear x NCHW, NHWC x with and without history), "
                  f"{n} x {h} x {w} px, {k} classes")


def reference_check() -> tuple[str, str]:
    """The torch reference (the CPU path) against the paper's unfused steps: normalize, interpolate, paste, lerp."""
    import torch.nn.functional as F

    from rmix.kernels.mix_ref import recursive_mix_ref
    images, history, soft, history_soft, _ = _mix_inputs(4, 32, 40, 10, "cpu", torch.float32, seed=1)
    x1, y1, x2, y2 = 5, 3, 29, 20
    boxes = torch.tensor([[x1, y1, x2, y2]] * 4)
    worst = 0.0
    for mode in INTERPOLATIONS:
        got, got_soft, lam = recursive_mix_ref(images, history, soft, history_soft, boxes, mode=mode,
                                               mean=MEAN, std=STD)
        mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
        want = (images.permute(0, 3, 1, 2).float() - mean) / std
        interp = dict(mode="nearest") if mode == "nearest" else dict(mode="bilinear", align_corners=True)
        want[:, :, y1:y2, x1:x2] = F.interpolate(history, size=(y2 - y1, x2 - x1), **interp)
        kept = 1 - (x2 - x1) * (y2 - y1) / (32 * 40)
        worst = max(worst, (got - want).abs().max().item(), (got_soft - (kept * soft + (1 - kept) * history_soft))
                    .abs().max().item(), (lam - kept).abs().max().item())
    if worst > 1e-5:
        return "failed", f"the torch reference differs from the paper's unfused steps by up to {worst:g}"
    return "ok", f"torch reference = the paper's unfused steps (nearest, bilinear; max difference {worst:.1g})"


# --- decoding --------------------------------------------------------------------------------------

def _val_files(data_dir, count=64):
    from rmix.pipelines import scan_image_folder
    index = scan_image_folder(data_dir / "val")
    pick = np.linspace(0, len(index.files) - 1, min(count, len(index.files))).round().astype(int)
    return [f"{index.root}/{index.files[i]}" for i in sorted(set(pick.tolist()))]


def _compare(pairs, tolerance, what) -> tuple[str, str]:
    """Mean and max |difference| over image pairs of equal shape; failed above `tolerance` (mean)."""
    total, count, worst = 0.0, 0, 0.0
    for a, b in pairs:
        if a.shape != b.shape:
            return "failed", f"{what}: shapes differ, {tuple(a.shape)} vs {tuple(b.shape)}"
        d = (a.float().cpu() - b.float().cpu()).abs()
        total, count, worst = total + d.sum().item(), count + d.numel(), max(worst, d.max().item())
    mean = total / max(count, 1)
    status = "ok" if mean <= tolerance else "failed"
    return status, (f"{what}: mean |difference| {mean:.2f} grey levels (tolerance {tolerance}), "
                    f"max {worst:.0f}, {len(pairs)} images")


def dali_decode_check(device, data_dir) -> tuple[str, str]:
    """DALI's decoder on `device` (mixed on a GPU) against DALI's CPU decoder; on a CPU, DALI's CPU against PIL."""
    try:
        from nvidia.dali import fn, pipeline_def, types
    except ImportError:
        return "skipped", "DALI is not installed"
    from PIL import Image
    files = _val_files(data_dir)

    def decode(backend, device_id):
        @pipeline_def(batch_size=len(files), num_threads=2, device_id=device_id)
        def graph():
            jpegs = fn.external_source(name="jpegs", dtype=types.UINT8, ndim=1)
            return fn.decoders.image(jpegs, device=backend, output_type=types.RGB, adjust_orientation=False)
        pipe = graph()
        pipe.build()
        pipe.feed_input("jpegs", [np.fromfile(f, dtype=np.uint8) for f in files])
        (out,) = pipe.run()
        out = out.as_cpu() if backend == "mixed" else out
        return [torch.from_numpy(np.array(out[i])) for i in range(len(files))]

    cpu = decode("cpu", None)
    if device.type == "cuda":
        return _compare(list(zip(decode("mixed", device.index or 0), cpu)), DECODE_TOLERANCE["decode"],
                        "DALI nvJPEG (mixed) vs DALI CPU")
    pil = [torch.from_numpy(np.array(Image.open(f).convert("RGB"))) for f in files]
    return _compare(list(zip(cpu, pil)), DECODE_TOLERANCE["decode"], "DALI CPU vs PIL")


def torch_decode_check(device, data_dir) -> tuple[str, str]:
    """The torch loader's --torch-decode device on `device` against the same code on the CPU; on a CPU,
    against the workers' PIL decode (the same centre crops)."""
    from rmix.pipelines.build import Backend, Crop, loader
    from rmix.pipelines.folders import scan_image_folder
    from rmix.pipelines.split import Share
    index = scan_image_folder(data_dir / "val")
    share, crop = Share(index.num_samples, train=False, batch_size=32), Crop(32, val_resize=36)

    def images(torch_decode, on):
        return [x for x, _ in loader(index, share, Backend("torch", 0, torch_decode=torch_decode, device=on), crop)]

    if device.type == "cuda":
        on_gpu, on_cpu = images("device", device), images("device", "cpu")
        return _compare(list(zip(on_gpu, on_cpu)), DECODE_TOLERANCE["decode + resize"],
                        "nvJPEG + resize on the GPU vs the same on the CPU")
    device_path, workers = images("device", "cpu"), images("workers", "cpu")
    return _compare(list(zip(device_path, workers)), DECODE_TOLERANCE["decode + resize"],
                    "torchvision decode + resize vs PIL's (--torch-decode workers)")


# --- training steps --------------------------------------------------------------------------------

class _Steps:
    """`steps` batches of a loader, epoch after epoch: what train_one_epoch takes as a loader."""

    def __init__(self, loader, steps):
        self.loader, self.steps = loader, steps

    def __len__(self):
        return self.steps

    def __iter__(self):
        n = 0
        while True:
            for batch in self.loader:
                if n == self.steps:
                    return
                n += 1
                yield batch


def train_check(device, loader: str, torch_decode: str = "workers") -> tuple[str, str]:
    """STEPS steps of the default model on the embedded set through `loader`: host syncs per step and img/s."""
    from rmix import config as C
    from rmix.data import make_loader, resolve_data
    from rmix.engine import amp_dtype, build_optimizer, make_policy, set_determinism, train_one_epoch
    from rmix.models import build
    from rmix.progress import Progress
    from rmix.state import RunState
    from rmix.syncs import SyncCounter, cuda_sync_warnings
    if loader == "dali":
        try:
            import nvidia.dali  # noqa: F401
        except ImportError:
            return "skipped", "DALI is not installed"
    # batch 32: the embedded set's 1,000 images make 31 steps an epoch, so both counted passes start
    # one epoch each (an epoch's start syncs: DALI's pipeline of the last epoch is shut down)
    cfg = C.replace(C.TrainConfig(), device=device.type, log_every=10 ** 6, channels_last=device.type == "cuda",
                    batch_size=32, **{"data.loader": loader, "data.torch_decode": torch_decode, "data.workers": 2})
    root, dataset = resolve_data(cfg.data.data_dir, cfg.data.dataset)
    cfg = C.with_dataset_stats(cfg, dataset)
    data = make_loader(cfg, root, dataset, device, train=True)
    cfg = C.replace(cfg, num_classes=data.num_classes)
    torch.manual_seed(0)
    model = build(cfg.model, cfg.num_classes, image_size=cfg.data.crop_size).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, cfg.optim)
    amp = amp_dtype(cfg, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    policy = make_policy(cfg, device, amp)
    set_determinism(False, device)

    def run(steps):
        """(host syncs counted, seconds) of one pass of `steps` steps."""
        t0 = time.perf_counter()
        with Progress(steps, "doctor", enabled=False) as bar:
            if device.type == "cuda":
                with cuda_sync_warnings() as seen:
                    sums = train_one_epoch(model, policy, _Steps(data, steps), optimizer, scaler, cfg, RunState(), amp,
                                           bar)
                count = len(seen)
            else:
                with SyncCounter() as counter:
                    sums = train_one_epoch(model, policy, _Steps(data, steps), optimizer, scaler, cfg, RunState(), amp,
                                           bar)
                count = len(counter.reads)
        seconds = time.perf_counter() - t0
        if not math.isfinite(sums[0].item()):
            raise RuntimeError(f"the loss is not finite after {steps} steps")
        return count, seconds

    try:
        run(3)  # warm-up: workers, kernels, cuDNN's choices
        half, _ = run(STEPS // 2)
        full, seconds = run(STEPS)
    finally:
        data.close()
    per_step = (full - half) / (STEPS - STEPS // 2)
    how = "torch's sync-debug mode" if device.type == "cuda" else "rmix.syncs.SyncCounter"
    detail = (f"{STEPS} steps of {cfg.model}, batch {cfg.batch_size}, {cfg.data.crop_size} px: "
              f"{STEPS * cfg.batch_size / seconds:.0f} img/s; host syncs per step {per_step:g} "
              f"({full} in the pass, at its start and end; counted by {how})")
    return ("ok" if per_step == 0 else "failed"), detail


# --- the whole ------------------------------------------------------------------------------------

def doctor(device="auto", log=None) -> dict:
    """Every check on `device` ("auto": the GPU where there is one); returns {"versions", "checks", "ok"}."""
    from rmix.engine import resolve_device
    from rmix.pipelines.synth import default_data_dir
    device = resolve_device(device)
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    v = versions(device)
    lines = version_lines(v)
    gpu = device.type == "cuda"
    data_dir = default_data_dir()

    def add(check, fn):
        if log is not None:
            log(f"doctor: {check}")
        lines.append(_timed(check, fn))

    if gpu and v["triton"] is not None:
        add("fused op: Triton on the GPU", lambda: kernel_check(device))
    else:
        lines.append(Line("fused op: Triton on the GPU", "needs a GPU" if not gpu else "skipped",
                          "the CPU runs the torch reference" if not gpu else "Triton is not installed"))
    add("fused op: torch reference", reference_check)
    add("decode: DALI " + ("nvJPEG vs CPU" if gpu else "CPU vs PIL"), lambda: dali_decode_check(device, data_dir))
    add("decode: torch loader " + ("on the GPU vs CPU" if gpu else "device path vs workers"),
        lambda: torch_decode_check(device, data_dir))
    add("train: dali loader", lambda: train_check(device, "dali"))
    add("train: torch loader", lambda: train_check(device, "torch"))
    if gpu:
        add("train: torch loader, --torch-decode device", lambda: train_check(device, "torch", "device"))
    else:
        lines.append(Line("train: torch loader, --torch-decode device", "needs a GPU",
                          "nvJPEG decode on the device (the CPU runs the same code in the decode check above)"))
    return {"versions": v, "checks": [line._asdict() for line in lines],
            "ok": not any(line.status == "failed" for line in lines)}


def format_doctor(d) -> str:
    v = d["versions"]
    gpu = f"{v['gpu']} ({v['capability']}, {v['gpu_memory_gb']} GB)" if "gpu" in v else "no GPU"
    head = (f"rmix doctor: {v['device']}, {gpu}; Python {v['python']}, torch {v['torch']}, torchvision "
            f"{v['torchvision']}, Triton {v['triton']}, DALI {v['dali']}, TorchCodec {v['torchcodec']}, "
            f"numpy {v['numpy']}")
    rows = [(c["check"], c["status"], c["detail"]) for c in d["checks"]]
    w0, w1 = max(len(r[0]) for r in rows), max(len(r[1]) for r in rows)
    failed = sum(c["status"] == "failed" for c in d["checks"])
    tail = "all checks passed" if not failed else f"{failed} check(s) failed"
    return "\n".join([head] + [f"{a:<{w0}}  {b:<{w1}}  {c}" for a, b, c in rows] + [tail])
