"""Export a checkpoint's weights for other code: torchvision key names, no RoI head, plain tensors.

The file is either a `torch.save` of a flat `{name: tensor}` dict (loads with `weights_only=True`)
or a safetensors file. Keys are the model's own module names; for rmix's torchvision ResNets these
are torchvision's (`conv1.weight`, `layer1.0.bn1.running_mean`, ..., `fc.weight`), which is what
torchvision, mmdetection and mmsegmentation ResNet backbones load. See docs/EXPORT.md.
"""
import os
import tempfile
import warnings
from pathlib import Path

import torch

from rmix import checkpoint
from rmix.config import EXPORT_FORMATS
from rmix.models.loading import _is_roi, _strip


def _meta_model(name, num_classes, share_fc, image_size=None):
    """Build `name` on the meta device: the key names and shapes without allocating the weights."""
    from rmix.models import build
    with torch.device("meta"):
        return build(name, num_classes, share_fc=share_fc, image_size=image_size)


def _num_classes(name, state, share_fc, image_size=None):
    """num_classes read from the checkpoint's classifier weight (rows of `<classifier>.weight`)."""
    key = _meta_model(name, 1, share_fc, image_size).head_names()[0] + ".weight"  # the classifier's
    if key not in state:
        raise ValueError(f"checkpoint has no classifier weight {key!r} for model {name!r}")
    return int(state[key].shape[0])


def export_state(path, *, model=None, drop_classifier=False, ema=False) -> tuple[dict, dict]:
    """The exportable `{name: tensor}` of a checkpoint, and facts about it.

    Args:
        path: an rmix checkpoint, or a foreign one (the paper's `{'state_dict': ...}`, a bare state
            dict, DDP `module.` prefixes) when `model` names its architecture.
        model: the model name; required for foreign checkpoints, otherwise it must match the config.
        drop_classifier: leave out the classifier (`fc.*`), for backbones of detection/segmentation.
        ema: export the checkpoint's EMA weights (`ema`, or timm's `state_dict_ema`) instead.

    Returns (state, info): the state's tensors are contiguous CPU copies; info holds
    model, num_classes, dropped key counts.
    """
    from rmix.models import load_state_dict_flexible
    ckpt = checkpoint.read(path)
    if ckpt["foreign"]:
        if model is None:
            raise ValueError(f"--model: {path} has no rmix config, so name its model (see `rmix models`)")
        name = model
    else:
        name = ckpt["config"]["model"]
        if model is not None and model != name:
            raise ValueError(f"--model: {path} holds a {name!r}, not {model!r}")
    if ema:
        state = checkpoint.ema_state(ckpt, path)
    else:
        state = checkpoint.model_state(ckpt)
    state = {_strip(k): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    share_fc = not any(map(_is_roi, state))
    size = None if ckpt["foreign"] else ckpt["config"]["data"]["crop_size"]  # ViT-style timm models: their grid
    meta = _meta_model(name, _num_classes(name, state, share_fc, size), share_fc, size)
    # Old checkpoints lack BatchNorm's num_batches_tracked; a strict torchvision load wants it.
    for k, v in meta.state_dict().items():
        if k.endswith(".num_batches_tracked") and k not in state:
            state[k] = torch.zeros((), dtype=v.dtype)
    with warnings.catch_warnings():  # copying into meta tensors is a no-op: we only want the checks
        warnings.simplefilter("ignore")
        load_state_dict_flexible(meta, state)  # one-line ValueError naming the first bad key
    head = meta.head_names()[0] + "."  # the classifier (`fc`, timm's `body.head.fc`, ...)
    roi = [k for k in state if _is_roi(k)]
    fc = [k for k in state if k.startswith(head)]
    drop = set(roi) | (set(fc) if drop_classifier else set())
    strip = meta.library_prefix  # timm models: timm's own key names
    out = {k[len(strip):] if strip and k.startswith(strip) else k: v.detach().to("cpu").contiguous().clone()
           for k, v in state.items() if k not in drop}
    info = {"model": name, "num_classes": int(state[head + "weight"].shape[0]), "tensors": len(out),
            "dropped_roi": len(roi), "dropped_classifier": len(fc) if drop_classifier else 0,
            "ema": bool(ema)}
    return out, info


def infer_format(out) -> str:
    """'safetensors' for a `.safetensors` file name, else 'torchvision'."""
    return "safetensors" if str(out).endswith(".safetensors") else "torchvision"


def write_state(state: dict, out, fmt: str, metadata: dict | None = None) -> Path:
    """Write `state` to `out` atomically (temporary file in the same folder, then rename)."""
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"--format: expected one of {EXPORT_FORMATS}, got {fmt!r}")
    if fmt == "safetensors":
        try:
            from safetensors.torch import save_file
        except ImportError:
            raise ValueError("rmix export --format safetensors needs safetensors: pip install 'rmix[export]'") from None
    out = Path(out).expanduser()
    if out.is_dir():
        raise ValueError(f"--out: {out} is a directory; give a file name")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.tmp-", dir=out.parent)
    os.close(fd)
    try:
        if fmt == "safetensors":
            save_file(state, tmp, metadata={k: str(v) for k, v in (metadata or {}).items()})
        else:
            torch.save(state, tmp)
        os.replace(tmp, out)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return out


def export(path, out, fmt=None, *, model=None, drop_classifier=False, ema=False) -> dict:
    """Read checkpoint `path`, write its weights to `out` as `fmt` (default: from the suffix); returns info."""
    fmt = fmt or infer_format(out)
    if fmt not in EXPORT_FORMATS:  # before the (slow) read
        raise ValueError(f"--format: expected one of {EXPORT_FORMATS}, got {fmt!r}")
    state, info = export_state(path, model=model, drop_classifier=drop_classifier, ema=ema)
    meta = {"format": "pt", "source": "rmix", "model": info["model"], "num_classes": info["num_classes"],
            "classifier": "dropped" if drop_classifier else "kept"}
    info["out"] = str(write_state(state, out, fmt, meta))
    info["format"] = fmt
    return info
