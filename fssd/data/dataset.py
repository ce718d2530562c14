"""Detection dataset over the common COCO-format split files (docs/CONTRACTS.md).

``DetectionDataset(ann_file, image_root, transform)`` returns ``(image, target)`` with ``image``
a float32 tensor [3, S, S] (whatever ``transform`` makes of the RGB ``uint8`` image) and
``target = {"boxes": float32 [M, 4] normalised x1, y1, x2, y2 in [0, 1], "labels": int64 [M] in
1..K, "image_id": int, "orig_size": (h, w)}``.

Augmentation is reproducible per ``(seed, epoch, index)``: ``__getitem__`` reseeds the transform
from those three numbers (:func:`fssd.data.transforms.reseed`). Every global index is read once
per epoch whatever the DataLoader worker or DDP rank that reads it, so samples differ from each
other and from epoch to epoch, and the same run gives the same tensors however the work is split.
Call :meth:`DetectionDataset.set_epoch` before creating each epoch's DataLoader iterator; the
epoch lives in shared memory, so persistent workers see it too.

OpenCV threads: inside DataLoader worker processes the dataset calls ``cv2.setNumThreads(0)``
(once per process) so that N workers do not each start an OpenCV pool of all the cores; the main
process is left alone.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info

from fssd.config import IGNORED_MODES
from fssd.data.transforms import reseed

__all__ = ["DetectionDataset", "load_coco_split"]


def _bad(ann_file: Path, what: str) -> ValueError:
    return ValueError(
        f"{ann_file}: {what}. The split file must follow the COCO-format contract in docs/CONTRACTS.md; "
        "re-run the convert stage (`dvc repro convert`) to rewrite it."
    )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def load_coco_split(ann_file: Path) -> dict[str, Any]:
    """Read and validate a COCO-format split file; errors name the file and the bad entry."""
    ann_file = Path(ann_file)
    if not ann_file.is_file():
        raise FileNotFoundError(
            f"annotation file {ann_file} does not exist; run the convert stage (`dvc repro convert`) "
            "or pass the path of an existing split json"
        )
    try:
        with open(ann_file, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise _bad(ann_file, f"not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise _bad(ann_file, f"top level is a {type(data).__name__}, expected an object")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise _bad(ann_file, f"missing or non-list key {key!r}")

    categories = data["categories"]
    ids = []
    for i, cat in enumerate(categories):
        if not isinstance(cat, dict) or not _is_int(cat.get("id")) or not isinstance(cat.get("name"), str):
            raise _bad(ann_file, f"categories[{i}] needs an int 'id' and a str 'name', got {cat!r}")
        ids.append(cat["id"])
    if sorted(ids) != list(range(1, len(ids) + 1)):
        raise _bad(ann_file, f"category ids must be contiguous 1..K, got {sorted(ids)}")

    seen: set[int] = set()
    for i, img in enumerate(data["images"]):
        if not isinstance(img, dict):
            raise _bad(ann_file, f"images[{i}] is not an object")
        if not _is_int(img.get("id")) or not isinstance(img.get("file_name"), str):
            raise _bad(ann_file, f"images[{i}] needs an int 'id' and a str 'file_name', got {img!r}")
        if not all(_is_int(img.get(k)) and img[k] > 0 for k in ("width", "height")):
            raise _bad(ann_file, f"images[{i}] (id {img['id']}) needs positive int 'width' and 'height'")
        if img["id"] in seen:
            raise _bad(ann_file, f"duplicate image id {img['id']}")
        seen.add(img["id"])

    for i, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict):
            raise _bad(ann_file, f"annotations[{i}] is not an object")
        if ann.get("image_id") not in seen:
            raise _bad(ann_file, f"annotations[{i}] refers to unknown image_id {ann.get('image_id')!r}")
        if not _is_int(ann.get("category_id")) or ann["category_id"] not in ids:
            raise _bad(ann_file, f"annotations[{i}] has category_id {ann.get('category_id')!r} outside 1..{len(ids)}")
        bbox = ann.get("bbox")
        if (
            not isinstance(bbox, list)
            or len(bbox) != 4
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) for v in bbox)
        ):
            raise _bad(ann_file, f"annotations[{i}] needs 'bbox' as 4 finite numbers [x, y, w, h], got {bbox!r}")
    return data


class DetectionDataset(Dataset):
    """COCO-format detection split as ``(image_tensor, target)`` pairs.

    Args:
        ann_file: the split json (``data/processed/train.json``).
        image_root: the directory that ``file_name`` is relative to (the data root).
        transform: called as ``transform(image=rgb_uint8_hwc, bboxes=boxes, labels=labels)`` with
            normalised ``x1, y1, x2, y2`` boxes; must return ``image``, ``bboxes`` and ``labels``
            (see :func:`fssd.data.transforms.train_transform` / ``eval_transform``). ``None``
            returns the decoded image as a ``uint8`` tensor [3, H, W] and the boxes unchanged.
        ignored: what to do with objects marked ``ignore: 1`` (VOC difficult) or ``iscrowd: 1``
            (:data:`fssd.config.IGNORED_MODES`): ``"target"`` keeps them as ordinary objects,
            ``"ignore"`` keeps them flagged in ``target["ignore"]`` (ignore regions for the loss),
            ``"drop"`` removes them.
        seed: base seed of the per-sample augmentation (``>= 0``).

    Attributes:
        class_names: the K category names, in category id order (id ``k`` is ``class_names[k-1]``).
        num_classes: ``K + 1``, background included (the detector's class count).
        ids: image ids in dataset order.
    """

    def __init__(
        self,
        ann_file: Path,
        image_root: Path,
        transform: Callable[..., dict[str, Any]] | None,
        *,
        ignored: str = "drop",
        seed: int = 0,
    ) -> None:
        if ignored not in IGNORED_MODES:
            raise ValueError(f"ignored must be one of {', '.join(IGNORED_MODES)}, got {ignored!r}")
        if not _is_int(seed) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        self.ann_file = Path(ann_file)
        self.image_root = Path(image_root)
        self.transform = transform
        self.ignored = ignored
        self.seed = seed
        # The epoch sits in shared memory so that persistent DataLoader workers see set_epoch.
        self._epoch = torch.zeros(1, dtype=torch.int64).share_memory_()

        data = load_coco_split(self.ann_file)
        categories = sorted(data["categories"], key=lambda c: c["id"])
        self.class_names: list[str] = [c["name"] for c in categories]
        self.num_classes: int = len(self.class_names) + 1

        images = data["images"]
        self.ids: list[int] = [img["id"] for img in images]
        self._files: list[str] = [img["file_name"] for img in images]
        self._sizes: list[tuple[int, int]] = [(img["height"], img["width"]) for img in images]
        per_image: dict[int, list[dict[str, Any]]] = {i: [] for i in self.ids}
        for ann in data["annotations"]:
            if ignored == "drop" and _is_ignored(ann):
                continue
            per_image[ann["image_id"]].append(ann)
        self._boxes: list[np.ndarray] = []
        self._labels: list[np.ndarray] = []
        for image_id, (h, w) in zip(self.ids, self._sizes):
            anns = per_image[image_id]
            xywh = np.array([a["bbox"] for a in anns], dtype=np.float64).reshape(-1, 4)
            boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
            boxes /= np.array([w, h, w, h], dtype=np.float64)
            # an ignore region travels through the transform as a negative label
            sign = -1 if ignored == "ignore" else 1
            labels = np.array([a["category_id"] * (sign if _is_ignored(a) else 1) for a in anns], dtype=np.int64)
            boxes, labels = _valid_boxes(boxes, labels)
            self._boxes.append(boxes.astype(np.float32))
            self._labels.append(labels)
        self._cv2_pid: int | None = None

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def epoch(self) -> int:
        return int(self._epoch.item())

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation stream of ``epoch`` (call before iterating the epoch)."""
        if not _is_int(epoch) or epoch < 0:
            raise ValueError(f"epoch must be a non-negative int, got {epoch!r}")
        self._epoch.fill_(epoch)

    def image_path(self, index: int) -> Path:
        return self.image_root / self._files[index]

    def load_image(self, index: int) -> np.ndarray:
        """The RGB ``uint8`` image [H, W, 3] of sample ``index``."""
        path = self.image_path(index)
        image = cv2.imread(str(path), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
        if image is None:
            if not path.is_file():
                raise FileNotFoundError(
                    f"image {path} (image id {self.ids[index]} in {self.ann_file}) does not exist; "
                    "check image_root / the data root, or re-run the download and convert stages"
                )
            raise ValueError(
                f"image {path} (image id {self.ids[index]} in {self.ann_file}) cannot be decoded; "
                "the file is corrupt or not an image: re-download it or remove it from the split"
            )
        if image.shape[:2] != self._sizes[index]:
            raise ValueError(
                f"image {path} is {image.shape[1]}x{image.shape[0]} (w x h) but {self.ann_file} says "
                f"{self._sizes[index][1]}x{self._sizes[index][0]}; re-run the convert stage"
            )
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)

    def _configure_worker(self) -> None:
        pid = os.getpid()
        if self._cv2_pid != pid:
            self._cv2_pid = pid
            if get_worker_info() is not None:
                cv2.setNumThreads(0)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} images")
        index = index % len(self)
        self._configure_worker()
        image = self.load_image(index)
        boxes, labels = self._boxes[index], self._labels[index]
        if self.transform is None:
            tensor = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
        else:
            if hasattr(self.transform, "set_random_state"):
                reseed(self.transform, self.seed, self.epoch, index)
            out = self.transform(image=image, bboxes=boxes.copy(), labels=labels.copy())
            tensor = out["image"]
            if not isinstance(tensor, torch.Tensor):
                raise TypeError(
                    f"transform returned image of type {type(tensor).__name__}; it must end in a CHW tensor "
                    "(use fssd.data.transforms.train_transform / eval_transform)"
                )
            tensor = tensor.contiguous()
            boxes = np.asarray(out["bboxes"], dtype=np.float64).reshape(-1, 4)
            labels = np.asarray(out["labels"], dtype=np.int64).reshape(-1)
            boxes, labels = _valid_boxes(boxes, labels)
        target = {
            "boxes": torch.from_numpy(boxes.astype(np.float32)),
            "labels": torch.from_numpy(np.abs(labels).astype(np.int64)),
            "ignore": torch.from_numpy(labels < 0),
            "image_id": int(self.ids[index]),
            "orig_size": self._sizes[index],
        }
        return tensor, target


def _is_ignored(ann: dict[str, Any]) -> bool:
    return bool(ann.get("ignore", 0) or ann.get("iscrowd", 0))


def _valid_boxes(boxes: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Clip normalised boxes to [0, 1] and drop those with no width or height (in float32)."""
    boxes = np.clip(boxes, 0.0, 1.0).astype(np.float32)
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    return boxes[keep], labels[keep]
