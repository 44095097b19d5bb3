"""`rmix data prepare`: from ImageNet's three archives, or any ImageFolder, to what rmix trains on.

The archives are the ones image-net.org hands out: ``ILSVRC2012_img_train.tar`` (a tar of one
tar per class), ``ILSVRC2012_img_val.tar`` (50,000 flat JPEGs) and
``ILSVRC2012_devkit_t12.tar.gz`` (the class list and the validation labels). Their md5s and
the devkit's parser are torchvision's (`torchvision.datasets.imagenet`), so the classes, their
order (sorted wnids) and the validation labels are exactly torchvision's `ImageNet`'s.

The images are never extracted to a temporary copy: the tars are uncompressed, so each JPEG's
byte range in ``ILSVRC2012_img_train.tar`` is known from the headers (the outer member's data
offset plus the inner one's), and the output is written from those ranges.

Outputs, atomic and resumable:
- ``folder``: ``train/<wnid>/``, ``val/<wnid>/``. Each class is written to ``<wnid>.partial``
  and renamed when complete; a rerun skips the complete classes. An ImageFolder's subfolders
  inside a class are kept (``cls/a/x.jpg`` and ``cls/b/x.jpg`` stay two files).
- ``wds``: ``train-NNNNNN.tar`` / ``val-NNNNNN.tar`` of ``--shard-size`` samples (train in one
  fixed shuffled order, so that any rank's slice mixes the classes; val in file order), each
  with its DALI index (`pipelines.wds`), written to ``.partial`` and renamed; a rerun skips the
  complete shards.
- both: ``prepare.json`` (what is being made, written first: a rerun with other settings, or
  from a source that changed since, is refused naming what differs) and, last, ``index.json``
  (classes, names, counts): a finished set has one.

Nothing is written outside ``--out``: it may not overlap the source, the devkit is extracted by
rmix (every member checked first: no ``../x``, ``/abs/x``, links or devices) into ``--out``
before torchvision's parser reads it, an archived image keeps only its base name, and a class
must be one folder name.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tarfile
import tempfile
from contextlib import contextmanager
from typing import Callable, NamedTuple

import numpy as np

from rmix.pipelines.errors import one_line
from rmix.pipelines.folders import IMG_EXTENSIONS, scan_image_folder
from rmix.pipelines.wds import INDEX, ShardWriter, member_key, shard_name

PLAN = "prepare.json"
SHUFFLE_SEED = 0  # the train shards' one fixed order: the same shards on every machine


class PrepareError(ValueError):
    """An archive or directory that cannot be prepared; the message names it (one line)."""


class Item(NamedTuple):
    """One image to write: its name inside the source, its label, how to read its bytes."""
    name: str               # e.g. n01440764/n01440764_10026.JPEG
    label: int
    read: Callable[[], bytes]


# ImageNet's archives --------------------------------------------------------------------------


def archive_paths(archives: str) -> dict:
    """{"train", "val", "devkit"} -> path in ``archives``; PrepareError naming the first missing one."""
    from torchvision.datasets.imagenet import ARCHIVE_META
    if not os.path.isdir(archives):
        raise PrepareError(f"--archives: {archives} is not a directory")
    out = {}
    for kind in ("devkit", "train", "val"):
        name = ARCHIVE_META[kind][0]
        path = os.path.join(archives, name)
        if not os.path.isfile(path):
            raise PrepareError(f"--archives: {archives} has no {name} (the ImageNet 2012 {kind} archive, "
                               "from image-net.org)")
        out[kind] = path
    return out


def md5sum(path: str, progress=None, chunk: int = 1 << 22) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
            if progress is not None:
                progress(len(block))
    return h.hexdigest()


def verify_archives(paths: dict, work: str, say=print):
    """Each archive's md5 against torchvision's published one (as its `ImageNet` checks), remembered
    in ``work`` by size and mtime so that a rerun does not read 150 GB again."""
    from torchvision.datasets.imagenet import ARCHIVE_META
    seen_file = os.path.join(work, "verified.json")
    seen = _read_json(seen_file, "delete it to check the archives again") if os.path.isfile(seen_file) else {}
    for kind in ("devkit", "val", "train"):
        path, (name, md5) = paths[kind], ARCHIVE_META[kind]
        st = os.stat(path)
        stamp = f"{os.path.abspath(path)}:{st.st_size}:{st.st_mtime_ns}"
        if seen.get(stamp) == md5:
            continue
        with _bar(st.st_size, f"md5 {name}", unit="B") as bar:
            got = md5sum(path, bar)
        if got != md5:
            raise PrepareError(f"{path}: md5 {got} is not the published {md5} (a truncated or different "
                               "download; download it again, or --skip-md5 to take it as it is)")
        seen[stamp] = md5
        _write_json(seen_file, seen)


def read_devkit(path: str, work: str, skip_md5: bool):
    """(wnids sorted, {wnid: names}, val wnid per val image in file order) via torchvision's parser."""
    from unittest import mock

    from torchvision.datasets import imagenet
    name = imagenet.ARCHIVE_META["devkit"][0]
    root = os.path.join(work, "devkit")
    os.makedirs(root, exist_ok=True)
    link = os.path.join(root, name)
    if os.path.lexists(link):
        os.remove(link)
    os.symlink(os.path.abspath(path), link)  # its parser reads root/<name> and writes root/meta.bin
    meta = dict(imagenet.ARCHIVE_META)
    if skip_md5:  # the parser checks the published md5 itself: give it this archive's own instead
        meta["devkit"] = (name, md5sum(path))
    try:
        devkit_members(path)  # refused before anything is written, whoever extracts it
        # its parser extracts with no member filter into the system's temp folder: it gets rmix's
        # checked extraction instead, into a temp folder inside --out
        with mock.patch.dict(imagenet.ARCHIVE_META, meta), \
                mock.patch.object(imagenet, "extract_archive", lambda src, to, *a, **k: extract_devkit(path, to)), \
                mock.patch.object(tempfile, "tempdir", root):
            imagenet.parse_devkit_archive(root)
        wnid_to_classes, val_wnids = imagenet.load_meta_file(root)
    except PrepareError:
        raise
    except Exception as error:  # not a tar.gz, no meta.mat, no ground truth, ...
        raise PrepareError(f"{path}: not a readable ImageNet devkit ({one_line(error)})") from None
    wnids = sorted(wnid_to_classes)
    if len(wnids) < 2:
        raise PrepareError(f"{path}: its meta.mat lists {len(wnids)} leaf classes")
    bad = [w for w in wnids if not _is_part(w)]
    if bad:  # a class is a folder of the output: "..", "." or "a/b" would write beside it
        raise PrepareError(f"{path}: its meta.mat names a class {bad[0]!r}, which is not a folder name")
    return wnids, {w: ", ".join(wnid_to_classes[w]) for w in wnids}, list(val_wnids)


def devkit_members(path: str) -> list[tarfile.TarInfo]:
    """The devkit's members, each a file or folder whose name stays inside the folder it is
    extracted to; PrepareError naming the first that is not (``../x``, ``/abs/x``, a link, a device)."""
    with tarfile.open(path, "r:*") as tar:
        members = tar.getmembers()
    for m in members:
        if not (m.isfile() or m.isdir()):
            raise PrepareError(f"{path}: member {m.name} is a {_kind(m)}, not a file or folder; refused")
        if os.path.isabs(m.name) or ".." in m.name.split("/"):
            raise PrepareError(f"{path}: member {m.name} would be written outside --out; refused")
    return members


def extract_devkit(path: str, to: str):
    """Extract the devkit into ``to``, its files' bytes only (no links, modes or owners), after
    `devkit_members` checked every name: the same on every Python (tarfile's ``filter="data"``
    is only in >= 3.10.12)."""
    members = devkit_members(path)
    with tarfile.open(path, "r:*") as tar:
        for m in members:
            target = os.path.join(to, os.path.normpath(m.name))
            if m.isdir():
                os.makedirs(target, exist_ok=True)
                continue
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with tar.extractfile(m) as src, open(target, "wb") as f:
                shutil.copyfileobj(src, f)


def _kind(m: tarfile.TarInfo) -> str:
    return ("symlink" if m.issym() else "hard link" if m.islnk() else "device" if m.ischr() or m.isblk()
            else "fifo" if m.isfifo() else "special member")


def _is_part(name: str) -> bool:
    """Whether ``name`` is one folder or file name (what a class or a file may be called in --out)."""
    return name not in ("", ".", "..") and "/" not in name and "\0" not in name and \
        (os.altsep is None or os.altsep not in name)


def _range_reader(path: str, offset: int, size: int):
    def read():
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read(size)
        if len(data) != size:
            raise PrepareError(f"{path}: ends inside a member at byte {offset} (truncated)")
        return data
    return read


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS)


def train_items(path: str, wnids: list[str]) -> list[Item]:
    """Every JPEG of the train archive, class by class (sorted wnids), each class's files sorted."""
    label = {w: i for i, w in enumerate(wnids)}
    by_class: dict[str, list[Item]] = {}
    try:
        with tarfile.open(path, "r:") as outer:
            for m in outer:
                if not m.isfile():
                    continue
                wnid, ext = os.path.splitext(os.path.basename(m.name))
                if ext != ".tar" or wnid not in label:
                    raise PrepareError(f"{path}: member {m.name} is not a <wnid>.tar of the devkit's classes")
                items = []
                with tarfile.open(fileobj=outer.extractfile(m), mode="r:") as inner:
                    for j in inner:
                        if j.isfile() and _is_image(j.name):
                            items.append(Item(f"{wnid}/{os.path.basename(j.name)}", label[wnid],
                                              _range_reader(path, m.offset_data + j.offset_data, j.size)))
                by_class[wnid] = sorted(items, key=lambda it: it.name)
    except (tarfile.TarError, EOFError) as error:
        raise PrepareError(f"{path}: not a readable train archive ({one_line(error)})") from None
    missing = [w for w in wnids if not by_class.get(w)]
    if missing:
        raise PrepareError(f"{path}: no images for {len(missing)} of the devkit's {len(wnids)} classes "
                           f"(first: {missing[0]}); a truncated download?")
    return [it for w in wnids for it in by_class[w]]


def val_items(path: str, wnids: list[str], val_wnids: list[str]) -> list[Item]:
    """The val archive's images, sorted by name, labelled by the devkit's ground truth (in that order)."""
    label = {w: i for i, w in enumerate(wnids)}
    members = []
    try:
        with tarfile.open(path, "r:") as tar:
            members = sorted((m for m in tar if m.isfile() and _is_image(m.name)), key=lambda m: m.name)
    except (tarfile.TarError, EOFError) as error:
        raise PrepareError(f"{path}: not a readable val archive ({one_line(error)})") from None
    if len(members) != len(val_wnids):
        raise PrepareError(f"{path}: holds {len(members)} images, the devkit's ground truth labels "
                           f"{len(val_wnids)} (a truncated download, or another year's devkit?)")
    return [Item(f"{w}/{os.path.basename(m.name)}", label[w], _range_reader(path, m.offset_data, m.size))
            for m, w in zip(members, val_wnids)]


def prepare_imagenet(archives: str, out: str, *, fmt: str = "folder", shard_size: int = 1000,
                     skip_md5: bool = False, say=print) -> dict:
    """The whole preparation; returns the index (also written to out/index.json)."""
    paths = archive_paths(archives)
    check_apart(out, archives, "--archives")
    inputs = {os.path.basename(p): _file_stamp(p) for p in paths.values()}
    work = _start(out, {"source": "imagenet", "archives": os.path.abspath(archives), "format": fmt,
                        "shard_size": shard_size if fmt == "wds" else None, "inputs": inputs}, "--archives")
    need = os.path.getsize(paths["train"]) + os.path.getsize(paths["val"])  # the JPEGs are the archives' bytes
    check_space(out, need)
    if not skip_md5:
        verify_archives(paths, work, say)
    wnids, names, val_wnids = read_devkit(paths["devkit"], work, skip_md5)
    say(f"reading the archives' headers ({len(wnids)} classes)")
    splits = {"train": train_items(paths["train"], wnids), "val": val_items(paths["val"], wnids, val_wnids)}
    return _write(out, work, splits, wnids, names, fmt, shard_size, say)


# Any ImageFolder -------------------------------------------------------------------------------


def prepare_folder(src: str, out: str, *, fmt: str = "wds", shard_size: int = 1000, say=print) -> dict:
    """An ImageFolder (src/train, src/val) to shards (or a copy in rmix's layout); returns the index."""
    if not os.path.isdir(src):
        raise PrepareError(f"--src: {src} is not a directory")
    check_apart(out, src, "--src")
    splits, classes = {}, None
    for split in ("train", "val"):
        root = os.path.join(src, split)
        if not os.path.isdir(root):
            raise PrepareError(f"--src: {src} has no {split}/ folder (expected an ImageFolder train/ and val/)")
        try:
            index = scan_image_folder(root)
        except (FileNotFoundError, ValueError) as error:
            raise PrepareError(f"--src: {error}") from None
        if classes is not None and index.classes != classes:
            raise PrepareError(f"--src: {src}/val's class folders differ from train/'s")
        classes = index.classes
        splits[split] = [Item(f, label, _file_reader(os.path.join(index.root, f)))
                         for f, label in zip(index.files, index.labels)]
    inputs = folder_stamp(src, splits, classes)
    work = _start(out, {"source": "folder", "src": os.path.abspath(src), "format": fmt,
                        "shard_size": shard_size if fmt == "wds" else None, "inputs": inputs}, "--src")
    check_space(out, sum(s["bytes"] for s in inputs.values()))
    return _write(out, work, splits, classes, {c: c for c in classes}, fmt, shard_size, say)


def _file_reader(path: str):
    def read():
        with open(path, "rb") as f:
            return f.read()
    return read


# The source: apart from --out, and unchanged since the preparation began ---------------------------


def check_apart(out: str, src: str, option: str):
    """PrepareError when ``out`` is ``src``, inside it or holds it (symlinks resolved): writing
    there would change the source, or read what is being written."""
    o, s = os.path.realpath(out), os.path.realpath(src)
    where = ("is" if o == s else "is inside" if os.path.commonpath([o, s]) == s
             else "holds" if os.path.commonpath([o, s]) == o else None)
    if where:
        raise PrepareError(f"--out: {out} {where} {option} {src}; give a directory outside it")


def _file_stamp(path: str) -> dict:
    st = os.stat(path)
    return {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


def folder_stamp(src: str, splits: dict, classes: list[str]) -> dict:
    """{"<split>/<class>": {"files", "bytes", "digest"}}: the digest of every file's name, size and
    mtime, so that a rerun names the class that changed without keeping 1.3M names in prepare.json."""
    stamp, hashes = {}, {}
    for split, items in splits.items():
        for it in items:
            st = os.stat(os.path.join(src, split, it.name))
            key = f"{split}/{classes[it.label]}"
            s = stamp.setdefault(key, {"files": 0, "bytes": 0})
            s["files"] += 1
            s["bytes"] += st.st_size
            hashes.setdefault(key, hashlib.sha256()).update(f"{it.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    for key, h in hashes.items():
        stamp[key]["digest"] = h.hexdigest()
    return stamp


def changes(before: dict, now: dict, limit: int = 3) -> str:
    """What differs between two stamps, e.g. ``train/cat (files 6 -> 7, bytes 800 -> 950)``; "" if nothing."""
    said = []
    for key in sorted(set(before) | set(now)):
        a, b = before.get(key), now.get(key)
        if a == b:
            continue
        if a is None or b is None:
            said.append(f"{key} {'is new' if a is None else 'is gone'}")
            continue
        a, b = (x if isinstance(x, dict) else {} for x in (a, b))
        parts = [f"{f} {a.get(f)} -> {b.get(f)}" for f in ("files", "bytes") if a.get(f) != b.get(f)]
        said.append(f"{key} ({', '.join(parts) or 'modified'})")
    more = f"; and {len(said) - limit} more" if len(said) > limit else ""
    return "; ".join(said[:limit]) + more


# Writing ------------------------------------------------------------------------------------------


def check_space(out: str, need: int):
    """PrepareError when ``out``'s disk has less free space than what is still to be written."""
    have = _written_bytes(out)
    free = shutil.disk_usage(out).free
    if need - have > free:
        raise PrepareError(f"--out: {out} has {free / 1e9:.1f} GB free; the prepared set needs about "
                           f"{(need - have) / 1e9:.1f} GB more")


def _written_bytes(out: str) -> int:
    total = 0
    for dirpath, _, files in os.walk(out):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(dirpath, f))
            except OSError:
                pass
    return total


def _start(out: str, plan: dict, option: str) -> str:
    """Create ``out`` (or take up its preparation, if its settings and ``plan["inputs"]``, the
    source named by ``option``, are the same); returns its work folder."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise PrepareError(f"--out: {out} is a file, not a directory")
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as error:
        raise PrepareError(f"--out: cannot create {out} ({error.strerror})") from None
    if not os.access(out, os.W_OK):
        raise PrepareError(f"--out: {out} is not writable")
    plan_file = os.path.join(out, PLAN)
    if os.path.isfile(plan_file):
        before = _read_json(plan_file, "restore it, or prepare into another --out")
        if before != plan and all(n in (PLAN, ".prepare") for n in os.listdir(out)):
            # refused before any image was written (an md5, a devkit): the fixed source starts again
            _write_json(plan_file, plan)
            before = plan
        settings = (set(before) | set(plan)) - {"inputs"}
        differ = ", ".join(f"{k} {before.get(k)!r} -> {plan.get(k)!r}" for k in sorted(settings)
                           if before.get(k) != plan.get(k))
        if differ:
            raise PrepareError(f"--out: {out} holds a preparation with other settings ({differ}); "
                               "give those settings to continue it, or another --out")
        # a plan without inputs is an older rmix's: its source was not recorded, so not compared
        changed = changes(_as_dict(before.get("inputs", plan["inputs"])), plan["inputs"])
        if changed:  # continuing would mix the old source's images with the new one's
            raise PrepareError(f"{option}: {plan.get('src') or plan.get('archives')} changed since {out} was "
                               f"prepared from it: {changed}; prepare it into a new --out")
    elif [n for n in os.listdir(out) if not n.startswith(".")]:
        raise PrepareError(f"--out: {out} is not empty and holds no rmix preparation; give an empty or new directory")
    else:
        _write_json(plan_file, plan)
    _done(out)  # a malformed index is refused before anything is written
    work = os.path.join(out, ".prepare")
    os.makedirs(work, exist_ok=True)
    return work


def _done(out: str) -> dict | None:
    """The finished preparation's index.json, None if there is none yet."""
    index_file = os.path.join(out, INDEX)
    return _read_json(index_file, "delete it and rerun to write it again") if os.path.isfile(index_file) else None


def _write(out, work, splits: dict, classes: list[str], names: dict, fmt: str, shard_size: int, say) -> dict:
    index_file = os.path.join(out, INDEX)
    counts = {s: len(items) for s, items in splits.items()}
    done = _done(out)
    if done is not None and done.get("counts") == counts:
        damage = _damage(out, done, fmt, classes, shard_size)
        if not damage:
            shutil.rmtree(work, ignore_errors=True)
            say(f"{out}: already prepared ({counts['train']} train, {counts['val']} val images)")
            return done
        say(f"{out}: prepared before, but {damage}; writing that part again")
    if fmt == "folder":
        _write_folders(out, splits, classes)
        shards = None
    elif fmt == "wds":
        if shard_size < 1:
            raise PrepareError(f"--shard-size: must be >= 1, got {shard_size}")
        shards = {s: _write_shards(out, s, _order(s, items), shard_size) for s, items in splits.items()}
    else:
        raise PrepareError(f"--format: expected folder or wds, got {fmt!r}")
    index = {"format": fmt, "classes": classes, "names": [names[c] for c in classes], "counts": counts,
             "per_class": {s: np.bincount([it.label for it in items], minlength=len(classes)).tolist()
                           for s, items in splits.items()}}
    if shards is not None:
        index["shards"] = shards
    else:  # each class folder's file names and sizes: a rerun sees a file deleted, emptied or cut short
        index["folder_sizes"] = {s: {c: _folder_digest(os.path.join(out, s, c)) for c in classes} for s in splits}
    _write_json(index_file, index)  # last: its presence says the set is complete
    shutil.rmtree(work, ignore_errors=True)
    say(f"{out}: {counts['train']} train and {counts['val']} val images, {len(classes)} classes ({fmt})")
    return index


def _damage(out: str, done: dict, fmt: str, classes: list[str], shard_size: int) -> str | None:
    """What of a finished preparation is no longer there (deleted or cut short since), removed so that
    the rerun writes it again; None when it is whole. Cheap: folder listings, shard sizes and indexes."""
    if done.get("format") != fmt:
        return None  # another format asked for: _write's own checks say so
    found = []
    for split, per_class in (done.get("per_class") or {}).items():
        if fmt == "folder":
            sizes = (done.get("folder_sizes") or {}).get(split, {})
            for cls, n in zip(classes, per_class):
                folder = os.path.join(out, split, cls)
                have = sum(len(files) for _, _, files in os.walk(folder)) if os.path.isdir(folder) else 0
                if have != n:
                    found.append(f"{split}/{cls} holds {have} of its {n} images")
                elif cls in sizes and _folder_digest(folder) != sizes[cls]:
                    found.append(f"{split}/{cls} has a file of another size than written")
                else:
                    continue
                shutil.rmtree(folder, ignore_errors=True)
        else:
            for k, name in enumerate((done.get("shards") or {}).get(split, [])):
                path = os.path.join(out, name)
                want = min(shard_size, done["counts"][split] - k * shard_size)
                problem = _shard_problem(path, want)
                if problem:
                    found.append(f"{name} {problem}")
                    for stale in (path, path[:-len(".tar")] + ".idx"):
                        if os.path.exists(stale):
                            os.remove(stale)
    if found:
        os.remove(os.path.join(out, INDEX))  # written again last, once the set is whole
        return "; ".join(found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")
    return None


def _folder_digest(folder: str) -> str:
    """sha256 of a folder's files' relative paths and sizes (stat only, no reads)."""
    import hashlib
    h = hashlib.sha256()
    for base, _, files in sorted(os.walk(folder)):
        for name in sorted(files):
            path = os.path.join(base, name)
            h.update(f"{os.path.relpath(path, folder)}\0{os.path.getsize(path)}\n".encode())
    return h.hexdigest()


def _shard_problem(path: str, want: int) -> str | None:
    """Why a shard written before is not whole ("is missing", "holds 3 of 5 samples", ...), or None."""
    from rmix.pipelines.wds import _check_tar_end, read_dali_index
    idx = path[:-len(".tar")] + ".idx"
    if not os.path.isfile(path) or not os.path.isfile(idx):
        return "is missing"
    try:
        entries = read_dali_index(idx)
        _check_tar_end(path, os.path.basename(idx), entries)
    except ValueError as error:
        return f"is damaged ({error})"
    return None if len(entries) == want else f"holds {len(entries)} of {want} samples"


def _order(split: str, items: list[Item]) -> list[Item]:
    if split != "train":
        return items
    perm = np.random.default_rng(SHUFFLE_SEED).permutation(len(items))
    return [items[i] for i in perm]


def _write_shards(out: str, split: str, items: list[Item], shard_size: int) -> list[str]:
    names, taken = [], set()
    keys = [member_key(it.name, taken) for it in items]  # all keys first: the same on a rerun
    n_shards = -(-len(items) // shard_size)
    with _bar(len(items), f"{split} shards") as bar:
        for k in range(n_shards):
            name = shard_name(split, k)
            names.append(name)
            chunk = range(k * shard_size, min((k + 1) * shard_size, len(items)))
            path = os.path.join(out, name)
            if os.path.isfile(path) and os.path.isfile(path[:-4] + ".idx"):
                bar(len(chunk))
                continue  # written by an earlier run: complete, since it was renamed into place
            writer = ShardWriter(path)
            try:
                for i in chunk:
                    it = items[i]
                    ext = os.path.splitext(it.name)[1][1:].lower() or "jpg"
                    writer.add(keys[i], "jpg" if ext == "jpeg" else ext, it.read(), it.label)
                    bar(1)
                writer.close()
            except BaseException:
                writer.abort()
                raise
    return names


def _write_folders(out: str, splits: dict, classes: list[str]):
    for split, items in splits.items():
        by_class: dict[int, list[Item]] = {}
        for it in items:
            by_class.setdefault(it.label, []).append(it)
        with _bar(len(items), f"{split} folders") as bar:
            for label, group in sorted(by_class.items()):
                final = os.path.join(out, split, classes[label])
                if os.path.isdir(final):
                    bar(len(group))
                    continue  # renamed into place by an earlier run: complete
                tmp = final + ".partial"
                shutil.rmtree(tmp, ignore_errors=True)
                os.makedirs(tmp)
                for it, name in zip(group, _names_in_class(group)):
                    path = os.path.join(tmp, name)
                    os.makedirs(os.path.dirname(path), exist_ok=True)
                    with open(path, "wb") as f:
                        f.write(it.read())
                    bar(1)
                os.rename(tmp, final)


def _names_in_class(group: list[Item]) -> list[str]:
    """Each item's path inside its class folder: its own subfolders kept, so that ``cls/a/x.jpg``
    and ``cls/b/x.jpg`` stay two files; a name met twice (an archive's) gets ``_1``, ``_2``..."""
    names, taken = [], set()
    for it in group:
        parts = it.name.replace(os.sep, "/").split("/")[1:]
        if not parts or not all(_is_part(p) for p in parts):
            raise PrepareError(f"{it.name}: not a file name inside its class folder")
        rel = "/".join(parts)
        stem, ext = os.path.splitext(rel)
        name, n = rel, 1
        while name in taken:
            name, n = f"{stem}_{n}{ext}", n + 1
        taken.add(name)
        names.append(name)
    return names


def _read_json(path: str, fix: str) -> dict:
    """A JSON object rmix wrote; PrepareError naming ``path`` (and ``fix``) when it is not one."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except ValueError as error:  # not JSON, not UTF-8
        raise PrepareError(f"{path}: not readable JSON ({one_line(error)}); {fix}") from None
    if not isinstance(data, dict):
        raise PrepareError(f"{path}: holds a JSON {type(data).__name__}, not the object rmix writes; {fix}")
    return data


def _as_dict(x) -> dict:
    return x if isinstance(x, dict) else {"(unreadable)": x}


def _write_json(path: str, data):
    tmp = path + ".partial"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


@contextmanager
def _bar(total: int, desc: str, unit: str = "img"):
    """A callable ``bar(n)`` advancing a progress bar (tqdm on a terminal, a line per 10% elsewhere)."""
    import sys

    from tqdm import tqdm
    tty = sys.stderr.isatty()
    bar = tqdm(total=total, desc=desc, unit=unit, unit_scale=unit == "B", leave=False, disable=not tty)
    state = {"n": 0, "shown": 0}

    def advance(n: int):
        bar.update(n)
        state["n"] += n
        if not tty and total and state["n"] * 10 // total > state["shown"]:
            state["shown"] = state["n"] * 10 // total
            print(f"{desc}: {state['n']}/{total}", file=sys.stderr, flush=True)
    try:
        yield advance
    finally:
        bar.close()
