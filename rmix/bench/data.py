"""Train input pipelines on the same JPEGs, batch and threads: rmix's DALI pipeline against its baselines.

    from rmix.bench.data import bench_data, format_bench
    print(format_bench(bench_data()))

Every loader yields uint8 (N, size, size, 3) batches of random-resized crops (area in
[min_area, 1], aspect ratio in [3/4, 4/3], antialiased bilinear resize) flipped with p = 0.5:
- dali: rmix's loader, `pipelines.loader` with `Backend("dali")`: ROI decode of the crop, resize, flip
  (with the CPU decoder the resize and flip are torch's, on `pipelines.host_resize`'s thread).
- torch_pil: rmix's torchvision loader, `Backend("torch")`: PIL decode and resize.
- torch_v2: `torchvision.io.decode_image` (libjpeg-turbo's decode_jpeg for JPEGs) and
  `transforms.v2` on uint8 tensors, in a DataLoader with as many workers as the others' threads.
- decode_only, the ceiling: DALI's own decoder (libjpeg-turbo on the CPU, nvJPEG with the GPU)
  on the same reader, files and threads, whole images, nothing after it. It is the decoder the
  dali pipeline uses, so dali / decode_only is the share of the pure decode rate that the crop,
  resize, flip and hand-over leave. (DALI's ROI decode skips some of a crop's work, so the
  pipeline could in principle pass 1.0.)

A pass is one epoch over the files (images // batch full batches). The first pass of each
loader is a warm-up (workers start, buffers grow, the page cache fills) and is not counted; the
figure is the median of the other passes. Loaders run one after another, never interleaved: a
loader that prefetches between passes (a DALI pipeline's queue) would do its work in another
loader's time. Beside img/s each loader gets its CPU time per image (its threads and its worker
processes): on a machine that other work shares it is the steadier figure of the two.
"""
import math
import os
import pathlib
import tempfile
import time
from functools import partial

import numpy as np
import torch

from rmix.bench.timing import cpu_seconds, machine_info, median, synchronize, torch_threads
from rmix.pipelines import build
from rmix.pipelines.build import Backend, Crop
from rmix.pipelines.folders import FolderIndex, scan_image_folder
from rmix.pipelines.paths import cache_dir
from rmix.pipelines.split import Share

LOADERS = ("torch_pil", "torch_v2", "decode_only", "dali")  # run order: forked workers before DALI threads
SYNTH = dict(width=500, height=375, quality=96, classes=8)  # ImageNet-like: ~100 KB, 500x375


def synthetic_jpegs(images: int, log=None) -> pathlib.Path:
    """A cached synthetic ImageFolder (train/ and val/) with at least `images` ImageNet-sized JPEGs."""
    from rmix.pipelines.synth import VERSION, synth_dataset
    per_class = math.ceil(images / SYNTH["classes"])
    name = "bench-jpeg-v{v}-{width}x{height}-q{quality}-{classes}x{n}".format(v=VERSION, n=per_class, **SYNTH)
    out = cache_dir() / name
    if log is not None and not (out / "rmix_synth.json").is_file():
        log(f"writing {SYNTH['classes'] * per_class} synthetic {SYNTH['width']}x{SYNTH['height']} JPEGs "
            f"into {out} (once)")
    return synth_dataset(out, classes=SYNTH["classes"], train_per_class=per_class, val_per_class=1,
                         width=SYNTH["width"], height=SYNTH["height"], quality=SYNTH["quality"])


def train_split(data_dir) -> pathlib.Path:
    """The ImageFolder split to read: data_dir/train when there is one, else data_dir itself."""
    root = pathlib.Path(data_dir).expanduser()
    if not root.is_dir():
        raise ValueError(f"--data-dir: {root} is not a directory")
    return root / "train" if (root / "train").is_dir() else root


def subset(index: FolderIndex, images: int, out: pathlib.Path) -> FolderIndex:
    """`images` files spread evenly over `index` (so over its classes), as symlinks under `out`."""
    pick = np.unique(np.linspace(0, len(index.files) - 1, images).round().astype(np.int64))
    for i in pick.tolist():
        rel = index.files[i]
        cls = index.classes[index.labels[i]]
        link = out / cls / rel.replace(os.sep, "__")  # nested folders flattened: no name clashes
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.abspath(os.path.join(index.root, rel)))
    return scan_image_folder(out)


class JpegFiles(torch.utils.data.Dataset):
    """The torchvision v2 baseline's dataset: file bytes -> decode_image -> v2 crop and flip -> uint8 HWC."""

    def __init__(self, index: FolderIndex, size: int, min_area: float):
        from torchvision.transforms import v2
        self.paths = [os.path.join(index.root, f) for f in index.files]
        self.labels = list(index.labels)
        self.transform = v2.Compose([
            v2.RandomResizedCrop(size, scale=(min_area, 1.0), ratio=(3 / 4, 4 / 3), antialias=True),
            v2.RandomHorizontalFlip()])

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        from torchvision.io import ImageReadMode, decode_image, read_file
        image = decode_image(read_file(self.paths[i]), mode=ImageReadMode.RGB)  # uint8 (3, H, W)
        return self.transform(image).permute(1, 2, 0).contiguous(), self.labels[i]


def _stack(batch):
    images, labels = zip(*batch)
    return torch.stack(images), torch.tensor(labels, dtype=torch.int64)


class TorchV2Loader:
    """JpegFiles in a DataLoader behind the loader contract (uint8 NHWC and labels on `device`)."""

    def __init__(self, index, *, batch_size, size, min_area, num_threads, device, seed=0):
        self.device = torch.device(device)
        self._loader = torch.utils.data.DataLoader(
            JpegFiles(index, size, min_area), batch_size=batch_size, shuffle=True, drop_last=True,
            num_workers=num_threads, persistent_workers=num_threads > 0, collate_fn=_stack,
            pin_memory=self.device.type == "cuda", generator=torch.Generator().manual_seed(seed))

    def __len__(self):
        return len(self._loader)

    def __iter__(self):
        cuda = self.device.type == "cuda"
        for images, labels in self._loader:
            yield images.to(self.device, non_blocking=cuda), labels.to(self.device, non_blocking=cuda)


class DecodeOnly:
    """The ceiling: DALI's reader and decoder alone, whole images; `run(batches)` -> images decoded."""

    def __init__(self, index, *, batch_size, num_threads, decoder, device_id, seed=0):
        from nvidia.dali import fn, pipeline_def, types

        from rmix.pipelines.dali import write_file_list

        @pipeline_def
        def decode_pipeline(file_root, file_list):
            jpegs, _ = fn.readers.file(file_root=file_root, file_list=file_list, name="Reader")
            return fn.decoders.image(jpegs, device=decoder, output_type=types.RGB, adjust_orientation=False)

        with tempfile.TemporaryDirectory(prefix="rmix-bench-") as tmp:
            file_list = write_file_list(index, os.path.join(tmp, "files.txt"))
            self._pipe = decode_pipeline(index.root, file_list, batch_size=batch_size,
                                         num_threads=num_threads, device_id=device_id, seed=seed)
            self._pipe.build()  # the reader parses the list here, so the file may go afterwards
        self.batch_size = batch_size

    def run(self, batches):
        for _ in range(batches):
            self._pipe.run()  # outputs are dropped: the ceiling hands nothing over
        return batches * self.batch_size

    def close(self):
        del self._pipe


def _passes(run_pass, reps, device):
    """(img/s, CPU ms per image) of each of `reps` passes after a warm-up pass; run_pass() -> images."""
    rates, cpu_ms = [], []
    for i in range(reps + 1):
        c0 = cpu_seconds()
        t0 = time.perf_counter()
        n = run_pass()
        synchronize(device)  # note: a CPU-GPU sync point, once per pass
        t1 = time.perf_counter()
        c1 = cpu_seconds()
        if i:  # pass 0 is the warm-up
            rates.append(n / (t1 - t0))
            if c0 is not None:
                cpu_ms.append((c1 - c0) * 1e3 / n)
    return rates, cpu_ms


def _epoch(loader):
    images = 0
    for x, _ in loader:
        images += x.shape[0]
    return images


def bench_data(data_dir=None, *, batch=None, threads=None, size=224, reps=3, images=None, min_area=0.08,
               device="cpu", dali_device="auto", seed=0, loaders=LOADERS, log=None) -> dict:
    """Median images/s of each train pipeline over the same files, batch and threads; returns a dict.

    Args:
        data_dir: an ImageFolder root (its train/ split is read) or a split; None: synthetic
            500x375 JPEGs, generated once into the rmix cache.
        batch: per batch [default: 64 on the CPU, 256 on cuda].
        threads: DALI threads and DataLoader workers [default: every CPU].
        images: files per pass [default: max(1024, 4 * batch)], spread over the classes. Few
            batches per pass weigh per-epoch costs (workers' start, a DALI pipeline per epoch) heavily.
        dali_device: "auto" (gpu when device is cuda), "cpu", or "gpu" (nvJPEG, implies device cuda).
        log: a callable for progress lines (e.g. click.echo to stderr), or None.
    """
    from rmix.engine import resolve_device
    from rmix.pipelines.wds import is_shard_dir
    if data_dir and is_shard_dir(pathlib.Path(data_dir).expanduser()):
        return bench_shards(data_dir, batch=batch, threads=threads, size=size, reps=reps, images=images,
                            min_area=min_area, device=device, dali_device=dali_device, seed=seed, log=log)
    if dali_device == "gpu" and device == "cpu":
        device = "cuda"
    device = resolve_device(device)  # ValueError when cuda is asked for and absent
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    skipped = {}
    try:
        from rmix.pipelines.dali import decoder_device, resolve_dali_device
        resolved, device_id = resolve_dali_device(dali_device, device)
        decoder = decoder_device(resolved)  # DALI's name: "cpu" or "mixed"
    except ImportError as e:  # a machine without DALI still compares the torchvision loaders
        decoder, device_id = None, None
        skipped = {name: f"DALI is not installed ({e})" for name in ("dali", "decode_only") if name in loaders}
        loaders = [name for name in loaders if name not in skipped]
        if log is not None:
            log(f"skipping {', '.join(skipped)}: DALI is not installed")
    batch = batch or (256 if device.type == "cuda" else 64)
    threads = threads or os.cpu_count() or 1
    images = images or max(1024, 4 * batch)
    unknown = set(loaders) - set(LOADERS)
    if unknown:
        raise ValueError(f"loaders: unknown {sorted(unknown)}, expected some of {LOADERS}")
    for name, value, low in (("--batch", batch, 1), ("--threads", threads, 1), ("--size", size, 8),
                             ("--reps", reps, 1), ("--images", images, batch)):
        if value < low:
            raise ValueError(f"{name}: must be >= {low}, got {value}")
    if not 0 < min_area <= 1:
        raise ValueError(f"min_area: must be in (0, 1], got {min_area}")

    split = train_split(data_dir) if data_dir else synthetic_jpegs(images, log) / "train"
    source = str(split) if data_dir else "synthetic {width}x{height} JPEG q{quality}".format(**SYNTH)
    result = {"data": source, "batch": batch, "threads": threads, "size": size, "min_area": min_area,
              "reps": reps, "device": str(device), "dali_decoder": decoder, "passes": {}, "skipped": skipped}
    with tempfile.TemporaryDirectory(prefix="rmix-bench-files-") as tmp:
        index = scan_image_folder(split)
        if images < len(index.files):
            index = subset(index, images, pathlib.Path(tmp))
        n_batches = len(index.files) // batch
        if n_batches == 0:
            raise ValueError(f"--data-dir: {split} holds {len(index.files)} images, not one batch of {batch}")
        sizes = [os.path.getsize(os.path.join(index.root, f)) for f in index.files]
        result.update(images=n_batches * batch, files=len(index.files), batches=n_batches,
                      mean_file_kb=round(sum(sizes) / len(sizes) / 1e3, 1))
        share = Share(index.num_samples, train=True, batch_size=batch, seed=seed)
        crop = Crop(size, min_area, val_resize=size)
        for name in LOADERS:
            if name not in loaders:
                continue
            if log is not None:
                log(f"{name}: {reps} passes of {n_batches} batches after a warm-up pass")
            if name == "decode_only":
                ceiling = DecodeOnly(index, batch_size=batch, num_threads=threads, decoder=decoder,
                                     device_id=device_id, seed=seed)
                rates, cpu_ms = _passes(partial(ceiling.run, n_batches), reps, device)
                ceiling.close()
            else:
                if name == "torch_v2":
                    loader = TorchV2Loader(index, batch_size=batch, size=size, min_area=min_area,
                                           num_threads=threads, device=device, seed=seed)
                else:
                    backend = Backend("dali" if name == "dali" else "torch", threads, dali_device, device=device)
                    loader = build.loader(index, share, backend, crop)
                rates, cpu_ms = _passes(partial(_epoch, loader), reps, device)
                del loader  # stops DataLoader workers / DALI threads before the next loader runs
            result["passes"][name] = [round(r, 1) for r in rates]
            result[f"{name}_img_s"] = median(rates)
            if cpu_ms:
                result.setdefault("cpu_ms_per_img", {})[name] = median(cpu_ms)
    for base in ("decode_only", "torch_pil", "torch_v2"):
        if "dali" in loaders and base in loaders:
            result[f"dali_vs_{base}"] = result["dali_img_s"] / result[f"{base}_img_s"]
    result.update(machine_info(device))
    return result


DECODERS = ("pil", "torchvision", "torchcodec")


def _decoder(name):
    """bytes -> uint8 (H, W, 3) tensor by one library, or None where it is not installed."""
    import io
    import warnings

    from PIL import Image
    if name == "pil":
        return lambda data: torch.from_numpy(np.array(Image.open(io.BytesIO(data)).convert("RGB")))
    if name == "torchvision":
        from torchvision.io import ImageReadMode, decode_jpeg

        def tv(data):
            with warnings.catch_warnings():  # deprecated from 0.29, still rmix's --torch-decode device
                warnings.simplefilter("ignore", DeprecationWarning)
                return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8),
                                   mode=ImageReadMode.RGB).permute(1, 2, 0)
        return tv
    try:
        from torchcodec.decoders import decode_jpeg as tc
    except Exception:  # noqa: BLE001 - not installed, or not for this torch: reported as skipped
        return None
    return lambda data: tc(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode="RGB").permute(1, 2, 0)


def bench_decoders(data_dir=None, *, images=None, reps=3, log=None) -> dict:
    """Whole-image JPEG decode on the CPU, one thread, the same files in memory: PIL (the torch loader's
    workers), torchvision.io.decode_jpeg (--torch-decode device's decoder) and TorchCodec's decode_jpeg
    (torchvision's named successor). img/s (median of `reps` passes after a warm-up), and each decoder's
    pixels against PIL's (max |difference|, images whose shape differs)."""
    split = train_split(data_dir) if data_dir else synthetic_jpegs(images or 256, log) / "train"
    index = scan_image_folder(split)
    files = [os.path.join(index.root, f) for f in index.files][:images or 256]
    blobs = [pathlib.Path(f).read_bytes() for f in files]
    result = {"mode": "decoders", "data": str(split), "images": len(blobs), "reps": reps, "passes": {},
              "skipped": {}, "max_diff_vs_pil": {}, "shape_differs": {},
              "mean_file_kb": round(sum(map(len, blobs)) / len(blobs) / 1e3, 1)}
    reference = None
    with torch_threads(1):
        for name in DECODERS:
            decode = _decoder(name)
            if decode is None:
                result["skipped"][name] = "not installed"
                continue
            if log is not None:
                log(f"{name}: {reps} passes of {len(blobs)} images after a warm-up pass")
            rates = []
            for i in range(reps + 1):
                t0 = time.perf_counter()
                out = [decode(b) for b in blobs]
                if i:
                    rates.append(len(blobs) / (time.perf_counter() - t0))
            reference = out if name == "pil" else reference
            result["passes"][name] = [round(r, 1) for r in rates]
            result[f"{name}_img_s"] = median(rates)
            same = [(a, b) for a, b in zip(out, reference) if a.shape == b.shape]
            result["shape_differs"][name] = len(out) - len(same)
            result["max_diff_vs_pil"][name] = max(((a.int() - b.int()).abs().max().item() for a, b in same), default=0)
    for name in DECODERS[1:]:
        if f"{name}_img_s" in result:
            result[f"{name}_vs_pil"] = result[f"{name}_img_s"] / result["pil_img_s"]
    result.update(machine_info("cpu"))
    result["torchcodec"] = _version_of("torchcodec")
    return result


def _version_of(module):
    try:
        return __import__(module).__version__
    except Exception:  # noqa: BLE001
        return None


def format_decoders(d) -> str:
    load = "" if not d.get("load_avg") else f", load {d['load_avg'][0]:.1f}"
    lines = [f"JPEG decode, whole images, 1 thread: {d['images']} files in memory ({d['data']}, "
             f"{d['mean_file_kb']:.0f} KB mean)",
             f"{d['cpu_model']} ({d['cpu_count']} CPUs{load}); Pillow {d['pillow']}, torchvision {d['torchvision']}, "
             f"TorchCodec {d['torchcodec']}",
             f"{'':<13}{'img/s':>9}{'vs PIL':>8}{'max |diff|':>12}{'shape differs':>15}   passes"]
    for name in DECODERS:
        if f"{name}_img_s" in d:
            ratio = f"{d.get(name + '_vs_pil', 1.0):>7.2f}x"
            lines.append(f"{name:<13}{d[name + '_img_s']:>9.0f}{ratio}{d['max_diff_vs_pil'][name]:>12}"
                         f"{d['shape_differs'][name]:>15}   {d['passes'][name]}")
    lines += [f"{name}: skipped, {why}" for name, why in d.get("skipped", {}).items()]
    return "\n".join(lines)


SHARD_LOADERS = ("torch_files", "torch_wds", "dali_files", "dali_wds")  # forked workers before DALI threads
SHARD_SIZE = 1000


def bench_shards(data_dir, *, batch=None, threads=None, size=224, reps=3, images=None, min_area=0.08,
                 device="cpu", dali_device="auto", seed=0, log=None) -> dict:
    """Shards against files: the same images (taken evenly from the train shards of ``data_dir``),
    written once as an ImageFolder and once as shards of SHARD_SIZE, read by both loaders in one run.

    DALI reads the shards with readers.webdataset and the files with readers.file; the torchvision
    loader reads the shards by offset and the files by path. Both copies are on the same disk, so
    this measures the readers' own cost: the page cache hides what shards save on network storage.
    """
    from rmix.engine import resolve_device
    from rmix.pipelines.wds import ShardWriter, member_key, scan_shards, shard_name
    device = resolve_device(device)
    batch = batch or (256 if device.type == "cuda" else 64)
    threads = threads or os.cpu_count() or 1
    shards = scan_shards(pathlib.Path(data_dir).expanduser(), "train")
    n = len(shards.samples)
    images = min(images or max(1024, 4 * batch), n)
    if images < batch:
        raise ValueError(f"--data-dir: {data_dir} holds {n} train images, not one batch of {batch}")
    pick = np.unique(np.linspace(0, n - 1, images).round().astype(np.int64)).tolist()
    result = {"mode": "shards", "data": str(shards.root), "batch": batch, "threads": threads, "size": size,
              "min_area": min_area, "reps": reps, "device": str(device), "passes": {}, "shard_size": SHARD_SIZE}
    with tempfile.TemporaryDirectory(prefix="rmix-bench-shards-") as tmp:
        tmp = pathlib.Path(tmp)
        if log is not None:
            log(f"writing {len(pick)} images as files and as shards of {SHARD_SIZE} into {tmp}")
        taken, writer, sizes = set(), None, []
        (tmp / "shards").mkdir()
        for j, i in enumerate(pick):
            s = shards.samples[i]
            data = shards.read(i)
            sizes.append(len(data))
            key = member_key(s.member.rsplit(".", 1)[0], taken)
            ext = s.member.rsplit(".", 1)[-1]
            path = tmp / "files" / "train" / shards.classes[s.label] / f"{key.replace('/', '__')}.{ext}"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            if j % SHARD_SIZE == 0:
                if writer is not None:
                    writer.close()
                writer = ShardWriter(str(tmp / "shards" / shard_name("train", j // SHARD_SIZE)))
            writer.add(key, ext, data, s.label)
        writer.close()
        n_batches = len(pick) // batch
        result.update(images=n_batches * batch, files=len(pick), batches=n_batches,
                      mean_file_kb=round(sum(sizes) / len(sizes) / 1e3, 1))
        crop = Crop(size, min_area, val_resize=size)
        for name in SHARD_LOADERS:
            kind, form = name.split("_")
            if log is not None:
                log(f"{name}: {reps} passes of {n_batches} batches after a warm-up pass")
            source = (scan_shards(tmp / "shards", "train", labels=False) if form == "wds" else
                      scan_image_folder(tmp / "files" / "train"))
            share = Share(source.num_samples, train=True, batch_size=batch, seed=seed)
            loader = build.loader(source, share, Backend(kind, threads, dali_device, device=device), crop)
            rates, cpu_ms = _passes(partial(_epoch, loader), reps, device)
            del loader
            result["passes"][name] = [round(r, 1) for r in rates]
            result[f"{name}_img_s"] = median(rates)
            if cpu_ms:
                result.setdefault("cpu_ms_per_img", {})[name] = median(cpu_ms)
    for kind in ("torch", "dali"):
        result[f"{kind}_wds_vs_files"] = result[f"{kind}_wds_img_s"] / result[f"{kind}_files_img_s"]
    result.update(machine_info(device))
    return result


def format_shards(d) -> str:
    load = "" if not d.get("load_avg") else f", load {d['load_avg'][0]:.1f}"
    lines = [
        f"shards vs files: the same {d['images']} images per pass (from {d['data']}, {d['mean_file_kb']:.0f} KB "
        f"mean), shards of {d['shard_size']}, crop {d['size']}, batch {d['batch']}, {d['threads']} threads",
        f"{d['cpu_model']} ({d['cpu_count']} CPUs{load}), {d['device_name']}; torch {d['torch']}, DALI {d['dali']}",
        f"{'':<13}{'img/s':>9}{'CPU ms/img':>12}   passes (img/s; medians of {d['reps']} after a warm-up)",
    ]
    cpu = d.get("cpu_ms_per_img", {})
    for name in SHARD_LOADERS:
        ms = f"{cpu[name]:>12.2f}" if name in cpu else f"{'-':>12}"
        lines.append(f"{name:<13}{d[name + '_img_s']:>9.0f}{ms}   {d['passes'][name]}")
    lines.append(f"dali shards / files {d['dali_wds_vs_files']:.2f}x   torch shards / files "
                 f"{d['torch_wds_vs_files']:.2f}x")
    return "\n".join(lines)


def format_bench(d) -> str:
    """A side-by-side table of a `bench_data` result."""
    if d.get("mode") == "shards":
        return format_shards(d)
    if d.get("mode") == "decoders":
        return format_decoders(d)
    decoder = {"mixed": "nvJPEG (mixed)", "cpu": "CPU", None: "not installed"}[d["dali_decoder"]]
    load = "" if not d.get("load_avg") else f", load {d['load_avg'][0]:.1f}"
    lines = [
        f"train pipelines: {d['images']} images per pass ({d['data']}, {d['mean_file_kb']:.0f} KB mean), "
        f"crop {d['size']} area [{d['min_area']}, 1], batch {d['batch']}, {d['threads']} threads, "
        f"DALI decode {decoder}",
        f"{d['cpu_model']} ({d['cpu_count']} CPUs{load}), {d['device_name']}; torch {d['torch']}, "
        f"torchvision {d['torchvision']}, DALI {d['dali']}, Pillow {d['pillow']}",
        f"{'':<13}{'img/s':>9}{'CPU ms/img':>12}   passes (img/s; medians of {d['reps']} after a warm-up)",
    ]
    cpu = d.get("cpu_ms_per_img", {})
    for name in ("decode_only", "dali", "torch_v2", "torch_pil"):
        if f"{name}_img_s" in d:
            ms = f"{cpu[name]:>12.2f}" if name in cpu else f"{'-':>12}"
            lines.append(f"{name:<13}{d[name + '_img_s']:>9.0f}{ms}   {d['passes'][name]}")
    ratios = [f"dali / {base} {d['dali_vs_' + base]:.2f}x" for base in ("decode_only", "torch_pil", "torch_v2")
              if f"dali_vs_{base}" in d]
    if ratios:
        lines.append("   ".join(ratios))
    lines += [f"{name}: skipped, {why}" for name, why in d.get("skipped", {}).items()]
    return "\n".join(lines)
