"""MobileNet-V2 for small images, the CIFAR variant used by KRR-ST for architecture transfer.

Changes from the ImageNet network: the 3x3 stem has stride 1 and the 24-channel stage keeps
stride 1, so only three stages downsample (32 px -> 4x4, 64 px -> 8x8 before the 1x1 conv to
1280 channels and the global average pool). As in the CIFAR code KRR-ST builds on, blocks use
ReLU, a stride-1 block that changes width gets a 1x1 conv + BN shortcut, and strided blocks have
none. ``expansion`` defaults to 2, the factor in the KRR-ST reference; 6 is the paper's MobileNet-V2.
``width_mult`` scales every width (rounded to multiples of 8); the 1280-d top never shrinks.
"""

from __future__ import annotations

import torch
from torch import nn

from ssdd.errors import UserError
from ssdd.models.pooling import GlobalAvgPool
from ssdd.models.registry import Encoder, register

# (output channels, blocks, stride of the first block) per stage; the first stage never expands.
STAGES: tuple[tuple[int, int, int], ...] = (
    (16, 1, 1), (24, 2, 1), (32, 3, 2), (64, 4, 2), (96, 3, 1), (160, 3, 2), (320, 1, 1))
STEM_WIDTH = 32
TOP_WIDTH = 1280


def _round8(width: float) -> int:
    """Nearest multiple of 8, never below 8 nor more than 10% under ``width``."""
    rounded = max(8, int(width + 4) // 8 * 8)
    return rounded + 8 if rounded < 0.9 * width else rounded


def _conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]


class InvertedResidual(nn.Module):
    """1x1 expand -> 3x3 depthwise (carries the stride) -> linear 1x1 project, plus a shortcut."""

    def __init__(self, cin: int, cout: int, expansion: int, stride: int):
        super().__init__()
        hidden = cin * expansion
        self.body = nn.Sequential(
            *_conv_bn(cin, hidden, 1), nn.ReLU(inplace=True),
            *_conv_bn(hidden, hidden, 3, stride, groups=hidden), nn.ReLU(inplace=True),
            *_conv_bn(hidden, cout, 1))
        self.shortcut: nn.Module | None = None
        if stride == 1:
            self.shortcut = nn.Identity() if cin == cout else nn.Sequential(*_conv_bn(cin, cout, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(x)
        return out if self.shortcut is None else out + self.shortcut(x)


@register("mobilenet")
def mobilenet(in_channels: int, image_size: int, out_dim: int, width_mult: float = 1.0,
              expansion: int = 2) -> Encoder:
    if width_mult <= 0 or expansion < 1:
        raise UserError(f"model: mobilenet needs width_mult > 0 and expansion >= 1, "
                        f"got {width_mult} and {expansion}")
    channels = _round8(STEM_WIDTH * width_mult)
    layers: list[nn.Module] = [*_conv_bn(in_channels, channels, 3), nn.ReLU(inplace=True)]
    for stage, (width, blocks, stride) in enumerate(STAGES):
        cout = _round8(width * width_mult)
        for i in range(blocks):
            layers.append(InvertedResidual(channels, cout, 1 if stage == 0 else expansion, stride if i == 0 else 1))
            channels = cout
    top = _round8(TOP_WIDTH * max(1.0, width_mult))
    layers += [*_conv_bn(channels, top, 1), nn.ReLU(inplace=True), GlobalAvgPool(), nn.Flatten()]
    return Encoder(nn.Sequential(*layers), top, out_dim)
