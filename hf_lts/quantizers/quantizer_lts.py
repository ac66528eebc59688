"""`LTSHfQuantizer`: how transformers saves and loads LTS models (``quant_method="lts"``).

Saving writes the packed export of `hf_lts.export.packed` (or, inside `training_state`, the full training
state); loading checks the file's header, swaps the skeleton's layers for placeholders that match it
(`hf_lts.integrations`), lets transformers load the tensors through safetensors, then rebuilds the LTS
layers.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from transformers.quantizers.auto import register_quantizer
from transformers.quantizers.base import HfQuantizer

from ..config import LTSConfig
from ..export.packed import PACKED_FORMAT, Header, LTSCheckpointError, export_state_dict
from ..integrations.keys import converted_key_test, loaded_key_renamer
from ..integrations.lts import replace_with_placeholders, restore_quantized_layers
from ..quantization.attention import add_skeleton_quantizers
from ..quantization.prepare import layer_bits, prepare_model

logger = logging.getLogger(__name__)


@contextmanager
def training_state(model: nn.Module) -> Iterator[None]:
    """Within this block ``model.save_pretrained`` writes the full training state — latent fp32 weights and
    every LTS buffer, i.e. ``model.state_dict()`` under its own keys — instead of the packed export: for
    training checkpoints, which must resume exactly. (``from_pretrained`` loads those too, state included.)"""
    quantizer = getattr(model, "hf_quantizer", None)
    if not isinstance(quantizer, LTSHfQuantizer):
        yield
        return
    previous, quantizer.full_state = quantizer.full_state, True
    # Under the model's own names: the Trainer resumes a checkpoint with ``load_state_dict``, whereas
    # transformers would write some models' tensors under their original names (ViT's attention.q_proj as
    # attention.attention.query), which that load silently skips.
    own = model.__dict__.get("save_pretrained")
    model.save_pretrained = functools.partial(type(model).save_pretrained, model, save_original_format=False)
    try:
        yield
    finally:
        quantizer.full_state = previous
        if own is None:
            del model.save_pretrained
        else:
            model.save_pretrained = own


@register_quantizer("lts")
class LTSHfQuantizer(HfQuantizer):
    """Plugs LTS into ``from_pretrained``/``save_pretrained`` (registered as ``quant_method="lts"``).

    - Pre-quantized checkpoints (``config.json`` has an LTS ``quantization_config``): the packed export, or a
      training checkpoint (full state), rebuilt by `hf_lts.integrations`.
    - ``from_pretrained(fp32_model, quantization_config=LTSConfig(...))``: loads the float weights, then
      prepares the model for LTS training (`prepare_model`).
    - ``save_pretrained``: the packed export (`export_state_dict`), or the full state inside
      `training_state`.

    LTS models are QAT models, so the Trainer may train them (``is_trainable``/``is_qat_trainable``).
    """

    requires_calibration = False
    quantization_config: LTSConfig

    def __init__(self, quantization_config: LTSConfig, **kwargs: Any) -> None:
        super().__init__(quantization_config, **kwargs)
        self.full_state = False
        self._placeholders: dict[str, tuple[str, int]] = {}

    def update_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """Always float32: LTS layers hold fp32 latent weights and step sizes, and the reloaded model must
        compute what the exported one did (lower precision is autocast's job, as during training)."""
        if dtype != torch.float32:
            logger.warning(
                "LTS models load in float32 (asked for %s): use autocast for lower precision.", dtype
            )
        return torch.float32

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    @property
    def is_qat_trainable(self) -> bool:
        return True

    def get_state_dict_and_metadata(self, model: nn.Module) -> tuple[dict[str, torch.Tensor] | None, dict]:
        if self.full_state:
            return None, {}
        return export_state_dict(model)

    def _process_model_before_weight_loading(
        self, model: nn.Module, checkpoint_files: list[str] | None = None, **kwargs: Any
    ) -> nn.Module:
        if not self.pre_quantized:
            return model
        if not checkpoint_files:
            raise LTSCheckpointError("LTS checkpoints load from safetensors files (no state_dict argument).")
        header = Header(checkpoint_files)
        header.rename(loaded_key_renamer(model, self))
        export_format = header.metadata.get("lts_format")
        if export_format not in (None, PACKED_FORMAT):
            raise LTSCheckpointError(
                f"Unknown LTS checkpoint format {export_format!r}: upgrade hf-lts to load it."
            )
        config = self.quantization_config
        if export_format:
            plan = {name: bits for name, bits in layer_bits(model, config).items() if bits is not None}
            self._check_recorded_bits(header, plan)
        self._placeholders = replace_with_placeholders(model, config, header, bool(export_format))
        if config.quantize_attention_matmuls:  # their tensors load with the others, checked below
            add_skeleton_quantizers(model, config.activation_bits)
        # The other tensors: transformers would only warn about a missing one, and initialise it at random.
        # (Not those transformers saves fused with others: the file holds them under the fused key.)
        converted = converted_key_test(model)
        for key, tensor in model.state_dict().items():
            if key not in getattr(model, "all_tied_weights_keys", {}) and not converted(key):
                header.check(key, tuple(tensor.shape), None, f"{type(model).__name__} built from config.json")
        return model

    def _check_recorded_bits(self, header: Header, plan: dict[str, tuple[int, int]]) -> None:
        try:
            recorded = {
                n: (b["weight_bits"], b["activation_bits"])
                for n, b in json.loads(header.metadata["lts_layers"]).items()
            }
        except (KeyError, TypeError, ValueError) as e:
            raise LTSCheckpointError(
                f"The checkpoint's 'lts_layers' metadata is missing or corrupt: {e!r}"
            ) from e
        for name in sorted(set(plan) | set(recorded)):
            if recorded.get(name) != plan.get(name):
                raise LTSCheckpointError(
                    f"Layer {name!r} was exported as {_bits_name(recorded.get(name))} but config.json's "
                    f"quantization_config gives {_bits_name(plan.get(name))}: the weights and the config disagree."
                )

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        if not self.pre_quantized:
            return prepare_model(model, self.quantization_config)
        placeholders, self._placeholders = self._placeholders, {}
        return restore_quantized_layers(model, self.quantization_config, placeholders)


def _bits_name(bits: tuple[int, int] | None) -> str:
    return "full precision (not quantized)" if bits is None else f"W{bits[0]}A{bits[1]}"
