"""The FSSD network, its backbones and the named presets.

The names are loaded on first use (PEP 562): the preset tables and :func:`preset_config`
(:mod:`fssd.models.presets`) need no torch, the modules do.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# public name -> the submodule that defines it
_EXPORTS = {
    "FSSD": "fssd",
    "FeatureFusion": "fssd",
    "LiteBackbone": "backbone",
    "VGG16Backbone": "backbone",
    "PRESETS": "presets",
    "build_detector": "presets",
    "build_fssd": "presets",
    "feature_sizes": "fssd",
    "preset_config": "presets",
}

__all__ = list(_EXPORTS)

if TYPE_CHECKING:
    from .backbone import LiteBackbone, VGG16Backbone
    from .fssd import FSSD, FeatureFusion, feature_sizes
    from .presets import PRESETS, build_detector, build_fssd, preset_config


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
