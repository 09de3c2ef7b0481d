"""ResNet-10/18 for small images: 3x3 stride-1 stem, no max-pool (the SSL libraries' CIFAR variant)."""

from __future__ import annotations

import torch
from torch import nn

from ssdd.models.registry import Encoder, register


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def _resnet(blocks: list[int], in_channels: int, out_dim: int, stem_padding: int) -> Encoder:
    # stem_padding=2 reproduces the reference teacher (34x34 maps at 32 px); 1 keeps the size.
    layers: list[nn.Module] = [nn.Conv2d(in_channels, 64, 3, 1, stem_padding, bias=False), nn.BatchNorm2d(64),
                               nn.ReLU(inplace=True)]
    cin = 64
    for stage, (count, width) in enumerate(zip(blocks, (64, 128, 256, 512))):
        for i in range(count):
            layers.append(BasicBlock(cin, width, 2 if (i == 0 and stage > 0) else 1))
            cin = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return Encoder(nn.Sequential(*layers), 512, out_dim)


@register("resnet18")
def resnet18(in_channels: int, image_size: int, out_dim: int, stem_padding: int = 2) -> Encoder:
    return _resnet([2, 2, 2, 2], in_channels, out_dim, stem_padding)


@register("resnet10")
def resnet10(in_channels: int, image_size: int, out_dim: int, stem_padding: int = 1) -> Encoder:
    return _resnet([1, 1, 1, 1], in_channels, out_dim, stem_padding)
