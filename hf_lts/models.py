"""Image classifiers named by architecture and size, built from a transformers config: what ``hf-lts
train`` trains when no pretrained model is given, and what the benchmarks measure."""

from __future__ import annotations

from typing import Any

from transformers import MobileNetV2Config, PretrainedConfig, ResNetConfig

RESNET_SIZES: dict[str, dict[str, Any]] = {
    "18": {"layer_type": "basic", "depths": [2, 2, 2, 2], "hidden_sizes": [64, 128, 256, 512]},
    "34": {"layer_type": "basic", "depths": [3, 4, 6, 3], "hidden_sizes": [64, 128, 256, 512]},
    "50": {"layer_type": "bottleneck", "depths": [3, 4, 6, 3], "hidden_sizes": [256, 512, 1024, 2048]},
    "101": {"layer_type": "bottleneck", "depths": [3, 4, 23, 3], "hidden_sizes": [256, 512, 1024, 2048]},
    "152": {"layer_type": "bottleneck", "depths": [3, 8, 36, 3], "hidden_sizes": [256, 512, 1024, 2048]},
}
CONFIG_CLASSES: dict[str, type[PretrainedConfig]] = {
    "resnet": ResNetConfig,
    "mobilenet_v2": MobileNetV2Config,
}
MODEL_TYPES = tuple(CONFIG_CLASSES)


def size_fields(model_type: str, model_size: str | None) -> dict[str, Any]:
    """The config fields of ``model_size``: a ResNet depth (default ``"18"``) or a MobileNetV2 width
    multiplier (default ``"1.0"``). Raises `ValueError` for a size the architecture does not have."""
    if model_type == "resnet":
        size = model_size or "18"
        if size not in RESNET_SIZES:
            raise ValueError(f"model_size={size!r}: resnet sizes are {list(RESNET_SIZES)}")
        return RESNET_SIZES[size]
    if model_type == "mobilenet_v2":
        try:
            return {"depth_multiplier": float(model_size or "1.0")}
        except ValueError:
            raise ValueError(f"model_size={model_size!r}: mobilenet_v2 takes a width multiplier") from None
    raise ValueError(f"model_type={model_type!r}: use one of {list(MODEL_TYPES)}")


def model_config(model_type: str, model_size: str | None = None, **fields: Any) -> PretrainedConfig:
    """The config of ``model_type`` at ``model_size`` with ``fields`` set over it."""
    return CONFIG_CLASSES[model_type](**{**size_fields(model_type, model_size), **fields})
