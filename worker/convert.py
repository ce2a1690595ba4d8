"""Convert a model to a safetensors archive on S3, from a shell: what ``task: "convert"`` does.

For operators preparing archives before they deploy:

    python -m worker.convert stable-diffusion-v1-5/stable-diffusion-v1-5 s3:// --precision fp16
    python -m worker.convert /models/my-sd15 s3://my-bucket/models/my-sd15.tar.zst
    python -m worker.convert https://example.com/finetune.safetensors s3:///my-bucket/ \\
        --config stable-diffusion-v1-5/stable-diffusion-v1-5

SOURCE is a hub id, a local diffusers directory, an archive URL, or a single-file checkpoint URL
(--config names the model whose configs describe it; without it, its layout picks them). DEST
takes the forms of ``convert.dest_url``. Storage and hub settings come from the same environment
variables as the worker (AWS_*, AWS_S3_ENDPOINT_URL, AWS_S3_DEFAULT_BUCKET, HF_TOKEN, MODELS_DIR ...).
Prints the published URL, sha256 and size; exits 1 with the reason on failure.
"""

from __future__ import annotations

import argparse
import sys

_CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker.convert", description=__doc__.splitlines()[0])
    parser.add_argument("source", help="hub id, local directory, archive URL, or checkpoint URL")
    parser.add_argument("dest", help="s3://bucket/key, s3:///bucket/key, s3:// or s3:///bucket/")
    parser.add_argument("--precision", choices=("fp16", "bf16", "fp32"), default="fp16")
    parser.add_argument("--compression", choices=("zstd", "none"), default="zstd")
    parser.add_argument("--config", help="for a checkpoint: the diffusers model whose configs describe it "
                        "(default: told from its layout)")
    parser.add_argument("--revision", help="hub revision of the source (or of --config)")
    args = parser.parse_args(argv)

    from tqdm import tqdm

    from schemas import ConvertRequest
    from worker.errors import WorkerError, answer_for
    from worker.settings import Settings

    source = args.source
    if source.startswith(("http://", "https://", "s3://")):
        is_checkpoint = source.split("#")[0].split("?")[0].endswith(_CHECKPOINT_SUFFIXES)
        model = {"checkpoint_url" if is_checkpoint else "url": source}
        if args.config:
            model["id"] = args.config
    else:
        model = {"id": source}
    if args.revision:
        model["revision"] = args.revision
    settings = Settings()
    request = {"task": "convert", "model": model,
               "convert": {"dest_url": args.dest, "precision": args.precision, "compression": args.compression}}

    bars: dict[str, tqdm] = {}

    def show(event) -> None:
        bar = bars.get(event.stage)
        if bar is None:
            byte_stage = event.stage in ("download", "upload")
            bar = bars[event.stage] = tqdm(desc=event.stage, total=event.total or None, unit="B" if byte_stage else "",
                                           unit_scale=byte_stage, leave=True)
        bar.update(event.step - bar.n)

    try:
        parsed = ConvertRequest.model_validate(request)  # (a mistake said before torch imports)
        from worker.engine import Engine

        # The operator's own conversion: anywhere the credentials reach (but never over an object).
        result = Engine(settings.model_copy(update={"device": "cpu"})).convert(parsed, show, lambda: False,
                                                                               trusted=True)
    except Exception as exc:  # every failure, said once, without a traceback
        message, _ = answer_for(exc, settings.secrets())
        for bar in bars.values():
            bar.close()
        print(f"error: {message}", file=sys.stderr)
        return 1 if isinstance(exc, (WorkerError, ValueError)) else 2
    for bar in bars.values():
        bar.close()
    out = result.convert
    print(f"published {out.url}\nsha256 {out.sha256}\nsize {out.size_bytes} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
