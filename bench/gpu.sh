#!/usr/bin/env bash
# GPU checks, for a machine with CUDA (CI has none): the CUDA tests, the demo on the GPU, and the synthesis speed
# benchmark on the shipped teacher and on a torchvision ResNet-50 (random weights: speed does not depend on them).
# Usage: bash bench/gpu.sh [RESULTS_DIR]    (PY=python interpreter with torch; default: python3)
set -uo pipefail
PY=${PY:-python3}
OUT_DIR=${1:-bench/results}
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD PYTHONUNBUFFERED=1
mkdir -p "$OUT_DIR"
status=0
step() { echo "== $*"; "$@" || { echo "!! failed ($?): $*"; status=1; }; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"
step $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_bn.py tests/test_synthesis.py
demo=$(mktemp -d)
step $PY -m zeroshot_kd synthesize --method deepinversion --num-images 256 --batch-size 64 --iterations 200 \
  --device cuda --precision bf16 --out "$demo/synth"
step $PY -m zeroshot_kd calibrate --data "$demo/synth" --bits 4 --device cuda --out "$demo/student.pt"
step $PY -m zeroshot_kd evaluate --model "$demo/student.pt" --data fashion-mnist:test --teacher fmnist_resnet14 \
  --device cuda
step $PY bench/bench_synthesis.py --device cuda --precision fp32,bf16 --rounds 2 --name synthesis-cuda-fmnist
step $PY bench/bench_synthesis.py --device cuda --teacher resnet50 --weights none --precision fp32,bf16 --rounds 2 \
  --no-memory --name synthesis-cuda-resnet50
step $PY bench/profile_synthesis.py --device cuda --teacher resnet50 --weights none --method deepinversion --rows 30
cp bench/results/synthesis-cuda-*.md "$OUT_DIR"/ 2>/dev/null
exit $status
