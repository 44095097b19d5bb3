"""A loader from one description: a source (`FolderIndex`, `ShardSplit` or `Arrays`), this rank's
`Share` of it, the `Backend` that reads it and, for encoded images, the `Crop`.

    index = scan_image_folder("data/train")
    loader(index, Share(index.num_samples, train=True, batch_size=64), Backend("dali"), Crop(224))
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from rmix.pipelines.arrays import Arrays
from rmix.pipelines.folders import FolderIndex
from rmix.pipelines.split import Share
from rmix.pipelines.wds import ShardSplit

if TYPE_CHECKING:  # annotations only: torch loads where a loader is built, not on import
    import torch

# The data side's choices, spelled once: rmix.config and the CLI read them from here.
LOADERS = ("dali", "torch")
DALI_DEVICES = ("auto", "cpu", "gpu")  # DALI's decoder: gpu is nvJPEG ("mixed"); auto: gpu on a cuda device
TORCH_DECODES = ("workers", "device")  # the torch loader's: PIL in the workers, or torchvision.io on the device



@dataclass(frozen=True)
class Crop:
    """How encoded images (folders, shards) become uint8 (crop_size, crop_size, 3).

    Train: random-resized crop (area in [min_area, 1], ratio [3/4, 4/3]) + flip; val: resize the
    shorter side to val_resize + centre crop.
    """
    crop_size: int = 224
    min_area: float = 0.08
    val_resize: int = 256
    aug_plus: bool = False  # train: colour jitter 0.4 (brightness, contrast, saturation) + PCA lighting 0.1

    def __post_init__(self):
        if self.crop_size < 1:
            raise ValueError(f"crop_size must be >= 1, got {self.crop_size}")
        if self.val_resize < self.crop_size:
            raise ValueError(f"val_resize ({self.val_resize}) must be >= crop_size ({self.crop_size})")
        if not 0.0 < self.min_area <= 1.0:
            raise ValueError(f"min_area must be in (0, 1], got {self.min_area}")


@dataclass(frozen=True)
class Backend:
    """Which loader reads the source, with how many threads, and where its batches go."""
    loader: str                            # "dali" | "torch"
    workers: int = 2                       # DALI's CPU threads, or DataLoader workers (0 = in this process)
    dali_device: str = "auto"              # DALI's decoder: "auto" (gpu when device is cuda), "cpu", "gpu" (nvJPEG)
    torch_decode: str = "workers"          # the torch loader's: "workers" (PIL) or "device" (torchvision.io on device)
    device: torch.device | str = "cpu"     # where batches are delivered

    def __post_init__(self):
        import torch
        if self.loader not in LOADERS:
            raise ValueError(f"kind must be {' or '.join(map(repr, LOADERS))}, got {self.loader!r}")
        try:
            object.__setattr__(self, "device", torch.device(self.device))
        except RuntimeError:
            raise ValueError(f"device: {self.device!r} is not a torch device (cpu, cuda, cuda:N)") from None


def loader(source: FolderIndex | ShardSplit | Arrays, share: Share, backend: Backend, crop: Crop | None = None):
    """The loader of ``backend.loader`` over ``source``, yielding this rank's ``share`` (see `pipelines`).

    ``crop`` is for encoded images (None: `Crop()`); arrays keep their size, train: zero-pad 4 +
    random crop (+ flip, `Arrays.flip`).
    """
    if share.num_samples != source.num_samples:
        raise ValueError(f"a share of {share.num_samples} samples for a source of {source.num_samples}")
    crop = crop or Crop()
    if backend.loader == "torch":
        from rmix.pipelines.torch_loader import array_loader, image_loader
        if isinstance(source, Arrays):
            return array_loader(source, share, backend)
        return image_loader(source, share, crop, backend)
    from rmix.pipelines.dali import array_loader, folder_loader, shard_loader  # DALI is imported only here
    if isinstance(source, Arrays):
        return array_loader(source, share, backend)
    if isinstance(source, ShardSplit):
        return shard_loader(source, share, crop, backend)
    return folder_loader(source, share, crop, backend)
