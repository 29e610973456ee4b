#!/usr/bin/env bash
# Every GPU figure in docs/performance.md, in one run on one GPU (< 10 min): the bench/gpu_check.py
# cases, then the frozen UNet's forward/backward variants (bf16, channels-last, gradient
# checkpointing; torch.compile in a run of its own) at batch 8. Results land in ${OUT:-bench/results}.
#     bash bench/gpu_all.sh            # on a machine with one CUDA GPU and surpipe's packages
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-bench/results}"
mkdir -p "$out"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/nvidia_smi.txt"
timeout 300 python3 bench/gpu_check.py --device cuda --budget-s "${GPU_CHECK_BUDGET_S:-230}" \
    --out "$out/gpu_check.json" 2>&1 | tee "$out/gpu_check.log"
timeout 100 python3 bench/unet_step.py --device cuda --batch 8 --reps 5 --only-paper --bf16 --bf16-weights \
    --channels-last --checkpointing --out "$out/unet_step_gpu.json" 2>&1 | tee "$out/unet_step_gpu.log"
# compile apart: its first step can take minutes, and a timeout must not lose the figures above
timeout 150 python3 bench/unet_step.py --device cuda --batch 8 --reps 5 --only-paper --compile \
    --out "$out/unet_step_gpu_compile.json" 2>&1 | tee "$out/unet_step_gpu_compile.log"
