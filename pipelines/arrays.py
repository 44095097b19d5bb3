"""In-memory datasets (CIFAR, MNIST): square uint8 image arrays, their labels and class names, and the
CIFAR python batches read with every check that names a damaged file."""
from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from typing import TYPE_CHECKING

from rmix.pipelines.errors import one_line

if TYPE_CHECKING:  # annotations only: numpy loads where a split is read, not on import
    import numpy as np


@dataclass(frozen=True, eq=False)
class Arrays:
    """A split held in memory: the source of an array loader (`pipelines.build.loader`)."""
    images: np.ndarray    # uint8 (N, S, S, 3)
    labels: np.ndarray    # int64 (N,)
    classes: list[str]
    flip: bool = True     # train: a random horizontal flip after the pad-4 crop

    @property
    def num_samples(self) -> int:
        return len(self.labels)

    def subset(self, keep) -> Arrays:
        """The samples at indices ``keep``, in that order."""
        import numpy as np
        return Arrays(np.ascontiguousarray(self.images[keep]), self.labels[keep], self.classes, self.flip)


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


def read_arrays(root, dataset: str, *, train: bool) -> Arrays:
    """One split of an in-memory dataset: "cifar10", "cifar100" (`load_cifar`), "fashion-mnist" or "mnist"
    (`pipelines.idx.load_mnist`, grey replicated to RGB, 28 px)."""
    from rmix.pipelines.idx import CLASSES, load_mnist
    if dataset in ("cifar10", "cifar100"):
        return Arrays(*load_cifar(root, train=train, cifar100=dataset == "cifar100"))
    if dataset in CLASSES:  # a mirrored digit is another glyph: only Fashion-MNIST flips
        return Arrays(*load_mnist(root, train=train, dataset=dataset), flip=dataset == "fashion-mnist")
    raise ValueError(f"dataset: expected cifar10, cifar100, fashion-mnist or mnist, got {dataset!r}")


def check_array_dataset(root, dataset: str) -> dict:
    """Read both splits of an in-memory dataset whole, with every check its reader makes (`rmix data check`).

    ``dataset``: "cifar10", "cifar100", "fashion-mnist" or "mnist"; ``root`` as training takes it.
    Returns ``{"ok": images read, "bad": [{"path", "reason"}], "classes": k, "splits": {"train": n, "test": m}}``:
    a split whose file is malformed (`CifarError` / `IdxError`) is left out of the counts and its file listed
    in "bad". A missing file or folder raises FileNotFoundError, an unknown ``dataset`` ValueError.
    """
    from rmix.pipelines.idx import CLASSES, IdxError
    classes = {"cifar10": 10, "cifar100": 100, **{name: len(c) for name, c in CLASSES.items()}}.get(dataset)
    ok, bad, splits = 0, [], {}
    for split in ("train", "test"):
        try:
            arrays = read_arrays(root, dataset, train=split == "train")
        except (CifarError, IdxError) as e:
            bad.append({"path": e.path, "reason": e.reason})
            continue
        splits[split], classes = arrays.num_samples, len(arrays.classes)
        ok += arrays.num_samples
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
