"""Training throughput of the lite preset through Ray Train (1 worker) and through a plain loop,
in one run, on the same synthetic data: img/s of the training epochs and their ratio, plus the
wall-clock cost of Ray's set-up.

    python bench/bench_train.py [--images 320] [--epochs 2]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=320)
    ap.add_argument("--epochs", type=int, default=2)
    args = ap.parse_args()

    import yaml
    from torch.utils.data import DataLoader

    from fssd.data.collate import detection_collate
    from fssd.data.dataset import DetectionDataset
    from fssd.data.sampler import GlobalBatchSampler
    from fssd.data.synthetic import generate_scenes
    from fssd.data.transforms import train_transform
    from fssd.engine import LRSchedule, TrainState, param_groups, train_one_epoch
    from fssd.loss import MultiBoxLoss
    from fssd.models.presets import build_fssd
    from pipeline.convert import convert_dataset
    from pipeline.params import apply_overrides, load_params
    from pipeline.train import fit, init_ray, make_job

    tmp = Path(tempfile.mkdtemp(prefix="fssd-bench-"))
    root = tmp / "data"
    n = args.images + 20
    generate_scenes(root / "raw" / "synthetic", n, seed=0, split_fractions=(args.images / n, 10 / n, 10 / n))
    convert_dataset("synthetic", root / "raw", root / "processed", root, max_bad_fraction=0.0)
    raw = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    raw = apply_overrides(raw, {"data.root": str(root), "train.epochs": args.epochs, "train.val_every": 1000,
                                "train.loader_workers": 1, "mlflow.tracking_uri": f"sqlite:///{tmp}/mlflow.db"})
    (tmp / "params.yaml").write_text(yaml.safe_dump(raw))
    params = load_params(tmp / "params.yaml")
    tp = params.train
    threads = os.cpu_count() or 1

    # Plain loop: the same engine, data, sampler and model, no Ray.
    torch.set_num_threads(threads)
    model = build_fssd("fssd_lite", 8)
    cfg = model.config
    ds = DetectionDataset(root / "processed" / "train.json", root, train_transform(cfg.input_size, cfg.image_mean, cfg.image_std))
    sampler = GlobalBatchSampler(len(ds), tp.batch_size)
    loader = DataLoader(ds, batch_sampler=sampler, num_workers=tp.loader_workers, collate_fn=detection_collate,
                        persistent_workers=True)
    if tp.channels_last:  # the same memory format as the Ray path (train.channels_last)
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(param_groups(model, tp.weight_decay), lr=tp.scaled_lr, momentum=tp.momentum)
    sched = LRSchedule(args.epochs * len(sampler), warmup_iters=len(sampler)).scheduler(opt)
    crit = MultiBoxLoss(model.priors)
    plain = []
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        ds.set_epoch(epoch)
        stats = train_one_epoch(model, loader, crit, opt, sched, TrainState(), device=torch.device("cpu"),
                                channels_last=tp.channels_last)
        plain.append(stats.images_per_second)

    # Ray Train, one worker with all CPUs.
    t = time.perf_counter()
    init_ray()
    t_init = time.perf_counter() - t
    t = time.perf_counter()
    result = fit(make_job(params, run_name="bench"), tp, storage_path=str(tmp / "ray"))
    t_fit = time.perf_counter() - t
    ray_ips = result.metrics["images_per_second"]
    train_seconds = sum(m.get("epoch_seconds", 0) for _, m in (result.best_checkpoints or []))
    print(f"# Training throughput, fssd_lite 256 px, batch {tp.batch_size}, {args.images} images x {args.epochs} epochs, "
          f"{threads} CPU threads (torch {torch.__version__})\n")
    print("| path | img/s (last epoch) | ratio |")
    print("|---|---|---|")
    print(f"| plain loop (fssd.engine) | {plain[-1]:.1f} | 1.00 |")
    print(f"| Ray Train TorchTrainer, 1 worker | {ray_ips:.1f} | {ray_ips / plain[-1]:.2f} |")
    print(f"\nRay set-up: ray.init {t_init:.1f} s; TorchTrainer.fit {t_fit:.1f} s wall for "
          f"{train_seconds:.1f} s of training epochs (the rest is worker start-up, checkpointing, teardown).")


if __name__ == "__main__":
    main()
