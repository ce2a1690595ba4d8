"""Z-Image (Tongyi-MAI's Z-Image and Z-Image-Turbo): a single-stream DiT over 2x2 patches of a
16-channel VAE's latents, prompts read by a Qwen3 language model through its chat template.

What Z-Image users know: classifier-free guidance runs whenever ``guidance_scale`` is above 0
(Turbo was distilled for 8-9 steps at guidance 0: send ``"num_inference_steps": 9,
"guidance_scale": 0``); a request that leaves them out gets diffusers' pipeline defaults (50
steps, guidance 5), as for every family. Sides are multiples of 16; the pipeline reads prompts
itself (up to 512 tokens), so weighted prompts are refused, and so are the parts made for a UNet
and CLIP.

Served here: txt2img, img2img and inpaint (diffusers' ZImage, ZImageImg2Img and ZImageInpaint
pipelines), and LoRAs (diffusers' Z-Image loader). Not yet: ControlNets, training (issue 17).
"""

from __future__ import annotations

from typing import Any

from .base import DIT_REFUSED, Family, pipeline_defaults

_PIPELINES = {"txt2img": "ZImagePipeline", "img2img": "ZImageImg2ImgPipeline", "inpaint": "ZImageInpaintPipeline"}


class ZImage(Family):
    name = "Z-Image"
    kind = "a Z-Image model"
    denoiser = "transformer"
    quantizable = True
    flow_matching = True
    refused = DIT_REFUSED | {"clip_skip": "its prompts are read by a Qwen3 language model, not CLIP",
                             "controlnets": "ControlNets for Z-Image are not served here yet"}
    prompt_weighting = False
    cuda_precision = "bf16"  # (as it ships)

    def recognises(self, components: dict[str, str | None]) -> bool:
        return (components.get("transformer") == "ZImageTransformer2DModel"
                and components.get("_class_name") == "ZImagePipeline")

    def multiple(self, pipe: Any) -> int:
        return pipe.vae_scale_factor * 2  # 2x2 patches of latents

    def default_size(self, pipe: Any) -> int:
        return 1024  # (its pipeline's, whatever the model)

    def pipeline_class(self, task: str, controlnets: bool = False) -> Any:
        import diffusers

        return getattr(diffusers, _PIPELINES[task])

    def defaults(self, pipe: Any, task: str, controlnets: bool = False) -> dict:
        """Those of its diffusers pipeline for ``task``."""
        return pipeline_defaults(self.pipeline_class(task))

    def img2img_size(self, width: int, height: int) -> dict:
        return {"width": width, "height": height}


Z_IMAGE = ZImage()
