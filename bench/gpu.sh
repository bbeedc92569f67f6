#!/usr/bin/env bash
# The GPU run of issue 13, in one go (budget: 8 minutes on an H100/H200-class machine):
#   1. install the project (with the machine's own CUDA build of torch, if it has one),
#   2. the parity tests on CUDA (tests/test_gpu.py: fp32 against CPU fp32 within 1e-4 on logits,
#      fp16 and bf16 within the dtype budget; the captioner's fp32 captions equal the CPU's), on
#      base-size random weights,
#   3. the benchmark (bench/gpu_bench.py: vision images/s, eager and under torch.compile (default
#      and CUDA graphs), ITM pairs/s, two models on one GPU, a Batch API job, the captioner,
#      filter --capfilt, and a Flickr30k-sized evaluation, 1000 images x 5000 captions, k=128),
# writing the Markdown table for BENCHMARKS.md to $OUT/gpu.md (default bench/out/gpu/).
#
#   bench/gpu.sh             # on a CUDA machine
#   bench/gpu.sh --dry-run   # the same steps on the CPU with tiny weights and a tiny evaluation
#                            # (no install: it runs from the checkout); tests/test_bench_gpu.py
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-$ROOT/bench/out/gpu}
mkdir -p "$OUT"
PYTHON=${PYTHON:-python3}

if [[ "${1:-}" == "--dry-run" ]]; then
    export BLIPITM_TEST_DEVICE=cpu BLIPITM_TEST_PRESET=tiny
    export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
    BENCH=(--device cpu --preset tiny --dtype float32 --vision-images 8 --itm-captions 32
        --caption-images 4 --capfilt-samples 8 --batch-texts 32 --no-compile
        --eval-images 8 --eval-captions 40 --k 4)
    echo "== 1/3 install: skipped in a dry run (would run: pip install -e \".[test]\")"
else
    export BLIPITM_TEST_DEVICE=cuda BLIPITM_TEST_PRESET=base
    BENCH=(--device cuda --preset base --dtype bfloat16)
    echo "== 1/3 install"
    # Keep a CUDA torch that is already there; pip would otherwise resolve a CPU-only one.
    if ! "$PYTHON" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
        echo "torch does not see a GPU here; install a CUDA build of torch first" >&2
        exit 1
    fi
    "$PYTHON" -m pip install --quiet -e ".[test]"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi

echo "== 2/3 parity tests on $BLIPITM_TEST_DEVICE ($BLIPITM_TEST_PRESET weights)"
timeout 240 "$PYTHON" -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider

echo "== 3/3 benchmark"
timeout 300 "$PYTHON" bench/gpu_bench.py "${BENCH[@]}" --out "$OUT/gpu.md"
echo "wrote $OUT/gpu.md"
