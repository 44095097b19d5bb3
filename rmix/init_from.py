"""The weights a new run starts from (`--init-from`): read from a file, its digest taken, loaded into the model.

The file is an rmix checkpoint (its model's weights; its EMA stays unused), the paper's released
checkpoints (`{'epoch', 'state_dict', 'optimizer'}`), or a state dict as torchvision and timm save
them (`.pth`, `.pt`, or `.safetensors`). rmix.models.load_pretrained loads it: the classifier and the
RoI head start fresh where the file's are of another class count, every other tensor must match.
"""
import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from rmix import checkpoint
from rmix.models import load_pretrained
from rmix.pipelines.errors import one_line


@dataclass(frozen=True)
class Source:
    """Weights read from a file."""
    path: str
    sha256: str   # of the file's bytes: which file this was, recorded in the run's config.json
    kind: str     # "rmix checkpoint" | "checkpoint" (a foreign dict holding a state_dict) | "state dict" | "safetensors"
                  # (rmix.pretrained: the library's weights' name)
    state: dict   # key -> tensor, as the file names them
    option: str = "--init-from"  # the option that named them, for messages
    classes: tuple = ()           # the class names the weights were trained on, where the file says (an rmix checkpoint)


def read(path: str, option: str = "--init-from") -> Source:
    """The weights in `path`; ValueError (one line naming the file) where it holds none."""
    if os.path.isdir(path):
        raise ValueError(f"{option}: {path} is a directory, not a weights file (its latest.pt?)")
    if not os.path.isfile(path):
        raise ValueError(f"{option}: {path}: no such file")
    classes = ()
    if path.endswith(".safetensors"):
        state, kind = _safetensors(path, option), "safetensors"
    else:
        try:
            ckpt = checkpoint.read(path)
        except checkpoint.CheckpointError as e:  # a text file, a pickle of objects, a truncated file: named there
            raise ValueError(f"{option}: {e}") from None
        inner = ckpt.get("state_dict", ckpt.get("model", ckpt))
        kind = "rmix checkpoint" if not ckpt["foreign"] else "checkpoint" if inner is not ckpt else "state dict"
        state = checkpoint.model_state(ckpt) if isinstance(inner, Mapping) else {}
        if not ckpt["foreign"]:
            classes = tuple((ckpt.get("data") or {}).get("classes") or ())
    if not any(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{option}: {path} holds no weights (no tensors in it: not a state dict or checkpoint)")
    return Source(path, sha256(path), kind, dict(state), option, classes)


def _safetensors(path: str, option: str) -> dict:
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise ValueError(f"{option}: {path}: reading .safetensors needs safetensors: pip install "
                         "'rmix[export]'") from None
    try:
        return load_file(path, device="cpu")
    except Exception as e:  # noqa: BLE001 - safetensors' errors for a file that is not one: its own types
        raise ValueError(f"{option}: {path}: not a safetensors file "
                         f"({one_line(e, 160, typed=False, ellipsis=False)})") from None


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load(model: torch.nn.Module, source: Source, name: str, classes=()) -> str:
    """Load `source` into `model` (built as `--model name`, for the data's `classes`); returns the start
    line saying what was loaded.

    The classifier and RoI head start fresh where the source's classes are known and are not the run's
    (10 shapes into Fashion-MNIST's 10 garments: the same shape, another meaning), as where their count
    differs. ValueError, one line, where the file does not fit the model (the first key that does not)."""
    other = ""
    if source.classes and len(source.classes) == len(classes) and list(source.classes) != list(classes):
        i = next(i for i, (a, b) in enumerate(zip(source.classes, classes)) if a != b)
        other = f"the source's classes are not the run's: class {i} is {source.classes[i]!r} there, {classes[i]!r} here"
    try:
        done = load_pretrained(model, source.state, other_classes=other)
    except ValueError as e:
        raise ValueError(f"{source.option}: {source.path} does not fit --model {name}: {e}") from None
    digest = f", sha256 {source.sha256[:12]}" if source.sha256 else ""
    line = (f"{source.option} {source.path} ({source.kind}{digest}): "
            f"{len(done.loaded)} tensors loaded, ")
    line += f"{len(done.fresh)} started fresh ({done.why}: {', '.join(done.fresh)})" if done.fresh else \
        "none started fresh"
    if done.unused:
        line += f"; not used: {', '.join(done.unused)}"
    return line
