#!/usr/bin/env bash
# Issue 20's schedule study: does MKDT's margin over the paired random subset grow with its iterations?
# One `ssdd compare` folder per iteration count (each its own fingerprinted set; the data, teacher and experts
# are made once and copied), every seed of mkdt beside random_subset, no_pretrain and full_ssl; then one table,
# the margin and capture against iterations, and each set's loss and learned-lr curves
# (benchmarks/schedule_curve.py). Resumable: rerun the same command after a stop.
#
#   bash benchmarks/mkdt_schedule.sh                                  # quality-small, 100 500 2000, N = 10
#   ITERS="100 300" SYN_STEPS=20 DEVICE=cuda OUT=runs/mkdt-schedule bash benchmarks/mkdt_schedule.sh
#   PRESET=demo ITERS="2 4" EXTRA="--set evaluate.seeds=2" bash benchmarks/mkdt_schedule.sh   # a smoke run
#
# Cost at quality-small, N = 10, on one core of a 2-core EPYC (Zen 4): 4.45 s an iteration, so the default
# 3 seeds x (100 + 500 + 2000) iterations take ~10 hours; on a GPU, minutes. Writes into $OUT/curve.
set -eu
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
OUT=${OUT:-runs/mkdt-schedule}
ITERS=${ITERS:-100 500 2000}
PRESET=${PRESET:-quality-small}
DEVICE=${DEVICE:-auto}
SYN_STEPS=${SYN_STEPS:-10}
EXTRA=${EXTRA:-}
first=""
runs=()
for n in $ITERS; do
  d="$OUT/iterations-$n"
  mkdir -p "$d"
  if [ -n "$first" ] && [ ! -f "$d/teacher.safetensors" ]; then  # same data, teacher and experts as the first
    cp -r "$first/data" "$first/teacher.safetensors" "$first/config.prepare.json" "$first/config.teacher.json" "$d/"
    mkdir -p "$d/distilled/prep" && cp "$first"/distilled/prep/* "$d/distilled/prep/" 2>/dev/null || true
  fi
  # shellcheck disable=SC2086
  PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" "$PY" -m ssdd compare --out "$d" --preset "$PRESET" \
    --device "$DEVICE" --precision fp32 --no-progress --methods random_subset mkdt no_pretrain full_ssl \
    --set "distill.mkdt.iterations=$n" --set "distill.mkdt.syn_steps=$SYN_STEPS" $EXTRA
  first=${first:-$d}
  runs+=(--run "$n=$d")
done
PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" "$PY" benchmarks/schedule_curve.py --method mkdt \
  --xlabel "mkdt iterations (N = $SYN_STEPS)" --out "$OUT/curve" "${runs[@]}"
