"""Where the images come from: the data directory, checked, and the two loaders built from it."""
from pathlib import Path

from pipelines import build_cifar_loader, build_loader

CIFAR_DIRS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}


def detect_dataset(root: Path) -> str:
    """'cifar10' / 'cifar100' when root is (or holds) the official python batches, else 'folder'."""
    for name, folder in CIFAR_DIRS.items():
        if root.name == folder or (root / folder).is_dir():
            return name
    return "folder"


def resolve_data(data_dir: str, dataset: str = "auto"):
    """(root, dataset) checked; data_dir "" means the embedded synthetic set (an ImageFolder)."""
    if not data_dir:
        from rmix.synth import default_data_dir
        if dataset not in ("auto", "folder"):
            raise ValueError(f"--dataset: {dataset} needs --data-dir")
        return default_data_dir(), "folder"
    root = Path(data_dir).expanduser().resolve()  # absolute, so a resumed run compares equal
    if not root.is_dir():
        raise ValueError(f"--data-dir: {root} is not a directory")
    if dataset == "auto":
        dataset = detect_dataset(root)
    if dataset in CIFAR_DIRS:
        return root, dataset  # the reader names any missing or malformed batch file
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise ValueError(f"--data-dir: {root} has no {split}/ folder (expected ImageFolder train/ and val/, "
                             "or the CIFAR python batches)")
    return root, dataset


def make_loader(cfg, root: Path, dataset: str, device, *, train: bool, rank=0, world_size=1):
    """This process's loader of one split; the batch size is the global one split over ranks."""
    d = cfg.data
    if cfg.batch_size % world_size:
        raise ValueError(f"--batch-size: {cfg.batch_size} does not split evenly over {world_size} processes")
    common = dict(train=train, batch_size=cfg.batch_size // world_size, seed=cfg.seed, num_threads=d.workers,
                  device=device, rank=rank, world_size=world_size, dali_device=d.dali_device)
    if dataset in CIFAR_DIRS:
        return build_cifar_loader(d.loader, root, cifar100=dataset == "cifar100", **common)
    return build_loader(d.loader, root / ("train" if train else "val"), crop_size=d.crop_size, min_area=d.min_area,
                        val_resize=d.val_resize, aug_plus=d.aug_plus and train, **common)


def make_loaders(cfg, root: Path, dataset: str, device, rank=0, world_size=1):
    """(train_loader, val_loader) for this process."""
    train = make_loader(cfg, root, dataset, device, train=True, rank=rank, world_size=world_size)
    val = make_loader(cfg, root, dataset, device, train=False, rank=rank, world_size=world_size)
    if val.num_classes != train.num_classes:
        raise ValueError(f"--data-dir: the train split has {train.num_classes} classes but val has {val.num_classes}")
    return train, val
