"""bench/bench_gpu.py and scripts/gpu_check.sh stay runnable without a GPU: their dry runs (CPU, tiny
sizes) go through every code path the GPU run takes, so the device check cannot rot between GPU runs."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


def _bench_module():
    spec = importlib.util.spec_from_file_location("bench_gpu", REPO / "bench" / "bench_gpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _check_outputs(out: Path) -> None:
    data = json.loads((out / "gpu_bench.json").read_text())
    assert data["dry_run"] is True and data["errors"] == []
    rows = {r["key"]: r for r in data["rows"]}
    assert set(rows) == {"train2", "train3", "infer", "latency"}
    for r in rows.values():
        assert r["fssd"] > 0 and r["torchvision"] > 0 and r["speedup"] > 0, r
    for model, n in data["candidates_per_image"].items():
        assert abs(n - 2000) < 100, (model, n)  # the background-logit calibration worked
    md = (out / "gpu_bench.md").read_text()
    assert "| measurement | batch |" in md and "latency incl. post-processing" in md
    assert "Targets: not evaluated (dry run" in md


def test_bench_gpu_dry_run(tmp_path):
    bench = _bench_module()
    threads = torch.get_num_threads()
    try:
        assert bench.main(["--dry-run", "--out-dir", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(threads)
    _check_outputs(tmp_path)


def test_bench_gpu_without_a_gpu_asks_for_dry_run(capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert _bench_module().main([]) == 2
    assert "--dry-run" in capsys.readouterr().err


@pytest.mark.slow
def test_gpu_check_script_dry_run(tmp_path):
    """The whole device check on a CPU: wheel selection, the cuda tests (all skipped, named), the bench."""
    env = {**os.environ, "OUT": str(tmp_path)}
    if (REPO / ".venv" / "bin" / "python").exists():
        env.pop("PYTHON", None)
    proc = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), "--dry-run"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    tests_log = (tmp_path / "gpu_tests.log").read_text()
    if not torch.cuda.is_available():
        assert "needs a CUDA GPU" in tests_log and "test_predictor_on_cuda" in tests_log
    _check_outputs(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "gpu_bench.json", "gpu_bench.md", "gpu_check.log", "gpu_tests.log", "gpu_tests.xml"]


def test_bench_readme_ends_with_the_gpu_section():
    """bench/run_all.py appends bench/GPU.md to the README it writes; the committed README agrees."""
    gpu = (REPO / "bench" / "GPU.md").read_text()
    assert (REPO / "bench" / "README.md").read_text().endswith("\n\n" + gpu)
    assert '(HERE / "GPU.md").read_text()' in (REPO / "bench" / "run_all.py").read_text()
