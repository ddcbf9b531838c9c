#!/usr/bin/env bash
# The 112 px Fashion-MNIST reference models: the shipped 48 px models fine-tuned at 112 px in five stages with
# one recipe for both (stage 1: 3 epochs, lr 0.02; stage 2: 2 more epochs, lr 0.01; stages 3 and 4: 4 more
# epochs each, lr 0.005, seeds 2 and 3; stage 5: 4 more epochs, lr 0.0025, seed 4; cosine decay in each, each
# stage starting from the previous one's weights), two processes (one per core), one model after the other. A
# stage's batches and augmentations follow (seed, epoch), so a stage with an earlier stage's seed replays that
# stage's samples: stages 3 to 5 draw fresh ones.
# Run again after an interruption: a model continues after its last finished stage (a stage cut short resumes
# from its last finished epoch); a finished model is left alone. Stages 1-4 write to runs/fashion-112/ (RUNS to
# change), stage 5 the models to models/ (OUT to change). To carry a model's progress to another machine, copy
# the last finished stage's model.safetensors and README.md to models/<pair>-112/stageN.safetensors and
# stageN.md: a stage found there counts as finished, and the next stage starts from it.
set -euo pipefail
cd "$(dirname "$0")/.."
U=.venv/bin/ulsam-deploy
OUT=${OUT:-models}
RUNS=${RUNS:-runs/fashion-112}
LAST=5
mkdir -p "$RUNS"
stage_args() {   # stage -> its train arguments
    case $1 in
        1) echo --input-size 112 --epochs 3 --lr 0.02 ;;
        2) echo --epochs 2 --lr 0.01 ;;
        3) echo --epochs 4 --lr 0.005 --seed 2 ;;
        4) echo --epochs 4 --lr 0.005 --seed 3 ;;
        5) echo --epochs 4 --lr 0.0025 --seed 4 ;;
    esac
}
stage_dir() {   # pair, stage -> output folder
    if [ "$2" -eq "$LAST" ]; then echo "$OUT/$1-112"; else echo "$RUNS/$1-112-stage$2"; fi
}
finished() { [ -f "$1/model.safetensors" ] && [ ! -f "$1/train_state.pt" ]; }
stage_weights() {   # pair, stage -> the finished stage's weights (folder or carried file), or nothing
    local dir carried
    dir=$(stage_dir "$1" "$2") carried="$OUT/$1-112/stage$2.safetensors"
    if finished "$dir"; then echo "$dir"; elif [ "$2" -lt "$LAST" ] && [ -f "$carried" ]; then echo "$carried"; fi
}
for pair in mv2-ulsam-13-14-16-17-g4-fashion mv2-fashion; do
    first=1
    for ((s = LAST; s >= 1; s--)); do
        if [ -n "$(stage_weights "$pair" "$s")" ]; then first=$((s + 1)); break; fi
    done
    for ((s = first; s <= LAST; s++)); do
        out=$(stage_dir "$pair" "$s")
        if [ "$s" -eq 1 ]; then src=models/$pair; else src=$(stage_weights "$pair" $((s - 1))); fi
        resume=()
        [ -f "$out/train_state.pt" ] && resume=(--resume)
        log=$(basename "$out")
        # shellcheck disable=SC2046  # stage_args is a fixed list of words
        $U train --start-from "$src" $(stage_args "$s") --data fashion --batch-size 64 --workers 1 --nproc 2 \
            --out "$out" --json "${resume[@]}" > "$RUNS/$log.json" 2>> "$RUNS/$log.log"
    done
done
