"""Strict, explained loading of rmix, paper (`{'epoch', 'state_dict', 'optimizer'}`) and DDP checkpoints."""
from collections.abc import Mapping

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


def load_state_dict_flexible(model: nn.Module, state: Mapping) -> None:
    """Load `state` into `model` strictly; on mismatch raise a one-line ValueError naming the first bad key.

    Args:
        state: a state dict, or a checkpoint holding one under `state_dict` (the paper's layout)
            or `model`; `module.` (DDP) and `_orig_mod.` (torch.compile) prefixes are stripped.
    """
    if not isinstance(state, Mapping):
        raise ValueError(f"expected a state dict or a checkpoint dict, got {type(state).__name__}")
    for key in ("state_dict", "model"):
        if isinstance(state.get(key), Mapping):
            state = state[key]
            break
    state = {_strip(k): v for k, v in state.items()}
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
