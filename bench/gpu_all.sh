#!/usr/bin/env bash
# Every GPU figure in docs/performance.md, in one run on one GPU (< 10 min): the bench/gpu_check.py
# cases, the real `surpipe train` loop at SD 1.5 batch 32 from the store and online (bench/gpu_train.py;
# its whole matrix, compile and SDXL included, is a run of its own), then the frozen UNet's
# forward/backward variants (bf16, channels-last, gradient checkpointing; torch.compile in a run of its
# own) at batch 8. The timeouts add up to 595 s. Results land in ${OUT:-bench/results}.
#     bash bench/gpu_all.sh            # on a machine with one CUDA GPU and surpipe's packages
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-bench/results}"
mkdir -p "$out"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/nvidia_smi.txt"
# gpu_check took 151 s in all on an H200 (bench/results/gpu_check_h200.json): its budget stops it sooner
timeout 200 python3 bench/gpu_check.py --device cuda --budget-s "${GPU_CHECK_BUDGET_S:-165}" \
    --out "$out/gpu_check.json" 2>&1 | tee "$out/gpu_check.log"
# the store case first, then its online twin: a timeout loses the least
timeout 145 python3 bench/gpu_train.py --cases sd15/eager/batch32 --budget-s "${GPU_TRAIN_BUDGET_S:-135}" \
    --out "$out/gpu_train.json" 2>&1 | tee "$out/gpu_train.log"
timeout 100 python3 bench/unet_step.py --device cuda --batch 8 --reps 5 --only-paper --bf16 --bf16-weights \
    --channels-last --checkpointing --out "$out/unet_step_gpu.json" 2>&1 | tee "$out/unet_step_gpu.log"
# compile apart: its first step can take minutes, and a timeout must not lose the figures above
timeout 150 python3 bench/unet_step.py --device cuda --batch 8 --reps 5 --only-paper --compile \
    --out "$out/unet_step_gpu_compile.json" 2>&1 | tee "$out/unet_step_gpu_compile.log"
