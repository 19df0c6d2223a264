"""Small networks for 28x28 inputs: CIFAR-style ResNets (the shipped default teacher, test fixtures) and a small
MobileNetV2 (the depthwise teacher).

The architecture follows He et al. (2016), Section 4.2 (the CIFAR-10 ResNets): a 3x3 stem, three stages of
BasicBlocks with 16/32/64 channels (scaled by ``width``), stride 2 between stages, global average pooling and
one linear layer. Shortcuts that change shape use a 1x1 convolution + BatchNorm (option B), so every
convolution is followed by BatchNorm: that is what the BN-statistics synthesis methods rely on.
"""

from __future__ import annotations

import functools
import re
from typing import Any, Sequence

import torch
from torch import nn

__all__ = ["BasicBlock", "CifarResNet", "NoSkipBasicBlock", "cifar_resnet", "mobilenet_v2_small", "noskip",
           "noskip_card", "remove_shortcuts"]


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


# ------------------------------------------------------------------------------------------------------------------
# No-skip students (Jha et al., "On the Demystification of Knowledge Distillation: A Residual Network Perspective")


class NoSkipBasicBlock(BasicBlock):
    """A :class:`BasicBlock` that computes only its residual branch: ``relu(bn2(conv2(relu(bn1(conv1(x))))))``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu2(self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x))))))


@functools.lru_cache(maxsize=1)
def _torchvision_noskip_classes() -> dict[type, type]:
    """Residual-branch-only subclasses of torchvision's ``BasicBlock`` and ``Bottleneck`` (built on first use, so
    importing this module does not import torchvision)."""
    from torchvision.models import resnet as tv

    class NoSkipTVBasicBlock(tv.BasicBlock):
        """torchvision ``BasicBlock`` without its shortcut: ``relu(bn2(conv2(relu(bn1(conv1(x))))))``."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.relu(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))))

    class NoSkipTVBottleneck(tv.Bottleneck):
        """torchvision ``Bottleneck`` without its shortcut: the three conv-BN layers, ReLU after each."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.relu(self.bn2(self.conv2(out)))
            return self.relu(self.bn3(self.conv3(out)))

    return {tv.BasicBlock: NoSkipTVBasicBlock, tv.Bottleneck: NoSkipTVBottleneck}


def remove_shortcuts(model: nn.Module) -> nn.Module:
    """Remove every identity and projection shortcut of a ResNet, in place: each block computes only its residual
    branch (the final ReLU kept), and the 1x1 projection ``downsample`` modules are deleted with their parameters.

    Handles zkd's :class:`BasicBlock` (``cifar-resnet``) and torchvision's ``BasicBlock`` / ``Bottleneck``. The
    blocks' classes are swapped for residual-only subclasses, so the state_dict keeps its key names (minus the
    ``downsample`` entries) and a no-skip checkpoint loads into ``noskip(ARCH)``. The paper does not say whether
    projection shortcuts were kept; here they go too, since a projection is a skip path as well.

    Returns:
        ``model`` itself. Raises ``ValueError`` when it has no residual block to rewrite.
    """
    swaps: dict[type, type] = {BasicBlock: NoSkipBasicBlock}
    try:
        swaps.update(_torchvision_noskip_classes())
    except ImportError:  # pragma: no cover - torchvision is a dependency
        pass
    done = set(swaps.values())
    count = 0
    for m in model.modules():
        if type(m) in done:
            count += 1
        elif type(m) in swaps:
            m.__class__ = swaps[type(m)]
            m.downsample = None
            count += 1
    if not count:
        raise ValueError(f"{type(model).__name__} has no ResNet BasicBlock/Bottleneck to remove shortcuts from")
    return model


_CIFAR_SPEC = re.compile(r"cifar-resnet:(\d+)(?:x(\d+))?$")


def noskip(arch: str, num_classes: int = 10, in_channels: int | None = None) -> nn.Module:
    """Build ``arch`` with every shortcut removed (:func:`remove_shortcuts`), randomly initialized.

    Args:
        arch: ``cifar-resnet:DEPTH[xWIDTH]`` or a torchvision ResNet name (``resnet18``, ``resnet50``,
            ``wide_resnet50_2``, ``resnext50_32x4d``, ...).
        num_classes: classifier outputs.
        in_channels: input channels of a ``cifar-resnet`` (default 1); torchvision ResNets take 3.
    """
    m = _CIFAR_SPEC.fullmatch(arch)
    if m:
        model: nn.Module = cifar_resnet(int(m.group(1)), int(m.group(2) or 16), in_channels=in_channels or 1,
                                        num_classes=num_classes)
    else:
        import torchvision

        if arch not in torchvision.models.list_models():
            raise ValueError(f"noskip:{arch}: not cifar-resnet:DEPTH[xWIDTH] or a torchvision ResNet name")
        model = torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
    return remove_shortcuts(model)


def noskip_card(spec: str, in_channels: int, num_classes: int) -> dict[str, Any]:
    """The JSON-card architecture entry of a ``noskip:ARCH`` student spec (rebuilt by :func:`noskip`)."""
    arch = spec[len("noskip:"):] if spec.startswith("noskip:") else spec
    card: dict[str, Any] = {"builder": "zeroshot_kd.models:noskip", "arch": arch, "num_classes": num_classes}
    if _CIFAR_SPEC.fullmatch(arch):
        card["in_channels"] = in_channels
    return card
