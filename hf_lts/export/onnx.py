"""ONNX QDQ export of a prepared LTS model: the trained integer levels and quantizers, nothing to recalibrate.

Every quantized layer becomes, in standard ONNX:

    x ─ QuantizeLinear(s_a, z) ─ [Clip] ─ DequantizeLinear(s_a, z) ─┐
                                                                    Conv / Gemm ─ (rest of the graph)
    integer levels q (initializer) ─ DequantizeLinear(s_w, axis=0) ─┘

with the learned steps. Two forms (``weight_type``):

- ``"int8"`` (default): levels of every bit width in ``int8``, activations in ``uint8`` (zero point 0 after
  ReLU, 128 for signed levels) with an integer ``Clip`` to the trained range below 8 bits, then the
  rewrite of `hf_lts.export.onnx_int8`: batch norms folded into the per-channel steps and biases, ReLU6 and
  TensorFlow-style padding moved to where ONNX Runtime's QDQ fusion wants them. ONNX Runtime then runs
  each quantized convolution on QLinearConv (integer in and out) or, where its output stays float (a
  residual sum) or an int32 bias would not be exact enough, on ConvInteger.
- ``"native"``: the smallest ONNX integer type per bit width (`integer_type`: int2 at opset ≥ 25, int4,
  int8), batch norms left as they are, a ``Clip`` before each quantizer whose type is wider than its bit
  width: a smaller file, run on float kernels after dequantizing.

With ``quantize_attention_matmuls``, the inputs of the two attention matmuls get the same Q/DQ pair
(activation form) before each MatMul. Layers kept in fp32 stay plain float Conv/Gemm. Batch, height and width are free by default; an
architecture whose forward fixes the size is refused with a clear error (``dynamic_size=False`` exports
it at the example's size). The graph is traced by ``torch.onnx.export`` (dynamo) from a copy of the model
whose quantized layers call two small custom ops, translated to the Q/DQ nodes above. Needs the
``[onnx]`` extra.
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

from ..quantization.attention import matmul_quantizers
from ..quantization.layers import QuantLayerMixin
from ..quantization.lsq import ActivationFakeQuantizer, broadcast_scale, signed_range, unsigned_range
from . import ONNX_FILE
from .onnx_int8 import SIGNED_ZERO_POINT, to_integer_kernels
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


def default_opset(layers: dict[str, QuantLayerMixin], weight_type: str = "int8") -> int:
    """21; with native types, 25 when a layer has 2-bit weights or inputs (int2 types)."""
    if weight_type == "int8":
        return INT4_OPSET
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


def _translations(weight_type: str) -> dict:
    """ONNX translations of the two custom ops (onnxscript, traced by the exporter)."""
    import numpy as np
    from onnxscript import ir
    from onnxscript import opset21 as op

    def uint8(value: int) -> Any:
        return op.Constant(value=ir.tensor(np.array(value, dtype=np.uint8)))

    def quantize_dequantize_int8(x, scale, qmin: int, qmax: int, width: int):
        # uint8 for every bit width (zero point 128 for signed levels), the trained range by an integer clamp
        # after the quantizer: the form ONNX Runtime fuses with the layers around it.
        zero = 0 if qmin >= 0 else SIGNED_ZERO_POINT
        q = op.QuantizeLinear(x, scale, uint8(zero))
        if (qmin + zero, qmax + zero) != (0, 255):
            q = op.Clip(q, uint8(qmin + zero), uint8(qmax + zero))
        return op.DequantizeLinear(q, scale, uint8(zero))

    def quantize_dequantize_native(x, scale, qmin: int, qmax: int, width: int):
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
        torch.ops.hf_lts.quantize_dequantize.default: (
            quantize_dequantize_int8 if weight_type == "int8" else quantize_dequantize_native
        ),
        torch.ops.hf_lts.dequantize.default: dequantize_onnx,
    }


class _QDQMixin:
    """The inference form of a `QuantConv2d` / `QuantLinear`: integer levels and steps instead of latent
    weights and LTS state. A real conv/linear module otherwise (model code may read its stride, say)."""

    def _take_over(self, layer: QuantLayerMixin, opset: int, weight_type: str) -> None:
        wq, aq = layer.weight_quantizer, layer.input_quantizer
        self.weight_width = 8 if weight_type == "int8" else integer_type(wq.bits, True, opset)[1]
        self.input_width = 8 if weight_type == "int8" else integer_type(aq.bits, bool(aq.signed), opset)[1]
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


class _QDQActivation(nn.Module):
    """The inference form of an attention matmul's input quantizer (`hf_lts.quantization.attention`):
    a Q/DQ pair with the learned step."""

    def __init__(self, quantizer: ActivationFakeQuantizer, opset: int, weight_type: str) -> None:
        super().__init__()
        signed = bool(quantizer.signed)
        self.width = 8 if weight_type == "int8" else integer_type(quantizer.bits, signed, opset)[1]
        self.range = (quantizer.qmin, quantizer.qmax)
        self.register_buffer("scale", step_size(quantizer.scale).reshape(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.hf_lts.quantize_dequantize(x.float(), self.scale, *self.range, self.width)


def _qdq_layer(name: str, layer: QuantLayerMixin, opset: int, weight_type: str) -> nn.Module:
    if not isinstance(layer, (nn.Conv2d, nn.Linear)):
        raise ValueError(
            f"Layer {name!r} ({type(layer).__name__}) has no ONNX export: only quantized Conv2d and Linear "
            "layers have one."
        )
    if isinstance(layer, nn.Conv2d):
        module = _QDQConv2d(
            layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
            layer.dilation, layer.groups, bias=False, padding_mode=layer.padding_mode, device="meta",
        )  # fmt: skip
        module.register_module("input_pad", layer._modules.get("input_pad"))
    else:
        module = _QDQLinear(layer.in_features, layer.out_features, bias=False, device="meta")
    module._take_over(layer, opset, weight_type)
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


def _inference_copy(
    model: nn.Module, layers: dict[str, QuantLayerMixin], opset: int, weight_type: str
) -> nn.Module:
    """A deep copy of ``model`` with every quantized layer replaced by its `_QDQConv2d`/`_QDQLinear` (eval mode)."""
    replacements = {name: _qdq_layer(name, layer, opset, weight_type) for name, layer in layers.items()}
    try:  # swap in, copy, swap back: the copy never holds the training state
        for name, qdq in replacements.items():
            _set_submodule(model, name, qdq)
        inference = copy.deepcopy(model).eval()
    finally:
        for name, layer in layers.items():
            _set_submodule(model, name, layer)
    # torch.export mis-decomposes the reshape after SDPA's transposed output (Swin): eager attention
    # computes the same in plain matmuls and softmax (the quantized-matmul attention is eager too).
    quantizers = matmul_quantizers(inference)
    for module in quantizers.values():
        for name, quantizer in list(module.named_children()):
            setattr(module, name, _QDQActivation(quantizer, opset, weight_type))
    if isinstance(inference, PreTrainedModel) and not quantizers:
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


WEIGHT_TYPES = ("int8", "native")
#: Where `export_onnx` records its options in the file (``metadata_props``), for `refresh_onnx`.
_META_WEIGHT_TYPE, _META_DYNAMIC_SIZE = "hf_lts.weight_type", "hf_lts.dynamic_size"


def _trace(
    inference: nn.Module,
    example_inputs: tuple[torch.Tensor, ...],
    opset: int,
    weight_type: str,
    dynamic_size: bool,
) -> Any:
    """``torch.onnx.export`` of the inference copy: the batch dimension free, height and width too where
    ``dynamic_size`` (an image input, 4-D), everything else as in the example."""
    names = (
        ["pixel_values"] if len(example_inputs) == 1 else [f"input_{i}" for i in range(len(example_inputs))]
    )
    free = torch.export.Dim.DYNAMIC
    dims = tuple(
        {0: free, 2: free, 3: free} if dynamic_size and x.ndim == 4 else {0: free} for x in example_inputs
    )
    with _quiet_exporter():
        return torch.onnx.export(
            _Logits(inference).eval(),
            example_inputs,
            dynamo=True,
            opset_version=min(opset, EXPORTER_MAX_OPSET),
            input_names=names,
            output_names=["logits"],
            dynamic_shapes=(dims,),
            custom_translation_table=_translations(weight_type),
            verbose=False,
        ).model_proto


def _fixed_size_error(example_inputs: tuple[torch.Tensor, ...]) -> ValueError:
    size = "×".join(str(d) for d in example_inputs[0].shape[2:])
    return ValueError(
        "This model's architecture fixes its input's height and width (its forward computes with them as "
        "Python numbers: transformers' MobileNetV2 with tf_padding=True, say), so the ONNX graph cannot take "
        f"any size: pass dynamic_size=False to export it for the example's size ({size})."
    )


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    example_inputs: torch.Tensor | tuple[torch.Tensor, ...] | None = None,
    opset: int | None = None,
    *,
    weight_type: str = "int8",
    dynamic_size: bool = True,
) -> Path:
    """Write a prepared LTS model as an ONNX QDQ model (see the module docstring) and return its path.

    ``path`` ending in ``.onnx`` is the file; anything else is a folder (an export folder, typically) that
    receives ``model.onnx``. The batch dimension is free, and so are height and width (``dynamic_size``);
    ``example_inputs`` (default: two zero images of the config's size) only sets what the graph fixes:
    channels, and the size where ``dynamic_size=False``. ``weight_type="int8"`` (default) stores every bit
    width's levels in ``int8`` and activations in ``uint8``, with batch norms folded, the form that ONNX
    Runtime runs on its integer kernels; ``"native"`` keeps the smallest ONNX type per bit width (int2/int4)
    and unfolded batch norms: a smaller file that runs on float kernels. ``opset`` defaults to 21 (25 for
    native 2-bit types). The file is checked with ``onnx.checker`` and written atomically.
    """
    if weight_type not in WEIGHT_TYPES:
        raise ValueError(f"weight_type must be one of {WEIGHT_TYPES}, not {weight_type!r}.")
    layers = checked_layers(model)
    onnx = require_onnx()
    for name, layer in layers.items():
        if not bool(layer.input_quantizer.initialized):
            raise ValueError(
                f"Layer {name!r} has not seen data yet (its activation step is not initialised): train the "
                "model, or run one batch through it in train mode, before exporting."
            )
    for name, quantizers in matmul_quantizers(model).items():
        if not all(bool(q.initialized) for q in quantizers.children()):
            raise ValueError(
                f"The attention matmul quantizers {name!r} have not seen data yet: train the model, or run one "
                "batch through it in train mode, before exporting."
            )
    opset = default_opset(layers, weight_type) if opset is None else opset
    if opset < MIN_OPSET:
        raise ValueError(f"opset {opset} is too old: torch.onnx.export writes opset {MIN_OPSET} or newer.")
    if weight_type == "int8" and opset < INT4_OPSET:
        raise ValueError(
            f"opset {opset} is too old for the int8 form: it is written with opset-{INT4_OPSET} "
            f"QuantizeLinear/DequantizeLinear; pass opset={INT4_OPSET} or newer (or opset=None)."
        )
    inference = _inference_copy(model, layers, opset, weight_type)
    if example_inputs is None:
        example_inputs = _default_inputs(model)
    elif isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    example_inputs = tuple(x.to(next(inference.buffers()).device) for x in example_inputs)
    if dynamic_size and getattr(getattr(model, "config", None), "tf_padding", False):
        # Its padding is computed from the input size as Python numbers: torch.export bakes the example's
        # into the graph without a guard that fails, so the graph would run at any size, wrongly.
        raise _fixed_size_error(example_inputs)
    try:
        proto = _trace(inference, example_inputs, opset, weight_type, dynamic_size)
    except Exception:
        if not dynamic_size:
            raise
        _trace(inference, example_inputs, opset, weight_type, False)  # fails alike: not a matter of size
        raise _fixed_size_error(example_inputs) from None
    if dynamic_size and any(
        d.HasField("dim_value") for i in proto.graph.input for d in i.type.tensor_type.shape.dim[2:]
    ):
        raise _fixed_size_error(example_inputs)
    _finalize(proto)
    if opset > EXPORTER_MAX_OPSET:
        proto = onnx.version_converter.convert_version(proto, opset)
    if weight_type == "int8":
        to_integer_kernels(proto)
    proto.producer_name = "hf-lts"
    onnx.helper.set_model_props(
        proto, {_META_WEIGHT_TYPE: weight_type, _META_DYNAMIC_SIZE: str(dynamic_size).lower()}
    )
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
    """Export ``model`` again over the ONNX file at ``path``, with that file's input shapes, opset and
    options: so that a ``model.onnx`` never lags behind the packed weights saved beside it."""
    onnx = require_onnx()
    previous = onnx.load(path, load_external_data=False)
    meta = {p.key: p.value for p in previous.metadata_props}
    size = getattr(getattr(model, "config", None), "image_size", None) or 224  # for free dimensions
    example = tuple(
        torch.zeros([2, *(d.dim_value or size for d in i.type.tensor_type.shape.dim[1:])])
        for i in previous.graph.input
    )
    opset = next(o.version for o in previous.opset_import if o.domain in ("", "ai.onnx"))
    return export_onnx(
        model,
        path,
        example_inputs=example,
        opset=opset,
        weight_type=meta.get(_META_WEIGHT_TYPE, "native"),  # files without it predate the int8 form
        dynamic_size=meta.get(_META_DYNAMIC_SIZE) == "true",
    )
