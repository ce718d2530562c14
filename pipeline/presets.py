"""Named dataset presets: the official download locations and checksums.

``resolve_preset("voc0712")`` returns the :class:`~pipeline.download.Source` list that
:func:`~pipeline.download.download_all` fetches and extracts. The checksums are the MD5 sums
published with the datasets (the same values torchvision's ``VOCDetection`` and the COCO
download scripts of Detectron/PaddleDetection check).

Layout after extraction (``raw`` is the raw-data directory, ``data/raw`` by default):

* VOC archives unpack to ``raw/VOCdevkit/VOC2007/...`` and ``raw/VOCdevkit/VOC2012/...``
  (the 2007 trainval and test archives merge into the same ``VOC2007`` tree).
* COCO archives unpack below ``raw/coco/``: ``train2017/``, ``val2017/`` and ``annotations/``.

The Oxford VOC server is often slow or down; each VOC source therefore lists the older Oxford
host name and the widely used pjreddie.com copy as mirrors, tried in order (same bytes, verified
by the same checksum).
"""

from __future__ import annotations

from pipeline.download import Source
from pipeline.errors import InputError

__all__ = ["PRESETS", "preset_names", "resolve_preset"]

_VOC_HOST = "https://thor.robots.ox.ac.uk/pascal/VOC"  # the Oxford host the VOC pages link to
_VOC_OLD_HOST = "http://host.robots.ox.ac.uk/pascal/VOC"  # its older name (torchvision's URLs)
_VOC_MIRROR = "https://pjreddie.com/media/files"
_COCO_HOST = "http://images.cocodataset.org"


def _voc(year: str, name: str, md5: str) -> Source:
    return Source(
        url=f"{_VOC_HOST}/voc{year}/{name}",
        md5=md5,
        extract=True,
        mirrors=(f"{_VOC_OLD_HOST}/voc{year}/{name}", f"{_VOC_MIRROR}/{name}"),
    )


def _coco(path: str, md5: str) -> Source:
    return Source(url=f"{_COCO_HOST}/{path}", md5=md5, extract=True, extract_to="coco")


VOC2007_TRAINVAL = _voc("2007", "VOCtrainval_06-Nov-2007.tar", "c52e279531787c972589f7e41ab4ae64")
VOC2007_TEST = _voc("2007", "VOCtest_06-Nov-2007.tar", "b6e924de25625d8de591ea690078ad9f")
VOC2012_TRAINVAL = _voc("2012", "VOCtrainval_11-May-2012.tar", "6cd6e144f989b92b3379bac3b3de84fd")
COCO2017_TRAIN = _coco("zips/train2017.zip", "cced6f7f71b7629ddf16f17bbcfab6b2")
COCO2017_VAL = _coco("zips/val2017.zip", "442b8da7639aecaf257c1dceb8ba8c80")
COCO2017_ANNOTATIONS = _coco(
    "annotations/annotations_trainval2017.zip", "f4bbac642086de4f52a3fdda2de5fa2c"
)

PRESETS: dict[str, tuple[Source, ...]] = {
    "voc2007": (VOC2007_TRAINVAL, VOC2007_TEST),
    "voc2012": (VOC2012_TRAINVAL,),
    "voc0712": (VOC2007_TRAINVAL, VOC2007_TEST, VOC2012_TRAINVAL),
    "coco2017": (COCO2017_TRAIN, COCO2017_VAL, COCO2017_ANNOTATIONS),
}
"""Preset name -> the sources it downloads (sizes: VOC07 ~0.9 GB, VOC12 ~2 GB, COCO17 ~19 GB)."""


def preset_names() -> list[str]:
    """The known preset names, sorted."""
    return sorted(PRESETS)


def resolve_preset(name: str) -> list[Source]:
    """Return the sources of preset ``name``.

    Raises:
        ValueError: unknown name; the message lists the known presets.
    """
    try:
        return list(PRESETS[name])
    except (KeyError, TypeError):
        raise InputError(
            f"unknown dataset preset {name!r}; known presets: {', '.join(preset_names())} "
            "(or use 'custom' with data.sources)"
        ) from None
