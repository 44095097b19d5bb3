"""Where the images come from: the data directory, checked, and the two loaders built from it."""
import sys
from pathlib import Path

from rmix.pipelines import build
from rmix.pipelines.arrays import first_per_class, read_arrays
from rmix.pipelines.build import Backend, Crop
from rmix.pipelines.folders import check_classes, scan_image_folder
from rmix.pipelines.idx import DEBIAN_FASHION_MNIST, TORCHVISION_FOLDERS, has_idx_files
from rmix.pipelines.split import Share
from rmix.pipelines.wds import INDEX, find_shards, is_shard_dir, scan_shards

CIFAR_DIRS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}
MNIST_SETS = ("fashion-mnist", "mnist")
ARRAY_SETS = (*CIFAR_DIRS, *MNIST_SETS)  # read into memory whole: no files to preflight


def _idx_dataset(root: Path) -> str | None:
    """'fashion-mnist' / 'mnist' when root holds (or its raw/ or torchvision subfolder holds) idx files.

    The two sets have the same files: the folder's name tells which, else an error asks.
    """
    found = [name for name, folder in TORCHVISION_FOLDERS.items() if has_idx_files(root / folder / "raw")]
    if len(found) > 1:
        raise ValueError(f"--data-dir: {root} holds both FashionMNIST/ and MNIST/: say --dataset fashion-mnist or mnist")
    if found:
        return found[0]
    if not (has_idx_files(root) or has_idx_files(root / "raw")):
        return None
    parts = [p.lower() for p in root.parts]
    if any("fashion" in p for p in parts):
        return "fashion-mnist"
    if any(p in ("mnist", "mnist_data") for p in parts):
        return "mnist"
    raise ValueError(f"--data-dir: {root} holds MNIST-format idx files; say --dataset fashion-mnist or mnist")


DATASET_KINDS = {"folder": "an image folder (train/, val/)", "wds": "WebDataset shards", "cifar10": "CIFAR-10",
                 "cifar100": "CIFAR-100", "fashion-mnist": "Fashion-MNIST (idx files)", "mnist": "MNIST (idx files)"}


def detect_dataset(root: Path) -> str:
    """'cifar10' / 'cifar100' / 'fashion-mnist' / 'mnist' from the files root holds, else 'folder'."""
    for name, folder in CIFAR_DIRS.items():
        if root.name == folder or (root / folder).is_dir():
            return name
    if is_shard_dir(root):
        return "wds"
    return _idx_dataset(root) or "folder"


def resolve_data(data_dir: str, dataset: str = "auto"):
    """(root, dataset) checked; data_dir "" means the embedded synthetic set (an ImageFolder).

    With --dataset fashion-mnist and no --data-dir: Debian's dataset-fashion-mnist folder.
    """
    if not data_dir:
        if dataset == "fashion-mnist":
            data_dir = DEBIAN_FASHION_MNIST
            if not Path(data_dir).is_dir():
                raise ValueError(f"--data-dir: {data_dir} not found; install it with "
                                 "`apt-get install dataset-fashion-mnist`, or pass --data-dir")
        elif dataset not in ("auto", "folder"):
            raise ValueError(f"--dataset: {dataset} needs --data-dir")
        else:
            from rmix.pipelines.synth import default_data_dir
            return default_data_dir(), "folder"
    root = Path(data_dir).expanduser().resolve()  # absolute, so a resumed run compares equal
    if not root.is_dir():
        hint = "; `apt-get install dataset-fashion-mnist` puts Fashion-MNIST in " + DEBIAN_FASHION_MNIST \
            if dataset == "fashion-mnist" else ""
        raise ValueError(f"--data-dir: {root} is not a directory{hint}")
    if dataset == "auto":
        dataset = detect_dataset(root)
    if sharded(root, dataset):
        for split in ("train", "val"):
            if not find_shards(str(root), split):
                raise ValueError(f"--data-dir: {root} has no {split}-NNNNNN.tar shards "
                                 "(`rmix data prepare` writes train-000000.tar, ..., val-000000.tar, ...)")
        return root, dataset
    if dataset in ARRAY_SETS:
        try:
            held = detect_dataset(root)
        except ValueError:  # idx files either MNIST could be: the reader takes them as named
            held = dataset
        if held == "wds" or (held == "folder" and (root / "train").is_dir()):  # another kind's files, named first
            raise ValueError(f"--data-dir: {root} holds {DATASET_KINDS[held]}, read here as --dataset {dataset} "
                             f"(a preset's or --dataset), which needs its own files; --dataset {held} reads it")
        return root, dataset  # the reader names any missing or malformed file
    for split in ("train", "val"):
        if not (root / split).is_dir():
            try:
                held = detect_dataset(root)
            except ValueError:  # idx files both MNISTs could be: named below as missing folders
                held = "folder"
            if held != "folder":  # another kind's files, read as folders (--dataset, or a checkpoint's own)
                raise ValueError(f"--data-dir: {root} holds {DATASET_KINDS[held]}, read here as --dataset {dataset}, "
                                 f"which needs {split}/; --dataset {held} reads it")
            raise ValueError(f"--data-dir: {root} has no {split}/ folder (expected ImageFolder train/ and val/, "
                             "the CIFAR python batches, or the MNIST idx files)")
    return root, dataset


def sharded(root: Path, dataset: str) -> bool:
    """Whether ``root`` is read as WebDataset shards: --dataset wds, or folder/imagenet given shards
    (the same images, `rmix data prepare --format wds`; the name, and so the statistics, stay)."""
    return dataset == "wds" or (dataset in ("folder", "imagenet") and is_shard_dir(root))


def make_loader(cfg, root: Path, dataset: str, device, *, train: bool, rank=0, world_size=1):
    """This process's loader of one split; the batch size is the global one split over ranks."""
    data = cfg.data
    if cfg.batch_size % world_size:
        raise ValueError(f"--batch-size: {cfg.batch_size} does not split evenly over {world_size} processes")
    backend = Backend(data.loader, data.workers, data.dali_device, data.torch_decode, device)
    split, per_class, shards = ("train" if train else "val"), (data.train_per_class if train else 0), False
    if dataset in ARRAY_SETS:
        source, crop = read_arrays(root, dataset, train=train), None
    else:
        crop = Crop(data.crop_size, data.min_area, data.val_resize, data.aug_plus and train)
        shards = sharded(root, dataset)
        if shards and per_class:
            raise ValueError("--train-per-class: not for WebDataset shards (their samples are mixed); "
                             "prepare a smaller set instead")
        # shards: the labels are read with the images
        source = scan_shards(root, split, labels=False) if shards else scan_image_folder(root / split)
    if per_class:
        source = source.subset(first_per_class(source.labels, per_class, source.classes))
    share = Share(source.num_samples, train=train, batch_size=cfg.batch_size // world_size, seed=cfg.seed,
                  rank=rank, world_size=world_size, drop_last=data.drop_last)
    loader = build.loader(source, share, backend, crop)
    if shards and rank == 0 and not (root / INDEX).is_file():  # nothing to verify against: a short set shows here
        print(f"{root}: no {INDEX}; {split}: {loader.num_samples} samples in "
              f"{len(find_shards(str(root), split))} shards, counted from the shards", file=sys.stderr)
    return loader


def make_loaders(cfg, root: Path, dataset: str, device, rank=0, world_size=1):
    """(train_loader, val_loader) for this process."""
    train = make_loader(cfg, root, dataset, device, train=True, rank=rank, world_size=world_size)
    val = make_loader(cfg, root, dataset, device, train=False, rank=rank, world_size=world_size)
    check_classes(train.classes, val.classes, f"--data-dir: {root}", "train", "val")
    return train, val


def check_data(directory: str, dataset: str = "auto", decoder: str = "dali", threads: int = 2) -> tuple[str, dict]:
    """`rmix data check`: every image decoded once by `decoder` ("dali" or "pil"), or each CIFAR/MNIST file read
    whole, uncached. Returns (the kind of data, {"ok", "bad": [{"path", "reason"}], "classes", ...})."""
    from rmix.pipelines import check_array_dataset
    from rmix.pipelines.preflight import check
    root = Path(directory)
    if not root.is_dir():
        raise ValueError(f"{root}: not a directory")
    if threads < 1:
        raise ValueError(f"--threads: must be >= 1, got {threads}")
    if dataset == "auto":
        dataset = detect_dataset(root)
    if dataset in ARRAY_SETS:  # CIFAR's batches and MNIST's idx files: each split read whole, every file checked
        return dataset, check_array_dataset(root, dataset)
    if sharded(root, dataset):
        from rmix.pipelines.wds import find_shards
        splits = [(str(root), s) for s in ("train", "val") if find_shards(str(root), s)]
    else:
        splits = [root / s for s in ("train", "val") if (root / s).is_dir()] or [root]
    return dataset, check(splits, decoder, threads, use_cache=False)
