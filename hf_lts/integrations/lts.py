"""Swapping a skeleton's layers for placeholders that match an LTS checkpoint, and back to LTS layers.

``from_pretrained`` builds the float skeleton from ``config.json``, then loads the file into it by key. A
packed export holds keys, shapes and dtypes no float layer has, so before loading, each layer LTS quantizes
is replaced by a `_Placeholder` with exactly the file's (checked) tensors; after loading, each is rebuilt
with `prepare_model` from its unpacked levels. The reloaded model computes the same ``(q_a·s_a) ⊛ (q·s)``
bit for bit. To train it further, its latent weights are the dequantized ``q·s`` and its LTS state starts
afresh at those levels: distance 1, nothing frozen, step 0, savings counters 0.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import LTSConfig
from ..export.packed import Header, LTSCheckpointError, export_specs, unpack_levels
from ..quantization import state
from ..quantization.lsq import broadcast_scale
from ..quantization.prepare import layer_bits, prepare_model, quantized_layers

#: layer name -> ("codes" | "training", weight bits): what the checkpoint holds for it
Placeholders = dict[str, tuple[str, int]]


class _Placeholder(nn.Module):
    """Stands in for a quantized layer while transformers loads the checkpoint into the skeleton.

    It holds meta tensors with exactly the keys, shapes and dtypes the file was checked to have, which the
    loader fills; the float layer it replaces is kept, unregistered, to rebuild the real layer from. The float32
    tensors are (frozen) parameters, so that model code that reads a layer's parameter dtype while loading
    still finds one (Swin V2's position-bias MLP).
    """

    def __init__(self, original: nn.Module, specs: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> None:
        super().__init__()
        self.__dict__["original"] = original
        for key, (shape, dtype) in specs.items():
            owner: nn.Module = self
            *path, leaf = key.split(".")
            for part in path:
                if part not in owner._modules:
                    owner.add_module(part, nn.Module())
                owner = owner._modules[part]
            tensor = torch.empty(shape, dtype=dtype, device="meta")
            if dtype == torch.float32:
                owner.register_parameter(leaf, nn.Parameter(tensor, requires_grad=False))
            else:
                owner.register_buffer(leaf, tensor)


def replace_with_placeholders(
    model: nn.Module, config: LTSConfig, header: Header, codes: bool
) -> Placeholders:
    """Replace every layer ``config`` quantizes by a `_Placeholder` for its tensors in the checkpoint
    (``codes``: the packed export of integer codes; otherwise a training checkpoint with the full state), checked first."""
    plan = {name: bits for name, bits in layer_bits(model, config).items() if bits is not None}
    placeholders: Placeholders = {}
    for name, (wbits, abits) in plan.items():
        module = model.get_submodule(name)
        if codes:
            specs = export_specs(module, wbits, config.per_channel)
            why = f"W{wbits}A{abits}{' per-channel' if config.per_channel else ''} {name!r}"
            for key, (shape, dtype) in specs.items():
                header.check(f"{name}.{key}", shape, dtype, why)
        elif f"{name}.lts_state" in header.tensors:  # a training checkpoint: the layer's full state
            prefix = f"{name}."
            specs = {
                k[len(prefix) :]: (shape, header.dtype(k))
                for k, (shape, _) in header.tensors.items()
                if k.startswith(prefix)
            }
        else:
            raise LTSCheckpointError(
                f"The checkpoint has neither packed codes nor LTS training state for layer {name!r} "
                f"(no 'lts_format' metadata, no tensor '{name}.lts_state'): it was not saved by hf-lts."
            )
        placeholders[name] = ("codes" if codes else "training", wbits)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, _Placeholder(module, specs))
    return placeholders


@torch.no_grad()
def restore_quantized_layers(model: nn.Module, config: LTSConfig, placeholders: Placeholders) -> nn.Module:
    """Rebuild the LTS layers from the loaded placeholders: `prepare_model`, then their loaded tensors."""
    loaded = {}
    for name, (kind, wbits) in placeholders.items():
        placeholder = model.get_submodule(name)
        tensors = dict(placeholder.state_dict())
        original = placeholder.original
        if kind == "codes":
            levels = unpack_levels(name, tensors, wbits, tuple(original.weight.shape))
            scale = broadcast_scale(tensors["weight_quantizer.scale"], levels.ndim)
            tensors["weight"] = levels.to(scale.dtype) * scale
            tensors["lts_state"] = state.initial_state(levels)
        float_module = original.to_empty(device=tensors["weight"].device)
        float_module.weight.copy_(tensors["weight"])
        float_module.train(placeholder.training)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, float_module)
        loaded[name] = (kind, tensors)
    prepare_model(model, config)
    layers = quantized_layers(model)
    for name, (kind, tensors) in loaded.items():
        layer = layers[name]
        layer_state = layer.state_dict() if kind == "codes" else {}
        layer_state.update(tensors)
        layer.load_state_dict(layer_state)
    return model
