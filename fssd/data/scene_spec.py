"""The synthetic scene set's class names and scene-knob checks (:mod:`fssd.data.synthetic`).

Plain Python, so that validating params and converting the synthetic set load neither numpy nor
OpenCV; :mod:`fssd.data.synthetic` re-exports both names.
"""

from __future__ import annotations

__all__ = ["CLASSES", "check_scene_args"]

#: Shape classes, in the order of their contiguous category ids 1..K.
CLASSES: tuple[str, ...] = ("circle", "cross", "ellipse", "hexagon", "square", "star", "triangle")


def check_scene_args(
    objects_per_image: tuple[int, int], object_size_range: tuple[float, float], max_occlusion: float
) -> None:
    """Raise ``ValueError`` naming the argument when a scene knob of :func:`fssd.data.synthetic.generate_scenes` is invalid."""
    lo, hi = objects_per_image
    if not (1 <= lo <= hi <= 127):
        raise ValueError(f"objects_per_image must satisfy 1 <= min <= max <= 127, got {list(objects_per_image)}")
    flo, fhi = object_size_range
    if not (0 < flo <= fhi <= 1.5):
        raise ValueError(f"object_size_range must satisfy 0 < min <= max <= 1.5 (fractions of the shorter "
                         f"image side), got {list(object_size_range)}")
    if not (0.0 <= max_occlusion < 1.0):
        raise ValueError(f"max_occlusion must be in [0, 1), got {max_occlusion}")
