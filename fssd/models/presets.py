"""Named FSSD configurations: the paper's FSSD300/FSSD512 on VGG16 and a CPU-sized lite model.

The tables and :func:`preset_config` need no torch (params validation uses them); building a
network imports it.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from ..config import ConfigError, DetectorConfig, ModelConfig, PriorConfig

if TYPE_CHECKING:
    from .fssd import FSSD

__all__ = ["PRESETS", "preset_config", "build_fssd", "build_detector"]

_VGG_PYRAMID_300 = ((512, 3, 1, 1), (512, 3, 2, 1), (256, 3, 2, 1), (256, 3, 2, 1), (256, 3, 1, 0), (256, 3, 1, 0))
_VGG_PYRAMID_512 = (
    (512, 3, 1, 1),
    (512, 3, 2, 1),
    (256, 3, 2, 1),
    (256, 3, 2, 1),
    (256, 3, 2, 1),
    (256, 3, 2, 1),
    (256, 4, 1, 1),
)

# The paper's presets keep the authors' prior steps and clipping (VOC_300 / VOC_512 in their
# code) so that their checkpoints load and behave as trained; the lite preset derives the
# steps from the real feature-map sizes.
PRESETS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "fssd300_vgg16": (
        dict(input_size=300, backbone="vgg16", fusion_channels=256, pyramid=_VGG_PYRAMID_300, weight_init="authors"),
        dict(
            min_scale=0.2,
            max_scale=0.88,
            aspect_ratios=((2, 3), (2, 3), (2, 3), (2, 3), (2,), (2,)),
            steps=(8, 16, 32, 64, 100, 300),
            clip=True,
        ),
    ),
    "fssd512_vgg16": (
        dict(input_size=512, backbone="vgg16", fusion_channels=256, pyramid=_VGG_PYRAMID_512, weight_init="authors"),
        dict(
            min_scale=0.15,
            max_scale=0.9,
            first_scale=0.07,
            aspect_ratios=((2, 3), (2, 3), (2, 3), (2, 3), (2, 3), (2,), (2,)),
            steps=(8, 16, 32, 64, 128, 256, 512),
            clip=True,
        ),
    ),
    "fssd_lite": (
        dict(
            input_size=256,
            backbone="lite",
            fusion_channels=64,
            pyramid=((64, 3, 1, 1), (128, 3, 2, 1), (128, 3, 2, 1), (64, 3, 2, 1), (64, 3, 2, 1), (64, 3, 2, 1)),
        ),
        dict(min_scale=0.2, max_scale=0.88, aspect_ratios=((2, 3), (2, 3), (2, 3), (2, 3), (2,), (2,))),
    ),
}

_MODEL_KEYS = {f.name for f in dataclasses.fields(ModelConfig)} - {"num_classes"}
_PRIOR_KEYS = {f.name for f in dataclasses.fields(PriorConfig)}


def preset_config(preset: str, num_classes: int, **overrides: Any) -> DetectorConfig:
    """The :class:`DetectorConfig` of a named preset, with model/prior fields overridden.

    Overriding ``input_size`` of a preset with fixed prior steps (the paper's) without also
    giving ``steps`` derives the steps from the new feature-map sizes.
    """
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; known presets: {', '.join(sorted(PRESETS))}")
    model_kw, prior_kw = (dict(d) for d in PRESETS[preset])
    unknown = sorted(set(overrides) - _MODEL_KEYS - _PRIOR_KEYS)
    if unknown:
        raise ConfigError(
            f"unknown override {unknown[0]!r} for build_fssd; model keys: {', '.join(sorted(_MODEL_KEYS))}; "
            f"prior keys: {', '.join(sorted(_PRIOR_KEYS))}"
        )
    for key, value in overrides.items():
        (model_kw if key in _MODEL_KEYS else prior_kw)[key] = value
    if "input_size" in overrides and overrides["input_size"] != PRESETS[preset][0]["input_size"] and "steps" not in overrides:
        prior_kw["steps"] = None
    return DetectorConfig(
        model=ModelConfig(num_classes=num_classes, **model_kw),
        priors=PriorConfig(**prior_kw),
    )


def build_detector(config: DetectorConfig) -> FSSD:
    """Build the network described by a :class:`DetectorConfig` (e.g. from a checkpoint)."""
    from .fssd import FSSD

    return FSSD(config.model, config.priors)


def build_fssd(preset: str, num_classes: int, **overrides: Any) -> FSSD:
    """Build an FSSD from a preset name (``fssd300_vgg16``, ``fssd512_vgg16``, ``fssd_lite``).

    ``overrides`` may set any :class:`ModelConfig` or :class:`PriorConfig` field, e.g.
    ``input_size=320``, ``fusion_channels=128``, ``min_scale=0.15``, ``backbone_width=0.5``.
    """
    return build_detector(preset_config(preset, num_classes, **overrides))
