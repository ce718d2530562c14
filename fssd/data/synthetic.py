"""Deterministic synthetic detection scenes in the PASCAL VOC layout.

The embedded default dataset: coloured geometric shapes (``CLASSES``) on textured, noisy
backgrounds, with overlaps, partial occlusion and truncation by the image border (an object whose
visible box is tiny is marked "difficult"). Written as::

    <out_dir>/JPEGImages/<id>.jpg
    <out_dir>/Annotations/<id>.xml        VOC XML, boxes 1-based inclusive ints
    <out_dir>/ImageSets/Main/{train,val,test}.txt

Everything is a pure function of ``(seed, index)`` and the arguments: every image draws from its
own ``numpy.random.Generator`` seeded with ``[seed, 0, index]``, drawing and JPEG encoding go
through OpenCV with fixed parameters, so the same arguments give byte-identical files whatever the
number of worker processes. :func:`write_scenes_archive` packs a generated tree into an
uncompressed tar (top folder ``synthetic/``) with deterministic bytes, so that the default
pipeline goes through the same download -> extract -> convert path as PASCAL VOC.

Boxes are the tight box of the *visible* pixels of each shape (after later shapes were drawn over
it and after clipping by the image border). A candidate shape that would hide more than
``max_occlusion`` of an earlier shape, or that would lie mostly outside the image, is rejected
before it is drawn, so every shape visible in an image is annotated.
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import tarfile
import tempfile
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

# no numpy, no OpenCV: params validation and convert use these without loading either
from .scene_spec import CLASSES, check_scene_args

__all__ = ["CLASSES", "check_scene_args", "generate_scenes", "write_scenes_archive"]

SPLITS: tuple[str, ...] = ("train", "val", "test")

_TAR_MTIME = 946684800  # 2000-01-01T00:00:00Z, fixed so that archives are byte-identical
_SHIFT = 4  # sub-pixel bits for OpenCV drawing
_ONE = 1 << _SHIFT


@dataclass(frozen=True)
class _SceneParams:
    seed: int
    min_size: int
    max_size: int
    jpeg_quality: int
    difficult_side_px: int
    min_objects: int
    max_objects: int
    min_object_frac: float
    max_object_frac: float
    max_occlusion: float
    min_inside_frac: float


@dataclass
class _Obj:
    cls: int
    x0: int  # in-image bounding region of the shape (0-based, half-open)
    y0: int
    x1: int
    y1: int
    inside_area: int  # shape pixels inside the image
    visible: int  # shape pixels still visible (not covered by later shapes)
    truncated: bool


# --------------------------------------------------------------------------------------------
# drawing helpers


def _vivid_colour(rng: np.random.Generator) -> np.ndarray:
    hsv = np.array(
        [[[rng.integers(0, 180), rng.integers(140, 256), rng.integers(110, 256)]]], dtype=np.uint8
    )
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)[0, 0].astype(np.float32)


def _muted_colour(rng: np.random.Generator) -> np.ndarray:
    hsv = np.array(
        [[[rng.integers(0, 180), rng.integers(0, 110), rng.integers(30, 240)]]], dtype=np.uint8
    )
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)[0, 0].astype(np.float32)


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Gradient + optional cloud blobs, checker pattern and lines; BGR uint8."""
    # gradient and soft colour clouds are built on a coarse grid and upsampled: a linear
    # gradient survives linear interpolation, and the clouds never get crisp (shape-like) edges
    c1, c2 = _muted_colour(rng), _muted_colour(rng)
    angle = rng.uniform(0.0, 2.0 * math.pi)
    cell = int(rng.integers(12, 48))
    gh, gw = h // cell + 2, w // cell + 2
    ys = np.linspace(0.0, h, gh, dtype=np.float32) * math.sin(angle)
    xs = np.linspace(0.0, w, gw, dtype=np.float32) * math.cos(angle)
    t = ys[:, None] + xs[None, :]
    t -= t.min()
    t *= 1.0 / max(float(t.max()), 1e-6)
    grid = c1 + t[..., None] * (c2 - c1)[None, None, :]
    if rng.random() < 0.6:
        grid += rng.uniform(-1.0, 1.0, size=(gh, gw, 3)).astype(np.float32) * float(
            rng.uniform(15.0, 55.0)
        )
    grid = np.clip(grid, 0, 255).astype(np.uint8)
    out = cv2.resize(grid, (w, h), interpolation=cv2.INTER_CUBIC)

    if rng.random() < 0.35:  # checker pattern
        cell = int(rng.integers(6, 48))
        small = ((np.arange(h // cell + 1)[:, None] + np.arange(w // cell + 1)[None, :]) % 2)
        pattern = np.repeat(np.repeat(small.astype(bool), cell, 0), cell, 1)[:h, :w]
        overlay = out.copy()
        overlay[pattern] = _muted_colour(rng).astype(np.uint8)
        alpha = float(rng.uniform(0.1, 0.4))
        out = cv2.addWeighted(overlay, alpha, out, 1.0 - alpha, 0.0)

    if rng.random() < 0.6:  # random lines
        for _ in range(int(rng.integers(2, 13))):
            p1 = (int(rng.integers(-w // 4, w + w // 4)), int(rng.integers(-h // 4, h + h // 4)))
            p2 = (int(rng.integers(-w // 4, w + w // 4)), int(rng.integers(-h // 4, h + h // 4)))
            colour = tuple(float(c) for c in _muted_colour(rng))
            cv2.line(out, p1, p2, colour, int(rng.integers(1, 4)), cv2.LINE_AA)

    if rng.random() < 0.5:
        out = cv2.GaussianBlur(out, (0, 0), float(rng.uniform(0.5, 1.5)))
    return out


def _rotate(local: np.ndarray, cx: float, cy: float, theta: float) -> np.ndarray:
    c, s = math.cos(theta), math.sin(theta)
    x = local[:, 0] * c - local[:, 1] * s + cx
    y = local[:, 0] * s + local[:, 1] * c + cy
    return np.stack([x, y], axis=1)


def _regular(n: int, r: float) -> np.ndarray:
    a = np.arange(n) * (2.0 * math.pi / n) - math.pi / 2
    return np.stack([np.cos(a) * r, np.sin(a) * r], axis=1)


def _star(r: float, inner: float = 0.45) -> np.ndarray:
    a = np.arange(10) * (math.pi / 5) - math.pi / 2
    rad = np.where(np.arange(10) % 2 == 0, r, r * inner)
    return np.stack([np.cos(a) * rad, np.sin(a) * rad], axis=1)


def _cross(r: float, arm: float = 0.36) -> np.ndarray:
    a = arm * r
    return np.array(
        [(-a, -r), (a, -r), (a, -a), (r, -a), (r, a), (a, a), (a, r), (-a, r), (-a, a), (-r, a),
         (-r, -a), (-a, -a)],
        dtype=np.float64,
    )


def _shape_mask(
    name: str, cx: float, cy: float, r: float, theta: float, aspect: float
) -> tuple[np.ndarray, int, int]:
    """Hard (0/255) mask of the whole shape on its own canvas, and the canvas origin."""
    poly = None
    if name == "circle":
        hx = hy = r
    elif name == "ellipse":
        b = r * aspect
        c, s = math.cos(theta), math.sin(theta)
        hx = math.sqrt((r * c) ** 2 + (b * s) ** 2)
        hy = math.sqrt((r * s) ** 2 + (b * c) ** 2)
    else:
        local = {
            "square": lambda: _regular(4, r),
            "triangle": lambda: _regular(3, r),
            "hexagon": lambda: _regular(6, r),
            "star": lambda: _star(r),
            "cross": lambda: _cross(r),
        }[name]()
        poly = _rotate(local, cx, cy, theta)
        hx = hy = 0.0
    if poly is None:
        minx, maxx, miny, maxy = cx - hx, cx + hx, cy - hy, cy + hy
    else:
        minx, miny = poly.min(axis=0)
        maxx, maxy = poly.max(axis=0)
    ox, oy = int(math.floor(minx)) - 1, int(math.floor(miny)) - 1
    cw, ch = int(math.ceil(maxx)) - ox + 2, int(math.ceil(maxy)) - oy + 2
    canvas = np.zeros((ch, cw), dtype=np.uint8)
    centre = (int(round((cx - ox) * _ONE)), int(round((cy - oy) * _ONE)))
    if name == "circle":
        cv2.circle(canvas, centre, int(round(r * _ONE)), 255, -1, cv2.LINE_8, _SHIFT)
    elif name == "ellipse":
        axes = (int(round(r * _ONE)), int(round(r * aspect * _ONE)))
        cv2.ellipse(canvas, centre, axes, math.degrees(theta), 0, 360, 255, -1, cv2.LINE_8, _SHIFT)
    else:
        pts = np.round((poly - (ox, oy)) * _ONE).astype(np.int32)
        cv2.fillPoly(canvas, [pts], 255, cv2.LINE_8, _SHIFT)
    return canvas, ox, oy


# --------------------------------------------------------------------------------------------
# one scene


def _try_place(
    rng: np.random.Generator,
    p: _SceneParams,
    img: np.ndarray,
    labels: np.ndarray,
    objs: list[_Obj],
    w: int,
    h: int,
    side: int,
    log_lo: float,
    log_hi: float,
) -> bool:
    """Draw one random shape candidate; paint it and return True if it is acceptable."""
    cls = int(rng.integers(len(CLASSES)))
    name = CLASSES[cls]
    size = math.exp(rng.uniform(log_lo, log_hi)) * side  # nominal diameter in px
    r = size / 2.0
    cx = float(rng.uniform(0.0, w))
    cy = float(rng.uniform(0.0, h))
    theta = float(rng.uniform(0.0, 2.0 * math.pi))
    aspect = float(rng.uniform(0.4, 0.7))
    colour = _vivid_colour(rng)
    grad = rng.uniform(-0.35, 0.35, size=2)

    canvas, ox, oy = _shape_mask(name, cx, cy, r, theta, aspect)
    full_area = int(np.count_nonzero(canvas))
    ch, cw = canvas.shape
    x0, y0 = max(ox, 0), max(oy, 0)
    x1, y1 = min(ox + cw, w), min(oy + ch, h)
    if full_area == 0 or x1 <= x0 or y1 <= y0:
        return False
    inside = canvas[y0 - oy : y1 - oy, x0 - ox : x1 - ox] > 0
    inside_area = int(np.count_nonzero(inside))
    if inside_area < max(12, p.min_inside_frac * full_area):
        return False  # mostly outside the image
    roi_labels = labels[y0:y1, x0:x1]
    if objs:
        covered = roi_labels[inside]
        hidden = np.bincount(covered[covered >= 0], minlength=len(objs))
        for k, o in enumerate(objs):
            if o.visible - int(hidden[k]) < (1.0 - p.max_occlusion) * o.inside_area:
                return False  # would hide too much of an earlier shape
        for k, o in enumerate(objs):
            o.visible -= int(hidden[k])
    # paint: base colour with a linear shading across the shape
    ys = (np.arange(y0, y1, dtype=np.float32) - cy) / max(size, 1.0)
    xs = (np.arange(x0, x1, dtype=np.float32) - cx) / max(size, 1.0)
    shade = 1.0 + np.float32(grad[1]) * ys[:, None] + np.float32(grad[0]) * xs[None, :]
    fill = np.clip(shade[..., None] * colour[None, None, :], 0, 255).astype(np.uint8)
    roi = img[y0:y1, x0:x1]
    roi[inside] = fill[inside]
    roi_labels[inside] = len(objs)
    objs.append(_Obj(cls, x0, y0, x1, y1, inside_area, inside_area, inside_area < full_area))
    return True


def _render_scene(index: int, p: _SceneParams) -> tuple[bytes, list[dict], int, int]:
    rng = np.random.default_rng([p.seed, 0, index])
    w = int(rng.integers(p.min_size, p.max_size + 1))
    h = int(rng.integers(p.min_size, p.max_size + 1))
    img = _background(rng, h, w)
    labels = np.full((h, w), -1, dtype=np.int8)
    objs: list[_Obj] = []
    side = min(w, h)
    log_lo, log_hi = math.log(p.min_object_frac), math.log(p.max_object_frac)
    wanted = int(rng.integers(p.min_objects, p.max_objects + 1))

    attempts = 0
    while len(objs) < wanted or not objs:
        # a slot gets a few tries; an image is never left empty (the first shape has no
        # occlusion constraint, only the in-image constraint, so this ends quickly)
        placed = False
        for _ in range(8):
            attempts += 1
            if _try_place(rng, p, img, labels, objs, w, h, side, log_lo, log_hi):
                placed = True
                break
        if not placed and objs:
            wanted -= 1
        if attempts > 1000:  # pragma: no cover - defensive bound
            raise RuntimeError(f"could not place any object in synthetic image {index}")

    sigma = float(rng.uniform(2.0, 10.0))
    noise = rng.standard_normal((h, w), dtype=np.float32)
    noise *= sigma
    out = img.astype(np.float32)
    out += noise[..., None]
    np.clip(out, 0, 255, out=out)
    img = out.astype(np.uint8)
    ok, buf = cv2.imencode(
        ".jpg",
        img,
        [cv2.IMWRITE_JPEG_QUALITY, p.jpeg_quality, cv2.IMWRITE_JPEG_OPTIMIZE, 0,
         cv2.IMWRITE_JPEG_PROGRESSIVE, 0],
    )
    if not ok:  # pragma: no cover - OpenCV always encodes a uint8 BGR image
        raise RuntimeError(f"JPEG encoding failed for synthetic image {index}")

    records: list[dict] = []
    for k, o in enumerate(objs):
        vis = labels[o.y0 : o.y1, o.x0 : o.x1] == k
        cols = np.flatnonzero(vis.any(axis=0))
        rows = np.flatnonzero(vis.any(axis=1))
        if cols.size == 0:  # cannot happen with max_occlusion < 1, kept for safety
            continue
        xmin, xmax = o.x0 + int(cols[0]), o.x0 + int(cols[-1])
        ymin, ymax = o.y0 + int(rows[0]), o.y0 + int(rows[-1])
        box_side = max(xmax - xmin + 1, ymax - ymin + 1)
        records.append(
            {
                "name": CLASSES[o.cls],
                "truncated": int(o.truncated),
                "difficult": int(box_side < p.difficult_side_px),
                # VOC: 1-based inclusive pixel indices
                "bbox": (xmin + 1, ymin + 1, xmax + 1, ymax + 1),
            }
        )
    return buf.tobytes(), records, w, h


def _voc_xml(image_id: str, w: int, h: int, records: list[dict]) -> str:
    lines = [
        "<annotation>",
        "\t<folder>synthetic</folder>",
        f"\t<filename>{image_id}.jpg</filename>",
        "\t<source>",
        "\t\t<database>FSSD synthetic scenes</database>",
        "\t</source>",
        "\t<size>",
        f"\t\t<width>{w}</width>",
        f"\t\t<height>{h}</height>",
        "\t\t<depth>3</depth>",
        "\t</size>",
        "\t<segmented>0</segmented>",
    ]
    for r in records:
        xmin, ymin, xmax, ymax = r["bbox"]
        lines += [
            "\t<object>",
            f"\t\t<name>{r['name']}</name>",
            "\t\t<pose>Unspecified</pose>",
            f"\t\t<truncated>{r['truncated']}</truncated>",
            f"\t\t<difficult>{r['difficult']}</difficult>",
            "\t\t<bndbox>",
            f"\t\t\t<xmin>{xmin}</xmin>",
            f"\t\t\t<ymin>{ymin}</ymin>",
            f"\t\t\t<xmax>{xmax}</xmax>",
            f"\t\t\t<ymax>{ymax}</ymax>",
            "\t\t</bndbox>",
            "\t</object>",
        ]
    lines.append("</annotation>")
    return "\n".join(lines) + "\n"


def _image_id(index: int, num_images: int) -> str:
    return f"{index + 1:0{max(6, len(str(num_images)))}d}"


def _generate_range(
    out_dir: str, start: int, stop: int, num_images: int, p: _SceneParams
) -> list[tuple[int, list[tuple[str, int, int]]]]:
    """Write images start..stop-1; return per image (index, [(class, difficult, truncated)])."""
    root = Path(out_dir)
    summary = []
    for index in range(start, stop):
        image_id = _image_id(index, num_images)
        jpeg, records, w, h = _render_scene(index, p)
        (root / "JPEGImages" / f"{image_id}.jpg").write_bytes(jpeg)
        (root / "Annotations" / f"{image_id}.xml").write_text(
            _voc_xml(image_id, w, h, records), encoding="utf-8", newline="\n"
        )
        summary.append(
            (index, [(r["name"], r["difficult"], r["truncated"]) for r in records])
        )
    return summary


# Worker processes. Not multiprocessing: fork deadlocks once the parent has used OpenCV's thread
# pool (and is unsafe with torch threads), and spawn re-imports ``__main__``. A worker is a fresh
# interpreter that imports this module from the same package directory (``import fssd`` loads no
# torch) and writes its summary as JSON.
_WORKER_CODE = (
    "import sys\n"
    "if sys.path and sys.path[0] == '':\n"
    "    sys.path.pop(0)\n"  # the cwd, put there by -c: local files must not shadow imports
    "sys.path.insert(0, sys.argv[1])\n"  # the directory holding this fssd package
    "from fssd.data.synthetic import _worker_main\n"
    "_worker_main(sys.argv[2])\n"
)


def _worker_main(job_json: str) -> None:
    job = json.loads(job_json)
    cv2.setNumThreads(1)
    params = _SceneParams(**job["params"])
    summary = _generate_range(job["out_dir"], job["start"], job["stop"], job["num_images"], params)
    tmp = job["summary_path"] + ".part"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(summary, f)
    os.replace(tmp, job["summary_path"])


def _run_workers(
    tmp: Path, num_images: int, params: _SceneParams, workers: int
) -> list[tuple[int, list[tuple[str, int, int]]]]:
    per = -(-num_images // workers)
    procs: list[tuple[subprocess.Popen, Path]] = []
    try:
        for k, start in enumerate(range(0, num_images, per)):
            summary_path = tmp / f".worker-{k}.json"
            job = {
                "out_dir": str(tmp),
                "start": start,
                "stop": min(start + per, num_images),
                "num_images": num_images,
                "params": asdict(params),
                "summary_path": str(summary_path),
            }
            package_parent = str(Path(__file__).resolve().parents[2])
            cmd = [sys.executable, "-c", _WORKER_CODE, package_parent, json.dumps(job)]
            procs.append(
                (subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE), summary_path)
            )
        summary: list = []
        for proc, summary_path in procs:
            _, err = proc.communicate()
            if proc.returncode != 0:
                tail = err.decode("utf-8", "replace")[-2000:]
                raise RuntimeError(f"synthetic scene worker failed (exit {proc.returncode}):\n{tail}")
            summary.extend(
                (i, [tuple(o) for o in objs])
                for i, objs in json.loads(summary_path.read_text(encoding="utf-8"))
            )
            summary_path.unlink()
        return summary
    finally:
        for proc, _ in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def _split_counts(n: int, fractions: Sequence[float]) -> list[int]:
    raw = [f * n for f in fractions]
    counts = [int(math.floor(x)) for x in raw]
    # largest remainder, ties by split order
    order = sorted(range(len(raw)), key=lambda i: (-(raw[i] - counts[i]), i))
    for i in order[: n - sum(counts)]:
        counts[i] += 1
    # every split with a positive fraction gets at least one image when possible
    for i, f in enumerate(fractions):
        if f > 0 and counts[i] == 0:
            donor = max(range(len(counts)), key=lambda j: (counts[j], -j))
            if counts[donor] > 1:
                counts[donor] -= 1
                counts[i] += 1
    return counts


def _validate(
    num_images: int,
    split_fractions: Sequence[float],
    min_size: int,
    max_size: int,
    jpeg_quality: int,
    difficult_side_px: int,
    objects_per_image: tuple[int, int],
    object_size_range: tuple[float, float],
    max_occlusion: float,
) -> None:
    if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 1:
        raise ValueError(f"num_images must be a positive integer, got {num_images!r}")
    if len(split_fractions) != 3 or any(f < 0 for f in split_fractions):
        raise ValueError(
            f"split_fractions must be three non-negative numbers (train, val, test), "
            f"got {tuple(split_fractions)!r}"
        )
    if abs(sum(split_fractions) - 1.0) > 1e-6:
        raise ValueError(f"split_fractions must sum to 1, got {tuple(split_fractions)!r}")
    if not (32 <= min_size <= max_size):
        raise ValueError(
            f"need 32 <= min_size <= max_size, got min_size={min_size}, max_size={max_size}"
        )
    if not (1 <= jpeg_quality <= 100):
        raise ValueError(f"jpeg_quality must be in 1..100, got {jpeg_quality}")
    if difficult_side_px < 0:
        raise ValueError(f"difficult_side_px must be >= 0, got {difficult_side_px}")
    check_scene_args(objects_per_image, object_size_range, max_occlusion)


def generate_scenes(
    out_dir: Path,
    num_images: int,
    seed: int = 0,
    *,
    split_fractions: Sequence[float] = (0.8, 0.1, 0.1),
    min_size: int = 250,
    max_size: int = 500,
    jpeg_quality: int = 90,
    difficult_side_px: int = 16,
    objects_per_image: tuple[int, int] = (1, 6),
    object_size_range: tuple[float, float] = (0.1, 0.6),
    max_occlusion: float = 0.4,
    workers: int | None = None,
) -> dict:
    """Generate ``num_images`` scenes into ``out_dir`` (PASCAL VOC layout); return a summary.

    Args:
        out_dir: target folder; replaced as a whole (generation happens in a sibling temporary
            folder that is renamed into place at the end, so an interrupted run never leaves a
            tree that looks complete).
        num_images: number of images; ids are ``000001``... (1-based, zero-padded to 6 digits).
        seed: the dataset seed. Image ``i`` depends only on ``(seed, i)`` and the arguments.
        split_fractions: (train, val, test) fractions; a seeded permutation assigns the ids.
        min_size, max_size: image width and height are drawn independently in this range (px).
        jpeg_quality: OpenCV JPEG quality (baseline, not optimised, not progressive).
        difficult_side_px: an object whose visible box has a longest side below this many
            pixels is marked ``difficult``.
        objects_per_image: inclusive range of shapes attempted per image (at least one is placed).
        object_size_range: shape diameter as a fraction of the shorter image side, log-uniform.
            The default's smallest shapes (25 px on a 250 px side) are about the size of the
            smallest prior of the lite FSSD at 256 px; shapes far below it cannot be matched.
        max_occlusion: a shape may never lose more than this fraction of its in-image area to
            later shapes (candidates that would are rejected before they are drawn).
        workers: processes; default: up to the CPU count for large sets, 1 for small ones.
            The output does not depend on it.

    Returns:
        ``{"num_images", "num_objects", "num_difficult", "num_truncated", "objects_per_class",
        "splits": {split: count}, "classes", "seed"}``.
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    _validate(
        num_images, split_fractions, min_size, max_size, jpeg_quality, difficult_side_px,
        tuple(objects_per_image), tuple(object_size_range), max_occlusion,
    )
    out_dir = Path(out_dir)
    params = _SceneParams(
        seed=int(seed),
        min_size=int(min_size),
        max_size=int(max_size),
        jpeg_quality=int(jpeg_quality),
        difficult_side_px=int(difficult_side_px),
        min_objects=int(objects_per_image[0]),
        max_objects=int(objects_per_image[1]),
        min_object_frac=float(object_size_range[0]),
        max_object_frac=float(object_size_range[1]),
        max_occlusion=float(max_occlusion),
        min_inside_frac=0.5,
    )
    if workers is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        workers = min(cpus or 1, 8) if num_images >= 256 else 1
    workers = max(1, min(int(workers), num_images))

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f"{out_dir.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
            (tmp / sub).mkdir(parents=True)

        if workers == 1:
            summary = _generate_range(str(tmp), 0, num_images, num_images, params)
        else:
            summary = _run_workers(tmp, num_images, params, workers)

        # ImageSets last: a tree without them is visibly incomplete
        counts = _split_counts(num_images, split_fractions)
        perm = np.random.default_rng([params.seed, 1]).permutation(num_images)
        splits: dict[str, int] = {}
        start = 0
        for name, count in zip(SPLITS, counts):
            ids = sorted(_image_id(int(i), num_images) for i in perm[start : start + count])
            start += count
            text = "".join(f"{i}\n" for i in ids)
            (tmp / "ImageSets" / "Main" / f"{name}.txt").write_text(text, encoding="utf-8")
            splits[name] = count

        # swap into place
        if out_dir.exists() or out_dir.is_symlink():
            old = out_dir.parent / f"{out_dir.name}.old-{os.getpid()}"
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    per_class = {c: 0 for c in CLASSES}
    n_obj = n_diff = n_trunc = 0
    for _, objs in summary:
        for name, difficult, truncated in objs:
            per_class[name] += 1
            n_obj += 1
            n_diff += difficult
            n_trunc += truncated
    return {
        "num_images": num_images,
        "num_objects": n_obj,
        "num_difficult": n_diff,
        "num_truncated": n_trunc,
        "objects_per_class": per_class,
        "splits": splits,
        "classes": list(CLASSES),
        "seed": params.seed,
    }


def _tarinfo(name: str, *, size: int = 0, is_dir: bool = False) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE if is_dir else tarfile.REGTYPE
    info.mode = 0o755 if is_dir else 0o644
    info.size = 0 if is_dir else size
    info.mtime = _TAR_MTIME
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def write_scenes_archive(
    archive_path: Path,
    num_images: int,
    seed: int = 0,
    *,
    top_dir: str = "synthetic",
    **generate_kwargs,
) -> dict:
    """Generate scenes and pack them into an uncompressed tar with top folder ``top_dir``.

    The archive bytes are a pure function of the arguments: entries sorted by path, directories
    listed explicitly, fixed mtime/mode/uid/gid, empty user/group names, plain ustar headers (no
    pax records). The archive is written beside its target and renamed into place. Extra keyword
    arguments go to :func:`generate_scenes`. Returns its summary plus ``"archive"`` (the path)
    and ``"size"`` (bytes).
    """
    archive_path = Path(archive_path)
    if not top_dir or "/" in top_dir or top_dir in (".", ".."):
        raise ValueError(f"top_dir must be a single folder name, got {top_dir!r}")
    archive_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".synthetic-", dir=archive_path.parent) as tmpdir:
        tree = Path(tmpdir) / top_dir
        summary = generate_scenes(tree, num_images, seed, **generate_kwargs)
        entries: list[tuple[str, Path]] = [(top_dir, tree)]
        for dirpath, dirnames, filenames in os.walk(tree):
            for d in dirnames:
                full = Path(dirpath) / d
                entries.append((f"{top_dir}/{full.relative_to(tree).as_posix()}", full))
            for f in filenames:
                full = Path(dirpath) / f
                entries.append((f"{top_dir}/{full.relative_to(tree).as_posix()}", full))
        entries.sort(key=lambda e: e[0])

        tmp_archive = archive_path.parent / f"{archive_path.name}.tmp-{os.getpid()}"
        try:
            with open(tmp_archive, "wb") as raw:
                with tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as tar:
                    for name, full in entries:
                        if full.is_dir():
                            tar.addfile(_tarinfo(name + "/", is_dir=True))
                        else:
                            data = full.read_bytes()
                            tar.addfile(_tarinfo(name, size=len(data)), io.BytesIO(data))
                raw.flush()
                os.fsync(raw.fileno())
            os.replace(tmp_archive, archive_path)
        except BaseException:
            tmp_archive.unlink(missing_ok=True)
            raise
    summary = dict(summary)
    summary["archive"] = str(archive_path)
    summary["size"] = archive_path.stat().st_size
    return summary
