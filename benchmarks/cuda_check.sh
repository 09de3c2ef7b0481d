#!/usr/bin/env bash
# One-shot GPU check of ssdd on one GPU, within 8 minutes on an H200. Reports; never stops at a failure.
#
#   bash benchmarks/cuda_check.sh                      # results in benchmarks/results/<date>-<gpu>/
#   RESULTS=/some/folder bash benchmarks/cuda_check.sh
#   KRRST_OFFICIAL_DIR=/path/to/selfsup_dd bash ...    # also times the reference KRR-ST code side by side
#
# Needs: Python >= 3.10 with a CUDA build of torch (>= 2.5 for compiled graphs), numpy, safetensors, tqdm,
# matplotlib, scikit-learn, scipy, threadpoolctl, pillow, pytest; plus kornia and mlxtend, which a GPU
# machine may lack: put their wheels in .whl/ (kornia, kornia_rs, mlxtend; `pip download --no-deps -d .whl
# kornia kornia_rs mlxtend`) and this script installs them into a temporary folder. ssdd itself runs from
# src/ through PYTHONPATH, nothing installed.
#
# Steps, each with its own time limit (a step that would start after its deadline is skipped and says so):
#   1 the `cuda` tests            5 step_speed: ssdd (bf16, fp32, compiled, no fold) vs the reference code
#   2 probes (syncs per step,     6 the m = 10,000 memory sweep
#     TF32, determinism, ...)     7 summary.json: what ran, return codes, seconds
#   3 the demo end to end
#   4 every method, tiny
set -u
cd "$(dirname "$0")/.."
START=$SECONDS
PY=${PYTHON:-python3}
GPU=$($PY -c "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no-gpu')" 2>/dev/null \
      | tr 'A-Z ' 'a-z-' | tr -cd 'a-z0-9-')
RESULTS=${RESULTS:-benchmarks/results/$(date +%F)-${GPU:-unknown}}
mkdir -p "$RESULTS"
SITE=$(mktemp -d)
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target "$SITE" .whl/*.whl >"$RESULTS/install.log" 2>&1
fi
export PYTHONPATH="$SITE:$PWD/src:$PWD/tests${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export CUBLAS_WORKSPACE_CONFIG=:4096:8 SSDD_CACHE_DIR="$RESULTS/cache"
RUNS=$(mktemp -d)
declare -A RC SECS

step() {  # step NAME DEADLINE_S TIMEOUT_S COMMAND...: run it if it can start before DEADLINE_S
  local name=$1 deadline=$2 limit=$3; shift 3
  if [ $((SECONDS - START)) -ge "$deadline" ]; then
    echo "=== $name: skipped (t=$((SECONDS - START)) s, deadline $deadline s)"; RC[$name]=skipped; return
  fi
  echo "=== $name (t=$((SECONDS - START)) s, limit $limit s)"
  local t0=$SECONDS
  timeout "$limit" "$@" >"$RESULTS/$name.log" 2>&1
  RC[$name]=$?; SECS[$name]=$((SECONDS - t0))
  echo "    rc=${RC[$name]} in ${SECS[$name]} s"; tail -n 4 "$RESULTS/$name.log" | sed 's/^/    /'
}

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $PY -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda,
'cudnn', torch.backends.cudnn.version(), 'capability', torch.cuda.get_device_capability(0))"
  $PY -c "import kornia, mlxtend, sklearn; print('kornia', kornia.__version__, 'mlxtend', mlxtend.__version__)"
  grep -m1 'model name' /proc/cpuinfo; nproc
} >"$RESULTS/environment.txt" 2>&1
cat "$RESULTS/environment.txt"

step cuda_tests 60 120 $PY -m pytest -q -p no:cacheprovider -m "cuda and not slow" tests/test_cuda.py
step probe 150 150 $PY benchmarks/cuda_probe.py --device cuda
cp "$RESULTS/probe.log" "$RESULTS/probe.jsonl" 2>/dev/null
step demo 260 150 $PY -m ssdd run --preset demo --out "$RUNS/demo" --device cuda --no-progress
cp "$RUNS/demo/timings.json" "$RESULTS/demo_timings.json" 2>/dev/null
cp "$RUNS/demo/report.md" "$RESULTS/demo_report.md" 2>/dev/null
step every_method 330 80 $PY -c "
import sys, json, tempfile
from test_methods import tiny_args, tiny_npz
from pathlib import Path
from ssdd.cli import main
from ssdd.distill import registry
tmp = Path(tempfile.mkdtemp()); src = tiny_npz(tmp / 'src.npz')
rc = main(['compare', '--out', str(tmp / 'run'), '--device', 'cuda', *tiny_args(src, [src], registry.names(), seeds=1)])
rows = json.loads((tmp / 'run' / 'results.json').read_text())
print(json.dumps({'rc': rc, 'methods_with_rows': sorted({r['method'] for r in rows}), 'all': registry.names()}))
sys.exit(rc)"
step step_speed 400 110 $PY benchmarks/step_speed.py --device cuda --config paper --steps 8 --warmup 2 \
  --variants fp32 nofold nocompile
cp "$RESULTS/step_speed.log" "$RESULTS/step_speed.jsonl" 2>/dev/null
step m_sweep 440 40 $PY benchmarks/step_speed.py --device cuda --config paper --m-sweep 2000 5000 10000 \
  --steps 2 --warmup 1 --chunk 0

{
  echo "{\"gpu\": \"$GPU\", \"total_s\": $((SECONDS - START)), \"steps\": {"
  first=1
  for name in cuda_tests probe demo every_method step_speed m_sweep; do
    [ $first = 1 ] || echo ","; first=0
    echo "  \"$name\": {\"rc\": \"${RC[$name]:-not run}\", \"s\": ${SECS[$name]:-null}}"
  done
  echo "}}"
} >"$RESULTS/summary.json"
cat "$RESULTS/summary.json"
echo "results in $RESULTS"
