"""`--pretrained`: a model library's own pretrained weights, through its own cache and download.

torchvision models take their weights enum's DEFAULT (`ResNet50_Weights.IMAGENET1K_V2`), from
torchvision's cache (`$TORCH_HOME/hub/checkpoints/`, filled by its download); timm models take their
default pretrained tag, built by timm itself (`create_model(pretrained=True)`: its Hugging Face or
URL download and cache, its filters, e.g. a ViT's position embeddings resampled to the crop). With
`--pretrained-file`, the same weights come from a local file instead: timm reads it as
`pretrained_cfg_overlay=dict(file=...)`, torchvision's as the state dict it is. Either way the weights
become an rmix.init_from.Source, so `init_from.load` fits them to the model as `--init-from` does:
the classifier and RoI head fresh where the class count differs, every other tensor matching.
"""
import os
from pathlib import Path
from urllib.parse import urlparse

import torch

from rmix import init_from
from rmix.models import model_family
from rmix.models.zoo import TIMM_PREFIX
from rmix.pipelines.errors import one_line


def read(model: str, file: str = "", image_size: int | None = None) -> init_from.Source:
    """The pretrained weights of `--model model`; ValueError (one line) where there are none, or where
    they are neither in the cache nor downloadable (naming where they were looked for)."""
    if model.startswith(TIMM_PREFIX):
        return _timm(model[len(TIMM_PREFIX):], file, image_size)
    if model_family(model) == "imagenet":
        return _torchvision(model, file)
    raise ValueError(f"--pretrained: --model {model} is one of rmix's CIFAR-sized models, which no library "
                     "publishes weights for; start from a checkpoint with --init-from")


def _torchvision(arch: str, file: str) -> init_from.Source:
    import torchvision
    weights = torchvision.models.get_model_weights(arch).DEFAULT
    name = f"torchvision {type(weights).__name__}.{weights.name}"
    if file:
        return _named(init_from.read(file, "--pretrained-file"), name)
    path = _hub_file(weights.url)
    if not path.is_file():  # torchvision's own download, into its own cache (its file name's hash checked)
        try:
            torch.hub.load_state_dict_from_url(weights.url, progress=True, check_hash=True, weights_only=True)
        except Exception as e:  # noqa: BLE001 - offline (URLError), a proxy, a bad hash: each its own type
            raise ValueError(f"--pretrained: {name} is not in torchvision's cache, {path}, and could not be "
                             f"downloaded from {weights.url} ({one_line(e, 160, typed=False, ellipsis=False)}); "
                             "put the file there (TORCH_HOME moves the cache) or give --pretrained-file") from None
    return _named(init_from.read(str(path), "--pretrained"), name)


def _timm(name: str, file: str, image_size) -> init_from.Source:
    from rmix.models.timm_backbone import _timm as timm_module
    timm = timm_module()
    cfg = timm.models.get_pretrained_cfg(name) if name in timm.list_models() else None
    if cfg is None or not (file or cfg.hf_hub_id or cfg.url or cfg.file):
        raise ValueError(f"--pretrained: timm {timm.__version__} has no pretrained weights for {name!r} "
                         "(timm.list_models(pretrained=True) lists the ones it has); use --init-from FILE")
    tag = f"timm {name}" + (f".{cfg.tag}" if cfg.tag and "." not in name else "")
    if file:
        source = init_from.read(file, "--pretrained-file")  # the file's own checks: a file, holding weights
        overlay = {"pretrained_cfg_overlay": {"file": os.path.abspath(file)}}
        where = source.path
    else:
        source, overlay, where = None, {}, _timm_cache(cfg)
    try:
        donor = _create(timm, name, image_size, pretrained=True, **overlay)
    except Exception as e:  # noqa: BLE001 - huggingface_hub's and urllib's errors for a missing or unreachable file
        if file:
            raise ValueError(f"--pretrained-file: {file} does not load as timm's {name} "
                             f"({one_line(e, 200, typed=False, ellipsis=False)})") from None
        raise ValueError(f"--pretrained: {tag}'s weights are not in {where} and could not be downloaded "
                         f"({one_line(e, 160, typed=False, ellipsis=False)}); give --pretrained-file FILE, or "
                         "fill the cache where there is a network") from None
    path, digest = (source.path, source.sha256) if source else _cached_file(cfg)
    return init_from.Source(path or where, digest, tag, donor.state_dict(), "--pretrained-file" if file else "--pretrained")


def _create(timm, name, image_size, **kw):
    """timm.create_model as rmix's TimmBackbone calls it: a ViT-style model for the crop (`img_size`)."""
    if image_size is not None:
        try:
            return timm.create_model(name, img_size=image_size, **kw)
        except TypeError:  # CNNs take any size and no img_size
            pass
    return timm.create_model(name, **kw)


def _timm_cache(cfg) -> str:
    """Where timm looks for `cfg`'s weights first: the Hugging Face cache, else torch's hub cache."""
    if cfg.hf_hub_id:
        from huggingface_hub.constants import HF_HUB_CACHE
        return f"the Hugging Face cache {HF_HUB_CACHE} (repo {cfg.hf_hub_id})"
    return f"torch's hub cache {_hub_file(cfg.url)}"


def _cached_file(cfg) -> tuple[str, str]:
    """(path, sha256) of the file timm read from its cache, where it can be found; else ("", "")."""
    candidates = []
    if cfg.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache
        repo, _, revision = cfg.hf_hub_id.partition("@")
        for filename in ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"):
            found = try_to_load_from_cache(repo, filename, revision=revision or None)
            if isinstance(found, str):
                candidates.append(found)
    if cfg.url:
        candidates.append(str(_hub_file(cfg.url)))
    for path in candidates:
        if os.path.isfile(path):
            return path, init_from.sha256(path)
    return "", ""


def _hub_file(url: str) -> Path:
    """Where torch.hub's load_state_dict_from_url keeps `url`'s file."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)


def _named(source: init_from.Source, name: str) -> init_from.Source:
    return init_from.Source(source.path, source.sha256, name, source.state, source.option)
