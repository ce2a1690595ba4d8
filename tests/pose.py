"""A tiny person detector (RT-DETR) and pose estimator (ViTPose) with random weights and their
image processors, laid out as PekingU/rtdetr_r50vd_coco_o365 and usyd-community/vitpose-base-simple
are: for the openpose preprocessor. The class head is biased so that every query is a confident
person (or, with ``people=False``, none is), and the heatmaps so that every keypoint is sure."""

from __future__ import annotations

from pathlib import Path


def build_pose_models(out: Path, people: bool = True) -> tuple[Path, Path]:
    detector, estimator = out / "person", out / "pose"
    if (estimator / "config.json").is_file():
        return detector, estimator
    import torch
    from transformers import (
        RTDetrConfig,
        RTDetrForObjectDetection,
        RTDetrImageProcessor,
        RTDetrResNetConfig,
        VitPoseBackboneConfig,
        VitPoseConfig,
        VitPoseForPoseEstimation,
        VitPoseImageProcessor,
    )

    torch.manual_seed(5)
    backbone = RTDetrResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 16, 32], depths=[1, 1, 1, 1],
                                  out_features=["stage2", "stage3", "stage4"])
    model = RTDetrForObjectDetection(RTDetrConfig(
        backbone_config=backbone, encoder_in_channels=[16, 16, 32], encoder_hidden_dim=16, encoder_ffn_dim=32,
        encoder_attention_heads=2, d_model=16, decoder_in_channels=[16, 16, 16], decoder_ffn_dim=32,
        decoder_layers=1, decoder_attention_heads=2, num_queries=4, num_denoising=0,
        id2label={0: "person", 1: "bicycle"}, label2id={"person": 0, "bicycle": 1},
    ))
    with torch.no_grad():
        for head in (model.model.enc_score_head, *model.model.decoder.class_embed):
            head.weight.zero_()
            head.bias.copy_(torch.tensor([4.0, -4.0] if people else [-4.0, 4.0]))
    model.save_pretrained(detector)
    RTDetrImageProcessor(size={"height": 64, "width": 64}).save_pretrained(detector)  # 640 px there

    model = VitPoseForPoseEstimation(VitPoseConfig(backbone_config=VitPoseBackboneConfig(
        image_size=[64, 48], patch_size=[16, 16], hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        out_indices=[1]), num_labels=17))
    with torch.no_grad():
        model.head.conv.bias.fill_(1.0)
    model.save_pretrained(estimator)
    VitPoseImageProcessor(size={"height": 64, "width": 48}).save_pretrained(estimator)  # 256 × 192 there
    return detector, estimator
