"""FSSD: Feature Fusion Single Shot Multibox Detector (Li & Zhou, 2017), as a PyTorch library.

The library never imports ray, mlflow, dvc, boto3 or yaml; the pipeline (``pipeline``) does.
"""

from .boxes import decode, encode, match
from .checkpoint import load_checkpoint, load_model, save_checkpoint
from .config import DetectorConfig, LossConfig, ModelConfig, PostprocessConfig, PriorConfig
from .loss import LossOutput, MultiBoxLoss
from .models import FSSD, PRESETS, build_detector, build_fssd, preset_config
from .postprocess import postprocess
from .priors import make_priors

__version__ = "0.1.0"

__all__ = [
    "FSSD",
    "PRESETS",
    "DetectorConfig",
    "LossConfig",
    "LossOutput",
    "ModelConfig",
    "MultiBoxLoss",
    "PostprocessConfig",
    "PriorConfig",
    "build_detector",
    "build_fssd",
    "decode",
    "encode",
    "load_checkpoint",
    "load_model",
    "make_priors",
    "match",
    "postprocess",
    "preset_config",
    "save_checkpoint",
]
