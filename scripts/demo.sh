#!/usr/bin/env bash
# The main job: pretrain a tiny GPT with MiCS through Accelerate, the way a cluster run is launched:
#   accelerate launch --config_file accelerate_configs/mics_cpu.yaml recipes/pretrain_gpt.py --preset tiny
# 4 CPU processes (gloo) act as 2 emulated nodes x 2, one partition group of 4 spanning both, so parameters
# are gathered and gradients reduce-scattered hierarchically. It trains on the Python standard library's own
# source (offline, with a tokenizer trained on it), logs every step to runs/demo/metrics.jsonl and to an
# offline W&B run, and ends with a summary table. Sets up .venv first if needed; extra arguments go to the
# recipe (e.g. --max_steps 20). The plain-PyTorch version of the same idea: scripts/demo_engine.py.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
cd "$ROOT"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"   # 4 ranks on a small machine: one intra-op thread each
export TRANSFORMERS_VERBOSITY="${TRANSFORMERS_VERBOSITY:-error}" WANDB_SILENT="${WANDB_SILENT:-true}"
rm -rf runs/demo/checkpoints                      # a fresh run each time (the tokenizer cache is kept)
accelerate launch --config_file accelerate_configs/mics_cpu.yaml recipes/pretrain_gpt.py \
    --preset tiny --max_steps 60 --output_dir runs/demo --report_to wandb --run_name demo "$@"
