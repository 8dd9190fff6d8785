#!/usr/bin/env bash
# The paper's ablations (issue #5) trained under one budget on this CPU, then evaluated side by side.
#
#   bash benchmarks/ablations.sh [AE_STEPS] [KEFT_STEPS] [LIMIT] [AE_INIT]
#
# 1. Four AE runs from the same seed and the same batches (configs/pilot.toml: 64-token
#    passages, batch 8, k_enc 4), AE_STEPS each: the method, no group merging (ICAE-style
#    memory tokens), LSA as a linear layer, LSA randomly initialised. Compared on validation
#    loss and BLEU (each run's metrics.jsonl) and on the soft-token information
#    (benchmarks/soft_token_information.py) on 32 held-out passages.
# 2. Two KEFT runs of KEFT_STEPS each (configs/keft.toml): from the AE checkpoint AE_INIT, and
#    without any AE stage. Compared on held-out QA.
# Every run is skipped when its `done` marker exists, so the script resumes where it stopped.
set -euo pipefail
AE_STEPS=${1:-200}
KEFT_STEPS=${2:-120}
LIMIT=${3:-24}
AE_INIT=${4:-checkpoints/ae/model}
GMSA=${GMSA:-.venv/bin/gmsa}
RUNS=runs/ablations
REPORTS=reports/eval

run() {  # run NAME gmsa-train-arguments...
  local name=$1
  shift
  if [ -f "$RUNS/$name/done" ]; then return; fi
  "$GMSA" train "$@" out_dir="$RUNS/$name" threads=1
  touch "$RUNS/$name/done"
}

ae_budget="max_steps=$AE_STEPS eval_every=$AE_STEPS lsa_match_embedding_scale=false"
run gmsa ae --config configs/pilot.toml $ae_budget
run no-group-merging ae --config configs/pilot.toml $ae_budget merge=memory
run lsa-linear ae --config configs/pilot.toml $ae_budget lsa_init=linear
run lsa-random ae --config configs/pilot.toml $ae_budget lsa_init=random

keft_budget="max_steps=$KEFT_STEPS warmup_steps=$((KEFT_STEPS / 10)) eval_every=$KEFT_STEPS"
run keft-after-ae keft --config configs/keft.toml $keft_budget init="\"$AE_INIT\""
run keft-without-ae keft --config configs/keft.toml $keft_budget init='""' k_enc=4 lsa_match_embedding_scale=false

# Reconstruction BLEU of every variant is still at the floor after a CPU-sized budget (each run's
# val_bleu_x* in metrics.jsonl); the soft-token information separates them (nats per token).
.venv/bin/python benchmarks/soft_token_information.py --limit 32 --out "$REPORTS/ablations-information" \
  --model "gmsa=$RUNS/gmsa/model" \
  --model "no-group-merging=$RUNS/no-group-merging/model" \
  --model "lsa-linear=$RUNS/lsa-linear/model" \
  --model "lsa-random=$RUNS/lsa-random/model"
.venv/bin/python -m gmsa.training.curves --compare "gmsa=$RUNS/gmsa/metrics.jsonl" \
  "no-group-merging=$RUNS/no-group-merging/metrics.jsonl" "lsa-linear=$RUNS/lsa-linear/metrics.jsonl" \
  "lsa-random=$RUNS/lsa-random/metrics.jsonl" "$REPORTS/ablations-ae-loss.png"

"$GMSA" eval qa --threads 1 --limit "$LIMIT" --rates 4 --max-new-tokens 48 --baselines --out "$REPORTS/ablations-qa" \
  --model "keft-after-ae=$RUNS/keft-after-ae/model" \
  --model "keft-without-ae=$RUNS/keft-without-ae/model"
