"""Optional timm backbones (`build("timm/<name>", ...)`), for CNNs whose features are (N, C, h, w)."""
import torch
from torch import nn

from rmix.models.roi import RoIClassifier


class TimmBackbone(RoIClassifier):
    """A timm model under `body`; RoI features come from `forward_features`, the classifier from
    `get_classifier()`. Logits use timm's own `forward_head` (its pooling and head norm, if any)."""

    def __init__(self, name: str, num_classes: int, share_fc: bool = False, **kw):
        super().__init__()
        try:
            import timm
        except ImportError as e:
            raise ImportError(f"model 'timm/{name}' needs timm, which is not installed: "
                              "pip install rmix[timm]") from e
        if "pretrained" in kw:
            raise ValueError("rmix never downloads weights; load a checkpoint with load_state_dict_flexible")
        self.body = timm.create_model(name, pretrained=False, num_classes=num_classes, **kw)
        if not isinstance(self.body.get_classifier(), nn.Linear):
            raise ValueError(f"timm/{name}: the RoI head needs a Linear classifier, "
                             f"got {type(self.body.get_classifier()).__name__}")
        self._init_roi_head(share_fc)

    def classifier(self) -> nn.Module:
        return self.body.get_classifier()

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        feat = self.body.forward_features(images)
        if feat.dim() != 4:
            raise ValueError(f"timm model's forward_features gave shape {tuple(feat.shape)}; "
                             "the RoI head needs a (N, C, h, w) feature map (CNN backbones)")
        return feat

    def forward_head(self, feat: torch.Tensor) -> torch.Tensor:
        return self.body.forward_head(feat)
