# syntax=docker/dockerfile:1
# The worker image: models are fetched at run time (hub, or RunPod's cached models) into
# MODELS_DIR, which defaults to the network volume when one is mounted.
#
#   docker build -t sd-worker .
#
# No credential is passed at build time: HF_TOKEN and the rest are endpoint variables.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# torch.compile's Triton kernels (COMPILE, regional by default on CUDA) build a small C launcher
# when they first run: the one compiler the worker needs, which the slim image lacks.
# hadolint ignore=DL3008
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*

# On Linux, PyPI's torch wheel is the CUDA build, carrying its own CUDA runtime: the host
# needs only the NVIDIA driver, which RunPod provides.
COPY requirements.txt .
RUN pip install -r requirements.txt

COPY handler.py test_input.json ./
COPY schemas ./schemas
COPY worker ./worker
COPY builder ./builder

CMD ["python", "-u", "handler.py"]
