"""Where the images come from: the data directory, checked, and the two loaders built from it."""
from pathlib import Path

from pipelines import build_loader


def resolve_data_dir(data_dir: str) -> Path:
    """The ImageFolder root (with train/ and val/); "" means the embedded synthetic set."""
    if not data_dir:
        from rmix.synth import default_data_dir
        return default_data_dir()
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise ValueError(f"--data-dir: {root} is not a directory")
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise ValueError(f"--data-dir: {root} has no {split}/ folder (expected ImageFolder train/ and val/)")
    return root


def make_loaders(cfg, root: Path, device, rank=0, world_size=1):
    """(train_loader, val_loader) for this process; batch size is the global one split over ranks."""
    d = cfg.data
    if cfg.batch_size % world_size:
        raise ValueError(f"--batch-size: {cfg.batch_size} does not split evenly over {world_size} processes")
    common = dict(batch_size=cfg.batch_size // world_size, crop_size=d.crop_size, min_area=d.min_area,
                  val_resize=d.val_resize, seed=cfg.seed, num_threads=d.workers, device=device,
                  rank=rank, world_size=world_size, dali_device=d.dali_device)
    train = build_loader(d.loader, root / "train", train=True, aug_plus=d.aug_plus, **common)
    val = build_loader(d.loader, root / "val", train=False, **common)
    if val.num_classes != train.num_classes:
        raise ValueError(f"--data-dir: train/ has {train.num_classes} classes but val/ has {val.num_classes}")
    return train, val
