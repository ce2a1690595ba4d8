"""FLUX.1 ([dev], [schnell], Fill and Kontext): a rectified-flow transformer over packed latents,
CLIP and T5-XXL text encoders, a 16-channel VAE.

What FLUX users know: ``guidance_scale`` is [dev]'s embedded, distilled guidance (diffusers'
default 3.5; [schnell] has no guidance embedding and ignores it), and ``true_cfg_scale`` with a
``negative_prompt`` is real classifier-free guidance. What a request leaves out takes diffusers'
defaults for the model: 28 steps for [dev], 4 for [schnell] (which was distilled for them), and
T5 reading 512 tokens for [dev], 256 for [schnell]. Which one a model is, its transformer's
config says (the guidance embedding). Its pipelines encode prompts themselves, so weighted
prompts are refused; the parts made for a UNet and CLIP are refused by field.

Served here: txt2img, img2img and inpaint (diffusers' Flux, FluxImg2Img and FluxInpaint
pipelines), Kontext's txt2img and ``edit`` (FluxKontextPipeline, at the size asked), Fill's
inpaint and outpaint (FluxFillPipeline), transformer files (Black Forest Labs' and Civitai's
layout, or diffusers') with the text encoders and VAE of their reference model, ControlNets on
[dev] / [schnell] (diffusers' FluxControlNet pipelines, Union ControlNets with a mode), LoRAs,
and LoRA training.
"""

from __future__ import annotations

from typing import Any

from ..errors import UserInputError
from .base import DIT_REFUSED, UNET_PARTS, ControlNetKind, Family, pipeline_defaults
from .flow import check_flow_training, flow_point

# A transformer file's keys: Black Forest Labs' layout (Civitai's too, with ComfyUI's prefix), or diffusers'.
_PREFIX = "model.diffusion_model."
_BFL, _DIFFUSERS = "double_blocks.0.img_attn.qkv.weight", "single_transformer_blocks.0.proj_out.weight"
_FLUX2 = "single_stream_modulation.lin.weight"  # (FLUX.2's blocks share their modulation; its files are FLUX.2's)
_GUIDANCE = ("guidance_in.in_layer.weight", "time_text_embed.guidance_embedder.linear_1.weight")
# Its diffusers pipelines, by task, without and with ControlNets.
_PIPELINES = {"txt2img": ("FluxPipeline", "FluxControlNetPipeline"),
              "img2img": ("FluxImg2ImgPipeline", "FluxControlNetImg2ImgPipeline"),
              "inpaint": ("FluxInpaintPipeline", "FluxControlNetInpaintPipeline")}


class Flux(Family):
    name = "FLUX.1"
    kind = "a FLUX.1 model"
    denoiser = "transformer"
    quantizable = True
    flow_matching = True
    refused = DIT_REFUSED | {"clip_skip": f"its prompts are read by T5 as well as CLIP; clip_skip is {UNET_PARTS}"}
    prompt_weighting = False
    true_cfg = True
    distilled_guidance = True
    # InstantX's, Shakker-Labs' Union (control_mode), XLabs' ... as diffusers loads them.
    controlnet = ControlNetKind(
        "FluxControlNetModel", ("in_channels", "attention_head_dim", "num_attention_heads", "joint_attention_dim",
                                "pooled_projection_dim"),
        "FLUX.1", "FluxMultiControlNetModel")
    training_pipeline = "FluxPipeline"
    # As diffusers' train_dreambooth_lora_flux.py: both streams' attention and feed-forwards.
    lora_targets = ("attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_q_proj",
                    "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                    "ff_context.net.2")
    lora_layers = "transformer_lora_layers"
    file_lacks = ("text_encoder", "text_encoder_2", "vae")  # (transformer files: CLIP, T5, the VAE)
    checkpoint_lora_training = True
    cuda_precision = "bf16"  # (its activations overflow fp16)

    pipeline = "FluxPipeline"  # the model's own class, as its model_index.json names it

    def recognises(self, components: dict[str, str | None]) -> bool:
        return (components.get("transformer") == "FluxTransformer2DModel"
                and components.get("_class_name") == self.pipeline)

    def checkpoint_reference(self, keys: set[str], inpaint: bool) -> str | None:
        """A FLUX.1 transformer file: [dev]'s configs if it has a guidance embedding, else
        [schnell]'s (a Fill or Kontext file needs its model.id)."""
        keys = {k.removeprefix(_PREFIX) for k in keys}
        if _BFL not in keys and _DIFFUSERS not in keys or _FLUX2 in keys:
            return None
        return "flux-dev" if any(k in keys for k in _GUIDANCE) else "flux-schnell"

    def mag_ratios(self) -> Any:
        from diffusers.hooks.mag_cache import FLUX_MAG_RATIOS

        return FLUX_MAG_RATIOS

    def multiple(self, pipe: Any) -> int:
        return pipe.vae_scale_factor * 2  # latents are packed in 2x2 patches

    def default_size(self, pipe: Any) -> int:
        return pipe.default_sample_size * pipe.vae_scale_factor  # 1024

    @staticmethod
    def schnell(pipe: Any) -> bool:
        """[schnell] (and other guidance-distilled-away models): no guidance embedding."""
        return not pipe.transformer.config.guidance_embeds

    def pipeline_class(self, task: str, controlnets: bool = False) -> Any:
        import diffusers

        return getattr(diffusers, _PIPELINES[task][controlnets])

    def defaults(self, pipe: Any, task: str, controlnets: bool = False) -> dict:
        """Those of its diffusers pipeline for ``task``; [schnell]'s 4 steps."""
        defaults = pipeline_defaults(self.pipeline_class(task, controlnets))
        return defaults | ({"num_inference_steps": 4} if self.schnell(pipe) else {})

    def call_options(self, request: Any, pipe: Any) -> dict:
        options = {"max_sequence_length": 256 if self.schnell(pipe) else 512}
        if request.true_cfg_scale is not None:
            options["true_cfg_scale"] = request.true_cfg_scale
        return options

    def img2img_size(self, width: int, height: int) -> dict:
        return {"width": width, "height": height}

    # --- Training (diffusers' train_dreambooth_lora_flux.py) ---

    def check_train(self, spec: Any) -> None:
        if spec.method != "lora":
            raise UserInputError("train.method", "FLUX.1 models train LoRAs here (a full fine-tune of its 12B "
                                                 "transformer needs several GPUs' memory)")
        check_flow_training(spec, self.name, "uniformly")

    def train_text(self, pipe: Any, prompts: list[str]) -> tuple[Any, Any]:
        """Its pipeline's own encoding (T5's states, CLIP's pooled text), T5 reading as many
        tokens as in inference."""
        states, pooled, _ = pipe.encode_prompt(prompts, prompts, device=pipe.text_encoder.device,
                                               max_sequence_length=256 if self.schnell(pipe) else 512)
        return states, pooled

    def training_prediction(self, pipe: Any, scheduler: Any, latents: Any, text: tuple, resolution: int,
                            generator: Any) -> tuple[Any, Any, Any]:
        """The flow-matching objective on packed latents, timesteps drawn uniformly: the
        transformer sees 2x2 patches with their positions, [dev] also its guidance embedding
        (at 3.5, as diffusers' recipe trains it); its velocity, unpacked, against noise - latents."""
        import torch
        from diffusers import FluxPipeline

        states, pooled = text
        noisy, noise, steps = flow_point(scheduler, latents, generator, "none")
        count, channels, height, width = noisy.shape
        packed = FluxPipeline._pack_latents(noisy, count, channels, height, width)
        positions = FluxPipeline._prepare_latent_image_ids(count, height // 2, width // 2, latents.device,
                                                           latents.dtype)
        text_ids = torch.zeros(states.shape[1], 3, device=latents.device, dtype=latents.dtype)
        guidance = None if self.schnell(pipe) else torch.full((count,), 3.5, device=latents.device)
        prediction = pipe.transformer(hidden_states=packed, timestep=steps / 1000, guidance=guidance,
                                      pooled_projections=pooled, encoder_hidden_states=states, txt_ids=text_ids,
                                      img_ids=positions, return_dict=False)[0]
        factor = pipe.vae_scale_factor
        prediction = FluxPipeline._unpack_latents(prediction, height * factor, width * factor, factor)
        return prediction, noise - latents, steps

    def unpacked(self, pipe: Any, latents: Any, resolution: int) -> Any:
        return pipe._unpack_latents(latents, resolution, resolution, pipe.vae_scale_factor)

    def lora_state(self, state: dict) -> dict:
        return state  # its loader reads peft's own layout


class FluxFill(Flux):
    """FLUX.1 Fill: a [dev] made for inpainting and outpainting (its transformer reads the masked
    image and the mask beside the latents), through FluxFillPipeline, at its defaults (50 steps,
    guidance 30, strength 1). No txt2img or img2img, no negative prompt, no true CFG: its
    pipeline has none."""

    name = "FLUX.1 Fill"
    kind = "a FLUX.1 Fill model"
    pipeline = "FluxFillPipeline"
    tasks = ("inpaint",)
    training_pipeline = None  # (FLUX.1 [dev] and [schnell] train here)
    refused = Flux.refused | {
        "controlnets": "diffusers has no FLUX.1 Fill ControlNet pipeline",
        "negative_prompt": "FluxFillPipeline takes no negative prompt",
        "true_cfg_scale": "FluxFillPipeline has no true classifier-free guidance",
    }
    true_cfg = False

    def pipeline_class(self, task: str, controlnets: bool = False) -> Any:
        import diffusers

        return diffusers.FluxFillPipeline


class FluxKontext(Flux):
    """FLUX.1 Kontext: instruction editing (``task: "edit"``, the prompt says what to change in
    ``image``), and txt2img. The answer has the requested size, or the input's rounded down to
    16: never Kontext's own resize to about a megapixel."""

    name = "FLUX.1 Kontext"
    kind = "a FLUX.1 Kontext model"
    pipeline = "FluxKontextPipeline"
    tasks = ("txt2img", "edit")
    training_pipeline = None
    refused = Flux.refused | {"controlnets": "diffusers has no FLUX.1 Kontext ControlNet pipeline"}

    def pipeline_class(self, task: str, controlnets: bool = False) -> Any:
        import diffusers

        return diffusers.FluxKontextPipeline

    def txt2img_size(self, width: int, height: int) -> dict:
        return {"max_area": width * height}  # (else it draws at about a megapixel of the same shape)

    def edit_size(self, width: int, height: int) -> dict:
        return {"width": width, "height": height, "max_area": width * height, "_auto_resize": False}


FLUX = Flux()
FLUX_FILL = FluxFill()
FLUX_KONTEXT = FluxKontext()
