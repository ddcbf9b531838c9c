#!/usr/bin/env bash
# The 112 px Fashion-MNIST reference models: the shipped 48 px models fine-tuned at 112 px in four stages with
# one recipe for both (stage 1: 3 epochs, lr 0.02; stage 2: 2 more epochs, lr 0.01; stages 3 and 4: 4 more
# epochs each, lr 0.005, seeds 2 and 3; cosine decay in each, each stage starting from the previous one's
# weights), two processes (one per core), one run after the other. A stage's batches and augmentations follow
# (seed, epoch), so a stage with an earlier stage's seed replays that stage's samples: stages 3 and 4 draw fresh
# ones. Run again after an interruption: each run resumes from its last finished epoch; a finished run is left
# alone. Stages 1-3 write to runs/fashion-112/ (RUNS to change), stage 4 the models to models/ (OUT to change).
set -euo pipefail
cd "$(dirname "$0")/.."
U=.venv/bin/ulsam-deploy
OUT=${OUT:-models}
RUNS=${RUNS:-runs/fashion-112}
mkdir -p "$RUNS"
run() {   # output folder, log name, train arguments
    local out=$1 log=$2; shift 2
    local resume=()
    [ -f "$out/model.safetensors" ] && [ ! -f "$out/train_state.pt" ] && return 0
    [ -f "$out/train_state.pt" ] && resume=(--resume)
    $U train "$@" --data fashion --batch-size 64 --workers 1 --nproc 2 --out "$out" --json "${resume[@]}" \
        > "$RUNS/$log.json" 2>> "$RUNS/$log.log"
}
for pair in mv2-ulsam-13-14-16-17-g4-fashion mv2-fashion; do
    run "$RUNS/$pair-112-stage1" "$pair-112-stage1" --start-from "models/$pair" --input-size 112 --epochs 3 --lr 0.02
    run "$RUNS/$pair-112-stage2" "$pair-112-stage2" --start-from "$RUNS/$pair-112-stage1" --epochs 2 --lr 0.01
    run "$RUNS/$pair-112-stage3" "$pair-112-stage3" --start-from "$RUNS/$pair-112-stage2" --epochs 4 --lr 0.005 --seed 2
    run "$OUT/$pair-112" "$pair-112" --start-from "$RUNS/$pair-112-stage3" --epochs 4 --lr 0.005 --seed 3
done
