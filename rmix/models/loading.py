"""Strict, explained loading of rmix, paper (`{'epoch', 'state_dict', 'optimizer'}`) and DDP checkpoints;
and of pretrained weights for fine-tuning, where the classifier may have another class count."""
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP / DataParallel, torch.compile


def _unwrap_model(model: nn.Module) -> nn.Module:
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def _strip(key: str) -> str:
    while key.startswith(_WRAPPER_PREFIXES):
        key = key.split(".", 1)[1]
    return key


def _is_roi(key: str) -> bool:
    return "fc_roi" in key.split(".")


def _plain_state(state) -> dict:
    """The state dict of `state` (itself, or a checkpoint's `state_dict` or `model`), wrapper prefixes stripped."""
    if not isinstance(state, Mapping):
        raise ValueError(f"expected a state dict or a checkpoint dict, got {type(state).__name__}")
    for key in ("state_dict", "model"):
        if isinstance(state.get(key), Mapping):
            state = state[key]
            break
    return {_strip(k): v for k, v in state.items()}


def load_state_dict_flexible(model: nn.Module, state: Mapping) -> None:
    """Load `state` into `model` strictly; on mismatch raise a one-line ValueError naming the first bad key.

    Args:
        state: a state dict, or a checkpoint holding one under `state_dict` (the paper's layout)
            or `model`; `module.` (DDP) and `_orig_mod.` (torch.compile) prefixes are stripped.
    """
    state = _plain_state(state)
    target = _unwrap_model(model)
    expected = target.state_dict()
    share_fc = getattr(target, "share_fc", None)

    # BatchNorm fills a missing num_batches_tracked itself (checkpoints from before PyTorch 0.4.1).
    missing = [k for k in expected if k not in state and not k.endswith(".num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    if share_fc is False and any(map(_is_roi, missing)) and not any(map(_is_roi, state)):
        raise ValueError(f"checkpoint has no fc_roi (trained with share_fc=True, or without a RoI head) "
                         f"but the model has one: build it with share_fc=True (missing key {missing[0]!r})")
    if share_fc is True and any(map(_is_roi, unexpected)):
        raise ValueError(f"checkpoint has a separate RoI classifier fc_roi but the model was built with "
                         f"share_fc=True: build it with share_fc=False (unexpected key "
                         f"{next(filter(_is_roi, unexpected))!r})")
    if missing:
        raise ValueError(f"checkpoint does not match the model: missing key {missing[0]!r} "
                         f"({len(missing)} missing, {len(unexpected)} unexpected)")
    if unexpected:
        raise ValueError(f"checkpoint does not match the model: unexpected key {unexpected[0]!r} "
                         f"({len(unexpected)} unexpected)")
    for key, value in expected.items():
        got = state.get(key)
        if isinstance(got, torch.Tensor) and got.shape != value.shape:
            raise ValueError(f"checkpoint does not match the model: {key!r} has shape "
                             f"{tuple(got.shape)} in the checkpoint but {tuple(value.shape)} in the model")
    try:
        target.load_state_dict(state, strict=True)
    except RuntimeError as e:  # anything the checks above did not foresee, still one line
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        raise ValueError(f"checkpoint does not match the model: {' '.join(lines[:2])}") from None


@dataclass(frozen=True)
class Pretrained:
    """What `load_pretrained` did, key by key."""
    loaded: tuple[str, ...]  # the model's keys filled from the state
    fresh: tuple[str, ...]   # the model's keys left as built: its classifier and RoI head, where the state cannot fill them
    unused: tuple[str, ...]  # the state's keys that the model has no place for: an fc_roi where it shares fc
    why: str = ""            # why `fresh` is fresh, for a message ("10 classes in the source, 4 in the model")


def load_pretrained(model: nn.Module, state: Mapping, other_classes: str = "") -> Pretrained:
    """Load pretrained weights into `model` (an rmix RoIClassifier) to fine-tune it.

    `state` is what load_state_dict_flexible takes, or a state dict in the model's library's own key
    names (timm's, without rmix's `body.`). The model's head (`head_names()`: the classifier, then
    `fc_roi`) keeps the weights it was built with where the state cannot fill it: a classifier of
    another shape (another class count) or none in the state, and then the RoI head too (it maps the
    same features to the same classes); a RoI head the state lacks. Every other tensor must match:
    load_state_dict_flexible's one-line ValueError names the first that does not, and nothing loads.
    `other_classes`: the caller knows the state's classes are not the model's, and says how; the head
    then starts fresh whatever its shape.
    """
    target = _unwrap_model(model)
    state = _plain_state(state)
    prefix = target.library_prefix
    if prefix and not any(k.startswith(prefix) for k in state):
        state = {prefix + k: v for k, v in state.items()}
    own = target.state_dict()
    classifier, *roi = target.head_names()

    def keys_of(name, keys):
        return [k for k in keys if k.startswith(name + ".")]
    mine, theirs = keys_of(classifier, own), keys_of(classifier, state)
    differ = [k for k in mine if k in state and getattr(state[k], "shape", None) != own[k].shape]
    why = other_classes
    if not why and differ:
        weight, rows = state.get(f"{classifier}.weight"), own[f"{classifier}.weight"].shape[0]
        why = (f"{weight.shape[0]} classes in the source, {rows} in the model"
               if isinstance(weight, torch.Tensor) and weight.dim() == 2 else f"{differ[0]!r} has another shape")
    elif not why and not theirs:
        why = "no classifier in the source"
    fresh = set(mine) if why else set()
    dropped = set(theirs) if why else set()
    for name in roi:  # fc_roi maps the same features to the same classes: fresh with the classifier, or where absent
        keys = keys_of(name, own)
        if why or not any(k in state for k in keys):
            why = why or f"no {name} in the source"
            fresh.update(keys)
            dropped.update(keys_of(name, state))
    dropped.update(k for k in state if _is_roi(k) and k not in own)  # a RoI head this model has none of (--share-fc)
    kept = {k: v for k, v in state.items() if k not in dropped}
    load_state_dict_flexible(target, {**kept, **{k: own[k] for k in fresh}})
    return Pretrained(loaded=tuple(kept), fresh=tuple(k for k in own if k in fresh),
                      unused=tuple(k for k in state if k in dropped and k not in own), why=why)
