from .backbone import LiteBackbone, VGG16Backbone
from .fssd import FSSD, FeatureFusion, feature_sizes
from .presets import PRESETS, build_detector, build_fssd, preset_config

__all__ = [
    "FSSD",
    "FeatureFusion",
    "LiteBackbone",
    "VGG16Backbone",
    "PRESETS",
    "build_detector",
    "build_fssd",
    "feature_sizes",
    "preset_config",
]
