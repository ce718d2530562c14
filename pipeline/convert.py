"""Raw dataset trees -> the common COCO-format split files (see docs/CONTRACTS.md).

Library functions with explicit arguments; the ``convert`` stage calls :func:`convert_dataset`.

Split rules (``convert_dataset``): train, val and test never share an image, and the test split
never selects anything (validation data choose the best epoch, drive the search and pick its best
trial; only the evaluate stage reads ``test.json``).

============  ====================================  ==========================  ==================
kind          train                                 val                         test
============  ====================================  ==========================  ==================
synthetic     synthetic ``train``                   synthetic ``val``           synthetic ``test``
voc2007       VOC2007 ``train``                     VOC2007 ``val``             VOC2007 ``test``
voc2012       VOC2012 ``train`` less val            held out from train (*)     VOC2012 ``val`` (**)
voc0712       VOC2007 + VOC2012 ``trainval`` less   held out from train (*)     VOC2007 ``test``
              val
coco2017      ``train2017`` less val                held out from train (*)     ``val2017`` (**)
============  ====================================  ==========================  ==================

(*) ``val_fraction`` of the training images (at most ``val_max_images``), chosen by the SHA-256
of their file names, so the choice is deterministic, independent of listing order and stable
when images are added; they are removed from train. ``val_fraction=0`` leaves val empty: the
paper's protocol for ``voc0712`` (train on all of 07+12 trainval, report the last epoch on 07
test), which training accepts only with ``train.select: last``.
(**) the official test annotations are not public. Train splits drop images left without any
object (counted); val and test splits keep them.

Every anomaly is counted in ``report.json`` with the first few offending files (paths relative
to the data root). An image is *bad* when its annotation is missing or unparsable (defusedxml
refuses entity expansion and external entities), or its image file is missing, unreadable,
truncated or of another size than the annotation says; bad images are dropped, and a split whose
fraction of bad images exceeds ``max_bad_fraction`` raises :class:`ConversionError` before any
split file is written. Object-level anomalies (unknown class, malformed / degenerate box, box
clipped to the image) drop or fix the object and are counted, never fatal.

Output: ``{train,val,test}.json`` and ``report.json``, JSON with sorted keys and compact
separators, ids assigned in a stable order, written atomically (temp file + ``os.replace``), so
that the same input gives byte-identical files.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Iterable, Mapping, Sequence

import defusedxml
import defusedxml.ElementTree as DET
from xml.etree.ElementTree import ParseError

from .errors import UserError

__all__ = [
    "VOC_CLASSES",
    "DATASET_KINDS",
    "BAD_IMAGE_KINDS",
    "ConversionError",
    "ConvertReport",
    "ImageHeaderError",
    "read_image_size",
    "convert_voc",
    "convert_coco",
    "convert_dataset",
    "holdout_size",
    "write_json_atomic",
]

#: The 20 PASCAL VOC classes in the devkit's (alphabetical) order: category ids 1..20.
VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)

DATASET_KINDS: tuple[str, ...] = ("synthetic", "voc2007", "voc2012", "voc0712", "coco2017")
SPLITS: tuple[str, ...] = ("train", "val", "test")

#: Anomalies that make an image bad (dropped, and counted against ``max_bad_fraction``).
BAD_IMAGE_KINDS: tuple[str, ...] = (
    "annotation_missing",
    "annotation_unparsable",
    "image_missing",
    "image_unreadable",
    "size_mismatch",
)

#: Every anomaly kind, with what happens to the image / object.
ANOMALY_KINDS: dict[str, str] = {
    "annotation_missing": "annotation file missing: image dropped",
    "annotation_unparsable": "annotation XML unparsable or refused (entities, DTD, bad fields): image dropped",
    "image_missing": "image file missing: image dropped",
    "image_unreadable": "image header unreadable or file truncated: image dropped",
    "size_mismatch": "annotated size differs from the image header: image dropped",
    "size_from_image": "annotation has no size: taken from the image header",
    "duplicate_image": "image listed twice in a split: later listing skipped",
    "image_no_objects": "image without any object (kept in val/test)",
    "empty_image_dropped": "image without any object dropped from a train split",
    "unknown_class": "object of an unknown class: object dropped",
    "box_malformed": "box with missing / non-numeric / non-finite values: object dropped",
    "box_degenerate": "box with w <= 0 or h <= 0 (before or after clipping): object dropped",
    "box_clipped": "box reaching outside the image: clipped to it",
    "annotation_orphan": "COCO annotation whose image_id is not an image: dropped",
}

_MAX_XML_BYTES = 4 << 20  # a VOC annotation is a few KB; refuse anything absurd without parsing it
_VOC_SUPERCATEGORY = "none"


class ConversionError(UserError, ValueError):
    """The raw data cannot be converted (missing tree, too many bad images, empty split)."""


class ImageHeaderError(ValueError):
    """An image file whose header cannot be read or whose data is truncated."""


# ------------------------------------------------------------------------------------------
# report


@dataclass
class ConvertReport:
    """Counts of everything that was dropped, fixed or suspicious in one converted split."""

    split: str
    sources: list[str] = field(default_factory=list)
    images_listed: int = 0
    images_written: int = 0
    annotations: int = 0
    ignored: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)
    max_examples: int = 5

    def add(self, kind: str, where: str) -> None:
        if kind not in ANOMALY_KINDS:
            raise KeyError(f"unknown anomaly kind {kind!r}")
        self.counts[kind] = self.counts.get(kind, 0) + 1
        ex = self.examples.setdefault(kind, [])
        if len(ex) < self.max_examples:
            ex.append(where)

    @property
    def bad_images(self) -> int:
        return sum(self.counts.get(k, 0) for k in BAD_IMAGE_KINDS)

    @property
    def bad_fraction(self) -> float:
        return self.bad_images / self.images_listed if self.images_listed else 0.0

    def bad_examples(self) -> list[str]:
        return [f"{k}: {w}" for k in BAD_IMAGE_KINDS for w in self.examples.get(k, [])]

    def check(self, max_bad_fraction: float) -> None:
        """Raise :class:`ConversionError` for too many bad images or an empty split."""
        if self.images_listed and self.bad_fraction > max_bad_fraction:
            parts = []
            for k in BAD_IMAGE_KINDS:
                if self.counts.get(k):
                    parts.append(f"{k} x{self.counts[k]} ({', '.join(self.examples[k])})")
            raise ConversionError(
                f"split {self.split!r}: {self.bad_images} of {self.images_listed} images are bad "
                f"({self.bad_fraction:.2%} > max_bad_fraction {max_bad_fraction:.2%}): "
                + "; ".join(parts)
                + ". Fix or re-download these files, or raise data.max_bad_fraction."
            )
        if self.images_written == 0:
            raise ConversionError(
                f"split {self.split!r} is empty after conversion ({self.images_listed} images "
                f"listed in {', '.join(self.sources) or 'no source'}); check the raw data and "
                f"the dataset kind"
            )

    def renamed(self, split: str) -> "ConvertReport":
        other = copy.deepcopy(self)
        other.split = split
        return other

    def to_dict(self) -> dict[str, Any]:
        return {
            "sources": list(self.sources),
            "images_listed": self.images_listed,
            "images_written": self.images_written,
            "annotations": self.annotations,
            "ignored": self.ignored,
            "bad_images": self.bad_images,
            "bad_fraction": round(self.bad_fraction, 6),
            "anomalies": {
                k: {"count": self.counts[k], "examples": list(self.examples.get(k, []))}
                for k in sorted(self.counts)
            },
        }


# ------------------------------------------------------------------------------------------
# small helpers


def _dumps(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, indent=None, separators=(",", ":"), allow_nan=False) + "\n"


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write ``obj`` as canonical JSON (CONTRACTS.md) to ``path`` via temp file + rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            f.write(_dumps(obj))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _rel(data_root: Path, p: str | Path) -> str:
    """``p`` relative to the data root, POSIX style; relative inputs are taken as such."""
    p = Path(p)
    if p.is_absolute():
        try:  # abspath, not resolve: data/raw may be a symlink to another disk
            p = Path(os.path.abspath(p)).relative_to(os.path.abspath(data_root))
        except ValueError:
            raise ConversionError(
                f"{p} is not inside the data root {data_root}; raw data must live under it so "
                f"that file names can be recorded relative to it"
            ) from None
    posix = PurePosixPath(p.as_posix())
    if ".." in posix.parts:
        raise ConversionError(f"path {p} escapes the data root {data_root}")
    return "" if str(posix) == "." else str(posix)


def _join(*parts: str) -> str:
    return "/".join(x for x in parts if x)


def _safe_name(name: str) -> bool:
    """A relative file name without traversal (may contain sub-folders)."""
    if not name or name.startswith(("/", "\\")) or "\\" in name or "\x00" in name:
        return False
    return all(part not in ("", ".", "..") for part in name.split("/"))


def _subset(items: list, max_items: int | None) -> list:
    """A deterministic, evenly spaced subset of at most ``max_items`` items (order kept)."""
    if max_items is None or len(items) <= max_items:
        return items
    if max_items <= 0:
        raise ValueError(f"max_images must be positive or None, got {max_items}")
    n = len(items)
    return [items[(i * n) // max_items] for i in range(max_items)]


def _categories(classes: Sequence[str], supercategories: Sequence[str] | None = None) -> list[dict]:
    sup = supercategories or [_VOC_SUPERCATEGORY] * len(classes)
    return [{"id": i + 1, "name": n, "supercategory": s} for i, (n, s) in enumerate(zip(classes, sup))]


# ------------------------------------------------------------------------------------------
# image headers


_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _jpeg_size(f) -> tuple[int, int]:
    f.seek(0)
    if f.read(2) != b"\xff\xd8":
        raise ImageHeaderError("not a JPEG (no SOI marker)")
    while True:
        b = f.read(1)
        if not b:
            raise ImageHeaderError("truncated before the frame header")
        if b != b"\xff":
            raise ImageHeaderError(f"corrupt marker structure at byte {f.tell() - 1}")
        marker = 0xFF
        while marker == 0xFF:  # fill bytes
            m = f.read(1)
            if not m:
                raise ImageHeaderError("truncated before the frame header")
            marker = m[0]
        if marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:
            continue
        if marker in (0xD9, 0xDA):
            raise ImageHeaderError("no frame header before the image data")
        seg = f.read(2)
        if len(seg) < 2:
            raise ImageHeaderError("truncated segment header")
        (length,) = struct.unpack(">H", seg)
        if length < 2:
            raise ImageHeaderError("corrupt segment length")
        if marker in _SOF_MARKERS:
            data = f.read(5)
            if len(data) < 5:
                raise ImageHeaderError("truncated frame header")
            height, width = struct.unpack(">HH", data[1:5])
            if width == 0 or height == 0:
                raise ImageHeaderError(f"frame header says {width}x{height}")
            return width, height
        f.seek(length - 2, os.SEEK_CUR)


def _png_size(f) -> tuple[int, int]:
    f.seek(0)
    head = f.read(24)
    if len(head) < 24 or head[:8] != _PNG_SIGNATURE or head[12:16] != b"IHDR":
        raise ImageHeaderError("not a PNG (bad signature or no IHDR)")
    width, height = struct.unpack(">II", head[16:24])
    if width == 0 or height == 0:
        raise ImageHeaderError(f"IHDR says {width}x{height}")
    return width, height


def _decodes_fully(path: Path) -> bool:
    """Slow path: a full decode (for files with trailing data after their end marker)."""
    try:
        from PIL import Image  # installed with matplotlib; only used on this rare path
    except ImportError:  # pragma: no cover
        return False
    try:
        with Image.open(path) as im:
            im.load()
        return True
    except Exception:
        return False


def read_image_size(path: Path) -> tuple[int, int]:
    """``(width, height)`` from a JPEG/PNG header, checking the file is not truncated.

    Reads a few hundred bytes: the markers up to the JPEG frame header (or the PNG IHDR) and
    the file's tail, which must hold the end marker (JPEG EOI / PNG IEND); a file without it
    (trailing data) is fully decoded once before being called truncated. Other formats go
    through a full decode. Raises :class:`ImageHeaderError` (a ``ValueError``) for unreadable
    or truncated files and ``FileNotFoundError`` for missing ones.
    """
    path = Path(path)
    with open(path, "rb") as f:
        magic = f.read(8)
        f.seek(0, os.SEEK_END)
        size = f.tell()
        if magic[:2] == b"\xff\xd8":
            wh = _jpeg_size(f)
            end = b"\xff\xd9"
        elif magic == _PNG_SIGNATURE:
            wh = _png_size(f)
            end = b"IEND"
        else:
            wh, end = None, None
        if end is not None:
            f.seek(max(size - 64, 0))
            if end in f.read():
                return wh
    if wh is not None:
        if _decodes_fully(path):
            return wh
        raise ImageHeaderError("file is truncated (no end marker)")
    try:
        from PIL import Image

        with Image.open(path) as im:
            im.load()
            return im.size
    except Exception as exc:
        raise ImageHeaderError(f"not a readable image ({type(exc).__name__}: {exc})") from None


def _check_image(
    data_root: Path, rel_path: str, size: tuple[int, int] | None, report: ConvertReport
) -> tuple[int, int] | None:
    """The image's (w, h), or None (counted) when it is missing/unreadable/mismatched."""
    try:
        wh = read_image_size(data_root / rel_path)
    except FileNotFoundError:
        report.add("image_missing", rel_path)
        return None
    except (ImageHeaderError, OSError):
        report.add("image_unreadable", rel_path)
        return None
    if size is not None and tuple(size) != tuple(wh):
        report.add("size_mismatch", f"{rel_path} (annotation {size[0]}x{size[1]}, image {wh[0]}x{wh[1]})")
        return None
    return wh


# ------------------------------------------------------------------------------------------
# boxes


def _finite(*vals: Any) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in vals)


def _clip_box(
    x: float, y: float, w: float, h: float, width: int, height: int, where: str, report: ConvertReport
) -> tuple[float, float, float, float] | None:
    """Clip an xywh box to the image; None (counted) for degenerate boxes."""
    if w <= 0 or h <= 0:
        report.add("box_degenerate", where)
        return None
    x1, y1 = min(max(x, 0.0), float(width)), min(max(y, 0.0), float(height))
    x2, y2 = min(max(x + w, 0.0), float(width)), min(max(y + h, 0.0), float(height))
    if x2 - x1 <= 0 or y2 - y1 <= 0:
        report.add("box_degenerate", where)
        return None
    if (x1, y1, x2, y2) != (x, y, x + w, y + h):
        report.add("box_clipped", where)
        return x1, y1, x2 - x1, y2 - y1
    return float(x), float(y), float(w), float(h)


# ------------------------------------------------------------------------------------------
# VOC


class _BadAnnotation(ValueError):
    pass


def _num(text: str | None, what: str) -> float:
    if text is None:
        raise _BadAnnotation(f"missing {what}")
    try:
        v = float(text.strip())
    except ValueError:
        raise _BadAnnotation(f"{what} is not a number: {text.strip()!r}") from None
    if not math.isfinite(v):
        raise _BadAnnotation(f"{what} is not finite: {text.strip()!r}")
    return v


def _parse_voc_xml(path: Path) -> tuple[tuple[int, int] | None, list[dict]]:
    """(size or None, objects) from a VOC XML file; raises _BadAnnotation."""
    size, objects, _ = _parse_voc_xml_file(path)
    return size, objects


def _parse_voc_xml_file(path: Path) -> tuple[tuple[int, int] | None, list[dict], str | None]:
    """(size or None, objects, <filename> or None) from a VOC XML file; raises _BadAnnotation."""
    try:
        if path.stat().st_size > _MAX_XML_BYTES:
            raise _BadAnnotation(f"file larger than {_MAX_XML_BYTES} bytes")
        root = DET.parse(str(path), forbid_dtd=False, forbid_entities=True, forbid_external=True).getroot()
    except (ParseError, defusedxml.DefusedXmlException, UnicodeDecodeError) as exc:
        raise _BadAnnotation(f"{type(exc).__name__}: {exc}") from None
    if root.tag != "annotation":
        raise _BadAnnotation(f"root element is <{root.tag}>, expected <annotation>")
    size = None
    size_el = root.find("size")
    if size_el is not None and size_el.findtext("width") is not None:
        w = _num(size_el.findtext("width"), "size/width")
        h = _num(size_el.findtext("height"), "size/height")
        if w != int(w) or h != int(h) or w < 0 or h < 0:
            raise _BadAnnotation(f"size {w}x{h} is not a pair of non-negative integers")
        if w > 0 and h > 0:
            size = (int(w), int(h))
    objects = []
    for obj in root.findall("object"):
        bb = obj.find("bndbox")
        objects.append(
            {
                "name": (obj.findtext("name") or "").strip(),
                "difficult": (obj.findtext("difficult") or "0").strip(),
                "box": None if bb is None else [bb.findtext(k) for k in ("xmin", "ymin", "xmax", "ymax")],
            }
        )
    filename = (root.findtext("filename") or "").strip() or None
    return size, objects, filename


def _read_image_set(data_root: Path, voc_rel: str, image_set: str) -> list[str]:
    path = data_root / voc_rel / "ImageSets" / "Main" / f"{image_set}.txt"
    if not path.is_file():
        raise ConversionError(
            f"image set list {_join(voc_rel, 'ImageSets/Main', image_set + '.txt')} not found under "
            f"the data root {data_root}; did the download/extract stage run for this dataset?"
        )
    ids = []
    for line in path.read_text(encoding="utf-8").splitlines():
        parts = line.split()
        if parts:
            ids.append(parts[0])
    return ids


def _voc_split(
    data_root: Path,
    sets: Sequence[tuple[str | Path, str]],
    *,
    split: str,
    classes: Sequence[str],
    keep_empty: bool,
    max_images: int | None,
    check_images: bool = True,
) -> tuple[dict, ConvertReport]:
    report = ConvertReport(split=split)
    listed: list[tuple[str, str]] = []
    for voc_dir, image_set in sets:
        voc_rel = _rel(data_root, voc_dir)
        report.sources.append(f"{voc_rel}:{image_set}")
        listed.extend((voc_rel, i) for i in _read_image_set(data_root, voc_rel, image_set))
    listed = _subset(listed, max_images)

    items: list[tuple[str, Any]] = []
    for voc_rel, image_id in listed:
        xml_rel = _join(voc_rel, "Annotations", f"{image_id}.xml")
        if not _safe_name(image_id) or "/" in image_id:
            report.images_listed += 1
            report.add("annotation_unparsable", f"{xml_rel} (bad image id {image_id!r} in the image set)")
            continue
        items.append((xml_rel, _join(voc_rel, "JPEGImages", f"{image_id}.jpg")))
    return _voc_items(data_root, items, report, classes=classes, keep_empty=keep_empty, check_images=check_images)


def _voc_items(
    data_root: Path,
    items: Sequence[tuple[str, Any]],
    report: ConvertReport,
    *,
    classes: Sequence[str],
    keep_empty: bool,
    check_images: bool = True,
) -> tuple[dict, ConvertReport]:
    """Convert VOC XML files into one COCO-format split.

    ``items``: (XML path relative to the data root, the image: a relative path, or a callable
    that takes the XML's ``<filename>`` and returns the relative image path).
    """
    class_ids = {name: i + 1 for i, name in enumerate(classes)}
    images: list[dict] = []
    annotations: list[dict] = []
    seen: set[str] = set()
    for xml_rel, image in items:
        report.images_listed += 1
        if not callable(image) and image in seen:  # a fixed image path: a repeated listing is caught unparsed
            report.images_listed -= 1
            report.add("duplicate_image", image)
            continue
        try:
            size, objects, filename = _parse_voc_xml_file(data_root / xml_rel)
        except FileNotFoundError:
            report.add("annotation_missing", xml_rel)
            continue
        except (_BadAnnotation, OSError) as exc:
            report.add("annotation_unparsable", f"{xml_rel} ({exc})")
            continue
        img_rel = image(filename) if callable(image) else image
        if callable(image) and img_rel in seen:
            report.images_listed -= 1
            report.add("duplicate_image", img_rel)
            continue
        seen.add(img_rel)
        if check_images:
            wh = _check_image(data_root, img_rel, size, report)
            if wh is None:
                continue
        elif size is None:
            report.add("annotation_unparsable", f"{xml_rel} (no size and image checks are off)")
            continue
        else:
            wh = size
        if size is None:
            report.add("size_from_image", xml_rel)
        width, height = wh

        anns: list[dict] = []
        for k, obj in enumerate(objects):
            where = f"{xml_rel}#object{k + 1}"
            cat = class_ids.get(obj["name"])
            if cat is None:
                report.add("unknown_class", f"{where} ({obj['name']!r})")
                continue
            try:
                if obj["box"] is None:
                    raise _BadAnnotation("no bndbox")
                xmin, ymin, xmax, ymax = (
                    _num(v, n) for v, n in zip(obj["box"], ("xmin", "ymin", "xmax", "ymax"))
                )
                difficult = _num(obj["difficult"], "difficult")
            except _BadAnnotation as exc:
                report.add("box_malformed", f"{where} ({exc})")
                continue
            # CONTRACTS.md: VOC 1-based inclusive -> continuous, top-left origin
            box = _clip_box(xmin - 1, ymin - 1, xmax - (xmin - 1), ymax - (ymin - 1), width, height, where, report)
            if box is None:
                continue
            anns.append({"category_id": cat, "bbox": list(box), "ignore": int(difficult != 0)})
        if not anns:
            report.add("image_no_objects", img_rel)
            if not keep_empty:
                report.add("empty_image_dropped", img_rel)
                continue
        new_id = len(images) + 1
        images.append({"id": new_id, "file_name": img_rel, "width": width, "height": height})
        for a in anns:
            x, y, w, h = a["bbox"]
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": new_id,
                    "category_id": a["category_id"],
                    "bbox": [x, y, w, h],
                    "area": w * h,
                    "iscrowd": 0,
                    "ignore": a["ignore"],
                }
            )
            report.ignored += a["ignore"]
    report.images_written = len(images)
    report.annotations = len(annotations)
    return {"images": images, "annotations": annotations, "categories": _categories(classes)}, report


def convert_voc(
    data_root: Path,
    sets: Sequence[tuple[str | Path, str]],
    out_path: Path,
    *,
    classes: Sequence[str] = VOC_CLASSES,
    split: str | None = None,
    keep_empty: bool = True,
    max_images: int | None = None,
    max_bad_fraction: float | None = None,
    check_images: bool = True,
) -> ConvertReport:
    """Convert PASCAL VOC image sets into one COCO-format split file.

    Args:
        data_root: the data root; ``file_name`` values are relative to it.
        sets: ``(voc_dir, image_set)`` pairs, ``voc_dir`` relative to the data root (or an
            absolute path inside it), e.g. ``[("raw/VOCdevkit/VOC2007", "trainval"),
            ("raw/VOCdevkit/VOC2012", "trainval")]``; images are ``voc_dir/JPEGImages/<id>.jpg``.
        out_path: the JSON file to write (atomically).
        classes: class names in category-id order (1..K); other names are counted and dropped.
        split: the name used in the report (default: ``out_path``'s stem).
        keep_empty: keep images left without objects (they are counted either way).
        max_images: keep a deterministic evenly spaced subset of at most this many images.
        max_bad_fraction: when given, raise :class:`ConversionError` (and write nothing) if the
            fraction of bad images exceeds it.
        check_images: read every image header (size check, truncation).
    """
    data_root, out_path = Path(data_root), Path(out_path)
    coco, report = _voc_split(
        data_root, sets, split=split or out_path.stem, classes=tuple(classes),
        keep_empty=keep_empty, max_images=max_images, check_images=check_images,
    )
    if max_bad_fraction is not None:
        report.check(max_bad_fraction)
    write_json_atomic(out_path, coco)
    return report


# ------------------------------------------------------------------------------------------
# COCO


def _load_coco_json(path: Path, where: str) -> dict:
    if not path.is_file():
        raise ConversionError(f"COCO annotation file {where} not found; did the download/extract stage run?")
    try:
        with open(path, "rb") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConversionError(f"COCO annotation file {where} is not valid JSON: {exc}") from None
    if not isinstance(data, dict) or not all(
        isinstance(data.get(k), list) for k in ("images", "annotations", "categories")
    ):
        raise ConversionError(
            f"COCO annotation file {where} needs the lists 'images', 'annotations' and 'categories'"
        )
    return data


def coco_categories(data: Mapping[str, Any], where: str) -> list[dict]:
    """The categories of a COCO JSON, sorted by id; malformed or duplicate ids raise ConversionError."""
    cats = []
    for c in data["categories"]:
        if not isinstance(c, dict) or not _finite(c.get("id")) or not isinstance(c.get("name"), str):
            raise ConversionError(f"{where}: malformed category {c!r}")
        cats.append(c)
    cats.sort(key=lambda c: c["id"])
    if len({c["id"] for c in cats}) != len(cats):
        raise ConversionError(f"{where}: duplicate category ids")
    return cats


def _coco_split(
    data_root: Path,
    annotation_file: str | Path,
    image_dir: str | Path,
    *,
    split: str,
    keep_empty: bool,
    max_images: int | None,
    check_images: bool = True,
    categories_from: Sequence[dict] | None = None,
    resolve_image: Any = None,
) -> tuple[dict, ConvertReport]:
    """``categories_from``: use these (dataset) categories instead of the file's (so that every
    split maps the dataset's ids alike); ``resolve_image(file_name)``: the image's path relative to
    the data root, for exports whose ``file_name`` is not relative to one image folder."""
    ann_rel = _rel(data_root, annotation_file)
    img_dir_rel = _rel(data_root, image_dir)
    report = ConvertReport(split=split, sources=[f"{ann_rel}:{img_dir_rel}"])
    data = _load_coco_json(data_root / ann_rel, ann_rel)

    cats = coco_categories(data, ann_rel) if categories_from is None else list(categories_from)
    cat_map = {c["id"]: i + 1 for i, c in enumerate(cats)}
    categories = [
        {"id": i + 1, "name": c["name"], "supercategory": str(c.get("supercategory", "")), "source_id": c["id"]}
        for i, c in enumerate(cats)
    ]

    by_image: dict[Any, list[dict]] = {}
    for a in data["annotations"]:
        if isinstance(a, dict):
            by_image.setdefault(a.get("image_id"), []).append(a)

    raw_images = []
    for k, im in enumerate(data["images"]):
        img_id = im.get("id") if isinstance(im, dict) else None
        fname = im.get("file_name") if isinstance(im, dict) else None
        named = isinstance(fname, str) and (_safe_name(fname) if resolve_image is None else bool(fname))
        if not isinstance(img_id, int) or isinstance(img_id, bool) or not named:
            report.images_listed += 1
            report.add("annotation_unparsable", f"{ann_rel}#images[{k}] (needs an int id and a relative file_name)")
            continue
        raw_images.append(im)
    known_ids = {im["id"] for im in raw_images}
    raw_images.sort(key=lambda im: im["id"])
    raw_images = _subset(raw_images, max_images)

    images: list[dict] = []
    annotations: list[dict] = []
    seen_ids: set = set()
    for im in raw_images:
        report.images_listed += 1
        img_id, fname = im["id"], im["file_name"]
        img_rel = _join(img_dir_rel, fname) if resolve_image is None else resolve_image(fname)
        if img_id in seen_ids:
            report.images_listed -= 1
            report.add("duplicate_image", f"{img_rel} (id {img_id})")
            continue
        seen_ids.add(img_id)
        w, h = im.get("width"), im.get("height")
        size = (int(w), int(h)) if _finite(w, h) and w > 0 and h > 0 else None
        if check_images:
            wh = _check_image(data_root, img_rel, size, report)
            if wh is None:
                continue
        elif size is None:
            report.add("annotation_unparsable", f"{ann_rel}#image:{img_id} (no size and image checks are off)")
            continue
        else:
            wh = size
        if size is None:
            report.add("size_from_image", img_rel)
        width, height = wh

        anns = []
        raw_anns = []
        for a in by_image.get(img_id, []):
            if isinstance(a.get("id"), int) and not isinstance(a.get("id"), bool):
                raw_anns.append(a)
            else:
                report.add("box_malformed", f"{img_rel}#ann:{a.get('id')!r} (annotation id is not an int)")
        for a in sorted(raw_anns, key=lambda a: a["id"]):
            where = f"{img_rel}#ann:{a['id']}"
            cat = cat_map.get(a.get("category_id")) if _finite(a.get("category_id")) else None
            if cat is None:
                report.add("unknown_class", f"{where} (category_id {a.get('category_id')!r})")
                continue
            bbox = a.get("bbox")
            if not isinstance(bbox, list) or len(bbox) != 4 or not _finite(*bbox):
                report.add("box_malformed", where)
                continue
            box = _clip_box(*(float(v) for v in bbox), width, height, where, report)
            if box is None:
                continue
            crowd = int(bool(a.get("iscrowd", 0)))
            anns.append((a["id"], cat, box, crowd))
        if not anns:
            report.add("image_no_objects", img_rel)
            if not keep_empty:
                report.add("empty_image_dropped", img_rel)
                continue
        images.append({"id": img_id, "file_name": img_rel, "width": width, "height": height})
        for ann_id, cat, (x, y, bw, bh), crowd in anns:
            annotations.append(
                {
                    "id": ann_id,
                    "image_id": img_id,
                    "category_id": cat,
                    "bbox": [x, y, bw, bh],
                    "area": bw * bh,
                    "iscrowd": crowd,
                    "ignore": crowd,
                }
            )
            report.ignored += crowd
    for image_id, anns in by_image.items():
        if image_id not in known_ids:
            for a in anns:
                report.add("annotation_orphan", f"{ann_rel}#ann:{a.get('id')} (image_id {image_id!r})")
    report.images_written = len(images)
    report.annotations = len(annotations)
    return {"images": images, "annotations": annotations, "categories": categories}, report


def convert_coco(
    data_root: Path,
    annotation_file: str | Path,
    image_dir: str | Path,
    out_path: Path,
    *,
    split: str | None = None,
    keep_empty: bool = True,
    max_images: int | None = None,
    max_bad_fraction: float | None = None,
    check_images: bool = True,
) -> ConvertReport:
    """Convert an official COCO ``instances_*.json`` into one split file.

    Category ids are mapped to contiguous ``1..K`` in the order of the original ids (names and
    supercategories kept); image and annotation ids are kept (unique ints, so results can be
    matched with official tools); ``iscrowd: 1`` is kept and also sets ``ignore: 1``; ``area`` is
    ``w * h`` of the (clipped) box as the contract says, not the segmentation area; segmentations
    are not copied. ``annotation_file`` and ``image_dir`` are relative to ``data_root``. Other
    arguments as in :func:`convert_voc`.
    """
    data_root, out_path = Path(data_root), Path(out_path)
    coco, report = _coco_split(
        data_root, annotation_file, image_dir, split=split or out_path.stem,
        keep_empty=keep_empty, max_images=max_images, check_images=check_images,
    )
    if max_bad_fraction is not None:
        report.check(max_bad_fraction)
    write_json_atomic(out_path, coco)
    return report


# ------------------------------------------------------------------------------------------
# the stage


def _find_dir(candidates: Iterable[Path], marker: str, what: str, fix: str) -> Path:
    cands = list(candidates)
    for c in cands:
        if (c / marker).exists():
            return c
    raise ConversionError(
        f"{what} not found: looked for {marker} under " + ", ".join(str(c) for c in cands) + f". {fix}"
    )


def _voc_dir(raw_dir: Path, year: str) -> Path:
    return _find_dir(
        [raw_dir / "VOCdevkit" / f"VOC{year}", raw_dir / f"VOC{year}"],
        "ImageSets/Main",
        f"PASCAL VOC {year}",
        "Run the download stage for this dataset (it extracts VOCdevkit/ into the raw folder).",
    )


HOLD_OUT = ("holdout", None)
"""A val plan entry: held out from the train split (see the module docstring)."""


def _split_plan(kind: str, raw_dir: Path) -> tuple[tuple[str, ...], dict[str, tuple[str, Any]]]:
    """classes (() for COCO) and, per split, ('voc', sets), ('coco', (ann_file, image_dir)) or
    :data:`HOLD_OUT` (val only)."""
    if kind == "synthetic":
        from fssd.data.scene_spec import CLASSES

        d = _find_dir(
            [raw_dir / "synthetic"], "ImageSets/Main", "the synthetic dataset",
            "Run the download stage with data.dataset=synthetic (it generates and extracts it).",
        )
        return CLASSES, {s: ("voc", [(d, s)]) for s in SPLITS}
    if kind == "voc2007":
        d = _voc_dir(raw_dir, "2007")
        return VOC_CLASSES, {s: ("voc", [(d, s)]) for s in SPLITS}
    if kind == "voc2012":
        d = _voc_dir(raw_dir, "2012")
        return VOC_CLASSES, {"train": ("voc", [(d, "train")]), "val": HOLD_OUT, "test": ("voc", [(d, "val")])}
    if kind == "voc0712":
        d07, d12 = _voc_dir(raw_dir, "2007"), _voc_dir(raw_dir, "2012")
        return VOC_CLASSES, {"train": ("voc", [(d07, "trainval"), (d12, "trainval")]), "val": HOLD_OUT,
                             "test": ("voc", [(d07, "test")])}
    if kind == "coco2017":
        root = _find_dir(
            [raw_dir / "coco2017", raw_dir / "coco", raw_dir], "annotations/instances_val2017.json",
            "COCO 2017", "Run the download stage with data.dataset=coco2017.",
        )

        def images(name: str) -> Path:
            for c in (root / name, root / "images" / name):
                if c.is_dir():
                    return c
            raise ConversionError(f"COCO image folder {name}/ not found under {root}")

        train = ("coco", (root / "annotations" / "instances_train2017.json", images("train2017")))
        test = ("coco", (root / "annotations" / "instances_val2017.json", images("val2017")))
        return (), {"train": train, "val": HOLD_OUT, "test": test}
    raise ValueError(f"unknown dataset kind {kind!r}; expected one of {', '.join(DATASET_KINDS)}")


def holdout_size(num_images: int, val_fraction: float, val_max_images: int | None) -> int:
    """How many of ``num_images`` training images go to a held-out val split: ``val_fraction`` of
    them rounded, at least 1 when the fraction is positive, at most ``val_max_images``, and never
    all of them (train keeps at least one image)."""
    if val_fraction <= 0 or num_images < 2:
        return 0
    n = max(1, round(val_fraction * num_images))
    if val_max_images is not None:
        n = min(n, val_max_images)
    return min(n, num_images - 1)


def _holdout_key(file_name: str) -> str:
    return hashlib.sha256(file_name.encode("utf-8")).hexdigest()


def _hold_out(pool: dict, pool_report: ConvertReport, n_val: int) -> tuple[dict, ConvertReport, dict, ConvertReport]:
    """Split a converted train pool (empty images kept) into (train, its report, val, its report).

    The ``n_val`` images with the smallest SHA-256 of their file name go to val; train then drops
    the images without objects (counted as ``empty_image_dropped``), as a train split always does.
    """
    chosen = {im["id"] for im in sorted(pool["images"], key=lambda im: _holdout_key(im["file_name"]))[:n_val]}
    train_rep = pool_report.renamed("train")
    val_rep = ConvertReport(split="val", sources=[f"held out from train: {n_val} of {len(pool['images'])} images"])
    with_objects = {a["image_id"] for a in pool["annotations"]}
    parts: dict[str, dict] = {}
    for name, rep, keep in (("train", train_rep, lambda i: i not in chosen), ("val", val_rep, lambda i: i in chosen)):
        images = []
        for im in pool["images"]:
            if not keep(im["id"]):
                continue
            if name == "train" and im["id"] not in with_objects:
                rep.add("empty_image_dropped", im["file_name"])
                continue
            images.append(im)
        ids = {im["id"] for im in images}
        anns = [a for a in pool["annotations"] if a["image_id"] in ids]
        parts[name] = {"images": images, "annotations": anns, "categories": pool["categories"]}
        rep.images_written = len(images)
        rep.annotations = len(anns)
        rep.ignored = sum(a["ignore"] for a in anns)
    val_rep.images_listed = len(parts["val"]["images"])
    return parts["train"], train_rep, parts["val"], val_rep


def _overlaps(results: Mapping[str, tuple[dict, ConvertReport]]) -> list[str]:
    """Images that appear in two splits (by file name): always an error."""
    names = {s: {im["file_name"] for im in results[s][0]["images"]} for s in SPLITS}
    errors = []
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        both = sorted(names[a] & names[b])
        if both:
            errors.append(f"splits {a!r} and {b!r} share {len(both)} image(s), e.g. {', '.join(both[:3])}")
    return errors


def convert_dataset(
    kind: str,
    raw_dir: Path,
    out_dir: Path,
    data_root: Path,
    max_bad_fraction: float,
    *,
    val_fraction: float = 0.05,
    val_max_images: int | None = None,
    check_images: bool = True,
) -> dict:
    """Convert a raw dataset into ``out_dir/{train,val,test}.json`` + ``out_dir/report.json``.

    Args:
        kind: one of :data:`DATASET_KINDS` (split rules in the module docstring).
        raw_dir: where download extracted the trees (``data/raw``); must be inside ``data_root``.
        out_dir: where the split files go (``data/processed``).
        data_root: the data root; ``file_name`` values are relative to it.
        max_bad_fraction: per split, the largest tolerated fraction of bad images.
        val_fraction: for kinds without their own validation split, the fraction of the
            training images held out as val (0: no val split).
        val_max_images: cap the val split: the held-out count, or a deterministic evenly spaced
            subset of a dataset's own val split.
        check_images: read every image header (size check, truncation).

    All splits are converted and checked before anything is written; on failure a
    ``report.failed.json`` is written beside the (untouched) outputs and
    :class:`ConversionError` names the split, counts and first offending files.
    Returns the report (also written to ``out_dir/report.json``).
    """
    if kind not in DATASET_KINDS:
        raise ValueError(f"unknown dataset kind {kind!r}; expected one of {', '.join(DATASET_KINDS)}")
    if not (isinstance(max_bad_fraction, (int, float)) and 0.0 <= max_bad_fraction <= 1.0):
        raise ValueError(f"max_bad_fraction must be in [0, 1], got {max_bad_fraction!r}")
    if not (isinstance(val_fraction, (int, float)) and 0.0 <= val_fraction < 1.0):
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    if val_max_images is not None and val_max_images <= 0:
        raise ValueError(f"val_max_images must be positive or None, got {val_max_images!r}")
    data_root = Path(os.path.abspath(data_root))
    raw_dir = Path(os.path.abspath(raw_dir))
    out_dir = Path(out_dir)
    _rel(data_root, raw_dir)  # raises unless raw_dir is inside the data root
    classes, plan = _split_plan(kind, raw_dir)
    holdout = plan["val"] == HOLD_OUT

    results: dict[str, tuple[dict, ConvertReport]] = {}
    for split in SPLITS:
        if plan[split] == HOLD_OUT:
            continue
        how, spec = plan[split]
        # a held-out val comes from the train pool, empty images included
        keep_empty = split != "train" or holdout
        max_images = val_max_images if split == "val" else None
        if how == "voc":
            coco, rep = _voc_split(data_root, spec, split=split, classes=classes, keep_empty=keep_empty,
                                   max_images=max_images, check_images=check_images)
        else:
            ann_file, image_dir = spec
            coco, rep = _coco_split(data_root, ann_file, image_dir, split=split, keep_empty=keep_empty,
                                    max_images=max_images, check_images=check_images)
        results[split] = (coco, rep)
    n_val = 0
    if holdout:
        pool, pool_rep = results["train"]
        n_val = holdout_size(len(pool["images"]), val_fraction, val_max_images)
        train, train_rep, val, val_rep = _hold_out(pool, pool_rep, n_val)
        results["train"], results["val"] = (train, train_rep), (val, val_rep)

    categories = results["train"][0]["categories"]
    report: dict[str, Any] = {
        "dataset": kind,
        "max_bad_fraction": max_bad_fraction,
        "classes": [c["name"] for c in categories],
        "splits": {s: results[s][1].to_dict() for s in SPLITS},
        "val": ({"from": "train", "val_fraction": val_fraction, "val_max_images": val_max_images, "images": n_val}
                if holdout else {"from": "dataset", "val_max_images": val_max_images}),
    }
    errors = []
    for split in SPLITS:
        if split == "val" and holdout and n_val == 0:
            continue  # no validation split asked for (val_fraction 0)
        try:
            results[split][1].check(max_bad_fraction)
        except ConversionError as exc:
            errors.append(str(exc))
        if results[split][0]["categories"] != categories:
            errors.append(f"split {split!r} has other categories than train")
    return _write_splits(out_dir, results, report, errors + _overlaps(results))


def _write_splits(out_dir: Path, results: Mapping[str, tuple[dict, ConvertReport]], report: dict[str, Any],
                  errors: list[str]) -> dict[str, Any]:
    """Write the split files and report.json, or, when there are errors, only report.failed.json
    (the previous outputs stay as they are) and raise :class:`ConversionError`."""
    if errors:
        report["ok"] = False
        report["errors"] = errors
        write_json_atomic(out_dir / "report.failed.json", report)
        raise ConversionError(" | ".join(errors) + f" (full report: {out_dir / 'report.failed.json'})")
    report["ok"] = True
    for split in SPLITS:
        write_json_atomic(out_dir / f"{split}.json", results[split][0])
    write_json_atomic(out_dir / "report.json", report)
    (out_dir / "report.failed.json").unlink(missing_ok=True)
    return report


# ------------------------------------------------------------------------------------------
# Your own data: a VOC-XML or COCO-JSON export (CVAT, Label Studio, Roboflow, a script)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".JPG", ".JPEG", ".PNG")
_VOC_IMAGE_DIRS = ("JPEGImages", "images", "Images", "")
_SPLIT_NAMES = {"train": ("train", "Train", "training"), "val": ("val", "valid", "Validation", "validation"),
                "test": ("test", "Test", "testing")}


@dataclass(frozen=True)
class Layout:
    """Where a custom dataset's parts are, relative to its folder (``root``, relative to the raw
    directory); ``None`` means: find it (see :func:`convert_custom`)."""

    root: str = ""
    annotations: str | None = None
    images: str | None = None
    train: str | None = None
    val: str | None = None
    test: str | None = None


def _export_root(raw_dir: Path, layout: Layout) -> Path:
    root = raw_dir / layout.root if layout.root else raw_dir
    if not root.is_dir():
        raise ConversionError(f"data.layout.root: {root} is not a folder; give the export's folder inside {raw_dir}")
    if not layout.root:  # an archive that unpacks into one folder: use it
        entries = [e for e in root.iterdir() if not e.name.startswith(".")]
        if len(entries) == 1 and entries[0].is_dir():
            return entries[0]
    return root


def _given(root: Path, rel: str | None, key: str, *, is_dir: bool) -> Path | None:
    if rel is None:
        return None
    path = root / rel
    if not (path.is_dir() if is_dir else path.is_file()):
        raise ConversionError(f"data.layout.{key}: {path} does not exist; fix the path (relative to {root})")
    return path


def _image_finder(data_root: Path, dirs: Sequence[Path]) -> Any:
    """A function: (a file name or stem, the annotation's folder) -> the image path relative to the
    data root (the first existing candidate, else the first candidate: reported as missing)."""
    def find(name: str | None, stem: str, beside: Path) -> str:
        names = []
        if name:
            clean = name.replace("\\", "/")
            names += [clean] if _safe_name(clean) else []
            names.append(PurePosixPath(clean).name)
        names += [stem + s for s in IMAGE_SUFFIXES]
        candidates = [d / n for d in (*dirs, beside) for n in names if n]
        for c in candidates:
            if c.is_file():
                return _rel(data_root, c)
        # not found: report where it was expected first (the image folder, else beside the annotation)
        return _rel(data_root, dirs[0] / names[0] if dirs else beside / PurePosixPath(names[0]).name)
    return find


def _voc_pool(root: Path, layout: Layout) -> tuple[Path, dict[str, list[Path]]]:
    """(annotation folder, split -> XML files): the image-set files when the export has them
    (given in data.layout or ``ImageSets/Main/<split>.txt``), per-split folders (Roboflow's
    train/valid/test), else every XML file under the annotation folder as one pool (``"pool"``)."""
    ann_dir = _given(root, layout.annotations, "annotations", is_dir=True)
    if ann_dir is None:
        ann_dir = root / "Annotations" if (root / "Annotations").is_dir() else root
    splits: dict[str, list[Path]] = {}
    sets_dir = root / "ImageSets" / "Main"
    for split in ("train", "val", "test"):
        given = _given(root, getattr(layout, split), split, is_dir=False)
        if given is None and sets_dir.is_dir():
            given = next((sets_dir / f"{n}.txt" for n in _SPLIT_NAMES[split] if (sets_dir / f"{n}.txt").is_file()), None)
        if given is not None:
            ids = [ln.split()[0] for ln in given.read_text(encoding="utf-8").splitlines() if ln.split()]
            splits[split] = [ann_dir / f"{i}.xml" for i in ids]
    if splits:
        return ann_dir, splits
    for split in ("train", "val", "test"):  # Roboflow: train/ valid/ test/ with XML beside the images
        for name in _SPLIT_NAMES[split]:
            if (root / name).is_dir() and any((root / name).glob("*.xml")):
                splits[split] = sorted((root / name).glob("*.xml"))
                break
    if splits:
        return ann_dir, splits
    pool = sorted(p for p in ann_dir.rglob("*.xml") if "ImageSets" not in p.parts)
    if not pool:
        raise ConversionError(f"no VOC annotations (*.xml) found under {ann_dir}; set data.layout.annotations to the "
                              "folder of XML files (relative to the export's folder), or data.format: coco")
    return ann_dir, {"pool": pool}


def _coco_files(root: Path, layout: Layout) -> dict[str, Path]:
    """split -> COCO JSON: data.layout's, else found: ``annotations/instances_<split>.json`` (CVAT,
    COCO), ``<split>/_annotations.coco.json`` (Roboflow), or a single JSON as one pool
    (``result.json`` of Label Studio, CVAT's ``instances_default.json``)."""
    files = {s: p for s in ("train", "val", "test") if (p := _given(root, getattr(layout, s), s, is_dir=False))}
    if files:
        return files
    for split in ("train", "val", "test"):
        for name in _SPLIT_NAMES[split]:
            for cand in (root / "annotations" / f"instances_{name}.json", root / name / "_annotations.coco.json",
                         root / f"{name}.json", root / "annotations" / f"{name}.json"):
                if cand.is_file() and split not in files:
                    files[split] = cand
    if files:
        return files
    found = sorted([*root.glob("*.json"), *(root / "annotations").glob("*.json")])
    if len(found) == 1:
        return {"pool": found[0]}
    if not found:
        raise ConversionError(f"no COCO annotation file (*.json) found under {root}; set data.layout.train (and val, "
                              "test) to the JSON files, relative to the export's folder, or data.format: voc")
    raise ConversionError(f"several JSON files under {root} ({', '.join(p.name for p in found[:5])}) and none named "
                          "after a split; set data.layout.train (and val, test) to the right ones")


def _hold_out_splits(results: dict[str, tuple[dict, ConvertReport]], val_fraction: float, test_fraction: float,
                     val_max_images: int | None) -> dict[str, list[str]]:
    """Fill missing val/test splits from train (test first, then val; by file-name hash, so the
    choice is deterministic and the splits never overlap). Returns the held-out file names."""
    held: dict[str, list[str]] = {}
    for split, fraction, cap in (("test", test_fraction, None), ("val", val_fraction, val_max_images)):
        if split in results:
            continue
        pool, rep = results["train"]
        n = holdout_size(len(pool["images"]), fraction, cap)
        train, train_rep, part, part_rep = _hold_out(pool, rep, n)
        part_rep.split = split
        results["train"], results[split] = (train, train_rep), (part, part_rep)
        held[split] = [im["file_name"] for im in part["images"]]
    return held


def convert_custom(
    fmt: str,
    raw_dir: Path,
    out_dir: Path,
    data_root: Path,
    max_bad_fraction: float,
    *,
    layout: Layout = Layout(),
    classes: Sequence[str] = (),
    val_fraction: float = 0.05,
    test_fraction: float = 0.1,
    val_max_images: int | None = None,
    check_images: bool = True,
) -> dict:
    """Convert your own VOC-XML or COCO-JSON export into ``out_dir/{train,val,test}.json``.

    The export's folder is ``raw_dir/layout.root`` (default: ``raw_dir``, or the one folder an
    archive unpacked into). Its parts are found unless ``layout`` names them:

    * ``fmt="voc"``: XML files in ``Annotations/`` (else anywhere under the folder); each image is
      found by the XML's ``<filename>`` or the XML's name with a JPEG/PNG suffix, in
      ``layout.images``, ``JPEGImages/``, ``images/``, or beside the XML (CVAT, Label Studio,
      Roboflow). Classes: ``classes`` in that label order (objects of other names are counted and
      dropped), else the sorted names found in the training annotations.
    * ``fmt="coco"``: one JSON per split (``annotations/instances_<split>.json``,
      ``<split>/_annotations.coco.json``) or one JSON for everything (Label Studio's
      ``result.json``); ``file_name`` is looked up in ``layout.images``, beside the JSON,
      under ``images/``, by its base name too. The categories of the training JSON keep their
      ids (``source_id``) and names; those without any training annotation are dropped (reported).

    Splits: the export's own (image-set files ``ImageSets/Main/{train,val,test}.txt``, split
    folders, split JSONs); missing test and val splits are held out of train (``test_fraction``,
    then ``val_fraction`` capped at ``val_max_images``), deterministically and never overlapping;
    the held-out file names are listed in ``report.json`` under ``held_out``. Every problem that
    stops the conversion (no annotations, a class list that matches nothing, an empty split, too
    many missing images) raises :class:`ConversionError` naming the path or key, before any split
    file is written.
    """
    if fmt not in ("voc", "coco"):
        raise ValueError(f"data.format must be 'voc' or 'coco', got {fmt!r}")
    data_root = Path(os.path.abspath(data_root))
    raw_dir = Path(os.path.abspath(raw_dir))
    out_dir = Path(out_dir)
    root = _export_root(raw_dir, layout)
    image_dirs = [d for d in ([_given(root, layout.images, "images", is_dir=True)] if layout.images else
                              [root / n for n in _VOC_IMAGE_DIRS if n and (root / n).is_dir()])]
    find = _image_finder(data_root, image_dirs)
    results: dict[str, tuple[dict, ConvertReport]] = {}
    extra: dict[str, Any] = {}
    if fmt == "voc":
        _, parts = _voc_pool(root, layout)
        first = parts.get("train") or parts.get("pool") or []
        names = list(classes)
        if not names:
            found: set[str] = set()
            for xml in first:
                try:
                    found.update(o["name"] for o in _parse_voc_xml_file(xml)[1] if o["name"])
                except (_BadAnnotation, OSError):
                    continue
            names = sorted(found)
            extra["classes_found"] = names
            if not names:
                raise ConversionError(f"no object names found in the training annotations under {root}; check "
                                      "data.layout.annotations and that the XML files have <object><name>")
        for split, xmls in parts.items():
            items = [(_rel(data_root, x), (lambda fn, x=x: find(fn, x.stem, x.parent))) for x in xmls]
            rep = ConvertReport(split=split, sources=[_rel(data_root, root)])
            results[split] = _voc_items(data_root, items, rep, classes=names, keep_empty=True, check_images=check_images)
        if classes:
            pool = results.get("train", results.get("pool"))[0]
            if not pool["annotations"]:
                raise ConversionError(f"data.classes {list(classes)} match no object in the training annotations under "
                                      f"{root}; fix the names (case matters) or leave data.classes empty to use the "
                                      "names found")
    else:
        files = _coco_files(root, layout)
        first_file = files.get("train") or files.get("pool")
        if first_file is None:
            raise ConversionError(f"COCO export under {root} has no training JSON (found: "
                                  f"{', '.join(f'{k}: {v.name}' for k, v in files.items())}); set data.layout.train")
        train_data = _load_coco_json(first_file, str(first_file))
        cats = coco_categories(train_data, _rel(data_root, first_file))
        used = {a.get("category_id") for a in train_data["annotations"] if isinstance(a, dict)}
        unused = [c for c in cats if c["id"] not in used]
        cats = [c for c in cats if c["id"] in used]
        extra["categories_without_annotations"] = [f"{c['id']}: {c['name']}" for c in unused]
        if not cats:
            raise ConversionError(f"{first_file}: no category has an annotation; is this the right JSON?")
        for split, f in files.items():
            beside = f.parent
            dirs = [*image_dirs, beside, beside / "images", root]
            finder = _image_finder(data_root, dirs)
            coco, rep = _coco_split(data_root, f, root, split=split, keep_empty=True, max_images=None,
                                    check_images=check_images, categories_from=cats,
                                    resolve_image=lambda fn, finder=finder, beside=beside: finder(
                                        fn, PurePosixPath(fn.replace("\\", "/")).stem, beside))
            results[split] = (coco, rep)
    if "pool" in results:
        results["train"] = results.pop("pool")
        results["train"][1].split = "train"
    held = _hold_out_splits(results, val_fraction, test_fraction, val_max_images)
    # the training split never keeps images without objects
    train, train_rep = results["train"]
    with_objects = {a["image_id"] for a in train["annotations"]}
    for im in train["images"]:
        if im["id"] not in with_objects:
            train_rep.add("empty_image_dropped", im["file_name"])
    train["images"] = [im for im in train["images"] if im["id"] in with_objects]
    train_rep.images_written = len(train["images"])
    categories = train["categories"]
    report: dict[str, Any] = {
        "dataset": "custom",
        "format": fmt,
        "export_root": _rel(data_root, root),
        "max_bad_fraction": max_bad_fraction,
        "classes": [c["name"] for c in categories],
        "category_ids": [c.get("source_id", c["id"]) for c in categories],
        "splits": {s: results[s][1].to_dict() for s in SPLITS},
        "held_out": held,
        **extra,
    }
    errors = []
    for split in SPLITS:
        if split in held and not held[split] and (val_fraction if split == "val" else test_fraction) == 0:
            continue
        try:
            results[split][1].check(max_bad_fraction)
        except ConversionError as exc:
            errors.append(str(exc))
    return _write_splits(out_dir, results, report, errors + _overlaps(results))
