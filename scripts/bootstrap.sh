#!/usr/bin/env bash
# Creates/updates .venv from uv.lock. Needs only python3 (>= 3.10); installs uv when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
if command -v uv >/dev/null 2>&1; then
  UV=uv
elif [ -x .tools/venv/bin/uv ]; then
  UV=.tools/venv/bin/uv
elif [ -x .tools/uv/bin/uv ]; then
  UV=.tools/uv/bin/uv
else
  echo "bootstrap: installing uv into .tools/" >&2
  if python3 -m venv .tools/venv >/dev/null 2>&1 && .tools/venv/bin/python -m pip install --quiet uv; then
    UV=.tools/venv/bin/uv
  else
    rm -rf .tools/venv
    python3 -m pip install --quiet --target .tools/uv uv 2>/dev/null \
      || python3 -m pip install --quiet --break-system-packages --target .tools/uv uv
    UV=.tools/uv/bin/uv
  fi
fi
"$UV" sync --locked --quiet
