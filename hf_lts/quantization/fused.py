"""The fused LSQ passes of a quantized layer (Esser et al., 2020), as `Kernel` s.

The straight-through estimator passes the gradient where the *rounded* value lies in ``[Qn, Qp]``, i.e.
``v ∈ [Qn - ½, Qp + ½)``, and gives the step ``s`` the LSQ gradient ``(q - v)`` inside that range and
``Qn``/``Qp`` outside, scaled by ``grad_factor`` (the semantics of PyTorch's learnable fake-quantize
kernels, which are scalar loops and several times slower than the passes used here).

Memory: nothing but the input is kept for the backward pass. The straight-through mask and ``∂(q·s)/∂s``
are recomputed from the input there, in the same pass that applies them: the input is alive anyway (the
preceding ReLU or convolution keeps it), whereas a saved mask and derivative cost 5 bytes per element. The
step's gradient ``Σ grad ⊙ ∂(q·s)/∂s`` is reduced in that pass too, so ``∂(q·s)/∂s`` is never written.

Speed: a quantized layer's forward (input and weight) is one kernel and its backward two (input, weight).
The backends compute the same bits except in the steps' gradients, sums whose order differs (a few units
in the last place). The compiled and eager kernels see tensors as ``[rows, K]`` in memory order
(channels-last activations without a copy) and sum the steps' gradients per row first: one per-tensor sum
over an activation would run on one GPU block.
"""

from __future__ import annotations

import torch

from . import backend as backends
from . import state
from .kernel import Kernel

#: Lower bound on a step size: keeps ``1/s`` finite if an optimizer drives ``s`` through zero.
SCALE_EPS = 1e-8


def _levels(x, scale, qmin, qmax, packed):
    """``(v, round(v), q, frozen)`` of ``x`` (``[R, K]``) with ``C`` steps, one per row or one for all
    (``C`` is ``R`` or 1), frozen values at their level."""
    v = x * torch.reciprocal(torch.clamp(scale, min=SCALE_EPS).view(-1, 1))
    rounded = torch.round(v)
    q = torch.clamp(rounded, qmin, qmax)
    frozen = None
    if packed is not None:
        packed = packed.view(x.shape)
        frozen = (packed & state.FROZEN_BIT) != 0
        q = torch.where(frozen, (packed >> state.LEVEL_SHIFT).to(q.dtype), q)
    return v, rounded, q, frozen


def _dequantize(q, scale):
    return q * torch.clamp(scale, min=SCALE_EPS).view(-1, 1)


def _step_terms(x, scale, qmin, qmax, packed=None):
    """``(q, inside, ∂(q·s)/∂s)``: the straight-through estimator passes the gradient ``inside`` (where
    round(v) ∈ [Qn, Qp], never for frozen values); the step's derivative is ``q - v`` inside, ``Qn``/``Qp``
    outside and zero for frozen values."""
    v, rounded, q, frozen = _levels(x, scale, qmin, qmax, packed)
    inside = q == rounded
    if frozen is not None:
        inside = inside & ~frozen
    dq = torch.where(inside, rounded - v, q)
    if frozen is not None:
        dq = dq.masked_fill(frozen, 0.0)
    return q, inside, dq


def _fake_quant_math(x, scale, qmin, qmax, packed=None):
    """Forward of one tensor: ``q · s``."""
    _, _, q, _ = _levels(x, scale, qmin, qmax, packed)
    return _dequantize(q, scale)


def _grad_math(x, scale, qmin, qmax, grad, packed=None):
    """Backward of one tensor from its output gradient ``grad``: the input gradient and, reduced in the same
    pass, ``Σ grad ⊙ ∂(q·s)/∂s`` per row (nothing activation-sized is written but the input gradient). Rows,
    not steps: a per-tensor step's sum over a whole activation would be one GPU thread block's work."""
    _, inside, dq = _step_terms(x, scale, qmin, qmax, packed)
    return grad * inside, (grad * dq).sum(1)


def _layer_forward_math(x, x_scale, x_min, x_max, w, w_scale, w_min, w_max, packed=None):
    """A layer's forward in one kernel: its quantized input and its quantized weight."""
    return _fake_quant_math(x, x_scale, x_min, x_max), _fake_quant_math(w, w_scale, w_min, w_max, packed)


def _power_of_two(scale):
    """Each step as ``2^e · r`` with ``r ∈ [1, 2)``, both exactly (bit fields of the float)."""
    bits = torch.clamp(scale, min=SCALE_EPS).view(torch.int32)
    return (bits & 0x7F800000).view(torch.float32), ((bits & 0x007FFFFF) | 0x3F800000).view(torch.float32)


def _layer_levels_math(x, x_scale, x_min, x_max, w, w_scale, w_min, w_max, packed, dtype):
    """A layer's forward for a low-precision convolution / matmul: input and weight levels times a power of
    two (``q · 2^e``: exact in bfloat16 and float16 for 8-bit levels), in ``dtype``, and the rest of each
    step (``r``, float32) by which the caller rescales the output; and the quantized weight (the backward's)."""
    _, _, qx, _ = _levels(x, x_scale, x_min, x_max, None)
    _, _, qw, _ = _levels(w, w_scale, w_min, w_max, packed)
    px, rx = _power_of_two(x_scale)
    pw, rw = _power_of_two(w_scale)
    return (qx * px.view(-1, 1)).to(dtype), (qw * pw.view(-1, 1)).to(dtype), rx, rw, _dequantize(qw, w_scale)


def _grad_rows_math(x, scale, qmin, qmax, grad, packed, rows):
    """`_grad_math` of a weight ``x`` (``[R, K]``) of which only ``rows`` have a gradient, ``grad``
    (``[len(rows), K]``): the other rows are fully frozen, with zero gradients."""
    full = torch.zeros_like(x)
    full.index_copy_(0, rows, grad.view(-1, x.shape[1]))
    return _grad_math(x, scale, qmin, qmax, full, packed)


def _input_grad_math(x, scale, qmin, qmax, grad):
    """`_grad_math` of a layer's input, the input gradient written over ``grad`` (a buffer the layer owns:
    no fresh activation-sized allocation, whose page faults cost more than the pass on a CPU), with the
    quantized input again (the weight gradient needs it)."""
    q, inside, dq = _step_terms(x, scale, qmin, qmax)
    grad_scale = (grad * dq).sum(1)
    grad.copy_(grad * inside)
    return grad_scale, _dequantize(q, scale)


def _input_step_terms_math(x, scale, qmin, qmax):
    """``(∂(q·s)/∂s, q·s)`` of an input that needs no gradient (the first layer's pixels)."""
    q, _, dq = _step_terms(x, scale, qmin, qmax)
    return dq, _dequantize(q, scale)


def _rescale_math(out, factor, bias):
    """``out · factor (+ bias)`` in float32, rounded once to ``out``'s dtype (a low-precision layer's
    output: the levels' product times the rest of the two steps)."""
    y = out.float() * factor
    if bias is not None:
        y = y + bias.float()
    return y.to(out.dtype)


_BOUNDS = {"qmin": torch.float32, "qmax": torch.float32}  # one kernel for every bit width
_LAYER_BOUNDS = {name: torch.float32 for name in ("x_min", "x_max", "w_min", "w_max")}


def _broadcast_dims(args: list[object]) -> tuple[str, ...]:
    """`_rescale_math`'s dimension names: the output's, and the factor and bias broadcast over it."""
    out = args[0]
    names = "abcd"[: out.dim()]

    def over(t: object) -> str:
        if not isinstance(t, torch.Tensor):
            return ""
        lead = out.dim() - t.dim()
        return "".join(names[lead + i] if s == out.shape[lead + i] else "1" for i, s in enumerate(t.shape))

    return (names, over(args[1]), over(args[2]))


#: Dimension names (`hf_lts.quantization.kernel._example`): a tensor as rows and its steps, a layer's input
#: and weight, and their gradients and states shaped like them.
_X = {"x": "RK", "scale": "R", "grad": "RK", "packed": "RK"}
_LAYER = {"x": "RK", "x_scale": "R", "w": "QL", "w_scale": "Q", "packed": "QL"}

#: The fused kernels; each serves every shape, bit width and layer.
_KERNELS = {
    name: Kernel(fn, *spec)
    for name, fn, *spec in (
        ("fake_quant", _fake_quant_math, "fake_quant", _BOUNDS, _X),
        ("grad", _grad_math, "grad", _BOUNDS, _X),
        ("layer_forward", _layer_forward_math, "layer_forward", _LAYER_BOUNDS, _LAYER),
        ("layer_levels", _layer_levels_math, None, _LAYER_BOUNDS, _LAYER),
        ("grad_rows", _grad_rows_math, "grad_rows", _BOUNDS, {**_X, "grad": "NK", "rows": "N"}),
        ("input_grad", _input_grad_math, "input_grad", _BOUNDS, _X, ("grad",)),
        ("input_step_terms", _input_step_terms_math, "input_step_terms", _BOUNDS, _X),
        ("rescale", _rescale_math, None, {}, _broadcast_dims),
    )
}


def _flat(t: torch.Tensor) -> torch.Tensor:
    """A 1-D, contiguous, non-view tensor without autograd history: the one layout the native kernels see."""
    return t.reshape(-1).detach()


def channels_last(t: torch.Tensor) -> bool:
    """Whether ``t`` is a 4-D tensor laid out channels-last (and not also contiguous)."""
    return t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def _rows(t: torch.Tensor, weight: bool) -> torch.Tensor:
    """``t`` without autograd history as ``[R, K]`` in its memory order (a view for the usual layouts): one
    row per output channel of a weight; for an activation, rows of its innermost dimensions, as many as make
    a row longer than 1 (a 1×1 feature map's rows are its channels: a size of 1 would make the compiled
    kernels specialise, and compile again for the same layer shape)."""
    if weight:
        return t.reshape(t.shape[0], -1).detach()
    if channels_last(t):
        t = t.permute(0, 2, 3, 1)
    k = 1
    for size in reversed(t.shape[1:]):
        k *= size
        if k > 1:
            break
    rows = t.reshape(-1, k)
    # detached last: a detached view has no ``_base``, whose sizes Dynamo would guard (and recompile for)
    return rows.detach()


def _shaped(out: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A kernel's output (flat or `_rows`) shaped, and laid out, like ``like``."""
    if channels_last(like):
        n, c, h, w = like.shape
        return out.view(n, h, w, c).permute(0, 3, 1, 2)
    return out.view(like.shape)


def same_layout(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``t`` (shaped like ``like``) in ``like``'s memory layout, so that `_rows` pairs their elements."""
    if channels_last(like):
        return t.contiguous(memory_format=torch.channels_last)
    return t.contiguous()


def _per_step(partial: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Per-row sums (`_grad_math`) summed per step: all of them for a per-tensor step."""
    return partial if partial.numel() == scale.numel() else partial.sum().reshape(1)


def _quantized(
    x: torch.Tensor, scale: torch.Tensor, qmin: int, qmax: int, backend: str, weight: bool
) -> list[torch.Tensor | int]:
    """A kernel's arguments for one quantized tensor: flat float32 for the native kernels, `_rows` else."""
    x = _flat(x).float() if backend == "native" else _rows(x, weight)
    return [x, _flat(scale).float(), qmin, qmax]


def _run(name: str, args: list[torch.Tensor], packed: torch.Tensor | None, backend: str):
    if packed is not None:
        args = [*args, _flat(packed) if backend == "native" else _rows(packed, True)]
    return _KERNELS[name](*args, backend=backend)


def lsq_forward(
    x: torch.Tensor,
    scale: torch.Tensor,
    qmin: int,
    qmax: int,
    packed: torch.Tensor | None = None,
    backend: str | None = None,
    weight: bool = False,
) -> torch.Tensor:
    """``clamp(round(x / s), Qn, Qp) · s`` of ``x`` (no autograd, float32), per tensor (``scale`` of one
    element) or per channel along dim 0 (``weight``); with an LTS state ``packed``, frozen elements at their
    held level. ``backend``: `hf_lts.quantization.backend`'s choice by default."""
    backend = backend or backends.select(x.device)
    weight = weight or scale.numel() > 1
    out = _run("fake_quant", _quantized(x, scale, qmin, qmax, backend, weight), packed, backend)
    return _shaped(out, x)


def lsq_backward(
    x: torch.Tensor,
    scale: torch.Tensor,
    qmin: int,
    qmax: int,
    grad_factor: float,
    grad: torch.Tensor,
    packed: torch.Tensor | None = None,
    backend: str | None = None,
    weight: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The LSQ gradients of `lsq_forward`'s output gradient ``grad``: ``(grad_x, grad_scale)``."""
    backend = backend or backends.select(x.device)
    weight = weight or scale.numel() > 1
    args = _quantized(x, scale, qmin, qmax, backend, weight)
    g = _flat(grad) if backend == "native" else _rows(same_layout(grad, x), weight)
    grad_x, partial = _run("grad", [*args, g], packed, backend)
    return _shaped(grad_x, x), _per_step(partial, scale) * grad_factor


def lsq_backward_rows(
    w: torch.Tensor,
    scale: torch.Tensor,
    qmin: int,
    qmax: int,
    grad_factor: float,
    grad_rows: torch.Tensor,
    packed: torch.Tensor,
    rows: torch.Tensor,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`lsq_backward` of a weight whose output channels other than ``rows`` are fully frozen, from the
    gradient of those rows only (``grad_rows``): the frozen rows are not read, their gradients are zero."""
    g = _flat(grad_rows) if backend == "native" else _rows(grad_rows, True)
    args = [_rows(w, True), _flat(scale).float(), qmin, qmax, g]
    packed = _flat(packed) if backend == "native" else _rows(packed, True)
    grad_w, partial = _KERNELS["grad_rows"](*args, packed, rows, backend=backend)
    return grad_w.view(w.shape), _per_step(partial, scale) * grad_factor


def layer_forward(
    x: torch.Tensor,
    x_range: tuple[torch.Tensor, int, int],
    w: torch.Tensor,
    w_range: tuple[torch.Tensor, int, int],
    packed: torch.Tensor | None,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`lsq_forward` of a layer's input and weight (each with its ``(scale, Qn, Qp)``) in one kernel."""
    args = [*_quantized(x, *x_range, backend, False), *_quantized(w, *w_range, backend, True)]
    x_hat, w_hat = _run("layer_forward", args, packed, backend)
    return _shaped(x_hat, x), w_hat.view(w.shape)


def layer_levels(
    x: torch.Tensor,
    x_range: tuple[torch.Tensor, int, int],
    w: torch.Tensor,
    w_range: tuple[torch.Tensor, int, int],
    packed: torch.Tensor | None,
    dtype: torch.dtype,
    backend: str,
) -> tuple[torch.Tensor, ...]:
    """`_layer_levels_math` of a layer: ``(q_x · 2^e, q_w · 2^e)`` in ``dtype``, the rest of the steps, and
    ``q_w · s_w``."""
    backend = (
        "eager" if backend == "native" else backend
    )  # (no native kernel: low precision is off the CPU path)
    args = [*_quantized(x, *x_range, backend, False), *_quantized(w, *w_range, backend, True)]
    packed = None if packed is None else _rows(packed, True)
    xq, wq, rx, rw, w_hat = _KERNELS["layer_levels"](*args, packed, dtype, backend=backend)
    return _shaped(xq, x), wq.view(w.shape), rx, rw, w_hat.view(w.shape)


def rescale(out: torch.Tensor, factor: torch.Tensor, bias: torch.Tensor | None, backend: str) -> torch.Tensor:
    """`_rescale_math`; ``factor`` broadcasts over ``out``."""
    backend = "eager" if backend == "native" else backend
    return _KERNELS["rescale"](out, factor, bias, backend=backend)


def input_backward(
    x: torch.Tensor, scale: torch.Tensor, qmin: int, qmax: int, grad: torch.Tensor, backend: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(grad_x, Σ grad ⊙ ∂(q·s)/∂s, q·s)`` of a layer's input in one pass (the step's sum without
    ``grad_factor``). ``grad_x`` takes the place of ``grad``, which must not be used afterwards."""
    # ``grad`` itself where its layout allows, else a copy: the kernel writes into it
    grad_x = _flat(grad) if backend == "native" else _rows(same_layout(grad, x), False)
    partial, x_hat = _KERNELS["input_grad"](
        *_quantized(x, scale, qmin, qmax, backend, False), grad_x, backend=backend
    )
    return _shaped(grad_x, x), _per_step(partial, scale), _shaped(x_hat, x)


def fake_quant_terms(
    x: torch.Tensor, scale: torch.Tensor, qmin: int, qmax: int, packed: torch.Tensor | None, weight: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(q · s, inside, ∂(q·s)/∂s)`` of `_step_terms`, shaped like ``x``, without autograd (the straight-
    through terms of a traced layer, `hf_lts.quantization.op.traced_layer`)."""
    q, inside, dq = _step_terms(
        _rows(x, weight), scale, qmin, qmax, None if packed is None else _rows(packed, True)
    )
    return _shaped(_dequantize(q, scale), x), _shaped(inside, x), _shaped(dq, x)


def input_step_terms(
    x: torch.Tensor, scale: torch.Tensor, qmin: int, qmax: int, backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(∂(q·s)/∂s, q·s)`` shaped like ``x``."""
    dq, x_hat = _KERNELS["input_step_terms"](
        *_quantized(x, scale, qmin, qmax, backend, False), backend=backend
    )
    return _shaped(dq, x), _shaped(x_hat, x)
