"""Optimizer parameter groups for LTS: the LSQ step sizes in a group of their own, without weight decay,
and no weight decay on norm layers either."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from .quantization.lsq import ActivationFakeQuantizer, WeightFakeQuantizer

_NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
_QUANTIZERS = (WeightFakeQuantizer, ActivationFakeQuantizer)


def no_decay_parameter_names(model: nn.Module) -> Iterator[str]:
    """The parameters of every norm layer and LSQ quantizer, by name: weight decay would pull BatchNorm's
    scales and the step sizes towards zero."""
    for module_name, module in model.named_modules():
        if isinstance(module, _NORM_LAYERS + _QUANTIZERS):
            for name, _ in module.named_parameters(recurse=False):
                yield f"{module_name}.{name}" if module_name else name


def group_step_sizes(optimizer: torch.optim.Optimizer, model: nn.Module, lr: float) -> None:
    """Move the trainable LSQ step sizes of ``model`` out of ``optimizer``'s groups into one of their own
    (learning rate ``lr``, no weight decay). Call it before the first step: the optimizer has no state yet."""
    scales = [
        p
        for module in model.modules()
        if isinstance(module, _QUANTIZERS)
        for p in module.parameters(recurse=False)
        if p.requires_grad
    ]
    ids = {id(p) for p in scales}
    for group in optimizer.param_groups:
        group["params"] = [p for p in group["params"] if id(p) not in ids]
    optimizer.add_param_group({"params": scales, "lr": lr, "weight_decay": 0.0})
