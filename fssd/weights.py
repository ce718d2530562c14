"""Weight importers.

* :func:`from_pytorchssd`: the authors' PytorchSSD ``FSSD_vgg`` checkpoints -> our state dict.
* :func:`vgg16_backbone_from_torchvision`: torchvision's ImageNet VGG16 state dict -> our
  reduced-fc VGG16 backbone (fc6/fc7 decimated into the dilated conv6 and the 1x1 conv7, as
  the SSD paper did for its "VGG_ILSVRC_16_layers_fc_reduced" model).

Files are read with ``torch.load(weights_only=True)``; nothing is downloaded here.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Mapping

import torch
from torch import Tensor

__all__ = ["from_pytorchssd", "vgg16_backbone_from_torchvision", "load_state_dict_file", "WeightsError"]


class WeightsError(ValueError):
    """A weights file or state dict does not have the expected layout."""


_VGG_CONV_INDICES = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)


def load_state_dict_file(path: str | os.PathLike) -> dict[str, Tensor]:
    """Load a state dict (or a dict holding one under ``state_dict``/``model``) safely."""
    p = Path(path)
    if not p.is_file():
        raise WeightsError(f"weights file {p} does not exist")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - re-raised with the file named
        raise WeightsError(f"cannot read weights file {p}: {e}") from e
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model", "model_state"):
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise WeightsError(f"{p} does not hold a state dict of tensors")
    return dict(obj)


def _strip_prefix(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    out = {}
    for k, v in state_dict.items():
        while k.startswith("module."):
            k = k[len("module.") :]
        out[k] = v
    return out


def from_pytorchssd(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Map the authors' FSSD_vgg state dict (lzx1413/PytorchSSD) onto :class:`fssd.FSSD`'s keys.

    ``module.`` prefixes left by ``nn.DataParallel`` are removed. Floating tensors are cast to
    float32 (the reference file stores float16). Raises :class:`WeightsError` naming the first
    key that has no counterpart.
    """
    sd = _strip_prefix(state_dict)
    rules = [
        (r"^base\.(\d+)\.(weight|bias)$", r"backbone.layers.\1.\2"),
        (r"^extras\.(\d+)\.(weight|bias)$", r"backbone.extras.\1.\2"),
        (r"^ft_module\.(\d+)\.conv\.(weight|bias)$", r"fusion.reduce.\1.\2"),
        (r"^fea_bn\.(weight|bias|running_mean|running_var|num_batches_tracked)$", r"fusion.bn.\1"),
        (r"^pyramid_ext\.(\d+)\.conv\.(weight|bias)$", r"pyramid.\1.0.\2"),
        (r"^loc\.(\d+)\.(weight|bias)$", r"loc_head.\1.\2"),
        (r"^conf\.(\d+)\.(weight|bias)$", r"conf_head.\1.\2"),
    ]
    out: dict[str, Tensor] = {}
    for key, value in sd.items():
        for pattern, repl in rules:
            if re.match(pattern, key):
                new = re.sub(pattern, repl, key)
                break
        else:
            raise WeightsError(
                f"unexpected key {key!r} in the PytorchSSD FSSD state dict; is this an FSSD_vgg checkpoint?"
            )
        out[new] = value.float() if value.is_floating_point() else value
    return out


def vgg16_backbone_from_torchvision(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Convert torchvision's ``vgg16`` ImageNet state dict to our backbone's ``layers.*`` keys.

    conv1_1..conv5_3 copy over; fc6 (4096 x 512*7*7) becomes a 1024 x 512 x 3 x 3 dilated conv
    by keeping every 4th output and every 3rd spatial tap; fc7 (4096 x 4096) becomes 1024 x
    1024 x 1 x 1 keeping every 4th output and input. The result is meant for
    ``model.backbone.load_state_dict(..., strict=False)`` (the extras stay freshly initialised).
    """
    sd = _strip_prefix(state_dict)
    out: dict[str, Tensor] = {}
    for idx in _VGG_CONV_INDICES:
        for part in ("weight", "bias"):
            key = f"features.{idx}.{part}"
            if key not in sd:
                raise WeightsError(f"torchvision VGG16 state dict lacks {key!r}; is this a vgg16 (not vgg16_bn) checkpoint?")
            out[f"layers.{idx}.{part}"] = sd[key].float()
    try:
        fc6_w, fc6_b = sd["classifier.0.weight"], sd["classifier.0.bias"]
        fc7_w, fc7_b = sd["classifier.3.weight"], sd["classifier.3.bias"]
    except KeyError as e:
        raise WeightsError(f"torchvision VGG16 state dict lacks {e.args[0]!r} (the fc layers are needed for fc6/fc7)") from None
    if tuple(fc6_w.shape) != (4096, 512 * 7 * 7) or tuple(fc7_w.shape) != (4096, 4096):
        raise WeightsError(
            f"unexpected VGG16 fc shapes {tuple(fc6_w.shape)} / {tuple(fc7_w.shape)}; expected (4096, 25088) / (4096, 4096)"
        )
    out["layers.31.weight"] = fc6_w.float().reshape(4096, 512, 7, 7)[::4, :, ::3, ::3].contiguous()
    out["layers.31.bias"] = fc6_b.float()[::4].contiguous()
    out["layers.33.weight"] = fc7_w.float().reshape(4096, 4096, 1, 1)[::4, ::4].contiguous()
    out["layers.33.bias"] = fc7_b.float()[::4].contiguous()
    return out
