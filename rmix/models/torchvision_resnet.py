"""torchvision's ResNet / ResNeXt / Wide-ResNet with the RoI head, under torchvision's own key names."""
import torch
import torchvision

from rmix.models.roi import RoIClassifier

ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
         "resnext50_32x4d", "resnext101_32x8d", "resnext101_64x4d",
         "wide_resnet50_2", "wide_resnet101_2")


class TorchvisionResNet(RoIClassifier):
    """Adopts the children of `torchvision.models.<arch>(weights=None)` unchanged, so state-dict
    keys are torchvision's (`conv1`, `layer1.0.conv1`, ..., `fc`) plus `fc_roi`."""

    def __init__(self, arch: str, num_classes: int, share_fc: bool = False, **kw):
        super().__init__()
        if "weights" in kw or "pretrained" in kw:
            raise ValueError("rmix never downloads weights; load a checkpoint with load_state_dict_flexible")
        net = torchvision.models.get_model(arch, weights=None, num_classes=num_classes, **kw)
        for name, child in net.named_children():
            self.add_module(name, child)
        self._init_roi_head(share_fc)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(images))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

