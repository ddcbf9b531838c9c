#!/usr/bin/env bash
# On a machine with an NVIDIA GPU: train for a few steps on the GPU (AMP, channels_last; two processes
# when there are two GPUs) and print images/s; then, where TensorRT is installed, build the reference
# model's TensorRT FP16 and INT8 engines, run the parity gate on them and time them.
#   TRAIN_ONLY=1  stop after the training step (a GPU without TensorRT)
# Prints the tables; exits non-zero on the first failure (a parity breach exits 1, a missing GPU or
# TensorRT exits 2 with a one-line reason).
#   MODEL  model folder or checkpoint      (default: the shipped digits reference model)
#   OUT    export directory                (default: runs/<model name>, where bench looks too)
#   BATCH  bench batch sizes, comma list   (default: 1,32)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [[ -x .venv/bin/ulsam-deploy ]]; then cli=.venv/bin/ulsam-deploy; else cli=ulsam-deploy; fi
model=${MODEL:-models/mv2-ulsam-13-14-16-17-g4-digits}
out=${OUT:-runs/$(basename "${model%.*}")}
batch=${BATCH:-1,32}

if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,driver_version,compute_cap --format=csv,noheader
fi

gpus=$(python3 -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
train() {   # processes, amp
  local dir
  dir=$(mktemp -d)
  echo "== train: $1 process(es), --amp $2, fashion at 112 px, 60 steps of batch 256 per process"
  "$cli" train --arch mv2 --positions 13,14,16,17 --data fashion --input-size 112 --epochs 1 --batch-size 256 \
      --max-steps 60 --workers 8 --device cuda --amp "$2" --nproc "$1" --out "$dir/m" --json \
    | python3 -c "import json,sys; r=json.load(sys.stdin); print(f\"{r['images_per_s']:.0f} images/s on {r['world_size']} x {r['device']} (amp {r['amp']}), data wait {r['data_wait_s']} s\")"
  rm -rf "$dir"
}
train 1 bf16
train 1 fp16
if [[ "$gpus" -ge 2 ]]; then train 2 bf16; fi
if [[ -n "${TRAIN_ONLY:-}" ]]; then exit 0; fi

echo "== export trt-fp16, trt-int8 -> $out"
"$cli" export --model "$model" --formats trt-fp16,trt-int8 --out "$out"

echo "== check (parity gate vs the eager fp32 model)"
"$cli" check --export "$out" --formats trt-fp16,trt-int8

if "$cli" bench --help >/dev/null 2>&1; then
  echo "== bench --backend trt (batch $batch)"
  "$cli" bench --model "$model" --backend trt --batch "$batch"
else
  echo "== bench: this ulsam-deploy has no bench command; skipped"
fi
