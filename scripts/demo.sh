#!/usr/bin/env bash
# The main demo: trains a tiny GPT-2 with mics_hf on 4 CPU processes (gloo) that emulate 2 nodes x 2 ranks, and
# prints per step the loss, the step time and the bytes each collective moved on intra-node / inter-node links,
# then a summary table. Sets up .venv first if needed. Extra arguments go to scripts/demo_engine.py, e.g.
#   bash scripts/demo.sh --steps 3 --partition-size 2 --hierarchical false
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
cd "$ROOT"
# Four ranks on a 2-core machine: one intra-op thread each, so they do not fight over the cores.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
python -m torch.distributed.run --standalone --nproc_per_node 4 "$ROOT/scripts/demo_engine.py" "$@"
