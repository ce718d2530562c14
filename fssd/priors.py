"""SSD default boxes, computed from the real feature-map sizes."""

from __future__ import annotations

import math
from typing import Sequence

import torch

from .config import PriorConfig

__all__ = ["make_priors"]


def make_priors(
    feature_sizes: Sequence[tuple[int, int]],
    input_size: int,
    config: PriorConfig,
) -> torch.Tensor:
    """Default boxes as a [P, 4] float32 tensor of normalised (cx, cy, w, h).

    Order: level, then row y, then column x, then anchor, as the heads flatten their
    outputs. Within a cell: (s_k, s_k), (s'_k, s'_k) with s'_k = sqrt(s_k * s_{k+1}), then for
    each ratio r: (s_k*sqrt(r), s_k/sqrt(r)) and (s_k/sqrt(r), s_k*sqrt(r)).

    ``feature_sizes`` are the (height, width) of each detection map. Cell centres are
    ``(x + 0.5) * step / input_size`` with ``step = config.steps[k]`` when given, else
    ``input_size / width`` (resp. height), so centres always lie inside the image.
    """
    if len(feature_sizes) != config.num_levels:
        raise ValueError(
            f"the network has {len(feature_sizes)} detection levels but priors.aspect_ratios lists "
            f"{config.num_levels}; give one ratio list per level"
        )
    scales = config.scales()
    per_level = []
    for k, ((fh, fw), ratios) in enumerate(zip(feature_sizes, config.aspect_ratios)):
        if config.steps is not None:
            step_y = step_x = config.steps[k] / input_size
        else:
            step_y, step_x = 1.0 / fh, 1.0 / fw
        cy = (torch.arange(fh, dtype=torch.float64) + 0.5) * step_y
        cx = (torch.arange(fw, dtype=torch.float64) + 0.5) * step_x
        s = scales[k]
        s_prime = math.sqrt(s * scales[k + 1])
        wh = [(s, s), (s_prime, s_prime)]
        for r in ratios:
            q = math.sqrt(r)
            wh += [(s * q, s / q), (s / q, s * q)]
        wh_t = torch.tensor(wh, dtype=torch.float64)  # [A, 2]
        a = wh_t.shape[0]
        gy, gx = torch.meshgrid(cy, cx, indexing="ij")  # [fh, fw]
        centres = torch.stack([gx, gy], dim=-1).reshape(fh * fw, 1, 2).expand(fh * fw, a, 2)
        sizes = wh_t.reshape(1, a, 2).expand(fh * fw, a, 2)
        per_level.append(torch.cat([centres, sizes], dim=-1).reshape(-1, 4))
    priors = torch.cat(per_level, dim=0)
    if config.clip:
        priors = priors.clamp_(0.0, 1.0)
    return priors.to(torch.float32)
