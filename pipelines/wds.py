"""WebDataset shards: the format rmix writes, and the index both loaders read it by.

A split is ``<split>-000000.tar, <split>-000001.tar, ...``, each sample two members,
``<key>.<ext>`` (the encoded image, its original extension) and ``<key>.cls`` (the label as
ASCII digits, WebDataset's convention), plus ``index.json`` beside them (classes, counts) and
one DALI index per shard (``<split>-000000.idx``, `wds2idx`'s v1.2 format: each sample's
members with their byte offsets), so that neither DALI nor the torchvision reader scans the
tars. Shards another tool wrote are indexed by reading their headers (`index_shard`).

Writing is atomic per shard: ``.tar.partial`` and ``.idx.partial``, renamed when complete, so a
killed run leaves no shard that looks complete and the next run starts where it stopped.
"""
from __future__ import annotations

import io
import json
import os
import re
import tarfile
from typing import NamedTuple

INDEX = "index.json"
SHARD = re.compile(r"^(train|val)-(\d{6})\.tar$")
IMAGE_EXTS = ("jpg", "jpeg", "png", "bmp", "ppm", "pgm", "tif", "tiff", "webp")  # pipelines.IMG_EXTENSIONS


class Sample(NamedTuple):
    """One image of a split: where its bytes are, what it is called, where its label is."""
    shard: int      # index into ShardSplit.shards
    offset: int     # byte offset of the image's data in the shard
    size: int
    member: str     # the image's member name, e.g. n01440764/n01440764_10026.jpg
    label: int      # -1 until read (`scan_shards(labels=False)`): `ShardSplit.label(i)` reads it
    cls_offset: int
    cls_size: int


class ShardSplit(NamedTuple):
    """A split's shards, in order, and every sample in shard order."""
    root: str
    shards: list[str]         # file names relative to root
    indexes: list[str]        # the DALI index of each shard (relative), "" where none was written
    classes: list[str]
    samples: list[Sample]

    def name(self, i: int) -> str:
        """``shard.tar:member.jpg``: how errors and the preflight name sample ``i``."""
        s = self.samples[i]
        return f"{os.path.join(self.root, self.shards[s.shard])}:{s.member}"

    def read(self, i: int) -> bytes:
        s = self.samples[i]
        with open(os.path.join(self.root, self.shards[s.shard]), "rb") as f:
            f.seek(s.offset)
            return f.read(s.size)

    def read_with_label(self, i: int) -> tuple[bytes, int]:
        """The image's bytes and its label, in one read where the .cls follows the image (rmix's shards)."""
        s = self.samples[i]
        with open(os.path.join(self.root, self.shards[s.shard]), "rb") as f:
            if s.cls_offset > s.offset and s.cls_offset - s.offset < s.size + 2048:
                f.seek(s.offset)
                blob = f.read(s.cls_offset + s.cls_size - s.offset)
                data, text = blob[:s.size], blob[s.cls_offset - s.offset:]
            else:
                f.seek(s.offset)
                data = f.read(s.size)
                f.seek(s.cls_offset)
                text = f.read(s.cls_size)
        return data, _label(text, self.name(i))

    def label(self, i: int) -> int:
        s = self.samples[i]
        if s.label >= 0:
            return s.label
        with open(os.path.join(self.root, self.shards[s.shard]), "rb") as f:
            f.seek(s.cls_offset)
            return _label(f.read(s.cls_size), self.name(i))


def _label(text: bytes, name: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{name}: its .cls is {text[:20]!r}, not a class number") from None


def shard_name(split: str, k: int) -> str:
    return f"{split}-{k:06d}.tar"


def split_key(member: str) -> tuple[str, str]:
    """WebDataset's rule (and DALI's): the key ends at the first dot of the base name."""
    slash = member.rfind("/") + 1
    dot = member.find(".", slash)
    return (member, "") if dot < 0 else (member[:dot], member[dot + 1:])


def member_key(relative_path: str, taken: set) -> str:
    """A WebDataset key for a file: its path without extension (``class/stem``), dots made '_', unique.

    So ``train-000003.tar:n01440764/n01440764_10026.jpg`` names the file it was.
    """
    folder, base = os.path.split(relative_path.replace(os.sep, "/"))
    stem = os.path.splitext(base)[0].replace(".", "_") or "image"
    stem = f"{folder}/{stem}" if folder else stem
    key, n = stem, 1
    while key in taken:
        key, n = f"{stem}_{n}", n + 1
    taken.add(key)
    return key


class ShardWriter:
    """Writes one shard atomically: ``add`` samples, then ``close`` renames it into place."""

    def __init__(self, path: str):
        self.path, self.idx_path = path, path[:-len(".tar")] + ".idx"
        self._tmp = path + ".partial"
        self._tar = tarfile.open(self._tmp, "w", format=tarfile.USTAR_FORMAT)  # one 512-byte header each
        self._lines = []

    def add(self, key: str, ext: str, data: bytes, label: int):
        members = []
        for name, blob in ((f"{key}.{ext}", data), (f"{key}.cls", str(label).encode())):
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(blob), 0o644, 0  # mtime 0: shards are reproducible
            offset = self._tar.offset + tarfile.BLOCKSIZE  # the data follows its header
            self._tar.addfile(info, io.BytesIO(blob))
            members.append(f"{name.rsplit('.', 1)[1]} {offset} {len(blob)} {name}")
        self._lines.append(" ".join(members))

    def __len__(self):
        return len(self._lines)

    def close(self):
        self._tar.close()
        with open(self.idx_path + ".partial", "w") as f:
            f.write(f"v1.2 {len(self._lines)}\n" + "".join(line + "\n" for line in self._lines))
        os.replace(self.idx_path + ".partial", self.idx_path)  # the index first: a .tar implies its .idx
        os.replace(self._tmp, self.path)

    def abort(self):
        self._tar.close()
        for p in (self._tmp, self.idx_path + ".partial"):
            if os.path.exists(p):
                os.remove(p)


def read_dali_index(path: str) -> list[list[tuple[str, int, int, str]]]:
    """A v1.2 index: per sample, its members as (ext, offset, size, name)."""
    with open(path) as f:
        head = f.readline().split()
        if len(head) != 2 or head[0] != "v1.2":
            raise ValueError(f"{path}: not a v1.2 WebDataset index (DALI's wds2idx format)")
        out = []
        for line in f:
            p = line.split()
            if not p or len(p) % 4:
                raise ValueError(f"{path}: malformed line {len(out) + 2}")
            out.append([(p[j], int(p[j + 1]), int(p[j + 2]), p[j + 3]) for j in range(0, len(p), 4)])
    if len(out) != int(head[1]):
        raise ValueError(f"{path}: says {head[1]} samples, holds {len(out)}")
    return out


def index_shard(path: str) -> list[list[tuple[str, int, int, str]]]:
    """The v1.2 index of a shard without one, from its tar headers (consecutive members by key)."""
    samples, last = [], None
    try:
        with tarfile.open(path, "r:") as tar:  # "r:": uncompressed, the only kind offsets work for
            for m in tar:
                if not m.isfile():
                    continue
                key, ext = split_key(m.name)
                if not os.path.basename(key):
                    continue  # hidden files, as DALI
                entry = (ext, m.offset_data, m.size, m.name)
                if key == last:
                    samples[-1].append(entry)
                else:
                    samples.append([entry])
                    last = key
    except tarfile.TarError as error:
        raise ValueError(f"{path}: not a readable uncompressed tar ({error})") from None
    return samples


def _image_and_label(entries, path: str, k: int):
    image = [e for e in entries if e[0].lower() in IMAGE_EXTS]
    cls = [e for e in entries if e[0] == "cls"]
    if len(image) != 1 or len(cls) != 1:
        names = ", ".join(e[3] for e in entries)
        raise ValueError(f"{path}: sample {k} ({names}) needs one image (.{'/.'.join(IMAGE_EXTS[:3])}...) "
                         "and one .cls member")
    return image[0], cls[0]


def find_shards(root: str, split: str) -> list[str]:
    names = sorted(n for n in os.listdir(root) if (m := SHARD.match(n)) and m.group(1) == split)
    return names


def is_shard_dir(root) -> bool:
    """A directory of train shards, or one whose index.json says shards (`rmix data prepare --format wds`)."""
    root = os.fspath(root)
    if not os.path.isdir(root):
        return False
    if find_shards(root, "train"):
        return True
    try:
        with open(os.path.join(root, INDEX)) as f:
            return json.load(f).get("format") == "wds"
    except (OSError, ValueError, AttributeError):
        return False


def scan_shards(root, split: str, labels: bool = True) -> ShardSplit:
    """A split's shards and samples, from their indexes (DALI's ``.idx``, else the tar headers).

    The classes come from index.json. ``labels``: read every sample's .cls now (one small read per
    sample: for ImageNet on network storage, minutes); with False they stay -1 (`ShardSplit.label`
    reads one), unless there is no index.json, whose classes are then counted from the labels.
    """
    root = os.path.abspath(os.fspath(root))
    shards = find_shards(root, split)
    if not shards:
        raise FileNotFoundError(f"no {split}-NNNNNN.tar shards in {root}")
    meta = {}
    if os.path.isfile(os.path.join(root, INDEX)):
        with open(os.path.join(root, INDEX)) as f:
            meta = json.load(f)
    labels = labels or not meta.get("classes")
    samples, indexes = [], []
    for k, name in enumerate(shards):
        path, idx = os.path.join(root, name), name[:-len(".tar")] + ".idx"
        entries = read_dali_index(os.path.join(root, idx)) if os.path.isfile(os.path.join(root, idx)) else None
        if entries is None:
            entries, idx = index_shard(path), ""
        with open(path, "rb") as f:
            for j, sample in enumerate(entries):
                (_, off, size, member), (_, c_off, c_size, _) = _image_and_label(sample, path, j)
                label = -1
                if labels:
                    f.seek(c_off)
                    label = _label(f.read(c_size), f"{path}:{member}")
                samples.append(Sample(k, off, size, member, label, c_off, c_size))
        indexes.append(idx)
    known = [s.label for s in samples if s.label >= 0]
    classes = meta.get("classes") or [str(i) for i in range(max(known, default=-1) + 1)]
    if known and (max(known) >= len(classes) or min(known) < 0):
        raise ValueError(f"{root}: a {split} label is outside the {len(classes)} classes of {INDEX}")
    return ShardSplit(root, shards, indexes, list(classes), samples)
