"""Detection metrics on the COCO-format split files: VOC AP (2007 11-point and area) and COCO AP."""

from .coco import coco_metrics
from .voc import VOCResult, voc_map

__all__ = ["voc_map", "VOCResult", "coco_metrics"]
