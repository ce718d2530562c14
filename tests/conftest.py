import os
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
REFERENCE = Path(
    os.environ.get("FSSD_REFERENCE", REPO.parent / "shared" / "reference" / "fssd300_voc_reference.pt")
)


@pytest.fixture(autouse=True, scope="session")
def _torch_threads():
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    yield


@pytest.fixture(scope="session")
def reference():
    """The authors' golden tensors (../shared/reference); tests skip where the file is absent."""
    if not REFERENCE.is_file():
        pytest.skip(f"reference file {REFERENCE} is absent (it sits in ../shared/ beside the checkout in CI)")
    return torch.load(REFERENCE, weights_only=False)


def write_params(path: Path, data_root: Path, tmp: Path, space: dict | None = None, **overrides) -> Path:
    """A params.yaml for a tiny, fast run: lite preset at 96 px, batch 8, everything in ``tmp``;
    ``tune.space`` replaced by ``space`` when given."""
    import yaml

    from pipeline.params import apply_overrides

    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    base = {
        "data.root": str(data_root),
        "model.input_size": 96,
        "model.fusion_channels": 16,
        "train.epochs": 2,
        "train.batch_size": 8,
        "train.loader_workers": 0,
        "train.val_every": 1,
        "train.warmup_epochs": 0.5,
        "train.storage_path": str(tmp / "ray_results" / "train"),
        "tune.storage_path": str(tmp / "ray_results" / "tune"),
        "mlflow.tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}",
    }
    base.update(overrides)
    raw = apply_overrides(raw, base)
    if space is not None:
        raw["tune"]["space"] = space
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.fixture(scope="session")
def make_params():
    """``make_params(path, data_root, tmp, space=None, **dotted_overrides)`` writes a tiny-run params.yaml."""
    return write_params


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A converted synthetic dataset: 32 train, 8 val, 8 test images, under <root>/processed."""
    from fssd.data.synthetic import generate_scenes
    from pipeline.convert import convert_dataset

    root = tmp_path_factory.mktemp("tiny_data")
    generate_scenes(root / "raw" / "synthetic", 48, seed=0, split_fractions=(32 / 48, 8 / 48, 8 / 48), max_size=320)
    convert_dataset("synthetic", root / "raw", root / "processed", root, max_bad_fraction=0.0)
    return root


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance (2 CPUs) shared by every test that needs Ray."""
    import ray

    from pipeline.train import init_ray

    os.environ.pop("RAY_ADDRESS", None)
    init_ray()
    yield ray
    ray.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def free_port():
    """``free_port()`` gives a free TCP port on 127.0.0.1 (tests bind only to loopback)."""
    return _free_port


@pytest.fixture(scope="session")
def fake_aws_env(tmp_path_factory) -> dict[str, str]:
    """Environment for subprocesses (dvc, Ray jobs) that talk to moto: credentials moto accepts and
    no real AWS configuration, so nothing can reach AWS."""
    empty = tmp_path_factory.mktemp("no-aws")
    return {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true", "AWS_CONFIG_FILE": str(empty / "config"),
            "AWS_SHARED_CREDENTIALS_FILE": str(empty / "credentials"),
            "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}


@pytest.fixture(scope="session")
def moto_endpoint():
    """moto's S3 server on a free 127.0.0.1 port, shared by the session: ``http://127.0.0.1:PORT``."""
    moto_server = pytest.importorskip("moto.server")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@contextmanager
def _mlflow_server(store_uri: str, artifacts: Path, cwd: Path, env: dict[str, str] | None = None):
    port = _free_port()
    server = subprocess.Popen(
        [Path(sys.executable).parent / "mlflow", "server", "--backend-store-uri", store_uri,
         "--artifacts-destination", str(artifacts), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(180):
            try:
                urllib.request.urlopen(f"{base}/health", timeout=2)
                break
            except OSError:
                if server.poll() is not None:
                    raise RuntimeError(f"mlflow server exited with {server.returncode}")
                time.sleep(1)
        else:
            raise RuntimeError(f"mlflow server on {base} did not answer /health in 180 s")
        yield base
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.fixture
def mlflow_server():
    """``with mlflow_server(store_uri, artifacts_dir, cwd, env) as base_url:`` runs `mlflow server`
    on a free loopback port until the block ends."""
    return _mlflow_server


def _detection_arrays(det) -> tuple:
    import numpy as np

    boxes = np.asarray(det["boxes"], dtype=np.float64).reshape(-1, 4)
    scores = np.asarray(det["scores"], dtype=np.float64).reshape(-1)
    labels = np.asarray(det["labels"]).reshape(-1).astype(np.int64)
    assert len(boxes) == len(scores) == len(labels), "boxes, scores and labels differ in length"
    return boxes, scores, labels


def _pairwise_iou(a, b):
    import numpy as np

    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area_a = np.clip(a[:, 2:] - a[:, :2], 0, None).prod(-1)
    area_b = np.clip(b[:, 2:] - b[:, :2], 0, None).prod(-1)
    union = area_a[:, None] + area_b[None, :] - inter
    iou = np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)
    same = np.isclose(a[:, None, :], b[None, :, :], rtol=0, atol=1e-9).all(-1)
    return np.where(same, 1.0, iou)  # identical (even degenerate) boxes match


def assert_same_detections(actual, expected, *, iou: float = 0.99, score_atol: float = 1e-4,
                           box_atol: float | None = None, score_threshold: float | None = None,
                           rivals: int = 0, what: str = "detections") -> int:
    """Assert that two detection lists for one image are the same set, whatever their order.

    ``actual`` / ``expected``: dicts with ``boxes`` [K, 4] (x1, y1, x2, y2), ``scores`` [K] and
    ``labels`` [K] (a :meth:`fssd.predictor.Predictor.predict` entry; arrays, tensors or lists).
    Each expected detection, best first, takes the unused actual detection of the same label with
    the highest IoU, if that IoU is >= ``iou``, the scores differ by <= ``score_atol`` and (with
    ``box_atol``) every coordinate by <= ``box_atol``. Ranks are not compared: the same image gives
    scores ~1e-6 apart in another batch composition or on another CPU (the conv kernels differ), so
    detections with near-equal scores can swap places. For the same reason an unmatched detection
    is accepted only where such a near-tie decides membership: scoring within ``score_atol`` of the
    other list's lowest score (a top-k / max_detections cut) or of ``score_threshold``; or, at most
    ``rivals`` times (default 0), paired with an unmatched detection of the same label that
    overlaps it (IoU > 0.3) and scores within ``score_atol`` (two NMS rivals, each run kept the
    other). Returns the number of matched pairs.
    """
    import numpy as np

    a_boxes, a_scores, a_labels = _detection_arrays(actual)
    e_boxes, e_scores, e_labels = _detection_arrays(expected)
    ious = _pairwise_iou(e_boxes, a_boxes) if len(e_boxes) and len(a_boxes) else np.zeros((len(e_boxes), len(a_boxes)))
    used = np.zeros(len(a_boxes), dtype=bool)
    unmatched_e = []
    for i in np.argsort(-e_scores, kind="stable"):
        ok = (~used) & (a_labels == e_labels[i]) & (ious[i] >= iou) & (np.abs(a_scores - e_scores[i]) <= score_atol)
        if box_atol is not None:
            ok &= (np.abs(a_boxes - e_boxes[i]) <= box_atol).all(axis=1)
        if ok.any():
            used[int(np.argmax(np.where(ok, ious[i], -1.0)))] = True
        else:
            unmatched_e.append(int(i))
    unmatched_a = [int(j) for j in np.flatnonzero(~used)]

    def near_cut(score: float, other_scores) -> bool:
        return (len(other_scores) > 0 and score <= other_scores.min() + score_atol) or (
            score_threshold is not None and score <= score_threshold + score_atol)

    problems = []
    rest_a = list(unmatched_a)
    for i in unmatched_e:
        if near_cut(e_scores[i], a_scores):
            continue
        rival = next((j for j in rest_a if a_labels[j] == e_labels[i] and abs(a_scores[j] - e_scores[i]) <= score_atol
                      and ious[i, j] > 0.3), None) if rivals > 0 else None
        if rival is not None:
            rest_a.remove(rival)
            rivals -= 1
        else:
            best = float(ious[i].max()) if ious.shape[1] else 0.0
            problems.append(f"expected label {e_labels[i]} score {e_scores[i]:.6f} box {np.round(e_boxes[i], 3).tolist()} "
                            f"has no match in actual (best IoU with any actual box {best:.4f})")
    for j in rest_a:
        if not near_cut(a_scores[j], e_scores):
            problems.append(f"actual label {a_labels[j]} score {a_scores[j]:.6f} box {np.round(a_boxes[j], 3).tolist()} "
                            "is not among the expected")
    assert not problems, f"{what}: {len(a_scores)} actual vs {len(e_scores)} expected, differences:\n  " + "\n  ".join(problems)
    return len(e_scores) - len(unmatched_e)


@pytest.fixture(scope="session")
def same_detections():
    """``same_detections(actual, expected, iou=0.99, score_atol=1e-4, box_atol=None, ...)``: the two
    detection lists are the same set, order ignored (see :func:`assert_same_detections`)."""
    return assert_same_detections


# --------------------------------------------------------------------------------------------
# Your own data: small exports in the layouts of annotation tools, built by the tests


def _scene(w: int, h: int, boxes: list[tuple[int, int, int, int, int]], seed: int):
    """An image with a filled rectangle per box (x1, y1, x2, y2, colour index)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    img = rng.integers(90, 150, (h, w, 3), dtype=np.uint8)
    palette = [(230, 40, 40), (40, 200, 60), (40, 80, 230), (230, 200, 40)]
    for x1, y1, x2, y2, c in boxes:
        img[y1:y2, x1:x2] = palette[c % len(palette)]
    return img


def _boxes(k: int, w: int, h: int, ncls: int) -> list[tuple[int, int, int, int, int]]:
    out = []
    for j in range(1 + k % 2):
        c = (k + j) % ncls
        x1, y1 = 4 + 30 * j, 4 + (k * 7) % max(1, h - 40)
        out.append((x1, y1, min(w - 1, x1 + 24 + 3 * c), min(h - 1, y1 + 20 + 2 * c), c))
    return out


def write_voc_export(root: Path, classes=("apple", "pear", "plum"), n: int = 24, size=(96, 80)) -> Path:
    """A CVAT-like Pascal VOC export without image-set files: Annotations/ and JPEGImages/, JPEG
    and PNG images, names with spaces, a sub-folder, one object marked difficult."""
    import cv2

    w, h = size
    for k in range(n):
        sub = "batch 2/" if k % 3 == 0 else ""
        stem = f"{sub}img {k:03d}"
        ext = ".png" if k % 4 == 1 else ".jpg"
        boxes = _boxes(k, w, h, len(classes))
        (root / "JPEGImages" / stem).parent.mkdir(parents=True, exist_ok=True)
        (root / "Annotations" / stem).parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(root / "JPEGImages" / f"{stem}{ext}"), _scene(w, h, boxes, k)[:, :, ::-1])
        objs = "".join(
            f"<object><name>{classes[c]}</name><difficult>{int(k == 5 and i == 0)}</difficult><bndbox><xmin>{x1 + 1}</xmin>"
            f"<ymin>{y1 + 1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>"
            for i, (x1, y1, x2, y2, c) in enumerate(boxes))
        (root / "Annotations" / f"{stem}.xml").write_text(
            f"<annotation><folder></folder><filename>{stem}{ext}</filename><size><width>{w}</width>"
            f"<height>{h}</height><depth></depth></size>{objs}</annotation>")
    return root


def write_coco_export(root: Path, categories=((3, "bolt"), (17, "nut"), (90, "washer")), n: int = 24,
                      size=(96, 80)) -> Path:
    """A Label Studio-like COCO export: result.json at the root, images/ beside it, the
    dataset's own category ids (3, 17, 90) and an unused category."""
    import json as _json

    import cv2

    w, h = size
    (root / "images").mkdir(parents=True, exist_ok=True)
    images, anns = [], []
    for k in range(n):
        name = f"images/photo {k:02d}.jpg"
        boxes = _boxes(k, w, h, len(categories))
        cv2.imwrite(str(root / name), _scene(w, h, boxes, k)[:, :, ::-1])
        images.append({"id": k, "file_name": name, "width": w, "height": h})
        for x1, y1, x2, y2, c in boxes:
            anns.append({"id": len(anns), "image_id": k, "category_id": categories[c][0],
                         "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": 0})
    cats = [{"id": i, "name": nm} for i, nm in categories] + [{"id": 0, "name": "unused"}]
    (root / "result.json").write_text(_json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return root


@pytest.fixture(scope="session")
def exports():
    """``exports.voc(root, ...)`` / ``exports.coco(root, ...)`` write small tool-style exports."""
    import types

    return types.SimpleNamespace(voc=write_voc_export, coco=write_coco_export)
