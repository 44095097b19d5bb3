"""The torchvision baseline: ImageFolder (or CIFAR and MNIST arrays) + DataLoader, same transforms and
contract as the DALI loaders.

Sharding is `Share.indices` (DistributedSampler's split, reshuffled per epoch).
Augmentation randomness is per sample, seeded from (seed, epoch, index) and sent with the
index, so batches do not depend on num_workers or on which worker decoded which image, and
an epoch depends on (seed, epoch, rank) only (`TorchLoader.set_epoch`).

A file PIL cannot open or decode does not raise in the worker (the DataLoader would re-raise
it as a bare message): the item comes back as `Unreadable`, its batch as `UnreadableBatch`,
and the loader raises `pipelines.DecodeError` naming the file, the epoch and the batch.
"""
from __future__ import annotations

import functools
import gc
import io
import os
import signal
import threading
import warnings
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import transforms
from torchvision.datasets import ImageFolder
from torchvision.transforms import functional as TF

from rmix.pipelines.arrays import Arrays
from rmix.pipelines.build import TORCH_DECODES, Backend, Crop
from rmix.pipelines.colour import PaperColour
from rmix.pipelines.errors import DecodeError, one_line
from rmix.pipelines.folders import FolderIndex
from rmix.pipelines.images import open_rgb
from rmix.pipelines.seeds import derive
from rmix.pipelines.split import EpochCounter, Share
from rmix.pipelines.streams import ordered_decode
from rmix.pipelines.wds import ShardSplit


def _to_hwc_uint8(image) -> torch.Tensor:
    """PIL RGB image -> uint8 (H, W, 3) tensor."""
    return torch.from_numpy(np.array(image, dtype=np.uint8, copy=True))


def build_transform(crop: Crop, train: bool) -> transforms.Compose:
    """PIL image -> uint8 (crop_size, crop_size, 3); PIL resizes with BILINEAR (antialiased)."""
    if not train:
        return transforms.Compose([transforms.Resize(crop.val_resize), transforms.CenterCrop(crop.crop_size),
                                   _to_hwc_uint8])
    steps = [transforms.RandomResizedCrop(crop.crop_size, scale=(crop.min_area, 1.0), ratio=(3 / 4, 4 / 3)),
             transforms.RandomHorizontalFlip(), _to_hwc_uint8]
    if crop.aug_plus:  # the paper's own jitter and lighting, unclamped (not torchvision's ColorJitter, which clamps)
        steps.append(PaperColour())
    return transforms.Compose(steps)


class IndexedImageFolder(ImageFolder):
    """ImageFolder over a `FolderIndex` (no second scan); items are keyed by (index, aug_seed)."""

    def __init__(self, index: FolderIndex, transform):
        self._index = index
        super().__init__(index.root, transform=transform, loader=open_rgb)

    def find_classes(self, directory):
        return list(self._index.classes), {c: i for i, c in enumerate(self._index.classes)}

    def make_dataset(self, directory, *args, **kwargs):
        return [(os.path.join(self._index.root, f), label)
                for f, label in zip(self._index.files, self._index.labels)]

    def __getitem__(self, key):
        index, aug_seed = key
        path, label = self.samples[index]
        try:
            image = self.loader(path)  # open_rgb: the whole decode happens here
        except Exception as error:  # named by TorchLoader with its epoch and batch
            return Unreadable(path, one_line(error)), label
        return seeded(self.transform, image, aug_seed), label


class Unreadable(NamedTuple):
    """An item whose file could not be opened or decoded, in place of its image."""
    path: str
    reason: str   # "Type: message", one line


class UnreadableBatch(NamedTuple):
    """A batch that held at least one `Unreadable`, in place of (images, labels)."""
    failures: list   # [Unreadable]


class EncodedImageFolder(IndexedImageFolder):
    """Items as the files' bytes, with their augmentation seeds: `DeviceDecode` decodes them later."""

    def __getitem__(self, key):
        index, aug_seed = key
        path, label = self.samples[index]
        try:
            with open(path, "rb") as f:
                data = torch.frombuffer(bytearray(f.read()), dtype=torch.uint8)
        except Exception as error:  # named by TorchLoader with its epoch and batch
            return Unreadable(path, one_line(error)), label
        return (data, aug_seed), label


class EncodedBatch(NamedTuple):
    """A batch of undecoded files, as `DeviceDecode` takes it."""
    data: torch.Tensor  # uint8: the files' bytes one after another (one tensor crosses from the
                        # worker, not one per file: hundreds of shared-memory handles broke the pipe)
    sizes: list         # [int], each file's length in data
    seeds: list         # [int], each image's augmentation seed
    labels: torch.Tensor


def _torchvision_decode_jpeg():
    """torchvision.io.decode_jpeg, or ValueError where this torchvision has none (removed after 0.29)."""
    import torchvision
    from torchvision import io as tvio
    if not hasattr(tvio, "decode_jpeg"):
        raise ValueError(f"--torch-decode device: torchvision {torchvision.__version__} has no io.decode_jpeg; "
                         "use --torch-decode workers or --loader dali")
    return tvio.decode_jpeg, tvio.ImageReadMode.RGB


class DeviceDecode:
    """Encoded images -> uint8 (N, S, S, 3) on `device`: decode, crop, resize and flip there.

    On a GPU the decode is nvJPEG (`torchvision.io.decode_jpeg(..., device="cuda")`, the whole batch
    at once), ordered with torch's stream by `pipelines.streams.ordered_decode`, and the crops are
    resized on the device; on a CPU the same code runs on the CPU. The crop and flip of each image
    are drawn exactly as the PIL path draws them (RandomResizedCrop's get_params, then the flip's
    coin, under the image's seed), so both paths crop the same boxes; the pixels differ only by the
    decoder's and the resize's rounding. A file nvJPEG refuses (CMYK, PNG under a .jpg name) is
    decoded by PIL, as the workers decode it; one nothing decodes comes back Unreadable.

    torchvision's decoder, not TorchCodec's (its named successor): TorchCodec turns every JPEG by its
    EXIF orientation, with no way to ask otherwise, while PIL and DALI (adjust_orientation=False) do
    not, so the loaders would disagree on rotated photos; its CUDA decode also waits on the host for
    the caller's stream before and after each batch. Figures: BENCHMARKS.md, `rmix bench data --decoders`.
    """

    def __init__(self, device, crop: Crop, train: bool):
        self.device, self.train, self.size = torch.device(device), train, crop.crop_size
        self.min_area, self.val_resize = crop.min_area, crop.val_resize
        self._decode_jpeg, self._rgb = _torchvision_decode_jpeg()

    def __call__(self, batch: EncodedBatch, files):
        """(images uint8 (N, S, S, 3) on the device, labels), or an UnreadableBatch naming the bad files.

        `files()`: the batch's paths, asked for only when a file needs naming."""
        images = self._decode(list(torch.split(batch.data, batch.sizes)), files)
        failures = [x for x in images if isinstance(x, Unreadable)]
        if failures:
            return UnreadableBatch(failures)
        out = torch.empty(len(images), self.size, self.size, 3, dtype=torch.uint8, device=self.device)
        for i, (image, seed) in enumerate(zip(images, batch.seeds)):
            out[i] = seeded(self._transform, image, seed).permute(1, 2, 0)
        return out, batch.labels

    def _jpegs(self, data: list) -> list:
        with warnings.catch_warnings():  # torchvision >= 0.29 warns on every call (see the class doc)
            warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torchvision\.io")
            return self._decode_jpeg(data, mode=self._rgb, device=self.device)

    def _decode(self, data, files):
        if not data:
            return []
        try:  # the whole batch in one call: nvJPEG's batched decode on a GPU
            return ordered_decode(self._jpegs, data, self.device)
        except RuntimeError:
            return [self._decode_one(d, f) for d, f in zip(data, files())]

    def _decode_one(self, data, path):
        try:
            return ordered_decode(self._jpegs, [data], self.device)[0]
        except RuntimeError:
            pass
        try:  # what the device decoder refuses (PNG, CMYK, ...): PIL, as the workers decode it
            image = _to_hwc_uint8(open_rgb(io.BytesIO(data.numpy().tobytes())))
            return image.permute(2, 0, 1).to(self.device)
        except Exception as error:
            return Unreadable(path, one_line(error))

    def _transform(self, image):
        """uint8 (3, H, W) -> (3, S, S); draws from the global generator, as `seeded` arranges."""
        if not self.train:
            image = TF.resize(image, self.val_resize, antialias=True)
            return TF.center_crop(image, [self.size, self.size])
        top, left, h, w = transforms.RandomResizedCrop.get_params(image, scale=(self.min_area, 1.0),
                                                                  ratio=(3 / 4, 4 / 3))
        image = TF.resized_crop(image, top, left, h, w, [self.size, self.size], antialias=True)
        return image.flip(-1) if torch.rand(1) < 0.5 else image  # RandomHorizontalFlip's draw


def _collate_encoded(batch):
    images, labels = zip(*batch) if batch else ((), ())
    failures = [x for x in images if isinstance(x, Unreadable)]
    if failures:
        return UnreadableBatch(failures)
    data = torch.cat([d for d, _ in images]) if images else torch.empty(0, dtype=torch.uint8)
    return EncodedBatch(data, [len(d) for d, _ in images], [s for _, s in images],
                        torch.tensor(labels, dtype=torch.int64))


class ArrayDataset(Dataset):
    """uint8 (N, S, S, 3) images, (N,) labels; item (index, aug_seed) -> (HWC uint8, label)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key):
        index, aug_seed = key
        image = torch.from_numpy(self.images[index]).permute(2, 0, 1)  # CHW view for transforms
        if self.transform is not None:
            image = seeded(self.transform, image, aug_seed)
        return image.permute(1, 2, 0).contiguous(), int(self.labels[index])


def seeded(transform, image, aug_seed: int):
    """transform(image) with the global CPU generator seeded to aug_seed, then restored.

    torchvision transforms draw from the global generator; restoring it leaves the main
    process's RNG (num_workers=0) as it was. torch.default_generator, not torch.manual_seed,
    which would also reseed CUDA.
    """
    state = torch.default_generator.get_state()
    torch.default_generator.manual_seed(aug_seed)
    try:
        return transform(image)
    finally:
        torch.default_generator.set_state(state)


class ShardBatchSampler(Sampler):
    """Batches of (index, aug_seed) for one rank; see the module docstring for the split."""

    def __init__(self, share: Share):
        self.share = share
        self.epoch = self.start_step = 0

    def set_epoch(self, epoch: int, start_step: int = 0):
        self.epoch, self.start_step = epoch, start_step

    def __len__(self) -> int:
        return self.share.num_batches

    def batch_indices(self, epoch: int, step: int) -> list[int]:
        """The sample indices of batch ``step`` of ``epoch`` on this rank."""
        size = self.share.batch_size
        return self.share.indices(epoch)[step * size:(step + 1) * size]

    def __iter__(self):
        share, size = self.share, self.share.batch_size
        mine = np.asarray(share.indices(self.epoch), dtype=np.int64)
        rng = np.random.default_rng(derive(share.seed, "torch_augment", epoch=self.epoch))
        aug_seeds = rng.integers(0, 2**63 - 1, size=share.num_samples)  # same on every rank
        seeds = aug_seeds[mine]
        if share.train and not share.drop_last:
            # the padding repeats a few samples: each repeat is augmented anew, as in a DataLoader
            place = share.rank + share.world_size * np.arange(len(mine))  # in the padded permutation
            extra = rng.integers(0, 2**63 - 1, size=share.world_size)
            seeds = np.where(place >= share.num_samples, extra[np.clip(place - share.num_samples, 0, None)], seeds)
        # val: a rank one image short may end with an empty batch; train with drop_last=False: a short one
        for b in range(self.start_step, share.num_batches):
            chunk = slice(b * size, (b + 1) * size)
            yield list(zip(mine[chunk].tolist(), seeds[chunk].tolist()))


class _Collate:
    """[(uint8 (H, W, 3), label)] -> (uint8 (N, H, W, 3), int64 (N,)); N may be 0."""

    def __init__(self, crop_size: int):
        self.crop_size = crop_size

    def __call__(self, batch):
        if not batch:
            return (torch.empty(0, self.crop_size, self.crop_size, 3, dtype=torch.uint8),
                    torch.empty(0, dtype=torch.int64))
        images, labels = zip(*batch)
        failures = [x for x in images if isinstance(x, Unreadable)]
        if failures:
            return UnreadableBatch(failures)
        return torch.stack(images), torch.tensor(labels, dtype=torch.int64)


def _leave_stop_signals_to_the_trainer(worker_id):
    # SIGTERM/SIGUSR1 reach every process of the job (torchrun's killpg, SLURM): torch's workers
    # would die of them at once and fail the step the trainer is finishing before it saves
    # (rmix.preempt). So a worker takes them on a thread of its own, and obeys only a SIGTERM from
    # its trainer (multiprocessing's terminate(), at the trainer's exit).
    trainer, stop = os.getppid(), {signal.SIGTERM, signal.SIGUSR1}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop)

    def wait():
        while True:
            info = signal.sigwaitinfo(stop)
            if info.si_signo == signal.SIGTERM and info.si_pid == trainer:
                os._exit(128 + signal.SIGTERM)

    threading.Thread(target=wait, name="rmix-stop-signals", daemon=True).start()


class TorchLoader(EpochCounter):
    """A DataLoader over (index, aug_seed)-keyed items behind the loader contract.

    `iter()` runs the next epoch, or the one given to `set_epoch`; workers persist across
    epochs when there are any (`Backend.workers`). Iterate one epoch at a time: the DataLoader is shared.
    ``device_decode``: the items are encoded images, decoded and cropped on the device.

    An unreadable image raises `pipelines.DecodeError` naming it and its batch; the
    mid-epoch workers are shut down first. Treat the loader as unusable after it.
    """

    def __init__(self, dataset, classes: list[str], share: Share, backend: Backend, crop_size: int,
                 device_decode: DeviceDecode | None = None):
        self.device, self._device_decode = backend.device, device_decode
        self.classes = list(classes)
        self.num_classes = len(self.classes)
        self.num_samples = len(dataset)
        self._dataset = dataset
        self.batch_sampler = ShardBatchSampler(share)
        workers = max(0, backend.workers)
        # No reference back to self: a DataLoader with live workers that only the garbage
        # collector can free (a reference cycle) waits 5 s per worker to shut down.
        self._make_dataloader = functools.partial(
            DataLoader, dataset, batch_sampler=self.batch_sampler, num_workers=workers,
            collate_fn=_Collate(crop_size) if device_decode is None else _collate_encoded,
            pin_memory=self.device.type == "cuda" and device_decode is None,
            persistent_workers=workers > 0, worker_init_fn=_leave_stop_signals_to_the_trainer)
        self._loader = self._make_dataloader()
        self._forks = workers > 0  # the next iter() starts worker processes

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def close(self):
        """Stop the workers now, cleanly: they ignore SIGTERM, which is what multiprocessing's
        exit handler would send them when an error leaves them alive to the interpreter's end."""
        it = getattr(self._loader, "_iterator", None)
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()

    def __iter__(self):
        return self._batches(*self._take_epoch())

    def _files(self, epoch: int, step: int) -> list[str]:
        return [self._dataset.samples[i][0] for i in self.batch_sampler.batch_indices(epoch, step)]

    def _batches(self, epoch: int, start: int):
        # the sampler runs in this process, at iter() below; per-sample seeds make skipping free
        self.batch_sampler.set_epoch(epoch, start)
        if self._forks:
            # The workers fork from this process. Collect first, so that no dead DALI pipeline
            # waiting in a reference cycle is freed inside a worker: there its executor's
            # threads do not exist and its destructor blocks forever (seen with DALI 2.4).
            gc.collect()
            self._forks = False
        non_blocking = self.device.type == "cuda"
        for step, batch in enumerate(self._loader, start):
            if self._device_decode is not None and isinstance(batch, EncodedBatch):
                batch = self._device_decode(batch, functools.partial(self._files, epoch, step))
            if isinstance(batch, UnreadableBatch):
                break
            images, labels = batch
            yield (images.to(self.device, non_blocking=non_blocking),
                   labels.to(self.device, non_blocking=non_blocking))
        else:
            return
        # Drop the DataLoader and its mid-epoch workers now: left to the garbage collector
        # (the error's traceback holds this frame), its shutdown waits 5 s per worker.
        self._loader = self._make_dataloader()
        self._forks = self._loader.num_workers > 0
        files = self._files(epoch, step)
        raise DecodeError(epoch, step, files, [f.path for f in batch.failures],
                          "; ".join(dict.fromkeys(f.reason for f in batch.failures)))


class ShardDataset(Dataset):
    """The samples of a `pipelines.wds.ShardSplit`, read by offset; items keyed by (index, aug_seed).

    ``samples`` holds ("shard.tar:member", label) pairs, so errors name the member as the
    preflight does. ``encoded``: items are the bytes, for `DeviceDecode`.
    """

    def __init__(self, split, transform, encoded: bool = False):
        self.split, self.transform, self.encoded = split, transform, encoded
        self.samples = [(split.name(i), s.label) for i, s in enumerate(split.samples)]  # -1: read with the image

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key):
        index, aug_seed = key
        name, label = self.samples[index]
        try:
            data, label = self.split.read_with_label(index)
            if self.encoded:
                return (torch.frombuffer(bytearray(data), dtype=torch.uint8), aug_seed), label
            image = open_rgb(io.BytesIO(data))  # what the folder loader does
        except Exception as error:  # named by TorchLoader with its epoch and batch
            return Unreadable(name, one_line(error)), label
        return seeded(self.transform, image, aug_seed), label


def image_loader(source: FolderIndex | ShardSplit, share: Share, crop: Crop, backend: Backend) -> TorchLoader:
    """A TorchLoader over encoded images: an ImageFolder split, or WebDataset shards read by offset
    (the same split, order and transforms).

    ``backend.torch_decode``: "workers", PIL decode and torchvision transforms in the DataLoader
    workers; or "device", the workers read the files and `DeviceDecode` decodes and crops on the
    device (nvJPEG on a GPU).
    """
    if backend.torch_decode not in TORCH_DECODES:
        raise ValueError(f"--torch-decode: expected {' or '.join(map(repr, TORCH_DECODES))}, "
                         f"got {backend.torch_decode!r}")
    encoded = backend.torch_decode == "device"
    if encoded:
        if crop.aug_plus:
            raise ValueError("--aug-plus: the paper's colour runs in the workers; use --torch-decode workers")
        device_decode, transform = DeviceDecode(backend.device, crop, share.train), None
    else:
        device_decode, transform = None, build_transform(crop, share.train)
    if isinstance(source, ShardSplit):
        dataset = ShardDataset(source, transform, encoded=encoded)
    else:
        dataset = (EncodedImageFolder if encoded else IndexedImageFolder)(source, transform)
    return TorchLoader(dataset, source.classes, share, backend, crop.crop_size, device_decode)


def array_loader(arrays: Arrays, share: Share, backend: Backend) -> TorchLoader:
    """A TorchLoader over square uint8 (N, S, S, 3) arrays; train: RandomCrop(S, padding=4) (+ flip)."""
    size = arrays.images.shape[1]
    steps = [transforms.RandomCrop(size, padding=4)] + ([transforms.RandomHorizontalFlip()] if arrays.flip else [])
    transform = transforms.Compose(steps) if share.train else None
    return TorchLoader(ArrayDataset(arrays.images, arrays.labels, transform), arrays.classes, share, backend, size)
