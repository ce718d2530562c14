"""PASCAL VOC detection average precision, vectorised with numpy.

``voc_map`` reproduces the matching and AP rules of the devkit's Python port
(``voc_eval.py`` from py-faster-rcnn, the code every SSD/FSSD repository copies) on the
COCO-format split files of ``docs/CONTRACTS.md`` and on detections in the COCO results format.

Matching, per class, exactly as ``voc_eval.py``:

* detections are sorted by descending score (a stable sort: equal scores keep their input order;
  the devkit's ``np.argsort(-confidence)`` leaves the order of ties unspecified);
* each detection is compared with every ground-truth box of its class in its image and takes the
  one with the highest IoU (the first of them on a tie, as ``np.argmax``);
* if that IoU is ``> iou_threshold`` (strictly, as ``ovmax > ovthresh``): a *difficult* box makes
  the detection ignored (neither TP nor FP, even if another box would match), an undetected box
  makes it a TP and marks the box detected, an already detected box makes it a FP (duplicate);
  otherwise the detection is a FP;
* recall = cumTP / npos with npos the number of non-difficult boxes, precision =
  cumTP / max(cumTP + cumFP, eps).

Because the state of a box ("detected") only depends on the earlier matches of that same box, the
loop is not needed: a detection is a TP iff it is the first one, in score order, whose best match
is that (non-difficult) box with IoU above the threshold. All of it is array work per class.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from itertools import chain
from operator import itemgetter
from typing import Any, Mapping, Sequence, Union

import numpy as np

__all__ = ["VOCResult", "voc_map", "load_ground_truth", "load_detections"]

GroundTruth = Union[Mapping[str, Any], str, "os.PathLike[str]"]
Detections = Union[Sequence[Mapping[str, Any]], str, "os.PathLike[str]"]

_EPS = np.finfo(np.float64).eps


# --------------------------------------------------------------------------------------------
# inputs


def load_ground_truth(ground_truth: GroundTruth) -> dict[str, Any]:
    """Return the COCO-format dict given as a dict or as the path of a JSON split file.

    Raises ``ValueError`` naming the file (or "ground truth dict") when it cannot be read or lacks
    one of ``images``, ``annotations``, ``categories``.
    """
    if isinstance(ground_truth, (str, os.PathLike)):
        source = str(ground_truth)
        try:
            with open(ground_truth, encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            raise ValueError(
                f"ground truth file {source!r} does not exist; run the convert stage or pass "
                "the path of a COCO-format split file"
            ) from None
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"ground truth file {source!r} is not readable JSON: {exc}") from None
    elif isinstance(ground_truth, Mapping):
        source = "ground truth dict"
        data = ground_truth
    else:
        raise ValueError(
            f"ground truth must be a COCO-format dict or a JSON path, got {type(ground_truth).__name__}"
        )
    if not isinstance(data, Mapping):
        raise ValueError(f"{source}: expected a JSON object with images/annotations/categories")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise ValueError(
                f"{source}: key {key!r} is missing or not a list; a COCO-format split file "
                "needs 'images', 'annotations' and 'categories' (docs/CONTRACTS.md)"
            )
    return dict(data)


def load_detections(detections: Detections) -> list[Mapping[str, Any]]:
    """Return the detections given as a list or as the path of a COCO results JSON file."""
    if isinstance(detections, (str, os.PathLike)):
        source = str(detections)
        try:
            with open(detections, encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            raise ValueError(f"detections file {source!r} does not exist") from None
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"detections file {source!r} is not readable JSON: {exc}") from None
        if not isinstance(data, list):
            raise ValueError(
                f"detections file {source!r}: expected a JSON list of "
                "{image_id, category_id, bbox, score} objects (COCO results format)"
            )
        return data
    if isinstance(detections, Mapping) or not isinstance(detections, Sequence):
        raise ValueError(
            "detections must be a list of {image_id, category_id, bbox, score} dicts "
            f"(COCO results format) or a JSON path, got {type(detections).__name__}"
        )
    return detections  # type: ignore[return-value]


def _boxes(records: Sequence[Mapping[str, Any]], what: str) -> np.ndarray:
    """[N, 4] float64 xywh from the ``bbox`` of each record (fast path for 4-element lists)."""
    n = len(records)
    try:
        bboxes = list(map(itemgetter("bbox"), records))
    except KeyError:
        raise ValueError(f"every {what} needs a 'bbox' [x, y, w, h]") from None
    lengths = np.fromiter(map(len, bboxes), dtype=np.int64, count=n)
    if n and (lengths != 4).any():
        i = int(np.flatnonzero(lengths != 4)[0])
        raise ValueError(f"{what} #{i}: 'bbox' must be [x, y, w, h], got {bboxes[i]!r}")
    flat = np.fromiter(chain.from_iterable(bboxes), dtype=np.float64, count=4 * n)
    return flat.reshape(n, 4)


def _column(records: Sequence[Mapping[str, Any]], key: str, dtype: Any, what: str) -> np.ndarray:
    try:
        return np.fromiter(map(itemgetter(key), records), dtype=dtype, count=len(records))
    except KeyError:
        raise ValueError(f"every {what} needs a {key!r}") from None
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what} {key!r} values must be numbers: {exc}") from None


def _index_of(ids: np.ndarray, known: np.ndarray, what: str, known_what: str) -> np.ndarray:
    """Positions of ``ids`` in the sorted array ``known``; ValueError for an unknown id."""
    pos = np.searchsorted(known, ids)
    bad = pos >= len(known)
    pos[bad] = 0
    if len(known) == 0:
        bad = np.ones(len(ids), dtype=bool)
    else:
        bad |= known[pos] != ids
    if bad.any():
        unknown = np.unique(ids[bad])
        raise ValueError(
            f"{int(bad.sum())} {what} refer to {known_what} not in the ground truth, e.g. "
            f"{unknown[:5].tolist()}; evaluate detections against the split they were made on"
        )
    return pos


@dataclass
class _Arrays:
    image_ids: np.ndarray  # sorted unique image ids
    cat_ids: np.ndarray  # sorted category ids
    cat_names: dict[int, str]
    gt_img: np.ndarray  # per GT: index into image_ids
    gt_cls: np.ndarray  # per GT: index into cat_ids
    gt_box: np.ndarray  # [G, 4] xywh
    gt_difficult: np.ndarray  # bool


def _ground_truth_arrays(gt: Mapping[str, Any]) -> _Arrays:
    images, anns, cats = gt["images"], gt["annotations"], gt["categories"]
    image_ids = np.unique(_column(images, "id", np.int64, "image"))
    cat_ids_raw = _column(cats, "id", np.int64, "category")
    cat_ids = np.unique(cat_ids_raw)
    if len(cat_ids) != len(cat_ids_raw):
        raise ValueError("ground truth: category ids must be unique")
    cat_names = {int(c["id"]): str(c.get("name", c["id"])) for c in cats}
    gt_img = _index_of(_column(anns, "image_id", np.int64, "annotation"), image_ids,
                       "annotations", "images")
    gt_cls = _index_of(_column(anns, "category_id", np.int64, "annotation"), cat_ids,
                       "annotations", "categories")
    # VOC "difficult" is the contract's ``ignore``; COCO crowd regions are ignored the same way.
    difficult = np.fromiter(
        (bool(a.get("ignore", 0)) or bool(a.get("iscrowd", 0)) for a in anns),
        dtype=bool, count=len(anns),
    )
    return _Arrays(image_ids, cat_ids, cat_names, gt_img, gt_cls, _boxes(anns, "annotation"),
                   difficult)


# --------------------------------------------------------------------------------------------
# AP from a PR curve (the devkit's voc_ap, vectorised where it matters)


def _voc_ap(rec: np.ndarray, prec: np.ndarray, use_07_metric: bool) -> float:
    """The devkit's ``voc_ap``. ``rec`` must be non-decreasing (it is: cumTP / npos)."""
    if use_07_metric:
        # 11-point: mean over t in np.arange(0., 1.1, 0.1) of max(prec[rec >= t]) (0 if none).
        # The thresholds are the devkit's floats (0.30000000000000004 etc.), on purpose.
        # rec >= t is a suffix of the array, so max(prec[rec >= t]) is a suffix maximum.
        suffix_max = np.maximum.accumulate(prec[::-1])[::-1]
        ap = 0.0
        for t in np.arange(0.0, 1.1, 0.1):
            i = int(np.searchsorted(rec, t, side="left"))
            p = suffix_max[i] if i < len(rec) else 0.0
            ap = ap + p / 11.0
        return float(ap)
    # all-point interpolation (VOC2010+): area under the monotone precision envelope
    mrec = np.concatenate(([0.0], rec, [1.0]))
    mpre = np.concatenate(([0.0], prec, [0.0]))
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    i = np.where(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1]))


# --------------------------------------------------------------------------------------------
# result


@dataclass(frozen=True)
class VOCResult:
    """What ``voc_map`` returns. Per-class dicts are keyed by category id, in id order.

    ``map``: mean of ``ap`` over the classes that have non-difficult ground truth (None if none).
    ``ap[c]``: AP of class ``c``, None when the class has no non-difficult ground truth (then
    ``c`` is listed in ``no_ground_truth`` and left out of the mean).
    ``precision[c]``, ``recall[c]``, ``scores[c]``: the PR curve, one point per detection of the
    class in descending score order (as the devkit's arrays, so detections ignored on difficult
    boxes repeat the previous point); empty arrays for a class without ground truth.
    ``num_gt[c]``: the number of non-difficult boxes (the devkit's ``npos``).
    """

    map: float | None
    ap: dict[int, float | None]
    precision: dict[int, np.ndarray]
    recall: dict[int, np.ndarray]
    scores: dict[int, np.ndarray]
    num_gt: dict[int, int]
    num_detections: dict[int, int]
    category_names: dict[int, str]
    no_ground_truth: tuple[int, ...]
    iou_threshold: float
    use_07_metric: bool
    plus_one: bool

    @property
    def ap_by_name(self) -> dict[str, float | None]:
        """AP keyed by category name."""
        return {self.category_names[c]: ap for c, ap in self.ap.items()}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (no arrays): mAP, settings and one row per class."""
        return {
            "mAP": self.map,
            "iou_threshold": self.iou_threshold,
            "use_07_metric": self.use_07_metric,
            "plus_one": self.plus_one,
            "per_class": [
                {
                    "id": c,
                    "name": self.category_names[c],
                    "ap": self.ap[c],
                    "num_gt": self.num_gt[c],
                    "num_detections": self.num_detections[c],
                    "no_ground_truth": c in self.no_ground_truth,
                }
                for c in self.ap
            ],
        }


# --------------------------------------------------------------------------------------------
# the evaluator


def voc_map(
    ground_truth: GroundTruth,
    detections: Detections,
    iou_threshold: float = 0.5,
    use_07_metric: bool = True,
    *,
    plus_one: bool = False,
) -> VOCResult:
    """PASCAL VOC mean average precision of ``detections`` against ``ground_truth``.

    Args:
        ground_truth: a COCO-format dict or the path of a JSON split file (docs/CONTRACTS.md).
            Objects with ``ignore`` (or ``iscrowd``) set are VOC "difficult": they do not count
            in a class's number of positives, and a detection whose best match is one of them
            is neither a TP nor a FP.
        detections: a list in the COCO results format (``image_id``, ``category_id``,
            ``bbox`` [x, y, w, h] in pixels, ``score``), or the path of such a JSON file.
            Every ``image_id``/``category_id`` must exist in ``ground_truth``.
        iou_threshold: a detection matches when IoU > ``iou_threshold`` (strictly, as the devkit).
        use_07_metric: True for the VOC2007 11-point metric, False for the VOC2010+ area
            (all-point interpolation) metric.
        plus_one: pixel convention of the IoU. False (default): continuous coordinates, a box
            [x, y, w, h] spans [x, x + w] x [y, y + h] and its area is w * h. True: the devkit's
            ``+1`` arithmetic applied to the corners (x, y, x + w, y + h) read as inclusive pixel
            indices, i.e. width x2 - x1 + 1, height y2 - y1 + 1, intersection
            min(x2) - max(x1) + 1 (clamped at 0), exactly as ``voc_eval.py`` on a detection file
            holding those corners. Use it to reproduce devkit numbers for boxes stored as
            w = xmax - xmin. The contract's conversion of VOC boxes (x = xmin - 1,
            w = xmax - xmin + 1) already makes the default give the devkit's IoU for boxes
            converted that way (the +1s cancel), which is why the default is False.

    Returns:
        a :class:`VOCResult`.

    Raises:
        ValueError: unreadable/invalid inputs, unknown image or category ids, non-finite scores,
            an ``iou_threshold`` outside [0, 1].
    """
    if not 0.0 <= float(iou_threshold) <= 1.0:
        raise ValueError(f"iou_threshold must be in [0, 1], got {iou_threshold!r}")
    iou_threshold = float(iou_threshold)
    gt = _ground_truth_arrays(load_ground_truth(ground_truth))
    dets = load_detections(detections)

    n_img, n_cls = len(gt.image_ids), len(gt.cat_ids)
    det_img = _index_of(_column(dets, "image_id", np.int64, "detection"), gt.image_ids,
                        "detections", "images")
    det_cls = _index_of(_column(dets, "category_id", np.int64, "detection"), gt.cat_ids,
                        "detections", "categories")
    det_score = _column(dets, "score", np.float64, "detection")
    if not np.isfinite(det_score).all():
        i = int(np.flatnonzero(~np.isfinite(det_score))[0])
        raise ValueError(f"detection #{i} has a non-finite score {det_score[i]!r}")
    det_box = _boxes(dets, "detection")

    # detections grouped by class, descending score inside a class (stable on ties); two
    # stable argsorts are faster than np.lexsort, and a 16-bit class key gets numpy's radix sort
    order = np.argsort(-det_score, kind="stable")
    cls_key = det_cls[order].astype(np.int16 if n_cls < 2**15 else np.int64)
    order = order[np.argsort(cls_key, kind="stable")]
    d_cls = det_cls[order]
    d_score = det_score[order]
    tp, ignored = _match(gt, det_img[order], d_cls, det_box[order], n_img, iou_threshold, plus_one)
    fp = ~(tp | ignored)

    npos = np.bincount(gt.gt_cls[~gt.gt_difficult], minlength=n_cls)
    bounds = np.searchsorted(d_cls, np.arange(n_cls + 1), side="left")

    ap: dict[int, float | None] = {}
    precision: dict[int, np.ndarray] = {}
    recall: dict[int, np.ndarray] = {}
    scores: dict[int, np.ndarray] = {}
    num_gt: dict[int, int] = {}
    num_det: dict[int, int] = {}
    no_gt: list[int] = []
    for k, cat in enumerate(gt.cat_ids.tolist()):
        a, b = int(bounds[k]), int(bounds[k + 1])
        num_gt[cat] = int(npos[k])
        num_det[cat] = b - a
        if npos[k] == 0:
            ap[cat] = None
            no_gt.append(cat)
            precision[cat] = recall[cat] = scores[cat] = np.zeros(0)
            continue
        ctp = np.cumsum(tp[a:b], dtype=np.float64)
        cfp = np.cumsum(fp[a:b], dtype=np.float64)
        rec = ctp / float(npos[k])
        prec = ctp / np.maximum(ctp + cfp, _EPS)
        ap[cat] = _voc_ap(rec, prec, use_07_metric)
        precision[cat], recall[cat], scores[cat] = prec, rec, d_score[a:b]

    valid = [v for v in ap.values() if v is not None]
    mean = float(np.mean(valid)) if valid else None
    return VOCResult(
        map=mean, ap=ap, precision=precision, recall=recall, scores=scores, num_gt=num_gt,
        num_detections=num_det, category_names={int(c): gt.cat_names[int(c)] for c in gt.cat_ids},
        no_ground_truth=tuple(no_gt), iou_threshold=iou_threshold,
        use_07_metric=bool(use_07_metric), plus_one=bool(plus_one),
    )


def _match(
    gt: _Arrays,
    d_img: np.ndarray,
    d_cls: np.ndarray,
    d_box: np.ndarray,
    n_img: int,
    iou_threshold: float,
    plus_one: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """TP and "ignored" flags of detections already sorted by (class, descending score)."""
    n = len(d_img)
    # GT boxes grouped by (class, image); a stable sort keeps the annotation order inside a
    # group, so "the first box with the highest IoU" is the devkit's np.argmax.
    gkey = gt.gt_cls * n_img + gt.gt_img
    gorder = np.argsort(gkey, kind="stable")
    gkey = gkey[gorder]
    gbox = gt.gt_box[gorder]
    gdiff = gt.gt_difficult[gorder]

    one = 1.0 if plus_one else 0.0
    gx1, gy1 = gbox[:, 0], gbox[:, 1]
    gx2, gy2 = gx1 + gbox[:, 2], gy1 + gbox[:, 3]
    garea = (gx2 - gx1 + one) * (gy2 - gy1 + one)
    dx1, dy1 = np.ascontiguousarray(d_box[:, 0]), np.ascontiguousarray(d_box[:, 1])
    dx2, dy2 = dx1 + d_box[:, 2], dy1 + d_box[:, 3]
    darea = (dx2 - dx1 + one) * (dy2 - dy1 + one)

    dkey = d_cls * n_img + d_img
    start = np.searchsorted(gkey, dkey, side="left")
    count = np.searchsorted(gkey, dkey, side="right") - start

    ovmax = np.full(n, -np.inf)
    jmax = np.full(n, -1, dtype=np.int64)
    # k-th box of each detection's group, for all detections at once: work = sum of group sizes
    for k in range(int(count.max()) if n else 0):
        sel = np.flatnonzero(count > k)
        g = start[sel] + k
        iw = np.minimum(dx2[sel], gx2[g]) - np.maximum(dx1[sel], gx1[g]) + one
        ih = np.minimum(dy2[sel], gy2[g]) - np.maximum(dy1[sel], gy1[g]) + one
        inter = np.maximum(iw, 0.0) * np.maximum(ih, 0.0)
        union = darea[sel] + garea[g] - inter
        # a zero-area union (degenerate boxes) is IoU 0 rather than the devkit's NaN
        iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
        better = iou > ovmax[sel]
        hit = sel[better]
        ovmax[hit] = iou[better]
        jmax[hit] = g[better]

    over = ovmax > iou_threshold
    ignored = over & gdiff[np.where(over, jmax, 0)] if len(gdiff) else np.zeros(n, dtype=bool)
    cand = np.flatnonzero(over & ~ignored)
    # first detection (in score order) on each box is the TP, later ones are duplicates (FP)
    _, first = np.unique(jmax[cand], return_index=True)
    tp = np.zeros(n, dtype=bool)
    tp[cand[first]] = True
    return tp, ignored

