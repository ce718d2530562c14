"""Weight importers.

* :func:`from_pytorchssd`: the authors' PytorchSSD ``FSSD_vgg`` checkpoints -> our state dict.
* :func:`vgg16_backbone_from_torchvision`: torchvision's ImageNet VGG16 state dict -> our
  reduced-fc VGG16 backbone (fc6/fc7 decimated into the dilated conv6 and the 1x1 conv7, as
  the SSD paper did for its "VGG_ILSVRC_16_layers_fc_reduced" model).
* :func:`transfer_detector`: a trained FSSD (another class list) -> a new FSSD, for fine-tuning
  (e.g. COCO -> VOC07+12): everything loads as it is except the class rows of the conf heads,
  which are matched by class name.

Files are read with ``torch.load(weights_only=True)``; nothing is downloaded here.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch import Tensor

from .models.fssd import FSSD

__all__ = [
    "from_pytorchssd",
    "vgg16_backbone_from_torchvision",
    "load_state_dict_file",
    "transfer_detector",
    "TransferReport",
    "WeightsError",
]


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


# --------------------------------------------------------------------------------------------
# fine-tuning from a trained detector

_CONF_KEY = re.compile(r"^conf_head\.(\d+)\.(weight|bias)$")


@dataclass(frozen=True)
class TransferReport:
    """What :func:`transfer_detector` did.

    Attributes:
        copied: target classes whose conf-head rows came from the source class of the same name
            (in the target's order).
        new: target classes not among the source classes: their rows keep the model's fresh
            initialisation (in the target's order).
        dropped: source classes not among the target classes: their rows were not used (in the
            source's order).
        loaded_keys: state-dict tensors loaded whole (backbone, fusion, pyramid, loc heads).
        conf_keys: conf-head tensors (weights and biases) loaded row by row (background and
            ``copied`` rows).
    """

    copied: tuple[str, ...]
    new: tuple[str, ...]
    dropped: tuple[str, ...]
    loaded_keys: int
    conf_keys: int

    def describe(self) -> str:
        """One line for a log: what was copied, re-initialised and dropped."""

        def names(xs: tuple[str, ...]) -> str:
            return ", ".join(xs) if xs else "none"

        return (
            f"loaded {self.loaded_keys} tensors as they are and {self.conf_keys} conf-head tensors by class; "
            f"classes copied: {names(self.copied)}; re-initialised: {names(self.new)}; "
            f"dropped: {names(self.dropped)}"
        )


def _check_classes(classes: Sequence[str], what: str) -> list[str]:
    if isinstance(classes, str):
        raise ValueError(f"{what} must be a list of class names, not a string")
    out = [str(c) for c in classes]
    seen: set[str] = set()
    for c in out:
        if c in seen:
            raise ValueError(f"{what} name class {c!r} twice; class names must be unique")
        seen.add(c)
    return out


#: VOC class -> COCO class, for the VOC names COCO spells differently (the other 14 are equal).
VOC_FROM_COCO: dict[str, str] = {
    "aeroplane": "airplane", "diningtable": "dining table", "motorbike": "motorcycle",
    "pottedplant": "potted plant", "sofa": "couch", "tvmonitor": "tv",
}


def transfer_detector(
    source_state: Mapping[str, Tensor],
    source_classes: Sequence[str],
    model: FSSD,
    target_classes: Sequence[str],
    class_map: Mapping[str, str] | None = None,
) -> TransferReport:
    """Load a trained detector's weights into ``model`` (built for other classes), in place.

    * Every tensor outside the conf heads (backbone, fusion, pyramid, loc heads, BatchNorm
      buffers) is copied as it is; the loc heads are class-agnostic. The networks must have the
      same architecture: a missing key or a different shape (another preset, ``fusion_channels``,
      ``backbone_width``, pyramid or aspect ratios) raises :class:`WeightsError` (a ValueError)
      naming the first such key.
    * The conf heads (``conf_head.i``: a 3x3 conv with ``A * C`` output channels, anchor-major:
      channel ``a * C + c`` is class column ``c`` of anchor ``a``, as ``FSSD.forward`` reshapes
      it; column 0 is the background) are copied row by row: the background rows, and for every
      target class whose name is among ``source_classes`` the rows of the source column of that
      name. The rows of the other target classes keep the model's fresh initialisation.

    Class names match exactly (case-sensitive, no trimming); ``class_map`` names the source class
    of a target class spelled differently (``{"tvmonitor": "tv"}``; :data:`VOC_FROM_COCO` for
    VOC from COCO). ``module.`` prefixes (DataParallel/DDP) in ``source_state`` are removed.

    Args:
        source_state: the trained model's state dict (an FSSD checkpoint's ``model``).
        source_classes: its K object class names (no background), in label order 1..K.
        model: the freshly built model to fine-tune (``model.num_classes == len(target_classes) + 1``).
        target_classes: the new dataset's class names, in label order.
        class_map: target class name -> source class name, where they differ.

    Returns:
        A :class:`TransferReport`. Nothing in ``model`` changes when an error is raised.
    """
    src_names = _check_classes(source_classes, "source_classes")
    tgt_names = _check_classes(target_classes, "target_classes")
    if model.num_classes != len(tgt_names) + 1:
        raise ValueError(
            f"the model has num_classes={model.num_classes} (background included) but {len(tgt_names)} target "
            "classes were given; build it with len(target_classes) + 1 classes"
        )
    src = _strip_prefix(source_state)
    cs, ct = len(src_names) + 1, model.num_classes
    fix = ("build the model with the source's preset, fusion_channels, backbone_width and aspect ratios "
           "(its checkpoint's config holds them), or start from ImageNet weights instead")

    target = model.state_dict()

    plan: list[tuple[str, Tensor, Tensor]] = []  # (key, target tensor, value) copied whole
    conf: list[tuple[str, Tensor, Tensor]] = []
    for key, dst in target.items():
        if key not in src:
            raise WeightsError(f"the source state dict lacks {key!r}; {fix}")
        value = src[key]
        if not _CONF_KEY.match(key):
            if tuple(value.shape) != tuple(dst.shape):
                raise WeightsError(
                    f"{key!r} has shape {tuple(value.shape)} in the source but {tuple(dst.shape)} in the model; {fix}"
                )
            plan.append((key, dst, value))
            continue
        rows_s, rows_t = value.shape[0], dst.shape[0]
        if rows_s % cs or rows_t % ct or rows_s // cs != rows_t // ct or tuple(value.shape[1:]) != tuple(dst.shape[1:]):
            raise WeightsError(
                f"{key!r} has shape {tuple(value.shape)} in the source ({cs} classes with the background) but "
                f"{tuple(dst.shape)} in the model ({ct} classes): not the same anchors and input channels; {fix}"
            )
        conf.append((key, dst, value))
    unexpected = [k for k in src if k not in target]
    if unexpected:
        raise WeightsError(f"the source state dict has {unexpected[0]!r}, which this model lacks; {fix}")

    class_map = dict(class_map or {})
    unknown = sorted(set(class_map) - set(tgt_names)) or sorted(set(class_map.values()) - set(src_names))
    if unknown:
        raise ValueError(f"class_map names {unknown[0]!r}, which is not a target class (keys) or a source class "
                         f"(values); target classes: {list(tgt_names)}; source classes: {list(src_names)}")
    src_col = {name: i + 1 for i, name in enumerate(src_names)}
    for target_name, source_name in class_map.items():
        src_col.setdefault(target_name, src_col[source_name])
    pairs = [(0, 0)] + [(t + 1, src_col[name]) for t, name in enumerate(tgt_names) if name in src_col]
    t_idx = torch.tensor([t for t, _ in pairs])
    s_idx = torch.tensor([s for _, s in pairs])
    with torch.no_grad():
        for _, dst, value in plan:
            dst.copy_(value)
        for _, dst, value in conf:
            anchors = dst.shape[0] // ct
            d = dst.view(anchors, ct, *dst.shape[1:])
            v = value.reshape(anchors, cs, *value.shape[1:]).to(device=dst.device, dtype=dst.dtype)
            d[:, t_idx.to(dst.device)] = v[:, s_idx.to(dst.device)]
    kept = set(tgt_names) | set(class_map.values())
    return TransferReport(
        copied=tuple(n for n in tgt_names if n in src_col),
        new=tuple(n for n in tgt_names if n not in src_col),
        dropped=tuple(n for n in src_names if n not in kept),
        loaded_keys=len(plan),
        conf_keys=len(conf),
    )
