"""VGG-11 with BatchNorm for small images, as in the dataset-distillation codebases (KRR-ST included).

Five 2x2 max-pools take a 32 px input to a 1x1 map of 512 channels; a global average pool
(a no-op at 32 px) keeps the features 512-d at 64 px too. ``pool="flatten"`` instead flattens the
last map, as the KRR-ST reference does (2048-d at 64 px).
"""

from __future__ import annotations

from torch import nn

from ssdd.errors import UserError
from ssdd.models.registry import Encoder, pooled_encoder, register

# Output channels of each 3x3 conv; "M" is a 2x2 max-pool.
VGG11_LAYOUT: tuple[int | str, ...] = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


@register("vgg11")
def vgg11(in_channels: int, image_size: int, out_dim: int, pool: str = "gap") -> Encoder:
    pools = sum(1 for entry in VGG11_LAYOUT if entry == "M")
    if image_size < 2 ** pools:
        raise UserError(f"model: vgg11 needs images of at least {2 ** pools} px, got {image_size}")
    layers: list[nn.Module] = []
    channels = in_channels
    for entry in VGG11_LAYOUT:
        if entry == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            # The conv bias is redundant in front of BatchNorm.
            layers += [nn.Conv2d(channels, entry, 3, padding=1, bias=False), nn.BatchNorm2d(entry),
                       nn.ReLU(inplace=True)]
            channels = entry
    return pooled_encoder(layers, channels, image_size // 2 ** pools, pool, out_dim, "vgg11")
