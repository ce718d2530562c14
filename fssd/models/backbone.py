"""Backbones that give FSSD its three source maps (strides about 8, 16 and 32)."""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["VGG16Backbone", "LiteBackbone"]


def _ch(channels: int, width: float) -> int:
    return max(1, int(round(channels * width)))


class VGG16Backbone(nn.Module):
    """SSD's reduced-fc VGG16 plus the FSSD extra layers.

    ``layers`` keeps the authors' layer indices (conv1_1 = 0 ... fc6 = 31, fc7 = 33), so the
    authors' ``base.N`` and torchvision's ``features.N`` weights map one to one. Sources:
    conv4_3 after ReLU (index 22), fc7 after ReLU, and the last extra layer after ReLU.
    """

    CONV4_3_END = 23  # layers[:23] ends with conv4_3's ReLU

    def __init__(self, width: float = 1.0) -> None:
        super().__init__()
        cfg = [64, 64, "M", 128, 128, "M", 256, 256, 256, "C", 512, 512, 512, "M", 512, 512, 512]
        layers: list[nn.Module] = []
        in_ch = 3
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            elif v == "C":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=True))
            else:
                out = _ch(int(v), width)
                layers += [nn.Conv2d(in_ch, out, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
                in_ch = out
        fc = _ch(1024, width)
        layers += [
            nn.MaxPool2d(kernel_size=3, stride=1, padding=1),
            nn.Conv2d(in_ch, fc, kernel_size=3, padding=6, dilation=6),  # fc6
            nn.ReLU(inplace=True),
            nn.Conv2d(fc, fc, kernel_size=1),  # fc7
            nn.ReLU(inplace=True),
        ]
        self.layers = nn.ModuleList(layers)
        e = [_ch(c, width) for c in (256, 512, 128, 256)]
        self.extras = nn.ModuleList(
            [
                nn.Conv2d(fc, e[0], kernel_size=1),
                nn.Conv2d(e[0], e[1], kernel_size=3),
                nn.Conv2d(e[1], e[2], kernel_size=1),
                nn.Conv2d(e[2], e[3], kernel_size=3, stride=2, padding=1),
            ]
        )
        self.out_channels = (_ch(512, width), fc, e[3])

    def forward(self, x: Tensor) -> list[Tensor]:
        for layer in self.layers[: self.CONV4_3_END]:
            x = layer(x)
        conv4_3 = x
        for layer in self.layers[self.CONV4_3_END :]:
            x = layer(x)
        fc7 = x
        for conv in self.extras:
            x = nn.functional.relu(conv(x), inplace=True)
        return [conv4_3, fc7, x]


def _conv_bn(in_ch: int, out_ch: int, stride: int = 1, kernel: int = 3) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(inplace=True),
    )


class LiteBackbone(nn.Module):
    """A narrow VGG-style BatchNorm backbone for CPUs and tests.

    Three stages end at strides 8, 16 and 32, playing the roles of conv4_3, fc7 and the last
    extra layer of the VGG16 FSSD. About 0.5 M parameters at ``width=1``.
    """

    def __init__(self, width: float = 1.0) -> None:
        super().__init__()
        c = [_ch(v, width) for v in (16, 32, 64, 128, 64, 128)]
        self.stage1 = nn.Sequential(
            _conv_bn(3, c[0], stride=2),
            _conv_bn(c[0], c[1], stride=2),
            _conv_bn(c[1], c[1]),
            _conv_bn(c[1], c[2], stride=2),
            _conv_bn(c[2], c[2]),
        )
        self.stage2 = nn.Sequential(_conv_bn(c[2], c[3], stride=2), _conv_bn(c[3], c[3]))
        self.stage3 = nn.Sequential(_conv_bn(c[3], c[4], kernel=1), _conv_bn(c[4], c[5], stride=2))
        self.out_channels = (c[2], c[3], c[5])

    def forward(self, x: Tensor) -> list[Tensor]:
        s1 = self.stage1(x)
        s2 = self.stage2(s1)
        s3 = self.stage3(s2)
        return [s1, s2, s3]
