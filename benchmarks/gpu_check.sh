#!/usr/bin/env bash
# The GPU check: every GPU path of the project in one run that fits in 9 minutes on one
# H100/H200, results under benchmarks/results/gpu_check/ (a log per step and summary.md).
#
#   bash benchmarks/gpu_check.sh --fetch-wheels   # here, once: wheels the GPU machine lacks -> .whl/
#   bash benchmarks/gpu_check.sh                  # there (carry .whl): the real run
#   bash benchmarks/gpu_check.sh --dry-run        # anywhere: every step at toy size on the CPU
#
# Time limits per step (s): env 30, tests 90, encode 150, search 150, serve 90 (8.5 min in all).
# Steps: the tests marked gpu; encode tokens/s, MFU and peak memory (default, paper) and the
# exact stage per candidate on Pythia-1B- and Llama-3.2-1B-shaped models (random weights; the
# CPU's GPT-2 small and 350M figures: benchmarks/bench_scale.py); search at 1M x 4096 with faiss-gpu (Flat, IVF-PQ +
# exact re-rank) and the torch placement; `serve --workers 2` on CUDA under bounded load on
# 127.0.0.1. A failed step is recorded and the next one runs.
set -uo pipefail
cd "$(dirname "$0")/.."
MODE=run
case "${1:-}" in
  --dry-run) MODE=dry ;;
  --fetch-wheels) MODE=fetch ;;
  "") ;;
  *) echo "usage: $0 [--dry-run | --fetch-wheels]" >&2; exit 2 ;;
esac
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}  # the GPU image: python3
# What the GPU image lacks (it has torch, transformers, numpy, scipy, tqdm, safetensors, ...).
WHEELS="faiss-gpu-cu12==1.14.1.post1 nvidia-cublas-cu12 nvidia-cuda-runtime-cu12 fastapi==0.163.2 starlette
uvicorn==0.54.0 httptools==0.9.0 pydantic==2.14.3 pydantic-core pydantic-settings==2.16.3 python-dotenv
typing-inspection annotated-types bm25s==0.3.16 prometheus-client==0.26.0 datasets==5.2.0 dill multiprocess"

if [ "$MODE" = fetch ]; then
  mkdir -p .whl
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
  for w in $WHEELS; do
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 --platform any -d .whl "$w" || echo "could not fetch $w" >&2
  done
  ls .whl
  exit 0
fi

OUT=${GPU_CHECK_OUT:-benchmarks/results/gpu_check}
mkdir -p "$OUT"
if [ "$MODE" = run ] && ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1

if [ "$MODE" = dry ]; then
  ENCODE="--models pythia-tiny,llama-tiny --seq-lens 32 --batch 2 --device cpu"
  SEARCH="--quick --queries 64 --factories IVF64,PQ16x4fs --torch-exact"  # 8-bit PQ trains for ~40 s on 2 cores
  SERVE="--quick --proj-dim 8"  # the toy index: skip the default's 1024-dim whitening
  SCALE=4  # toy sizes on 2 CPU cores take longer than the real ones on the GPU
else
  ENCODE="--models pythia-1b,llama-3.2-1b --seq-lens 512 --batch auto --device cuda"
  SEARCH="--sizes 1000000x4096 --query-signal 0.15 --queries 128 --factories IVF4096,PQ64 --torch-exact --threads 8"  # Flat is always measured
  SERVE="--duration 5 --single 20 --pairs 1 --env INFLUENCE_WORKERS=2 --env INFLUENCE_DEVICE=cuda"
  SCALE=1
fi

status=()
step() {  # step NAME SECONDS COMMAND...: run with a time limit (x SCALE), log to $OUT/NAME.log
  local name=$1 limit=$(($2 * SCALE)); shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  status+=("| $name | $rc | $((SECONDS - t0)) |")
  echo "[$name] exit $rc after $((SECONDS - t0)) s"
}

step env 30 "$PY" -c "import torch, json; print(json.dumps({'torch': torch.__version__, 'cuda': torch.cuda.is_available(),
 'gpu': torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}))"
step tests_gpu 90 "$PY" -m pytest -q -m gpu tests/gpu -p no:cacheprovider
# shellcheck disable=SC2086  # the option strings are meant to split
step encode 150 "$PY" -m benchmarks.bench_encode $ENCODE --tag gpu_check --out "$OUT"
# shellcheck disable=SC2086
step search 150 "$PY" -m benchmarks.bench_search $SEARCH --tag gpu_check --out "$OUT" --workdir /tmp/gpu_check_search
# shellcheck disable=SC2086
step serve 90 "$PY" -m benchmarks.bench_service $SERVE --tag gpu_check --out "$OUT"

{
  echo "# GPU check ($MODE)"
  echo
  echo "| step | exit | seconds |"
  echo "|---|---|---|"
  printf '%s\n' "${status[@]}"
  echo
  echo "Logs: one per step beside this file; numbers: bench_*_gpu_check.md."
} > "$OUT/summary.md"
cat "$OUT/summary.md"
for s in "${status[@]}"; do
  case "$s" in *"| 0 |"*) ;; *) exit 1 ;; esac
done
