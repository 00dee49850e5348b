#!/usr/bin/env bash
# The whole GPU part of the overhead benchmark, as one prepared command for a machine with a CUDA device.
# Writes gpu.json and gpu.txt to ${OUT:-.}. Needs torch with CUDA and torchvision; relumon is used from this checkout.
#   bash benchmarks/gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-.}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)" | tee -a "$out/gpu.txt"
python3 benchmarks/overhead.py --workloads gpu-resnet50,gpu-mlp --variants none,none-aa,relumon,relumon-exact,relumon-opt,floor,floor-2step,naive-item \
    --rounds 15 --steps 8 --warmup 5 --json "$out/gpu.json" 2>&1 | tee -a "$out/gpu.txt"
