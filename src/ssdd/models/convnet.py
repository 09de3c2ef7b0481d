"""ConvNet-D, the standard dataset-distillation network: D blocks of conv3x3-norm-ReLU-avgpool2."""

from __future__ import annotations

from torch import nn

from ssdd.models.registry import Encoder, pooled_encoder, register


@register("convnet")
def convnet(in_channels: int, image_size: int, out_dim: int, widths: list[int] = (128, 256, 512),
            pool: str = "flatten", norm: str = "batch") -> Encoder:
    """``pool="flatten"`` is the paper's ConvNet (features = flattened last map); ``"gap"`` averages it.
    ``norm="instance"`` (GroupNorm with one group per channel, as MTT/MKDT) keeps no running statistics,
    so unrolled functional training (trajectory matching) needs no buffers."""
    layers: list[nn.Module] = []
    channels, size = in_channels, image_size
    for width in widths:
        layers += [nn.Conv2d(channels, width, 3, padding=1), _norm(norm, width), nn.ReLU(inplace=True),
                   nn.AvgPool2d(2)]
        channels, size = width, size // 2
    return pooled_encoder(layers, channels, size, pool, out_dim, "convnet")


def _norm(kind: str, width: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(width)
    if kind == "instance":
        return nn.GroupNorm(width, width, affine=True)
    raise ValueError(f"convnet norm must be 'batch' or 'instance', got {kind!r}")
