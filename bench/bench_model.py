"""Model bench: forward and train-step img/s (fssd300_vgg16, fssd_lite), post-processing ms per
image, and the lite preset's seconds per 1,000-image training epoch with data loading.

    python bench/bench_model.py [--device cuda] [--quick]

Prints a Markdown table for the device at hand. Peers measured in the same run: the lite
preset against the paper's FSSD300 (ratio), post-processing against the authors' per-class
NumPy loop (greedy +1-px NMS, as in their test_net).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fssd import MultiBoxLoss, build_fssd, postprocess  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _format(cl: bool) -> torch.memory_format:
    return torch.channels_last if cl else torch.contiguous_format


def bench_forward(model, batch: int, size: int, device: torch.device, iters: int, amp: bool, cl: bool) -> float:
    model.eval().to(device, memory_format=_format(cl))
    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=_format(cl))
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if (amp and device.type == "cuda") else torch.no_grad()
    with torch.no_grad(), ctx:
        model(x)
        _sync(device)
        t = time.perf_counter()
        for _ in range(iters):
            model(x)
        _sync(device)
    return batch * iters / (time.perf_counter() - t)


def bench_train(model, batch: int, size: int, device: torch.device, iters: int, amp: bool, cl: bool) -> float:
    model.train().to(device, memory_format=_format(cl))
    crit = MultiBoxLoss(model.priors.to(device), validate=False)
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=_format(cl))
    boxes = torch.tensor([[0.1, 0.1, 0.5, 0.6], [0.4, 0.3, 0.9, 0.8]], device=device).expand(batch, 2, 4).contiguous()
    labels = torch.tensor([1, 2], device=device).expand(batch, 2).contiguous()

    def step():
        ctx = torch.autocast("cuda", dtype=torch.bfloat16) if (amp and device.type == "cuda") else torch.enable_grad()
        with ctx:
            loc, conf = model(x)
        out = crit(loc.float(), conf.float(), boxes, labels)
        opt.zero_grad()
        out.total.backward()
        opt.step()

    step()
    _sync(device)
    t = time.perf_counter()
    for _ in range(iters):
        step()
    _sync(device)
    return batch * iters / (time.perf_counter() - t)


def authors_postprocess(loc, conf, priors, thresh=0.01, nms=0.45, per_class=200, per_image=200):
    """The authors' test_net loop: per class, score threshold, greedy +1-px NMS in NumPy."""
    from fssd.boxes import decode

    boxes = (decode(loc, priors, (0.1, 0.2)) * 300).numpy()
    scores = torch.softmax(conf, -1).numpy()
    out = []
    for j in range(1, scores.shape[1]):
        inds = np.where(scores[:, j] > thresh)[0]
        b, s = boxes[inds], scores[inds, j]
        order = s.argsort()[::-1]
        x1, y1, x2, y2 = b[:, 0], b[:, 1], b[:, 2], b[:, 3]
        areas = (x2 - x1 + 1) * (y2 - y1 + 1)
        keep = []
        while order.size > 0:
            i = order[0]
            keep.append(i)
            xx1 = np.maximum(x1[i], x1[order[1:]])
            yy1 = np.maximum(y1[i], y1[order[1:]])
            xx2 = np.minimum(x2[i], x2[order[1:]])
            yy2 = np.minimum(y2[i], y2[order[1:]])
            inter = np.maximum(0.0, xx2 - xx1 + 1) * np.maximum(0.0, yy2 - yy1 + 1)
            ovr = inter / (areas[i] + areas[order[1:]] - inter)
            order = order[np.where(ovr <= nms)[0] + 1]
        out.append((b[keep][:per_class], s[keep][:per_class]))
    return out


def bench_postprocess(device: torch.device, images: int) -> tuple[float, float]:
    model = build_fssd("fssd300_vgg16", 21)
    priors = model.priors
    g = torch.Generator().manual_seed(0)
    loc = torch.randn(images, priors.shape[0], 4, generator=g) * 0.5
    conf = torch.randn(images, priors.shape[0], 21, generator=g) * 2.0
    conf[..., 0] += 6.0  # mostly background, as in a trained model (~2k candidates per image)
    ld, cd, pd = loc.to(device), conf.to(device), priors.to(device)
    postprocess(ld[:1], cd[:1], pd, image_sizes=[(300, 300)])
    _sync(device)
    t = time.perf_counter()
    postprocess(ld, cd, pd, image_sizes=[(300, 300)])
    _sync(device)
    ours = (time.perf_counter() - t) * 1000 / images
    n_ref = min(images, 4)
    t = time.perf_counter()
    for i in range(n_ref):
        authors_postprocess(loc[i], conf[i], priors)
    theirs = (time.perf_counter() - t) * 1000 / n_ref
    return ours, theirs


def bench_lite_epoch(images: int, loader_workers: int) -> float:
    """Seconds for one lite training epoch over `images` synthetic scenes, data loading included
    (extrapolated to 1,000 images)."""
    from torch.utils.data import DataLoader

    from fssd.data.collate import detection_collate
    from fssd.data.dataset import DetectionDataset
    from fssd.data.synthetic import generate_scenes
    from fssd.data.transforms import train_transform
    from pipeline.convert import convert_dataset

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        generate_scenes(root / "raw" / "synthetic", images + 20, seed=0, split_fractions=(images / (images + 20), 10 / (images + 20), 10 / (images + 20)))
        convert_dataset("synthetic", root / "raw", root / "processed", root, max_bad_fraction=0.0)
        model = build_fssd("fssd_lite", 8)  # 7 shape classes + background
        cfg = model.config
        ds = DetectionDataset(root / "processed" / "train.json", root, train_transform(cfg.input_size, cfg.image_mean, cfg.image_std))
        loader = DataLoader(ds, batch_size=32, shuffle=True, drop_last=True, num_workers=loader_workers,
                            collate_fn=detection_collate, persistent_workers=loader_workers > 0)
        crit = MultiBoxLoss(model.priors)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        model.train().to(memory_format=torch.channels_last)  # what `fssd train` does (train.channels_last)
        seen = 0
        t = time.perf_counter()
        for batch in loader:
            images = batch["images"].contiguous(memory_format=torch.channels_last)
            out = crit(*model(images), batch["boxes"], batch["labels"])
            opt.zero_grad()
            out.total.backward()
            opt.step()
            seen += batch["images"].shape[0]
        seconds = time.perf_counter() - t
    return seconds * 1000 / seen


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="fewer iterations")
    ap.add_argument("--lite-epoch-images", type=int, default=1000)
    args = ap.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True
        name = torch.cuda.get_device_name(device)
    else:
        torch.set_num_threads(os.cpu_count() or 1)
        name = f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
    it = 2 if args.quick else (20 if cuda else 3)
    rows = []
    specs = [("fssd300_vgg16", 300, 32 if cuda else 4), ("fssd_lite", 256, 64 if cuda else 32)]
    results = {}
    for preset, size, batch in specs:
        for amp in ([False, True] if cuda else [False]):
            for cl in (False, True):
                fwd = bench_forward(build_fssd(preset, 21), batch, size, device, it, amp, cl)
                trn = bench_train(build_fssd(preset, 21), batch, size, device, it, amp, cl)
                tag = f"{preset}{' bf16' if amp else ' fp32'}"
                results.setdefault(tag, (fwd, trn))
                rows.append((tag, "channels_last" if cl else "contiguous", f"batch {batch}", f"{fwd:.1f}", f"{trn:.1f}"))
    print(f"# FSSD model bench on {name} (torch {torch.__version__})\n")
    print("| model | memory format | batch | forward img/s | train-step img/s |")
    print("|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    base = results[next(k for k in results if k.startswith("fssd300"))]
    lite = results[next(k for k in results if k.startswith("fssd_lite"))]
    print(f"\nlite / fssd300 train-step speed: {lite[1] / base[1]:.1f}x")
    ours, theirs = bench_postprocess(device, 16 if args.quick else 64)
    print("\n| post-processing (FSSD300, 21 classes, score > 0.01) | ms / image | ratio |")
    print("|---|---|---|")
    print(f"| fssd.postprocess (batched, torchvision batched_nms, {device.type}) | {ours:.2f} | {theirs / ours:.1f}x faster |")
    print(f"| authors' per-class NumPy loop (CPU) | {theirs:.2f} | 1.0 |")
    if not cuda and args.lite_epoch_images:
        for w in (0, 1):
            s = bench_lite_epoch(args.lite_epoch_images if not args.quick else 200, w)
            print(f"\nfssd_lite 256 px: {s:.1f} s per 1,000-image training epoch (data loading included, "
                  f"{w} loader worker{'s' if w != 1 else ''}, {1000 / s:.1f} img/s; goal <= 30 s)")


if __name__ == "__main__":
    main()
