"""Data loaders: one contract, two implementations (DALI and torchvision).

Every loader yields ``(images, labels)`` already on ``device``:
``images`` uint8 ``(N, H, W, 3)`` contiguous, ``labels`` int64 ``(N,)``.
``len(loader)`` is the number of batches per epoch on this rank (the same on every rank) and
each ``iter(loader)`` is one epoch (train: freshly shuffled). Normalization is not done here.

Epochs are addressable: ``loader.set_epoch(e)`` (0-based, as DistributedSampler's) makes the
next ``iter()`` yield exactly epoch ``e`` of an uninterrupted run (``set_epoch(e, k)``: from its
batch ``k`` on) -- the same order (the split
of `shard_indices`, the same for both kinds) and the same augmentation randomness, whatever
this loader object ran before. Without it each ``iter()`` runs the epoch after the last one
started. An image that cannot be read or decoded raises `DecodeError` naming the epoch, the
batch and its files.
"""
from __future__ import annotations

import os
import pickle
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:  # annotations only: torch and numpy load where a loader is built, not on import
    import numpy as np
    import torch


# The extensions torchvision's ImageFolder accepts (torchvision.datasets.folder.IMG_EXTENSIONS),
# matched case-insensitively. Both loaders read exactly these files, so labels and sample
# counts agree; DALI's own file_root scan has a different filter list and does not recurse.
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

class MissingPackage(ImportError):
    """A package that the asked-for path needs is not installed; the message says what to install."""


def dali_wheel() -> str:
    """The DALI wheel for this torch: nvidia-dali-cudaXY0 for torch's CUDA major (CUDA 13 for a CPU torch,
    whose DALI runs CPU-only with any build)."""
    import torch
    major = (torch.version.cuda or "13").split(".")[0]
    return f"nvidia-dali-cuda{major}0"


def missing_dali(error: ImportError) -> MissingPackage:
    import torch
    cuda = f"this torch's CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU torch (CPU-only mode)"
    return MissingPackage(f"--loader dali: NVIDIA DALI is not installed ({error.name or error}); "
                          f"`pip install {dali_wheel()}` (the build for {cuda}), or pass --loader torch")


def check_classes(was, now, what, was_name, now_name):
    """ValueError naming the first difference where two class lists (names, in order) differ; None: unrecorded."""
    if was is None or list(was) == list(now):
        return
    was, now = list(was), list(now)
    k = next((i for i, (a, b) in enumerate(zip(was, now)) if a != b), min(len(was), len(now)))
    first = (f"class {k} is {was[k]!r} in {was_name}, {now[k]!r} in {now_name}" if k < min(len(was), len(now))
             else f"{len(was)} classes in {was_name}, {len(now)} in {now_name}")
    raise ValueError(f"{what}: the classes differ ({first}); each label would mean another class")


class DecodeError(RuntimeError):
    """An image of one batch could not be read or decoded.

    Attributes:
        epoch: the 0-based epoch; step: the batch's index in it.
        files: every file of the batch, in batch order (absolute when the root was).
        bad_files: the files known to fail: each one for the torchvision loader; for DALI,
            which fails the whole batch, the one its message names, if any (it names a file
            whose data is corrupt, not one whose headers are), else empty: "one of".
        reason: the decoder's error, one line.
    """

    def __init__(self, epoch: int, step: int, files, bad_files=(), reason: str = ""):
        self.epoch, self.step = epoch, step
        self.files, self.bad_files, self.reason = list(files), list(bad_files), reason
        where = f"epoch {epoch}, batch {step}"
        why = f" ({reason})" if reason else ""
        if self.bad_files:
            message = (f"cannot decode {', '.join(self.bad_files)}{why} in {where}; "
                       f"the batch's {len(self.files)} files: {', '.join(self.files)}")
        else:
            message = (f"cannot decode one of the {len(self.files)} files of {where}{why}: "
                       f"{', '.join(self.files)}")
        super().__init__(" ".join(message.splitlines()))  # one line, whatever the paths hold

    def __reduce__(self):  # the default would call DecodeError(message) (DDP, multiprocessing)
        return type(self), (self.epoch, self.step, self.files, self.bad_files, self.reason)


def one_line(error: BaseException, limit: int = 300) -> str:
    """``"Type: message"`` of an exception on one line, cut to ``limit`` characters."""
    text = " ".join(f"{type(error).__name__}: {error}".split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


class FolderIndex(NamedTuple):
    """The files of an ImageFolder split, in ImageFolder's order."""
    root: str
    classes: list[str]   # sorted class folder names; label i is classes[i]
    files: list[str]     # paths relative to root, class by class, each class sorted
    labels: list[int]    # labels[i] is the class index of files[i]


def scan_image_folder(root: str | os.PathLike) -> FolderIndex:
    """List an ImageFolder split the way torchvision's ImageFolder does, failing loudly.

    Raises FileNotFoundError when ``root`` is missing or has no class folders, and ValueError
    naming the folder when a class folder holds no image (a label no sample has is almost
    always a broken copy of the dataset).
    """
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"dataset directory not found: {root}")
    with os.scandir(root) as it:
        classes = sorted(entry.name for entry in it if entry.is_dir())
    if not classes:
        raise FileNotFoundError(f"no class folders in {root} (expected root/<class>/<image>)")
    if {"train", "val"} <= set(classes):  # a dataset root read as a split: "train" and "val" as two classes
        raise ValueError(f"{root}: holds train/ and val/, a dataset's root; pass one split ({root}/train)")
    files: list[str] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        class_dir = os.path.join(root, name)
        count = 0
        for dirpath, _, fnames in sorted(os.walk(class_dir, followlinks=True)):
            for fname in sorted(fnames):
                if fname.lower().endswith(IMG_EXTENSIONS):
                    path = os.path.join(dirpath, fname)
                    _readable_name(path)
                    if os.path.islink(path) and not os.path.exists(path):
                        raise ValueError(f"{path}: a link to {os.readlink(path)}, which does not exist; remove the "
                                         "link or restore what it points to")
                    files.append(os.path.relpath(path, root))
                    labels.append(label)
                    count += 1
        if count == 0:
            raise ValueError(f"class folder has no image files ({'/'.join(IMG_EXTENSIONS)}): "
                             f"{class_dir}")
    return FolderIndex(root, classes, files, labels)


def _readable_name(path: str) -> None:
    """ValueError for a path that is not UTF-8 (Python holds its bytes as surrogates): DALI's file lists,
    the preflight's cache and every message need text."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        shown = os.fsencode(path).decode("utf-8", "backslashreplace")
        raise ValueError(f"{shown}: a file or folder name that is not UTF-8; rename it") from None


def check_sharding(num_samples: int, *, train: bool, batch_size: int, rank: int, world_size: int,
                   drop_last: bool = True):
    """Validate rank/world_size/batch_size against the split size; raises ValueError."""
    if batch_size < 1:
        raise ValueError(f"--batch-size: batch_size must be >= 1, got {batch_size}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank} world_size={world_size}")
    if num_samples < world_size:
        raise ValueError(f"{num_samples} images cannot be split over {world_size} ranks")
    if train and drop_last and (num_samples // world_size) // batch_size == 0:
        raise ValueError(
            f"--batch-size {batch_size}: {num_samples} images over {world_size} ranks give no full batch of "
            f"{batch_size} (train drops the partial batch; --keep-last keeps it)")


def train_batches(num_samples: int, batch_size: int, world_size: int, drop_last: bool = True) -> int:
    """Batches per rank per train epoch, the same on every rank.

    drop_last: N // world samples per rank, full batches only (DistributedSampler(drop_last=True)
    and DataLoader(drop_last=True)). Else ceil(N / world) samples per rank, the shards padded by
    repeating samples, and a short last batch (DistributedSampler(drop_last=False) and
    DataLoader(drop_last=False), the paper's code: 2503 steps for ImageNet at 8 x 64).
    """
    if drop_last:
        return (num_samples // world_size) // batch_size
    per_rank = -(-num_samples // world_size)  # ceil: DistributedSampler pads every rank to this
    return -(-per_rank // batch_size)


def val_batches(num_samples: int, batch_size: int, world_size: int) -> int:
    """Batches per rank per val epoch: enough for the largest shard, ceil(N / world_size).

    A rank whose shard is one image shorter may get a trailing empty batch (N=0).
    """
    largest = -(-num_samples // world_size)
    return -(-largest // batch_size)


def shard_indices(num_samples: int, *, train: bool, seed: int, epoch: int, rank: int,
                  world_size: int, drop_last: bool = True) -> list[int]:
    """This rank's sample indices for one epoch, in order: DistributedSampler's split, exactly.

    Train: a permutation of all N seeded with seed + epoch (the same on every rank); with
    drop_last cut to (N // world) * world, else padded to ceil(N / world) * world by repeating
    its first indices; then every world-th from rank. Val: rank::world in file order, no
    padding (every image once). Both loader kinds read exactly these indices in this order, so
    an epoch depends on (seed, epoch, rank, world_size, drop_last) only.
    """
    import torch
    if not train:
        return list(range(rank, num_samples, world_size))
    g = torch.Generator().manual_seed(seed + epoch)
    perm = torch.randperm(num_samples, generator=g).tolist()
    if drop_last:
        return perm[rank:(num_samples // world_size) * world_size:world_size]
    total = -(-num_samples // world_size) * world_size
    perm = (perm * -(-total // num_samples))[:total]  # repeats from the start, as DistributedSampler
    return perm[rank:total:world_size]


class EpochCounter:
    """Which epoch the next `iter()` yields, and from which batch: `set_epoch`'s, or the next whole one."""

    _next_epoch = 0
    _next_start = 0

    def set_epoch(self, epoch: int, start_step: int = 0):
        """Make the next `iter()` yield epoch ``epoch`` (0-based) of an uninterrupted run.

        With ``start_step`` k it yields that epoch's batches k, k+1, ... (resuming mid-epoch):
        the same batches the whole epoch has there, augmentation included.
        """
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        if not 0 <= start_step <= len(self):
            raise ValueError(f"start_step must be in [0, {len(self)}], got {start_step}")
        self._next_epoch, self._next_start = int(epoch), int(start_step)

    def _take_epoch(self) -> tuple[int, int]:
        """(epoch, first step) for this `iter()`; the one after starts the next epoch at 0."""
        epoch, start = self._next_epoch, self._next_start
        self._next_epoch, self._next_start = epoch + 1, 0
        return epoch, start


def derive_seed(seed: int, *parts: int) -> int:
    """A 31-bit seed from (seed, *parts), e.g. (seed, rank); stable across processes."""
    import numpy as np
    return int(np.random.SeedSequence([seed, *parts]).generate_state(1)[0] & 0x7FFF_FFFF)


def _check_crop_options(kind: str, crop_size: int, val_resize: int, min_area: float):
    """What every loader of encoded images (folders, shards) checks first; raises ValueError."""
    if kind not in ("dali", "torch"):
        raise ValueError(f"kind must be 'dali' or 'torch', got {kind!r}")
    if crop_size < 1:
        raise ValueError(f"crop_size must be >= 1, got {crop_size}")
    if val_resize < crop_size:
        raise ValueError(f"val_resize ({val_resize}) must be >= crop_size ({crop_size})")
    if not 0.0 < min_area <= 1.0:
        raise ValueError(f"min_area must be in (0, 1], got {min_area}")


def _crop_loader_args(num_samples: int, *, train, batch_size, rank, world_size, drop_last, device, **kw) -> dict:
    """The split checked against the ranks and batch (`check_sharding`), and the loaders' common arguments."""
    import torch
    check_sharding(num_samples, train=train, batch_size=batch_size, rank=rank, world_size=world_size,
                   drop_last=drop_last)
    try:
        device = torch.device(device)
    except RuntimeError:
        raise ValueError(f"device: {device!r} is not a torch device (cpu, cuda, cuda:N)") from None
    check_seed(kw.get("seed", 0))
    return dict(train=train, batch_size=batch_size, rank=rank, world_size=world_size, drop_last=drop_last,
                device=device, **kw)


def check_seed(seed) -> None:
    """ValueError naming `seed` outside [0, 2**31), the CLI's --seed range (numpy takes 32 bits, and ranks add)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**31:
        raise ValueError(f"seed: expected an integer in [0, 2**31), got {seed!r}")


def pil_rgb(image):
    """A PIL image as 8-bit RGB, scaled as DALI's decoder scales it, so both loaders see the same pixels.

    PIL's own convert("RGB") clips 16-bit samples (PNG, PGM, TIFF: mode I;16 or I) to 255, nearly
    white, and truncates float ones (mode F, in [0, 1]) to 0 or 1; DALI rounds v / 257 and v * 255.
    """
    import numpy as np
    from PIL import Image
    if tiff_int32(image):
        raise ValueError("32-bit integer TIFF samples: DALI's decoder does not read them, so neither loader does")
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        v = np.asarray(image, dtype=np.float64)
        v = np.clip(v, 0, 1) * 255 if image.mode == "F" else np.clip(v, 0, 65535) / 257
        gray = np.floor(v + 0.5).astype(np.uint8)
        return Image.fromarray(np.repeat(gray[..., None], 3, axis=-1), "RGB")
    return image.convert("RGB")


def tiff_int32(image) -> bool:
    """Whether a PIL image is a TIFF of 32-bit integer samples (BitsPerSample 32, SampleFormat not float)."""
    if getattr(image, "format", None) != "TIFF":
        return False
    tags = image.tag_v2
    return 32 in tuple(tags.get(258, ()) or ()) and 3 not in tuple(_as_tuple(tags.get(339, 1)))


def _as_tuple(v):
    return v if isinstance(v, tuple) else (v,)


def open_rgb(fp):
    """PIL open + `pil_rgb`: torchvision's ImageFolder loader, with high-bit-depth images scaled as DALI does."""
    from PIL import Image
    with Image.open(fp) as im:
        return pil_rgb(im)


def pil_decodes(data: bytes) -> bool:
    """Whether PIL opens and fully decodes ``data`` as the torch loader does (`open_rgb`)."""
    import io
    try:
        open_rgb(io.BytesIO(data)).load()
        return True
    except Exception:
        return False


def build_loader(kind: str, root, *, train: bool, batch_size: int, crop_size: int = 224,
                 min_area: float = 0.08, val_resize: int = 256, aug_plus: bool = False,
                 seed: int = 0, num_threads: int = 2, device: torch.device | str = "cpu",
                 rank: int = 0, world_size: int = 1, dali_device: str = "auto", drop_last: bool = True,
                 per_class: int = 0, torch_decode: str = "workers"):
    """Build an ImageFolder loader of ``kind`` "dali" or "torch" (see the module docstring).

    Args:
        root: an ImageFolder split directory (root/<class>/<image>).
        train: random-resized crop (area in [min_area, 1], ratio [3/4, 4/3]) + flip, shuffled,
            the partial batch dropped or, with drop_last=False, kept (see `train_batches`);
            else resize shorter side to val_resize + centre crop, every image exactly once
            across ranks.
        batch_size: per process.
        aug_plus: colour jitter 0.4 (brightness, contrast, saturation) + PCA lighting 0.1.
        num_threads: DALI CPU threads, or DataLoader workers (0 = in the main process).
        dali_device: "auto" (gpu when device is cuda), "cpu" or "gpu" (nvJPEG "mixed" decode).
        per_class: > 0 keeps the first that many files of each class (`first_per_class`).
        torch_decode: the torch loader's decode: "workers" (PIL) or "device" (torchvision.io on `device`).
    """
    _check_crop_options(kind, crop_size, val_resize, min_area)
    index = scan_image_folder(root)
    if per_class:
        keep = first_per_class(index.labels, per_class, index.classes)
        index = index._replace(files=[index.files[i] for i in keep], labels=[index.labels[i] for i in keep])
    common = _crop_loader_args(len(index.files), train=train, batch_size=batch_size, crop_size=crop_size,
                               min_area=min_area, val_resize=val_resize, aug_plus=aug_plus, seed=seed,
                               num_threads=num_threads, device=device, rank=rank, world_size=world_size,
                               drop_last=drop_last)
    if kind == "dali":
        from rmix.pipelines.dali import image_folder_loader  # DALI is imported only when used
        return image_folder_loader(index, dali_device=dali_device, **common)
    from rmix.pipelines.torch_loader import image_folder_loader
    return image_folder_loader(index, decode=torch_decode, **common)


def build_shard_loader(kind: str, root, split: str, *, train: bool, batch_size: int, crop_size: int = 224,
                       min_area: float = 0.08, val_resize: int = 256, aug_plus: bool = False, seed: int = 0,
                       num_threads: int = 2, device: torch.device | str = "cpu", rank: int = 0, world_size: int = 1,
                       dali_device: str = "auto", drop_last: bool = True, per_class: int = 0,
                       torch_decode: str = "workers"):
    """A loader over the ``split`` ("train"/"val") WebDataset shards in ``root`` (`pipelines.wds`).

    `build_loader`'s transforms and contract. DALI reads with readers.webdataset (its own
    order, see `pipelines.dali.shard_loader`); the torchvision loader reads the samples by
    offset in `shard_indices` order, as it reads an ImageFolder.
    """
    from rmix.pipelines.wds import scan_shards
    _check_crop_options(kind, crop_size, val_resize, min_area)
    if per_class:
        raise ValueError("--train-per-class: not for WebDataset shards (their samples are mixed); "
                         "prepare a smaller set instead")
    shards = scan_shards(root, split, labels=False)  # the labels are read with the images
    common = _crop_loader_args(len(shards.samples), train=train, batch_size=batch_size, crop_size=crop_size,
                               min_area=min_area, val_resize=val_resize, aug_plus=aug_plus, seed=seed,
                               num_threads=num_threads, device=device, rank=rank, world_size=world_size,
                               drop_last=drop_last)
    if kind == "dali":
        from rmix.pipelines.dali import shard_loader
        return shard_loader(shards, dali_device=dali_device, **common)
    from rmix.pipelines.torch_loader import shard_loader
    return shard_loader(shards, decode=torch_decode, **common)


class CifarError(ValueError):
    """A CIFAR batch or meta file that is not what it claims; the message begins with its path (``path``),
    then says what is wrong (``reason``)."""

    def __init__(self, path: str, reason: str):
        self.path, self.reason = str(path), reason
        super().__init__(" ".join(f"{self.path}: {reason}".splitlines()))

    def __reduce__(self):
        return type(self), (self.path, self.reason)


CIFAR_ROW = 3 * 32 * 32  # bytes of one image in the python batches: the R, G, B planes of 32 x 32
_CIFAR = {  # cifar100 -> (its name, its label key, its classes, the other CIFAR's label key)
    False: ("CIFAR-10", b"labels", 10, b"fine_labels"),
    True: ("CIFAR-100", b"fine_labels", 100, b"labels"),
}
_AGAIN = "download the set again"


def _unpickle_cifar(path: str):
    """The dict a CIFAR python file holds (keys as bytes); CifarError naming the file if it holds none."""
    try:
        with open(path, "rb") as f:
            data = pickle.load(f, encoding="bytes")  # the official format is a pickled dict
    except OSError as e:
        raise CifarError(path, f"cannot read ({e.strerror or e})") from None
    except Exception as e:  # truncated, text, another format: anything the unpickler trips on
        raise CifarError(path, f"not a CIFAR python file: it does not unpickle ({one_line(e, 120)}); "
                               f"the file is damaged or another format; {_AGAIN}") from None
    if not isinstance(data, dict):
        raise CifarError(path, f"not a CIFAR python file: it holds a {type(data).__name__}, not a dict; {_AGAIN}")
    return {k.encode() if isinstance(k, str) else k: v for k, v in data.items()}  # re-pickled with str keys


def _keys(batch: dict) -> str:
    names = sorted(repr(k) for k in batch)
    return ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "") if names else "none"


def _cifar_batch(path: str, cifar100: bool):
    """(images uint8 (N, 3072), labels int64 (N,)) of one CIFAR batch file, each check naming the file."""
    import numpy as np
    name, label_key, k, other_key = _CIFAR[cifar100]
    batch = _unpickle_cifar(path)
    if label_key not in batch:
        if other_key in batch:
            other, dataset = ("CIFAR-100", "cifar100") if other_key == b"fine_labels" else ("CIFAR-10", "cifar10")
            why = (f"it looks like a {other} batch, which --dataset {dataset} reads (from "
                   f"{'cifar-100-python/train and test' if dataset == 'cifar100' else 'cifar-10-batches-py'}); "
                   f"else {_AGAIN}")
        else:
            why = f"it is no {name} batch; {_AGAIN}"
        raise CifarError(path, f"no {label_key!r} key: a {name} batch has {label_key!r} and b'data', this file has "
                               f"{_keys(batch)}: {why}")
    if b"data" not in batch:
        raise CifarError(path, f"no b'data' key (the file has {_keys(batch)}): it is no {name} batch; {_AGAIN}")
    data, labels = batch[b"data"], batch[label_key]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
        what = (f"a {data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray)
                else f"a {type(data).__name__}")
        raise CifarError(path, f"b'data' is {what}, expected uint8 rows (N, {CIFAR_ROW}); {_AGAIN}")
    if data.shape[1] != CIFAR_ROW:
        raise CifarError(path, f"b'data' rows are {data.shape[1]} bytes wide, expected {CIFAR_ROW} (3 x 32 x 32); "
                               f"{_AGAIN}")
    try:
        labels = np.asarray(labels)
    except (TypeError, ValueError) as e:  # a ragged list
        raise CifarError(path, f"{label_key!r} is not a list of class indices ({one_line(e, 120)}); {_AGAIN}") \
            from None
    if labels.size == 0:
        labels = labels.astype(np.int64)
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise CifarError(path, f"{label_key!r} is not a list of class indices (a {labels.dtype} array of shape "
                               f"{labels.shape}); {_AGAIN}")
    if len(labels) != len(data):
        raise CifarError(path, f"{len(data)} images (b'data' rows) but {len(labels)} labels ({label_key!r}): images and "
                               f"labels would pair up wrongly; {_AGAIN}")
    bad = np.flatnonzero((labels < 0) | (labels >= k))
    if len(bad):
        raise CifarError(path, f"label {int(labels[bad[0]])} at index {int(bad[0])} is outside [0, {k}) "
                               f"({len(bad)} such label{'s' * (len(bad) > 1)}; {name} has {k} classes); {_AGAIN}")
    return data, labels.astype(np.int64)


def load_cifar(root, *, train: bool, cifar100: bool = False):
    """Read the official python CIFAR batches -> (images, labels, classes).

    images: uint8 (N, 32, 32, 3); labels: int64 (N,); classes: names from the meta file.

    ``root`` is the extracted folder (cifar-10-batches-py / cifar-100-python) or its parent. Each file is
    checked before anything is trained on: a file that does not unpickle, lacks its keys, has rows other
    than uint8 (N, 3072), a label count other than its row count, a label outside [0, classes), or a meta
    file naming another number of classes raises `CifarError` (a ValueError) naming the file.
    """
    import numpy as np
    root = os.fspath(root)
    folder = "cifar-100-python" if cifar100 else "cifar-10-batches-py"
    directory = os.path.join(root, folder) if os.path.isdir(os.path.join(root, folder)) else root
    if cifar100:
        names, meta, names_key = ["train" if train else "test"], "meta", b"fine_label_names"
    else:
        names = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
        meta, names_key = "batches.meta", b"label_names"
    images, labels = [], []
    for name in names:
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            other = "cifar10" if cifar100 else "cifar100"
            held = [n for n in (["data_batch_1", "test_batch"] if cifar100 else ["train", "test"])
                    if os.path.isfile(os.path.join(directory, n))]
            hint = f"; {directory} holds the other CIFAR's files ({', '.join(held)}): --dataset {other} reads it" \
                if held else ""
            raise FileNotFoundError(f"CIFAR batch file not found: {path}{hint}")
        data, ls = _cifar_batch(path, cifar100)
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(ls)
    images = np.ascontiguousarray(np.concatenate(images).transpose(0, 2, 3, 1))  # CHW planes -> HWC
    labels = np.concatenate(labels)
    k = _CIFAR[cifar100][2]
    classes = [str(i) for i in range(k)]
    path = os.path.join(directory, meta)
    if os.path.isfile(path):
        held = _unpickle_cifar(path).get(names_key)
        if not isinstance(held, (list, tuple)) or not all(isinstance(n, (bytes, str)) for n in held):
            raise CifarError(path, f"no list of class names under {names_key!r}; {_AGAIN}")
        if len(held) != k:
            raise CifarError(path, f"{len(held)} class names under {names_key!r}, {_CIFAR[cifar100][0]} has {k}; "
                                   f"{_AGAIN}")
        classes = [n.decode() if isinstance(n, bytes) else n for n in held]
    return images, labels, classes


def check_array_dataset(root, dataset: str) -> dict:
    """Read both splits of an in-memory dataset whole, with every check its reader makes (`rmix data check`).

    ``dataset``: "cifar10", "cifar100", "fashion-mnist" or "mnist"; ``root`` as training takes it.
    Returns ``{"ok": images read, "bad": [{"path", "reason"}], "classes": k, "splits": {"train": n, "test": m}}``:
    a split whose file is malformed (`CifarError` / `IdxError`) is left out of the counts and its file listed
    in "bad". A missing file or folder raises FileNotFoundError, an unknown ``dataset`` ValueError.
    """
    from rmix.pipelines.idx import CLASSES, IdxError, load_mnist
    if dataset in ("cifar10", "cifar100"):
        def read(train):
            return load_cifar(root, train=train, cifar100=dataset == "cifar100")
        classes = _CIFAR[dataset == "cifar100"][2]
    elif dataset in CLASSES:
        def read(train):
            return load_mnist(root, train=train, dataset=dataset)
        classes = len(CLASSES[dataset])
    else:
        raise ValueError(f"dataset: expected cifar10, cifar100, fashion-mnist or mnist, got {dataset!r}")
    ok, bad, splits = 0, [], {}
    for split in ("train", "test"):
        try:
            _, labels, names = read(split == "train")
        except (CifarError, IdxError) as e:
            bad.append({"path": e.path, "reason": e.reason})
            continue
        splits[split], classes = len(labels), len(names)
        ok += len(labels)
    return {"ok": ok, "bad": bad, "classes": classes, "splits": splits}


def first_per_class(labels, n: int, classes: list[str]) -> np.ndarray:
    """Indices of the first ``n`` samples of each class, in file order (``--train-per-class``).

    Raises ValueError naming a class with fewer than ``n``.
    """
    import numpy as np
    if n < 1:
        raise ValueError(f"--train-per-class: must be >= 1, got {n}")
    labels = np.asarray(labels)
    keep = []
    for k, name in enumerate(classes):
        mine = np.flatnonzero(labels == k)
        if len(mine) < n:
            raise ValueError(f"--train-per-class: class {name!r} has {len(mine)} training images, fewer than {n}")
        keep.append(mine[:n])
    return np.sort(np.concatenate(keep)) if keep else np.zeros(0, dtype=np.int64)


def build_array_loader(kind: str, images: np.ndarray, labels: np.ndarray, classes: list[str], *, train: bool,
                       batch_size: int, seed: int = 0, num_threads: int = 2, device: torch.device | str = "cpu",
                       rank: int = 0, world_size: int = 1, dali_device: str = "auto", drop_last: bool = True,
                       flip: bool = True, per_class: int = 0):
    """A loader over square uint8 (N, S, S, 3) arrays; train: zero-pad 4 + random crop S (+ flip).

    ``per_class`` > 0 keeps the first that many images of each class (`first_per_class`).
    """
    import numpy as np
    import torch
    device = torch.device(device)
    if kind not in ("dali", "torch"):
        raise ValueError(f"kind must be 'dali' or 'torch', got {kind!r}")
    if per_class:
        keep = first_per_class(labels, per_class, classes)
        images, labels = np.ascontiguousarray(images[keep]), labels[keep]
    check_sharding(len(labels), train=train, batch_size=batch_size, rank=rank,
                   world_size=world_size, drop_last=drop_last)
    check_seed(seed)
    common = dict(train=train, batch_size=batch_size, seed=seed, num_threads=num_threads,
                  device=device, rank=rank, world_size=world_size, drop_last=drop_last, flip=flip)
    if kind == "dali":
        from rmix.pipelines.dali import array_loader
        return array_loader(images, labels, classes, dali_device=dali_device, **common)
    from rmix.pipelines.torch_loader import array_loader
    return array_loader(images, labels, classes, **common)


def build_cifar_loader(kind: str, root, *, train: bool, cifar100: bool = False, **kw):
    """A CIFAR-10/100 loader (`build_array_loader`'s options); train: pad 4 + random crop 32 + flip."""
    if kind not in ("dali", "torch"):
        raise ValueError(f"kind must be 'dali' or 'torch', got {kind!r}")
    images, labels, classes = load_cifar(root, train=train, cifar100=cifar100)
    return build_array_loader(kind, images, labels, classes, train=train, **kw)


def build_mnist_loader(kind: str, root, *, train: bool, dataset: str = "fashion-mnist", **kw):
    """A Fashion-MNIST or MNIST loader from the idx files, grey replicated to RGB, 28 px.

    Train: pad 4 + random crop 28, plus a horizontal flip for Fashion-MNIST (a mirrored digit is
    another glyph, so MNIST has none).
    """
    from rmix.pipelines.idx import load_mnist
    if kind not in ("dali", "torch"):
        raise ValueError(f"kind must be 'dali' or 'torch', got {kind!r}")
    images, labels, classes = load_mnist(root, train=train, dataset=dataset)
    return build_array_loader(kind, images, labels, classes, train=train, flip=dataset == "fashion-mnist", **kw)
