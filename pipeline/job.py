"""The training job, resolved once on the driver: data, classes, pretrained and init files, and the
run name derived from everything that changes the result (:mod:`pipeline.identity`).

No torch and no Ray here: `fssd train` and `fssd tune` resolve (and reject) a job before they load
either; :mod:`pipeline.train` runs it.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fssd.config import PostprocessConfig

from .errors import InputError, MissingFileError
from .params import Params, detector_config

__all__ = ["TrainJob", "make_job", "resolve_pretrained", "resolve_model_init", "read_categories",
           "read_source_ids", "count_images"]


@dataclass
class TrainJob:
    """Everything a worker needs, as plain values (it travels to Ray workers)."""

    run_name: str
    data_root: str
    train_json: str
    val_json: str
    class_names: list[str]
    category_ids: list[int]
    source_ids: list[int]
    detector: dict[str, Any]
    train: dict[str, Any]
    seed: int = 0
    epochs: int = 1
    pretrained: str | None = None
    pretrained_sha256: str | None = None
    model_init: str | None = None
    init_classes: dict[str, str] = field(default_factory=dict)
    init_checkpoint: str | None = None
    s3_endpoint_url: str | None = None
    progress: bool = False
    test_kill_at_epoch: int | None = None  # test hook: a worker kills itself once at that epoch
    test_kill_marker: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainJob":
        return cls(**{k: v for k, v in d.items() if k in {f.name for f in dataclasses.fields(cls)}})


def read_categories(split_json: Path) -> tuple[list[str], list[int]]:
    """Class names and category ids (the labels 1..K) of a COCO-format split, in id order."""
    cats = _categories(split_json)
    return [c["name"] for c in cats], [c["id"] for c in cats]


def read_source_ids(split_json: Path) -> list[int]:
    """The dataset's own category ids (``source_id``; the label where the data has none), in label order."""
    return [int(c.get("source_id", c["id"])) for c in _categories(split_json)]


def _read_split(split_json: Path) -> dict[str, Any]:
    try:
        return json.loads(Path(split_json).read_text())
    except FileNotFoundError:
        raise MissingFileError(f"{split_json} does not exist; run the convert stage first (dvc repro convert)") from None


def _categories(split_json: Path) -> list[dict[str, Any]]:
    return sorted(_read_split(split_json)["categories"], key=lambda c: c["id"])


def count_images(split_json: Path) -> int:
    """The number of images in a COCO-format split file."""
    return len(_read_split(split_json)["images"])


def resolve_pretrained(model: Any) -> tuple[str | None, str | None]:
    """(location, sha256) of ``model.pretrained``: a local path made absolute (Ray workers run
    elsewhere) with the SHA-256 of its bytes, or an s3:// URL with ``model.pretrained_sha256``.

    Raises:
        MissingFileError: a local file that does not exist, naming the key.
        InputError: a local file whose bytes do not match ``model.pretrained_sha256``.
    """
    from .identity import file_digest

    uri = model.pretrained
    if not uri:
        return None, None
    if uri.startswith("s3://"):
        return uri, model.pretrained_sha256
    path = Path(uri[len("file://"):] if uri.startswith("file://") else uri).expanduser().resolve()
    if not path.is_file():
        raise MissingFileError(f"model.pretrained: {path} does not exist; fix the path or set model.pretrained: null")
    actual = file_digest(path)
    if model.pretrained_sha256 and actual != model.pretrained_sha256.lower():
        raise InputError(f"model.pretrained: {path} has SHA-256 {actual}, not model.pretrained_sha256 "
                         f"{model.pretrained_sha256}; replace the file or fix the checksum")
    return str(path), actual


def resolve_model_init(params: Params) -> str | None:
    """``model.init`` as a local checkpoint file (a ``models:/`` or ``s3://`` source is fetched into
    ``<data.root>/init/``, which every node of a cluster sees, like the data)."""
    from .init_weights import resolve_init

    m = params.model
    if not m.init:
        return None
    path = resolve_init(m.init, tracking_uri=params.tracking_uri, s3_endpoint_url=params.data.s3.endpoint_url,
                        workdir=Path(params.data.root).resolve() / "init", sha256=m.init_sha256)
    return str(Path(path).resolve())


def make_job(params: Params, *, epochs: int | None = None, init_checkpoint: str | None = None,
             run_name: str | None = None, extra_code: tuple[str, ...] = ()) -> TrainJob:
    """Resolve params into a :class:`TrainJob`; the run name is derived from what changes results
    (:mod:`pipeline.identity`): the params that matter, the train and val data, the code, and the
    bytes of the pretrained and init files."""
    from .identity import code_digest, digest, file_digest, train_settings_identity

    root = Path(params.data.root).resolve()
    processed = root / "processed"
    train_json, val_json = processed / "train.json", processed / "val.json"
    names, cat_ids = read_categories(train_json)
    if params.train.select == "best" and count_images(val_json) == 0:
        raise InputError(
            f"train.select is 'best' but {val_json} has no images (data.val_fraction: 0): set train.select: last "
            "to train on everything and keep the last epoch (the paper's protocol), or data.val_fraction > 0"
        )
    # Post-processing thresholds are evaluation settings, not part of what training produces.
    cfg = dataclasses.replace(detector_config(params, num_classes=len(names) + 1), postprocess=PostprocessConfig())
    train = dataclasses.asdict(params.train)
    epochs = epochs or params.train.epochs
    pretrained, pretrained_sha256 = resolve_pretrained(params.model)
    model_init = resolve_model_init(params)
    if init_checkpoint is not None:
        init_checkpoint = str(Path(init_checkpoint).resolve())
    # The name changes whenever something that changes the result changes, so re-running the
    # same configuration resumes, and a changed one starts afresh.
    identity = {
        "detector": cfg.to_dict(),
        "train": train_settings_identity(train),
        "epochs": epochs,
        "seed": params.seed,
        "data": [file_digest(train_json), file_digest(val_json)],
        "code": code_digest(extra_code),
        "pretrained": pretrained_sha256,
        "init": file_digest(init_checkpoint) if init_checkpoint else None,
        "model_init": [file_digest(model_init), params.model.init_classes] if model_init else None,
    }
    name = run_name or params.train.run_name or f"fssd-{params.data.dataset}-{params.model.preset}-{digest(identity)}"
    return TrainJob(
        run_name=name,
        data_root=str(root),
        train_json=str(train_json),
        val_json=str(val_json),
        class_names=names,
        category_ids=cat_ids,
        source_ids=read_source_ids(train_json),
        detector=cfg.to_dict(),
        train=train,
        seed=params.seed,
        epochs=epochs,
        pretrained=pretrained,
        pretrained_sha256=pretrained_sha256,
        model_init=model_init,
        init_classes=dict(params.model.init_classes),
        init_checkpoint=init_checkpoint,
        s3_endpoint_url=params.data.s3.endpoint_url,
        progress=sys.stderr.isatty(),
    )
