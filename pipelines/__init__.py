"""Data loaders: one contract, two implementations (DALI and torchvision).

Every loader yields ``(images, labels)`` already on ``device``:
``images`` uint8 ``(N, H, W, 3)`` contiguous, ``labels`` int64 ``(N,)``.
``len(loader)`` is the number of batches per epoch on this rank (the same on every rank) and
each ``iter(loader)`` is one epoch (train: freshly shuffled). Normalization is not done here.

Epochs are addressable: ``loader.set_epoch(e)`` (0-based, as DistributedSampler's) makes the
next ``iter()`` yield exactly epoch ``e`` of an uninterrupted run (``set_epoch(e, k)``: from its
batch ``k`` on) -- the same order (the split of `Share.indices`, the same for both kinds) and
the same augmentation randomness, whatever this loader object ran before. Without it each
``iter()`` runs the epoch after the last one started. An image that cannot be read or decoded
raises `DecodeError` naming the epoch, the batch and its files.

A loader is built from a source and its description, `build.loader(source, share, backend, crop)`.
The modules, one job each: `errors` (what the data path raises), `folders` (ImageFolder splits),
`wds` (WebDataset shards), `arrays` and `idx` (CIFAR and MNIST in memory), `images` (PIL decoding),
`split` (this rank's share of a split), `seeds` (every random stream of a run), `build` (the description and the dispatcher),
`dali` and `torch_loader` (the two implementations), `host_resize` and `streams` (their device and
thread plumbing), `colour` (the paper's colour augmentation), `preflight`, `prepare` and `synth`
(checking, converting and generating data sets).
"""

from rmix.pipelines.arrays import Arrays, CifarError, check_array_dataset, first_per_class, load_cifar, read_arrays
from rmix.pipelines.build import Backend, Crop, loader
from rmix.pipelines.errors import DecodeError, MissingPackage, dali_wheel, missing_dali, one_line
from rmix.pipelines.folders import IMG_EXTENSIONS, FolderIndex, check_classes, scan_image_folder
from rmix.pipelines.images import open_rgb, pil_decodes, pil_rgb, tiff_int32
from rmix.pipelines.split import (
    EpochCounter,
    Share,
    check_seed,
    check_sharding,
    shard_indices,
    train_batches,
    val_batches,
)
from rmix.pipelines.wds import ShardSplit, scan_shards

__all__ = [
    "Arrays", "Backend", "CifarError", "Crop", "DecodeError",
    "EpochCounter", "FolderIndex", "IMG_EXTENSIONS", "MissingPackage", "Share", "ShardSplit", "check_array_dataset",
    "check_classes", "check_seed", "check_sharding", "dali_wheel", "first_per_class", "load_cifar",
    "loader", "missing_dali", "one_line", "open_rgb", "pil_decodes", "pil_rgb", "read_arrays", "scan_image_folder",
    "scan_shards", "shard_indices", "tiff_int32", "train_batches", "val_batches",
]
