"""The packed low-bit export of LTS models: integer codes in safetensors.

``model.save_pretrained(dir)`` of a prepared model (`prepare_model` attaches the ``"lts"`` quantizer that
`hf_lts.quantizers` registers with transformers as ``model.hf_quantizer``) writes ``config.json`` with the `LTSConfig` as
``quantization_config`` and a ``model.safetensors`` (header metadata ``lts_format = "packed-v1"``) holding,
for every quantized layer:

- ``<layer>.weight``: ``uint8``, 1-D: the codes ``q - Qn`` of the weights' integer levels, row-major,
  packed first-code-in-the-low-bits (2-bit: four per byte; 3- and 4-bit: two; 5- to 8-bit: one; the last
  byte zero-padded). It keeps the layer's own key with a 1-D shape no conv/linear weight has, so a
  transformers without hf_lts, which skips the unknown ``quant_method`` with a warning, then fails on the
  shape instead of loading codes as weights.
- ``<layer>.weight_quantizer.scale``: ``float32`` ``[1]`` or ``[out_channels]``, the LSQ weight step (as
  the forward pass uses it: clamped to ≥ ``SCALE_EPS``, like the activation step).
- ``<layer>.input_quantizer.{scale,signed,initialized}``: the activation quantizer; ``<layer>.bias``.

Every other tensor of the state dict (norm layers, layers kept in fp32) is stored unchanged. The LTS
training state — ``lts_state`` (distance EMAs, frozen masks, held latent values), ``lts_step``,
``lts_frozen_steps``, ``lts_macs`` — is not exported: inference needs only levels and steps. The header also
records each quantized layer's bits (checked against the config on load) and the run's final statistics
(``lts_stats``, for model cards). Training checkpoints keep the full state instead
(`hf_lts.quantizers.training_state`).

This module knows the file format only; loading it into a transformers model is the quantizer's job
(`hf_lts.quantizers`), which rebuilds the layers from `unpack_levels`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from ..config import LTSConfig
from ..quantization.layers import QuantLayerMixin
from ..quantization.lsq import SCALE_EPS, quantize_levels, signed_range
from ..quantization.prepare import layer_bits, quantized_layers
from ..quantization.stats import layer_stats

PACKED_FORMAT = "packed-v1"
#: Buffers of a quantized layer that only training needs (see `hf_lts.quantization.layers`).
TRAINING_BUFFERS = ("lts_state", "lts_step", "lts_frozen_steps", "lts_skipped_steps", "lts_macs")
DTYPE_NAMES = {
    torch.float32: "F32",
    torch.float64: "F64",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.uint8: "U8",
    torch.int32: "I32",
    torch.int64: "I64",
    torch.bool: "BOOL",
}


class LTSCheckpointError(ValueError):
    """A checkpoint that does not match its LTS config: a missing tensor, a wrong shape or dtype, bits
    that disagree with the config, out-of-range codes, or an unreadable file."""


# -- packing -------------------------------------------------------------------------------------------
def codes_per_byte(bits: int) -> int:
    """2-bit codes go four to a byte, 3- and 4-bit two, 5- to 8-bit one."""
    return 4 if bits <= 2 else 2 if bits <= 4 else 1


def codes_bytes(numel: int, bits: int) -> int:
    """The bytes that ``numel`` codes of ``bits`` take (`pack_codes`)."""
    return -(-numel // codes_per_byte(bits))


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned codes in ``[0, 2^bits)`` into a 1-D ``uint8`` tensor, first code in the low bits."""
    per_byte = codes_per_byte(bits)
    flat = codes.reshape(-1).to(torch.int32)
    flat = torch.cat([flat, flat.new_zeros(-flat.numel() % per_byte)])
    shifts = torch.arange(per_byte, dtype=torch.int32, device=flat.device) * (8 // per_byte)
    return (flat.view(-1, per_byte) << shifts).sum(1).to(torch.uint8)


def unpack_codes(data: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of `pack_codes`: every code the bytes hold, padding included (``int32``). Codes ≥ ``2^bits``
    (possible in the nibbles of 3-bit codes) and set padding bits are left for the caller to reject."""
    per_byte = codes_per_byte(bits)
    width = 8 // per_byte
    shifts = torch.arange(per_byte, dtype=torch.int32, device=data.device) * width
    codes = (data.to(torch.int32).unsqueeze(1) >> shifts) & ((1 << width) - 1)
    return codes.reshape(-1)


# -- export ----------------------------------------------------------------------------------------------
def export_levels(layer: QuantLayerMixin) -> torch.Tensor:
    """The integer level the layer's forward pass uses for each weight: the frozen level of frozen weights,
    the current LSQ rounding of the latent weight for the others (``int32``, weight-shaped)."""
    quantizer = layer.weight_quantizer
    current, _ = quantize_levels(
        layer.weight.detach(), step_size(quantizer.scale), quantizer.qmin, quantizer.qmax
    )
    return torch.where(layer.frozen_mask, layer.weight_levels, current.to(torch.int32))


def step_size(scale: torch.Tensor) -> torch.Tensor:
    """A step size as the forward pass uses it: an optimizer may have pushed it below `SCALE_EPS` since."""
    return scale.detach().clamp(min=SCALE_EPS)


def checked_layers(model: nn.Module) -> dict[str, QuantLayerMixin]:
    """The quantized layers of a prepared model, after checking that their bits still match its config
    (every export format records the config beside the weights)."""
    config: LTSConfig | None = getattr(model, "lts_config", None)
    layers = quantized_layers(model)
    if config is None or not layers:
        raise ValueError("The model is not prepared for LTS: call hf_lts.prepare_model(model, config) first.")
    plan = layer_bits(model, config)
    for name, layer in layers.items():
        wbits, abits = layer.weight_quantizer.bits, layer.input_quantizer.bits
        if plan.get(name) != (wbits, abits):
            raise ValueError(
                f"Layer {name!r} is quantized to W{wbits}A{abits} but model.lts_config gives {plan.get(name)}: "
                "the config was changed after prepare_model, and the export could not be loaded back."
            )
    return layers


def _stats_summary(model: nn.Module) -> dict[str, Any]:
    stats = layer_stats(quantized_layers(model))
    stats.pop("total_steps", None)  # a setting of the scratcher, not a property of the model
    return stats


@torch.no_grad()
def export_state_dict(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The packed export of a prepared model: ``(tensors, safetensors header metadata)``."""
    layers = checked_layers(model)
    tensors = {k: v.detach() for k, v in model.state_dict().items()}
    bits = {}
    for name, layer in layers.items():
        wbits, abits = layer.weight_quantizer.bits, layer.input_quantizer.bits
        qmin, _ = signed_range(wbits)
        tensors[f"{name}.weight"] = pack_codes(export_levels(layer) - qmin, wbits)
        for quantizer in ("weight_quantizer", "input_quantizer"):
            tensors[f"{name}.{quantizer}.scale"] = step_size(tensors[f"{name}.{quantizer}.scale"])
        for buffer in TRAINING_BUFFERS:
            del tensors[f"{name}.{buffer}"]
        bits[name] = {"weight_bits": wbits, "activation_bits": abits}
    metadata = {
        "lts_format": PACKED_FORMAT,
        "lts_layers": json.dumps(bits),
        "lts_stats": json.dumps(_stats_summary(model)),
    }
    return tensors, metadata


def save_export(model: nn.Module, save_directory: str | os.PathLike, **kwargs: Any) -> Path:
    """``model.save_pretrained(save_directory, **kwargs)`` (the packed export), written atomically: into a
    temporary folder inside ``save_directory``, then each file moved into place with `os.replace`, so an
    interrupted export never leaves a half-written file where a good one was."""
    if getattr(getattr(model, "hf_quantizer", None), "full_state", False):
        raise ValueError("save_export writes the packed export: call it outside `training_state(model)`.")
    directory = Path(save_directory)
    directory.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tmp-export-", dir=directory))
    try:
        model.save_pretrained(staging, **kwargs)
        for path in sorted(staging.rglob("*")):
            if path.is_file():
                target = directory / path.relative_to(staging)
                target.parent.mkdir(parents=True, exist_ok=True)
                os.chmod(
                    path, 0o644
                )  # some writers create 0600 files; a Hub mirror or shared folder reads it
                os.replace(path, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return directory


# -- reading ---------------------------------------------------------------------------------------------
def export_specs(module: nn.Module, weight_bits: int, per_channel: bool) -> dict:
    """``key → (shape, dtype)`` of the tensors the packed export holds for the float layer ``module``."""
    specs = {
        "weight": ((codes_bytes(module.weight.numel(), weight_bits),), torch.uint8),
        "weight_quantizer.scale": ((module.weight.shape[0] if per_channel else 1,), torch.float32),
        "input_quantizer.scale": ((1,), torch.float32),
        "input_quantizer.signed": ((), torch.bool),
        "input_quantizer.initialized": ((), torch.bool),
    }
    if module.bias is not None:
        specs["bias"] = (tuple(module.bias.shape), torch.float32)
    return specs


class Header:
    """Names, shapes, dtypes and metadata of the tensors in a checkpoint's safetensors files (no data read)."""

    def __init__(self, files: list[str]) -> None:
        self.tensors: dict[str, tuple[tuple[int, ...], str]] = {}
        self.metadata: dict[str, str] = {}
        for file in files:
            if not str(file).endswith(".safetensors"):
                raise LTSCheckpointError(
                    f"{os.path.basename(file)}: LTS checkpoints are loaded from safetensors files only "
                    "(never unpickled)."
                )
            try:
                with safe_open(file, framework="pt") as f:
                    self.metadata.update(f.metadata() or {})
                    for key in f.keys():
                        tensor = f.get_slice(key)
                        self.tensors[key] = (tuple(tensor.get_shape()), tensor.get_dtype())
            except (SafetensorError, OSError) as e:
                raise LTSCheckpointError(
                    f"{os.path.basename(file)} is not a readable safetensors file (truncated or corrupt?): {e}"
                ) from e

    def rename(self, loaded_key: Callable[[str], str]) -> None:
        """Name every tensor as loading will (``loaded_key`` of its key in the file), so that the checks below
        compare what ``from_pretrained`` hands the model."""
        self.tensors = {loaded_key(k): v for k, v in self.tensors.items()}

    def check(self, key: str, shape: tuple[int, ...], dtype: torch.dtype | None, why: str) -> None:
        if key not in self.tensors:
            raise LTSCheckpointError(f"The checkpoint has no tensor {key!r} ({why}): the file is incomplete.")
        found_shape, found_dtype = self.tensors[key]
        if found_shape != tuple(shape):
            raise LTSCheckpointError(
                f"Tensor {key!r} has shape {list(found_shape)} but {why} needs {list(shape)}: the file does "
                "not match its config."
            )
        if dtype is not None and found_dtype != DTYPE_NAMES.get(dtype):
            raise LTSCheckpointError(
                f"Tensor {key!r} has dtype {found_dtype} but {why} needs {DTYPE_NAMES.get(dtype, dtype)}."
            )

    def dtype(self, key: str) -> torch.dtype:
        name = self.tensors[key][1]
        for dtype, dtype_name in DTYPE_NAMES.items():
            if dtype_name == name:
                return dtype
        raise LTSCheckpointError(f"Tensor {key!r} has unsupported dtype {name}.")


def unpack_levels(
    name: str, tensors: dict[str, torch.Tensor], bits: int, shape: tuple[int, ...]
) -> torch.Tensor:
    """Integer levels (``int32``, weight-shaped) of a packed layer, with its codes and steps checked."""
    numel = int(torch.Size(shape).numel())
    codes = unpack_codes(tensors["weight"], bits)
    if bool((codes[numel:] != 0).any()):
        raise LTSCheckpointError(
            f"Tensor '{name}.weight' has padding bits set after its {numel} codes: corrupt."
        )
    codes = codes[:numel]
    if bool((codes >= 1 << bits).any()):
        raise LTSCheckpointError(
            f"Tensor '{name}.weight' holds codes ≥ {1 << bits}, impossible at {bits} bits: corrupt or not {bits}-bit."
        )
    for key in ("weight_quantizer.scale", "input_quantizer.scale"):
        scale = tensors[key]
        if not bool(torch.isfinite(scale).all() and (scale > 0).all()):
            raise LTSCheckpointError(
                f"Tensor '{name}.{key}' has non-positive or non-finite step sizes: corrupt."
            )
    return (codes + signed_range(bits)[0]).view(shape)
