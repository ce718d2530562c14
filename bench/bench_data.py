"""Data pipeline throughput: JPEG decode + SSD augmentation + collate, images/s on one core.

Compares, in the same run and on the same files:

* ``fssd``: ``DetectionDataset`` + ``train_transform`` (albumentations 2) + ``detection_collate``;
* ``reference``: a plain OpenCV/NumPy SSD augmentation written in the style of ssd.pytorch's
  ``utils/augmentations.py`` (float32 throughout), below, with ssd.pytorch's list-of-targets
  collate. It samples the same augmentation as ``train_transform``: the crop modes include 0.5 and
  the IoU constraint is enforced (ssd.pytorch's own test never rejects a crop), and the channel
  swap (``RandomLightingNoise``) is left out.

Data: ~200 VOC-sized (500x375) JPEGs with smooth random content and 1-6 boxes each, written to a
temporary directory with a COCO-format split file. Single process: ``torch.set_num_threads(1)``,
``cv2.setNumThreads(1)``. Run: ``python bench/bench_data.py`` (well under a minute).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from fssd.data.collate import detection_collate
from fssd.data.dataset import DetectionDataset
from fssd.data.transforms import eval_transform, train_transform

MEAN = (123.675, 116.28, 103.53)
STD = (58.395, 57.12, 57.375)


# --------------------------------------------------------------------------------------------
# Reference: SSD augmentation in the style of ssd.pytorch (utils/augmentations.py)
# --------------------------------------------------------------------------------------------


def intersect(box_a, box_b):
    max_xy = np.minimum(box_a[:, 2:], box_b[2:])
    min_xy = np.maximum(box_a[:, :2], box_b[:2])
    inter = np.clip((max_xy - min_xy), a_min=0, a_max=np.inf)
    return inter[:, 0] * inter[:, 1]


def jaccard_numpy(box_a, box_b):
    inter = intersect(box_a, box_b)
    area_a = (box_a[:, 2] - box_a[:, 0]) * (box_a[:, 3] - box_a[:, 1])
    area_b = (box_b[2] - box_b[0]) * (box_b[3] - box_b[1])
    union = area_a + area_b - inter
    return inter / union


class Compose:
    def __init__(self, transforms):
        self.transforms = transforms

    def __call__(self, img, boxes=None, labels=None):
        for t in self.transforms:
            img, boxes, labels = t(img, boxes, labels)
        return img, boxes, labels


class ConvertFromInts:
    def __call__(self, image, boxes=None, labels=None):
        return image.astype(np.float32), boxes, labels


class ToAbsoluteCoords:
    def __call__(self, image, boxes=None, labels=None):
        height, width, channels = image.shape
        boxes[:, 0] *= width
        boxes[:, 2] *= width
        boxes[:, 1] *= height
        boxes[:, 3] *= height
        return image, boxes, labels


class ToPercentCoords:
    def __call__(self, image, boxes=None, labels=None):
        height, width, channels = image.shape
        boxes[:, 0] /= width
        boxes[:, 2] /= width
        boxes[:, 1] /= height
        boxes[:, 3] /= height
        return image, boxes, labels


class Resize:
    def __init__(self, size=300):
        self.size = size

    def __call__(self, image, boxes=None, labels=None):
        image = cv2.resize(image, (self.size, self.size))
        return image, boxes, labels


class Normalize:
    def __init__(self, mean, std):
        self.mean = np.array(mean, dtype=np.float32)
        self.std = np.array(std, dtype=np.float32)

    def __call__(self, image, boxes=None, labels=None):
        image = image.astype(np.float32)
        image -= self.mean
        image /= self.std
        return image, boxes, labels


class RandomSaturation:
    def __init__(self, lower=0.5, upper=1.5):
        self.lower = lower
        self.upper = upper

    def __call__(self, image, boxes=None, labels=None):
        if np.random.randint(2):
            image[:, :, 1] *= np.random.uniform(self.lower, self.upper)
        return image, boxes, labels


class RandomHue:
    def __init__(self, delta=18.0):
        self.delta = delta

    def __call__(self, image, boxes=None, labels=None):
        if np.random.randint(2):
            image[:, :, 0] += np.random.uniform(-self.delta, self.delta)
            image[:, :, 0][image[:, :, 0] > 360.0] -= 360.0
            image[:, :, 0][image[:, :, 0] < 0.0] += 360.0
        return image, boxes, labels


class ConvertColor:
    def __init__(self, current="RGB", transform="HSV"):
        self.transform = transform
        self.current = current

    def __call__(self, image, boxes=None, labels=None):
        if self.current == "RGB" and self.transform == "HSV":
            image = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
        elif self.current == "HSV" and self.transform == "RGB":
            image = cv2.cvtColor(image, cv2.COLOR_HSV2RGB)
        else:
            raise NotImplementedError
        return image, boxes, labels


class RandomContrast:
    def __init__(self, lower=0.5, upper=1.5):
        self.lower = lower
        self.upper = upper

    def __call__(self, image, boxes=None, labels=None):
        if np.random.randint(2):
            alpha = np.random.uniform(self.lower, self.upper)
            image *= alpha
        return image, boxes, labels


class RandomBrightness:
    def __init__(self, delta=32):
        self.delta = delta

    def __call__(self, image, boxes=None, labels=None):
        if np.random.randint(2):
            delta = np.random.uniform(-self.delta, self.delta)
            image += delta
        return image, boxes, labels


class PhotometricDistort:
    def __init__(self):
        self.pd = [
            RandomContrast(),
            ConvertColor(transform="HSV"),
            RandomSaturation(),
            RandomHue(),
            ConvertColor(current="HSV", transform="RGB"),
            RandomContrast(),
        ]
        self.rand_brightness = RandomBrightness()

    def __call__(self, image, boxes, labels):
        im = image.copy()
        im, boxes, labels = self.rand_brightness(im, boxes, labels)
        if np.random.randint(2):
            distort = Compose(self.pd[:-1])
        else:
            distort = Compose(self.pd[1:])
        return distort(im, boxes, labels)


class Expand:
    def __init__(self, mean):
        self.mean = mean

    def __call__(self, image, boxes, labels):
        if np.random.randint(2):
            return image, boxes, labels
        height, width, depth = image.shape
        ratio = np.random.uniform(1, 4)
        left = np.random.uniform(0, width * ratio - width)
        top = np.random.uniform(0, height * ratio - height)
        expand_image = np.zeros((int(height * ratio), int(width * ratio), depth), dtype=image.dtype)
        expand_image[:, :, :] = self.mean
        expand_image[int(top) : int(top + height), int(left) : int(left + width)] = image
        image = expand_image
        boxes = boxes.copy()
        boxes[:, :2] += (int(left), int(top))
        boxes[:, 2:] += (int(left), int(top))
        return image, boxes, labels


class RandomSampleCrop:
    def __init__(self):
        # whole image, min IoU 0.1 / 0.3 / 0.5 / 0.7 / 0.9, no constraint
        self.sample_options = (None, (0.1, None), (0.3, None), (0.5, None), (0.7, None), (0.9, None), (None, None))

    def __call__(self, image, boxes=None, labels=None):
        height, width, _ = image.shape
        for _ in range(100):
            mode = self.sample_options[np.random.randint(len(self.sample_options))]
            if mode is None:
                return image, boxes, labels
            min_iou, max_iou = mode
            if min_iou is None:
                min_iou = float("-inf")
            for _ in range(50):
                current_image = image
                w = np.random.uniform(0.3 * width, width)
                h = np.random.uniform(0.3 * height, height)
                if h / w < 0.5 or h / w > 2:
                    continue
                left = np.random.uniform(width - w)
                top = np.random.uniform(height - h)
                rect = np.array([int(left), int(top), int(left + w), int(top + h)])
                centers = (boxes[:, :2] + boxes[:, 2:]) / 2.0
                m1 = (rect[0] < centers[:, 0]) * (rect[1] < centers[:, 1])
                m2 = (rect[2] > centers[:, 0]) * (rect[3] > centers[:, 1])
                mask = m1 * m2
                if not mask.any():
                    continue
                if jaccard_numpy(boxes[mask], rect).max() < min_iou:  # the constraint, enforced
                    continue
                current_image = current_image[rect[1] : rect[3], rect[0] : rect[2], :]
                current_boxes = boxes[mask, :].copy()
                current_labels = labels[mask]
                current_boxes[:, :2] = np.maximum(current_boxes[:, :2], rect[:2])
                current_boxes[:, :2] -= rect[:2]
                current_boxes[:, 2:] = np.minimum(current_boxes[:, 2:], rect[2:])
                current_boxes[:, 2:] -= rect[:2]
                return current_image, current_boxes, current_labels
        return image, boxes, labels


class RandomMirror:
    def __call__(self, image, boxes, classes):
        _, width, _ = image.shape
        if np.random.randint(2):
            image = image[:, ::-1]
            boxes = boxes.copy()
            boxes[:, 0::2] = width - boxes[:, 2::-2]
        return image, boxes, classes


class SSDAugmentation:
    def __init__(self, size=300, mean=MEAN, std=STD):
        self.augment = Compose(
            [
                ConvertFromInts(),
                ToAbsoluteCoords(),
                PhotometricDistort(),
                Expand(mean),
                RandomSampleCrop(),
                RandomMirror(),
                ToPercentCoords(),
                Resize(size),
                Normalize(mean, std),
            ]
        )

    def __call__(self, img, boxes, labels):
        return self.augment(img, boxes, labels)


class ReferenceDataset:
    """ssd.pytorch's VOCDetection.pull_item, reading the same split file."""

    def __init__(self, ann_file: Path, root: Path, transform):
        data = json.loads(Path(ann_file).read_text())
        self.root = Path(root)
        self.images = data["images"]
        self.targets = {img["id"]: [] for img in self.images}
        for a in data["annotations"]:
            if not a.get("ignore", 0):
                x, y, w, h = a["bbox"]
                self.targets[a["image_id"]].append([x, y, x + w, y + h, a["category_id"]])
        self.transform = transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        info = self.images[index]
        img = cv2.imread(str(self.root / info["file_name"]))
        img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
        height, width, _ = img.shape
        target = np.array(self.targets[info["id"]], dtype=np.float32).reshape(-1, 5)
        target[:, :4] /= np.array([width, height, width, height], dtype=np.float32)
        img, boxes, labels = self.transform(img, target[:, :4], target[:, 4])
        target = np.hstack((boxes, np.expand_dims(labels, axis=1)))
        return torch.from_numpy(img).permute(2, 0, 1), target


def reference_collate(batch):
    """ssd.pytorch's detection_collate: stacked images, a list of [M, 5] targets."""
    targets = []
    imgs = []
    for sample in batch:
        imgs.append(sample[0])
        targets.append(torch.FloatTensor(sample[1]))
    return torch.stack(imgs, 0), targets


# --------------------------------------------------------------------------------------------
# Data and timing
# --------------------------------------------------------------------------------------------


def make_voc_like(root: Path, n: int, seed: int = 0) -> Path:
    """``n`` 500x375 JPEGs with smooth random content and boxes; returns the split json path."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i in range(n):
        h, w = (375, 500) if i % 4 else (500, 375)
        low = rng.integers(0, 256, (h // 25, w // 25, 3), dtype=np.uint8)
        img = cv2.resize(low, (w, h), interpolation=cv2.INTER_CUBIC)
        img = cv2.add(img, rng.integers(0, 12, img.shape, dtype=np.uint8))
        for _ in range(int(rng.integers(1, 7))):
            bw, bh = int(rng.integers(12, w // 2)), int(rng.integers(12, h // 2))
            x, y = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
            colour = [int(c) for c in rng.integers(0, 256, 3)]
            cv2.rectangle(img, (x, y), (x + bw, y + bh), colour, -1)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": i,
                    "category_id": int(rng.integers(1, 21)),
                    "bbox": [x, y, bw, bh],
                    "area": bw * bh,
                    "iscrowd": 0,
                    "ignore": 0,
                }
            )
        name = f"images/{i:05d}.jpg"
        cv2.imwrite(str(root / name), img, [cv2.IMWRITE_JPEG_QUALITY, 90])
        images.append({"id": i, "file_name": name, "width": w, "height": h})
    categories = [{"id": k, "name": f"class{k}", "supercategory": "none"} for k in range(1, 21)]
    ann = root / "train.json"
    ann.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return ann


def run_epoch(dataset, collate, batch_size: int, epoch: int) -> float:
    if hasattr(dataset, "set_epoch"):
        dataset.set_epoch(epoch)
    start = time.perf_counter()
    n = len(dataset)
    for b in range(0, n, batch_size):
        collate([dataset[i] for i in range(b, min(b + batch_size, n))])
    return time.perf_counter() - start


def decode_only(dataset: DetectionDataset) -> float:
    start = time.perf_counter()
    for i in range(len(dataset)):
        dataset.load_image(i)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--size", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per pipeline; the best is reported")
    args = parser.parse_args()

    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    np.random.seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        ann = make_voc_like(root, args.images)
        ours = DetectionDataset(ann, root, train_transform(args.size, MEAN, STD), seed=0)
        ours_eval = DetectionDataset(ann, root, eval_transform(args.size, MEAN, STD), seed=0)
        ref = ReferenceDataset(ann, root, SSDAugmentation(args.size, MEAN, STD))
        # warm-up (page cache, lazy initialisation)
        run_epoch(ours, detection_collate, args.batch_size, 0)
        run_epoch(ref, reference_collate, args.batch_size, 0)
        times: dict[str, list[float]] = {"decode": [], "ours": [], "ref": [], "eval": []}
        for r in range(args.repeats):  # interleaved so that load changes hit both alike
            times["decode"].append(decode_only(ours))
            times["ours"].append(run_epoch(ours, detection_collate, args.batch_size, r + 1))
            times["ref"].append(run_epoch(ref, reference_collate, args.batch_size, r + 1))
            times["eval"].append(run_epoch(ours_eval, detection_collate, args.batch_size, r + 1))

    n = args.images
    rate = {k: n / min(v) for k, v in times.items()}
    rows = [
        ("JPEG decode only (cv2.imread + BGR->RGB)", "decode"),
        ("fssd train: DetectionDataset + albumentations + collate", "ours"),
        ("reference train: ssd.pytorch-style OpenCV/NumPy + collate", "ref"),
        ("fssd eval: decode + resize + normalise + collate", "eval"),
    ]
    print(f"\nData pipeline, {n} JPEGs 500x375, input {args.size}, batch {args.batch_size}, 1 process, 1 thread")
    print(f"best of {args.repeats} passes; ratio = img/s relative to the reference train pipeline\n")
    print(f"| {'pipeline':<58} | {'img/s/core':>10} | {'ms/img':>7} | {'ratio':>6} |")
    print(f"|{'-' * 60}|{'-' * 12}|{'-' * 9}|{'-' * 8}|")
    for label, key in rows:
        print(f"| {label:<58} | {rate[key]:>10.1f} | {1000 / rate[key]:>7.2f} | {rate[key] / rate['ref']:>6.2f} |")
    print(f"\nfssd train / reference train: {rate['ours'] / rate['ref']:.2f}x")


if __name__ == "__main__":
    main()
