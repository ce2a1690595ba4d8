#!/usr/bin/env bash
# The GPU checks, as one command for an offline GPU machine that has torch (Python 3.12):
# install the wheels tools/device_wheels.sh gathered in .whl/, then run the tests marked gpu
# (CUDA parking of models in CPU RAM, fp16 by default, ControlNets / IP-Adapters / VAEs /
# depth and pose preprocessors / prompt windows / hires in fp16, SD3 in fp16 and bf16, mixed-precision training of
# SD, SDXL and SD3; COMPILE, QUANTIZE=fp8 and a step cache on CUDA). With the device tool: carry [".whl"], command
# "bash tools/gpu_check.sh".
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
log=${OUT:-/tmp}/gpu-tests.log
python3 -m pytest -m gpu -p no:cacheprovider -q -rs 2>&1 | tee "$log"
