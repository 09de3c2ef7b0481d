"""The small-image AlexNet of the dataset-distillation codebases, with BatchNorm as in KRR-ST.

Five convs (128 and 192 channels at 5x5, then 256, 192, 192 at 3x3), each conv-BN-ReLU, with a
2x2 max-pool after the first, second and fifth: a 32 px input ends as a 4x4 map, 64 px as 8x8.
A global average pool makes the features 192-d at any size; ``pool="flatten"`` flattens the last
map instead, as the KRR-ST reference does (3072-d at 32 px). ``batch_norm=False`` gives the
norm-free AlexNet of the original DC code.
"""

from __future__ import annotations

from torch import nn

from ssdd.errors import UserError
from ssdd.models.registry import Encoder, pooled_encoder, register

# (output channels, kernel size, max-pool after) per conv.
ALEXNET_LAYOUT: tuple[tuple[int, int, bool], ...] = (
    (128, 5, True), (192, 5, True), (256, 3, False), (192, 3, False), (192, 3, True))


@register("alexnet")
def alexnet(in_channels: int, image_size: int, out_dim: int, pool: str = "gap",
            batch_norm: bool = True) -> Encoder:
    pools = sum(1 for _, _, pooled in ALEXNET_LAYOUT if pooled)
    if image_size < 2 ** pools:
        raise UserError(f"model: alexnet needs images of at least {2 ** pools} px, got {image_size}")
    layers: list[nn.Module] = []
    channels = in_channels
    for width, kernel, pooled in ALEXNET_LAYOUT:
        layers.append(nn.Conv2d(channels, width, kernel, padding=kernel // 2, bias=not batch_norm))
        if batch_norm:
            layers.append(nn.BatchNorm2d(width))
        layers.append(nn.ReLU(inplace=True))
        if pooled:
            layers.append(nn.MaxPool2d(2))
        channels = width
    return pooled_encoder(layers, channels, image_size // 2 ** pools, pool, out_dim, "alexnet")
