#!/usr/bin/env bash
# The GPU figures of the torch, jax and quantisation issues in one command, on a CUDA machine
# whose python3 has torch, jax (with its CUDA plugin) and transformers: gemma-core runs from this
# checkout, nothing is installed. Random weights of the gemma-2b shape in bf16, batch-1 decode;
# each engine's decode speed as a share of the measured copy bandwidth (the targets: 70% for
# torch-compile and jax bf16; int8 1.5x and int4 2x this project's bf16), beside transformers
# (dynamic and static caches). The table is rewritten after every engine, so a run cut short
# keeps what it measured. Expect 6 to 9 minutes on an H100/H200.
#
#   bash benchmarks/gpu.sh [OUT_DIR] [MODEL]        (MODEL: gemma-2b by default; gemma-7b is
#                                                    about 3x the time, run it on its own)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-.}
model=${2:-gemma-2b}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c 'import torch, jax; print("torch", torch.__version__, "jax", jax.__version__, jax.devices())'
# most important first: a run cut short by its time limit still answers the bf16 targets
python3 benchmarks/decode.py --model "$model" --device cuda --dtypes bfloat16 --weights-dtype bfloat16 \
    --new-tokens 64 --timeout 300 --out "$out/results-gpu-$model.md" \
    --engines transformers,torch-compile,jax,torch-compile-int8,torch-compile-int4,transformers-static,jax-int8,jax-int4,torch
