"""Checkpoints that load the usual way, are safe to load, and survive a kill at any moment.

A file is a plain dict, as timm's and the torchvision references' are:
`torch.load(path, weights_only=True)["model"]` is the model's state dict, beside "optimizer",
"epoch", "config", the RNG states and the rest. The key "rmix" holds {"format", "version",
"sha256"}: a digest of the content (every tensor's dtype, shape and bytes, every plain value),
which `read` verifies, since torch's zip reader checks no CRC and a flipped byte would otherwise
load as a different weight. The digest walks the loaded values, not the file's bytes, so it does
not depend on how a torch version serializes. Loaded with weights_only=True, always passed
explicitly, so no pickle from a stranger's file ever runs. Files of version 1 (until 2026-12:
the content torch.save'd into a uint8 tensor inside a wrapper) are still read.
"""
import errno
import hashlib
import io
import os
import tempfile
import zipfile

import torch

from rmix.pipelines.errors import one_line

FORMAT = "rmix-checkpoint"
VERSION = 2


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the path and the reason."""


class SaveError(RuntimeError):
    """A checkpoint could not be written (disk full, I/O error); the previous file is intact."""


def _bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def digest(obj) -> str:
    """sha256 of a tree of dicts, sequences, tensors and plain values; the same for equal content."""
    h = hashlib.sha256()

    def walk(x):
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous()
            h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(x, dict):
            h.update(f"D{len(x)}".encode())
            for k in sorted(x, key=repr):
                h.update(f"K{k!r}".encode())
                walk(x[k])
        elif isinstance(x, (list, tuple)):  # one tag: a loader may give a list where a tuple was saved
            h.update(f"L{len(x)}".encode())
            for v in x:
                walk(v)
        elif x is None or isinstance(x, (bool, int, float, str, bytes)):
            h.update(f"V{type(x).__name__}:{x!r}".encode())
        else:
            raise TypeError(f"checkpoint: cannot store a {type(x).__name__} (plain values and tensors only)")
    walk(obj)
    return h.hexdigest()


def save(path, payload: dict) -> None:
    """Write atomically: temporary file in the same directory, fsync, rename; old file kept until then.

    Raises SaveError naming the path and the OS's reason when the disk refuses; the file that was
    there before is left as it was.
    """
    path = os.fspath(path)
    payload = {k: v for k, v in payload.items() if k not in ("rmix", "foreign")}
    data = _bytes({**payload, "rmix": {"format": FORMAT, "version": VERSION, "sha256": digest(payload)}})
    d = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=d)
        with os.fdopen(fd, "wb") as f:
            _write(f, data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        _remove(tmp)
        reason = e.strerror or os.strerror(e.errno or errno.EIO)
        raise SaveError(f"cannot write {path}: {reason}; the previous {os.path.basename(path)} is intact") from None
    except BaseException:
        _remove(tmp)
        raise
    try:  # make the rename itself durable
        dfd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def _write(f, data: bytes):
    f.write(data)


def _remove(tmp):
    if tmp and os.path.exists(tmp):
        try:
            os.unlink(tmp)
        except OSError:
            pass


def _torch_load(path, src):
    if isinstance(src, str):
        with open(src, "rb") as f:
            head = f.read(4)
        if head[:2] != b"\x80\x02" and head != b"PK\x03\x04":  # neither torch's legacy pickle nor its zip
            raise CheckpointError(f"{path}: not a checkpoint (not a file torch.save wrote)")
    try:
        return torch.load(src, map_location="cpu", weights_only=True)
    except Exception as e:  # zip errors, unpickling refusals, EOF: all one story for the user
        reason = one_line(e, None, typed=False, first_line=True)
        if isinstance(src, str) and head == b"PK\x03\x04" and not zipfile.is_zipfile(src):
            reason = "truncated or damaged (torch's zip has no directory at its end: cut short while written or copied)"
        if "Unsupported global" in str(e) or "weights_only" in str(e):
            reason = "it contains Python objects that are not plain data (refused to unpickle)"
        raise CheckpointError(f"{path}: cannot read checkpoint: {reason}") from None


def read(path) -> dict:
    """Load a checkpoint file with weights_only=True; rmix files are verified and unwrapped.

    Returns the rmix payload, or for a foreign file (the paper's `{'epoch', 'state_dict', ...}`,
    a bare state dict) the loaded dict with `"foreign": True` added.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        raise CheckpointError(f"{path}: is a directory, not a checkpoint file (its latest.pt?)")
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint file")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"{path}: checkpoint file is empty (0 bytes)")
    obj = _torch_load(path, path)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: not a checkpoint (holds a {type(obj).__name__}, not a dict)")
    meta = obj.get("rmix")
    if isinstance(meta, dict) and meta.get("format") == FORMAT:
        if meta.get("version") != VERSION:
            raise CheckpointError(f"{path}: checkpoint version {meta.get('version')} is not {VERSION}")
        payload = {k: v for k, v in obj.items() if k != "rmix"}
        if digest(payload) != meta.get("sha256"):
            raise CheckpointError(f"{path}: checksum mismatch (the file is corrupted)")
        payload["foreign"] = False
        return payload
    if obj.get("format") == FORMAT:  # version 1: the content inside a verified byte tensor
        if obj.get("version") != 1:
            raise CheckpointError(f"{path}: checkpoint version {obj.get('version')} is not 1 or {VERSION}")
        data = obj["payload"].numpy().tobytes()
        if hashlib.sha256(data).hexdigest() != obj["sha256"]:
            raise CheckpointError(f"{path}: checksum mismatch (the file is corrupted)")
        payload = _torch_load(path, io.BytesIO(data))
        payload["foreign"] = False
        return payload
    return {**obj, "foreign": True}


def model_state(ckpt: dict) -> dict:
    """The model's state dict from an rmix payload or a foreign (paper / bare) checkpoint."""
    if not ckpt.get("foreign"):
        return ckpt["model"]
    state = ckpt.get("state_dict", ckpt.get("model", ckpt))
    return {k: v for k, v in state.items() if k != "foreign"}


def ema_state(ckpt: dict, path) -> dict:
    """The EMA weights of a checkpoint: rmix's `ema` (from --ema) or timm's `state_dict_ema`."""
    state = ckpt.get("ema", ckpt.get("state_dict_ema"))
    if state is None:
        raise ValueError(f"--ema: {path} has no EMA weights (trained without --ema); leave out --ema")
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    return state
