"""WebDataset shards: the format rmix writes, and the index both loaders read it by.

A split is ``<split>-000000.tar, <split>-000001.tar, ...``, each sample two members,
``<key>.<ext>`` (the encoded image, its original extension) and ``<key>.cls`` (the label as
ASCII digits, WebDataset's convention), plus ``index.json`` beside them (classes, counts) and
one DALI index per shard (``<split>-000000.idx``, `wds2idx`'s v1.2 format: each sample's
members with their byte offsets), so that neither DALI nor the torchvision reader scans the
tars. Shards another tool wrote are indexed by reading their headers (`index_shard`).

Names in an ``.idx`` are percent-encoded (``a%20b/c.jpg``): DALI's index parser splits lines on
whitespace, so a member named with a space would make an index no reader can read; DALI only
shows the names (its source info), and rmix decodes them back. Every label is read by
`read_label`, by both loaders, the preflight and `rmix data check`.

A set rmix prepared (``prepare.json`` beside the shards) is verified by `scan_shards` before
it is used: ``index.json`` present, exactly the shards it lists, the counts it records, and each
``.idx`` ending where its tar ends; a set without either file is counted from its shards.

Writing is atomic per shard: ``.tar.partial`` and ``.idx.partial``, renamed when complete, so a
killed run leaves no shard that looks complete and the next run starts where it stopped.
"""
from __future__ import annotations

import functools
import io
import json
import os
import re
import tarfile
from typing import NamedTuple
from urllib.parse import quote, unquote

from rmix.pipelines.errors import one_line

INDEX = "index.json"
PLAN = "prepare.json"  # rmix.pipelines.prepare.PLAN: written first, so it marks a set rmix prepared
SHARD = re.compile(r"^(train|val)-(\d{6})\.tar$")
IMAGE_EXTS = ("jpg", "jpeg", "png", "bmp", "ppm", "pgm", "tif", "tiff", "webp")  # pipelines.folders.IMG_EXTENSIONS


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

    @property
    def num_samples(self) -> int:
        return len(self.samples)

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
        return data, read_label(text, self.name(i), len(self.classes))

    def label(self, i: int) -> int:
        s = self.samples[i]
        if s.label >= 0:
            return s.label
        with open(os.path.join(self.root, self.shards[s.shard]), "rb") as f:
            f.seek(s.cls_offset)
            return read_label(f.read(s.cls_size), self.name(i), len(self.classes))


_INTEGER = re.compile(rb"[+-]?[0-9]+")


def read_label(text: bytes, name: str, num_classes: int | None = None) -> int:
    """A .cls member's class index: the one reader of every path (both loaders, checks).

    ASCII whitespace around the digits is allowed (``b"12\\n"`` is 12: many writers end a line);
    anything else, or a class outside ``[0, num_classes)``, is a ValueError naming ``name``.
    """
    value = text.strip()
    if not _INTEGER.fullmatch(value):
        raise ValueError(f"{name}: its .cls is {text[:20]!r}, not a class number")
    label = int(value)
    if label < 0 or (num_classes is not None and label >= num_classes):
        bound = f"[0, {num_classes})" if num_classes is not None else "0 or more"
        raise ValueError(f"{name}: its .cls says {label}, outside the classes {bound}")
    return label


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
            members.append(f"{_quote(name.rsplit('.', 1)[1])} {offset} {len(blob)} {_quote(name)}")
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


def _quote(name: str) -> str:
    # no whitespace reaches DALI's parser; letters, digits, "/_.-~" stay readable
    return quote(name, safe="/")


def read_dali_index(path: str) -> list[list[tuple[str, int, int, str]]]:
    """A v1.2 index: per sample, its members as (ext, offset, size, name); ValueError names the file."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: cannot read this WebDataset index ({error})") from None
    head = lines[0].split() if lines else []
    if len(head) != 2 or head[0] != "v1.2" or not head[1].isdigit():
        raise ValueError(f"{path}: not a v1.2 WebDataset index (DALI's wds2idx format: 'v1.2 <samples>' first)")
    out = []
    while len(lines) > 1 and not lines[-1].strip():
        lines.pop()  # blank lines after the last sample, which DALI's reader takes too
    for n, line in enumerate(lines[1:], 2):
        p = line.split()
        if not p:  # DALI's reader refuses one among the samples ("no extensions provided")
            raise ValueError(f"{path}: line {n} is empty (DALI's reader refuses a blank line among the samples)")
        if len(p) % 4 or not all(p[j].isdigit() and p[j + 1].isdigit() for j in range(1, len(p), 4)):
            raise ValueError(f"{path}: malformed line {n} (expected 'ext offset size name' per member)")
        out.append([(unquote(p[j]), int(p[j + 1]), int(p[j + 2]), unquote(p[j + 3])) for j in range(0, len(p), 4)])
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


def write_dali_index(samples, path: str) -> None:
    """`samples` (as `index_shard` returns them) as a v1.2 index at `path`, the format `read_dali_index` reads."""
    lines = [" ".join(f"{_quote(ext)} {offset} {size} {_quote(name)}" for ext, offset, size, name in members)
             for members in samples]
    with open(path, "w", encoding="utf-8") as f:
        f.write(f"v1.2 {len(lines)}\n" + "".join(line + "\n" for line in lines))


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


def _read_json(path: str) -> dict:
    """A JSON object from ``path``; ValueError naming the file when it is not one."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as error:
        raise ValueError(f"{path}: not readable JSON ({one_line(error, None, typed=False)})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _set_meta(root: str, split: str) -> tuple[dict, int | None]:
    """(index.json, prepare.json's --shard-size) of a set rmix prepared, else ({}, None): refuses an unfinished one."""
    if not os.path.isfile(os.path.join(root, PLAN)) and not os.path.isfile(os.path.join(root, INDEX)):
        return {}, None
    if not os.path.isfile(os.path.join(root, INDEX)):
        raise ValueError(f"{root}: {PLAN} but no {INDEX}: the preparation did not finish; "
                         "rerun the same `rmix data prepare` to complete it")
    meta = _read_json(os.path.join(root, INDEX))
    plan = _read_json(os.path.join(root, PLAN)) if os.path.isfile(os.path.join(root, PLAN)) else {}
    listed, counts = meta.get("shards", {}).get(split) if isinstance(meta.get("shards"), dict) else None, \
        meta.get("counts", {}).get(split) if isinstance(meta.get("counts"), dict) else None
    classes = meta.get("classes")
    if not (isinstance(listed, list) and all(isinstance(n, str) for n in listed) and isinstance(counts, int)
            and isinstance(classes, list) and classes):
        raise ValueError(f"{os.path.join(root, INDEX)}: no {split} shard list, count or classes "
                         "(expected rmix data prepare --format wds's index)")
    found = find_shards(root, split)
    missing, extra = sorted(set(listed) - set(found)), sorted(set(found) - set(listed))
    if missing or extra:
        what = ([f"missing {', '.join(missing)}"] if missing else []) + \
            ([f"not in {INDEX}: {', '.join(extra)}"] if extra else [])
        raise ValueError(f"{root}: the {split} shards differ from {INDEX}'s list ({'; '.join(what)})")
    size = plan.get("shard_size")
    return meta, size if isinstance(size, int) and size > 0 else None


def _idx_matches(path: str, idx: str, members, size: int) -> None:
    """The tar header before each given member's data says that member, with its size: an .idx of another
    tar (a copy, a re-shard) is named, not left to fail as undecodable images."""
    with open(path, "rb") as f:
        for _, off, n, name in members:
            info = None
            if tarfile.BLOCKSIZE <= off <= size:
                f.seek(off - tarfile.BLOCKSIZE)
                try:
                    info = tarfile.TarInfo.frombuf(f.read(tarfile.BLOCKSIZE), "utf-8", "surrogateescape")
                except tarfile.TarError:
                    info = None
            if info is None or info.size != n or (name.isascii() and len(name) <= 100 and info.name != name):
                raise ValueError(f"{os.path.join(os.path.dirname(path), idx)}: does not match "
                                 f"{os.path.basename(path)} ({name} is not at byte {off}); delete the .idx (rmix "
                                 "then reads the tar's headers) or prepare the set again")


def _check_tar_end(path: str, idx: str, entries) -> None:
    """The index ends where the tar does: nothing truncated, no member after the last one listed.

    Two cheap looks per shard (its size, one 512-byte block), so it runs at every start.
    """
    size = os.path.getsize(path)
    ends = [(off + n, name) for sample in entries for _, off, n, name in sample]
    end, last = max(ends, default=(0, None))
    if end > size:
        raise ValueError(f"{path}: truncated ({size} bytes; {last} ends at byte {end}); "
                         "copy or prepare the shard again")
    if idx and entries:
        _idx_matches(path, idx, [entries[0][0], entries[-1][-1]], size)
    block = -(-end // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
    with open(path, "rb") as f:
        f.seek(block)
        rest = f.read(64 * 1024)  # the end-of-archive zeros (a record at most), or what is there instead
    if len(rest) < tarfile.BLOCKSIZE:  # every tar writer ends with zero blocks: cut at a member's end
        raise ValueError(f"{path}: cut short or damaged after {last} (no end-of-archive blocks after it); copy "
                         "or prepare the shard again")
    if not rest.strip(b"\0"):
        return
    try:
        info = tarfile.TarInfo.frombuf(rest[:tarfile.BLOCKSIZE], "utf-8", "surrogateescape")
    except tarfile.TarError:
        info = None
    if info is None:  # a header cut short, or bytes that are none: tarfile stops there without a word
        raise ValueError(f"{path}: cut short or damaged after {last} (the bytes from {block} on are not a tar "
                         "member); copy or prepare the shard again")
    if idx and info.isfile() and os.path.basename(split_key(info.name)[0]):
        raise ValueError(f"{os.path.join(os.path.dirname(path), idx)}: lists {len(entries)} samples but "
                         f"{os.path.basename(path)} holds more ({info.name} at byte {block}); delete the .idx "
                         "(rmix then reads the tar's headers) or prepare the set again")


def ustar_fits(name: str) -> bool:
    """Whether a member name fits a plain ustar header: DALI's readers.webdataset reads no other (a
    longer name takes a PAX or GNU extension header, which it takes for a sample of its own)."""
    if len(name.encode("utf-8", "surrogateescape")) <= 100:  # the name field alone holds it (almost every name)
        return True
    try:
        tarfile.TarInfo(name).tobuf(format=tarfile.USTAR_FORMAT, encoding="utf-8", errors="strict")
        return True
    except (ValueError, UnicodeError):
        return False


def dali_readable(split) -> None:
    """ValueError naming the first member of `split` whose name DALI's reader cannot take (see `ustar_fits`)."""
    for i, sample in enumerate(split.samples):
        if not ustar_fits(sample.member):
            raise ValueError(f"{split.name(i)}: DALI's readers.webdataset cannot read this member (its name is too "
                             "long for a plain tar header: a PAX or GNU long-name entry); --loader torch reads it, "
                             "or write the set again with `rmix data prepare folder --format wds`")


def _split_labels(root: str, split: str) -> dict:
    """{label: "shard.tar:member" of its first sample} of a split's shards, {} where it has none; read
    once per process and set of shard files (sizes and times), as every loader build asks again."""
    stamp = tuple((n, os.stat(os.path.join(root, n)).st_size, os.stat(os.path.join(root, n)).st_mtime_ns)
                  for n in find_shards(root, split))
    return _split_labels_of(root, split, stamp)


@functools.lru_cache(maxsize=8)
def _split_labels_of(root: str, split: str, stamp: tuple) -> dict:
    labels = {}
    for name in find_shards(root, split):
        path, idx = os.path.join(root, name), name[:-len(".tar")] + ".idx"
        entries = read_dali_index(os.path.join(root, idx)) if os.path.isfile(os.path.join(root, idx)) \
            else index_shard(path)
        with open(path, "rb") as f:
            for j, sample in enumerate(entries):
                (_, _, _, member), (_, c_off, c_size, _) = _image_and_label(sample, path, j)
                f.seek(c_off)
                labels.setdefault(read_label(f.read(c_size), f"{path}:{member}"), f"{name}:{member}")
    return labels


def check_per_class(root: str, split: str, labels, meta: dict | None = None) -> None:
    """ValueError where a prepared set's index.json counts other samples per class than `labels` (every
    label of the split, in any order) holds: a .cls rewritten since `rmix data prepare` (same size, so
    its .idx still fits). A set without index.json, or an index without per_class, has nothing to check."""
    meta = meta if meta is not None else (_read_json(os.path.join(root, INDEX))
                                          if os.path.isfile(os.path.join(root, INDEX)) else {})
    want = (meta.get("per_class") or {}).get(split) if isinstance(meta.get("per_class"), dict) else None
    if not isinstance(want, list):
        return
    got = [0] * len(want)
    for label in labels:
        if 0 <= label < len(got):
            got[label] += 1
    if got != want:
        k = next(i for i, (a, b) in enumerate(zip(got, want)) if a != b)
        raise ValueError(f"{os.path.join(root, INDEX)}: records {want[k]} {split} samples of class {k} "
                         f"({meta.get('classes', [k] * (k + 1))[k]}), the shards' labels give {got[k]}: a .cls "
                         "changed since `rmix data prepare`; prepare the set again")


def _no_label_gaps(root: str, split: str, shards: list, samples: list) -> int:
    """Without index.json the classes are 0..the largest label of train and val together (the number
    returned): ValueError where they leave some of them without a sample (a typo such as 1000 for
    10), before any list of them is made. Both splits then count the same classes, one lacking a
    class or not."""
    named = dict(_split_labels(root, "val" if split == "train" else "train"))
    for s in samples:
        named.setdefault(s.label, f"{shards[s.shard]}:{s.member}")
    top = max(named, default=-1)
    if len(named) != top + 1:
        where = f" ({named[top]})"
        raise ValueError(f"{root}: the labels run to {top}{where} but {top + 1 - len(named)} of the classes "
                         f"0..{top} have no train or val sample; without {INDEX}, rmix counts the classes from "
                         "the labels: a typo in a .cls?")
    return top


def scan_shards(root, split: str, labels: bool = True) -> ShardSplit:
    """A split's shards and samples, from their indexes (DALI's ``.idx``, else the tar headers), verified.

    A set rmix prepared must hold index.json, exactly the shards it lists, with the counts it
    records (`_set_meta`); every ``.idx`` must end where its tar ends (`_check_tar_end`). Each
    failure is a ValueError naming the file. The classes come from index.json. ``labels``: read
    every sample's .cls now (one small read per sample: for ImageNet on network storage,
    minutes); with False they stay -1 (`ShardSplit.label` reads one), unless there is no
    index.json, whose classes are then counted from the labels.
    """
    root = os.path.abspath(os.fspath(root))
    shards = find_shards(root, split)
    if not shards:
        raise FileNotFoundError(f"no {split}-NNNNNN.tar shards in {root}")
    meta, shard_size = _set_meta(root, split)
    num_classes = len(meta["classes"]) if meta else None
    labels = labels or not meta
    samples, indexes = [], []
    for k, name in enumerate(shards):
        path, idx = os.path.join(root, name), name[:-len(".tar")] + ".idx"
        entries = read_dali_index(os.path.join(root, idx)) if os.path.isfile(os.path.join(root, idx)) else None
        if entries is None:
            entries, idx = index_shard(path), ""
        if not entries:  # DALI's reader dies on one ("Underful sample"); the torch loader would skip it
            raise ValueError(f"{path}: holds no samples; remove it (and renumber the shards after it) or prepare "
                             "the set again")
        _check_tar_end(path, idx, entries)
        if shard_size and meta:
            want = min(shard_size, meta["counts"][split] - k * shard_size)
            if len(entries) != want:
                raise ValueError(f"{path}: holds {len(entries)} samples, {INDEX} and --shard-size {shard_size} "
                                 f"say {want}; prepare the set again")
        with open(path, "rb") as f:
            for j, sample in enumerate(entries):
                (_, off, size, member), (_, c_off, c_size, _) = _image_and_label(sample, path, j)
                label = -1
                if labels:
                    f.seek(c_off)
                    label = read_label(f.read(c_size), f"{path}:{member}", num_classes)
                samples.append(Sample(k, off, size, member, label, c_off, c_size))
        indexes.append(idx)
    if meta and len(samples) != meta["counts"][split]:
        raise ValueError(f"{root}: {INDEX} records {meta['counts'][split]} {split} samples, "
                         f"the shards hold {len(samples)}")
    if meta and labels:
        check_per_class(root, split, [s.label for s in samples], meta)
    top = max((s.label for s in samples), default=-1)
    if not meta:  # the classes are counted from the labels: a gap is a typo, not a thousand empty classes
        top = _no_label_gaps(root, split, shards, samples)
    classes = meta.get("classes") or [str(i) for i in range(top + 1)]
    return ShardSplit(root, shards, indexes, list(classes), samples)
