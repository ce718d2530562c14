"""What `fssd` prints when the input is wrong: one line naming the file or key and the fix, exit
status 2, no traceback (FSSD_DEBUG=1 shows it). The CLI runs as a subprocess, as a user runs it."""

import io
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest


def fssd(cwd: Path, *args: str, debug: bool = False) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "FSSD_DEBUG"}
    if debug:
        env["FSSD_DEBUG"] = "1"
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def assert_user_error(r: subprocess.CompletedProcess, command: str, *names: str) -> None:
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    assert 1 <= len(lines) <= 3, r.stderr
    assert lines[0].startswith(f"fssd {command}: error: "), r.stderr
    for name in names:
        assert name in r.stderr, (name, r.stderr)


def _tar(path: Path, entries: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w") as t:
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return path


def _custom_params(tmp_path: Path, make_params, source: dict) -> Path:
    return make_params(tmp_path / "params.yaml", tmp_path / "data", tmp_path,
                       **{"data.dataset": "custom", "data.sources": [source]})


def test_hostile_archive(tmp_path, make_params):
    archive = _tar(tmp_path / "hostile.tar", {"export/ok.txt": b"ok", "../evil.txt": b"evil"})
    p = _custom_params(tmp_path, make_params, {"url": archive.as_uri(), "extract": True})
    r = fssd(tmp_path, "download", "--params", str(p))
    assert_user_error(r, "download", "hostile.tar", "../evil.txt")
    assert not list(tmp_path.rglob("evil.txt")) and not (tmp_path / "data" / "raw" / "export").exists()


def test_checksum_mismatch(tmp_path, make_params):
    archive = _tar(tmp_path / "export.tar", {"export/ok.txt": b"ok"})
    p = _custom_params(tmp_path, make_params, {"url": archive.as_uri(), "sha256": "0" * 64, "extract": True})
    r = fssd(tmp_path, "download", "--params", str(p))
    assert_user_error(r, "download", "export.tar", "checksum mismatch", "data.sources")


def test_bad_split(tmp_path, make_params, exports):
    """Every training image of a VOC export is missing: convert stops, naming the setting."""
    export = exports.voc(tmp_path / "data" / "raw" / "fruit", n=12)
    shutil.rmtree(export / "JPEGImages")
    p = _custom_params(tmp_path, make_params, {"url": (tmp_path / "fruit.tar").as_uri(), "extract": True})
    r = fssd(tmp_path, "convert", "--params", str(p))
    assert_user_error(r, "convert", "split 'train'", "data.max_bad_fraction", "report.failed.json")
    assert not (tmp_path / "data" / "processed" / "train.json").exists()


def test_bad_set_key_and_debug_traceback(tmp_path, make_params):
    p = make_params(tmp_path / "params.yaml", tmp_path / "data", tmp_path)
    r = fssd(tmp_path, "download", "--params", str(p), "--set", "data.bogus=1")
    assert_user_error(r, "download", "data.bogus", "known keys under data")
    r = fssd(tmp_path, "train", "--params", str(p), "--set", "train.epochs=many")
    assert_user_error(r, "train", "train.epochs")

    r = fssd(tmp_path, "download", "--params", str(p), "--set", "data.bogus=1", debug=True)
    assert r.returncode not in (0, 2) and "Traceback" in r.stderr and "data.bogus" in r.stderr, r.stderr[-3000:]


@pytest.mark.parametrize("missing", ["params", "train.json"])
def test_missing_inputs_name_the_file(tmp_path, make_params, missing):
    if missing == "params":
        r = fssd(tmp_path, "convert")
        assert_user_error(r, "convert", "params.yaml", "--params")
    else:  # train before convert: refused before torch or Ray load
        p = make_params(tmp_path / "params.yaml", tmp_path / "data", tmp_path)
        r = fssd(tmp_path, "train", "--params", str(p))
        assert_user_error(r, "train", "train.json", "dvc repro convert")
