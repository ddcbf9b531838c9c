#!/usr/bin/env bash
# The 112 px Fashion-MNIST reference models: the shipped 48 px models fine-tuned at 112 px with one recipe,
# two processes (one per core), one model after the other. Run again after an interruption: each run resumes
# from its last finished epoch; a finished model is left alone. The models are written to models/ (OUT to change).
set -euo pipefail
cd "$(dirname "$0")/.."
U=.venv/bin/ulsam-deploy
OUT=${OUT:-models}
LOGS=${LOGS:-runs/fashion-112}
EPOCHS=${EPOCHS:-3}
mkdir -p "$LOGS"
run() {   # name, 48 px model
    local name=$1 start=$2
    local resume=()
    [ -f "$OUT/$name/model.safetensors" ] && [ ! -f "$OUT/$name/train_state.pt" ] && return 0
    [ -f "$OUT/$name/train_state.pt" ] && resume=(--resume)
    $U train --start-from "$start" --input-size 112 --data fashion --epochs "$EPOCHS" --batch-size 64 \
        --lr 0.02 --workers 1 --nproc 2 --out "$OUT/$name" --json "${resume[@]}" \
        > "$LOGS/$name.json" 2>> "$LOGS/$name.log"
}
run mv2-ulsam-13-14-16-17-g4-fashion-112 models/mv2-ulsam-13-14-16-17-g4-fashion
run mv2-fashion-112 models/mv2-fashion
