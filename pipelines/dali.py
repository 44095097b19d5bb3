"""DALI ImageFolder pipelines and the one adapter that gives them the loader contract.

Train: ROI decode of a random-resized crop (only the crop's JPEG blocks are decoded), resize to
crop_size (bilinear, antialiased when shrinking, like PIL's BILINEAR), horizontal flip p=0.5.
With the CPU decoder the graph ends before the resize and `pipelines.host_resize` resizes with
torch on a thread of its own: DALI's CPU resize costs as much as the decode.
Val: decode, resize the shorter side to val_resize with torchvision's size rule, centre crop
with torchvision's rounding. Both emit uint8 HWC; normalization happens later, in the fused op.

Epochs: every epoch runs on a pipeline built for it, reading a "path label" list of exactly this
rank's samples in the epoch's order (`Share.indices`, the torchvision loader's split: a
permutation from (seed, epoch), the same on every rank, sharded in Python), with the pipeline's
random seed from (seed, rank, epoch). Nothing carries over from one epoch to the next inside
DALI, so `DaliLoader.set_epoch(e)` gives exactly epoch e of an uninterrupted run. (DALI's own
`shuffle_after_epoch` reshuffles from its internal state, which a rebuilt pipeline would
restart; `random_shuffle` only shuffles within a window.) The rebuild delays each epoch's first
batch, mostly writing the list in Python: BENCHMARKS.md, "Figures moved from module docstrings".
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
import weakref
from typing import NamedTuple

import numpy as np
import torch

from rmix.pipelines.errors import missing_dali

try:
    import nvidia.dali.math as dmath
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali.pipeline import Pipeline
    from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy
except ImportError as error:  # one line saying what to install, wherever DALI is first needed
    raise missing_dali(error) from None

from rmix.pipelines.arrays import Arrays  # noqa: E402
from rmix.pipelines.build import DALI_DEVICES, Backend, Crop  # noqa: E402
from rmix.pipelines.colour import GRAY_WEIGHTS, JITTER, LIGHTING, PCA_EIGVAL, PCA_EIGVEC  # noqa: E402
from rmix.pipelines.errors import DecodeError, one_line  # noqa: E402
from rmix.pipelines.folders import FolderIndex  # noqa: E402
from rmix.pipelines.host_resize import HostResize  # noqa: E402
from rmix.pipelines.images import pil_decodes  # noqa: E402
from rmix.pipelines.seeds import derive  # noqa: E402
from rmix.pipelines.split import EpochCounter, Share  # noqa: E402
from rmix.pipelines.streams import BatchHold  # noqa: E402
from rmix.pipelines.wds import IMAGE_EXTS as WDS_IMAGE_EXTS  # noqa: E402
from rmix.pipelines.wds import ShardSplit, dali_readable  # noqa: E402

# nvJPEG preallocation per pipeline, in bytes: NVIDIA's ResNet-50 example gives each decoder
# *thread* 211 MB of device memory and two 140 MB pinned host buffers (DALI's schema: "one device
# buffer ... per thread", "two host-pinned buffers ... per thread"), which at the ImageNet presets'
# 8 threads is 1.7 GB of GPU memory and 2.2 GB pinned per pipeline, train and val each, built
# again every epoch. rmix gives a whole pipeline that much and splits it over the threads, but never
# less per thread than DALI's own defaults (16 MiB device, 8 MiB host in DALI 2.4): above 12 threads
# the split would preallocate less than passing nothing. A thread that meets a bigger image grows its
# buffer once (nvJPEG reallocates), which is all the preallocation saves.
DEVICE_PADDING_PER_PIPELINE = 211_025_920
HOST_PADDING_PER_PIPELINE = 2 * 140_544_512


def dali_padding_defaults() -> tuple[int, int]:
    """DALI's own (device_memory_padding, host_memory_padding) defaults, read from its operator schema."""
    from nvidia.dali import backend
    schema = backend.GetSchema("decoders__Image")
    return tuple(int(schema.GetArgumentDefaultValueString(name))
                 for name in ("device_memory_padding", "host_memory_padding"))


def nvjpeg_padding(num_threads: int) -> dict:
    """The mixed decoder's padding arguments for a pipeline of `num_threads` threads: a share of
    DEVICE_PADDING_PER_PIPELINE and HOST_PADDING_PER_PIPELINE per thread, at least DALI's defaults."""
    n = max(1, num_threads)
    device_default, host_default = dali_padding_defaults()
    return dict(device_memory_padding=max(DEVICE_PADDING_PER_PIPELINE // n, device_default),
                host_memory_padding=max(HOST_PADDING_PER_PIPELINE // (2 * n), host_default))  # two host buffers a thread


def resolve_dali_device(dali_device: str, device: torch.device) -> tuple[str, int | None]:
    """(dali_device, torch device) -> ("cpu" or "gpu", DALI's device_id): "auto" is "gpu" when ``device``
    is cuda. No CUDA call on the CPU."""
    if dali_device not in DALI_DEVICES:
        *first, last = map(repr, DALI_DEVICES)
        raise ValueError(f"dali_device must be {', '.join(first)} or {last}, got {dali_device!r}")
    use_gpu = dali_device == "gpu" or (dali_device == "auto" and device.type == "cuda")
    if not use_gpu:
        return "cpu", None  # device_id=None: DALI never touches CUDA
    if device.type != "cuda" or not torch.cuda.is_available():
        raise ValueError(f"dali_device='gpu' needs a CUDA device, got device={device} "
                         f"(cuda available: {torch.cuda.is_available()})")
    return "gpu", device.index if device.index is not None else torch.cuda.current_device()


def decoder_device(dali_device: str) -> str:
    """DALI's ``device`` for a decoder on ``dali_device`` ("cpu" or "gpu"): the GPU one is "mixed" (the
    host parses the headers, nvJPEG decodes on the device)."""
    return "mixed" if dali_device == "gpu" else "cpu"


def _output_device(dali_device: str, device_id: int | None, device: torch.device) -> torch.device:
    return torch.device("cuda", device_id) if dali_device == "gpu" else device


def _pipe_args(share: Share, backend: Backend, device_id: int | None, epoch: int) -> dict:
    """The @pipeline_def arguments of one epoch's pipeline; augmentation differs per rank and epoch."""
    return dict(batch_size=share.batch_size, num_threads=max(1, backend.workers), device_id=device_id,
                seed=derive(share.seed, "dali_augment", rank=share.rank, epoch=epoch, bits=31))


def write_file_list(index: FolderIndex, path: str, order=None) -> str:
    """Write readers.file's file_list ("relative/path label" lines) in ``order``; returns path."""
    order = range(len(index.files)) if order is None else order
    with open(path, "w", encoding="utf-8") as out:
        for i in order:
            name = index.files[i]
            if "\n" in name or "\r" in name:
                raise ValueError(f"file name with a line break: {os.path.join(index.root, name)!r}")
            out.write(f"{name} {index.labels[i]}\n")
    return path


def _centre_offset(extent, crop_size: int):
    """int(round((extent - crop) / 2)) with round-half-even, as torchvision's CenterCrop."""
    d = extent - crop_size
    k = d // 2
    return k + (d - 2 * k) * (k - 2 * (k // 2))  # + 1 only when d is odd and d // 2 is odd


def _colour_jitter_and_lighting(images, on_gpu: bool, factors=None, alpha=None):
    """The paper's brightness, contrast, saturation ~ U(0.6, 1.4), then PCA lighting 0.1; uint8 -> uint8.

    Unclamped until the final cast, as the paper's code, so this one order equals its random
    one (pipelines.colour). ``factors`` ((3,) per sample) and ``alpha`` ((3,), times LIGHTING)
    replace the random draws, for tests.
    """
    def param(node):
        return node.gpu() if on_gpu else node  # keep every arithmetic operand on one device

    if factors is None:
        b, c, s = (param(fn.random.uniform(range=[1 - JITTER, 1 + JITTER])) for _ in range(3))
    else:
        b, c, s = (param(factors[i]) for i in range(3))
    if alpha is None:
        alpha = fn.random.normal(shape=[3]) * LIGHTING
    gray_w = types.Constant(GRAY_WEIGHTS)
    x = fn.cast(images, dtype=types.FLOAT) * b
    mean_gray = fn.reductions.sum(fn.reductions.mean(x, axes=[0, 1]) * gray_w)  # scalar
    x = x * c + mean_gray * (1.0 - c)
    gray = fn.reductions.sum(x * gray_w, axes=[2], keep_dims=True)              # (H, W, 1)
    x = x * s + gray * (1.0 - s)
    scaled = alpha * types.Constant(PCA_EIGVAL * 255.0)
    offset = sum(scaled[j] * types.Constant(PCA_EIGVEC[:, j]) for j in range(3))  # (3,), 0..255
    return fn.cast(x + param(offset), dtype=types.UINT8)  # cast rounds and saturates to 0..255


def decode_and_augment(jpegs, crop: Crop, *, train: bool, dali_device: str, resize: bool = True):
    """Encoded images -> uint8 (crop_size, crop_size, 3) HWC: the graph train and val share.

    EXIF orientation is ignored, as PIL's Image.open (torchvision's loader) ignores it.
    Train with ``resize=False`` returns (crops, flips) for `HostResize`: the crops at their
    own sizes, recoloured (the colour ops are per pixel, up to the mean grey level and
    clipping, so they commute with the resize), and the flips to apply after the resize.
    """
    on_gpu = dali_device == "gpu"
    pad = nvjpeg_padding(Pipeline.current().num_threads) if on_gpu else {}
    linear = dict(interp_type=types.INTERP_LINEAR, antialias=True)
    crop_size, val_resize = crop.crop_size, crop.val_resize
    if train:
        images = fn.decoders.image_random_crop(
            jpegs, device=decoder_device(dali_device), output_type=types.RGB, adjust_orientation=False,
            random_area=[crop.min_area, 1.0], random_aspect_ratio=[3 / 4, 4 / 3], num_attempts=10, **pad)
        if resize:
            images = fn.resize(images, resize_x=crop_size, resize_y=crop_size, **linear)
        flips = fn.random.coin_flip(probability=0.5)  # after resize: seeds go by creation order
        if resize:
            images = fn.flip(images, horizontal=flips)
        if crop.aug_plus:
            images = _colour_jitter_and_lighting(images, on_gpu=on_gpu)
        return images if resize else (images, flips)
    # torchvision's Resize(val_resize): short side -> val_resize, long side -> int(val_resize *
    # long / short). Integer arithmetic on the header's shape gives exactly those sizes.
    shape = fn.peek_image_shape(jpegs, adjust_orientation=False)  # (H, W, C) int64
    height, width = shape[0], shape[1]
    short = dmath.min(height, width)
    new_h = (height * val_resize) // short
    new_w = (width * val_resize) // short
    images = fn.decoders.image(jpegs, device=decoder_device(dali_device), output_type=types.RGB,
                               adjust_orientation=False, **pad)
    images = fn.resize(images, resize_y=fn.cast(new_h, dtype=types.FLOAT),
                       resize_x=fn.cast(new_w, dtype=types.FLOAT), **linear)
    start = fn.cast(fn.stack(_centre_offset(new_h, crop_size), _centre_offset(new_w, crop_size)),
                    dtype=types.INT32)
    return fn.slice(images, start=start, shape=[crop_size, crop_size], axis_names="HW")


@pipeline_def
def image_folder_pipeline(file_root: str, file_list: str, *, crop: Crop, train: bool, dali_device: str,
                          resize: bool = True):
    """readers.file over a "path label" list, in its order -> (images uint8 HWC, labels int32 (1,)).

    With ``resize=False`` (train): (crops, labels, flips), see `decode_and_augment`. The list
    is this rank's shard of one epoch; pad_last_batch repeats the last sample to fill the last
    batch, which the iterator drops (train) or trims (val).
    """
    jpegs, labels = fn.readers.file(file_root=file_root, file_list=file_list, pad_last_batch=True,
                                    random_shuffle=False, name="Reader")
    images = decode_and_augment(jpegs, crop, train=train, dali_device=dali_device, resize=resize)
    if not resize:
        images, flips = images
        return images, labels, flips
    return images, labels.gpu() if dali_device == "gpu" else labels


class ArraySource:
    """external_source callback: batch ``info.iteration`` of one epoch on one rank, from arrays.

    The split is `Share.indices`, as the torchvision loader's; StopIteration ends the epoch
    (train: after the last full batch, or the short one with drop_last=False).
    """

    def __init__(self, arrays: Arrays, share: Share, epoch: int):
        self.images, self.labels = arrays.images, arrays.labels.astype(np.int32)
        self.batch_size = share.batch_size
        self.num_batches = share.num_batches
        self.indices = np.asarray(share.indices(epoch), dtype=np.int64)

    def __call__(self, info):
        first = info.iteration * self.batch_size
        batch = self.indices[first:first + self.batch_size]
        if info.iteration >= self.num_batches or len(batch) == 0:
            raise StopIteration  # a val rank one image short ends early; the adapter pads
        return self.images[batch], self.labels[batch]  # the last one may be short: DALI takes any size


@pipeline_def
def array_pipeline(source: ArraySource, *, train: bool, on_gpu: bool, size: int, flip: bool = True):
    """uint8 (size, size, 3) arrays -> the same; train: zero-pad 4, random size x size crop, flip p=0.5."""
    images, labels = fn.external_source(source=source, num_outputs=2, batch=True,
                                        batch_info=True, layout=["HWC", ""])
    if on_gpu:
        images, labels = images.gpu(), labels.gpu()
    if train:
        # a crop starting in [-4, 4] with zero fill == RandomCrop(size, padding=4)
        start = fn.cast(fn.random.uniform(values=list(range(-4, 5)), shape=[2]), dtype=types.INT32)
        images = fn.slice(images, start=start, shape=[size, size], axis_names="HW",
                          out_of_bounds_policy="pad")
        if flip:
            images = fn.flip(images, horizontal=fn.random.coin_flip(probability=0.5))
    return images, labels


class DaliIterator:
    """DALI's own iterator behind `HostResize`'s interface (`start`, `next`, `close`), so that
    `DaliLoader` runs either the same way."""

    def __init__(self, iterator: DALIGenericIterator):
        self._iterator = iterator

    def __len__(self) -> int:
        return len(self._iterator)

    def start(self, skip: int = 0):
        """Nothing to start: DALI runs the skipped batches as any other, and the loader drops them."""

    def __next__(self):
        return next(self._iterator)

    def close(self):
        """Nothing to stop here: shutting the pipeline down stops DALI's threads."""


def _epoch_iterator(pipe, count: int, share: Share, crop_size: int, host_resize: bool, device: torch.device,
                    exact: bool) -> DaliIterator | HostResize:
    """The iterator of one epoch whose reader gives ``count`` samples (folders and shards alike).

    DALI's reader pads the last batch (`pad_last_batch`): train drops it whole
    (LastBatchPolicy.DROP), else the padding is trimmed (PARTIAL). A shard rank whose slice is
    longer than the others' gives one batch more than `Share.num_batches`; `DaliLoader` stops
    before it. ``host_resize``: the pipeline ends before the resize, and `HostResize` finishes it.
    ``exact``: DALI's iterator must count the batches of ``count`` samples (readers.file over this
    rank's list; readers.webdataset's iterator counts the largest slice of all ranks).
    """
    drop = share.drops_partial
    from_reader = count // share.batch_size if drop else -(-count // share.batch_size)
    own = min(from_reader, share.num_batches)
    if exact and from_reader > share.num_batches:  # a folder rank's list is never longer than the contract's count
        raise RuntimeError(f"DALI iterator has {from_reader} batches, expected {share.num_batches}")
    if host_resize:
        pipe.build()  # parses a folder's list now; the drop policy is HostResize's batch count
        return HostResize(pipe, own, crop_size, pin_memory=device.type == "cuda",
                          last_size=share.batch_size if drop else count - (own - 1) * share.batch_size)
    iterator = DaliIterator(DALIGenericIterator(
        [pipe], ["images", "labels"], reader_name="Reader", auto_reset=False, prepare_first_batch=False,
        last_batch_policy=LastBatchPolicy.DROP if drop else LastBatchPolicy.PARTIAL))
    if exact and len(iterator) != from_reader:  # the contract's count vs DALI's own
        raise RuntimeError(f"DALI iterator has {len(iterator)} batches, expected {from_reader} "
                           f"(of {share.num_batches})")
    return iterator


class DaliEpoch(NamedTuple):
    """One epoch's pipeline and iterator; for files, what it reads in order (a rank's shard)."""
    epoch: int
    pipe: object
    iterator: DaliIterator | HostResize
    batch_size: int
    root: str | None = None       # None: arrays (CIFAR, MNIST), no files to name
    names: list[str] = []         # paths relative to root, as FolderIndex.files
    order: list[int] = []         # indices into names, this rank's reading order
    to_labels: object = None      # raw label output -> int64 (N,) labels; None: int32 labels
    replay: object = None         # shards: step -> [(name, bytes)] of that batch (errors only)

    def batch_files(self, step: int, relative: bool = False) -> list[str]:
        chunk = self.order[step * self.batch_size:(step + 1) * self.batch_size]
        root = "" if relative else self.root
        return [os.path.join(root, self.names[i]) for i in chunk]


class DaliLoader(EpochCounter):
    """The one adapter from DALI pipelines to the loader contract (see `pipelines`).

    Each `iter()` builds the pipeline of one epoch with ``make_epoch(epoch)`` and shuts the
    previous one down, so an epoch's content depends on (seed, epoch, rank) only: see
    `set_epoch`. An epoch abandoned half-way is simply dropped. Epoch 0's pipeline is built
    by the constructor, so a broken setup fails there.

    A read or decode error raises `pipelines.DecodeError` with the failing batch's files, and
    the failing one where DALI's message names it (data errors; not header errors). DALI
    invalidates a pipeline that failed; the next `iter()` builds a fresh one, but treat the
    loader as unusable after a DecodeError.
    """

    def __init__(self, make_epoch, share: Share, classes: list[str], device: torch.device, crop_size: int):
        self._make_epoch = make_epoch   # epoch -> DaliEpoch
        self._len = share.num_batches
        self.classes = list(classes)
        self.num_classes = len(self.classes)
        self.num_samples = share.num_samples
        self.device = device
        self._crop_size = crop_size
        self._hold = BatchHold(device)  # zero-copy batches, until torch's stream is done with them
        self._live: DaliEpoch | None = make_epoch(0)
        self._live_unused = True  # built, not iterated yet: iter() may take it as it is

    def __len__(self) -> int:
        return self._len

    def __iter__(self):
        epoch, start = self._take_epoch()
        if not (self._live_unused and self._live.epoch == epoch):
            self._close()
            self._live = self._make_epoch(epoch)
        self._live_unused = False
        return self._batches(epoch, self._live, start)

    def close(self):
        """Shut the live pipeline down now, and let go of the batches held for torch's stream."""
        self._close()

    def _close(self):
        """Shut the live pipeline down now rather than whenever it is garbage-collected."""
        live, self._live, self._live_unused = self._live, None, False
        if live is None:
            return
        live.iterator.close()  # HostResize's thread calls the pipeline: stopped first
        if self.device.type == "cuda":  # DALI-to-torch copies run on torch's stream
            torch.cuda.current_stream(self.device).synchronize()
        self._hold.release()
        getattr(live.pipe, "_shutdown", lambda: None)()  # private; else on deletion

    def _batches(self, epoch: int, live: DaliEpoch, start: int = 0):
        # Batches before `start` are decoded and dropped: DALI's per-sample random streams
        # advance batch by batch, so the only way to batch `start`'s augmentation is through them.
        step = 0
        live.iterator.start(skip=start)  # HostResize does not resize the skipped batches
        while True:
            if self._live is not live:
                raise RuntimeError(f"epoch {epoch} of this DALI loader was replaced by a later "
                                   "iter()")
            if step >= self._len:
                break  # shards: a rank whose DALI slice is longer drops its extra batch
            try:
                data = next(live.iterator)
            except StopIteration:
                break
            except Exception as error:
                if live.replay is not None:
                    self._close()
                    raise _shard_decode_error(error, epoch, step, live.replay, live.root) from error
                if live.root is None:
                    raise  # arrays: no files to name
                self._close()
                files = live.batch_files(step)
                k = _named_sample(error, live.batch_files(step, relative=True))
                raise DecodeError(epoch, step, files, [] if k is None else [files[k]],
                                  _dali_reason(error)) from error
            step += 1
            if step <= start:
                continue
            images = raw_images = data[0]["images"]
            labels = raw_labels = data[0]["labels"]
            labels = labels.reshape(-1).to(torch.int64) if live.to_labels is None else live.to_labels(labels)
            if images.device != self.device:  # dali_device="cpu" with a CUDA device
                images = images.to(self.device, non_blocking=True)
                labels = labels.to(self.device, non_blocking=True)
            try:
                yield images, labels
            finally:  # the next batch is asked for (or the epoch left): every read of this one is queued
                self._hold.hold(raw_images, raw_labels)
            del data, images, labels, raw_images, raw_labels  # only the hold keeps them now
        for _ in range(max(step, start), self._len):  # a val rank one image short: trailing empty batch
            yield (torch.empty(0, self._crop_size, self._crop_size, 3, dtype=torch.uint8,
                               device=self.device),
                   torch.empty(0, dtype=torch.int64, device=self.device))


def _dali_reason(error: Exception) -> str:
    """The failing operator and DALI's own message, from its multi-line pipeline error."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    operator = next((line.rstrip(",") for line in lines if line.startswith("Error in")), None)
    cause = lines[lines.index("encountered:") + 1] if "encountered:" in lines[:-1] else None
    if operator and cause:
        return one_line(RuntimeError(f"{operator}: {cause}"))
    return one_line(error)


def _named_sample(error: Exception, names: list[str]) -> int | None:
    """Which of a batch's files (paths relative to the reader's root) DALI's error names.

    The decoders name a sample whose data they reject ("Failed to decode sample #2 : a/b.jpg")
    but not one whose headers fail to parse ("nvImageCodec failure: '#3'").
    """
    for k, name in re.findall(r"sample #(\d+)\s*:\s*(\S.*?)\s*$", str(error), re.MULTILINE):
        if int(k) < len(names) and names[int(k)] == name:
            return int(k)
    return None


def folder_loader(index: FolderIndex, share: Share, crop: Crop, backend: Backend) -> DaliLoader:
    """A DaliLoader over an ImageFolder split.

    Each epoch's reader gets this rank's `Share.indices`. Train drops the partial last batch
    (LastBatchPolicy.DROP): every rank gets (N // world) // batch full batches; with
    drop_last=False each rank's shard is padded to ceil(N / world) (DistributedSampler's
    padding, in the list) and its short last batch kept. The reader pads the shard's last batch
    (`pad_last_batch`) and LastBatchPolicy.PARTIAL trims the padding, so val ranks return every
    image exactly once; a val rank one image short ends with an empty batch.
    """
    dali_device, device_id = resolve_dali_device(backend.dali_device, backend.device)
    host_resize = share.train and dali_device == "cpu"

    def make_epoch(epoch: int) -> DaliEpoch:
        order = share.indices(epoch)
        # The (path, label) list goes through a file: for ImageNet a `files=` argument of 1.28M
        # strings costs several times the time and memory (BENCHMARKS.md). The reader parses it
        # when the iterator builds the pipeline, so the file is removed right after.
        with tempfile.TemporaryDirectory(prefix="rmix-dali-") as tmp:
            file_list = write_file_list(index, os.path.join(tmp, "files.txt"), order)
            pipe = image_folder_pipeline(index.root, file_list, crop=crop, train=share.train, dali_device=dali_device,
                                         resize=not host_resize, **_pipe_args(share, backend, device_id, epoch))
            iterator = _epoch_iterator(pipe, len(order), share, crop.crop_size, host_resize, backend.device,
                                       exact=True)
        return DaliEpoch(epoch, pipe, iterator, share.batch_size, index.root, index.files, order)

    return DaliLoader(make_epoch, share, index.classes, _output_device(dali_device, device_id, backend.device),
                      crop.crop_size)


def array_loader(arrays: Arrays, share: Share, backend: Backend) -> DaliLoader:
    """A DaliLoader over square uint8 (N, S, S, 3) arrays (CIFAR, MNIST) fed by external_source."""
    dali_device, device_id = resolve_dali_device(backend.dali_device, backend.device)
    size = arrays.images.shape[1]

    def make_epoch(epoch: int) -> DaliEpoch:
        pipe = array_pipeline(ArraySource(arrays, share, epoch), train=share.train, on_gpu=dali_device == "gpu",
                              size=size, flip=arrays.flip, **_pipe_args(share, backend, device_id, epoch))
        # No reader: the source's StopIteration ends the epoch, whatever its batch count.
        iterator = DALIGenericIterator([pipe], ["images", "labels"], auto_reset=False,
                                       prepare_first_batch=False)
        return DaliEpoch(epoch, pipe, DaliIterator(iterator), share.batch_size)

    return DaliLoader(make_epoch, share, arrays.classes, _output_device(dali_device, device_id, backend.device),
                      size)


# WebDataset shards (pipelines.wds) ---------------------------------------------------------------

_SHUFFLE_FILL = 1024  # readers.webdataset's shuffle buffer per rank (its default)


@pipeline_def
def shard_pipeline(paths: list[str], index_paths: list[str] | None, *, crop: Crop, train: bool, dali_device: str,
                   shard_id: int, num_shards: int, reader_seed: int, resize: bool = True, decode: bool = True):
    """readers.webdataset -> (images uint8 HWC, source info uint8 (L,)); see `shard_loader`.

    The second output is each image's source info, "shard.tar:offset:member" in UTF-8, zero-padded
    to the batch's longest, on the CPU: `SampleLabels` reads the label of that sample on the host
    (DALI's ASCII-to-number is not `pipelines.wds.read_label`). ``decode=False``: (encoded images,
    source info) of the same batches, for naming the members of a batch that failed. The reader
    has its own seed, so that graph shuffles exactly as the decoding one.
    """
    jpegs, _ = fn.readers.webdataset(
        paths=paths, index_paths=index_paths, ext=[";".join(WDS_IMAGE_EXTS), "cls"],
        missing_component_behavior="error", case_sensitive_extensions=False,
        shard_id=shard_id, num_shards=num_shards, random_shuffle=train, initial_fill=_SHUFFLE_FILL,
        seed=reader_seed, pad_last_batch=True, name="Reader")
    info = fn.pad(jpegs.source_info(), fill_value=0)
    if not decode:
        return jpegs, info
    images = decode_and_augment(jpegs, crop, train=train, dali_device=dali_device, resize=resize)
    if not resize:
        images, flips = images
        return images, info, flips
    return images, info


class SampleLabels:
    """DALI's source info rows -> the samples' indices in a `ShardSplit`, and their labels.

    Each label is read once, by `pipelines.wds.read_label` (as the torchvision loader reads it),
    when its sample first comes by, and kept: one small read per sample and process.
    """

    def __init__(self, split):
        self.split, self.prefix = split, os.path.join(split.root, "")  # the reader's paths are root/shard.tar
        self.shard_of = {name: k for k, name in enumerate(split.shards)}
        self.index = {(s.shard, s.offset): i for i, s in enumerate(split.samples)}
        self.labels = np.full(len(split.samples), -1, dtype=np.int64)

    def indices(self, info) -> list[int]:
        """uint8 (N, L) source info -> the samples' indices; a row naming no known sample is an error."""
        rows = np.asarray(info.cpu() if isinstance(info, torch.Tensor) else info, dtype=np.uint8)
        if len(rows) == 0:  # a rank's trailing batch, all padding
            return []
        out = []
        for row in rows.reshape(len(rows), -1):
            text = bytes(row).rstrip(b"\0").decode("utf-8", "surrogateescape")
            shard, offset, _ = (text[len(self.prefix):].split(":", 2) + ["", ""])[:3]  # "shard.tar:offset:member"
            key = (self.shard_of.get(shard), int(offset) if offset.isdigit() else -1)
            if not text.startswith(self.prefix) or key not in self.index:
                raise RuntimeError(f"DALI read a sample rmix did not index: {text!r}")
            out.append(self.index[key])
        return out

    def __call__(self, info) -> torch.Tensor:
        """uint8 (N, L) source info -> int64 (N,) labels, on the CPU."""
        idx = self.indices(info)
        for i in idx:
            if self.labels[i] < 0:
                self.labels[i] = self.split.label(i)  # ValueError naming shard.tar:member
        return torch.from_numpy(self.labels[idx].copy())


def dali_slice(num_samples: int, shard_id: int, num_shards: int) -> int:
    """How many samples DALI's reader gives shard ``shard_id`` of ``num_shards`` (floor split)."""
    return num_samples * (shard_id + 1) // num_shards - num_samples * shard_id // num_shards


def _shard_decode_error(error, epoch: int, step: int, replay, root: str | None = None) -> DecodeError:
    """DecodeError naming the batch's members (``shard.tar:member``), and those PIL cannot decode.

    The batch is read again by a reader-only pipeline; where that fails too (a shard gone or
    cut short since the start), the error names what failed instead of raising from the replay.
    """
    try:
        batch = replay(step)
    except Exception as again:
        return DecodeError(epoch, step, [f"a sample of the shards in {root}"], [],
                           f"{_dali_reason(error)}; reading the batch again to name it failed: {_dali_reason(again)}")
    bad = [name for name, data in batch if not pil_decodes(data)]
    return DecodeError(epoch, step, [n for n, _ in batch], bad, _dali_reason(error))


def shard_loader(split: ShardSplit, share: Share, crop: Crop, backend: Backend) -> DaliLoader:
    """A DaliLoader over a split of WebDataset shards (`pipelines.wds.ShardSplit`), with readers.webdataset.

    Ranks read DALI's contiguous slices of the samples in shard order (prepared shards are
    shuffled once when written). Train: the slice a rank reads moves on by one each epoch
    (``shard_id = (rank + epoch) % world``), and readers.webdataset shuffles within a buffer of
    1024 samples, seeded from (seed, rank, epoch): an epoch still depends on those alone, so
    `set_epoch` and exact resume hold. This order is not the file loaders' `Share.indices`.
    A rank whose slice is one sample longer drops the extra batch (`DaliLoader`), so every rank
    has the contract's (N // world) // batch. Val: slice ``rank``, every image exactly once.
    """
    dali_device, device_id = resolve_dali_device(backend.dali_device, backend.device)
    dali_readable(split)  # a PAX member name would be read as a sample of its own ("Underful sample")
    host_resize = share.train and dali_device == "cpu"
    n, world = split.num_samples, share.world_size
    if share.train and not share.drop_last:
        counts = {-(-dali_slice(n, r, world) // share.batch_size) for r in range(world)}
        if counts != {share.num_batches}:
            raise ValueError(f"--keep-last: DALI's shard slices of {n} samples give {sorted(counts)} batches "
                             f"of {share.batch_size} on different ranks; drop --keep-last or use --loader torch")
    paths = [os.path.join(split.root, s) for s in split.shards]
    index_paths, own_indexes = _index_paths(split)

    def build(epoch: int, decode: bool = True):
        shard_id = (share.rank + epoch) % world if share.train else share.rank
        pipe = shard_pipeline(
            paths, index_paths, crop=crop, train=share.train, dali_device=dali_device, shard_id=shard_id,
            num_shards=world, reader_seed=derive(share.seed, "dali_reader", rank=share.rank, epoch=epoch, bits=31), resize=not host_resize,
            decode=decode, **_pipe_args(share, backend, device_id if decode else None, epoch))
        return pipe, dali_slice(n, shard_id, world)

    sample_labels = SampleLabels(split)
    out_device = _output_device(dali_device, device_id, backend.device)

    def replay(epoch: int, step: int):
        pipe, _ = build(epoch, decode=False)
        pipe.build()
        for _ in range(step + 1):
            data, info = pipe.run()
        names = [split.name(i) for i in sample_labels.indices(info.as_array())]
        return list(zip(names, [np.array(data[i]).tobytes() for i in range(len(data))]))

    def make_epoch(epoch: int) -> DaliEpoch:
        pipe, count = build(epoch)
        iterator = _epoch_iterator(pipe, count, share, crop.crop_size, host_resize, backend.device, exact=False)
        return DaliEpoch(epoch, pipe, iterator, share.batch_size, split.root,
                         to_labels=lambda info: sample_labels(info).to(out_device),
                         replay=lambda step: replay(epoch, step))

    loader = DaliLoader(make_epoch, share, split.classes, out_device, crop.crop_size)
    if own_indexes:  # read by every epoch's pipeline: kept while the loader lives
        weakref.finalize(loader, shutil.rmtree, own_indexes, True)
    return loader


def _index_paths(split) -> tuple[list[str], str | None]:
    """Each shard's DALI index, and the temporary folder of those rmix wrote (None if every shard has one).

    A shard without its .idx gets one written from its tar headers (`wds.index_shard`, the scan that
    counted it) outside the data directory, which stays as it was: DALI then reads the samples rmix
    counted, and does not infer its own index at every epoch's start (nor log that it does)."""
    if all(split.indexes):
        return [os.path.join(split.root, i) for i in split.indexes], None
    from rmix.pipelines.wds import index_shard, write_dali_index
    tmp = tempfile.mkdtemp(prefix="rmix-wds-idx-")
    out = []
    for k, (shard, index) in enumerate(zip(split.shards, split.indexes)):
        if index:
            out.append(os.path.join(split.root, index))
        else:
            out.append(os.path.join(tmp, f"{k:06d}.idx"))
            write_dali_index(index_shard(os.path.join(split.root, shard)), out[-1])
    return out, tmp
