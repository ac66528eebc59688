"""Fake quantization: LSQ quantizers, the quantized layers with their LTS state, and model preparation."""

from .layers import QuantConv2d, QuantLinear
from .prepare import prepare_model, quantized_layers

__all__ = ["QuantConv2d", "QuantLinear", "prepare_model", "quantized_layers"]
