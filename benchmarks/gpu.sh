#!/usr/bin/env bash
# One command for the GPU benchmark (issue 16 item 4): stage 2 at a 1.1B LLM (TinyLlama-shaped) + CLIP-L/336
# tower, random weights, bf16 autocast, flash-attention 2 when installed (else sdpa), on one GPU; llavakit with
# and without packing, the fused/chunked LM-head loss and torch.compile, beside HF Llava + Trainer; prints the
# table with MFU (6N trained + 4N pass-through + 2N vision FLOPs per token, --peak-tflops 989 = H200 bf16).
#
#   bash benchmarks/gpu.sh                 # ~8 min on an H200 (workload written once to /tmp/llavakit-bench)
#   STEPS=40 ROWS=1,10,14 bash benchmarks/gpu.sh --json perf-gpu.json   # more steps, chosen rows, JSON
#
# Rows (benchmarks/throughput_workload.py, stage2_rows): 1 peer, 7 grouping + sup-only logits + workers,
# 8 the same + packing, 10 grouping + sup-only + chunked/fused loss + workers, 14 that + compile,
# 15 packing + chunked loss + compile.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'benchmarks/gpu.sh needs a CUDA GPU (torch.cuda.is_available() is False)')"
exec "$PY" benchmarks/train_throughput.py --device cuda --shape gpu --stages 2 \
    --rows "${ROWS:-1,7,8,10,14,15}" --steps "${STEPS:-20}" --warmup "${WARMUP:-3}" --repeats 1 \
    --peak-tflops "${PEAK_TFLOPS:-989}" "$@"
