"""ImageFolder splits: which files, in which order, with which labels, read the way torchvision's
ImageFolder reads them, and every way a copy can be broken named."""
from __future__ import annotations

import os
from typing import NamedTuple

# The extensions torchvision's ImageFolder accepts (torchvision.datasets.folder.IMG_EXTENSIONS),
# matched case-insensitively. Both loaders read exactly these files, so labels and sample
# counts agree; DALI's own file_root scan has a different filter list and does not recurse.
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class FolderIndex(NamedTuple):
    """The files of an ImageFolder split, in ImageFolder's order."""
    root: str
    classes: list[str]   # sorted class folder names; label i is classes[i]
    files: list[str]     # paths relative to root, class by class, each class sorted
    labels: list[int]    # labels[i] is the class index of files[i]

    @property
    def num_samples(self) -> int:
        return len(self.files)

    def subset(self, keep) -> FolderIndex:
        """The files at indices ``keep``, in that order."""
        return self._replace(files=[self.files[i] for i in keep], labels=[self.labels[i] for i in keep])


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


def check_classes(was, now, what, was_name, now_name):
    """ValueError naming the first difference where two class lists (names, in order) differ; None: unrecorded."""
    if was is None or list(was) == list(now):
        return
    was, now = list(was), list(now)
    k = next((i for i, (a, b) in enumerate(zip(was, now)) if a != b), min(len(was), len(now)))
    first = (f"class {k} is {was[k]!r} in {was_name}, {now[k]!r} in {now_name}" if k < min(len(was), len(now))
             else f"{len(was)} classes in {was_name}, {len(now)} in {now_name}")
    raise ValueError(f"{what}: the classes differ ({first}); each label would mean another class")
