"""Frozen, typed configuration of the detector.

Every dataclass here is built from plain values (numbers, strings, tuples), so a config
can be stored in a checkpoint and loaded back with ``torch.load(weights_only=True)``.
``from_dict`` rejects unknown keys and wrong types, naming the dotted key.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Mapping

__all__ = [
    "ConfigError",
    "ModelConfig",
    "PriorConfig",
    "LossConfig",
    "PostprocessConfig",
    "DetectorConfig",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IGNORED_MODES",
    "WEIGHT_INITS",
]

#: How the layers that no ImageNet file fills are initialised: ``pytorch`` (PyTorch's defaults),
#: ``authors`` (the authors' training script, see :func:`fssd.models.fssd.authors_init`).
WEIGHT_INITS: tuple[str, ...] = ("pytorch", "authors")

#: What training does with objects marked ``ignore: 1`` (VOC "difficult", COCO crowd):
#: ``target`` trains on them like any object (the authors' code: keep_difficult=True),
#: ``ignore`` makes them ignore regions (priors matching one are neither positive nor negative),
#: ``drop`` removes them (their regions become background and may be mined as hard negatives).
IGNORED_MODES: tuple[str, ...] = ("target", "ignore", "drop")

# torchvision's ImageNet VGG16 normalisation, on the 0-255 pixel scale, RGB order.
IMAGENET_MEAN: tuple[float, float, float] = (123.675, 116.28, 103.53)
IMAGENET_STD: tuple[float, float, float] = (58.395, 57.12, 57.375)


class ConfigError(ValueError):
    """A configuration value is missing, unknown or of the wrong type."""


def _check_positive(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ConfigError(f"{name} must be a positive finite number, got {value!r}")


@dataclass(frozen=True)
class PriorConfig:
    """Default boxes (SSD priors).

    Levels 2..L get scales spaced linearly from ``min_scale`` to ``max_scale``; level 1 gets
    ``first_scale`` (``min_scale / 2`` when None, as in SSD300). Each level's second square box
    has side ``sqrt(s_k * s_{k+1})``. ``steps`` (pixels) are the cell sizes; None derives them
    from the real feature-map sizes (``input_size / map_size``). ``clip`` clamps the
    (cx, cy, w, h) values to [0, 1] as the authors' PriorBox does.
    """

    min_scale: float = 0.2
    max_scale: float = 0.88
    first_scale: float | None = None
    aspect_ratios: tuple[tuple[int, ...], ...] = ((2, 3), (2, 3), (2, 3), (2, 3), (2,), (2,))
    steps: tuple[float, ...] | None = None
    clip: bool = False
    variances: tuple[float, float] = (0.1, 0.2)

    def __post_init__(self) -> None:
        _check_positive("priors.min_scale", self.min_scale)
        _check_positive("priors.max_scale", self.max_scale)
        if self.min_scale >= self.max_scale:
            raise ConfigError(
                f"priors.min_scale ({self.min_scale}) must be smaller than priors.max_scale ({self.max_scale})"
            )
        if self.first_scale is not None:
            _check_positive("priors.first_scale", self.first_scale)
        if not self.aspect_ratios:
            raise ConfigError("priors.aspect_ratios must list one tuple of ratios per level")
        for level, ratios in enumerate(self.aspect_ratios):
            for r in ratios:
                if not (isinstance(r, (int, float)) and r > 0):
                    raise ConfigError(f"priors.aspect_ratios[{level}] has a bad ratio {r!r}; ratios must be > 0")
        if self.steps is not None:
            if len(self.steps) != len(self.aspect_ratios):
                raise ConfigError(
                    f"priors.steps has {len(self.steps)} entries but there are {len(self.aspect_ratios)} levels"
                )
            for s in self.steps:
                _check_positive("priors.steps[]", s)
        if len(self.variances) != 2:
            raise ConfigError(f"priors.variances must be two numbers, got {self.variances!r}")
        for v in self.variances:
            _check_positive("priors.variances[]", v)

    @property
    def num_levels(self) -> int:
        return len(self.aspect_ratios)

    @property
    def anchors_per_location(self) -> tuple[int, ...]:
        """Two square boxes plus two per aspect ratio, per level."""
        return tuple(2 + 2 * len(r) for r in self.aspect_ratios)

    def scales(self) -> list[float]:
        """Scale s_k of every level, plus the extra one beyond the last level (L + 1 values)."""
        n = self.num_levels
        if n < 2:
            raise ConfigError("priors need at least two levels")
        step = (self.max_scale - self.min_scale) / (n - 2) if n > 2 else self.max_scale - self.min_scale
        linear = [self.min_scale + step * k for k in range(n)]  # levels 2..L, then one beyond
        first = self.first_scale if self.first_scale is not None else self.min_scale / 2
        return [first] + linear


@dataclass(frozen=True)
class ModelConfig:
    """The network: backbone, fusion, pyramid and heads.

    ``pyramid`` lists (out_channels, kernel, stride, padding) for each detection level; the
    first layer reads the fused map. ``backbone_width`` scales every backbone channel count.
    """

    num_classes: int
    input_size: int
    backbone: str = "vgg16"
    backbone_width: float = 1.0
    fusion_channels: int = 256
    pyramid: tuple[tuple[int, int, int, int], ...] = (
        (512, 3, 1, 1),
        (512, 3, 2, 1),
        (256, 3, 2, 1),
        (256, 3, 2, 1),
        (256, 3, 1, 0),
        (256, 3, 1, 0),
    )
    align_corners: bool = True
    image_mean: tuple[float, float, float] = IMAGENET_MEAN
    image_std: tuple[float, float, float] = IMAGENET_STD
    weight_init: str = "pytorch"

    def __post_init__(self) -> None:
        if self.weight_init not in WEIGHT_INITS:
            raise ConfigError(f"model.weight_init must be one of {', '.join(WEIGHT_INITS)}, got {self.weight_init!r}")
        if not isinstance(self.num_classes, int) or isinstance(self.num_classes, bool) or self.num_classes < 2:
            raise ConfigError(
                f"model.num_classes must be an integer >= 2 (background + at least one class), got {self.num_classes!r}"
            )
        if not isinstance(self.input_size, int) or self.input_size < 32:
            raise ConfigError(f"model.input_size must be an integer >= 32 pixels, got {self.input_size!r}")
        if self.backbone not in ("vgg16", "lite"):
            raise ConfigError(f"model.backbone must be 'vgg16' or 'lite', got {self.backbone!r}")
        _check_positive("model.backbone_width", self.backbone_width)
        if not isinstance(self.fusion_channels, int) or self.fusion_channels < 1:
            raise ConfigError(f"model.fusion_channels must be a positive integer, got {self.fusion_channels!r}")
        if len(self.pyramid) < 2:
            raise ConfigError(f"model.pyramid needs at least two levels, got {len(self.pyramid)}")
        for i, layer in enumerate(self.pyramid):
            if len(layer) != 4 or not all(isinstance(v, int) for v in layer) or layer[0] < 1 or layer[1] < 1 or layer[2] < 1 or layer[3] < 0:
                raise ConfigError(
                    f"model.pyramid[{i}] must be (out_channels>=1, kernel>=1, stride>=1, padding>=0) integers, got {layer!r}"
                )
        if len(self.image_mean) != 3 or len(self.image_std) != 3:
            raise ConfigError("model.image_mean and model.image_std must have three values (RGB)")
        for s in self.image_std:
            _check_positive("model.image_std[]", s)


@dataclass(frozen=True)
class LossConfig:
    """MultiBox loss: IoU threshold for positives, negatives per positive, loc weight."""

    iou_threshold: float = 0.5
    neg_pos_ratio: float = 3.0
    loc_weight: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 < self.iou_threshold <= 1.0:
            raise ConfigError(f"loss.iou_threshold must be in (0, 1], got {self.iou_threshold!r}")
        _check_positive("loss.neg_pos_ratio", self.neg_pos_ratio)
        if not (self.loc_weight >= 0):
            raise ConfigError(f"loss.loc_weight must be >= 0, got {self.loc_weight!r}")


@dataclass(frozen=True)
class PostprocessConfig:
    """Detection post-processing (defaults: the authors' VOC evaluation settings)."""

    score_threshold: float = 0.01
    nms_threshold: float = 0.45
    pre_nms_top_k: int | None = 400
    top_k_per_class: int | None = 200
    max_detections: int = 200
    plus_one: bool = False

    def __post_init__(self) -> None:
        if not 0.0 <= self.score_threshold < 1.0:
            raise ConfigError(f"postprocess.score_threshold must be in [0, 1), got {self.score_threshold!r}")
        if not 0.0 < self.nms_threshold <= 1.0:
            raise ConfigError(f"postprocess.nms_threshold must be in (0, 1], got {self.nms_threshold!r}")
        for name in ("pre_nms_top_k", "top_k_per_class"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise ConfigError(f"postprocess.{name} must be a positive integer or null, got {v!r}")
        if not isinstance(self.max_detections, int) or self.max_detections < 1:
            raise ConfigError(f"postprocess.max_detections must be a positive integer, got {self.max_detections!r}")


@dataclass(frozen=True)
class DetectorConfig:
    """Everything needed to rebuild a detector: stored in every checkpoint."""

    model: ModelConfig
    priors: PriorConfig = field(default_factory=PriorConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    postprocess: PostprocessConfig = field(default_factory=PostprocessConfig)

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], path: str = "") -> "DetectorConfig":
        return from_dict(cls, data, path)


def _to_plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    return value


def _coerce(tp: Any, value: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert lists to tuples."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key} must be a mapping, got {type(value).__name__}")
        return from_dict(tp, value, key)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(a, value, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise ConfigError(f"{key} must have {len(args)} values, got {len(value)}: {value!r}")
        return tuple(_coerce(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        return {_coerce(args[0], k, f"{key}") : _coerce(args[1], v, f"{key}.{k}") for k, v in value.items()}
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return value
    return value


def from_dict(cls: type, data: Mapping[str, Any], path: str = "") -> Any:  # noqa: C901
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys (named by dotted path)."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path or cls.__name__} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"{path}." if path else ""
        raise ConfigError(
            f"unknown key {where}{unknown[0]}; known keys: {', '.join(sorted(fields))}"
        )
    kwargs = {}
    for name, value in data.items():
        key = f"{path}.{name}" if path else name
        kwargs[name] = _coerce(hints[name], value, key)
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required field is missing
        raise ConfigError(f"{path or cls.__name__}: {e}") from None
