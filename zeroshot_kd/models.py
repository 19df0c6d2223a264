"""Small networks for 28x28 inputs: CIFAR-style ResNets (the shipped default teacher, test fixtures) and a small
MobileNetV2 (the depthwise teacher).

The architecture follows He et al. (2016), Section 4.2 (the CIFAR-10 ResNets): a 3x3 stem, three stages of
BasicBlocks with 16/32/64 channels (scaled by ``width``), stride 2 between stages, global average pooling and
one linear layer. Shortcuts that change shape use a 1x1 convolution + BatchNorm (option B), so every
convolution is followed by BatchNorm: that is what the BN-statistics synthesis methods rely on.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

__all__ = ["BasicBlock", "CifarResNet", "cifar_resnet", "mobilenet_v2_small"]


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity (or 1x1 conv-BN) shortcut."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU(inplace=False)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU(inplace=False)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + identity)


class CifarResNet(nn.Module):
    """CIFAR-style ResNet: stem, three stages of BasicBlocks, global pooling, classifier."""

    def __init__(
        self,
        blocks: Sequence[int] = (2, 2, 2),
        width: int = 16,
        in_channels: int = 1,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        widths = [width, 2 * width, 4 * width]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=False)
        in_planes = widths[0]
        stages = []
        for i, (n, w) in enumerate(zip(blocks, widths)):
            layers = []
            for j in range(n):
                layers.append(BasicBlock(in_planes, w, stride=2 if (i > 0 and j == 0) else 1))
                in_planes = w
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def cifar_resnet(depth: int = 14, width: int = 16, in_channels: int = 1, num_classes: int = 10) -> CifarResNet:
    """Build a CIFAR ResNet of the given depth (6n+2: 8, 14, 20, ...)."""
    if (depth - 2) % 6 != 0 or depth < 8:
        raise ValueError(f"depth must be 6n+2 (8, 14, 20, ...), got {depth}")
    n = (depth - 2) // 6
    return CifarResNet((n, n, n), width, in_channels, num_classes)


# torchvision's MobileNetV2 blocks with a stage layout for 28x28 inputs: (expansion t, channels c, repeats n, stride s);
# with the stride-2 stem, 28 -> 14 -> 7 -> 4 pixels.
SMALL_MOBILENET_V2 = [[1, 16, 1, 1], [6, 24, 2, 2], [6, 32, 2, 1], [6, 64, 2, 2], [6, 96, 1, 1]]


def mobilenet_v2_small(width_mult: float = 0.5, in_channels: int = 1, num_classes: int = 10,
                       last_channel: int = 256) -> nn.Module:
    """A depthwise-separable network: torchvision's ``MobileNetV2`` (inverted residuals, ReLU6, BN after every conv)
    with a single-channel stem, the shallower stages of :data:`SMALL_MOBILENET_V2` and a ``last_channel``-wide head
    instead of 1280 (70k parameters at width 0.5: trains on a CPU in minutes).

    Used for the depthwise quantization benchmark: per-channel weights and activation ranges matter far more for
    depthwise convolutions than for dense ones.
    """
    import torchvision
    from torchvision.ops.misc import Conv2dNormActivation

    model = torchvision.models.mobilenet_v2(num_classes=num_classes, width_mult=width_mult,
                                            inverted_residual_setting=SMALL_MOBILENET_V2)
    stem_out = model.features[0].out_channels
    model.features[0] = Conv2dNormActivation(in_channels, stem_out, stride=2, norm_layer=nn.BatchNorm2d,
                                             activation_layer=nn.ReLU6)
    head_in = model.features[-1][0].in_channels
    model.features[-1] = Conv2dNormActivation(head_in, last_channel, kernel_size=1, norm_layer=nn.BatchNorm2d,
                                              activation_layer=nn.ReLU6)
    model.classifier[-1] = nn.Linear(last_channel, num_classes)
    model.last_channel = last_channel
    return model
