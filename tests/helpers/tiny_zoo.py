"""Tiny configs of transformers' image-classification architectures built from Conv2d/Linear (the zoo test)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import transformers
from torch import nn

IMAGE_SIZE = 32

#: architecture → (model class, config class, config arguments): a few thousand parameters each.
_LEVIT = dict(
    image_size=IMAGE_SIZE, hidden_sizes=[16, 24, 32], num_attention_heads=[1, 2, 2], depths=[1, 1, 1],
    key_dim=[8, 8, 8], patch_size=16,
)  # fmt: skip

ZOO: dict[str, tuple[str, str, dict]] = {
    "resnet": (
        "ResNetForImageClassification",
        "ResNetConfig",
        dict(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1]),
    ),
    "regnet": (
        "RegNetForImageClassification",
        "RegNetConfig",
        dict(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], groups_width=4),
    ),
    "bit": (
        "BitForImageClassification",
        "BitConfig",
        dict(
            embedding_size=8,
            hidden_sizes=[8, 16],
            depths=[1, 1],
            global_padding="SAME",
            layer_type="bottleneck",
            num_groups=2,
            embedding_dynamic_padding=True,
        ),
    ),
    "mobilenet_v1": (
        "MobileNetV1ForImageClassification",
        "MobileNetV1Config",
        dict(depth_multiplier=0.25, image_size=IMAGE_SIZE),
    ),
    "mobilenet_v2": (
        "MobileNetV2ForImageClassification",
        "MobileNetV2Config",
        dict(depth_multiplier=0.35, image_size=IMAGE_SIZE),
    ),
    "efficientnet": (
        "EfficientNetForImageClassification",
        "EfficientNetConfig",
        dict(
            image_size=IMAGE_SIZE,
            width_coefficient=0.25,
            depth_coefficient=1.0,
            kernel_sizes=[3, 5],
            in_channels=[32, 16],
            out_channels=[16, 24],
            strides=[1, 2],
            num_block_repeats=[1, 1],
            expand_ratios=[1, 6],
            depthwise_padding=[2],
            hidden_dim=320,
        ),
    ),
    "convnext": (
        "ConvNextForImageClassification",
        "ConvNextConfig",
        dict(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2),
    ),
    "convnextv2": (
        "ConvNextV2ForImageClassification",
        "ConvNextV2Config",
        dict(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2),
    ),
    "mobilevit": (
        "MobileViTForImageClassification",
        "MobileViTConfig",
        dict(
            image_size=IMAGE_SIZE,
            hidden_sizes=[16, 24, 32],
            neck_hidden_sizes=[8, 8, 16, 16, 24, 32, 64],
            num_attention_heads=2,
        ),
    ),
    "mobilevitv2": (
        "MobileViTV2ForImageClassification",
        "MobileViTV2Config",
        dict(image_size=64, width_multiplier=0.25, n_attn_blocks=[1, 1, 1]),
    ),
    "poolformer": (
        "PoolFormerForImageClassification",
        "PoolFormerConfig",
        dict(hidden_sizes=[8, 16, 16, 16], depths=[1, 1, 1, 1]),
    ),
    "vit": (
        "ViTForImageClassification",
        "ViTConfig",
        dict(
            image_size=IMAGE_SIZE,
            patch_size=8,
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=32,
        ),
    ),
    "deit": (
        "DeiTForImageClassification",
        "DeiTConfig",
        dict(
            image_size=IMAGE_SIZE,
            patch_size=8,
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=32,
        ),
    ),
    "deit_distilled": (
        "DeiTForImageClassificationWithTeacher",
        "DeiTConfig",
        dict(
            image_size=IMAGE_SIZE,
            patch_size=8,
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=32,
        ),
    ),
    "beit": (
        "BeitForImageClassification",
        "BeitConfig",
        dict(
            image_size=IMAGE_SIZE,
            patch_size=8,
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=32,
            use_relative_position_bias=True,
        ),
    ),
    "dinov2": (
        "Dinov2ForImageClassification",
        "Dinov2Config",
        dict(
            image_size=IMAGE_SIZE,
            patch_size=8,
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            mlp_ratio=2,
        ),
    ),
    "swin": (
        "SwinForImageClassification",
        "SwinConfig",
        dict(
            image_size=IMAGE_SIZE, patch_size=4, embed_dim=8, depths=[1, 1], num_heads=[1, 2], window_size=4
        ),
    ),
    "swinv2": (
        "Swinv2ForImageClassification",
        "Swinv2Config",
        dict(
            image_size=IMAGE_SIZE, patch_size=4, embed_dim=8, depths=[1, 1], num_heads=[1, 2], window_size=4
        ),
    ),
    "levit": (
        "LevitForImageClassification",
        "LevitConfig",
        _LEVIT,
    ),
    "levit_distilled": (
        "LevitForImageClassificationWithTeacher",
        "LevitConfig",
        _LEVIT,
    ),
    "pvt_v2": (
        "PvtV2ForImageClassification",
        "PvtV2Config",
        dict(
            image_size=IMAGE_SIZE,
            hidden_sizes=[8, 16],
            depths=[1, 1],
            num_encoder_blocks=2,
            num_attention_heads=[1, 2],
            sr_ratios=[2, 1],
            patch_sizes=[7, 3],
            strides=[4, 2],
            mlp_ratios=[2, 2],
        ),
    ),
    "focalnet": (
        "FocalNetForImageClassification",
        "FocalNetConfig",
        dict(image_size=IMAGE_SIZE, patch_size=4, embed_dim=8, depths=[1, 1], hidden_sizes=[8, 16]),
    ),
}


def tiny_zoo_model(arch: str, num_labels: int = 5, seed: int = 0) -> nn.Module:
    """A freshly initialised tiny model of ``arch`` (a key of `ZOO`)."""
    model_cls, config_cls, kwargs = ZOO[arch]
    torch.manual_seed(seed)
    config = getattr(transformers, config_cls)(num_labels=num_labels, **kwargs)
    return getattr(transformers, model_cls)(config)


def builder(arch: str) -> Callable[..., nn.Module]:
    return lambda num_labels=5, seed=0: tiny_zoo_model(arch, num_labels, seed)


def image_size(model: nn.Module) -> int:
    """The side of the square images ``model``'s config expects (32 where it names none)."""
    size = getattr(model.config, "image_size", IMAGE_SIZE)
    return size if isinstance(size, int) else size[0]
