"""ResNet-10/18 for small images: 3x3 stride-1 stem, no max-pool (the SSL libraries' CIFAR variant)."""

from __future__ import annotations

import torch
from torch import nn

from ssdd.models.pooling import GlobalAvgPool
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
    layers += [GlobalAvgPool(), nn.Flatten()]
    return Encoder(nn.Sequential(*layers), 512, out_dim)


@register("resnet18")
def resnet18(in_channels: int, image_size: int, out_dim: int, stem_padding: int = 2) -> Encoder:
    return _resnet([2, 2, 2, 2], in_channels, out_dim, stem_padding)


@register("resnet10")
def resnet10(in_channels: int, image_size: int, out_dim: int, stem_padding: int = 1) -> Encoder:
    return _resnet([1, 1, 1, 1], in_channels, out_dim, stem_padding)


_BLOCKS = {"resnet18": [2, 2, 2, 2], "resnet10": [1, 1, 1, 1]}


def torchvision_key_map(arch: str) -> dict[str, str]:
    """Our parameter-name prefixes for the torchvision / solo-learn ResNet layout
    (``conv1``, ``bn1``, ``layerS.I.{conv1,bn1,conv2,bn2,downsample.0,downsample.1}``)."""
    mapping = {"conv1.": "backbone.0.", "bn1.": "backbone.1."}
    index = 3
    for stage, count in enumerate(_BLOCKS[arch], start=1):
        for i in range(count):
            ours = f"backbone.{index}."
            mapping[f"layer{stage}.{i}.downsample."] = ours + "shortcut."
            for part in ("conv1.", "bn1.", "conv2.", "bn2."):
                mapping[f"layer{stage}.{i}.{part}"] = ours + part
            index += 1
    return mapping


def from_torchvision_keys(state: dict, arch: str) -> dict:
    """Rename a torchvision-layout ResNet state dict to ours; drops ``fc.*`` (the SSL libraries
    replace it by Identity) and strips wrapper prefixes such as ``module.`` or ``backbone.``."""
    mapping = torchvision_key_map(arch)
    out = {}
    for key, value in state.items():
        stripped = True
        while stripped:  # "module.backbone.conv1.weight" -> "conv1.weight"; ours ("backbone.3.") stay
            stripped = False
            for prefix in ("module.", "backbone.", "encoder.", "model."):
                if key.startswith(prefix) and not key[len(prefix):][:1].isdigit():
                    key, stripped = key[len(prefix):], True
        if key.startswith("fc.") or key.startswith("projector.") or key.startswith("classifier."):
            continue
        for theirs, ours in sorted(mapping.items(), key=lambda kv: -len(kv[0])):
            if key.startswith(theirs):
                key = ours + key[len(theirs):]
                break
        out[key] = value
    return out
