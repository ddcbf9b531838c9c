#!/usr/bin/env bash
# The distillation table of docs/training.md: ULSAM surgery of models/mv2-fashion at 13,14,16,17, fine-tuned
# 3 epochs on Fashion-MNIST with and without the unmodified model as teacher (test top-1 after each epoch).
# Both runs side by side, one core each; each resumes where it stopped when the script is run again.
set -euo pipefail
cd "$(dirname "$0")/.."
U=.venv/bin/ulsam-deploy
OUT=${OUT:-runs/distil}
mkdir -p "$OUT"
[ -f "$OUT/surgery.safetensors" ] || $U build --from models/mv2-fashion --positions 13,14,16,17 --groups 4 \
    --out "$OUT/surgery.safetensors" > /dev/null
run() {   # name, extra args
    local name=$1; shift
    local resume=()
    [ -f "$OUT/$name/train_state.pt" ] && resume=(--resume)
    [ -f "$OUT/$name/model.safetensors" ] && [ ! -f "$OUT/$name/train_state.pt" ] && return 0
    OMP_NUM_THREADS=1 $U train --model "$OUT/surgery.safetensors" --data fashion --epochs 3 --batch-size 128 \
        --lr 0.01 --workers 1 --out "$OUT/$name" --json "$@" "${resume[@]}" > "$OUT/$name.json" 2> "$OUT/$name.log"
}
run plain &
run teacher --teacher models/mv2-fashion &
wait
