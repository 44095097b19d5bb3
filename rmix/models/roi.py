"""The RoI head shared by every model: logits from the pooled feature map, roi_logits from a box."""
import torch
from torch import nn
from torchvision.ops import roi_align


class RoIClassifier(nn.Module):
    """Base class: a backbone with a classifier `fc` and a RoI classifier `fc_roi` (or the shared `fc`).

    Subclasses define `forward_features(images) -> (N, C, h, w)` (the last feature map, before
    global pooling), a classifier reachable through `classifier()` (`self.fc` by default), and call
    `self._init_roi_head(share_fc)` once the classifier exists.
    """

    # The model's keys are its library's own (torchvision's, timm's) with this in front: what a state dict
    # saved by that library needs to load here (`rmix export` strips it).
    library_prefix = ""

    def _init_roi_head(self, share_fc: bool) -> None:
        self.share_fc = bool(share_fc)
        if not self.share_fc:
            fc = self.classifier()
            self.fc_roi = nn.Linear(fc.in_features, fc.out_features,
                                    device=fc.weight.device, dtype=fc.weight.dtype)

    def classifier(self) -> nn.Module:
        """The image-level classifier: a Linear from pooled features to logits."""
        return self.fc

    def roi_classifier(self) -> nn.Module:
        """The classifier applied to RoI features: `fc_roi`, or `fc` when `share_fc`."""
        return self.classifier() if self.share_fc else self.fc_roi

    def head_names(self) -> tuple[str, ...]:
        """Dotted module names of the classifier, then `fc_roi` where it has its own: the modules whose
        shapes follow the class count (a checkpoint of another class count cannot fill them)."""
        heads = (self.classifier(),) if self.share_fc else (self.classifier(), self.fc_roi)
        names = {id(module): name for name, module in self.named_modules()}
        return tuple(names[id(head)] for head in heads)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward_head(self, feat: torch.Tensor) -> torch.Tensor:
        """feat: (N, C, h, w) -> logits (N, num_classes), global average pool + classifier."""
        return self.classifier()(feat.mean((2, 3)))

    def forward_roi(self, feat: torch.Tensor, boxes: torch.Tensor, image_width: int) -> torch.Tensor:
        """roi_logits (N, num_classes) from the 1x1 roi_align of box i on feature map i."""
        return self.roi_classifier()(roi_pool(feat, boxes, image_width))

    def forward(self, images: torch.Tensor, boxes: torch.Tensor | None = None):
        """images: (N, 3, H, W) -> logits (N, K); with boxes (N, 4) -> (logits, roi_logits)."""
        if images.dim() != 4:
            raise ValueError(f"Expected a batched input with 4 dims (N, C, H, W), but got {tuple(images.shape)}")
        feat = self.forward_features(images)
        logits = self.forward_head(feat)
        if boxes is None:
            return logits
        return logits, self.forward_roi(feat, boxes, images.shape[-1])


def roi_pool(feat: torch.Tensor, boxes: torch.Tensor, image_width: int,
             spatial_scale: float | None = None) -> torch.Tensor:
    """RoIAlign to 1x1 of box i (x1, y1, x2, y2 in input pixels) on feat[i]; returns (N, C).

    Args:
        feat: (N, C, h, w) feature map of an image batch of width `image_width` pixels.
        boxes: (N, 4), int or float, one box per image.
        spatial_scale: feature pixels per input pixel, 1 / the model's stride; default
            w / image_width (the same where the stride divides the input).
    """
    n = feat.shape[0]
    if boxes.dim() != 2 or boxes.shape != (n, 4):
        raise ValueError(f"Expected boxes of shape ({n}, 4) as (x1, y1, x2, y2), but got {tuple(boxes.shape)}")
    # torchvision's CPU kernel has no bf16, and bf16 rois round pixel coordinates above 256; its
    # autocast wrapper runs in float32 anyway, so do the same here for half/bf16 feature maps.
    dtype = feat.dtype if feat.dtype in (torch.float32, torch.float64) else torch.float32
    index = torch.arange(n, device=feat.device, dtype=dtype).unsqueeze(1)
    rois = torch.cat([index, boxes.to(device=feat.device, dtype=dtype)], dim=1)
    pooled = roi_align(feat.to(dtype), rois, output_size=1,
                       spatial_scale=feat.shape[-1] / image_width if spatial_scale is None else spatial_scale,
                       sampling_ratio=-1, aligned=True)
    return pooled.flatten(1).to(feat.dtype)


def count_parameters(model: nn.Module) -> int:
    """Number of parameters, classifier included, RoI head (`fc_roi`) excluded."""
    return sum(p.numel() for name, p in model.named_parameters() if "fc_roi" not in name.split("."))
