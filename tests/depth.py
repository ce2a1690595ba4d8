"""A tiny Depth Anything (a DINOv2 backbone and its DPT head) with random weights and its
image processor, laid out as Depth-Anything-V2-Small-hf is: for the depth preprocessor."""

from __future__ import annotations

from pathlib import Path


def build_depth_model(out: Path) -> Path:
    if (out / "config.json").is_file():
        return out
    import torch
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config, DPTImageProcessor

    torch.manual_seed(4)
    backbone = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                            image_size=56, patch_size=14, out_indices=[1, 2], reshape_hidden_states=False)
    model = DepthAnythingForDepthEstimation(DepthAnythingConfig(
        backbone_config=backbone, patch_size=14, reassemble_hidden_size=32, reassemble_factors=[2, 1],
        neck_hidden_sizes=[16, 32], fusion_hidden_size=16, head_hidden_size=8, depth_estimation_type="relative",
    ))
    model.save_pretrained(out)
    DPTImageProcessor(  # Depth Anything's: 518 px there, kept aspect, multiples of the 14 px patch
        size={"height": 56, "width": 56}, keep_aspect_ratio=True, ensure_multiple_of=14, resample=3,
        image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225],
    ).save_pretrained(out)
    return out
