"""DreamBooth / LoRA training (task "train") on the tiny model at 64 px, published to moto's S3."""

from __future__ import annotations

import asyncio
import hashlib

import pytest
from safetensors import safe_open

from tests.helpers import BUCKET, assert_images_close, decode, png_b64, stream
from worker.jobs import JobRunner

SUBJECT = [png_b64((220, 40, 40)), png_b64((40, 40, 220), size=(96, 80))]


def train_input(model: dict | None = None, **train) -> dict:
    return {"task": "train", "stream": True, "model": model or {}, "train": {
        "instance_prompt": "a photo of sks toy", "instance_images": SUBJECT, "resolution": 64,
        "max_train_steps": 2, "learning_rate": 1e-2, "dest_url": f"s3://{BUCKET}/trained/", **train}}




def run_job(runner: JobRunner, job_input: dict, job_id: str = "job-1") -> list[dict]:
    return stream(runner, {"id": job_id, "input": job_input})


def generate(runner: JobRunner, **fields) -> dict:
    answer = run_job(runner, {"prompt": "a photo of sks toy", "num_inference_steps": 2, "seed": 5} | fields, "gen")[-1]
    assert answer.get("type") == "result", answer
    return answer


def test_lora_training_publishes_a_lora_that_requests_can_use(fresh_runner, s3):
    before = generate(fresh_runner)
    items = run_job(fresh_runner, train_input(method="lora", rank=4, train_text_encoder=True), "lora-job")
    result = items[-1]
    assert result.get("type") == "result", result
    out = result["train"]
    assert out["url"] == f"s3://{BUCKET}/trained/lora-job-lora.safetensors"
    assert out["method"] == "lora" and out["steps"] == 2 and out["instance_images"] == 2
    body = s3.get_object(Bucket=BUCKET, Key="trained/lora-job-lora.safetensors")["Body"].read()
    assert hashlib.sha256(body).hexdigest() == out["sha256"] and len(body) == out["size_bytes"]
    # Progress per step (at most ~10 a second: the first and the last always), with its loss.
    steps = [item for item in items if item.get("stage") == "train"]
    assert [item["step"] for item in steps] == [1, 2] and all(item["loss"] > 0 for item in steps)
    for stage in ("load", "train", "save"):
        assert stage in result["timings"]
    # The file holds UNet and text-encoder layers, in the requested precision.
    path = fresh_runner.settings.models_dir / "downloaded-lora.safetensors"
    path.write_bytes(body)
    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
        assert any(k.startswith("unet.") for k in keys) and any(k.startswith("text_encoder.") for k in keys)
        assert f.get_tensor(keys[0]).dtype.__repr__() == "torch.float16"
    # The warm model was not trained: the same request draws the same image.
    after = generate(fresh_runner)
    assert after["images"][0]["base64"] == before["images"][0]["base64"]
    # And the LoRA, used from where it was published, changes the image.
    styled = generate(fresh_runner, loras=[{"url": out["url"]}])
    with pytest.raises(AssertionError):
        assert_images_close(decode(before["images"][0]["base64"]), decode(styled["images"][0]["base64"]),
                            "trained-lora")


def test_dreambooth_publishes_a_model_that_loads_from_its_archive(fresh_runner, s3):
    before = generate(fresh_runner)
    result = run_job(fresh_runner, train_input(
        method="dreambooth", train_text_encoder=True, precision="fp32", class_prompt="a photo of a toy",
        num_class_images=2, class_inference_steps=2, dest_url=f"s3://{BUCKET}/trained/toy.tar.zst"), "db")[-1]
    assert result.get("type") == "result", result
    out = result["train"]
    assert out["url"] == f"s3://{BUCKET}/trained/toy.tar.zst" and out["class_images"] == 2
    assert "class_images" in result["timings"] and "pack" in result["timings"]
    sidecar = s3.get_object(Bucket=BUCKET, Key="trained/toy.tar.zst.sha256")["Body"].read().decode()
    assert sidecar.split()[0] == out["sha256"]
    tuned = generate(fresh_runner, model={"url": out["url"]})
    assert tuned["model"]["source"] == "url"
    with pytest.raises(AssertionError):
        assert_images_close(decode(before["images"][0]["base64"]), decode(tuned["images"][0]["base64"]), "dreambooth")


def test_docker_diffusers_api_dreambooth_payload_trains_and_answers_in_its_shape(fresh_runner, s3):
    payload = {"callInputs": {"train": "dreambooth", "dest_url": f"s3:///{BUCKET}/legacy/model.tar.zst"},
               "modelInputs": {"instance_prompt": "a photo of sks toy", "instance_images": SUBJECT,
                               "resolution": 64, "max_train_steps": 2, "mixed_precision": "fp16"}}
    answer = run_job(fresh_runner, payload, "legacy")[-1]
    assert answer.get("type") == "result", answer
    assert answer["train"]["method"] == "dreambooth" and answer["$timings"] == answer["timings"]
    assert s3.head_object(Bucket=BUCKET, Key="legacy/model.tar.zst")["ContentLength"] == answer["train"]["size_bytes"]


def test_training_is_reproducible_with_its_seed(fresh_runner, s3):
    images = SUBJECT * 3  # more than the VAE encodes at once
    first, second = (run_job(fresh_runner, train_input(instance_images=images, dest_url=f"s3://{BUCKET}/{n}.safetensors"),
                             n)[-1] for n in "ab")
    assert first["train"]["instance_images"] == 6
    assert first["train"]["sha256"] == second["train"]["sha256"] and first["train"]["loss"] == second["train"]["loss"]
    other_seed = run_job(fresh_runner, train_input(instance_images=images, seed=1, dest_url=f"s3://{BUCKET}/c.safetensors"))
    assert other_seed[-1]["train"]["sha256"] != first["train"]["sha256"]


@pytest.mark.parametrize("knob", [
    {"lr_scheduler": "cosine"},
    {"lr_scheduler": "constant_with_warmup", "lr_warmup_steps": 1},
    {"gradient_accumulation_steps": 2},
    # Adam ignores a loss scaled by one number: Min-SNR shows with samples of different timesteps.
    {"snr_gamma": 5.0, "train_batch_size": 2},
    {"snr_gamma": 5.0, "class_prompt": "a toy", "num_class_images": 1, "class_inference_steps": 2},
    {"instance_captions": ["a red sks toy", "a blue sks toy on a table"]},
    {"random_flip": True},
], ids=["cosine", "warmup", "accumulation", "min-snr", "min-snr-with-prior", "captions", "flip"])
def test_each_training_option_changes_what_is_learned(fresh_runner, s3, knob):
    def trained(name: str, **options) -> dict:
        answer = run_job(fresh_runner, train_input(max_train_steps=3, dest_url=f"s3://{BUCKET}/knobs/{name}.safetensors",
                                             **options))[-1]
        assert answer.get("type") == "result", answer
        return answer["train"]

    shared = ("class_prompt", "num_class_images", "class_inference_steps", "train_batch_size")
    plain_options = {k: v for k, v in knob.items() if k in shared}
    plain = trained("plain-" + "-".join(knob), **plain_options)
    tuned = trained("tuned-" + "-".join(knob), **knob)
    assert tuned["steps"] == 3 and tuned["sha256"] != plain["sha256"]


def test_each_image_trains_with_its_own_caption(fresh_runner, s3):
    """Captions go with their images: swapped, they teach something else."""
    def trained(name: str, captions: list[str]) -> str:
        answer = run_job(fresh_runner, train_input(max_train_steps=3, dest_url=f"s3://{BUCKET}/each/{name}.safetensors",
                                             instance_captions=captions))[-1]
        assert answer.get("type") == "result", answer
        return answer["train"]["sha256"]

    captions = ["a red sks toy", "a blue sks toy on a table"]
    assert trained("in-order", captions) != trained("swapped", captions[::-1])


def test_random_flip_trains_on_mirror_images_half_the_time(tiny_dir):
    import torch
    from PIL import ImageOps

    from tests.helpers import stripes
    from worker.families.sd import SD
    from worker.sources.loading import load_pipeline
    from worker.train.data import latent_stats, sample

    pipe = load_pipeline(tiny_dir, "fp32", None, "cpu")
    picture = stripes((64, 64))
    both = latent_stats(pipe, SD, [picture], 64, mirrored=True)
    alone = latent_stats(pipe, SD, [picture], 64)
    mirror = latent_stats(pipe, SD, [ImageOps.mirror(picture)], 64)
    # (encoded two at a time: batched arithmetic moves the last bits)
    assert torch.allclose(both[0][0], alone[0][0], atol=1e-5) and torch.allclose(both[0][1], mirror[0][0], atol=1e-5)
    assert not torch.allclose(alone[0][0], mirror[0][0], atol=1e-2)  # the picture is not symmetric
    generator = torch.Generator().manual_seed(0)
    without_noise = (both[0], torch.zeros_like(both[1]))
    drawn = [sample(without_noise, 1, generator, pipe, SD, mirrored=True) for _ in range(40)]
    as_is = both[0][0] * pipe.vae.config.scaling_factor
    originals = sum(torch.allclose(latents[0], as_is) for latents, _ in drawn)
    assert 10 < originals < 30 and all(chosen == [0] for _, chosen in drawn)  # image 0, mirrored or not


@pytest.mark.parametrize("change, expected", [
    ({"instance_images": []}, "train.instance_images: list should have at least 1 item"),
    ({"num_class_images": 3}, "train.class_prompt: required with num_class_images 3"),
    ({"dest_url": "https://example.com/x"}, "train.dest_url: must be an s3:// URL"),
    ({"max_train_steps": 10**5}, "train.max_train_steps: at most 2000 on this endpoint"),
    ({"resolution": 100}, "train.resolution: must be a multiple of 8, got 100"),
    ({"lr_scheduler": "exponential"}, "train.lr_scheduler: input should be 'constant'"),
    ({"instance_images": ["bm90IGFuIGltYWdl"]}, "train.instance_images[0]: is not a readable image"),
    ({"instance_images": ["not an image!"]}, "train.instance_images[0]: must be base64, a data: URI or an http"),
    ({"dest_url": "s3://no-such-bucket/x.safetensors"}, "train.dest_url: s3://no-such-bucket/x.safetensors is not "
                                                        "where this endpoint lets requests write"),
    ({"instance_prompt": "sks toy " * 13}, "train.instance_prompt: is 78 tokens; training reads at most 75"),
    ({"instance_captions": ["a red sks toy"]}, "train.instance_captions: 1 captions for 2 instance_images"),
    ({"instance_captions": ["a red sks toy", ""]}, "train.instance_captions[1]: string should have at least 1"),
    ({"instance_captions": ["a", "sks toy " * 13]}, "train.instance_captions[1]: is 78 tokens; training reads"),
])
def test_bad_training_requests_name_the_field(fresh_runner, change, expected):
    items = run_job(fresh_runner, train_input(**change))
    assert items[-1].get("error", "").startswith(expected), items[-1]
    assert not [item for item in items if item.get("stage") == "train"]  # refused before training


def test_a_cancelled_training_stops_at_the_next_step(fresh_runner):
    async def go():
        seen = asyncio.Event()

        async def consume():
            async for item in fresh_runner.stream({"id": "long", "input": train_input(max_train_steps=2000)}):
                if item.get("stage") == "train":
                    seen.set()
            raise AssertionError(f"training ended before it was cancelled: {item}")

        task = asyncio.create_task(consume())
        await asyncio.wait_for(seen.wait(), 120)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        job = {"id": "next", "input": {"prompt": "p", "num_inference_steps": 2}}
        return [item async for item in fresh_runner.stream(job)]

    assert asyncio.run(go())[-1]["type"] == "result"


@pytest.mark.gpu
@pytest.mark.parametrize("autocast", ["bf16", "fp16"])
@pytest.mark.parametrize("architecture", ["sd", "sdxl", "sd3"])
def test_mixed_precision_training_keeps_fp32_master_weights(fresh_runner, s3, monkeypatch, autocast, architecture,
                                                             request):
    """The GPU recipe, run by the CPU's autocast: frozen weights cast to half, trainable ones
    in fp32, fp16 with a gradient scaler (what failed in docker-diffusers-api with fp16
    weights). On a GPU the same test runs on CUDA (an H100 would pick bf16 by itself)."""
    import torch

    import worker.train.loop

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[autocast]
    monkeypatch.setattr(worker.train.loop, "autocast_dtype", lambda device: dtype)
    seen = {}
    prepare = worker.train.loop.prepare

    def spy(pipe, family, spec, autocast_dtype):
        params = prepare(pipe, family, spec, autocast_dtype)
        seen[spec.method] = ({p.dtype for p in params}, pipe.vae.dtype)
        return params

    monkeypatch.setattr(worker.train.loop, "prepare", spy)
    model = {"id": str(request.getfixturevalue(f"{architecture}_dir"))} if architecture != "sd" else {}
    text = architecture != "sd3"  # SD3 trains its transformer only
    generate(fresh_runner, model=model)  # a warm model, which training must set aside and leave untouched
    name = f"mixed-{architecture}-{autocast}"
    lora = run_job(fresh_runner, train_input(method="lora", train_text_encoder=text, model=model,
                                       dest_url=f"s3://{BUCKET}/{name}.safetensors"))[-1]
    assert lora.get("type") == "result", lora
    full = run_job(fresh_runner, train_input(method="dreambooth", train_text_encoder=text, num_class_images=1,
                                       class_prompt="a toy", class_inference_steps=2, model=model,
                                       dest_url=f"s3://{BUCKET}/{name}.tar.zst"))[-1]
    assert full.get("type") == "result", full
    assert seen == {"lora": ({torch.float32}, dtype), "dreambooth": ({torch.float32}, dtype)}
    styled = generate(fresh_runner, model=model, loras=[{"url": lora["train"]["url"]}])
    assert styled["model"]["source"] == "memory"  # on CUDA: parked in CPU RAM while training ran
    if torch.cuda.is_available():
        assert styled["model"]["precision"] == "fp16"
    tuned = generate(fresh_runner, model={"url": full["train"]["url"]})
    assert styled["type"] == tuned["type"] == "result" and tuned["model"]["source"] == "url"
