"""The model registry: names -> builders, `build`, `list_models`, cheap parameter counts."""
import difflib
from functools import partial

import torch
from torch import nn

from rmix.models.cifar_resnet import CifarResNet
from rmix.models.pyramidnet import PyramidNet
from rmix.models.roi import count_parameters
from rmix.models.timm_backbone import TimmBackbone
from rmix.models.torchvision_resnet import ARCHS, TorchvisionResNet
from rmix.pipelines.errors import one_line

_CIFAR_DEPTHS = {"resnet8": 8, "resnet14": 14, "resnet20": 20, "resnet32": 32, "resnet44": 44, "resnet56": 56, "resnet110": 110}
_PYRAMIDNETS = {  # name: (depth, alpha, bottleneck)
    "pyramidnet_110_48": (110, 48, False),
    "pyramidnet_164_270": (164, 270, True),
    "pyramidnet_200_240": (200, 240, True),
}

# name -> (family, builder(num_classes, share_fc, **kw)); family says which inputs the model is for.
_REGISTRY = {
    **{name: ("cifar", partial(CifarResNet, depth)) for name, depth in _CIFAR_DEPTHS.items()},
    **{name: ("cifar", partial(PyramidNet, d, a, bottleneck=b)) for name, (d, a, b) in _PYRAMIDNETS.items()},
    **{arch: ("imagenet", partial(TorchvisionResNet, arch)) for arch in ARCHS},
}
TIMM_PREFIX = "timm/"


def list_models() -> list[str]:
    """Sorted names of the built-in models (timm models are `timm/<name>` on top of these)."""
    return sorted(_REGISTRY)


def model_family(name: str) -> str:
    """'cifar' (32x32 inputs), 'imagenet' (224x224) or 'timm'."""
    if name.startswith(TIMM_PREFIX):
        return "timm"
    _check_name(name)
    return _REGISTRY[name][0]


def _check_name(name: str) -> None:
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, _REGISTRY, n=3)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise ValueError(f"unknown model {name!r}; {hint}valid names include resnet8, resnet56, "
                         f"pyramidnet_200_240, resnet50 (all: rmix.models.list_models()), or 'timm/<name>'")


def build(name: str, num_classes: int, *, share_fc: bool = False, image_size: int | None = None,
          **kw) -> nn.Module:
    """Build model `name` with `num_classes` outputs and the RoI head (`fc_roi`, or the shared `fc`).

    `image_size`: the input side the model will see; timm's ViT-style models are built for it
    (their position embeddings), every other model ignores it.
    `kw` goes to the architecture (e.g. torchvision's `zero_init_residual=True`, timm's options).
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    if name.startswith(TIMM_PREFIX):
        return TimmBackbone(name[len(TIMM_PREFIX):], num_classes, share_fc, image_size=image_size, **kw)
    _check_name(name)
    return _REGISTRY[name][1](num_classes=num_classes, share_fc=share_fc, **kw)


def check_input_size(name: str, num_classes: int, image_size: int, *, share_fc: bool = False):
    """ValueError (one line) when `name` cannot take `image_size`-pixel inputs (a ViT's patch larger than the crop).

    One forward of the model built on the meta device: shapes only, no memory, no weights.
    """
    with torch.device("meta"):
        try:
            model = build(name, num_classes, share_fc=share_fc, image_size=image_size).eval()
        except ValueError:
            raise  # an unknown model: its own message
        except Exception:  # noqa: BLE001 - a model that cannot be built on meta (a `.item()` in its init)
            return  # is checked by its first real step instead
        try:
            model(torch.empty(2, 3, image_size, image_size))
        except (RuntimeError, ValueError, AssertionError) as e:
            why = one_line(e, 200, typed=False, ellipsis=False)
            raise ValueError(f"--crop-size: {image_size} px is too small for model {name!r} ({why}); "
                             "give a larger --crop-size or another --model") from None


def param_count(name: str, num_classes: int, **kw) -> int:
    """count_parameters of `build(name, num_classes)`, built on the meta device (no memory, no init cost)."""
    with torch.device("meta"):
        return count_parameters(build(name, num_classes, **kw))
