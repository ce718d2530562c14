"""`fssd detect` on files: JSON with class names, unreadable images reported, bad models refused.

Registry URIs (``models:/NAME@ALIAS``) are checked in test_register.py, which has the MLflow store.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from fssd import build_fssd, save_checkpoint
from fssd.config import DetectorConfig
from fssd.predictor import Predictor, read_image
from pipeline import detect

CLASSES = ["circle", "square", "triangle"]


def _random_checkpoint(path: Path, seed: int = 0) -> None:
    torch.manual_seed(seed)
    model = build_fssd("fssd_lite", len(CLASSES) + 1, input_size=128)
    with torch.no_grad():
        for head, a in zip(model.conf_head, model.prior_config.anchors_per_location):
            head.weight.mul_(100.0)
            head.bias.view(a, len(CLASSES) + 1)[:, 1] += 1.0
            head.bias.view(a, len(CLASSES) + 1)[:, 3] += 0.8
    save_checkpoint(path, model, DetectorConfig(model=model.config, priors=model.prior_config), CLASSES)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("detect")
    _random_checkpoint(root / "fssd.pt")
    rng = np.random.default_rng(0)
    images = []
    for name, (h, w) in (("a.png", (90, 140)), ("b.jpg", (200, 160)), ("sub/a.png", (64, 64))):
        img = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        cv2.circle(img, (w // 2, h // 2), min(h, w) // 4, (255, 255, 0), -1)
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(root / name), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
        images.append(root / name)
    (root / "broken.jpg").write_bytes(b"\xff\xd8 definitely not a jpeg")
    return {"root": root, "checkpoint": root / "fssd.pt", "images": images}


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="fssd")
    detect.add_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["detect", *argv])
    return args.func(args)


def test_json_with_class_names_and_unreadable_images_reported(files, tmp_path, capsys, same_detections):
    root = files["root"]
    a, b, sub_a = (str(p) for p in files["images"])
    broken, missing = str(root / "broken.jpg"), str(root / "missing.jpg")
    rc = _run([a, broken, b, missing, sub_a, "--model", str(files["checkpoint"]), "--batch-size", "2",
               "--draw", str(tmp_path / "drawn"), "--device", "cpu"])
    out, err = capsys.readouterr()
    assert rc == 1
    doc = json.loads(out)
    assert doc["model"] == str(files["checkpoint"]) and doc["score_threshold"] == 0.3
    entries = doc["images"]
    assert [e["image"] for e in entries] == [a, broken, b, missing, sub_a]
    assert "broken.jpg cannot be decoded" in entries[1]["error"] and "missing.jpg does not exist" in entries[3]["error"]
    assert "broken.jpg" in err and "missing.jpg" in err and "2 of 5 images" in err

    # the same detections as the Predictor on the checkpoint, with class names. The CLI predicted
    # each image alone (every chunk of 2 paths holds one readable image), the Predictor all three
    # in one batch: the conv kernels differ with the batch shape, scores move by ~1e-6 and
    # near-equal ones swap ranks (sub/a.png has two at 0.6333875 and 0.63338757), so the lists
    # are compared as sets, not position by position
    predictor = Predictor.from_checkpoint(files["checkpoint"], device="cpu", score_threshold=0.3)
    expected = predictor.predict([read_image(p) for p in (a, b, sub_a)])
    for entry, det, path in zip([entries[0], entries[2], entries[4]], expected, (a, b, sub_a)):
        h, w = read_image(path).shape[:2]
        assert (entry["width"], entry["height"]) == (w, h)
        assert len(entry["detections"]) == len(det["scores"]) > 0
        for d in entry["detections"]:
            assert d["name"] == CLASSES[d["label"] - 1] and d["score"] > 0.3
        assert [d["score"] for d in entry["detections"]] == sorted((d["score"] for d in entry["detections"]), reverse=True)
        got = {"boxes": [d["box"] for d in entry["detections"]], "scores": [d["score"] for d in entry["detections"]],
               "labels": [d["label"] for d in entry["detections"]]}
        # JSON rounds boxes to 0.01 px and scores to 1e-5
        matched = same_detections(got, det, score_atol=1e-4, box_atol=0.011, score_threshold=0.3, rivals=2, what=path)
        assert matched >= 0.9 * len(det["scores"])
    assert {e["name"] for x in entries if "detections" in x for e in x["detections"]} <= set(CLASSES)

    # annotated copies of the readable images; two inputs named a.png do not overwrite each other
    drawn = sorted(p.name for p in (tmp_path / "drawn").iterdir())
    assert drawn == ["a.png", "a_1.png", "b.jpg"]
    assert read_image(tmp_path / "drawn" / "b.jpg").shape == read_image(b).shape


def test_output_file_and_exit_code_zero(files, tmp_path, capsys):
    out = tmp_path / "res" / "dets.json"
    rc = _run([str(p) for p in files["images"]] + ["--model", str(files["checkpoint"]), "--output", str(out),
                                                   "--score-threshold", "0.85", "--device", "cpu"])
    assert rc == 0
    doc = json.loads(out.read_text())
    assert len(doc["images"]) == 3 and all("error" not in e for e in doc["images"])
    assert all(d["score"] > 0.85 for e in doc["images"] for d in e["detections"])
    assert capsys.readouterr().out == ""  # the JSON went to the file


def test_bad_model_paths_exit_2_naming_them(files, tmp_path, capsys):
    image = str(files["images"][0])
    assert _run([image, "--model", str(tmp_path / "nope.pt")]) == 2
    err = capsys.readouterr().err
    assert "nope.pt does not exist" in err and "models:/" in err

    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    assert _run([image, "--model", str(junk)]) == 2
    assert "junk.pt" in capsys.readouterr().err

    assert _run([image, "--model", str(tmp_path)]) == 2
    assert "without an MLmodel file" in capsys.readouterr().err

    assert _run([image, "--model", str(files["checkpoint"]), "--score-threshold", "1.5"]) == 2
    assert "--score-threshold" in capsys.readouterr().err

    with pytest.raises(detect.ModelLoadError, match="nope.pt"):
        detect.load_predictor(str(tmp_path / "nope.pt"))


def test_registry_uri_without_a_store_exits_2_and_creates_nothing(files, tmp_path, monkeypatch, capsys):
    store = tmp_path / "absent" / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store}")
    assert _run([str(files["images"][0]), "--model", "models:/fssd-synthetic@champion"]) == 2
    err = capsys.readouterr().err
    assert "models:/fssd-synthetic@champion" in err and "no MLflow store" in err and str(store) in err
    assert not store.exists() and not store.parent.exists()
