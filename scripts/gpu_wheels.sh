#!/usr/bin/env bash
# Fill .whl/ (gitignored) with the wheels scripts/gpu_check.sh installs on a GPU machine that has
# only torch, torchvision, numpy and opencv (and usually pytest): albumentations and what it needs
# (fssd.data.transforms, used by fssd.predictor), pycocotools (fssd.evaluation), and pytest with
# what it needs (installed there only where pytest is missing). Versions come from uv.lock, so
# the GPU run tests what CI tests. Wheels for CPython 3.12 on manylinux x86_64, the GPU image's.
#
#   bash scripts/gpu_wheels.sh        # here, with network access to the package index; ~9 MB
#
# Then carry .whl with the working tree (the device tool: carry [".whl"]) and run
# `bash scripts/gpu_check.sh` there. Override the target with GPU_PYTHON_VERSION=3.11 etc.
set -euo pipefail
cd "$(dirname "$0")/.."

PKGS=(
  albumentations albucore pydantic pydantic-core annotated-types typing-inspection typing-extensions
  simsimd stringzilla
  pycocotools
  pytest pluggy iniconfig packaging pygments
)
PYVER=${GPU_PYTHON_VERSION:-3.12}
PY=python3
[ -x .venv/bin/python ] && PY=.venv/bin/python

specs=$("$PY" - "${PKGS[@]}" <<'EOF'
import sys
import tomllib

with open("uv.lock", "rb") as f:
    lock = tomllib.load(f)
versions = {p["name"]: p["version"] for p in lock["package"]}
missing = [n for n in sys.argv[1:] if n not in versions]
if missing:
    sys.exit(f"gpu_wheels: not in uv.lock: {', '.join(missing)}")
print(" ".join(f"{n}=={versions[n]}" for n in sys.argv[1:]))
EOF
)

mkdir -p .whl
rm -f .whl/*.whl  # one version of each: two would stop the install there
PIP=(python3 -m pip)
python3 -m pip --version >/dev/null 2>&1 || PIP=("$PY" -m pip)
# shellcheck disable=SC2086
"${PIP[@]}" download --quiet --no-deps --only-binary=:all: \
  --python-version "$PYVER" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  -d .whl $specs

n=$(ls .whl/*.whl | wc -l)
if [ "$n" -ne "${#PKGS[@]}" ]; then
  echo "gpu_wheels: expected ${#PKGS[@]} wheels, got $n" >&2
  exit 1
fi
echo "gpu_wheels: $n wheels for CPython $PYVER in .whl/ ($(du -sh .whl | cut -f1)); carry .whl to the GPU machine"
