"""Tiny ImageNet 2012 archives in the real formats, for `rmix data prepare imagenet` tests.

- ILSVRC2012_devkit_t12.tar.gz: ILSVRC2012_devkit_t12/data/meta.mat (a `synsets` struct array
  written by scipy, as the real one: ILSVRC2012_ID, WNID, words, gloss, num_children, ...,
  with one non-leaf synset that must not become a class) and
  data/ILSVRC2012_validation_ground_truth.txt (an ILSVRC2012_ID per val image, in file order).
- ILSVRC2012_img_train.tar: one <wnid>.tar per class, each of <wnid>_<n>.JPEG.
- ILSVRC2012_img_val.tar: flat ILSVRC2012_val_%08d.JPEG.
"""
import io
import tarfile

import numpy as np
from PIL import Image

# The real IDs are 1..1000 over leaves sorted by wnid; these are out of wnid order on purpose, so
# a parser that labels by ID instead of by sorted wnid gets the val labels wrong.
SYNSETS = [(1, "n02000003", "gamma, third"), (2, "n01000001", "alpha"), (3, "n01500002", "beta, second"),
           (4, "n09999999", "group of things")]  # the last: num_children > 0, not a class
LEAVES = sorted(w for i, w, _ in SYNSETS[:3])   # the classes in torchvision's order


def jpeg(value: int, size=(20, 16)) -> bytes:
    rng = np.random.default_rng(value)
    pixels = np.clip(rng.normal(value * 40 % 256, 30, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG", quality=90)
    return out.getvalue()


def _add(tar, name, data: bytes):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def symlink(name: str, target: str) -> tarfile.TarInfo:
    """A symlink member, for `write_archives(devkit_extra=...)`."""
    info = tarfile.TarInfo(name)
    info.type, info.linkname = tarfile.SYMTYPE, target
    return info


def meta_mat(synsets_=SYNSETS) -> bytes:
    import scipy.io as sio
    fields = ["ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children", "wordnet_height",
              "num_train_images"]
    synsets = np.zeros((len(synsets_), 1), dtype=[(f, "O") for f in fields])
    for k, (idx, wnid, words) in enumerate(synsets_):
        leaf = k < 3
        synsets[k, 0] = (np.array([[idx]], dtype=np.uint16), np.array([wnid]), np.array([words]),
                         np.array([f"gloss of {wnid}"]), np.array([[0 if leaf else 3]], dtype=np.uint8),
                         np.zeros((1, 0)) if leaf else np.array([[1, 2, 3]], dtype=np.uint16),
                         np.array([[0 if leaf else 1]], dtype=np.uint8), np.array([[5]], dtype=np.uint16))
    out = io.BytesIO()
    sio.savemat(out, {"synsets": synsets})
    return out.getvalue()


def write_archives(root, train_per_class=(5, 4, 6), val_ids=(3, 1, 2, 1, 3, 2, 2), *, meta=True, truth=True,
                   synsets=SYNSETS, devkit_extra=(), rename=lambda name: name):
    """The three archives in ``root``; returns {"val": [(file name, wnid)], "train": {wnid: [names]}}.

    ``devkit_extra``: more devkit members, (name or TarInfo, bytes or None); ``rename``: what the
    train and val images' member names become (e.g. ``../x.JPEG``).
    """
    root.mkdir(parents=True, exist_ok=True)
    id_to_wnid = {i: w for i, w, _ in synsets}
    with tarfile.open(root / "ILSVRC2012_devkit_t12.tar.gz", "w:gz") as tar:
        if meta:
            _add(tar, "ILSVRC2012_devkit_t12/data/meta.mat", meta_mat(synsets))
        if truth:
            _add(tar, "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt",
                 "".join(f"{i}\n" for i in val_ids).encode())
        _add(tar, "ILSVRC2012_devkit_t12/readme.txt", b"tiny devkit for tests\n")
        for member, data in devkit_extra:
            if isinstance(member, str):
                _add(tar, member, data)
            else:
                tar.addfile(member)
    train = {}
    with tarfile.open(root / "ILSVRC2012_img_train.tar", "w") as outer:
        for k, (idx, wnid, _) in enumerate(synsets[:3]):
            inner_bytes = io.BytesIO()
            names = []
            with tarfile.open(fileobj=inner_bytes, mode="w") as inner:
                for n in range(train_per_class[k]):
                    name = rename(f"{wnid}_{100 + n}.JPEG")
                    _add(inner, name, jpeg(idx * 10 + n))
                    names.append(name)
            train[wnid] = names
            _add(outer, f"{wnid}.tar", inner_bytes.getvalue())
    val = []
    with tarfile.open(root / "ILSVRC2012_img_val.tar", "w") as tar:
        for k, idx in enumerate(val_ids, start=1):
            name = rename(f"ILSVRC2012_val_{k:08d}.JPEG")
            _add(tar, name, jpeg(idx * 10 + 50 + k))
            val.append((name, id_to_wnid[idx]))
    return {"val": val, "train": train}
