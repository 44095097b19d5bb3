"""Find unreadable images before training: DALI cannot skip a bad sample, and names none.

Every file is decoded once with the decoder training uses (DALI's CPU decoder, or PIL for the
torchvision loader). A batch that fails is decoded again file by file, and each failing file is
given a reason from its bytes. Results are cached by the file list, sizes and mtimes.
"""
import hashlib
import json
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np

from rmix.pipelines.errors import missing_dali
from rmix.pipelines.folders import check_classes, scan_image_folder
from rmix.pipelines.images import pil_decodes
from rmix.pipelines.paths import cache_dir

BATCH = 64
MAGIC = [(b"\xff\xd8", "JPEG"), (b"\x89PNG\r\n\x1a\n", "PNG"), (b"GIF8", "GIF"), (b"BM", "BMP"),
         (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"), (b"P5", "PGM"), (b"P6", "PPM")]


def image_format(data: bytes):
    """The container format from the leading bytes, or None."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return next((name for magic, name in MAGIC if data.startswith(magic)), None)


def netpbm_maxval(data: bytes) -> int | None:
    """The maxval of a binary PGM or PPM (P5, P6) header, else None."""
    import re
    m = re.match(rb"P[56](?:\s+|#[^\n]*\n)+(\d+)(?:\s+|#[^\n]*\n)+(\d+)(?:\s+|#[^\n]*\n)+(\d+)\s", data[:512])
    return int(m.group(3)) if m else None


def dali_misreads(data: bytes) -> str | None:
    """Why DALI's decoder would read `data` wrong without an error, else None: a PGM or PPM whose
    maxval is neither 255 nor 65535 (10-bit, 12-bit) comes out scaled as if it were 16-bit, nearly black."""
    maxval = netpbm_maxval(data)
    if maxval is not None and maxval not in (255, 65535):
        return f"PGM/PPM with maxval {maxval} (DALI reads it nearly black; convert it to 8 or 16 bits)"
    return None


def reason(data: bytes, decoder: str) -> str:
    """Why `data` does not decode: zero-byte, not an image, header-only, truncated, unsupported."""
    if not data:
        return "zero-byte"
    fmt = image_format(data)
    if fmt is None:
        return "not an image"
    if decoder == "dali" and fmt == "GIF":
        return "unsupported format (GIF)"
    if fmt == "TIFF" and _tiff_int32(data):
        return "unsupported TIFF: 32-bit integer samples"
    if fmt == "JPEG":
        if b"\xff\xda" not in data:  # no start-of-scan: headers only, no pixels
            return "header-only"
        if not data.rstrip(b"\x00").endswith(b"\xff\xd9"):
            return "truncated"
    return f"corrupt {fmt}"


def _tiff_int32(data: bytes) -> bool:
    import io

    from PIL import Image

    from rmix.pipelines.images import tiff_int32
    try:
        with Image.open(io.BytesIO(data)) as im:
            return tiff_int32(im)
    except Exception:
        return False


def _child_quiet():
    """The decoding child's stderr to /dev/null: DALI's own [ERROR] lines never mix into the report."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.close(devnull)


_CHILD_PIPE = None  # the child's DALI pipeline, built once and again after a failed batch


def _decodes_in_child(blobs, threads) -> bool:
    """In the child process: whether DALI's CPU decoder takes every blob."""
    global _CHILD_PIPE
    from nvidia.dali import fn, pipeline_def, types
    if _CHILD_PIPE is None:
        @pipeline_def(batch_size=BATCH, num_threads=threads, device_id=None, prefetch_queue_depth=1)
        def decode():
            data = fn.external_source(name="data", dtype=types.UINT8, ndim=1)
            return fn.decoders.image(data, device="cpu", output_type=types.RGB)
        _CHILD_PIPE = decode()
        _CHILD_PIPE.build()
    try:
        _CHILD_PIPE.feed_input("data", [np.frombuffer(b, dtype=np.uint8) for b in blobs])
        _CHILD_PIPE.run()
        return True
    except Exception:  # the pipeline is no longer valid after a decode error
        _CHILD_PIPE = None
        return False


class _DaliDecoder:
    """DALI's CPU decoder in a child process, so that a crash of DALI's (it has died with SIGSEGV when
    its pipeline was rebuilt after several undecodable files) fails the files, not the check.

    `ok(blobs)`: True, False (DALI refused one), or None (the decoder died; the next call starts a
    new child).
    """

    def __init__(self, threads):
        self.threads = threads
        self.pool = None

    def ok(self, blobs):
        if any(len(b) == 0 for b in blobs):
            return False
        if self.pool is None:
            try:
                import nvidia.dali  # noqa: F401 - here, for the one-line error, not in the child
            except ImportError as error:
                raise missing_dali(error) from None
            self.pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"),
                                            initializer=_child_quiet)
        try:
            return self.pool.submit(_decodes_in_child, list(blobs), self.threads).result()
        except BrokenProcessPool:
            self.close()
            return None

    def close(self):
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)
            self.pool = None


def check_split(root, decoder="dali", threads=2):
    """Decode every file of an ImageFolder split; returns (ok_count, [(path, reason)], classes)."""
    index = scan_image_folder(root)  # raises on a missing root or an empty class folder
    paths = [os.path.join(index.root, f) for f in index.files]
    return (*_check_items(paths, lambda i: Path(paths[i]).read_bytes(), decoder, threads), index.classes)


def check_shard_split(root, split, decoder="dali", threads=2):
    """`check_split` of a split of WebDataset shards; each sample named ``shard.tar:member``.

    The set is verified first (`scan_shards`), and each label is read with its image by the
    loaders' one reader: a bad one is a ValueError naming its member.
    """
    from rmix.pipelines.wds import INDEX, check_per_class, dali_readable, scan_shards
    shards = scan_shards(root, split, labels=False)
    if decoder == "dali":
        dali_readable(shards)  # the check decodes as training will read
    names = [shards.name(i) for i in range(len(shards.samples))]
    counts = {"samples": len(names), "shards": len(shards.shards),
              "verified": os.path.isfile(os.path.join(shards.root, INDEX))}  # else counted from the shards
    labels = []

    def read(i):
        data, label = shards.read_with_label(i)
        labels.append(label)
        return data
    result = _check_items(names, read, decoder, threads)
    check_per_class(shards.root, split, labels)  # every label was read with its image
    return (*result, shards.classes, counts)


def _check_items(paths, read, decoder, threads):
    """(ok_count, [(name, reason)]) over items named ``paths``; ``read(i)`` gives item i's bytes."""
    dali = _DaliDecoder(threads) if decoder == "dali" else None
    bad = []
    try:
        for i in range(0, len(paths), BATCH):
            chunk = paths[i:i + BATCH]
            blobs = [read(j) for j in range(i, i + len(chunk))]
            if dali is not None:
                misread = [(p, dali_misreads(b)) for p, b in zip(chunk, blobs)]
                bad += [(p, why) for p, why in misread if why]
                if dali.ok(blobs):
                    continue
                for (p, b), (_, why) in zip(zip(chunk, blobs), misread):  # file by file: which ones, and why
                    verdict = None if why else dali.ok([b])
                    if not why and not verdict:
                        bad.append((p, "crashed the decoder" if verdict is None else reason(b, decoder)))
            else:
                bad += [(p, reason(b, decoder)) for p, b in zip(chunk, blobs) if not pil_decodes(b)]
    finally:
        if dali is not None:
            dali.close()
    return len(paths) - len(bad), bad


def _fingerprint(roots, decoder) -> str:
    h = hashlib.sha256(decoder.encode())
    for root in roots:
        if isinstance(root, tuple):  # (shard dir, split): the shards' sizes and times
            from rmix.pipelines.wds import find_shards
            for name in find_shards(root[0], root[1]):
                st = os.stat(os.path.join(root[0], name))
                h.update(f"{root}\0{name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
            continue
        index = scan_image_folder(root)
        for f in index.files:
            st = os.stat(os.path.join(index.root, f))
            h.update(f"{root}\0{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def check(roots, decoder="dali", threads=2, use_cache=True) -> dict:
    """{"ok": n, "bad": [{"path", "reason"}], "classes": k} over the splits in `roots`, cached.

    A root is an ImageFolder split directory, or (shard directory, "train"/"val") for shards.
    """
    roots = [(os.path.abspath(r[0]), r[1]) if isinstance(r, tuple) else os.path.abspath(r) for r in roots]
    key = _fingerprint(roots, decoder)
    cached = cache_dir() / "preflight" / f"{key}.json"
    if use_cache and cached.is_file():
        return json.loads(cached.read_text())
    total, bad, classes, shards = 0, [], None, {}
    for root in roots:
        if isinstance(root, tuple):
            n, b, c, shards[root[1]] = check_shard_split(*root, decoder, threads)
        else:
            n, b, c = check_split(root, decoder, threads)
        total, bad = total + n, bad + [{"path": p, "reason": r} for p, r in b]
        classes = classes or c
        check_classes(classes, c, _name(root), _name(roots[0]), _name(root))
    result = {"ok": total, "bad": bad, "classes": len(classes), **({"shards": shards} if shards else {})}
    if total == 0 and not bad:
        raise ValueError(f"{roots[0]}: the dataset holds no images")
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(".tmp")
        tmp.write_text(json.dumps(result))
        os.replace(tmp, cached)
    except OSError:
        pass  # a read-only cache only costs the next run a re-check
    return result


def _name(root) -> str:
    """A split as the user knows it: a folder, or "DIR (train shards)"."""
    return f"{root[0]} ({root[1]} shards)" if isinstance(root, tuple) else str(root)


def summary(result, limit=5) -> str:
    """One line naming the bad files (the first `limit`)."""
    bad = result["bad"]
    names = ", ".join(f"{b['path']} ({b['reason']})" for b in bad[:limit])
    more = f" and {len(bad) - limit} more" if len(bad) > limit else ""
    return f"{len(bad)} unreadable image file(s): {names}{more}"
