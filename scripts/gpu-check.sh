#!/usr/bin/env bash
# On a machine with an NVIDIA GPU and TensorRT: build the reference model's TensorRT FP16 and INT8
# engines, run the parity gate on them and, where this ulsam-deploy has a bench command, time them.
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
