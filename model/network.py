"""The paper's 3D ResNet18 and its comparison networks, selected by name.

The authors' public code is Kensho Hara's 3D-ResNets-PyTorch: a 7x7x7 first
convolution with stride (1, 2, 2), max-pooling, type-B (projection) shortcuts.
MONAI's default ResNet stem has stride 1 everywhere (4x the compute) and is
not the paper's network, so the stem is set explicitly. ResNeXt-50 follows
Hara's resnext.py (bottleneck blocks with 32 groups, expansion 2).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from monai.networks import nets
from torch import nn

from model.names import ARCHITECTURES
_HARA_STEM = {"conv1_t_size": 7, "conv1_t_stride": (1, 2, 2), "shortcut_type": "B", "bias_downsample": False}


class NetworkError(ValueError):
    """Unknown architecture name."""


class _ResNeXtBottleneck(nn.Module):
    expansion = 2

    def __init__(self, in_planes: int, planes: int, cardinality: int, stride: int, downsample: nn.Module | None):
        super().__init__()
        width = cardinality * planes // 32
        self.conv1 = nn.Conv3d(in_planes, width, 1, bias=False)
        self.bn1 = nn.BatchNorm3d(width)
        self.conv2 = nn.Conv3d(width, width, 3, stride=stride, padding=1, groups=cardinality, bias=False)
        self.bn2 = nn.BatchNorm3d(width)
        self.conv3 = nn.Conv3d(width, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm3d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + residual)


class ResNeXt3D(nn.Module):
    """3D ResNeXt as in Hara's 3D-ResNets (layers [3, 4, 6, 3] for ResNeXt-50)."""

    def __init__(self, layers=(3, 4, 6, 3), cardinality: int = 32, n_input_channels: int = 1, num_classes: int = 2):  # noqa: ANN001
        super().__init__()
        self.in_planes = 64
        self.conv1 = nn.Conv3d(n_input_channels, 64, (7, 7, 7), stride=(1, 2, 2), padding=(3, 3, 3), bias=False)
        self.bn1 = nn.BatchNorm3d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool3d(kernel_size=3, stride=2, padding=1)
        stages = []
        for i, (planes, blocks) in enumerate(zip((128, 256, 512, 1024), layers)):
            stages.append(self._stage(planes, blocks, cardinality, stride=1 if i == 0 else 2))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool3d(1)
        self.fc = nn.Linear(1024 * _ResNeXtBottleneck.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def _stage(self, planes: int, blocks: int, cardinality: int, stride: int) -> nn.Sequential:
        out_planes = planes * _ResNeXtBottleneck.expansion
        downsample = None
        if stride != 1 or self.in_planes != out_planes:  # type-B shortcut: projection
            downsample = nn.Sequential(
                nn.Conv3d(self.in_planes, out_planes, 1, stride=stride, bias=False), nn.BatchNorm3d(out_planes)
            )
        layers = [_ResNeXtBottleneck(self.in_planes, planes, cardinality, stride, downsample)]
        self.in_planes = out_planes
        layers += [_ResNeXtBottleneck(self.in_planes, planes, cardinality, 1, None) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


_BUILDERS: dict[str, Callable[[], nn.Module]] = {
    "resnet18": lambda: nets.resnet18(spatial_dims=3, n_input_channels=1, num_classes=2, **_HARA_STEM),
    "resnet34": lambda: nets.resnet34(spatial_dims=3, n_input_channels=1, num_classes=2, **_HARA_STEM),
    "resnet50": lambda: nets.resnet50(spatial_dims=3, n_input_channels=1, num_classes=2, **_HARA_STEM),
    "resnext50": lambda: ResNeXt3D(),
    "densenet121": lambda: nets.DenseNet121(spatial_dims=3, in_channels=1, out_channels=2),
}


def build_network(architecture: str) -> nn.Module:
    """A fresh, randomly initialised network with two outputs (non-responder, responder)."""
    try:
        return _BUILDERS[architecture]()
    except KeyError:
        raise NetworkError(f"unknown architecture {architecture!r}; choose one of {', '.join(ARCHITECTURES)}") from None


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
