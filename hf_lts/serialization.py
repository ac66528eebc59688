"""The packed low-bit export of LTS models, and the ``"lts"`` transformers quantizer that loads it.

``model.save_pretrained(dir)`` of a prepared model (`prepare_model` attaches `LTSHfQuantizer` as
``model.hf_quantizer``) writes ``config.json`` with the `LTSConfig` as ``quantization_config`` and a
``model.safetensors`` (header metadata ``lts_format = "packed-v1"``) holding, for every quantized layer:

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
(``lts_stats``, for model cards). Training checkpoints keep the full state instead (`training_state`).

Loading (``from_pretrained`` after ``import hf_lts``): the skeleton's quantized layers are swapped for
placeholders whose keys, shapes and dtypes are exactly the file's, after the file's header has been checked
against them; transformers loads the tensors through safetensors; then each layer is rebuilt with
`prepare_model` from its unpacked levels. The reloaded model computes the same ``(q_a·s_a) ⊛ (q·s)`` bit for
bit. To train it further, its latent weights are the dequantized ``q·s`` and its LTS state starts afresh at
those levels: distance 1, nothing frozen, step 0, savings counters 0.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn
from transformers.quantizers.auto import register_quantizer
from transformers.quantizers.base import HfQuantizer

from .config import LTSConfig
from .quantization import state
from .quantization.layers import QuantLayerMixin
from .quantization.lsq import SCALE_EPS, broadcast_scale, quantize_levels, signed_range
from .quantization.prepare import layer_bits, prepare_model, quantized_layers

logger = logging.getLogger(__name__)

PACKED_FORMAT = "packed-v1"
#: Buffers of a quantized layer that only training needs (see `hf_lts.quantization.layers`).
TRAINING_BUFFERS = ("lts_state", "lts_step", "lts_frozen_steps", "lts_skipped_steps", "lts_macs")
_DTYPE_NAMES = {
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


def packed_numel(numel: int, bits: int) -> int:
    return -(-numel // codes_per_byte(bits))


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned codes in ``[0, 2^bits)`` into a 1-D ``uint8`` tensor, first code in the low bits."""
    per_byte = codes_per_byte(bits)
    flat = codes.reshape(-1).to(torch.int32)
    flat = torch.cat([flat, flat.new_zeros(-flat.numel() % per_byte)])
    shifts = torch.arange(per_byte, dtype=torch.int32, device=flat.device) * (8 // per_byte)
    return (flat.view(-1, per_byte) << shifts).sum(1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of `pack_codes`: every code the bytes hold, padding included (``int32``). Codes ≥ ``2^bits``
    (possible in the nibbles of 3-bit codes) and set padding bits are left for the caller to reject."""
    per_byte = codes_per_byte(bits)
    width = 8 // per_byte
    shifts = torch.arange(per_byte, dtype=torch.int32, device=packed.device) * width
    codes = (packed.to(torch.int32).unsqueeze(1) >> shifts) & ((1 << width) - 1)
    return codes.reshape(-1)


# -- export ----------------------------------------------------------------------------------------------
def export_levels(layer: QuantLayerMixin) -> torch.Tensor:
    """The integer level the layer's forward pass uses for each weight: the frozen level of frozen weights,
    the current LSQ rounding of the latent weight for the others (``int32``, weight-shaped)."""
    quantizer = layer.weight_quantizer
    current, _ = quantize_levels(
        layer.weight.detach(), _step(quantizer.scale), quantizer.qmin, quantizer.qmax
    )
    return torch.where(layer.frozen_mask, layer.weight_levels, current.to(torch.int32))


def _step(scale: torch.Tensor) -> torch.Tensor:
    """A step size as the forward pass uses it: an optimizer may have pushed it below `SCALE_EPS` since."""
    return scale.detach().clamp(min=SCALE_EPS)


def _stats_summary(model: nn.Module) -> dict[str, Any]:
    from .scratcher import LotteryTicketScratcher  # the scratcher imports the layers, not this module

    stats = LotteryTicketScratcher(model, compile=False).stats()
    stats.pop("total_steps", None)  # a setting of the scratcher, not a property of the model
    return stats


@torch.no_grad()
def export_state_dict(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The packed export of a prepared model: ``(tensors, safetensors header metadata)``."""
    config: LTSConfig | None = getattr(model, "lts_config", None)
    layers = quantized_layers(model)
    if config is None or not layers:
        raise ValueError("The model is not prepared for LTS: call hf_lts.prepare_model(model, config) first.")
    plan = layer_bits(model, config)
    tensors = {k: v.detach() for k, v in model.state_dict().items()}
    bits = {}
    for name, layer in layers.items():
        wbits, abits = layer.weight_quantizer.bits, layer.input_quantizer.bits
        if plan.get(name) != (wbits, abits):
            raise ValueError(
                f"Layer {name!r} is quantized to W{wbits}A{abits} but model.lts_config gives {plan.get(name)}: "
                "the config was changed after prepare_model, and the export could not be loaded back."
            )
        qmin, _ = signed_range(wbits)
        tensors[f"{name}.weight"] = pack_codes(export_levels(layer) - qmin, wbits)
        for quantizer in ("weight_quantizer", "input_quantizer"):
            tensors[f"{name}.{quantizer}.scale"] = _step(tensors[f"{name}.{quantizer}.scale"])
        for buffer in TRAINING_BUFFERS:
            del tensors[f"{name}.{buffer}"]
        bits[name] = {"weight_bits": wbits, "activation_bits": abits}
    metadata = {
        "lts_format": PACKED_FORMAT,
        "lts_layers": json.dumps(bits),
        "lts_stats": json.dumps(_stats_summary(model)),
    }
    return tensors, metadata


@contextmanager
def training_state(model: nn.Module) -> Iterator[None]:
    """Within this block ``model.save_pretrained`` writes the full training state — latent fp32 weights and
    every LTS buffer, i.e. ``model.state_dict()`` — instead of the packed export: for training checkpoints,
    which must resume exactly. (``from_pretrained`` loads those too, state included.)"""
    quantizer = getattr(model, "hf_quantizer", None)
    if not isinstance(quantizer, LTSHfQuantizer):
        yield
        return
    previous, quantizer.full_state = quantizer.full_state, True
    try:
        yield
    finally:
        quantizer.full_state = previous


def attach_quantizer(model: nn.Module) -> None:
    """Give a prepared transformers model the LTS quantizer as ``model.hf_quantizer``, as `from_pretrained`
    does for a loaded one, so that ``save_pretrained`` writes the packed export (`prepare_model` calls it)."""
    if not isinstance(getattr(model, "hf_quantizer", None), LTSHfQuantizer):
        model.hf_quantizer = LTSHfQuantizer(model.lts_config, pre_quantized=False)


def save_export(model: nn.Module, save_directory: str | os.PathLike, **kwargs: Any) -> Path:
    """``model.save_pretrained(save_directory, **kwargs)`` (the packed export), written atomically: into a
    temporary folder inside ``save_directory``, then each file moved into place with `os.replace`, so an
    interrupted export never leaves a half-written file where a good one was."""
    if isinstance(getattr(model, "hf_quantizer", None), LTSHfQuantizer) and model.hf_quantizer.full_state:
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


# -- loading ---------------------------------------------------------------------------------------------
class _Placeholder(nn.Module):
    """Stands in for a quantized layer while transformers loads the checkpoint into the skeleton.

    It holds meta buffers with exactly the keys, shapes and dtypes the file was checked to have, which the
    loader fills; the float layer it replaces is kept, unregistered, to rebuild the real layer from.
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
            owner.register_buffer(leaf, torch.empty(shape, dtype=dtype, device="meta"))


def _packed_specs(module: nn.Module, weight_bits: int, per_channel: bool) -> dict:
    specs = {
        "weight": ((packed_numel(module.weight.numel(), weight_bits),), torch.uint8),
        "weight_quantizer.scale": ((module.weight.shape[0] if per_channel else 1,), torch.float32),
        "input_quantizer.scale": ((1,), torch.float32),
        "input_quantizer.signed": ((), torch.bool),
        "input_quantizer.initialized": ((), torch.bool),
    }
    if module.bias is not None:
        specs["bias"] = (tuple(module.bias.shape), torch.float32)
    return specs


class _Header:
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

    def check(self, key: str, shape: tuple[int, ...], dtype: torch.dtype | None, why: str) -> None:
        if key not in self.tensors:
            raise LTSCheckpointError(f"The checkpoint has no tensor {key!r} ({why}): the file is incomplete.")
        found_shape, found_dtype = self.tensors[key]
        if found_shape != tuple(shape):
            raise LTSCheckpointError(
                f"Tensor {key!r} has shape {list(found_shape)} but {why} needs {list(shape)}: the file does "
                "not match its config."
            )
        if dtype is not None and found_dtype != _DTYPE_NAMES.get(dtype):
            raise LTSCheckpointError(
                f"Tensor {key!r} has dtype {found_dtype} but {why} needs {_DTYPE_NAMES.get(dtype, dtype)}."
            )


@register_quantizer("lts")
class LTSHfQuantizer(HfQuantizer):
    """Plugs LTS into ``from_pretrained``/``save_pretrained`` (registered as ``quant_method="lts"``).

    - Pre-quantized checkpoints (``config.json`` has an LTS ``quantization_config``): the packed export, or a
      training checkpoint (full state), rebuilt as described in the module docstring.
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
        self._placeholders: dict[str, tuple[str, int]] = {}  # layer -> ("packed" | "training", weight bits)

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
        header = _Header(checkpoint_files)
        packed = header.metadata.get("lts_format")
        if packed not in (None, PACKED_FORMAT):
            raise LTSCheckpointError(f"Unknown LTS checkpoint format {packed!r}: upgrade hf-lts to load it.")
        config = self.quantization_config
        plan = {name: bits for name, bits in layer_bits(model, config).items() if bits is not None}
        if packed:
            self._check_recorded_bits(header, plan)
        for name, (wbits, abits) in plan.items():
            module = model.get_submodule(name)
            if packed:
                specs = _packed_specs(module, wbits, config.per_channel)
                why = f"W{wbits}A{abits}{' per-channel' if config.per_channel else ''} {name!r}"
                for key, (shape, dtype) in specs.items():
                    header.check(f"{name}.{key}", shape, dtype, why)
            elif f"{name}.lts_state" in header.tensors:  # a training checkpoint: the layer's full state
                prefix = f"{name}."
                specs = {
                    k[len(prefix) :]: (shape, _dtype(k, d))
                    for k, (shape, d) in header.tensors.items()
                    if k.startswith(prefix)
                }
            else:
                raise LTSCheckpointError(
                    f"The checkpoint has neither packed codes nor LTS training state for layer {name!r} "
                    f"(no 'lts_format' metadata, no tensor '{name}.lts_state'): it was not saved by hf-lts."
                )
            self._placeholders[name] = ("packed" if packed else "training", wbits)
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, _Placeholder(module, specs))
        # The other tensors: transformers would only warn about a missing one, and initialise it at random.
        for key, tensor in model.state_dict().items():
            if key not in getattr(model, "all_tied_weights_keys", {}):
                header.check(key, tuple(tensor.shape), None, f"{type(model).__name__} built from config.json")
        return model

    def _check_recorded_bits(self, header: _Header, plan: dict[str, tuple[int, int]]) -> None:
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

    @torch.no_grad()
    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        if not self.pre_quantized:
            return prepare_model(model, self.quantization_config)
        loaded = {}
        for name, (kind, wbits) in self._placeholders.items():
            placeholder = model.get_submodule(name)
            tensors = dict(placeholder.state_dict())
            original = placeholder.original
            if kind == "packed":
                levels = _unpack_levels(name, tensors, wbits, tuple(original.weight.shape))
                scale = broadcast_scale(tensors["weight_quantizer.scale"], levels.ndim)
                tensors["weight"] = levels.to(scale.dtype) * scale
                tensors["lts_state"] = state.initial_state(levels)
            float_module = original.to_empty(device=tensors["weight"].device)
            float_module.weight.copy_(tensors["weight"])
            float_module.train(placeholder.training)
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, float_module)
            loaded[name] = (kind, tensors)
        self._placeholders = {}
        prepare_model(model, self.quantization_config)
        layers = quantized_layers(model)
        for name, (kind, tensors) in loaded.items():
            layer = layers[name]
            layer_state = layer.state_dict() if kind == "packed" else {}
            layer_state.update(tensors)
            layer.load_state_dict(layer_state)
        return model


def _unpack_levels(
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


def _dtype(key: str, name: str) -> torch.dtype:
    for dtype, dtype_name in _DTYPE_NAMES.items():
        if dtype_name == name:
            return dtype
    raise LTSCheckpointError(f"Tensor {key!r} has unsupported dtype {name}.")


def _bits_name(bits: tuple[int, int] | None) -> str:
    return "full precision (not quantized)" if bits is None else f"W{bits[0]}A{bits[1]}"
