"""Validation mAP of training variants on the default synthetic data, one plain fssd.engine loop
each, same data, seed and schedule: what `train.difficult` and `ModelConfig.weight_init` give.

    python bench/compare_recipes.py [--images 1280] [--epochs 4] [--variants drop/pytorch,target/pytorch,target/authors]

Each variant is ``difficult/weight_init``. The data are the default params' synthetic scenes
(generated once under a temporary folder). Prints a table: variant, val mAP@0.5 (VOC07), seconds.
It measures learning, not speed; the defaults match the short-run evidence behind params.yaml
(batch 4, lr 0.01, flips only).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=1280)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--variants", default="drop/pytorch,target/pytorch,target/authors")
    ap.add_argument("--data", default=None, help="a data root with processed/ (default: generate the default set)")
    args = ap.parse_args()

    from torch.utils.data import DataLoader, Subset

    from fssd.data.collate import detection_collate
    from fssd.data.dataset import DetectionDataset
    from fssd.data.sampler import GlobalBatchSampler
    from fssd.data.transforms import eval_transform
    from fssd.engine import LRSchedule, TrainState, gather_detections, param_groups, predict, train_one_epoch
    from fssd.evaluation import voc_map
    from fssd.loss import MultiBoxLoss
    from fssd.models.presets import build_detector
    from pipeline.params import load_params, detector_config
    from pipeline.train import augmentation, read_categories

    repo = Path(__file__).resolve().parents[1]
    params = load_params(repo / "params.yaml")
    if args.data:
        root = Path(args.data)
    else:
        from pipeline.convert import convert_dataset
        from pipeline.download import run_download

        root = Path(tempfile.mkdtemp(prefix="fssd-recipes-")) / "data"
        s = params.data.synthetic
        run_download(dataset="synthetic", data_root=root, synthetic_images=s.num_images, synthetic_seed=s.seed,
                     synthetic_scenes=s.scene_kwargs())
        convert_dataset("synthetic", root / "raw", root / "processed", root, 0.0)
    train_json, val_json = root / "processed" / "train.json", root / "processed" / "val.json"
    names, cat_ids = read_categories(train_json)
    tp = params.train
    rows = []
    for variant in args.variants.split(","):
        difficult, init = variant.split("/")
        torch.manual_seed(params.seed)
        cfg = detector_config(params, num_classes=len(names) + 1)
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, weight_init=init))
        model = build_detector(cfg).to(memory_format=torch.channels_last)
        m = cfg.model
        ds = DetectionDataset(train_json, root, augmentation(tp.augment, m.input_size, m.image_mean, m.image_std),
                              ignored=difficult, seed=params.seed)
        train_set = Subset(ds, range(min(args.images, len(ds))))
        sampler = GlobalBatchSampler(len(train_set), tp.batch_size, seed=params.seed)
        loader = DataLoader(train_set, batch_sampler=sampler, collate_fn=detection_collate)
        opt = torch.optim.SGD(param_groups(model, tp.weight_decay), lr=tp.scaled_lr, momentum=tp.momentum)
        steps = len(sampler)
        sched = LRSchedule(args.epochs * steps, warmup_iters=round(tp.warmup_epochs * steps),
                           warmup_factor=tp.warmup_factor).scheduler(opt)
        crit = MultiBoxLoss(model.priors)
        started = time.perf_counter()
        state = TrainState()
        for epoch in range(args.epochs):
            sampler.set_epoch(epoch)
            ds.set_epoch(epoch)
            train_one_epoch(model, loader, crit, opt, sched, state, device=torch.device("cpu"),
                            grad_clip=tp.grad_clip, channels_last=True)
        val = DetectionDataset(val_json, root, eval_transform(m.input_size, m.image_mean, m.image_std), ignored="target")
        dets = gather_detections(predict(model, DataLoader(val, batch_size=32, collate_fn=detection_collate),
                                         device=torch.device("cpu"), channels_last=True, category_ids=cat_ids))
        score = float(voc_map(val_json, dets, iou_threshold=0.5, use_07_metric=True).map)
        rows.append((variant, score, time.perf_counter() - started))
        print(f"{variant}: val mAP@0.5 {score:.4f} ({rows[-1][2]:.0f} s)", flush=True)
    print(f"\n| variant (difficult/weight_init) | val mAP@0.5 (VOC07) | seconds |\n|---|---|---|")
    for variant, score, secs in rows:
        print(f"| {variant} | {score:.4f} | {secs:.0f} |")
    print(f"\n{args.images} training images, {args.epochs} epochs, batch {tp.batch_size}, lr {tp.scaled_lr:g}, "
          f"{len(val)} validation images; data: {root}")


if __name__ == "__main__":
    main()
