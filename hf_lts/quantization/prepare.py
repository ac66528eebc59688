"""`prepare_model`: swap a model's conv/linear layers for their fake-quantized LTS versions."""

from __future__ import annotations

from fnmatch import fnmatchcase

import torch
from torch import nn
from torch.nn import functional as F
from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING

from ..config import LTSConfig
from ..integrations.keys import check_no_converted_tensors
from .attention import add_matmul_quantizers, check_routable
from .layers import QuantConv2d, QuantLayerMixin, QuantLinear
from .steps import guard_step_sizes


def _matches(name: str, pattern: str) -> bool:
    """A module name matches a pattern equal to it, to a run of its dotted components, or as a glob."""
    return f".{pattern}." in f".{name}." or fnmatchcase(name, pattern)


def quantizable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every `nn.Conv2d` / `nn.Linear` (quantized or not) in registration order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def layer_bits(model: nn.Module, config: LTSConfig) -> dict[str, tuple[int, int] | None]:
    """``name → (weight_bits, activation_bits)`` for every conv/linear layer, ``None`` for fp32 ones.

    The first convolution takes ``first_layer_bits`` and the last linear layer (the classifier)
    ``last_layer_bits``, for weights and input alike.
    """
    layers = quantizable_layers(model)
    convs = [n for n, m in layers if isinstance(m, nn.Conv2d)]
    linears = [n for n, m in layers if isinstance(m, nn.Linear)]
    bits: dict[str, tuple[int, int] | None] = {}
    for name, _ in layers:
        if any(_matches(name, p) for p in config.modules_to_not_convert):
            bits[name] = None
        elif convs and name == convs[0]:
            bits[name] = None if config.first_layer_bits is None else (config.first_layer_bits,) * 2
        elif linears and name == linears[-1]:
            bits[name] = None if config.last_layer_bits is None else (config.last_layer_bits,) * 2
        else:
            bits[name] = (config.weight_bits, config.activation_bits)
    return bits


def _weight_standardized(module: nn.Module) -> bool:
    """Whether ``module`` is transformers' weight-standardized convolution (BiT)."""
    from transformers.models.bit.modeling_bit import WeightStandardizedConv2d

    return isinstance(module, WeightStandardizedConv2d)


def _check_convertible(name: str, module: nn.Module) -> None:
    """A Conv2d/Linear subclass that computes something else in its own forward cannot be swapped for a
    plain quantized layer without changing the model (BiT's weight standardization is handled)."""
    base = nn.Conv2d if isinstance(module, nn.Conv2d) else nn.Linear
    methods = ("forward", "_conv_forward") if base is nn.Conv2d else ("forward",)
    custom = [m for m in methods if getattr(type(module), m) is not getattr(base, m)]
    if custom and not _weight_standardized(module):
        raise ValueError(
            f"Layer {name!r} is a {type(module).__qualname__}, an nn.{base.__name__} with its own {custom[0]}(), "
            f"which LTS cannot replace by a quantized nn.{base.__name__} without changing what it computes: list "
            f"{name!r} in LTSConfig.modules_to_not_convert to keep it in fp32."
        )


@torch.no_grad()
def _fold_weight_standardization(conv: nn.Conv2d) -> nn.Module | None:
    """BiT's convolutions use their weight standardized per output channel (and pad TF-"SAME" inputs by
    their size): fold the standardization into the weight, in place, so that the function is unchanged and
    QAT quantizes and trains the weight the convolution uses. Returns the input pad, if any."""
    flat = conv.weight.reshape(1, conv.out_channels, -1)
    standardized = F.batch_norm(flat, None, None, training=True, momentum=0.0, eps=conv.eps)
    conv.weight.copy_(standardized.reshape_as(conv.weight))
    return conv.pad


def quantized_layers(model: nn.Module) -> dict[str, QuantLayerMixin]:
    """The model's `QuantConv2d` / `QuantLinear` layers by name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLayerMixin)}


def prepare_model(model: nn.Module, config: LTSConfig) -> nn.Module:
    """Replace every `nn.Conv2d` and `nn.Linear` of ``model`` by `QuantConv2d` / `QuantLinear`, in place.

    The layers take over the original parameters (an optimizer built afterwards sees the same tensors),
    get LSQ step sizes initialised from the weights, and start their LTS state at the current levels.
    Any padding a Conv2d takes is kept (`hf_lts.quantization.padding`), BiT's weight standardization is
    folded into the weights, and a Conv2d/Linear subclass with its own forward is refused, naming the layer,
    before anything is changed. With ``config.quantize_attention_matmuls``, the attention matmuls' inputs are
    fake-quantized too (`hf_lts.quantization.attention`). Preparing an already prepared model with the same
    config returns it unchanged. The config is kept as ``model.lts_config`` and, for transformers models, as
    ``model.config.quantization_config``, with the registered LTS quantizer as ``model.hf_quantizer`` so that
    ``save_pretrained`` writes the packed export.
    """
    config.validate()
    existing = getattr(model, "lts_config", None)
    if existing is not None:
        if existing.to_dict() != config.to_dict():
            raise ValueError(
                "This model is already prepared with a different LTSConfig "
                f"({existing.to_dict()} vs {config.to_dict()}): pass the model's own config "
                "(model.lts_config) or start from an unprepared model."
            )
        return model
    plan = layer_bits(model, config)
    if not plan:
        raise ValueError(
            f"{type(model).__name__} has no nn.Conv2d or nn.Linear layer: LTS quantizes the weights and inputs "
            "of convolution and linear layers, so there is nothing to prepare."
        )
    if all(b is None for b in plan.values()):
        raise ValueError(
            f"No layer of {type(model).__name__} would be quantized with {config}: every conv/linear layer is "
            "excluded by modules_to_not_convert or kept in fp32 by first_layer_bits/last_layer_bits."
        )
    converted = [name for name, bits in plan.items() if bits is not None]
    check_no_converted_tensors(model, converted)
    for name in converted:
        _check_convertible(name, model.get_submodule(name))
    if config.quantize_attention_matmuls:
        check_routable(model)
    for name in converted:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        module = getattr(parent, child)
        input_pad = _fold_weight_standardization(module) if _weight_standardized(module) else None
        layer_cls = QuantConv2d if isinstance(module, nn.Conv2d) else QuantLinear
        layer = layer_cls.from_float(module, *plan[name], per_channel=config.per_channel)
        if input_pad is not None:
            layer.input_pad = input_pad
        setattr(parent, child, layer)
        guard_step_sizes([layer.weight_quantizer.scale, layer.input_quantizer.scale])
    if config.quantize_attention_matmuls:
        add_matmul_quantizers(model, config.activation_bits)
    model.lts_config = config
    if getattr(model, "config", None) is not None and hasattr(model.config, "to_dict"):
        model.config.quantization_config = config
        _attach_quantizer(model, config)
    return model


def _attach_quantizer(model: nn.Module, config: LTSConfig) -> None:
    """Give a prepared transformers model the quantizer registered for ``config.quant_method`` as
    ``model.hf_quantizer``, as `from_pretrained` does for a loaded one, so that ``save_pretrained`` writes the
    packed export. Looked up in transformers' registry (filled by `hf_lts.quantizers` when `hf_lts` is
    imported), not imported: the quantizer builds on this module."""
    quantizer_cls = AUTO_QUANTIZER_MAPPING[config.quant_method]
    if not isinstance(getattr(model, "hf_quantizer", None), quantizer_cls):
        model.hf_quantizer = quantizer_cls(config, pre_quantized=False)
