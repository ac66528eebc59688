"""Tiny transformers vision models built from configs (nothing can be downloaded in tests)."""

import torch
from transformers import (
    MobileNetV2Config,
    MobileNetV2ForImageClassification,
    ResNetConfig,
    ResNetForImageClassification,
)


def tiny_resnet(num_labels: int = 5, seed: int = 0) -> ResNetForImageClassification:
    torch.manual_seed(seed)
    return ResNetForImageClassification(
        ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=num_labels)
    )


def tiny_mobilenet(
    num_labels: int = 5, seed: int = 0, tf_padding: bool = True
) -> MobileNetV2ForImageClassification:
    torch.manual_seed(seed)
    return MobileNetV2ForImageClassification(
        MobileNetV2Config(depth_multiplier=0.35, image_size=32, num_labels=num_labels, tf_padding=tf_padding)
    )
