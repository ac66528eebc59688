"""ONNX QDQ export of a prepared LTS model: the trained integer levels and quantizers, nothing to recalibrate.

Every quantized layer becomes, in standard ONNX:

    x ─ [Clip] ─ QuantizeLinear(s_a, 0) ─ DequantizeLinear(s_a, 0) ─┐
                                                                    Conv / Gemm ─ (rest of the graph)
    integer levels q (initializer) ─ DequantizeLinear(s_w, axis=0) ─┘

with the learned steps (per tensor, or per output channel for the weights), zero points 0, unsigned
activation types after ReLU and signed ones otherwise, and the smallest integer type that the opset and
ONNX Runtime support for the bit width (`integer_type`): 2-bit → int2/uint2 (opset ≥ 25), 3/4-bit (and
2-bit at opset 21-24) → int4/uint4, 5- to 8-bit → int8/uint8. Where the type is wider than the bit width
(3-bit in int4, say) a ``Clip`` to ``[Qn·s_a, Qp·s_a]`` before the ``QuantizeLinear`` gives exactly the
trained range. Layers kept in fp32 stay plain float Conv/Gemm. ONNX Runtime computes the same levels as
PyTorch; only the float accumulation order differs.

The graph is traced by ``torch.onnx.export`` (dynamo) from a copy of the model whose quantized layers call
two small custom ops, translated to the Q/DQ nodes above; the ``torch.onnx`` optimizer keeps Q/DQ nodes,
so batch norms stay separate from the dequantized weights. Needs the ``[onnx]`` extra.
"""

from __future__ import annotations

import copy
import logging
import os
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from ..quantization.layers import QuantLayerMixin
from ..quantization.lsq import broadcast_scale, signed_range, unsigned_range
from . import ONNX_FILE
from .packed import checked_layers, export_levels, step_size

#: Q/DQ of int4/uint4 came with opset 21, of int2/uint2 with opset 25 (ONNX Runtime runs both).
INT4_OPSET, INT2_OPSET = 21, 25
#: The oldest opset ``torch.onnx.export`` writes, and the newest it writes directly (newer: converted).
MIN_OPSET, EXPORTER_MAX_OPSET = 18, 23
_EXTRA = "pip install 'hf-lts[onnx]'"
# ONNX TensorProto data types (fixed by the ONNX spec).
_TYPES = {("int", 8): 3, ("uint", 8): 2, ("int", 4): 22, ("uint", 4): 21, ("int", 2): 26, ("uint", 2): 25}


def integer_type(bits: int, signed: bool, opset: int) -> tuple[str, int]:
    """``(name, width)`` of the smallest ONNX integer type holding ``bits``-bit levels at ``opset``,
    e.g. ``("uint4", 4)`` for unsigned 3-bit activations at opset 21."""
    width = 2 if bits <= 2 and opset >= INT2_OPSET else 4 if bits <= 4 else 8
    if width < 8 and opset < INT4_OPSET:
        raise ValueError(
            f"opset {opset} is too old for {bits}-bit levels: int4/uint4 QuantizeLinear needs opset ≥ "
            f"{INT4_OPSET}; pass opset={INT4_OPSET} or newer (or opset=None)."
        )
    return f"{'' if signed else 'u'}int{width}", width


def default_opset(layers: dict[str, QuantLayerMixin]) -> int:
    """Opset 25 when a layer has 2-bit weights or inputs (int2 types), else 21 (int4, int8)."""
    bits = {b for layer in layers.values() for b in (layer.weight_quantizer.bits, layer.input_quantizer.bits)}
    return INT2_OPSET if min(bits) <= 2 else INT4_OPSET


# -- the custom ops the traced copy calls -------------------------------------------------------------------
@torch.library.custom_op("hf_lts::quantize_dequantize", mutates_args=())
def quantize_dequantize(
    x: torch.Tensor, scale: torch.Tensor, qmin: int, qmax: int, width: int
) -> torch.Tensor:
    """``clamp(round(x / s), qmin, qmax) · s`` as the training forward computes it; in ONNX, Q/DQ of a
    ``width``-bit type (signed iff ``qmin < 0``)."""
    return torch.clamp(torch.round(x * torch.reciprocal(scale)), qmin, qmax) * scale


@quantize_dequantize.register_fake
def _(x: torch.Tensor, scale: torch.Tensor, qmin: int, qmax: int, width: int) -> torch.Tensor:
    return torch.empty_like(x)


@torch.library.custom_op("hf_lts::dequantize", mutates_args=())
def dequantize(levels: torch.Tensor, scale: torch.Tensor, width: int) -> torch.Tensor:
    """``q · s`` of ``int8``-held signed levels (per-tensor ``[]`` or per-output-channel ``[C]`` step); in
    ONNX, a DequantizeLinear of a signed ``width``-bit integer initializer."""
    return levels.float() * broadcast_scale(scale.reshape(-1), levels.ndim)


@dequantize.register_fake
def _(levels: torch.Tensor, scale: torch.Tensor, width: int) -> torch.Tensor:
    return torch.empty(levels.shape, dtype=torch.float32, device=levels.device)


def _translations() -> dict:
    """ONNX translations of the two custom ops (onnxscript, traced by the exporter)."""
    import numpy as np
    from onnxscript import ir
    from onnxscript import opset21 as op

    def quantize_dequantize_onnx(x, scale, qmin: int, qmax: int, width: int):
        lo, hi = signed_range(width) if qmin < 0 else unsigned_range(width)
        if (lo, hi) != (qmin, qmax):  # a type wider than the bit width: clip to the trained range first
            x = op.Clip(
                x, op.Mul(scale, op.Constant(value_float=qmin)), op.Mul(scale, op.Constant(value_float=qmax))
            )
        if width == 8:  # int8/uint8: a zero point names the type (any opset)
            zero_point = op.Constant(value=ir.tensor(np.zeros((), dtype=np.int8 if qmin < 0 else np.uint8)))
            return op.DequantizeLinear(op.QuantizeLinear(x, scale, zero_point), scale, zero_point)
        # Narrower types: no zero point (0 by default) but output_dtype (opset >= 21). ONNX Runtime 1.32's
        # Clip+QuantizeLinear fusion fails on an int4/int2 zero point (after ReLU6, say).
        to = _TYPES[("int" if qmin < 0 else "uint", width)]
        return op.DequantizeLinear(op.QuantizeLinear(x, scale, output_dtype=to), scale)

    def dequantize_onnx(levels, scale, width: int):
        return op.DequantizeLinear(op.Cast(levels, to=_TYPES[("int", width)]), scale, axis=0)

    return {
        torch.ops.hf_lts.quantize_dequantize.default: quantize_dequantize_onnx,
        torch.ops.hf_lts.dequantize.default: dequantize_onnx,
    }


class _QDQMixin:
    """The inference form of a `QuantConv2d` / `QuantLinear`: integer levels and steps instead of latent
    weights and LTS state. A real conv/linear module otherwise (model code may read its stride, say)."""

    def _take_over(self, layer: QuantLayerMixin, opset: int) -> None:
        wq, aq = layer.weight_quantizer, layer.input_quantizer
        _, self.weight_width = integer_type(wq.bits, True, opset)
        _, self.input_width = integer_type(aq.bits, bool(aq.signed), opset)
        self.input_range = (aq.qmin, aq.qmax)
        del self.weight
        scale = step_size(wq.scale)
        self.register_buffer("levels", export_levels(layer).to(torch.int8))
        self.register_buffer("weight_scale", scale.reshape(()) if scale.numel() == 1 else scale.clone())
        self.register_buffer("input_scale", step_size(aq.scale).reshape(()))
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone())

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight, for model code that reads a layer's weight (ViT: its dtype)."""
        return torch.ops.hf_lts.dequantize(self.levels, self.weight_scale, self.weight_width)

    def _quantized(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.ops.hf_lts.quantize_dequantize(
            x.float(), self.input_scale, *self.input_range, self.input_width
        )
        return x, torch.ops.hf_lts.dequantize(self.levels, self.weight_scale, self.weight_width)


class _QDQConv2d(_QDQMixin, nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad = self._modules.get("input_pad")  # as the QuantConv2d's (`hf_lts.quantization.padding`)
        if pad is not None:
            x = pad(x)
        return self._conv_forward(*self._quantized(x), self.bias)


class _QDQLinear(_QDQMixin, nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(*self._quantized(x), self.bias)


def _qdq_layer(layer: QuantLayerMixin, opset: int) -> nn.Module:
    if isinstance(layer, nn.Conv2d):
        module = _QDQConv2d(
            layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
            layer.dilation, layer.groups, bias=False, padding_mode=layer.padding_mode, device="meta",
        )  # fmt: skip
        module.register_module("input_pad", layer._modules.get("input_pad"))
    else:
        module = _QDQLinear(layer.in_features, layer.out_features, bias=False, device="meta")
    module._take_over(layer, opset)
    return module


class _Logits(nn.Module):
    """The model's logits as a plain tensor (transformers models return a `ModelOutput`)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        out = self.model(*inputs)
        if hasattr(out, "logits"):
            return out.logits
        return out[0] if isinstance(out, (tuple, list)) else out


def _inference_copy(model: nn.Module, layers: dict[str, QuantLayerMixin], opset: int) -> nn.Module:
    """A deep copy of ``model`` with every quantized layer replaced by its `_QDQConv2d`/`_QDQLinear` (eval mode)."""
    replacements = {name: _qdq_layer(layer, opset) for name, layer in layers.items()}
    try:  # swap in, copy, swap back: the copy never holds the training state
        for name, qdq in replacements.items():
            _set_submodule(model, name, qdq)
        inference = copy.deepcopy(model).eval()
    finally:
        for name, layer in layers.items():
            _set_submodule(model, name, layer)
    # torch.export mis-decomposes the reshape after SDPA's transposed output (Swin): eager attention
    # computes the same in plain matmuls and softmax.
    if isinstance(inference, PreTrainedModel):
        inference.set_attn_implementation("eager")
    return inference


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


def require_onnx() -> Any:
    """The ``onnx`` module, or an `ImportError` that says how to install the ``[onnx]`` extra."""
    try:
        import onnx
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise ImportError(f"ONNX export needs the optional dependency {e.name!r}: {_EXTRA}") from e
    return onnx


@contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence what ``torch.onnx.export`` says about things that do not concern this export: the
    torchvision ops it cannot register (hf-lts does not use torchvision) and a deprecation inside torch."""
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*LeafSpec", category=FutureWarning)
            yield
    finally:
        registration.setLevel(level)


def _default_inputs(model: nn.Module) -> tuple[torch.Tensor, ...]:
    """Two images of the size the config names (224 when it names none): batch 2 keeps the batch
    dimension symbolic in the traced graph."""
    config = getattr(model, "config", None)
    size = getattr(config, "image_size", None) or 224
    channels = getattr(config, "num_channels", None) or 3
    return (torch.zeros(2, channels, size, size),)


def _finalize(proto: Any) -> None:
    """Turn every ``Cast`` of an integer initializer (the levels, int8 in PyTorch) into an initializer of
    the cast's type, so the file stores int4/int2 weights, not int8 ones and a Cast; drop the exporter's
    per-node metadata (stack traces with local paths, most of the file's bytes)."""
    from onnx import helper, numpy_helper

    graph = proto.graph
    inits = {t.name: t for t in graph.initializer}
    for node in list(graph.node):
        if node.op_type != "Cast" or node.input[0] not in inits:
            continue
        source = numpy_helper.to_array(inits[node.input[0]])
        to = next(a.i for a in node.attribute if a.name == "to")
        graph.initializer.append(
            helper.make_tensor(node.output[0], to, source.shape, source.astype("int64").ravel().tolist())
        )
        graph.node.remove(node)
    # The exporter's debugging metadata: stack traces with local paths, most of a small model's bytes.
    for item in (
        proto,
        graph,
        *graph.node,
        *graph.value_info,
        *graph.initializer,
        *graph.input,
        *graph.output,
    ):
        del item.metadata_props[:]
        item.doc_string = ""
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    for init in list(graph.initializer):
        if init.name not in used:
            graph.initializer.remove(init)


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    example_inputs: torch.Tensor | tuple[torch.Tensor, ...] | None = None,
    opset: int | None = None,
) -> Path:
    """Write a prepared LTS model as an ONNX QDQ model (see the module docstring) and return its path.

    ``path`` ending in ``.onnx`` is the file; anything else is a folder (an export folder, typically) that
    receives ``model.onnx``. ``example_inputs`` (default: two zero images of the config's size) only fix
    the traced shapes; the batch dimension stays dynamic. ``opset`` defaults to 25 when a layer has 2 bits
    (int2), else 21. The file is checked with ``onnx.checker`` and written atomically.
    """
    layers = checked_layers(model)
    onnx = require_onnx()
    for name, layer in layers.items():
        if not bool(layer.input_quantizer.initialized):
            raise ValueError(
                f"Layer {name!r} has not seen data yet (its activation step is not initialised): train the "
                "model, or run one batch through it in train mode, before exporting."
            )
    opset = default_opset(layers) if opset is None else opset
    if opset < MIN_OPSET:
        raise ValueError(f"opset {opset} is too old: torch.onnx.export writes opset {MIN_OPSET} or newer.")
    inference = _inference_copy(model, layers, opset)
    if example_inputs is None:
        example_inputs = _default_inputs(model)
    elif isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    example_inputs = tuple(x.to(next(inference.buffers()).device) for x in example_inputs)
    names = (
        ["pixel_values"] if len(example_inputs) == 1 else [f"input_{i}" for i in range(len(example_inputs))]
    )
    with _quiet_exporter():
        program = torch.onnx.export(
            _Logits(inference).eval(),
            example_inputs,
            dynamo=True,
            opset_version=min(opset, EXPORTER_MAX_OPSET),
            input_names=names,
            output_names=["logits"],
            dynamic_shapes=(tuple({0: torch.export.Dim.DYNAMIC} for _ in example_inputs),),
            custom_translation_table=_translations(),
            verbose=False,
        )
    proto = program.model_proto
    _finalize(proto)
    if opset > EXPORTER_MAX_OPSET:
        proto = onnx.version_converter.convert_version(proto, opset)
    proto.producer_name = "hf-lts"
    onnx.checker.check_model(proto, full_check=True)
    target = Path(path)
    if target.suffix != ".onnx":
        target = target / ONNX_FILE
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, staging = tempfile.mkstemp(prefix=".tmp-", suffix=".onnx", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(proto.SerializeToString())
        os.replace(staging, target)
    finally:
        if os.path.exists(staging):
            os.remove(staging)
    return target


def refresh_onnx(model: nn.Module, path: str | os.PathLike) -> Path:
    """Export ``model`` again over the ONNX file at ``path``, with that file's input shapes and opset: so
    that a ``model.onnx`` never lags behind the packed weights saved beside it."""
    onnx = require_onnx()
    previous = onnx.load(path, load_external_data=False)
    example = tuple(
        torch.zeros([2, *(d.dim_value or 1 for d in i.type.tensor_type.shape.dim[1:])])
        for i in previous.graph.input
    )
    opset = next(o.version for o in previous.opset_import if o.domain in ("", "ai.onnx"))
    return export_onnx(model, path, example_inputs=example, opset=opset)
