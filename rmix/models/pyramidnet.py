"""PyramidNet for CIFAR (Han et al. 2017), laid out as the CutMix / RecursiveMix code's
`PyramidNet(dataset, depth, alpha, num_classes, bottleneck)` so that their checkpoints load:
`conv1`, `bn1`, `layerS.B.{bn1,conv1,...}`, `bn_final`, `fc` (+ our `fc_roi`).

Widths grow by alpha / (3n) per block; shortcuts are parameter-free (2x2 average pool when
downsampling, zero-padded channels), so every parameter lives in a block, the stem or the heads.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from rmix.models.roi import RoIClassifier


def _add_shortcut(out: torch.Tensor, x: torch.Tensor, downsample: nn.Module | None) -> torch.Tensor:
    shortcut = downsample(x) if downsample is not None else x
    extra = out.shape[1] - shortcut.shape[1]
    if extra:  # new channels start from zero: pad after the existing ones
        shortcut = F.pad(shortcut, (0, 0, 0, 0, 0, extra))
    return out + shortcut


class BasicBlock(nn.Module):
    """BN - conv3x3 - BN - ReLU - conv3x3 - BN, plus the padded shortcut."""
    outchannel_ratio = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(out)))
        return _add_shortcut(self.bn3(out), x, self.downsample)


class Bottleneck(nn.Module):
    """BN - conv1x1 - BN - ReLU - conv3x3 - BN - ReLU - conv1x1 (4x) - BN, plus the padded shortcut."""
    outchannel_ratio = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn4 = nn.BatchNorm2d(planes * 4)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(out)))
        out = self.conv3(F.relu(self.bn3(out)))
        return _add_shortcut(self.bn4(out), x, self.downsample)


class PyramidNet(RoIClassifier):
    """PyramidNet-depth (alpha) for 32x32 inputs; bottleneck: depth = 9n+2, else 6n+2."""

    def __init__(self, depth: int, alpha: float, num_classes: int, bottleneck: bool = True,
                 share_fc: bool = False):
        super().__init__()
        per_block = 9 if bottleneck else 6
        if (depth - 2) % per_block:
            raise ValueError(f"PyramidNet depth must be {per_block}n+2 (bottleneck={bottleneck}), got {depth}")
        n = (depth - 2) // per_block
        block = Bottleneck if bottleneck else BasicBlock
        self.addrate = alpha / (3 * n)         # width added per block (channels, fractional)
        self.featuremap_dim = 16.0             # running, unrounded width
        self.input_featuremap_dim = 16         # channels entering the next stage
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = self._make_layer(block, n, 1)
        self.layer2 = self._make_layer(block, n, 2)
        self.layer3 = self._make_layer(block, n, 2)
        self.bn_final = nn.BatchNorm2d(self.input_featuremap_dim)
        self.relu_final = nn.ReLU(inplace=True)
        self.fc = nn.Linear(self.input_featuremap_dim, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):  # as the reference: N(0, sqrt(2 / (k*k*out_channels)))
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
        self._init_roi_head(share_fc)

    def _make_layer(self, block: type, blocks: int, stride: int) -> nn.Sequential:
        downsample = nn.AvgPool2d(2, stride=2, ceil_mode=True) if stride != 1 else None
        self.featuremap_dim += self.addrate
        layers = [block(self.input_featuremap_dim, round(self.featuremap_dim), stride, downsample)]
        for _ in range(1, blocks):
            inplanes = round(self.featuremap_dim) * block.outchannel_ratio
            self.featuremap_dim += self.addrate
            layers.append(block(inplanes, round(self.featuremap_dim), 1))
        self.input_featuremap_dim = round(self.featuremap_dim) * block.outchannel_ratio
        return nn.Sequential(*layers)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        x = self.bn1(self.conv1(images))  # no ReLU after the stem, as the reference
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.relu_final(self.bn_final(x))
