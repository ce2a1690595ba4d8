#!/usr/bin/env bash
# The GPU figures, after tools/gpu_check.sh has installed the wheels in /tmp/site (same call):
# the handler's overhead on an SD 1.5-sized UNet in fp16 at 512 px, and the cold start from an
# archive with the load onto CUDA, at the default 8 connections on an 800 MB/s link and at 16
# on a 1600 MB/s one; a FLUX.1-dev-shaped pipeline per OFFLOAD mode; inference speed (bench/speed.py).
# Logs land in $OUT. With the device tool:
#   carry [".whl"], command "bash tools/gpu_check.sh; bash tools/gpu_bench.sh"
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1
out=${OUT:-/tmp}
work=/tmp/bench-coldstart
nproc; free -g | head -2
timeout 150 python3 -m bench.overhead --device cuda --model sd15 --steps 20 --runs 10 --size 512 --work $work \
  2>&1 | grep -v -i -E "warn|torchvision" | tee "$out/overhead.log"
timeout 200 python3 -m bench.coldstart --rounds 3 --link-mbps 1600 --concurrency 16 --device cuda --work $work \
  2>&1 | tee "$out/coldstart-1600.log"
timeout 200 python3 -m bench.coldstart --rounds 3 --link-mbps 800 --device cuda --work $work \
  2>&1 | tee "$out/coldstart-800.log"
# Whole process, python handler.py to the first image, against download-then-load (issue 15).
timeout 300 python3 -m bench.coldstart --whole-process --rounds 3 --conn-mbps 90 --link-mbps 1600 --device cuda \
  --work $work 2>&1 | tee "$out/coldstart-process.log"
# FLUX.1-dev-shaped (random weights, bf16) at 1024 px: load, peak memory and s/step per OFFLOAD mode.
timeout 420 python3 -m bench.flux_memory --device cuda --size 1024 --steps 4 \
  2>&1 | grep -v -i -E "warn|torchvision" | tee "$out/flux-memory.log"
# Inference speed (issue 16): eager vs COMPILE vs step caches vs QUANTIZE, PSNR/SSIM against eager,
# compile time cold vs from a fresh process's artefacts. SD 1.5 at 512 px (target: 70 it/s
# compiled), then a FLUX.1-dev-shaped transformer at 1024 px (target: 2x eager bf16 with
# compile + fp8 + a cache at 30 dB or more).
timeout 420 python3 -m bench.speed --device cuda --model sd15 --size 512 --steps 30 --precision fp16 \
  --quantize none --no-full --work $work 2>&1 | grep -v -i -E "warn|torchvision" | tee "$out/speed-sd15.log"
timeout 600 python3 -m bench.speed --device cuda --model flux-dev --size 1024 --steps 28 --quantize fp8 --no-full \
  --caches first_block magcache --runs 2 --no-probe 2>&1 | grep -v -i -E "warn|torchvision" | tee "$out/speed-flux.log"
