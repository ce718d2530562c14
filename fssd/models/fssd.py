"""The FSSD network: backbone sources -> feature fusion -> pyramid -> SSD heads."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ModelConfig, PriorConfig
from ..priors import make_priors
from .backbone import LiteBackbone, VGG16Backbone

__all__ = ["FSSD", "FeatureFusion", "feature_sizes", "authors_init"]


class FeatureFusion(nn.Module):
    """FSSD's fusion: 1x1 conv + ReLU per source, bilinear resize to the first source's size,
    concatenation, BatchNorm."""

    def __init__(self, in_channels: tuple[int, ...], channels: int, align_corners: bool = True) -> None:
        super().__init__()
        self.reduce = nn.ModuleList(nn.Conv2d(c, channels, kernel_size=1) for c in in_channels)
        self.bn = nn.BatchNorm2d(channels * len(in_channels))
        self.align_corners = align_corners
        self.out_channels = channels * len(in_channels)

    def forward(self, sources: list[Tensor]) -> Tensor:
        size = sources[0].shape[-2:]
        maps = []
        for conv, x in zip(self.reduce, sources):
            x = F.relu(conv(x), inplace=True)
            if x.shape[-2:] != size:
                x = F.interpolate(x, size=size, mode="bilinear", align_corners=self.align_corners)
            maps.append(x)
        return self.bn(torch.cat(maps, dim=1))


def _trunk(model: ModelConfig) -> tuple[nn.Module, FeatureFusion, nn.ModuleList]:
    backbone: nn.Module
    if model.backbone == "vgg16":
        backbone = VGG16Backbone(model.backbone_width)
    else:
        backbone = LiteBackbone(model.backbone_width)
    fusion = FeatureFusion(backbone.out_channels, model.fusion_channels, model.align_corners)
    layers = []
    in_ch = fusion.out_channels
    for out_ch, k, s, pad in model.pyramid:
        layers.append(nn.Sequential(nn.Conv2d(in_ch, out_ch, k, stride=s, padding=pad), nn.ReLU(inplace=True)))
        in_ch = out_ch
    return backbone, fusion, nn.ModuleList(layers)


def _pyramid_maps(backbone: nn.Module, fusion: nn.Module, pyramid: nn.ModuleList, images: Tensor) -> list[Tensor]:
    x = fusion(backbone(images))
    maps = []
    for layer in pyramid:
        x = layer(x)
        maps.append(x)
    return maps


def feature_sizes(model: ModelConfig) -> list[tuple[int, int]]:
    """(height, width) of every detection map at ``model.input_size``, from a forward pass on
    the meta device (no memory, no compute)."""
    s = model.input_size
    with torch.device("meta"):
        backbone, fusion, pyramid = _trunk(model)
        probe = torch.empty(1, 3, s, s)
    try:
        maps = _pyramid_maps(backbone.eval(), fusion.eval(), pyramid, probe)
    except RuntimeError as e:
        raise ValueError(
            f"input_size {s} is too small for this network's backbone and {len(model.pyramid)}-level pyramid "
            f"({e}); use a larger model.input_size or a shorter pyramid"
        ) from None
    return [(int(m.shape[-2]), int(m.shape[-1])) for m in maps]


def authors_init(model: "FSSD") -> None:
    """The authors' initialisation of the layers that are not loaded from ImageNet.

    Their training script applies one function with ``Module.apply`` to the extras, the loc and
    conf heads, the fusion module and the pyramid: a state-dict key ending in ``weight`` that
    contains ``conv`` gets Kaiming-normal (fan_out), one that contains ``bn`` gets 1, every
    ``bias`` gets 0. Their fusion and pyramid layers are ``BasicConv`` blocks (keys
    ``conv.weight``): Kaiming-normal. The extras and heads are bare ``nn.Conv2d`` (key
    ``weight`` alone): PyTorch's default weight, zero bias. The fusion BatchNorm is not in the
    applied modules (PyTorch's default: weight 1, bias 0).
    """
    basic = [*model.fusion.reduce, *(layer[0] for layer in model.pyramid)]
    bare = [*model.loc_head, *model.conf_head]
    extras = getattr(model.backbone, "extras", None)
    if extras is not None:
        bare += [m for m in extras.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        for conv in basic:
            nn.init.kaiming_normal_(conv.weight, mode="fan_out")
        for conv in basic + bare:
            if conv.bias is not None:
                conv.bias.zero_()


class FSSD(nn.Module):
    """Feature Fusion Single Shot Multibox Detector.

    ``forward(images [N,3,H,W]) -> (loc [N,P,4], conf [N,P,C])``: raw box offsets and class
    logits (column 0 = background) in the order of ``self.priors`` ([P,4] normalised
    (cx, cy, w, h)), which are computed from the real feature-map sizes at ``input_size``.
    """

    def __init__(self, model: ModelConfig, priors: PriorConfig) -> None:
        super().__init__()
        self.config = model
        self.prior_config = priors
        self.num_classes = model.num_classes
        self.input_size = model.input_size
        self.backbone, self.fusion, self.pyramid = _trunk(model)
        if priors.num_levels != len(model.pyramid):
            raise ValueError(
                f"priors.aspect_ratios has {priors.num_levels} levels but model.pyramid has {len(model.pyramid)}; "
                "give one ratio list per pyramid level"
            )
        anchors = priors.anchors_per_location
        chans = [layer[0] for layer in model.pyramid]
        self.loc_head = nn.ModuleList(nn.Conv2d(c, a * 4, 3, padding=1) for c, a in zip(chans, anchors))
        self.conf_head = nn.ModuleList(
            nn.Conv2d(c, a * model.num_classes, 3, padding=1) for c, a in zip(chans, anchors)
        )
        self.feature_sizes = feature_sizes(model)
        self.register_buffer("priors", make_priors(self.feature_sizes, model.input_size, priors), persistent=False)
        if model.weight_init == "authors":
            authors_init(self)

    def _pyramid_maps(self, images: Tensor) -> list[Tensor]:
        return _pyramid_maps(self.backbone, self.fusion, self.pyramid, images)

    def check_images(self, images: Tensor) -> None:
        if not isinstance(images, Tensor) or images.dim() != 4:
            shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(f"images must be a [N, 3, H, W] tensor, got {shape}")
        if images.shape[1] != 3:
            raise ValueError(f"images must have 3 channels (RGB), got {images.shape[1]} (shape {tuple(images.shape)})")
        if tuple(images.shape[-2:]) != (self.input_size, self.input_size):
            raise ValueError(
                f"images must be {self.input_size}x{self.input_size} (the model's input_size), got "
                f"{images.shape[-2]}x{images.shape[-1]}; resize them or build the model with another input_size"
            )

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        self.check_images(images)
        n = images.shape[0]
        maps = self._pyramid_maps(images)
        loc = [h(x).permute(0, 2, 3, 1).reshape(n, -1, 4) for h, x in zip(self.loc_head, maps)]
        conf = [h(x).permute(0, 2, 3, 1).reshape(n, -1, self.num_classes) for h, x in zip(self.conf_head, maps)]
        return torch.cat(loc, dim=1), torch.cat(conf, dim=1)
