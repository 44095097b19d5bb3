"""MNIST and Fashion-MNIST from their idx files (LeCun's format), gzipped or not, with numpy.

Layouts understood (`find_idx_dir`): a folder holding the four files (Debian's package
`dataset-fashion-mnist` puts them in /usr/share/datasets/fashion-mnist/), torchvision's
`FashionMNIST/raw/` and `MNIST/raw/`, or their parents.
"""
from __future__ import annotations

import gzip
import os

import numpy as np

DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
TORCHVISION_FOLDERS = {"fashion-mnist": "FashionMNIST", "mnist": "MNIST"}
FILES = {True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
CLASSES = {"fashion-mnist": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                             "Sneaker", "Bag", "Ankle boot"],
           "mnist": [str(i) for i in range(10)]}
_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
           0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


class IdxError(ValueError):
    """A malformed idx file; the message begins with its path (``path``), then says what is wrong (``reason``)."""

    def __init__(self, path: str, reason: str):
        self.path, self.reason = str(path), reason
        super().__init__(" ".join(f"{self.path}: {reason}".splitlines()))

    def __reduce__(self):
        return type(self), (self.path, self.reason)


AGAIN = "download the set again"
# What `load_mnist` reads from each file: the idx magic (type byte, number of dimensions) of the official files.
IMAGES_MAGIC, LABELS_MAGIC = (0x08, 3), (0x08, 1)


def _path(directory: str, name: str) -> str | None:
    for candidate in (name, name + ".gz"):
        path = os.path.join(directory, candidate)
        if os.path.isfile(path):
            return path
    return None


def has_idx_files(directory) -> bool:
    """True when `directory` holds all four files (each gzipped or not)."""
    return all(_path(os.fspath(directory), n) for names in FILES.values() for n in names)


def find_idx_dir(root, dataset: str) -> str:
    """The folder holding `dataset`'s idx files: root itself, root/raw, or root/<torchvision name>/raw."""
    root = os.fspath(root)
    for directory in (root, os.path.join(root, "raw"), os.path.join(root, TORCHVISION_FOLDERS[dataset], "raw")):
        if has_idx_files(directory):
            return directory
    hint = " (apt-get install dataset-fashion-mnist)" if dataset == "fashion-mnist" else ""
    raise FileNotFoundError(f"--data-dir: no {dataset} idx files in {root}, {root}/raw or "
                            f"{root}/{TORCHVISION_FOLDERS[dataset]}/raw: expected "
                            f"{', '.join(n for names in FILES.values() for n in names)} (.gz or not){hint}")


def read_idx(path: str, magic: tuple[int, int] | None = None, what: str = "") -> np.ndarray:
    """One idx file -> ndarray of the shape and dtype its header names; IdxError names the file.

    ``magic`` (type byte, number of dimensions), when given, is what the file must hold (e.g. (0x08, 1):
    uint8 labels); it is checked before any dimension is read, so a damaged header is named as one
    instead of read as absurd dimensions. ``what`` ("images", "labels") words the message.
    """
    try:
        with (gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")) as f:
            data = f.read()
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise IdxError(path, f"cannot read ({e}); {AGAIN}") from None
    kind = f"an idx {what} file" if what else "an idx file"
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _DTYPES:
        raise IdxError(path, f"not {kind} (magic number {data[:4].hex() or 'missing'}, expected 0000 then a type "
                             f"byte and the number of dimensions{_expected(magic)}); {AGAIN}")
    if magic is not None and (data[2], data[3]) != tuple(magic):
        raise IdxError(path, f"not {kind}: bad magic number {data[:4].hex()} ({np.dtype(_DTYPES[data[2]]).name}, "
                             f"{_dims(data[3])}){_expected(magic)}; {AGAIN}")
    dtype, ndim = np.dtype(_DTYPES[data[2]]), data[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(data) < header:
        raise IdxError(path, f"truncated header ({len(data)} bytes, {ndim} dimensions); {AGAIN}")
    shape = tuple(int(v) for v in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    need = header + int(np.prod(shape, dtype=object)) * dtype.itemsize
    if len(data) != need:
        raise IdxError(path, f"truncated or padded: the header says {shape} ({need} bytes), the file has "
                             f"{len(data)} bytes; {AGAIN}")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)


def _expected(magic) -> str:
    if magic is None:
        return ""
    return f"; expected {bytes([0, 0, *magic]).hex()} ({np.dtype(_DTYPES[magic[0]]).name}, {_dims(magic[1])})"


def _dims(n: int) -> str:
    return f"{n} dimension" + ("" if n == 1 else "s")


def load_mnist(root, *, train: bool, dataset: str = "fashion-mnist"):
    """(images uint8 (N, 28, 28, 3), labels int64 (N,), classes) of one split.

    The grey channel is replicated to 3, so every model and the fused op take it unchanged.
    """
    if dataset not in CLASSES:
        raise ValueError(f"dataset: expected one of {tuple(CLASSES)}, got {dataset!r}")
    directory = find_idx_dir(root, dataset)
    image_path, label_path = (_path(directory, n) for n in FILES[train])
    images = read_idx(image_path, IMAGES_MAGIC, "images")
    labels = read_idx(label_path, LABELS_MAGIC, "labels")
    if images.shape[1:] != (28, 28):
        raise IdxError(image_path, f"images of {images.shape[1]}x{images.shape[2]} pixels, {dataset} has 28x28; "
                                   f"{AGAIN}")
    if len(labels) != len(images):
        raise IdxError(label_path, f"{len(labels)} labels for the {len(images)} images of {image_path}: the two "
                                   f"files do not belong together; {AGAIN}")
    k = len(CLASSES[dataset])
    bad = np.flatnonzero(labels >= k)  # uint8 (the magic says so): none is negative
    if len(bad):
        raise IdxError(label_path, f"label {int(labels[bad[0]])} at index {int(bad[0])} is outside [0, {k}) "
                                   f"({len(bad)} such label{'s' * (len(bad) > 1)}; {dataset} has {k} classes); "
                                   f"{AGAIN}")
    rgb = np.ascontiguousarray(np.repeat(images[..., None], 3, axis=-1))
    return rgb, labels.astype(np.int64), list(CLASSES[dataset])
