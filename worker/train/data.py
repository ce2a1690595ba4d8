"""What training reads: the instance images as VAE latent distributions (encoded once), the
class images for prior preservation, the prompts' token budget, and batches drawn from them."""

from __future__ import annotations

from typing import Callable

import torch

from schemas import Progress, TrainSpec

from ..errors import JobCancelled, UserInputError
from ..pipelines import share

_VAE_BATCH = 4


def check_prompt_lengths(pipe, spec: TrainSpec) -> None:
    """Training conditions on one text-encoder pass: a longer prompt would be cut, silently."""
    tokenizer = pipe.tokenizer
    room = tokenizer.model_max_length - 2
    texts = [("instance_prompt", spec.instance_prompt), ("class_prompt", spec.class_prompt)]
    texts += [(f"instance_captions[{i}]", caption) for i, caption in enumerate(spec.instance_captions or [])]
    for name, text in texts:
        count = len(tokenizer(text, add_special_tokens=False).input_ids) if text else 0
        if count > room:
            raise UserInputError(f"train.{name}", f"is {count} tokens; training reads at most {room} (one pass "
                                 "of the text encoder), so shorten it")


def text_encoders(pipe) -> list:
    names = ("text_encoder", "text_encoder_2", "text_encoder_3")
    return [m for m in (getattr(pipe, name, None) for name in names) if m is not None]


def latent_stats(pipe, family, images, resolution: int, mirrored: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE's latent mean and std of each image, resized and center-cropped to ``resolution``;
    ``mirrored``: then those of each image mirrored left to right, in the same order."""
    import numpy as np
    from PIL import ImageOps

    def tensor(image) -> torch.Tensor:
        return torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)

    pixels, flipped = [], []
    for image in images:
        image = ImageOps.fit(image.convert("RGB"), (resolution, resolution))
        pixels.append(tensor(image))
        if mirrored:
            flipped.append(tensor(ImageOps.mirror(image)))
    pixels += flipped
    means, stds = [], []
    for start in range(0, len(pixels), _VAE_BATCH):  # a few at a time: the encoder's activations are large
        batch = torch.stack(pixels[start:start + _VAE_BATCH]).to(pipe.vae.device, dtype=pipe.vae.dtype)
        with torch.no_grad():  # (a video VAE, Qwen-Image's, encodes each image as one frame)
            dist = pipe.vae.encode(batch.unsqueeze(2) if family.video_vae else batch).latent_dist
        mean, std = (dist.mean[:, :, 0], dist.std[:, :, 0]) if family.video_vae else (dist.mean, dist.std)
        means.append(mean.float())
        stds.append(std.float())
    return torch.cat(means), torch.cat(stds)


def sample(stats: tuple[torch.Tensor, torch.Tensor], batch: int, generator: torch.Generator, pipe, family,
           mirrored: bool = False) -> tuple[torch.Tensor, list[int]]:
    """A batch of latents drawn from the images' distributions, and which image each is;
    ``mirrored`` (stats of the images, then of their mirror images): each mirrored half the time."""
    mean, std = stats
    count = mean.shape[0] // 2 if mirrored else mean.shape[0]
    index = torch.randint(0, count, (batch,), generator=generator)
    drawn = index + count * torch.randint(0, 2, (batch,), generator=generator) if mirrored else index
    noise = torch.randn(mean[drawn].shape, generator=generator).to(mean.device)
    shift, scale = family.latent_normalisation(pipe)
    return (mean[drawn] + std[drawn] * noise - shift) * scale, index.tolist()


def class_images(pipe, family, spec: TrainSpec, device: str, autocast_dtype, emit: Callable[[Progress], None],
                 cancelled: Callable[[], bool]) -> list:
    # Without the safety checker: a blacked-out image would teach the model black squares.
    no_checker = {"safety_checker": None, "requires_safety_checker": False} if hasattr(pipe, "safety_checker") else {}
    drawer = share(type(pipe), pipe, **no_checker)
    drawer.set_progress_bar_config(disable=True)
    images = []
    for i in range(spec.num_class_images):
        if cancelled():
            raise JobCancelled(f"at class image {i} of {spec.num_class_images}")
        emit(Progress(stage="class_images", step=i, total=spec.num_class_images))
        with torch.no_grad():
            with torch.autocast(device_type=device, dtype=autocast_dtype or torch.float32,
                                enabled=autocast_dtype is not None):
                latents = drawer(
                    spec.class_prompt, num_inference_steps=spec.class_inference_steps, width=spec.resolution,
                    height=spec.resolution, generator=torch.Generator("cpu").manual_seed(spec.seed + i),
                    output_type="latent",
                ).images
            # Decoded in fp32, outside autocast: SDXL's VAE overflows in fp16.
            shift, scale = family.latent_normalisation(pipe)
            latents = family.unpacked(pipe, latents, spec.resolution).to(pipe.vae.dtype) / scale + shift
            if family.video_vae:
                decoded = pipe.vae.decode(latents.unsqueeze(2)).sample[:, :, 0]
            else:
                decoded = pipe.vae.decode(latents).sample
        images += drawer.image_processor.postprocess(decoded.float(), output_type="pil")
    emit(Progress(stage="class_images", step=spec.num_class_images, total=spec.num_class_images))
    return images
