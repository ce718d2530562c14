"""COCO box AP through pycocotools, on the same split files and detections as ``voc_map``."""

from __future__ import annotations

import contextlib
import gc
import io
from typing import Any

from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from .voc import Detections, GroundTruth, load_detections, load_ground_truth

__all__ = ["coco_metrics", "COCO_METRIC_NAMES"]

#: the keys of ``coco_metrics``' result, in the order of ``COCOeval.stats``
COCO_METRIC_NAMES = (
    "AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl",
)


def coco_metrics(
    ground_truth: GroundTruth, detections: Detections, *, verbose: bool = False
) -> dict[str, float]:
    """COCO box metrics of ``detections`` (COCO results format) against ``ground_truth``.

    Runs pycocotools' ``COCOeval(iouType="bbox")`` with its default parameters on COCO objects
    built in memory (no temporary files); nothing passed in is modified.

    Objects with ``ignore: 1`` (VOC "difficult") are given ``iscrowd: 1`` for this evaluation:
    that is how COCOeval ignores ground truth (it overwrites any ``ignore`` flag from
    ``iscrowd``), so a detection on such an object is neither a TP nor a FP. Note that COCOeval
    matches crowd boxes by intersection over the *detection's* area, not IoU. A missing ``area``
    is filled in as w * h.

    Returns:
        ``{"AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm",
        "ARl"}`` as floats in [0, 1], the order of ``COCOeval.stats``; -1.0 where pycocotools
        reports -1 (no ground truth in that area range). Empty detections give all zeros
        (pycocotools' ``loadRes`` cannot take an empty list).

    Args:
        verbose: let pycocotools print its progress and summary table.

    Raises:
        ValueError: unreadable/invalid inputs, detections on unknown image or category ids.
    """
    gt = load_ground_truth(ground_truth)
    dets = load_detections(detections)

    try:
        image_ids = {img["id"] for img in gt["images"]}
        cat_ids = {cat["id"] for cat in gt["categories"]}
        det_images = {d["image_id"] for d in dets}
        det_cats = {d["category_id"] for d in dets}
    except KeyError as exc:
        raise ValueError(
            f"missing key {exc}: images and categories need an 'id', detections need "
            "'image_id', 'category_id', 'bbox' and 'score' (COCO results format)"
        ) from None
    bad_img = det_images - image_ids
    if bad_img:
        raise ValueError(
            f"detections refer to images not in the ground truth, e.g. {sorted(bad_img)[:5]}; "
            "evaluate detections against the split they were made on"
        )
    bad_cat = det_cats - cat_ids
    if bad_cat:
        raise ValueError(
            f"detections refer to categories not in the ground truth: {sorted(bad_cat)[:5]}"
        )
    if not dets:
        return {name: 0.0 for name in COCO_METRIC_NAMES}

    annotations = []
    for a in gt["annotations"]:
        a = dict(a)
        a["iscrowd"] = int(bool(a.get("iscrowd", 0)) or bool(a.get("ignore", 0)))
        if "area" not in a:
            a["area"] = float(a["bbox"][2]) * float(a["bbox"][3])
        annotations.append(a)
    dataset = {k: v for k, v in gt.items() if k != "annotations"}
    dataset["annotations"] = annotations
    # loadRes adds id/area/iscrowd/segmentation to each result dict: give it copies
    results = [
        {"image_id": d["image_id"], "category_id": d["category_id"], "bbox": list(d["bbox"]),
         "score": d["score"]}
        for d in dets
    ]

    out = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
    # pycocotools allocates millions of small dicts/lists that live until the end: the cyclic
    # garbage collector would rescan them again and again (~20 % of the time), so pause it
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        with out:
            coco_gt = COCO()
            coco_gt.dataset = dataset
            coco_gt.createIndex()
            coco_dt = coco_gt.loadRes(results)
            evaluator = COCOeval(coco_gt, coco_dt, iouType="bbox")
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
    finally:
        if gc_was_enabled:
            gc.enable()
    return {name: float(v) for name, v in zip(COCO_METRIC_NAMES, evaluator.stats)}
