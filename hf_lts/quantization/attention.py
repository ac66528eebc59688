"""Fake quantization of the two attention matmuls' inputs (``LTSConfig.quantize_attention_matmuls``).

`prepare_model` quantizes the Linear layers of attention and MLP like any other. With this option, the
inputs of Q·Kᵀ (query and key) and of P·V (attention probabilities and value) are fake-quantized as well,
with learned LSQ activation quantizers (`ActivationFakeQuantizer`) at the activation bit width, as the ViT
QAT literature does (LSQ/Q-ViT on DeiT: Li et al., arXiv 2210.06707); LayerNorm, softmax and GELU stay
float. The query, key and value come out signed, the probabilities unsigned (the quantizers decide from the
first batch).

No model code is patched: transformers' ViT-family attention modules call whatever function
``config._attn_implementation`` names in `transformers.AttentionInterface`. This module registers
`quantized_attention_forward` there under `ATTENTION_IMPLEMENTATION`, gives every attention module that
routes through the interface an `AttentionMatmulQuantizers` child (so its steps are parameters the optimizer
trains and its state travels with the checkpoint), and sets the model's implementation to it. A model whose
attention does not route that way is refused. The ONNX export swaps the quantizers for Q/DQ pairs
(`hf_lts.export.onnx`).
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface, PreTrainedModel

from .lsq import ActivationFakeQuantizer
from .steps import guard_step_sizes

#: The name `quantized_attention_forward` is registered under in `transformers.AttentionInterface`.
ATTENTION_IMPLEMENTATION = "lts_quantized_matmuls"
#: The child module each attention module gets (its keys in the state dict: ``<attention>.<this>.query.scale``).
QUANTIZERS_NAME = "matmul_quantizers"
#: The four inputs, in the order the two matmuls take them.
MATMUL_INPUTS = ("query", "key", "probs", "value")


class AttentionMatmulQuantizers(nn.Module):
    """The LSQ input quantizers of one attention module's two matmuls: ``query``·``key``ᵀ and
    ``probs``·``value``. Any module mapping a tensor to its fake-quantized value may stand in for one
    (the ONNX export's Q/DQ form does)."""

    def __init__(self, bits: int) -> None:
        super().__init__()
        for name in MATMUL_INPUTS:
            self.add_module(name, ActivationFakeQuantizer(bits))


def quantized_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' eager attention with both matmuls' inputs fake-quantized by ``module``'s
    `AttentionMatmulQuantizers`. The probabilities are quantized after dropout, right before the matmul,
    so that what the matmul multiplies is on the level grid in training as in evaluation."""
    quantizers = module._modules.get(QUANTIZERS_NAME)
    if quantizers is None:
        raise RuntimeError(
            f"{type(module).__name__} runs with attn_implementation={ATTENTION_IMPLEMENTATION!r} but has no "
            "attention matmul quantizers: prepare the model with hf_lts.prepare_model(model, "
            "LTSConfig(quantize_attention_matmuls=True)) instead of setting the implementation by hand."
        )
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    scores = torch.matmul(quantizers.query(query), quantizers.key(key).transpose(-2, -1)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask
    probs = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = nn.functional.dropout(probs, p=dropout, training=module.training)
    output = torch.matmul(quantizers.probs(probs), quantizers.value(value))
    return output.transpose(1, 2).contiguous(), probs


AttentionInterface.register(ATTENTION_IMPLEMENTATION, quantized_attention_forward)


@functools.cache
def _routes_through_interface(cls: type) -> bool:
    """Whether ``cls``'s forward asks `AttentionInterface` for its attention function (transformers' own
    test, `PreTrainedModel._can_set_attn_implementation`, reads the whole modeling file; this one the class)."""
    try:
        return "ALL_ATTENTION_FUNCTIONS.get_interface(" in inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return False


def attention_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The modules of ``model`` whose forward calls the attention function of `AttentionInterface`."""
    return {n: m for n, m in model.named_modules() if _routes_through_interface(type(m))}


def matmul_quantizers(model: nn.Module) -> dict[str, AttentionMatmulQuantizers]:
    """Every `AttentionMatmulQuantizers` of ``model`` by name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, AttentionMatmulQuantizers)}


def check_routable(model: nn.Module) -> dict[str, nn.Module]:
    """The attention modules of ``model``, or a `ValueError` saying why its attention cannot be quantized."""
    name = type(model).__name__
    if not isinstance(model, PreTrainedModel) or not model._can_set_attn_implementation():
        raise ValueError(
            f"LTSConfig.quantize_attention_matmuls=True needs a transformers model whose attention runs through "
            f"transformers.AttentionInterface (ViT, DeiT, BEiT, DINOv2, Swin, ...); {name} does not, so its "
            "attention matmuls cannot be quantized: set quantize_attention_matmuls=False (its Linear layers are "
            "quantized either way)."
        )
    modules = attention_modules(model)
    if not modules:
        raise ValueError(
            f"LTSConfig.quantize_attention_matmuls=True: {name} has no attention module that calls "
            "transformers.AttentionInterface, so there are no attention matmuls to quantize: set "
            "quantize_attention_matmuls=False."
        )
    return modules


def add_matmul_quantizers(model: nn.Module, bits: int) -> None:
    """Give every attention module of ``model`` an `AttentionMatmulQuantizers` (``bits``-bit) and route its
    attention through `quantized_attention_forward`. Quantizers it has already (loaded into a skeleton from
    a checkpoint) are kept, their flags re-read from the loaded buffers."""
    modules = check_routable(model)
    for module in modules.values():
        quantizers = module._modules.get(QUANTIZERS_NAME)
        if quantizers is None:
            device = next((p.device for p in module.parameters() if not p.is_meta), None)
            module.add_module(QUANTIZERS_NAME, AttentionMatmulQuantizers(bits).to(device))
        else:  # loaded by transformers, which sets tensors without `load_state_dict`'s hooks
            for quantizer in quantizers.children():
                quantizer.load_state_dict(quantizer.state_dict())
        guard_step_sizes([q.scale for q in module._modules[QUANTIZERS_NAME].children()])
    model.set_attn_implementation(ATTENTION_IMPLEMENTATION)


def add_skeleton_quantizers(model: nn.Module, bits: int) -> None:
    """Before ``from_pretrained`` loads a checkpoint: quantizers for it to load into, as meta tensors like
    the rest of the skeleton (built on the CPU: they read their flags when built). Not yet routed."""
    for module in check_routable(model).values():
        if QUANTIZERS_NAME not in module._modules:
            with torch.device("cpu"):
                quantizers = AttentionMatmulQuantizers(bits)
            module.add_module(QUANTIZERS_NAME, quantizers.to("meta"))
