"""The engine that runs one job, and the wings it calls (docs/development.md has the map)."""

import logging

# torchao (QUANTIZE) is imported by transformers and diffusers whenever it is installed, and warns
# of each kernel library its build lacks for this machine, of an enum torch now knows, and of
# layouts older than it: noise at every start, not the operator's business.
for _name in ("torchao", "torch.utils._pytree", "diffusers.quantizers.torchao.torchao_quantizer"):
    logging.getLogger(_name).setLevel(logging.ERROR)
