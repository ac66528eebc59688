"""How transformers 5 names a model's tensors in its checkpoints, through its own conversion mapping.

``save_pretrained`` writes some models' tensors under their original (pre-v5) names — ViT, DeiT, BEiT,
DINOv2 and Swin save ``attention.q_proj`` as ``attention.attention.query`` — and ``from_pretrained``
renames them back while loading (`transformers.conversion_mapping`). The LTS export goes through the same
``save_pretrained``, so its file holds the original names too; reading the file's header, the quantizer
renames its keys exactly as loading will. Converters that fuse or split tensors (DINOv2's SwiGLU MLP) would
mix the packed codes of several layers, so `check_no_converted_tensors` refuses such models up front.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn


def _conversions(model: nn.Module, quantizer: Any = None) -> tuple[list, list]:
    """``(renamings, converters)`` of ``model``'s checkpoint conversion mapping (empty for plain modules)."""
    from transformers import PreTrainedModel
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightRenaming

    if not isinstance(model, PreTrainedModel):
        return [], []
    mapping = get_model_conversion_mapping(model, hf_quantizer=quantizer)
    renamings = [t for t in mapping if isinstance(t, WeightRenaming)]
    return renamings, [t for t in mapping if not isinstance(t, WeightRenaming)]


def loaded_key_renamer(model: nn.Module, quantizer: Any = None) -> Callable[[str], str]:
    """``file key → model key`` as ``from_pretrained`` renames a checkpoint's keys for ``model``."""
    from transformers.core_model_loading import rename_source_key

    renamings, _ = _conversions(model, quantizer)
    return lambda key: rename_source_key(key, renamings, [])[0]


def converted_key_test(model: nn.Module) -> Callable[[str], bool]:
    """Whether transformers saves a tensor of ``model`` (by its model key) fused with or split from others
    (a `WeightConverter`, e.g. DINOv2's SwiGLU ``mlp.gate_proj``/``mlp.up_proj`` as ``mlp.weights_in``)."""
    _, converters = _conversions(model)
    reverse = [c.reverse_transform() for c in converters]
    return lambda key: any(c.rename_source_key(key)[1] is not None for c in reverse)


def check_no_converted_tensors(model: nn.Module, names: list[str]) -> None:
    """Raise `ValueError` if transformers saves the weight of one of the layers ``names`` fused with or
    split from others: the packed export stores each layer's codes on their own."""
    converted = converted_key_test(model)
    for name in names:
        if converted(f"{name}.weight"):
            raise ValueError(
                f"transformers saves {type(model).__name__}'s {name!r} weight fused with other tensors (its "
                "checkpoint conversion mapping), which the packed LTS export cannot hold: list "
                f"{name!r} in LTSConfig.modules_to_not_convert to keep it in fp32."
            )
