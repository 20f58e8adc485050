#!/usr/bin/env bash
# The GPU variant of `make bench` (about 3 minutes on one GPU): ours vs transformers' DeepseekV2 on a V2-Lite-shaped
# model cut to 4 layers, plus the tiny default. vllm does not travel to a lent GPU host (too large), so it is left
# out; torch and transformers are all this needs. From the repository root:
#   bash benchmarks/gpu.sh        -> benchmarks/results/modeling_speed_cuda.{md,json}
set -euo pipefail
PY=${PY:-python}
$PY -m benchmarks.modeling_speed --device cuda --no-vllm --model deepseek-v2-lite --layers 4 --vocab-size 4096 \
    --contexts 1024 4096 8192 --batch 16 --decode-steps 64 --train-shape 8 2048 --train-reps 10
cp benchmarks/results/modeling_speed_cuda.md benchmarks/results/modeling_speed_cuda_lite.md
cp benchmarks/results/modeling_speed_cuda.json benchmarks/results/modeling_speed_cuda_lite.json
$PY -m benchmarks.modeling_speed --device cuda --no-vllm --model tiny --contexts 256 1024 2048
