"""timm backbones (`build("timm/<name>", ...)`): any timm classifier, with the RoI head on its last
feature map.

The feature map is what timm's `forward_features` returns: (N, C, h, w) for CNNs, (N, h, w, C) for
models whose `output_fmt` is NHWC (Swin, ...), and for ViT-style models (N, T, C) tokens, whose
`num_prefix_tokens` (class and register tokens) are dropped and whose patch tokens are laid back on
their (H / patch, W / patch) grid. The logits are timm's own `forward_head` of those features (its
pooling, class token and head norm). The RoI boxes are mapped with the model's own stride (the
last entry of timm's `feature_info`, or the patch size), not one read off the map's size.

ViT-style models are built for the training crop (`image_size` -> timm's `img_size`), since their
position embeddings have one size per input size.
"""
import torch
from torch import nn

from rmix.models.roi import RoIClassifier, roi_pool


def _timm():
    try:
        import timm
    except ImportError as error:
        from rmix.pipelines import MissingPackage
        if getattr(error, "name", None) == "timm" or "import of timm halted" in str(error):
            raise MissingPackage("--model timm/...: timm models need timm, which is not installed: "
                                 "pip install 'rmix[timm]'") from None
        raise MissingPackage(f"--model timm/...: timm is installed but does not import ({error}); "
                             "reinstall it: pip install -U 'rmix[timm]'") from None
    return timm


class TimmBackbone(RoIClassifier):
    """A timm model under `body` (so `rmix export` strips `body.` to give timm's own key names)."""

    library_prefix = "body."

    def __init__(self, name: str, num_classes: int, share_fc: bool = False, image_size: int | None = None, **kw):
        super().__init__()
        timm = _timm()
        if "pretrained" in kw:
            raise ValueError("rmix never downloads weights; load a checkpoint with load_state_dict_flexible")
        if name not in timm.list_models():
            raise ValueError(f"unknown timm model {name!r} (timm {timm.__version__}; see timm.list_models())")
        self.body = None
        if image_size is not None:
            try:  # ViT-style: position embeddings for this input size
                self.body = timm.create_model(name, pretrained=False, num_classes=num_classes,
                                              img_size=image_size, **kw)
            except TypeError:  # CNNs take any size and no img_size
                self.body = None
        if self.body is None:
            self.body = timm.create_model(name, pretrained=False, num_classes=num_classes, **kw)
        if not isinstance(self.body.get_classifier(), nn.Linear):
            raise ValueError(f"timm/{name}: the RoI head needs a Linear classifier, "
                             f"got {type(self.body.get_classifier()).__name__}")
        self.tokens = hasattr(self.body, "num_prefix_tokens") and hasattr(self.body, "patch_embed")
        self.stride = self._stride()
        self._init_roi_head(share_fc)

    def _stride(self) -> int:
        info = getattr(self.body, "feature_info", None)
        if info:
            return int(info[-1]["reduction"])
        patch = getattr(getattr(self.body, "patch_embed", None), "patch_size", None)
        if patch is not None:
            return int(patch[-1] if isinstance(patch, (tuple, list)) else patch)
        raise ValueError("timm model with neither feature_info nor a patch size: its feature stride is unknown")

    def classifier(self) -> nn.Module:
        return self.body.get_classifier()

    def feature_map(self, feat: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """timm's features -> (N, C, h, w), the map the RoI head pools."""
        if self.tokens and feat.dim() == 3:
            h, w = images.shape[-2] // self.stride, images.shape[-1] // self.stride
            grid = feat[:, self.body.num_prefix_tokens:]
            if grid.shape[1] != h * w:
                raise ValueError(f"{grid.shape[1]} patch tokens do not lie on the {h}x{w} grid of a "
                                 f"{images.shape[-2]}x{images.shape[-1]} input")
            return grid.transpose(1, 2).reshape(feat.shape[0], feat.shape[2], h, w)
        if feat.dim() == 4 and getattr(self.body, "output_fmt", "NCHW") == "NHWC":
            return feat.permute(0, 3, 1, 2)
        if feat.dim() != 4:
            raise ValueError(f"timm model's forward_features gave shape {tuple(feat.shape)}, not a feature map")
        return feat

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.feature_map(self.body.forward_features(images), images)

    def forward(self, images: torch.Tensor, boxes: torch.Tensor | None = None):
        if images.dim() != 4:
            raise ValueError(f"Expected a batched input with 4 dims (N, C, H, W), but got {tuple(images.shape)}")
        feat = self.body.forward_features(images)
        logits = self.body.forward_head(feat)  # timm's own pooling / class token
        if boxes is None:
            return logits
        pooled = roi_pool(self.feature_map(feat, images), boxes, images.shape[-1], spatial_scale=1 / self.stride)
        return logits, self.roi_classifier()(pooled)
