"""Run every bench script and write bench/README.md with their tables and the machine they ran on.

    python bench/run_all.py [--quick]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = ["bench_model.py", "bench_data.py", "bench_eval.py", "bench_train.py"]


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = "no GPU"
    try:
        import torch

        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name(0)
    except Exception:  # noqa: BLE001
        pass
    return f"{cpu}, {os.cpu_count()} CPUs, {gpu}, Python {platform.python_version()}"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    sections = []
    failed = 0
    for script in SCRIPTS:
        cmd = [sys.executable, str(HERE / script)] + (["--quick"] if args.quick and script == "bench_model.py" else [])
        print(f"== {script}", flush=True)
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=HERE.parent)
        text = out.stdout.strip() if out.returncode == 0 else f"FAILED (exit {out.returncode}):\n\n```\n{out.stderr[-2000:]}\n```"
        failed += out.returncode != 0
        print(text, flush=True)
        sections.append(f"## {script}\n\n`python bench/{script}`\n\n{text}\n")
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    readme = (f"# Benchmarks\n\nRun them all with `make bench` (`python bench/run_all.py`), which rewrites this file.\n"
              f"Each script measures a peer in the same run and prints ratios.\n\n"
              f"Latest run: {stamp} on {machine()}.\n\n" + "\n".join(sections)
              + "\n" + (HERE / "GPU.md").read_text())  # GPU figures: scripts/gpu_check.sh, kept in GPU.md
    (HERE / "README.md").write_text(readme)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
