"""Checkpoints that are safe to load and survive a kill at any moment.

A file holds {"format": "rmix-checkpoint", "version", "sha256", "payload": uint8 tensor}, where the
payload is itself a torch.save of plain values and tensors. Both levels load with
weights_only=True, always passed explicitly, so no pickle from a stranger's file ever runs, and
the sha256 catches a bit flip that the zip container would not.
"""
import hashlib
import io
import os
import tempfile

import torch

FORMAT = "rmix-checkpoint"
VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the path and the reason."""


def _bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def save(path, payload: dict) -> None:
    """Write atomically: temporary file in the same directory, fsync, rename; old file kept until then."""
    path = os.fspath(path)
    data = _bytes(payload)
    wrapper = {"format": FORMAT, "version": VERSION, "sha256": hashlib.sha256(data).hexdigest(),
               "payload": torch.frombuffer(bytearray(data), dtype=torch.uint8)}
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=d)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(_bytes(wrapper))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:  # make the rename itself durable
        dfd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def _torch_load(path, src):
    try:
        return torch.load(src, map_location="cpu", weights_only=True)
    except Exception as e:  # zip errors, unpickling refusals, EOF: all one story for the user
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "Unsupported global" in str(e) or "weights_only" in str(e):
            reason = "it contains Python objects that are not plain data (refused to unpickle)"
        raise CheckpointError(f"{path}: cannot read checkpoint: {reason}") from None


def read(path) -> dict:
    """Load a checkpoint file with weights_only=True; rmix files are verified and unwrapped.

    Returns the rmix payload, or for a foreign file (the paper's `{'epoch', 'state_dict', ...}`,
    a bare state dict) the loaded dict with `"foreign": True` added.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint file")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"{path}: checkpoint file is empty (0 bytes)")
    obj = _torch_load(path, path)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: not a checkpoint (holds a {type(obj).__name__}, not a dict)")
    if obj.get("format") != FORMAT:
        return {**obj, "foreign": True}
    if obj.get("version") != VERSION:
        raise CheckpointError(f"{path}: checkpoint version {obj.get('version')} is not {VERSION}")
    data = obj["payload"].numpy().tobytes()
    if hashlib.sha256(data).hexdigest() != obj["sha256"]:
        raise CheckpointError(f"{path}: checksum mismatch (the file is corrupted)")
    payload = _torch_load(path, io.BytesIO(data))
    payload["foreign"] = False
    return payload


def model_state(ckpt: dict) -> dict:
    """The model's state dict from an rmix payload or a foreign (paper / bare) checkpoint."""
    if not ckpt.get("foreign"):
        return ckpt["model"]
    state = ckpt.get("state_dict", ckpt.get("model", ckpt))
    return {k: v for k, v in state.items() if k != "foreign"}
