#!/usr/bin/env bash
# The engine's GPU check, one script, under 10 minutes on one H100 / H200:
#   1. gpu_bench.py at GPT 1.3B, seq 2048, bf16: mics_hf / bare step time and MFU (8N, against the matmul rate
#      measured on the card), and peak memory at world 1 against FSDP2's fully_shard on the same model;
#   2. gpu_two_rank_check.py: two ranks on the one GPU (gloo on CUDA tensors) at p = 1 and p = 2 against an
#      unsharded reference (this exercises the side streams, the pooled buffers and their events).
# Writes benchmarks/gpu_<date>.md / .json (numbered if that day has one) and benchmarks/gpu_check_<date>.log.
#
#   bash benchmarks/gpu_check.sh            # on the GPU machine, from the repository root
#   STEPS=4 ROUNDS=1 bash benchmarks/gpu_check.sh   # shorter
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1
log="benchmarks/gpu_check_$(date +%F).log"
n=2
while [ -e "$log" ]; do log="benchmarks/gpu_check_$(date +%F)_$n.log"; n=$((n + 1)); done
{
  echo "# $(date -Is) $(hostname); $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo 'no nvidia-smi')"
  python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
  echo "## gpu_bench (GPT 1.3B, seq 2048, bf16; bare, mics_hf, FSDP2)"
  timeout 420 python benchmarks/gpu_bench.py --record --steps "${STEPS:-6}" --warmup 2 --rounds "${ROUNDS:-2}"
  echo "## two ranks on one GPU (gloo on CUDA tensors), p = 1 and p = 2"
  timeout 150 python benchmarks/gpu_two_rank_check.py
} 2>&1 | tee "$log"
