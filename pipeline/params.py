"""The only reader of params.yaml: typed, validated, with dotted ``--set key=value`` overrides.

Unknown keys and wrong types are rejected with the key's dotted path in the message.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from fssd.config import IGNORED_MODES as DIFFICULT_MODES, ConfigError, DetectorConfig, PostprocessConfig, from_dict
from fssd.models.presets import PRESETS, preset_config

from .convert import Layout

__all__ = [
    "ParamsError",
    "Params",
    "load_params",
    "apply_overrides",
    "parse_set",
    "detector_config",
    "flatten",
]

DEFAULT_PARAMS = Path("params.yaml")


class ParamsError(ConfigError):
    """params.yaml or an override is invalid; the message names the dotted key."""


@dataclass(frozen=True)
class SourceParams:
    url: str
    sha256: str | None = None
    md5: str | None = None
    extract: bool = True
    filename: str | None = None
    extract_to: str | None = None
    mirrors: tuple[str, ...] = ()


@dataclass(frozen=True)
class S3Params:
    endpoint_url: str | None = None
    profile: str | None = None


@dataclass(frozen=True)
class SyntheticParams:
    """The embedded scene set (fssd.data.synthetic.generate_scenes); the defaults are its defaults."""

    num_images: int = 3300
    seed: int = 0
    objects_per_image: tuple[int, int] = (1, 6)
    object_size_range: tuple[float, float] = (0.1, 0.6)
    max_occlusion: float = 0.4

    def __post_init__(self) -> None:
        from fssd.data.scene_spec import check_scene_args

        try:
            check_scene_args(**self.scene_kwargs())
        except ValueError as e:
            raise ParamsError(f"data.synthetic.{e}") from None

    def scene_kwargs(self) -> dict[str, Any]:
        """The scene knobs as generate_scenes keyword arguments."""
        return {"objects_per_image": tuple(self.objects_per_image),
                "object_size_range": tuple(self.object_size_range), "max_occlusion": self.max_occlusion}


@dataclass(frozen=True)
class DataParams:
    dataset: str = "synthetic"
    root: str = "data"
    sources: tuple[SourceParams, ...] = ()
    s3: S3Params = field(default_factory=S3Params)
    synthetic: SyntheticParams = field(default_factory=SyntheticParams)
    max_bad_fraction: float = 0.01
    val_fraction: float = 0.05
    val_max_images: int | None = 2000
    format: str = "voc"
    layout: Layout = field(default_factory=Layout)
    classes: tuple[str, ...] = ()
    test_fraction: float = 0.1

    def __post_init__(self) -> None:
        known = ("synthetic", "voc2007", "voc2012", "voc0712", "coco2017", "custom")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ParamsError(f"data.val_fraction must be in [0, 1) (0: no validation split), got {self.val_fraction!r}")
        if self.val_max_images is not None and self.val_max_images < 1:
            raise ParamsError(f"data.val_max_images must be >= 1 or null, got {self.val_max_images!r}")
        if self.format not in ("voc", "coco"):
            raise ParamsError(f"data.format must be 'voc' (Pascal VOC XML) or 'coco' (COCO JSON), got {self.format!r}")
        if not 0.0 <= self.test_fraction < 1.0 or self.val_fraction + self.test_fraction >= 1.0:
            raise ParamsError(f"data.test_fraction must be in [0, 1) and leave images to train beside data.val_fraction, "
                              f"got {self.test_fraction!r}")
        if len(set(self.classes)) != len(self.classes) or any(not str(c).strip() for c in self.classes):
            raise ParamsError(f"data.classes must be distinct, non-empty names, got {list(self.classes)!r}")
        if self.dataset not in known:
            raise ParamsError(f"data.dataset must be one of {', '.join(known)}, got {self.dataset!r}")
        if self.dataset == "custom" and not self.sources:
            raise ParamsError("data.dataset is 'custom' but data.sources is empty; list the archives to fetch")
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ParamsError(f"data.max_bad_fraction must be in [0, 1], got {self.max_bad_fraction!r}")
        if self.synthetic.num_images < 10:
            raise ParamsError(f"data.synthetic.num_images must be >= 10, got {self.synthetic.num_images}")


@dataclass(frozen=True)
class ModelParams:
    preset: str = "fssd_lite"
    input_size: int | None = None
    fusion_channels: int | None = None
    backbone_width: float = 1.0
    pretrained: str | None = None
    pretrained_sha256: str | None = None
    init: str | None = None
    init_sha256: str | None = None
    init_classes: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ParamsError(f"model.preset must be one of {', '.join(sorted(PRESETS))}, got {self.preset!r}")
        sha = self.pretrained_sha256
        if sha is not None and (len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha.lower())):
            raise ParamsError(f"model.pretrained_sha256 must be 64 hex digits (sha256sum FILE), got {sha!r}")
        if self.pretrained and "://" in self.pretrained and not self.pretrained.startswith(("s3://", "file://")):
            raise ParamsError(f"model.pretrained must be a local path or s3://bucket/key, got {self.pretrained!r}")
        if self.pretrained and self.pretrained.startswith("s3://") and sha is None:
            raise ParamsError(
                f"model.pretrained is remote ({self.pretrained}) and needs model.pretrained_sha256: a remote file is "
                "verified before use and its bytes name the training run; compute it with `sha256sum FILE`")


@dataclass(frozen=True)
class PriorParams:
    min_scale: float | None = None
    max_scale: float | None = None


@dataclass(frozen=True)
class AugmentParams:
    """Training augmentation; the defaults are SSD's (photometric distortion, zoom-out, min-IoU crop, flip)."""

    photometric: bool = True
    zoom_out: float = 4.0
    p_zoom_out: float = 0.5
    crop: bool = True
    flip: float = 0.5

    def __post_init__(self) -> None:
        if self.zoom_out < 1:
            raise ParamsError(f"train.augment.zoom_out must be >= 1 (1 turns the zoom-out off), got {self.zoom_out!r}")
        for name in ("p_zoom_out", "flip"):
            if not 0 <= getattr(self, name) <= 1:
                raise ParamsError(f"train.augment.{name} must be a probability in [0, 1], got {getattr(self, name)!r}")


@dataclass(frozen=True)
class TrainParams:
    epochs: int = 14
    batch_size: int = 32
    lr: float = 0.02
    lr_reference_batch: int = 32
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: float = 1.0
    warmup_factor: float = 0.1
    schedule: str = "cosine"
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1
    grad_clip: float | None = 10.0
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float | None = None
    loader_workers: int = 1
    storage_path: str = "ray_results/train"
    run_name: str | None = None
    keep_checkpoints: int = 2
    max_failures: int = 1
    use_tuned: bool = True
    amp: bool = True
    amp_dtype: str = "bfloat16"
    channels_last: bool = True
    sync_bn: bool = False
    freeze_bn: bool = False
    ema: bool = False
    ema_decay: float = 0.9998
    val_every: int = 2
    max_images: int | None = None
    max_bad_steps: int = 20
    log_every: int = 20
    select: str = "best"
    difficult: str = "target"
    augment: AugmentParams = field(default_factory=AugmentParams)

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "lr_reference_batch", "num_workers", "keep_checkpoints", "val_every", "max_bad_steps", "log_every"):
            if getattr(self, name) < 1:
                raise ParamsError(f"train.{name} must be >= 1, got {getattr(self, name)!r}")
        if self.batch_size % self.num_workers:
            raise ParamsError(
                f"train.batch_size ({self.batch_size}) must be divisible by train.num_workers ({self.num_workers}): "
                "it is the global batch, split evenly across workers"
            )
        if self.lr <= 0:
            raise ParamsError(f"train.lr must be > 0, got {self.lr!r}")
        if self.schedule not in ("cosine", "multistep"):
            raise ParamsError(f"train.schedule must be 'cosine' or 'multistep', got {self.schedule!r}")
        if self.select not in ("best", "last"):
            raise ParamsError(f"train.select must be 'best' (highest validation mAP) or 'last' (the last epoch), got {self.select!r}")
        if self.difficult not in DIFFICULT_MODES:
            raise ParamsError(f"train.difficult must be one of {', '.join(DIFFICULT_MODES)}, got {self.difficult!r}")
        if self.amp_dtype not in ("bfloat16", "float16"):
            raise ParamsError(f"train.amp_dtype must be 'bfloat16' or 'float16', got {self.amp_dtype!r}")
        if self.warmup_epochs < 0 or not 0 < self.warmup_factor <= 1:
            raise ParamsError("train.warmup_epochs must be >= 0 and train.warmup_factor in (0, 1]")
        if self.max_images is not None and self.max_images < self.batch_size:
            raise ParamsError(f"train.max_images ({self.max_images}) must be null or at least one batch ({self.batch_size})")
        if self.loader_workers < 0 or self.max_failures < -1:
            raise ParamsError("train.loader_workers must be >= 0 and train.max_failures >= -1")
        if self.sync_bn and not self.use_gpu:
            raise ParamsError("train.sync_bn needs train.use_gpu (torch's SyncBatchNorm runs on GPUs only); "
                              "on CPU set train.freeze_bn: true to make BatchNorm independent of the per-worker batch")
        if not 0 < self.ema_decay < 1:
            raise ParamsError(f"train.ema_decay must be in (0, 1), got {self.ema_decay!r}")

    @property
    def scaled_lr(self) -> float:
        """The linear scaling rule: lr * global batch / reference batch."""
        return self.lr * self.batch_size / self.lr_reference_batch


@dataclass(frozen=True)
class SchedulerParams:
    grace_period: int = 1
    reduction_factor: int = 2


@dataclass(frozen=True)
class TuneParams:
    num_samples: int = 4
    epochs: int = 3
    search: str = "random"
    scheduler: SchedulerParams = field(default_factory=SchedulerParams)
    num_workers: int = 1
    cpus_per_worker: float | None = None
    storage_path: str = "ray_results/tune"
    max_train_images: int | None = None
    space: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.search not in ("random", "grid", "optuna"):
            raise ParamsError(f"tune.search must be random, grid or optuna, got {self.search!r}")
        if self.num_samples < 1 or self.epochs < 1 or self.num_workers < 1:
            raise ParamsError("tune.num_samples, tune.epochs and tune.num_workers must be >= 1")
        if self.max_train_images is not None and self.max_train_images < 1:
            raise ParamsError(f"tune.max_train_images must be >= 1 or null, got {self.max_train_images!r}")


@dataclass(frozen=True)
class EvaluateParams:
    score_threshold: float = 0.01
    nms_threshold: float = 0.45
    top_k_per_class: int | None = 200
    max_detections: int = 200
    batch_size: int = 32
    num_draw: int = 4


@dataclass(frozen=True)
class RegisterParams:
    model_name: str = "fssd-synthetic"
    alias: str = "champion"


@dataclass(frozen=True)
class MlflowParams:
    tracking_uri: str = "sqlite:///mlflow.db"
    experiment: str = "fssd"


@dataclass(frozen=True)
class Params:
    seed: int = 0
    data: DataParams = field(default_factory=DataParams)
    model: ModelParams = field(default_factory=ModelParams)
    priors: PriorParams = field(default_factory=PriorParams)
    train: TrainParams = field(default_factory=TrainParams)
    tune: TuneParams = field(default_factory=TuneParams)
    evaluate: EvaluateParams = field(default_factory=EvaluateParams)
    register: RegisterParams = field(default_factory=RegisterParams)
    mlflow: MlflowParams = field(default_factory=MlflowParams)

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))

    @property
    def tracking_uri(self) -> str:
        return os.environ.get("MLFLOW_TRACKING_URI") or self.mlflow.tracking_uri


def _plain(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


def parse_set(items: Sequence[str]) -> dict[str, Any]:
    """``["train.lr=0.1", "model.preset=fssd300_vgg16"]`` -> {dotted key: YAML-parsed value}."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ParamsError(f"--set expects key=value, got {item!r}")
        out[key.strip()] = yaml.safe_load(raw) if raw.strip() else None
    return out


# Mappings whose keys are the user's own (a Tune search space names dotted params as keys).
_FREE_MAPPINGS = {"tune.space"}


def _dataclass_field_type(cls: Any, name: str) -> Any:
    """The dataclass type of field ``name`` of ``cls``, or None for a leaf field."""
    hint = typing.get_type_hints(cls)[name]
    return hint if dataclasses.is_dataclass(hint) else None


def apply_overrides(raw: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Apply dotted-key overrides to a raw params mapping, refusing keys the schema lacks.

    Below ``tune.space`` the rest of the dotted key is one user-chosen key
    (``tune.space.train.lr`` sets ``space["train.lr"]``).
    """
    data = copy.deepcopy(dict(raw))
    for dotted, value in overrides.items():
        parts = dotted.split(".")
        node: dict[str, Any] = data
        schema: Any = Params
        for i, part in enumerate(parts):
            path = ".".join(parts[: i + 1])
            names = sorted(f.name for f in dataclasses.fields(schema))
            if part not in names:
                where = ".".join(parts[:i]) or "the top level"
                raise ParamsError(f"unknown key {path}; known keys under {where}: {', '.join(names)}")
            if i == len(parts) - 1:
                node[part] = value
                break
            sub = _dataclass_field_type(schema, part)
            if node.get(part) is None:
                node[part] = {}
            if not isinstance(node[part], dict):
                raise ParamsError(f"{path} is not a mapping; cannot set {dotted}")
            if sub is None:
                if path not in _FREE_MAPPINGS:
                    raise ParamsError(f"{path} is not a mapping; cannot set {dotted}")
                node[part][".".join(parts[i + 1 :])] = value
                break
            node, schema = node[part], sub
    return data


def validate(raw: Mapping[str, Any]) -> Params:
    try:
        params = from_dict(Params, raw)
    except ParamsError:
        raise
    except ConfigError as e:
        raise ParamsError(str(e)) from None
    detector_config(params)  # the model part must build a valid DetectorConfig too
    return params


def load_params(path: str | os.PathLike = DEFAULT_PARAMS, overrides: Mapping[str, Any] | None = None) -> Params:
    """Read params.yaml, apply dotted overrides, validate. Errors name the file and the key."""
    p = Path(path)
    if not p.is_file():
        raise ParamsError(f"{p} does not exist; run from the project root or pass --params PATH")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ParamsError(f"{p} is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ParamsError(f"{p} must hold a mapping at the top level")
    raw = apply_overrides(raw, overrides or {})
    try:
        return validate(raw)
    except ConfigError as e:
        raise ParamsError(f"{p}: {e}") from None


def detector_config(params: Params, num_classes: int = 2) -> DetectorConfig:
    """The fssd DetectorConfig that params describe (num_classes comes from the data)."""
    overrides: dict[str, Any] = {}
    m = params.model
    if m.input_size is not None:
        overrides["input_size"] = m.input_size
    if m.fusion_channels is not None:
        overrides["fusion_channels"] = m.fusion_channels
    if m.backbone_width != 1.0:
        overrides["backbone_width"] = m.backbone_width
    if params.priors.min_scale is not None:
        overrides["min_scale"] = params.priors.min_scale
    if params.priors.max_scale is not None:
        overrides["max_scale"] = params.priors.max_scale
    try:
        cfg = preset_config(m.preset, num_classes, **overrides)
    except ConfigError as e:
        raise ParamsError(str(e)) from None
    e = params.evaluate
    post = PostprocessConfig(
        score_threshold=e.score_threshold,
        nms_threshold=e.nms_threshold,
        top_k_per_class=e.top_k_per_class,
        max_detections=e.max_detections,
    )
    return dataclasses.replace(cfg, postprocess=post)


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1} (for MLflow params)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def add_params_args(parser: Any, example: str = "train.epochs=2") -> None:
    """``--params`` and repeatable ``--set KEY=VALUE`` on a stage's argparse parser."""
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE",
                        help=f"override a dotted param for this run, e.g. --set {example} (repeatable)")
