"""Benchmark: detection evaluation on a VOC07-test-sized synthetic set.

4,952 images, 20 classes, ~2.4 ground-truth objects per image (~17 % difficult) and 300
detections per image (~1.49 M). Timed in one run, each from the same in-memory inputs (a COCO
dict and a list of COCO-results dicts, parsing included):

* ``voc_map`` (VOC07 11-point and VOC2010+ area),
* a naive port of the devkit's ``voc_eval.py`` (per-class, per-detection Python loop) -- the
  peer of ``voc_map``; when its estimated time is too long it runs on a subset of the images and
  the table says so (and extrapolates linearly),
* ``coco_metrics`` and pycocotools' ``COCO``/``COCOeval`` called directly (JSON files written to
  a temporary directory, ``COCO(path).loadRes(path)``) -- the peer of ``coco_metrics``.

Run: ``python bench/bench_eval.py [--images 4952] [--dets-per-image 300] [--devkit-budget 120]``
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import tempfile
import time
from collections import defaultdict

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from fssd.evaluation import coco_metrics, voc_map  # noqa: E402

NUM_CLASSES = 20


def make_dataset(num_images: int, dets_per_image: int, seed: int = 0):
    """A COCO-format dict and COCO-results detections resembling an SSD run on VOC07 test."""
    rng = np.random.default_rng(seed)
    width, height = 500.0, 375.0
    n_gt = rng.poisson(1.4, num_images) + 1  # mean ~2.4
    images = [{"id": i + 1, "file_name": f"{i + 1:06d}.jpg", "width": 500, "height": 375}
              for i in range(num_images)]
    g_img = np.repeat(np.arange(1, num_images + 1), n_gt)
    G = len(g_img)
    g_w = rng.uniform(20, 300, G)
    g_h = rng.uniform(20, 250, G)
    g_x = rng.uniform(0, 1, G) * (width - g_w)
    g_y = rng.uniform(0, 1, G) * (height - g_h)
    g_cls = rng.integers(1, NUM_CLASSES + 1, G)
    g_diff = rng.random(G) < 0.17
    annotations = [
        {"id": k + 1, "image_id": int(g_img[k]), "category_id": int(g_cls[k]),
         "bbox": [float(g_x[k]), float(g_y[k]), float(g_w[k]), float(g_h[k])],
         "area": float(g_w[k] * g_h[k]), "iscrowd": 0, "ignore": int(g_diff[k])}
        for k in range(G)
    ]
    categories = [{"id": c, "name": f"class{c:02d}", "supercategory": "object"}
                  for c in range(1, NUM_CLASSES + 1)]

    # detections: per GT object 1..6 jittered boxes (mostly the right class, high scores),
    # the rest of the 300 per image random boxes of random classes with low scores
    per_obj = rng.integers(1, 7, G)
    src = np.repeat(np.arange(G), per_obj)
    near_img = g_img[src]
    jit = rng.normal(0, 0.12, (len(src), 4))
    nx = g_x[src] + jit[:, 0] * g_w[src]
    ny = g_y[src] + jit[:, 1] * g_h[src]
    nw = g_w[src] * np.exp(jit[:, 2])
    nh = g_h[src] * np.exp(jit[:, 3])
    ncls = np.where(rng.random(len(src)) < 0.85, g_cls[src],
                    rng.integers(1, NUM_CLASSES + 1, len(src)))
    nscore = rng.beta(5, 2, len(src))
    near_count = np.bincount(near_img, minlength=num_images + 1)[1:]
    n_rand = np.maximum(dets_per_image - near_count, 0)
    r_img = np.repeat(np.arange(1, num_images + 1), n_rand)
    R = len(r_img)
    rw = rng.uniform(10, 400, R)
    rh = rng.uniform(10, 300, R)
    rx = rng.uniform(0, 1, R) * (width - rw)
    ry = rng.uniform(0, 1, R) * np.maximum(height - rh, 0)
    rcls = rng.integers(1, NUM_CLASSES + 1, R)
    rscore = rng.beta(1, 8, R)

    img = np.concatenate([near_img, r_img])
    cls = np.concatenate([ncls, rcls])
    box = np.stack([np.concatenate(a) for a in ((nx, rx), (ny, ry), (nw, rw), (nh, rh))], 1)
    score = np.concatenate([nscore, rscore])
    detections = [
        {"image_id": i, "category_id": c, "bbox": b, "score": s}
        for i, c, b, s in zip(img.tolist(), cls.tolist(), box.tolist(), score.tolist())
    ]
    gt = {"images": images, "annotations": annotations, "categories": categories}
    return gt, detections


# ----------------------------------------------------------------------------------------------
# the peer: a straightforward port of py-faster-rcnn's voc_eval.py (per class, per detection)


def devkit_voc_ap(rec, prec, use_07_metric=True):
    if use_07_metric:
        ap = 0.0
        for t in np.arange(0.0, 1.1, 0.1):
            p = 0 if np.sum(rec >= t) == 0 else np.max(prec[rec >= t])
            ap = ap + p / 11.0
        return ap
    mrec = np.concatenate(([0.0], rec, [1.0]))
    mpre = np.concatenate(([0.0], prec, [0.0]))
    for i in range(mpre.size - 1, 0, -1):
        mpre[i - 1] = np.maximum(mpre[i - 1], mpre[i])
    i = np.where(mrec[1:] != mrec[:-1])[0]
    return np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1])


def devkit_voc_eval(recs, dets_by_class, classname, ovthresh=0.5, use_07_metric=True):
    """``recs``: image id -> list of objects {name, bbox [x1,y1,x2,y2], difficult};
    ``dets_by_class``: class -> list of (image_id, score, x1, y1, x2, y2) -- the devkit's file."""
    class_recs = {}
    npos = 0
    for imagename, objs in recs.items():
        R = [obj for obj in objs if obj["name"] == classname]
        bbox = np.array([x["bbox"] for x in R]).reshape(-1, 4)
        difficult = np.array([x["difficult"] for x in R]).astype(bool)
        det = [False] * len(R)
        npos = npos + sum(~difficult)
        class_recs[imagename] = {"bbox": bbox, "difficult": difficult, "det": det}
    lines = dets_by_class.get(classname, [])
    image_ids = [x[0] for x in lines]
    confidence = np.array([x[1] for x in lines], dtype=float)
    BB = np.array([x[2:] for x in lines], dtype=float).reshape(-1, 4)
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
            iw = np.maximum(ixmax - ixmin, 0.0)
            ih = np.maximum(iymax - iymin, 0.0)
            inters = iw * ih
            uni = ((bb[2] - bb[0]) * (bb[3] - bb[1])
                   + (BBGT[:, 2] - BBGT[:, 0]) * (BBGT[:, 3] - BBGT[:, 1]) - inters)
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
    fp = np.cumsum(fp)
    tp = np.cumsum(tp)
    rec = tp / float(npos)
    prec = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    return devkit_voc_ap(rec, prec, use_07_metric)


def devkit_map(gt, detections, use_07_metric=True):
    """The devkit's inputs built from the COCO dicts (continuous corners), then the class loop."""
    names = {c["id"]: c["name"] for c in gt["categories"]}
    recs = {img["id"]: [] for img in gt["images"]}
    for a in gt["annotations"]:
        x, y, w, h = a["bbox"]
        recs[a["image_id"]].append({"name": names[a["category_id"]], "bbox": [x, y, x + w, y + h],
                                    "difficult": bool(a.get("ignore", 0))})
    dets_by_class = defaultdict(list)
    for d in detections:
        x, y, w, h = d["bbox"]
        dets_by_class[names[d["category_id"]]].append(
            (d["image_id"], d["score"], x, y, x + w, y + h))
    aps = [devkit_voc_eval(recs, dets_by_class, names[c], 0.5, use_07_metric)
           for c in sorted(names)]
    return float(np.mean(aps))


def subset(gt, detections, num_images):
    keep = {img["id"] for img in gt["images"][:num_images]}
    sub = {"images": gt["images"][:num_images],
           "annotations": [a for a in gt["annotations"] if a["image_id"] in keep],
           "categories": gt["categories"]}
    return sub, [d for d in detections if d["image_id"] in keep]


def pycocotools_direct(gt_path, det_path):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(gt_path)
        coco_dt = coco_gt.loadRes(det_path)
        ev = COCOeval(coco_gt, coco_dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats


def timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - t0, out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=4952)
    ap.add_argument("--dets-per-image", type=int, default=300)
    ap.add_argument("--devkit-budget", type=float, default=120.0,
                    help="seconds the naive devkit port may take before it runs on a subset")
    ap.add_argument("--repeat", type=int, default=3, help="voc_map runs (the best is shown)")
    ap.add_argument("--skip-coco", action="store_true", help="skip the two pycocotools rows")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    gt, dets = make_dataset(args.images, args.dets_per_image)
    n_diff = sum(a["ignore"] for a in gt["annotations"])
    print(f"data: {len(gt['images'])} images, {len(gt['annotations'])} GT objects "
          f"({n_diff} difficult), {len(dets)} detections, {NUM_CLASSES} classes "
          f"(built in {time.perf_counter() - t0:.1f} s)")

    rows = []  # (method, seconds, peer_name, note)
    # voc_map is cheap: best of --repeat runs; the peers run once
    t07, r07 = min((timed(voc_map, gt, dets, 0.5, True) for _ in range(args.repeat)),
                   key=lambda x: x[0])
    tarea, rarea = min((timed(voc_map, gt, dets, 0.5, False) for _ in range(args.repeat)),
                       key=lambda x: x[0])
    print(f"voc_map: mAP07 = {r07.map:.6f}, mAP(area) = {rarea.map:.6f}")

    # naive devkit port: estimate from a small subset, run in full if it fits the budget
    probe_n = max(1, min(args.images, 200))
    t_probe, _ = timed(devkit_map, *subset(gt, dets, probe_n))
    estimate = t_probe * args.images / probe_n
    if estimate <= args.devkit_budget:
        n_dev = args.images
        t_dev, map_dev = timed(devkit_map, gt, dets)
        dev_note = ""
        diff = abs(map_dev - r07.map)
        print(f"devkit port: mAP07 = {map_dev:.6f} (|diff| to voc_map = {diff:.2e})")
    else:
        n_dev = max(1, int(args.images * args.devkit_budget / estimate / 2))
        sub_gt, sub_dets = subset(gt, dets, n_dev)
        t_sub, map_dev = timed(devkit_map, sub_gt, sub_dets)
        ours_sub = voc_map(sub_gt, sub_dets).map
        t_dev = t_sub * args.images / n_dev
        dev_note = f"extrapolated from {n_dev} images ({t_sub:.1f} s)"
        print(f"devkit port on {n_dev} images: mAP07 = {map_dev:.6f} "
              f"(|diff| to voc_map on that subset = {abs(map_dev - ours_sub):.2e})")

    rows.append(("voc_map (VOC07 11-point)", t07, "devkit port", ""))
    rows.append(("voc_map (area, VOC2010+)", tarea, "devkit port", ""))
    rows.append(("devkit voc_eval.py port (07)", t_dev, "devkit port", dev_note))

    if not args.skip_coco:
        tcm, cm = timed(coco_metrics, gt, dets)
        with tempfile.TemporaryDirectory() as tmp:
            gt_path, det_path = os.path.join(tmp, "gt.json"), os.path.join(tmp, "dets.json")
            # the reference gets the documented ignore -> iscrowd mapping in its file
            ref_gt = dict(gt, annotations=[dict(a, iscrowd=a["ignore"]) for a in gt["annotations"]])
            with open(gt_path, "w") as f:
                json.dump(ref_gt, f)
            with open(det_path, "w") as f:
                json.dump(dets, f)
            tpc, stats = timed(pycocotools_direct, gt_path, det_path)
        print(f"coco_metrics: AP = {cm['AP']:.6f} AP50 = {cm['AP50']:.6f}; "
              f"pycocotools direct: AP = {stats[0]:.6f} AP50 = {stats[1]:.6f}")
        rows.append(("coco_metrics (pycocotools in memory)", tcm, "pycocotools direct", ""))
        rows.append(("pycocotools COCOeval direct (files)", tpc, "pycocotools direct", ""))

    peers = {name: sec for name, sec, _, _ in rows}
    peers["devkit port"] = t_dev
    if not args.skip_coco:
        peers["pycocotools direct"] = tpc
    print()
    print(f"{'method':<38} {'seconds':>9} {'ratio':>8}  peer / note")
    print("-" * 90)
    for name, sec, peer, note in rows:
        ratio = sec / peers[peer]
        print(f"{name:<38} {sec:>9.2f} {ratio:>8.4f}  {peer}{'; ' + note if note else ''}")
    print("ratio = seconds / peer's seconds (lower is faster); all timings include input parsing;")
    print(f"voc_map rows: best of {args.repeat} runs, the peers: one run")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
