#!/usr/bin/env bash
# The Python packages surpipe needs that the lent GPU machines' image lacks (or holds at another
# version), as CPython 3.12 wheels in .whl/ (git-ignored), for the device tool's `carry` (64 MiB a
# call). The image has torch, accelerate, safetensors, tokenizers, typer, pytest (docs: the device
# tool's KINDS.md). bitsandbytes (43 MB) does not fit beside the rest: `--bnb` fetches it alone, for
# a call of its own (stage one's 4-bit/8-bit GPU test).
#     bash bench/gpu_wheels.sh          # then: bench/gpu_issue26.sh on the device, carry [".whl"]
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl && mkdir -p .whl
if [ "${1:-}" = "--bnb" ]; then
  pkgs=(bitsandbytes==0.50.2)
else
  # versions of requirements-cpu.txt and .ci/run, which the CPU suite tests (open_clip and mistral-common:
  # the tiny models' tokenizer files); then their needs the image lacks
  pkgs=(diffusers==0.42.1 transformers==5.23.0 zarr==3.1.6 numcodecs==0.16.6 webdataset==1.0.2 torchao==0.18.0
        open_clip_torch==3.3.0 mistral-common==1.13.1 donfig braceexpand google-crc32c importlib_metadata)
fi
plat=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux1_x86_64 any; do plat+=(--platform "$p"); done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${plat[@]}" \
    -d .whl "${pkgs[@]}" 2> >(grep -v "^WARNING: Location" >&2)
du -sh .whl && ls .whl
