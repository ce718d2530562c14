"""coco_metrics against pycocotools called the plain documented way (JSON files, COCO(path),
loadRes(path), COCOeval) on the same random inputs."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from fssd.evaluation import coco_metrics
from fssd.evaluation.coco import COCO_METRIC_NAMES


def random_set(seed, num_images=40, num_classes=3, ignore_fraction=0.0):
    """Boxes from ~8 px to ~300 px (small, medium and large COCO areas), jittered true
    positives, duplicates, random false positives."""
    rng = np.random.default_rng(seed)
    images = [{"id": i, "file_name": f"{i:06d}.jpg", "width": 640, "height": 480}
              for i in range(1, num_images + 1)]
    anns, dets = [], []
    for img in range(1, num_images + 1):
        for _ in range(rng.integers(0, 6)):
            w, h = np.exp(rng.uniform(np.log(8), np.log(300), 2))
            x, y = rng.uniform(0, 640 - w), rng.uniform(0, 480 - h)
            cat = int(rng.integers(1, num_classes + 1))
            ign = int(rng.random() < ignore_fraction)
            anns.append({"id": len(anns) + 1, "image_id": img, "category_id": cat,
                         "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0, "ignore": ign})
            for _ in range(rng.integers(0, 4)):
                j = rng.normal(0, 0.1, 4)
                dets.append({"image_id": img,
                             "category_id": cat if rng.random() < 0.85 else
                             int(rng.integers(1, num_classes + 1)),
                             "bbox": [x + j[0] * w, y + j[1] * h, w * np.exp(j[2]),
                                      h * np.exp(j[3])],
                             "score": float(rng.random())})
        for _ in range(rng.integers(0, 8)):
            w, h = np.exp(rng.uniform(np.log(8), np.log(300), 2))
            dets.append({"image_id": img, "category_id": int(rng.integers(1, num_classes + 1)),
                         "bbox": [rng.uniform(0, 640 - w), rng.uniform(0, 480 - h), w, h],
                         "score": float(rng.random() * 0.5)})
    for d in dets:
        d["bbox"] = [float(v) for v in d["bbox"]]
    for a in anns:
        a["bbox"] = [float(v) for v in a["bbox"]]
        a["area"] = float(a["area"])
    gt = {"images": images, "annotations": anns,
          "categories": [{"id": k, "name": f"c{k}", "supercategory": "x"}
                         for k in range(1, num_classes + 1)]}
    return gt, dets


def pycocotools_stats(tmp_path, gt, dets):
    """The documented way: files on disk, COCO(path), loadRes(path), evaluate/accumulate/summarize."""
    gt_path, det_path = tmp_path / "gt.json", tmp_path / "dets.json"
    gt_path.write_text(json.dumps(gt))
    det_path.write_text(json.dumps(dets))
    coco_gt = COCO(str(gt_path))
    coco_dt = coco_gt.loadRes(str(det_path))
    ev = COCOeval(coco_gt, coco_dt, "bbox")
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    return dict(zip(COCO_METRIC_NAMES, (float(v) for v in ev.stats)))


@pytest.mark.parametrize("seed", [0, 1])
def test_equal_to_pycocotools_called_directly(tmp_path, seed):
    gt, dets = random_set(seed)
    ours = coco_metrics(gt, dets)
    assert list(ours) == list(COCO_METRIC_NAMES)
    assert ours == pycocotools_stats(tmp_path, gt, dets)
    assert 0.05 < ours["AP"] < 0.95 and ours["APs"] >= 0 and ours["APl"] >= 0


def test_ignore_objects_are_evaluated_as_crowd(tmp_path):
    gt, dets = random_set(3, ignore_fraction=0.3)
    assert any(a["ignore"] for a in gt["annotations"])
    ours = coco_metrics(gt, dets)
    # the documented mapping: ignore -> iscrowd = 1, then plain pycocotools
    as_crowd = copy.deepcopy(gt)
    for a in as_crowd["annotations"]:
        a["iscrowd"] = a["ignore"]
    assert ours == pycocotools_stats(tmp_path, as_crowd, dets)
    # and it matters: pycocotools alone would count the ignored objects as positives
    assert ours != pycocotools_stats(tmp_path, gt, dets)


def test_json_paths_missing_area_and_no_mutation(tmp_path, capsys):
    gt, dets = random_set(4)
    gt_copy, dets_copy = copy.deepcopy(gt), copy.deepcopy(dets)
    expected = pycocotools_stats(tmp_path, gt, dets)
    capsys.readouterr()
    # no temp files, nothing printed, inputs untouched
    assert coco_metrics(gt, dets) == expected
    assert capsys.readouterr().out == ""
    assert gt == gt_copy and dets == dets_copy
    # paths, and ground truth without "area" (filled in as w*h)
    no_area = copy.deepcopy(gt)
    for a in no_area["annotations"]:
        del a["area"]
    p_gt, p_det = tmp_path / "g.json", tmp_path / "d.json"
    p_gt.write_text(json.dumps(no_area))
    p_det.write_text(json.dumps(dets))
    assert coco_metrics(p_gt, str(p_det)) == expected


def test_verbose_prints_the_summary(capsys):
    gt, dets = random_set(5, num_images=5)
    coco_metrics(gt, dets, verbose=True)
    assert "Average Precision" in capsys.readouterr().out


def test_empty_detections_give_zeros():
    gt, _ = random_set(6, num_images=5)
    assert coco_metrics(gt, []) == {name: 0.0 for name in COCO_METRIC_NAMES}


def test_unknown_ids_raise_value_error():
    gt, dets = random_set(7, num_images=5)
    with pytest.raises(ValueError, match="images not in the ground truth"):
        coco_metrics(gt, dets + [dict(dets[0], image_id=999)])
    with pytest.raises(ValueError, match="categories not in the ground truth"):
        coco_metrics(gt, dets + [dict(dets[0], category_id=999)])
    with pytest.raises(ValueError, match="'annotations'"):
        coco_metrics({"images": [], "categories": []}, dets)
    with pytest.raises(ValueError, match="missing key 'image_id'"):
        coco_metrics(gt, [{"category_id": 1, "bbox": [0, 0, 1, 1], "score": 0.5}])
