#!/usr/bin/env bash
# The device check for a machine with one CUDA GPU: the `cuda` tests (tests/fssd/test_cuda.py), then
# bench/bench_gpu.py (FSSD300-VGG16 vs torchvision's ssd300_vgg16: training img/s in bf16 +
# channels_last at batch 32 and 64, inference img/s at batch 64 and batch-1 latency, both including
# post-processing). Everything ends within GPU_CHECK_BUDGET_S (default 470 s, under 8 minutes).
#
#   bash scripts/gpu_check.sh             # on the GPU machine, in the repo root, .whl/ carried along
#   bash scripts/gpu_check.sh --dry-run   # on a CPU: the same steps, tests skipped, bench at tiny sizes
#
# The GPU machine needs python3 with torch, torchvision, numpy and opencv. What else the fssd library
# and its tests import comes from .whl/ (fill it with scripts/gpu_wheels.sh), installed with
# `pip install --no-index --no-deps --target` into a private directory: only the wheels whose
# distribution is missing there or older (pytest and its needs only where pytest is missing). Only
# the fssd library is imported, never pipeline/ (which needs ray and mlflow).
#
# With $OUT set, writes there: gpu_bench.md and gpu_bench.json (the table), gpu_tests.log and
# gpu_tests.xml (the cuda tests), gpu_check.log (this script's output). Exit status: 0 when the tests
# passed and every bench row was measured; 1 otherwise; 2 when no GPU is visible without --dry-run.
#
# With the device tool of this workplace: run(command="bash scripts/gpu_check.sh", carry=[".whl"],
# timeout_s=540); the files come back from $OUT.
set -u -o pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)

DRY=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
    *) echo "gpu_check: unknown argument $arg (use --dry-run)" >&2; exit 2 ;;
  esac
done

BUDGET=${GPU_CHECK_BUDGET_S:-470}
TESTS_BUDGET=${GPU_CHECK_TESTS_S:-200}
DEADLINE=$((SECONDS + BUDGET))
OUTDIR=${OUT:-}
if [ -z "$OUTDIR" ]; then
  OUTDIR=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
  KEEP_NOTE="(no \$OUT: files in $OUTDIR)"
else
  mkdir -p "$OUTDIR"
  KEEP_NOTE="(files in \$OUT)"
fi
LOG="$OUTDIR/gpu_check.log"
: >"$LOG"
log() { echo "[gpu_check $(date -u +%H:%M:%S) +${SECONDS}s] $*" | tee -a "$LOG"; }

PY=${PYTHON:-python3}
if [ "$DRY" = 1 ] && [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ]; then
  PY=.venv/bin/python
fi
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
SITE=${GPU_CHECK_SITE:-/tmp/gpu_check_site}
export PYTHONPATH="$REPO:$SITE${PYTHONPATH:+:$PYTHONPATH}"

log "mode: $([ "$DRY" = 1 ] && echo 'DRY RUN (CPU, tiny sizes)' || echo GPU), budget ${BUDGET}s, python $PY $KEEP_NOTE"
command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>&1 | tee -a "$LOG"
if ! "$PY" -c "import torch, torchvision, numpy, cv2; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'numpy', numpy.__version__, 'opencv', cv2.__version__, 'cuda', torch.cuda.is_available() and torch.cuda.get_device_name(0))" 2>&1 | tee -a "$LOG"; then
  log "torch, torchvision, numpy and opencv must be installed for $PY"
  exit 2
fi
if [ "$DRY" = 0 ] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  log "no CUDA GPU visible to torch: run with --dry-run on a CPU"
  exit 2
fi

# ---- 1. carried wheels: install what is missing or older -------------------------------------------
if ls .whl/*.whl >/dev/null 2>&1; then
  decisions=$("$PY" - .whl/*.whl <<'EOF'
import importlib.metadata as md
import re
import sys
from pathlib import Path

try:
    from packaging.version import Version
except ImportError:  # compare as tuples of ints
    def Version(v):
        return tuple(int(x) for x in re.findall(r"\d+", v))

PYTEST_GROUP = {"pytest", "pluggy", "iniconfig", "packaging", "pygments"}


def installed(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


have_pytest = installed("pytest") is not None
for wheel in map(Path, sys.argv[1:]):
    name, version = wheel.name.split("-")[:2]
    dist = re.sub(r"[-_.]+", "-", name).lower()
    have = installed(dist)
    if dist in PYTEST_GROUP:
        need = not have_pytest
        why = "pytest missing" if need else f"pytest present (have {dist} {have})"
    elif have is None:
        need, why = True, "missing"
    else:
        need = Version(have) < Version(version)
        why = f"have {have}" + (", older" if need else "")
    print(f"{'install' if need else 'keep'} {wheel} {dist} {version} ({why})")
EOF
  )
  echo "$decisions" | sed 's/^/  wheel: /' | tee -a "$LOG"
  mapfile -t WANT < <(echo "$decisions" | awk '$1 == "install" {print $2}')
  if [ "${#WANT[@]}" -eq 0 ]; then
    log "wheels: everything the tests import is already installed"
  elif [ "$DRY" = 1 ]; then
    log "wheels (dry run, not installed): would install ${WANT[*]}"
  else
    log "wheels: installing ${#WANT[@]} into $SITE"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
      "${WANT[@]}" 2>&1 | tee -a "$LOG" || log "wheels: pip install failed (the imports below will say what is missing)"
  fi
else
  log "wheels: no .whl/ here (run scripts/gpu_wheels.sh and carry .whl); using what is installed"
fi
"$PY" -c "
import importlib
for m in ('fssd', 'fssd.predictor', 'albumentations', 'pydantic', 'pycocotools', 'pytest'):
    try:
        mod = importlib.import_module(m)
        print('import', m, 'ok', getattr(mod, '__version__', ''))
    except Exception as e:
        print('import', m, 'FAILED:', type(e).__name__, e)
" 2>&1 | tee -a "$LOG"

# ---- 2. the cuda tests ------------------------------------------------------------------------------
left=$((DEADLINE - SECONDS))
tests_s=$((left - 150 < TESTS_BUDGET ? left - 150 : TESTS_BUDGET))
[ "$tests_s" -lt 30 ] && tests_s=30
log "cuda tests (at most ${tests_s}s)"
timeout -k 10 "$tests_s" "$PY" -m pytest tests/fssd/test_cuda.py -m cuda -v -rs -p no:cacheprovider \
  --junitxml "$OUTDIR/gpu_tests.xml" 2>&1 | tee "$OUTDIR/gpu_tests.log" | tee -a "$LOG"
tests_rc=${PIPESTATUS[0]}
[ "$tests_rc" = 124 ] && log "cuda tests: stopped at the ${tests_s}s limit"
log "cuda tests: exit status $tests_rc"

# ---- 3. the bench -----------------------------------------------------------------------------------
left=$((DEADLINE - SECONDS))
bench_budget=$((left - 90))
[ "$bench_budget" -lt 20 ] && bench_budget=20
log "bench (at most $((left - 5))s; no new measurement after ${bench_budget}s)"
bench_args=(--out-dir "$OUTDIR" --budget-s "$bench_budget")
[ "$DRY" = 1 ] && bench_args+=(--dry-run)
timeout -k 10 "$((left - 5 > 30 ? left - 5 : 30))" "$PY" bench/bench_gpu.py "${bench_args[@]}" 2>&1 | tee -a "$LOG"
bench_rc=${PIPESTATUS[0]}
[ "$bench_rc" = 124 ] && log "bench: stopped at the time limit (gpu_bench.md holds the rows measured)"

log "done: tests exit $tests_rc, bench exit $bench_rc; $(ls "$OUTDIR" | tr '\n' ' ')"
if [ -f "$OUTDIR/gpu_bench.md" ] && [ "$bench_rc" = 124 ]; then
  cat "$OUTDIR/gpu_bench.md"
fi
[ "$tests_rc" = 0 ] && [ "$bench_rc" = 0 ]
