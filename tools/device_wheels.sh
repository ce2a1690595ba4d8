#!/usr/bin/env bash
# Wheels for running `pytest -m gpu` on a GPU machine that has torch but not this project's
# other packages (Python 3.12, x86-64, no internet: the device tool's machines). Versions are
# this checkout's virtualenv's, so the GPU run tests what CI tests. The packages such a machine
# already has in a compatible version (numpy, pillow, requests, safetensors, accelerate,
# tokenizers, werkzeug, jinja2, pyyaml, ...) are left out: the whole set stays under the
# tool's 64 MiB.
#
#   tools/device_wheels.sh            # writes .whl/ (git ignores it; name it in the call's carry)
#
# Then, on the device, in one call carrying .whl:
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
#     && PYTHONPATH=/tmp/site:. python3 -m pytest -m gpu -p no:cacheprovider
set -euo pipefail
cd "$(dirname "$0")/.."
names='diffusers|transformers|huggingface.hub|httpx2|peft|pydantic|pydantic.core|pydantic.settings|annotated.types'
names+='|typing.inspection|python.dotenv|zstandard|boto3|botocore|s3transfer|jmespath|moto|flask|flask.cors|blinker'
names+='|itsdangerous|xmltodict|responses|cryptography|cffi|pycparser|importlib.metadata|regex|werkzeug'
names+='|httpcore2|truststore|h11|torchao'
pins=$(.venv/bin/python -m pip freeze | grep -i -E "^($names)==")
platforms=()
for tag in manylinux_2_17 manylinux2014 manylinux_2_24 manylinux_2_27 manylinux_2_28 manylinux_2_34 manylinux_2_35 manylinux1; do
  platforms+=(--platform "${tag}_x86_64")
done
rm -rf .whl && mkdir .whl
# shellcheck disable=SC2086
.venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --abi cp312 --abi abi3 --abi none "${platforms[@]}" --platform any -d .whl $pins
du -sh .whl
