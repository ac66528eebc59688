"""`LTSConfig`: what to quantize, to how many bits, and when weights freeze.

It is a transformers `QuantizationConfigMixin` registered as ``quant_method="lts"``, so it lives in
``config.json["quantization_config"]`` and `from_pretrained` finds the LTS quantizer from it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from importlib.metadata import version
from typing import Any

import torch
from transformers.quantizers.auto import register_quantization_config
from transformers.utils.quantization_config import QuantizationConfigMixin

FREEZE_SCHEDULES = ("linear", "sine", "constant")
DISTANCE_INITS = ("one", "observed")
MIN_BITS, MAX_BITS = 2, 8


@register_quantization_config("lts")
@dataclass
class LTSConfig(QuantizationConfigMixin):
    """Quantization and freezing settings of an LTS run (see ``LTS.md``).

    Args:
        weight_bits: bits of the (signed, LSQ) weight quantizer of every converted layer, 2..8.
        activation_bits: bits of the input-activation quantizer of every converted layer, 2..8.
        first_layer_bits: bits (weights and input) of the first convolution; ``None`` keeps it in fp32.
        last_layer_bits: bits (weights and input) of the last linear layer (the classifier); ``None`` keeps
            it in fp32.
        per_channel: one weight step size per output channel instead of one per tensor.
        freeze: ``False`` turns LTS off, leaving plain LSQ QAT (the baseline).
        freeze_schedule: threshold growth after warm-up: ``"linear"``, ``"sine"`` or ``"constant"``.
        freeze_threshold: the threshold of the ``"constant"`` schedule, in units of the step.
        distance_momentum: momentum of the distance EMA (the paper: 0.99 CIFAR, 0.9999 ImageNet).
        freeze_warmup_ratio: fraction of the optimizer steps during which nothing freezes.
        modules_to_not_convert: module names (or dotted suffixes, or glob patterns) kept in full precision.
        channel_completion: once this share of an output channel's weights is frozen, freeze the rest of the
            channel at its current level, so that the channel's weight gradient is skipped; ``None`` (the
            paper) freezes weight by weight only (LTS.md §7).
        distance_init: where the distance EMA starts, at the start of training and after a level change:
            ``"one"`` (the paper: one whole step, forgotten at rate ``1 - m``, which freezes late in short
            runs) or ``"observed"`` (the first distance observed after that point; LTS.md §7).
        quantize_attention_matmuls: also fake-quantize the inputs of the two attention matmuls (query and
            key of Q·Kᵀ, probabilities and value of P·V) with learned LSQ quantizers at ``activation_bits``,
            as the ViT QAT literature does; transformers models whose attention runs through
            ``AttentionInterface`` only (`hf_lts.quantization.attention`).
    """

    _argument_group_name = "LTS (LTSConfig)"  # the heading of these options in `hf-lts train --help`

    quant_method: str = field(default="lts", init=False, repr=False)
    weight_bits: int = 4
    activation_bits: int = 4
    first_layer_bits: int | None = 8
    last_layer_bits: int | None = 8
    per_channel: bool = False
    freeze: bool = True
    freeze_schedule: str = "linear"
    freeze_threshold: float = 0.1
    distance_momentum: float = 0.99
    freeze_warmup_ratio: float = 0.2
    modules_to_not_convert: list[str] = field(default_factory=list)
    channel_completion: float | None = None
    distance_init: str = "one"
    quantize_attention_matmuls: bool = False

    def __post_init__(self) -> None:
        self.modules_to_not_convert = list(self.modules_to_not_convert or [])
        self.validate()

    def validate(self) -> None:
        """Raise `ValueError` naming the field, its value and what is allowed."""
        for name in ("weight_bits", "activation_bits", "first_layer_bits", "last_layer_bits"):
            value = getattr(self, name)
            optional = name in ("first_layer_bits", "last_layer_bits")
            if value is None and optional:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or not MIN_BITS <= value <= MAX_BITS:
                allowed = f"an integer from {MIN_BITS} to {MAX_BITS}" + (
                    " or None (keep fp32)" if optional else ""
                )
                raise ValueError(f"LTSConfig.{name}={value!r} is not supported: use {allowed}.")
        if self.freeze_schedule not in FREEZE_SCHEDULES:
            raise ValueError(
                f"LTSConfig.freeze_schedule={self.freeze_schedule!r} is unknown: use one of {list(FREEZE_SCHEDULES)}."
            )
        _check_range("distance_momentum", self.distance_momentum, "[0, 1)", lambda v: 0 <= v < 1)
        _check_range("freeze_warmup_ratio", self.freeze_warmup_ratio, "[0, 1)", lambda v: 0 <= v < 1)
        _check_range("freeze_threshold", self.freeze_threshold, "[0, 1]", lambda v: 0 <= v <= 1)
        if self.channel_completion is not None:
            _check_range(
                "channel_completion", self.channel_completion, "(0, 1] or None (off)", lambda v: 0 < v <= 1
            )
        if self.distance_init not in DISTANCE_INITS:
            raise ValueError(
                f"LTSConfig.distance_init={self.distance_init!r} is unknown: use one of {list(DISTANCE_INITS)}."
            )
        if not isinstance(self.quantize_attention_matmuls, bool):
            raise ValueError(
                f"LTSConfig.quantize_attention_matmuls={self.quantize_attention_matmuls!r} must be True or False."
            )
        if not all(isinstance(p, str) for p in self.modules_to_not_convert):
            raise ValueError(
                f"LTSConfig.modules_to_not_convert={self.modules_to_not_convert!r} must be a list of module-name "
                "patterns (strings)."
            )

    def to_dict(self) -> dict[str, Any]:
        """Every field, plus the hf-lts and torch versions that wrote them (which `from_dict` ignores)."""
        return {**asdict(self), "hf_lts_version": version("hf-lts"), "torch_version": torch.__version__}

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], return_unused_kwargs: bool = False, **kwargs: Any):
        """Rebuild from `to_dict` output; keys that are not fields (``quant_method``, versions) are ignored."""
        names = {f.name for f in fields(cls) if f.init}
        config = cls(**{k: v for k, v in config_dict.items() if k in names})
        unused = {}
        for key, value in kwargs.items():
            if key in names:
                setattr(config, key, value)
            else:
                unused[key] = value
        config.validate()
        return (config, unused) if return_unused_kwargs else config


def _check_range(name: str, value: Any, allowed: str, ok) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not ok(value):
        raise ValueError(f"LTSConfig.{name}={value!r} is out of range: use a number in {allowed}.")
