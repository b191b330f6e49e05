#!/usr/bin/env bash
# Issue 5's "done when" on a converted real MoE, one command per step:
# SmolLM2-135M upcycled to 8 experts (top-2, top 4 layers) -> MAP fine-tune on OBQA -> Bayesian-MoE fit
# -> evaluate MAP and all baselines on OBQA, ARC-C, ARC-E and MMLU subjects.
# Usage: experiments/cli_smollm2_obqa.sh OUT_DIR [DATA_DIR]   (CPU: ~1 h on 2 cores)
set -euo pipefail
OUT=${1:?usage: $0 OUT_DIR [DATA_DIR]}
DATA=${2:-${BMOE_DATA_DIR:-../shared/data}}
BMOE=${BMOE:-bmoe}
N=${N:-400}  # seeded subset of each dataset (the training subset is also last-layer Laplace's fit data)
mkdir -p "$OUT"
# each step runs once: a rerun skips the steps whose output exists (times.txt keeps their times)
t() { local name=$1; shift; grep -q "^$name " "$OUT/times.txt" 2>/dev/null && return 0
      local t0=$(date +%s); "$@"; echo "$name $(( $(date +%s) - t0 ))" >> "$OUT/times.txt"; }
t upcycle $BMOE upcycle smollm2 "$OUT/moe" --num-experts 8 --top-k 2 --moe-layers top:4 --quiet
t finetune $BMOE finetune --model "$OUT/moe" --data-dir "$DATA" --train obqa:train --val obqa:dev \
  --max-train $N --max-eval $N --batch-size 16 --max-length 160 --scoring letters --trainable experts_router --layers 26,27,28,29 \
  --lr 1e-3 --epochs 2 --eval-every 25 --keep-checkpoints 4 --checkpoint-every 25 --cache-prefix \
  --out "$OUT/finetune" --quiet
t fit $BMOE fit --model "$OUT/finetune/model" --pretrained "$OUT/moe" --data-dir "$DATA" --train obqa:train \
  --max-train $N --max-eval $N --batch-size 16 --max-length 160 --scoring letters --bayes-layers all --rank 10 --prior grid --val obqa:dev --cache-prefix \
  --out "$OUT/fit" --quiet
t evaluate $BMOE evaluate --model "$OUT/finetune/model" --data-dir "$DATA" --max-eval $N --batch-size 16 \
  --max-length 160 --scoring letters --test obqa:test --train obqa:train --max-train $N \
  --shift arc_challenge:test,arc_easy:test,mmlu:test:astronomy+high_school_geography+high_school_biology+conceptual_physics \
  --methods map,ts,mc_dropout,llla,ckpt_ensemble,bmoe --posterior "$OUT/fit/posterior" \
  --checkpoints "$OUT/finetune/checkpoints" --cache-prefix --out "$OUT/evaluate" --quiet
cat "$OUT/times.txt"
