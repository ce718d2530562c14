"""FSSD: Feature Fusion Single Shot Multibox Detector (Li & Zhou, 2017), as a PyTorch library.

The library never imports ray, mlflow, dvc, boto3 or yaml; the pipeline (``pipeline``) does.

The names below are loaded on first use (PEP 562), so ``import fssd`` and the torch-free
modules (:mod:`fssd.config`, the preset tables in :mod:`fssd.models.presets`) do not import
torch; ``fssd.build_fssd`` and the other tensor code import it when they are first touched.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the submodule that defines it
_EXPORTS = {
    "FSSD": "models",
    "PRESETS": "models.presets",
    "DetectorConfig": "config",
    "LossConfig": "config",
    "LossOutput": "loss",
    "ModelConfig": "config",
    "MultiBoxLoss": "loss",
    "PostprocessConfig": "config",
    "PriorConfig": "config",
    "build_detector": "models.presets",
    "build_fssd": "models.presets",
    "decode": "boxes",
    "encode": "boxes",
    "load_checkpoint": "checkpoint",
    "load_model": "checkpoint",
    "make_priors": "priors",
    "match": "boxes",
    "postprocess": "postprocess",
    "preset_config": "models.presets",
    "save_checkpoint": "checkpoint",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from .boxes import decode, encode, match
    from .checkpoint import load_checkpoint, load_model, save_checkpoint
    from .config import DetectorConfig, LossConfig, ModelConfig, PostprocessConfig, PriorConfig
    from .loss import LossOutput, MultiBoxLoss
    from .models import FSSD, PRESETS, build_detector, build_fssd, preset_config
    from .postprocess import postprocess
    from .priors import make_priors


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """Keeps ``fssd.postprocess`` the function: importing the submodule of the same name (which
    fssd.engine does) would otherwise bind the attribute to the module."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _EXPORTS and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
