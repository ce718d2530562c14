"""voc_map: hand-worked PR curves and APs, the devkit's rules, and a cross-check against a
straightforward port of the devkit's voc_eval.py (written here, per-class loop)."""

from __future__ import annotations

import json
from collections import defaultdict

import numpy as np
import pytest

from fssd.evaluation import VOCResult, voc_map

# ------------------------------------------------------------------------------------------------
# helpers


def make_gt(objects, num_images=3, categories=("cat", "dog")):
    """objects: (image_id, category_id, [x, y, w, h], ignore)."""
    return {
        "images": [{"id": i, "file_name": f"{i:06d}.jpg", "width": 100, "height": 100}
                   for i in range(1, num_images + 1)],
        "annotations": [
            {"id": k + 1, "image_id": img, "category_id": cat, "bbox": list(box),
             "area": box[2] * box[3], "iscrowd": 0, "ignore": ign}
            for k, (img, cat, box, ign) in enumerate(objects)
        ],
        "categories": [{"id": k + 1, "name": n, "supercategory": "animal"}
                       for k, n in enumerate(categories)],
    }


def det(image_id, box, score, category_id=1):
    return {"image_id": image_id, "category_id": category_id, "bbox": list(box), "score": score}


# ------------------------------------------------------------------------------------------------
# the hand-worked case: 1 class with ground truth ("cat"), 3 images, 4 GT, 6 detections

HAND_GT = make_gt([
    (1, 1, [0, 0, 10, 10], 0),     # A
    (1, 1, [50, 50, 10, 10], 0),   # B
    (2, 1, [0, 0, 20, 20], 0),     # C
    (3, 1, [30, 30, 10, 10], 0),   # D (never found)
])
HAND_DETS = [
    det(1, [0, 0, 10, 10], 0.9),    # d1: A, IoU 1                                -> TP
    det(1, [1, 0, 10, 10], 0.8),    # d2: A again, IoU 90/110 = 0.82, A taken     -> FP (dup)
    det(2, [0, 0, 20, 20], 0.7),    # d3: C, IoU 1                                -> TP
    det(3, [60, 60, 10, 10], 0.6),  # d4: no overlap with D, IoU 0                -> FP
    det(1, [50, 50, 10, 10], 0.5),  # d5: B, IoU 1                                -> TP
    det(2, [80, 80, 10, 10], 0.4),  # d6: nothing there                           -> FP
]
# score order d1..d6: TP FP TP FP TP FP, npos = 4
#   cum TP    : 1    1    2    2    3    3
#   cum FP    : 0    1    1    2    2    3
#   recall    : 1/4  1/4  2/4  2/4  3/4  3/4   = .25 .25 .5 .5 .75 .75
#   precision : 1/1  1/2  2/3  2/4  3/5  3/6   = 1 .5 .6667 .5 .6 .5
HAND_RECALL = [0.25, 0.25, 0.5, 0.5, 0.75, 0.75]
HAND_PRECISION = [1.0, 0.5, 2 / 3, 0.5, 0.6, 0.5]
# VOC07 11-point: p(t) = max precision over points with recall >= t (0 if none)
#   t = 0, .1, .2      : all points            -> max = 1        (3 thresholds)
#   t = .3, .4, .5     : recall .5 and .75     -> max(2/3, .5, .6, .5) = 2/3   (3 thresholds)
#   t = .6, .7         : recall .75            -> max(.6, .5) = .6              (2 thresholds)
#   t = .8, .9, 1.0    : none                  -> 0                             (3 thresholds)
#   AP07 = (3 * 1 + 3 * 2/3 + 2 * .6 + 3 * 0) / 11 = 6.2 / 11 = 0.563636...
HAND_AP07 = 6.2 / 11
# area (all-point): precision envelope (max to the right) at each recall step
#   recall 0   -> .25 : envelope 1        (d1)          0.25 * 1
#   recall .25 -> .5  : envelope 2/3      (d3)          0.25 * 2/3
#   recall .5  -> .75 : envelope .6       (d5)          0.25 * .6
#   recall .75 -> 1   : envelope 0        (never reached) 0.25 * 0
#   AP = .25 + .1666... + .15 = 0.566666...
HAND_AP_AREA = 0.25 * 1 + 0.25 * (2 / 3) + 0.25 * 0.6


def test_hand_worked_pr_curve_and_11_point_ap():
    r = voc_map(HAND_GT, HAND_DETS, 0.5, use_07_metric=True)
    assert isinstance(r, VOCResult)
    np.testing.assert_allclose(r.recall[1], HAND_RECALL, rtol=0, atol=1e-15)
    np.testing.assert_allclose(r.precision[1], HAND_PRECISION, rtol=0, atol=1e-15)
    np.testing.assert_array_equal(r.scores[1], [0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    assert r.ap[1] == pytest.approx(HAND_AP07, abs=1e-12)
    assert r.num_gt == {1: 4, 2: 0}
    assert r.num_detections == {1: 6, 2: 0}
    # "dog" has no ground truth: reported, left out of the mean
    assert r.ap[2] is None and r.no_ground_truth == (2,)
    assert r.map == pytest.approx(HAND_AP07, abs=1e-12)
    assert r.ap_by_name == {"cat": r.ap[1], "dog": None}


def test_hand_worked_area_ap():
    r = voc_map(HAND_GT, HAND_DETS, use_07_metric=False)
    assert r.ap[1] == pytest.approx(HAND_AP_AREA, abs=1e-12)
    assert r.map == pytest.approx(HAND_AP_AREA, abs=1e-12)


def test_input_order_and_json_paths_do_not_matter(tmp_path):
    gt_path = tmp_path / "test.json"
    gt_path.write_text(json.dumps(HAND_GT))
    det_path = tmp_path / "dets.json"
    det_path.write_text(json.dumps(HAND_DETS[::-1]))
    r = voc_map(str(gt_path), det_path)
    assert r.ap[1] == pytest.approx(HAND_AP07, abs=1e-12)


def test_perfect_and_empty_detections():
    perfect = [det(a["image_id"], a["bbox"], 1.0) for a in HAND_GT["annotations"]]
    for use07 in (True, False):
        assert voc_map(HAND_GT, perfect, use_07_metric=use07).map == pytest.approx(1.0)
        r = voc_map(HAND_GT, [], use_07_metric=use07)
        assert r.ap == {1: 0.0, 2: None} and r.map == 0.0
        assert r.precision[1].size == 0 and r.recall[1].size == 0


# ------------------------------------------------------------------------------------------------
# the devkit's rules


def test_difficult_ground_truth_is_neither_tp_nor_fp():
    gt = make_gt([
        (1, 1, [0, 0, 10, 10], 0),    # A, normal
        (1, 1, [40, 40, 10, 10], 1),  # B, difficult
    ])
    dets = [
        det(1, [40, 40, 10, 10], 0.9),  # on B (difficult)           -> ignored
        det(1, [41, 40, 10, 10], 0.8),  # on B again: still ignored (not a duplicate FP)
        det(1, [0, 0, 10, 10], 0.7),    # on A                        -> TP
    ]
    r = voc_map(gt, dets)
    # npos = 1 (B does not count); TP flags 0 0 1, FP flags 0 0 0
    #   cum TP 0 0 1, cum FP 0 0 0 -> recall 0 0 1, precision 0/eps=0 0 1
    assert r.num_gt[1] == 1
    np.testing.assert_array_equal(r.recall[1], [0.0, 0.0, 1.0])
    np.testing.assert_array_equal(r.precision[1], [0.0, 0.0, 1.0])
    assert r.ap[1] == pytest.approx(1.0)
    assert voc_map(gt, dets, use_07_metric=False).ap[1] == pytest.approx(1.0)


def test_difficult_best_match_wins_over_a_normal_box_as_in_the_devkit():
    # the detection overlaps the normal box A with IoU 0.6 and the difficult box B with IoU 1:
    # the devkit takes the best box (B) and ignores the detection; A stays undetected
    gt = make_gt([(1, 1, [0, 0, 10, 10], 0), (1, 1, [4, 0, 10, 10], 1)])
    r = voc_map(gt, [det(1, [4, 0, 10, 10], 0.9)])
    np.testing.assert_array_equal(r.recall[1], [0.0])
    assert r.ap[1] == 0.0


def test_detection_near_a_difficult_box_below_threshold_is_fp():
    gt = make_gt([(1, 1, [0, 0, 10, 10], 0), (1, 1, [50, 50, 10, 10], 1)])
    r = voc_map(gt, [det(1, [55, 55, 10, 10], 0.9), det(1, [0, 0, 10, 10], 0.8)])
    # IoU with B = 25/175 < .5 -> FP; then TP on A: precision 0, 1/2; recall 0, 1
    np.testing.assert_array_equal(r.precision[1], [0.0, 0.5])
    # 11-point: every t has recall point 1 with precision .5 -> AP .5
    assert r.ap[1] == pytest.approx(0.5)


def test_class_with_only_difficult_ground_truth_is_reported_and_excluded():
    gt = make_gt([(1, 1, [0, 0, 10, 10], 0), (2, 2, [0, 0, 10, 10], 1)],
                 categories=("cat", "dog", "bird"))
    dets = [det(1, [0, 0, 10, 10], 0.9, 1), det(2, [0, 0, 10, 10], 0.9, 2),
            det(2, [50, 50, 10, 10], 0.8, 3)]
    r = voc_map(gt, dets)
    assert r.ap == {1: pytest.approx(1.0), 2: None, 3: None}
    assert r.no_ground_truth == (2, 3)
    assert r.num_gt == {1: 1, 2: 0, 3: 0}
    assert r.num_detections == {1: 1, 2: 1, 3: 1}
    assert r.map == pytest.approx(1.0)  # mean over "cat" only
    row = {c["name"]: c for c in r.to_dict()["per_class"]}
    assert row["dog"]["no_ground_truth"] and row["dog"]["ap"] is None
    json.dumps(r.to_dict())  # JSON-ready


def test_no_class_has_ground_truth():
    r = voc_map(make_gt([]), [det(1, [0, 0, 5, 5], 0.5)])
    assert r.map is None and r.no_ground_truth == (1, 2)


def test_duplicates_of_one_object_are_one_tp_and_the_rest_fp():
    gt = make_gt([(1, 1, [10, 10, 20, 20], 0), (2, 1, [0, 0, 10, 10], 0)])
    dets = [det(1, [10, 10, 20, 20], 0.9), det(1, [11, 10, 20, 20], 0.8),
            det(1, [10, 11, 20, 20], 0.7)]
    r = voc_map(gt, dets)
    # TP FP FP, npos 2: precision 1, 1/2, 1/3; recall .5 .5 .5
    np.testing.assert_allclose(r.precision[1], [1.0, 0.5, 1 / 3])
    np.testing.assert_allclose(r.recall[1], [0.5, 0.5, 0.5])
    # 11-point: t = 0 .. .5 (6 thresholds) -> 1, the other 5 -> 0: AP = 6/11
    assert r.ap[1] == pytest.approx(6 / 11)


def test_each_detection_takes_its_best_box_even_if_already_detected():
    # the devkit does not fall back to the second-best box: d2's best box A is taken -> FP,
    # although it overlaps B (undetected) with IoU > .5 too
    gt = make_gt([(1, 1, [0, 0, 10, 10], 0), (1, 1, [2, 0, 10, 10], 0)])
    dets = [det(1, [0, 0, 10, 10], 0.9), det(1, [0.5, 0, 10, 10], 0.8)]
    # d2: IoU with A = 95/105 = .905, with B = 85/115 = .739 -> best A (taken) -> FP
    r = voc_map(gt, dets)
    np.testing.assert_allclose(r.precision[1], [1.0, 0.5])


def test_threshold_is_strict_and_plus_one_changes_iou_like_the_devkit():
    gt = make_gt([(1, 1, [0, 0, 10, 10], 0)])
    dets = [det(1, [0, 0, 10, 5], 0.9)]
    # continuous: inter 10*5 = 50, union 100 + 50 - 50 = 100 -> IoU 0.5, not > 0.5 -> FP
    assert voc_map(gt, dets).ap[1] == 0.0
    assert voc_map(gt, dets, iou_threshold=0.49).ap[1] == pytest.approx(1.0)
    # plus_one: corners (0,0,10,10) and (0,0,10,5) inclusive: areas 11*11 = 121 and 11*6 = 66,
    # intersection (10-0+1)*(5-0+1) = 66 -> IoU 66/121 = 0.545 > 0.5 -> TP
    r = voc_map(gt, dets, plus_one=True)
    assert r.plus_one and r.ap[1] == pytest.approx(1.0)
    # and the other way: boxes touching in one pixel column overlap only with +1
    #   det [10,0,10,10] vs gt [0,0,10,10]: continuous inter 0; plus_one inter 1*11 = 11,
    #   union 121+121-11 = 231 -> IoU 0.0476 (> 0.04)
    d2 = [det(1, [10, 0, 10, 10], 0.9)]
    assert voc_map(gt, d2, iou_threshold=0.04).ap[1] == 0.0
    assert voc_map(gt, d2, iou_threshold=0.04, plus_one=True).ap[1] == pytest.approx(1.0)


def test_11_point_thresholds_are_the_devkits_floats():
    # np.arange(0., 1.1, 0.1)[3] == 0.30000000000000004 > 3/10: a recall of exactly 0.3 does not
    # reach the 0.3 threshold in voc_eval.py. 10 GT, 3 found at precision 1, nothing else:
    #   t = 0, .1, .2 -> 1; t = .3 ... 1 -> 0 (recall 0.3 < 0.30000000000000004): AP = 3/11
    gt = make_gt([(1, 1, [10 * k, 0, 5, 5], 0) for k in range(10)], num_images=1)
    dets = [det(1, [10 * k, 0, 5, 5], 0.9 - k / 10) for k in range(3)]
    assert voc_map(gt, dets).ap[1] == pytest.approx(3 / 11)


def test_ties_in_score_keep_input_order():
    gt = make_gt([(1, 1, [0, 0, 10, 10], 0)])
    a, b = det(1, [0, 0, 10, 10], 0.5), det(1, [50, 50, 10, 10], 0.5)
    np.testing.assert_array_equal(voc_map(gt, [a, b]).precision[1], [1.0, 0.5])
    np.testing.assert_array_equal(voc_map(gt, [b, a]).precision[1], [0.0, 0.5])


def test_inputs_are_not_modified():
    gt = json.loads(json.dumps(HAND_GT))
    dets = json.loads(json.dumps(HAND_DETS))
    voc_map(gt, dets)
    assert gt == HAND_GT and dets == HAND_DETS


@pytest.mark.parametrize(
    "dets, match",
    [
        ([det(99, [0, 0, 1, 1], 0.5)], "images not in the ground truth"),
        ([det(1, [0, 0, 1, 1], 0.5, category_id=7)], "categories not in the ground truth"),
        ([det(1, [0, 0, 1], 0.5)], "bbox"),
        ([det(1, [0, 0, 1, 1], float("nan"))], "non-finite score"),
        ([{"image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1]}], "score"),
        ({"image_id": 1}, "list"),
    ],
)
def test_bad_detections_raise_value_error(dets, match):
    with pytest.raises(ValueError, match=match):
        voc_map(HAND_GT, dets)


def test_bad_ground_truth_raises_value_error(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        voc_map(tmp_path / "missing.json", [])
    with pytest.raises(ValueError, match="'categories'"):
        voc_map({"images": [], "annotations": []}, [])
    with pytest.raises(ValueError, match="iou_threshold"):
        voc_map(HAND_GT, [], iou_threshold=1.5)


# ------------------------------------------------------------------------------------------------
# cross-check against a straightforward port of py-faster-rcnn's voc_eval.py


def devkit_voc_ap(rec, prec, use_07_metric):
    """voc_eval.py's voc_ap, verbatim."""
    if use_07_metric:
        ap = 0.0
        for t in np.arange(0.0, 1.1, 0.1):
            if np.sum(rec >= t) == 0:
                p = 0
            else:
                p = np.max(prec[rec >= t])
            ap = ap + p / 11.0
    else:
        mrec = np.concatenate(([0.0], rec, [1.0]))
        mpre = np.concatenate(([0.0], prec, [0.0]))
        for i in range(mpre.size - 1, 0, -1):
            mpre[i - 1] = np.maximum(mpre[i - 1], mpre[i])
        i = np.where(mrec[1:] != mrec[:-1])[0]
        ap = np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1])
    return ap


def devkit_voc_eval(gt, dets, category_id, ovthresh, use_07_metric, plus_one):
    """voc_eval.py for one class, reading boxes as corners (x, y, x + w, y + h); the +1 of the
    devkit is ``one`` (1.0 with plus_one, 0.0 otherwise). Returns (rec, prec, ap) or None when
    npos == 0 (the devkit would divide by zero)."""
    one = 1.0 if plus_one else 0.0
    by_image = defaultdict(list)
    for a in gt["annotations"]:
        if a["category_id"] == category_id:
            by_image[a["image_id"]].append(a)
    class_recs = {}
    npos = 0
    for img in gt["images"]:
        R = by_image[img["id"]]
        bbox = np.array([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in R)])
        bbox = bbox.reshape(-1, 4)
        difficult = np.array([a["ignore"] for a in R]).astype(bool)
        det = [False] * len(R)
        npos = npos + sum(~difficult)
        class_recs[img["id"]] = {"bbox": bbox, "difficult": difficult, "det": det}

    lines = [d for d in dets if d["category_id"] == category_id]
    image_ids = [d["image_id"] for d in lines]
    confidence = np.array([d["score"] for d in lines], dtype=float)
    BB = np.array([[x, y, x + w, y + h] for x, y, w, h in (d["bbox"] for d in lines)],
                  dtype=float).reshape(-1, 4)
    # the devkit's np.argsort(-confidence), made stable so that ties are reproducible
    sorted_ind = np.argsort(-confidence, kind="stable")
    BB = BB[sorted_ind, :]
    image_ids = [image_ids[x] for x in sorted_ind]

    nd = len(image_ids)
    tp = np.zeros(nd)
    fp = np.zeros(nd)
    for d in range(nd):
        R = class_recs[image_ids[d]]
        bb = BB[d, :].astype(float)
        ovmax = -np.inf
        BBGT = R["bbox"].astype(float)
        if BBGT.size > 0:
            ixmin = np.maximum(BBGT[:, 0], bb[0])
            iymin = np.maximum(BBGT[:, 1], bb[1])
            ixmax = np.minimum(BBGT[:, 2], bb[2])
            iymax = np.minimum(BBGT[:, 3], bb[3])
            iw = np.maximum(ixmax - ixmin + one, 0.0)
            ih = np.maximum(iymax - iymin + one, 0.0)
            inters = iw * ih
            uni = ((bb[2] - bb[0] + one) * (bb[3] - bb[1] + one)
                   + (BBGT[:, 2] - BBGT[:, 0] + one) * (BBGT[:, 3] - BBGT[:, 1] + one)
                   - inters)
            overlaps = inters / uni
            ovmax = np.max(overlaps)
            jmax = np.argmax(overlaps)
        if ovmax > ovthresh:
            if not R["difficult"][jmax]:
                if not R["det"][jmax]:
                    tp[d] = 1.0
                    R["det"][jmax] = 1
                else:
                    fp[d] = 1.0
        else:
            fp[d] = 1.0
    if npos == 0:
        return None
    fp = np.cumsum(fp)
    tp = np.cumsum(tp)
    rec = tp / float(npos)
    prec = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    return rec, prec, devkit_voc_ap(rec, prec, use_07_metric)


def random_set(seed, num_images=50, num_classes=4):
    """Integer-ish boxes (so that IoU ties and exact-threshold cases happen), some difficult
    objects, duplicated GT boxes, jittered/duplicate/random detections, scores with ties; the
    last class has no ground truth."""
    rng = np.random.default_rng(seed)
    objects = []
    for img in range(1, num_images + 1):
        for _ in range(rng.integers(0, 5)):
            w, h = rng.integers(4, 40, 2)
            x, y = rng.integers(0, 60, 2)
            cat = int(rng.integers(1, num_classes))  # never the last class
            objects.append((img, cat, [float(x), float(y), float(w), float(h)],
                            int(rng.random() < 0.2)))
            if rng.random() < 0.05:  # the same box twice
                objects.append((img, cat, [float(x), float(y), float(w), float(h)], 0))
    gt = make_gt(objects, num_images, categories=tuple(f"c{k}" for k in range(num_classes)))
    dets = []
    for img, cat, (x, y, w, h), _ in objects:
        for _ in range(rng.integers(0, 4)):
            dx, dy, dw, dh = rng.integers(-3, 4, 4) * rng.random() * 2
            c = cat if rng.random() < 0.8 else int(rng.integers(1, num_classes + 1))
            dets.append(det(img, [x + dx, y + dy, max(w + dw, 1.0), max(h + dh, 1.0)],
                            float(np.round(rng.random(), 2)), c))
    for _ in range(num_images * 6):
        x, y = rng.integers(0, 80, 2)
        w, h = rng.integers(2, 40, 2)
        dets.append(det(int(rng.integers(1, num_images + 1)),
                        [float(x), float(y), float(w), float(h)],
                        float(np.round(rng.random(), 2)), int(rng.integers(1, num_classes + 1))))
    order = rng.permutation(len(dets))
    return gt, [dets[i] for i in order]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("use_07_metric", [True, False])
@pytest.mark.parametrize("plus_one", [False, True])
@pytest.mark.parametrize("iou_threshold", [0.5, 0.7])
def test_identical_to_devkit_port(seed, use_07_metric, plus_one, iou_threshold):
    gt, dets = random_set(seed)
    r = voc_map(gt, dets, iou_threshold, use_07_metric, plus_one=plus_one)
    aps = []
    for cat in (c["id"] for c in gt["categories"]):
        ref = devkit_voc_eval(gt, dets, cat, iou_threshold, use_07_metric, plus_one)
        if ref is None:
            assert r.ap[cat] is None and cat in r.no_ground_truth
            continue
        rec, prec, ap = ref
        assert r.ap[cat] == ap  # identical, not approximately equal
        np.testing.assert_array_equal(r.recall[cat], rec)
        np.testing.assert_array_equal(r.precision[cat], prec)
        aps.append(ap)
    assert r.no_ground_truth == (4,)
    assert r.map == np.mean(aps)
    assert 0.0 < r.map < 1.0
