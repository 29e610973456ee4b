#!/usr/bin/env bash
# The GPU image's Python on this CPU machine, before a device call spends GPU minutes on an import
# error: Python 3.12, the image's versions of what it holds (the device tool's KINDS.md: torch 2.11.0,
# accelerate, safetensors, tokenizers, typer with click, no pydantic), then the wheels of
# bench/gpu_wheels.sh installed as bench/gpu_issue26.sh installs them (pip --target, PYTHONPATH).
# Runs the files the device call runs, plus the compiled and fp8 training tests, on the CPU.
#     bash bench/gpu_wheels.sh && bash bench/gpu_image_check.sh      # about 10 minutes, 5 GB in /tmp
# Found: typer < 0.26 has no typer._click (every surpipe command failed; stages/cli.py).
set -euo pipefail
cd "$(dirname "$0")/.."
py="${PY312:-python3.12}"
venv="${IMAGE_VENV:-/tmp/surpipe-gpu-image}"
[ -d .whl ] || { echo "no .whl/: run bash bench/gpu_wheels.sh first" >&2; exit 1; }
if [ ! -x "$venv/bin/python" ]; then
  "$py" -m venv "$venv"
  "$venv/bin/pip" install -q torch==2.11.0 torchvision==0.26.0 accelerate==1.15.0 safetensors==0.8.0 \
    tokenizers==0.23.2 huggingface_hub==1.33.0 sentencepiece==0.2.2 numpy==2.5.2 pytest pillow tqdm \
    protobuf regex requests pyyaml 2> >(grep -v "^WARNING: Location" >&2)
  "$venv/bin/pip" install -q --no-deps typer==0.24.1 click==8.5.1 rich shellingham annotated-doc \
    2> >(grep -v "^WARNING: Location" >&2)
fi
site="$venv-site"
rm -rf "$site"
"$venv/bin/python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl
export PYTHONPATH="$PWD:$site" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
"$venv/bin/python" -c "import importlib.util as u, sys, torch, typer; sys.exit('pydantic is installed: not the image' \
if u.find_spec('pydantic') else 0); print('torch', torch.__version__, 'typer', typer.__version__)"
"$venv/bin/python" -m pytest -q -m "slow or not slow" tests/test_gpu.py tests/bench/test_gpu_train.py \
  tests/train/test_train_compile.py tests/train/test_train_fp8.py -rs
