"""The ONNX graph rewrite that lets ONNX Runtime run an hf-lts QDQ export on its integer kernels.

ONNX Runtime's CPU provider fuses ``DequantizeLinear → Conv/Gemm → QuantizeLinear`` into QLinearConv /
QGemm only where the pattern is plain: 8-bit types, nothing float between the operator and the next
quantizer, the bias as an ``int32`` DequantizeLinear at scale ``s_x · s_w``. The traced graph has batch
norms, ReLU6 ``Clip`` nodes and float biases there. This pass, on the traced graph (integer levels already
in ``int8`` initializers, activations already ``uint8`` Q → [integer Clip] → DQ):

1. folds every eval-mode BatchNormalization that follows a quantized convolution into it: its scale
   ``f = γ / sqrt(var + ε)`` multiplies the per-output-channel weight step (``|f|``, with the channel's
   levels negated where ``f < 0``), its shift goes into the bias. The levels stay the trained integers
   (negated at most). A negated level must fit ``int8``: below 8 bits it always does (``[-2^(b-1),
   2^(b-1) - 1]`` negated lies inside ``[-127, 128)``); at 8 bits a channel with ``f < 0`` and a level of
   -128 keeps its levels and takes the negative step ``s_w · f`` instead (ONNX Runtime computes it
   exactly as well);
2. turns ``Clip(0, hi) → QuantizeLinear`` (ReLU6) into ``Relu → QuantizeLinear`` and moves ``hi`` into the
   integer clamp after the quantizer (``min(round(min(x, hi) / s), Qp) = min(round(x / s), round(hi / s),
   Qp)``), since ONNX Runtime drops a ``Relu`` before a zero-point-0 quantizer but not such a ``Clip``;
3. gives every convolution and linear layer whose output goes straight to a quantizer (possibly through
   a ``Relu``) an ``int32`` bias, so the group fuses into QLinearConv / QGemm (integer in, integer out);
4. computes the others — outputs that stay float for the rest of the graph (a residual sum, the logits,
   a pooling) — as ``ConvInteger`` (exact ``int32`` accumulation), ``Cast``, ``Mul`` by ``s_x · s_w`` and
   ``Add`` of the float bias: exact, still integer arithmetic, and without a float copy of the weights.

Everything is exact up to float rounding: the only new rounding is the ``int32`` bias, ``round(b /
(s_x · s_w))``, off by at most half an accumulator unit.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np

#: Zero point of the ``uint8`` activations: 0 for unsigned levels, 128 for signed ones.
SIGNED_ZERO_POINT = 128
#: The most that the int32 bias's rounding may move a fused layer's pre-activation, in output steps: a
#: value then takes the neighbouring level only within this distance of a rounding boundary (≤ 0.2 % of
#: values), the order of float accumulation-order differences' effect.
BIAS_TOLERANCE = 1e-3


class _Graph:
    """Lookup tables over a ``GraphProto`` (producers, consumers, constants), rebuilt on demand."""

    def __init__(self, graph: Any) -> None:
        from onnx import numpy_helper

        self.graph, self._to_array = graph, numpy_helper.to_array
        self.refresh()

    def refresh(self) -> None:
        self.inits = {t.name: t for t in self.graph.initializer}
        self.producer = {o: n for n in self.graph.node for o in n.output}
        self.consumers: dict[str, list[Any]] = defaultdict(list)
        for node in self.graph.node:
            for name in node.input:
                self.consumers[name].append(node)
        self.outputs = {o.name for o in self.graph.output}
        self._fresh = 0

    def const(self, name: str) -> np.ndarray | None:
        """The value of an initializer or a ``Constant`` node's output, else None."""
        if name in self.inits:
            return self._to_array(self.inits[name])
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant":
            return next((self._to_array(a.t) for a in node.attribute if a.name == "value"), None)
        return None

    def add_init(self, array: np.ndarray, hint: str) -> str:
        from onnx import numpy_helper

        name = f"{hint}_{len(self.graph.initializer)}_{self._fresh}"
        self._fresh += 1
        self.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        self.inits[name] = self.graph.initializer[-1]
        return name

    def only_consumer(self, name: str) -> Any | None:
        users = self.consumers.get(name, [])
        return users[0] if len(users) == 1 and name not in self.outputs else None


def _attr(node: Any, name: str, default: Any) -> Any:
    from onnx import helper

    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def _weight_dq(g: _Graph, node: Any) -> Any | None:
    """The DequantizeLinear of int8 levels that feeds ``node``'s weight, if it is a quantized layer."""
    if node.op_type not in ("Conv", "Gemm") or len(node.input) < 2:
        return None
    dq = g.producer.get(node.input[1])
    if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in g.inits:
        return None
    return dq if g.const(dq.input[0]).dtype == np.int8 else None


class _Layer:
    """A quantized Conv/Gemm: its int8 levels, per-output-channel step (float64) and float bias."""

    def __init__(self, g: _Graph, node: Any, dq: Any) -> None:
        self.node, self.dq = node, dq
        self.levels = g.const(dq.input[0]).astype(np.int32)
        channels = self.levels.shape[0]
        self.scale = np.broadcast_to(g.const(dq.input[1]).astype(np.float64).reshape(-1), (channels,)).copy()
        bias = g.const(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        self.bias = np.zeros(channels) if bias is None else bias.astype(np.float64)


def _fold_batch_norm(g: _Graph, layer: _Layer) -> None:
    """Fold the BatchNormalization that alone consumes a quantized Conv's output into its step and bias."""
    bn = g.only_consumer(layer.node.output[0])
    if layer.node.op_type != "Conv" or bn is None or bn.op_type != "BatchNormalization":
        return
    params = [g.const(name) for name in bn.input[1:5]]
    if any(p is None for p in params) or len(bn.output) != 1:
        return
    gamma, beta, mean, var = (p.astype(np.float64) for p in params)
    factor = gamma / np.sqrt(var + _attr(bn, "epsilon", 1e-5))
    layer.bias = (layer.bias - mean) * factor + beta
    flat = layer.levels.reshape(len(factor), -1)
    negate = (factor < 0) & (flat.min(axis=1) > -128)  # -(-128) does not fit int8: keep a negative step
    flat[negate] *= -1
    layer.scale = layer.scale * np.where(negate, -factor, factor)
    layer.node.output[0] = bn.output[0]
    g.graph.node.remove(bn)


def _pad_after_quantizer(g: _Graph) -> None:
    """``Pad(x, 0) → QuantizeLinear`` → ``QuantizeLinear → Pad(q, zero point)`` (the same integers, as 0
    quantizes to the zero point): transformers' MobileNetV2 with ``tf_padding`` pads before each
    convolution, which would otherwise sit between the previous layer and its quantizer."""
    for pad in [n for n in g.graph.node if n.op_type == "Pad"]:
        quantize = g.only_consumer(pad.output[0])
        value = g.const(pad.input[2]) if len(pad.input) > 2 and pad.input[2] else np.zeros(())
        if (
            quantize is None
            or quantize.op_type != "QuantizeLinear"
            or _attr(pad, "mode", b"constant") != b"constant"
            or value is None
            or float(value.item()) != 0.0
            or _zero_point(g, quantize) is None
        ):
            continue
        zero = g.add_init(np.array(_zero_point(g, quantize), np.uint8), "pad_value")
        padded, quantized = pad.output[0], quantize.output[0]
        quantize.input[0] = pad.input[0]
        pad.input[0] = quantized
        while len(pad.input) < 3:
            pad.input.append("")
        pad.input[2] = zero
        for user in g.consumers.get(quantized, []):
            user.input[:] = [padded if name == quantized else name for name in user.input]
        nodes = list(g.graph.node)  # the Pad after its quantizer, in topological order
        g.graph.node.remove(pad)
        g.graph.node.insert(nodes.index(quantize), pad)
        g.refresh()


def _relu6_into_integer_clamp(g: _Graph) -> None:
    """``Clip(0, hi)`` read only by zero-point-0 uint8 quantizers → ``Relu``, ``hi`` into their clamps."""
    from onnx import helper

    for clip in [n for n in g.graph.node if n.op_type == "Clip"]:
        bounds = [g.const(name) if name else None for name in clip.input[1:3]]
        users = g.consumers.get(clip.output[0], [])
        if (
            len(bounds) != 2
            or bounds[0] is None
            or float(bounds[0].item()) != 0.0
            or bounds[1] is None
            or clip.output[0] in g.outputs
            or not users
            or any(u.op_type != "QuantizeLinear" or _zero_point(g, u) != 0 for u in users)
        ):
            continue
        for quantize in users:
            scale = np.float32(g.const(quantize.input[1]).item())
            top = int(
                np.round(np.float32(bounds[1].item()) * (np.float32(1) / scale))
            )  # as PyTorch rounds it
            _clamp_after(g, quantize, min(top, 255))
        relu = helper.make_node("Relu", [clip.input[0]], [clip.output[0]], name=f"{clip.name}_relu")
        index = list(g.graph.node).index(clip)
        g.graph.node.remove(clip)
        g.graph.node.insert(index, relu)
        g.refresh()


def _zero_point(g: _Graph, quantize: Any) -> int | None:
    if len(quantize.input) < 3 or not quantize.input[2]:
        return None
    value = g.const(quantize.input[2])
    return None if value is None or value.dtype != np.uint8 else int(value.item())


def _clamp_after(g: _Graph, quantize: Any, top: int) -> None:
    """Lower the integer clamp's upper bound after ``quantize`` to ``top`` (insert the clamp if none)."""
    from onnx import helper

    users = g.consumers.get(quantize.output[0], [])
    if len(users) == 1 and users[0].op_type == "Clip":
        clip = users[0]
        current = int(g.const(clip.input[2]).item())
        if top < current:
            clip.input[2] = g.add_init(np.array(top, np.uint8), "clamp_max")
        return
    clamped = f"{quantize.output[0]}_clamped"
    low = g.add_init(np.array(0, np.uint8), "clamp_min")
    high = g.add_init(np.array(top, np.uint8), "clamp_max")
    for user in users:
        for i, name in enumerate(user.input):
            if name == quantize.output[0]:
                user.input[i] = clamped
    index = list(g.graph.node).index(quantize) + 1
    g.graph.node.insert(index, helper.make_node("Clip", [quantize.output[0], low, high], [clamped]))
    g.refresh()


def _next_quantizer(g: _Graph, output: str) -> Any | None:
    """The one QuantizeLinear that ``output`` goes to, directly or through one Relu (what ORT fuses)."""
    user = g.only_consumer(output)
    if user is not None and user.op_type == "Relu":
        user = g.only_consumer(user.output[0])
    return user if user is not None and user.op_type == "QuantizeLinear" else None


def _input_quantizer(g: _Graph, node: Any) -> tuple[float, Any] | None:
    """``(s_x, DequantizeLinear)`` of the layer's activation input, if it is one."""
    dq = g.producer.get(node.input[0])
    if dq is None or dq.op_type != "DequantizeLinear":
        return None
    return float(g.const(dq.input[1]).item()), dq


def _spread(layer: _Layer, input_scale: float, input_top: int) -> tuple[np.ndarray, np.ndarray] | None:
    """``(k · q, s / k)`` per output channel, ``k`` the largest integer (1 at least) with ``k · |q| ≤ 127``, ``2 ·
    input_top · k · |q| ≤ 32767`` and an int32 bias at ``s_x · s / k``: the same weights, but an accumulator
    unit that makes the bias's rounding ``k`` times smaller (at low bits ``s_x · s`` is not small beside the
    output step). The second bound keeps AVX2's u8·s8 pair sums (VPMADDUBSW, no VNNI) from saturating.
    None where even ``k = 1`` overflows the bias (a step near zero: a dead channel, say)."""
    flat = layer.levels.reshape(len(layer.scale), -1)
    top = np.maximum(np.abs(flat).max(axis=1), 1)
    units = np.abs(layer.bias) / (input_scale * layer.scale)
    room = np.floor((2**31 - 2**8) / np.maximum(units, 1e-30))
    k = np.minimum(
        np.maximum(min(127, 32767 // (2 * max(input_top, 1))) // top, 1), room
    )  # 1: -128 at 8 bits
    if not (k >= 1).all():
        return None
    k = k.astype(np.int64)
    levels = (flat * k[:, None]).reshape(layer.levels.shape)
    return levels, (layer.scale / k).astype(np.float32)


def _input_top(g: _Graph, dq: Any) -> int:
    """The largest uint8 value a layer's input takes: its integer clamp's bound, else 255."""
    clip = g.producer.get(dq.input[0])
    return int(g.const(clip.input[2]).item()) if clip is not None and clip.op_type == "Clip" else 255


def _write_fused(g: _Graph, layer: _Layer, input_scale: float, input_top: int, output_scale: float) -> bool:
    """Levels, step and an int32 bias at ``s_x · s_w``, as the QDQ fusion wants them; False (and nothing
    written) where the bias does not fit int32 (a step near zero: a dead channel, say) or where its rounding
    would move a pre-activation by more than `BIAS_TOLERANCE` of the output step ``output_scale`` (the
    ConvInteger form is exact there)."""
    node, dq = layer.node, layer.dq
    spread = _spread(layer, input_scale, input_top)
    if spread is None:
        return False
    levels, scale = spread
    bias_scale = np.float32(input_scale) * scale
    bias = np.round(layer.bias / bias_scale.astype(np.float64))
    error = np.abs(bias * bias_scale - layer.bias).max(initial=0) / output_scale
    if error > BIAS_TOLERANCE:
        return False
    dq.input[0] = g.add_init(levels.astype(np.int8), "levels")
    dq.input[1] = g.add_init(scale, "weight_scale")
    del dq.input[2:]
    dq.attribute.clear()
    dq.attribute.append(_axis(0))
    from onnx import helper

    bias_dq = helper.make_node(
        "DequantizeLinear",
        [g.add_init(bias.astype(np.int32), "bias"), g.add_init(bias_scale, "bias_scale")],
        [f"{node.output[0]}_bias"],
        axis=0,
    )
    g.graph.node.insert(list(g.graph.node).index(node), bias_dq)
    del node.input[2:]
    node.input.append(bias_dq.output[0])
    return True


def _axis(value: int) -> Any:
    from onnx import helper

    return helper.make_attribute("axis", value)


def _write_conv_integer(g: _Graph, layer: _Layer, input_scale: float, input_dq: Any) -> None:
    """A float-output convolution as ``ConvInteger → Cast → Mul(s_x · s_w) → Add(bias)``: uint8 levels with
    zero point 128 (the U8U8 kernel, as fast here as the U8S8 one and free of its saturation)."""
    from onnx import TensorProto, helper

    node, out = layer.node, layer.node.output[0]
    channels = len(layer.scale)
    weights = g.add_init((layer.levels + 128).astype(np.uint8), "levels_u8")
    weight_zero = g.add_init(np.array(128, np.uint8), "levels_zero_point")
    attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    nodes = [
        helper.make_node(
            "ConvInteger",
            [input_dq.input[0], weights, input_dq.input[2], weight_zero],
            [f"{out}_acc"],
            name=f"{node.name}_integer",
            **attributes,
        ),  # fmt: skip
        helper.make_node("Cast", [f"{out}_acc"], [f"{out}_accf"], to=TensorProto.FLOAT),
        helper.make_node(
            "Mul",
            [
                f"{out}_accf",
                g.add_init((input_scale * layer.scale).astype(np.float32).reshape(1, channels, 1, 1), "mul"),
            ],
            [f"{out}_scaled"],
        ),
        helper.make_node(
            "Add",
            [f"{out}_scaled", g.add_init(layer.bias.astype(np.float32).reshape(1, channels, 1, 1), "add")],
            [out],
        ),
    ]
    index = list(g.graph.node).index(node)
    g.graph.node.remove(node)
    for i, new in enumerate(nodes):
        g.graph.node.insert(index + i, new)


def to_integer_kernels(proto: Any) -> None:
    """Rewrite ``proto`` (an hf-lts QDQ export with int8 levels, uint8 activations) in place, see above."""
    del proto.graph.value_info[:]  # the exporter's intermediate types: some change here (a Pad's, say)
    g = _Graph(proto.graph)
    layers = [_Layer(g, n, dq) for n in list(g.graph.node) if (dq := _weight_dq(g, n)) is not None]
    for layer in layers:
        _fold_batch_norm(g, layer)
    g.refresh()
    _pad_after_quantizer(g)
    _relu6_into_integer_clamp(g)
    for layer in layers:
        quantized_input = _input_quantizer(g, layer.node)
        if quantized_input is None:
            raise ValueError(f"{layer.node.name!r} has quantized weights but no quantized input")
        input_scale, input_dq = quantized_input
        quantize = _next_quantizer(g, layer.node.output[0])
        output_scale = float(g.const(quantize.input[1]).item()) if quantize is not None else np.inf
        fused = layer.node.op_type == "Gemm" or quantize is not None
        if not (fused and _write_fused(g, layer, input_scale, _input_top(g, input_dq), output_scale)):
            if layer.node.op_type == "Gemm":
                raise ValueError(
                    f"The bias of {layer.node.name!r} does not fit int32 at the scale input step × weight "
                    "step (a step near zero): export with weight_type='native'."
                )
            _write_conv_integer(g, layer, input_scale, input_dq)
        g.refresh()
    while dead := [
        n for n in g.graph.node if not any(g.consumers.get(o) or o in g.outputs for o in n.output)
    ]:
        for node in dead:  # the activations' DequantizeLinear nodes that only a ConvInteger read
            g.graph.node.remove(node)
        g.refresh()
    used = {i for n in g.graph.node for i in n.input} | g.outputs
    for init in [t for t in g.graph.initializer if t.name not in used]:
        g.graph.initializer.remove(init)
