"""DALI ImageFolder pipelines and the one adapter that gives them the loader contract.

Train: ROI decode of a random-resized crop (only the crop's JPEG blocks are decoded), resize to
crop_size (bilinear, antialiased when shrinking, like PIL's BILINEAR), horizontal flip p=0.5.
Val: decode, resize the shorter side to val_resize with torchvision's size rule, centre crop
with torchvision's rounding. Both emit uint8 HWC; normalization happens later, in the fused op.

Shuffling: the reader gets the files and labels of `pipelines.scan_image_folder` (ImageFolder's
order and labels), for train permuted by `seed`, and `shuffle_after_epoch=True`: a fresh global
permutation every epoch, the same on every rank, and each rank reads its contiguous shard of
it, so an epoch holds every image once across ranks. DALI seeds that per-epoch shuffle with a
fixed constant (before `shuffle_after_epoch_seed`, new in 2026), so `seed` enters through the
list's order. (`random_shuffle=True` only shuffles within a 1024-sample window of one fixed
permutation, so consecutive epochs would see almost the same batches.)
"""
from __future__ import annotations

import os
import tempfile

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types
import nvidia.dali.math as dmath
from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

from pipelines import (PCA_EIGVAL, PCA_EIGVEC, FolderIndex, derive_seed, shard_indices,
                       train_batches, val_batches)

# nvJPEG preallocation in bytes (NVIDIA's ResNet-50 example): large enough for ImageNet's
# biggest images, so the mixed decoder does not reallocate mid-epoch.
_DEVICE_MEMORY_PADDING = 211_025_920
_HOST_MEMORY_PADDING = 140_544_512

GRAY_WEIGHTS = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R 601-2 luma, as PIL "L"


def resolve_dali_device(dali_device: str, device: torch.device) -> tuple[str, int | None]:
    """Map (dali_device, torch device) to (decoder backend, DALI device_id); no CUDA call on CPU."""
    if dali_device not in ("auto", "cpu", "gpu"):
        raise ValueError(f"dali_device must be 'auto', 'cpu' or 'gpu', got {dali_device!r}")
    use_gpu = dali_device == "gpu" or (dali_device == "auto" and device.type == "cuda")
    if not use_gpu:
        return "cpu", None  # device_id=None: DALI never touches CUDA
    if device.type != "cuda" or not torch.cuda.is_available():
        raise ValueError(f"dali_device='gpu' needs a CUDA device, got device={device} "
                         f"(cuda available: {torch.cuda.is_available()})")
    return "mixed", device.index if device.index is not None else torch.cuda.current_device()


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


def _colour_jitter_and_lighting(images, on_gpu: bool):
    """Brightness, contrast, saturation ~ U(0.6, 1.4) then PCA lighting 0.1; uint8 -> uint8.

    Without clamping the three jitter ops commute (each is x -> a x + (1 - a) g with g a grey
    level that the others preserve or scale alike), so this fixed order differs from
    torchvision's random order only where an intermediate value is clipped at 0 or 255.
    """
    def param(node):
        return node.gpu() if on_gpu else node  # keep every arithmetic operand on one device

    b = param(fn.random.uniform(range=[0.6, 1.4]))
    c = param(fn.random.uniform(range=[0.6, 1.4]))
    s = param(fn.random.uniform(range=[0.6, 1.4]))
    gray_w = types.Constant(GRAY_WEIGHTS)
    x = dmath.clamp(fn.cast(images, dtype=types.FLOAT) * b, 0.0, 255.0)
    mean_gray = fn.reductions.sum(fn.reductions.mean(x, axes=[0, 1]) * gray_w)  # scalar
    x = dmath.clamp(x * c + mean_gray * (1.0 - c), 0.0, 255.0)
    gray = fn.reductions.sum(x * gray_w, axes=[2], keep_dims=True)              # (H, W, 1)
    x = dmath.clamp(x * s + gray * (1.0 - s), 0.0, 255.0)
    alpha = fn.random.normal(shape=[3]) * types.Constant(0.1 * PCA_EIGVAL * 255.0)
    offset = sum(alpha[j] * types.Constant(PCA_EIGVEC[:, j]) for j in range(3))  # (3,), 0..255
    return fn.cast(x + param(offset), dtype=types.UINT8)  # cast rounds and saturates to 0..255


def decode_and_augment(jpegs, *, train: bool, decoder: str, crop_size: int, min_area: float,
                       val_resize: int, aug_plus: bool):
    """Encoded images -> uint8 (crop_size, crop_size, 3) HWC: the graph train and val share.

    EXIF orientation is ignored, as PIL's Image.open (torchvision's loader) ignores it.
    """
    mixed = decoder == "mixed"
    pad = dict(device_memory_padding=_DEVICE_MEMORY_PADDING,
               host_memory_padding=_HOST_MEMORY_PADDING) if mixed else {}
    resize = dict(interp_type=types.INTERP_LINEAR, antialias=True)
    if train:
        images = fn.decoders.image_random_crop(
            jpegs, device=decoder, output_type=types.RGB, adjust_orientation=False,
            random_area=[min_area, 1.0], random_aspect_ratio=[3 / 4, 4 / 3], num_attempts=10, **pad)
        images = fn.resize(images, resize_x=crop_size, resize_y=crop_size, **resize)
        images = fn.flip(images, horizontal=fn.random.coin_flip(probability=0.5))
        if aug_plus:
            images = _colour_jitter_and_lighting(images, on_gpu=mixed)
        return images
    # torchvision's Resize(val_resize): short side -> val_resize, long side -> int(val_resize *
    # long / short). Integer arithmetic on the header's shape gives exactly those sizes.
    shape = fn.peek_image_shape(jpegs, adjust_orientation=False)  # (H, W, C) int64
    height, width = shape[0], shape[1]
    short = dmath.min(height, width)
    new_h = (height * val_resize) // short
    new_w = (width * val_resize) // short
    images = fn.decoders.image(jpegs, device=decoder, output_type=types.RGB,
                               adjust_orientation=False, **pad)
    images = fn.resize(images, resize_y=fn.cast(new_h, dtype=types.FLOAT),
                       resize_x=fn.cast(new_w, dtype=types.FLOAT), **resize)
    start = fn.cast(fn.stack(_centre_offset(new_h, crop_size), _centre_offset(new_w, crop_size)),
                    dtype=types.INT32)
    return fn.slice(images, start=start, shape=[crop_size, crop_size], axis_names="HW")


@pipeline_def
def image_folder_pipeline(file_root: str, file_list: str, *, train: bool, shard_id: int,
                          num_shards: int, decoder: str, crop_size: int, min_area: float,
                          val_resize: int, aug_plus: bool):
    """readers.file over a "path label" list file -> (images uint8 HWC, labels int32 (1,))."""
    # val: each rank keeps its shard, in file order
    shuffle = dict(shuffle_after_epoch=True) if train else dict(stick_to_shard=True)
    jpegs, labels = fn.readers.file(
        file_root=file_root, file_list=file_list, shard_id=shard_id, num_shards=num_shards,
        pad_last_batch=True, name="Reader", **shuffle)
    images = decode_and_augment(jpegs, train=train, decoder=decoder, crop_size=crop_size,
                                min_area=min_area, val_resize=val_resize, aug_plus=aug_plus)
    return images, labels.gpu() if decoder == "mixed" else labels


class CifarSource:
    """external_source callback: batch ``info.iteration`` of epoch ``info.epoch_idx`` on one rank.

    The split is `pipelines.shard_indices`, as the torchvision loader's; StopIteration ends the
    epoch (train: after the last full batch).
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, *, train: bool, batch_size: int,
                 seed: int, rank: int, world_size: int):
        self.images, self.labels = images, labels.astype(np.int32)
        self.train, self.batch_size, self.seed = train, batch_size, seed
        self.rank, self.world_size = rank, world_size
        count = train_batches if train else val_batches
        self.num_batches = count(len(labels), batch_size, world_size)
        self._epoch, self._indices = None, None

    def __call__(self, info):
        if info.epoch_idx != self._epoch:
            self._epoch = info.epoch_idx
            self._indices = np.asarray(shard_indices(
                len(self.labels), train=self.train, seed=self.seed, epoch=info.epoch_idx,
                rank=self.rank, world_size=self.world_size), dtype=np.int64)
        first = info.iteration * self.batch_size
        batch = self._indices[first:first + self.batch_size]
        if info.iteration >= self.num_batches or len(batch) == 0:
            raise StopIteration  # a val rank one image short ends early; the adapter pads
        return self.images[batch], self.labels[batch]


@pipeline_def
def cifar_pipeline(source: CifarSource, *, train: bool, on_gpu: bool):
    """CIFAR arrays -> uint8 (32, 32, 3); train: zero-pad 4, random 32x32 crop, flip p=0.5."""
    images, labels = fn.external_source(source=source, num_outputs=2, batch=True,
                                        batch_info=True, layout=["HWC", ""])
    if on_gpu:
        images, labels = images.gpu(), labels.gpu()
    if train:
        # a crop starting in [-4, 4] with zero fill == RandomCrop(32, padding=4)
        start = fn.cast(fn.random.uniform(values=list(range(-4, 5)), shape=[2]), dtype=types.INT32)
        images = fn.slice(images, start=start, shape=[32, 32], axis_names="HW",
                          out_of_bounds_policy="pad")
        images = fn.flip(images, horizontal=fn.random.coin_flip(probability=0.5))
    return images, labels


class DaliLoader:
    """The one adapter from DALIGenericIterator to the loader contract (see `pipelines`).

    The pipeline is built once and reused: each `iter()` is one epoch. An epoch abandoned
    half-way is finished on the next `iter()`, since DALI cannot reset mid-epoch.
    """

    def __init__(self, iterator: DALIGenericIterator, *, num_batches: int, classes: list[str],
                 num_samples: int, device: torch.device, crop_size: int):
        self._iterator = iterator
        self._len = num_batches
        self.classes = list(classes)
        self.num_classes = len(self.classes)
        self.num_samples = num_samples
        self.device = device
        self._crop_size = crop_size
        self._mid_epoch = False

    def __len__(self) -> int:
        return self._len

    def __iter__(self):
        if self._mid_epoch:
            while True:
                try:
                    next(self._iterator)
                except StopIteration:
                    break
            self._mid_epoch = False
        return self._epoch()

    def _epoch(self):
        self._mid_epoch = True
        batches = 0
        while True:
            try:
                data = next(self._iterator)  # auto_reset: StopIteration leaves it at the next epoch
            except StopIteration:
                break
            images = data[0]["images"]
            labels = data[0]["labels"].reshape(-1).to(torch.int64)
            if images.device != self.device:  # dali_device="cpu" with a CUDA device
                images = images.to(self.device, non_blocking=True)
                labels = labels.to(self.device, non_blocking=True)
            batches += 1
            yield images, labels
        self._mid_epoch = False
        for _ in range(batches, self._len):  # a val rank one image short: trailing empty batch
            yield (torch.empty(0, self._crop_size, self._crop_size, 3, dtype=torch.uint8,
                               device=self.device),
                   torch.empty(0, dtype=torch.int64, device=self.device))


def image_folder_loader(index: FolderIndex, *, train: bool, batch_size: int, crop_size: int,
                        min_area: float, val_resize: int, aug_plus: bool, seed: int,
                        num_threads: int, device: torch.device, rank: int, world_size: int,
                        dali_device: str = "auto") -> DaliLoader:
    """A DaliLoader over an ImageFolder split.

    Train drops the partial last batch (LastBatchPolicy.DROP: every rank gets
    (N // world) // batch full batches). Val pads each shard to ceil(N / world) with
    `pad_last_batch` and LastBatchPolicy.PARTIAL trims the padding, so ranks return every
    image exactly once.
    """
    decoder, device_id = resolve_dali_device(dali_device, device)
    # The (path, label) list goes through a file: for ImageNet a 1.28M-string `files=`
    # argument costs ~8 s and ~1 GB to build, a file_list ~1 s. The reader parses it when
    # the iterator builds the pipeline, so the file is removed right after.
    with tempfile.TemporaryDirectory(prefix="rmix-dali-") as tmp:
        order = np.random.default_rng(derive_seed(seed)).permutation(len(index.files)) \
            if train else None  # the same on every rank: shards must not overlap
        file_list = write_file_list(index, os.path.join(tmp, "files.txt"), order)
        pipe = image_folder_pipeline(
            index.root, file_list, train=train, shard_id=rank, num_shards=world_size,
            decoder=decoder, crop_size=crop_size, min_area=min_area, val_resize=val_resize,
            aug_plus=aug_plus,
            batch_size=batch_size, num_threads=max(1, num_threads), device_id=device_id,
            seed=derive_seed(seed, rank))  # augmentation differs per rank; file order does not
        policy = LastBatchPolicy.DROP if train else LastBatchPolicy.PARTIAL
        iterator = DALIGenericIterator(
            [pipe], ["images", "labels"], reader_name="Reader", last_batch_policy=policy,
            auto_reset=True, prepare_first_batch=False)
    expected = (train_batches if train else val_batches)(len(index.files), batch_size, world_size)
    if len(iterator) != expected:  # the contract's len, checked against DALI's own count
        raise RuntimeError(f"DALI iterator has {len(iterator)} batches, expected {expected}")
    return DaliLoader(iterator, num_batches=expected, classes=index.classes,
                      num_samples=len(index.files),
                      device=_output_device(decoder, device_id, device), crop_size=crop_size)


def cifar_loader(images: np.ndarray, labels: np.ndarray, classes: list[str], *, train: bool,
                 batch_size: int, seed: int, num_threads: int, device: torch.device, rank: int,
                 world_size: int, dali_device: str = "auto") -> DaliLoader:
    """A DaliLoader over CIFAR arrays (uint8 (N, 32, 32, 3)) fed by external_source."""
    decoder, device_id = resolve_dali_device(dali_device, device)
    source = CifarSource(images, labels, train=train, batch_size=batch_size, seed=seed,
                         rank=rank, world_size=world_size)
    pipe = cifar_pipeline(source, train=train, on_gpu=decoder == "mixed", batch_size=batch_size,
                          num_threads=max(1, num_threads), device_id=device_id,
                          seed=derive_seed(seed, rank))
    # No reader: the source's StopIteration ends each epoch, whatever its batch count.
    iterator = DALIGenericIterator([pipe], ["images", "labels"], auto_reset=True,
                                   prepare_first_batch=False)
    return DaliLoader(iterator, num_batches=source.num_batches, classes=classes,
                      num_samples=len(labels), device=_output_device(decoder, device_id, device),
                      crop_size=32)


def _output_device(decoder: str, device_id: int | None, device: torch.device) -> torch.device:
    return torch.device("cuda", device_id) if decoder == "mixed" else device
