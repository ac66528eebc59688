"""`QuantizedOp`: a quantized layer's input and weight quantization and its convolution / matmul as one
autograd function, whose backward does only the work that can still change something (the layers'
docstring, `hf_lts.quantization.layers`, says what). On a CPU in float32 the layers run the same
computation as the native ``hf_lts::quant_layer`` node instead (`native_layer_ops`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import _get_current_dispatch_mode

from . import native
from .fused import (
    fake_quant_terms,
    input_backward,
    input_step_terms,
    layer_forward,
    layer_levels,
    lsq_backward,
    lsq_backward_rows,
    lsq_forward,
    rescale,
)


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def native_layer_ops(x: torch.Tensor, weight: torch.Tensor, backend: str) -> object | None:
    """``torch.ops.hf_lts`` where a layer's forward and backward can run as the native ``quant_layer`` (the
    native backend, float32, outside autocast, tracing and dispatch modes), else ``None`` (`QuantizedOp`)."""
    if backend != "native" or x.dtype != torch.float32 or weight.dtype != torch.float32:
        return None
    if torch.jit.is_tracing() or torch.compiler.is_compiling():  # (first: Dynamo cannot trace the mode test)
        return None
    if torch.is_autocast_enabled("cpu") or _get_current_dispatch_mode() is not None:
        return None
    return native.ops()


def _straight_through(
    x: torch.Tensor, scale: torch.Tensor, qmin: int, qmax: int, grad_factor: float, packed, weight: bool
) -> torch.Tensor:
    """``q · s`` of ``x`` with `QuantizedOp`'s gradients as differentiable arithmetic: the value is ``q · s``
    (the added terms are exact zeros), ``x`` gets the straight-through gradient where it is inside the range,
    ``s`` gets ``grad_factor · Σ grad ⊙ ∂(q·s)/∂s``, and frozen values neither."""
    x_hat, inside, dq = fake_quant_terms(x, scale.detach(), qmin, qmax, packed, weight)
    step = scale * grad_factor
    step = step.view(-1, *([1] * (x.dim() - 1))) if weight else step.view([1] * x.dim())
    return x_hat + (x - x.detach()) * inside + (step - step.detach()) * dq


def traced_layer(x: torch.Tensor, layer) -> torch.Tensor:
    """A float32 layer's forward in a graph that `torch.compile` traces: `QuantizedOp`'s computation as
    plain ops, which Inductor differentiates and fuses with the rest of the model, for any input size (a
    step becomes a few graphs instead of several kernel calls per layer: what a GPU bound by its host's
    launches needs). It reads no host-side count (each change would compile the graph again): no held
    weight and no skipped channels, the dense weight gradient, whose frozen entries are exact zeros."""
    aq, wq = layer.input_quantizer, layer.weight_quantizer
    x_hat = _straight_through(x, aq.scale, aq.qmin, aq.qmax, aq.grad_factor(x), None, False)
    w_hat = _straight_through(layer.weight, wq.scale, wq.qmin, wq.qmax, wq.grad_factor, layer.lts_state, True)
    return layer._op(x_hat, w_hat, layer.bias)


def compute_dtype(device: torch.device) -> torch.dtype:
    """The dtype autocast would run the convolution / matmul in (float32 outside autocast)."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return torch.float32


class QuantizedOp(torch.autograd.Function):
    """``op(fake_quant(x), fake_quant(w, frozen held), b)`` with the LSQ and LTS backward described above.

    Fused kernels: the forward quantizes input and weight in one; the backward has one for the input
    (which also recomputes the quantized input the weight gradient needs), one that recomputes the
    quantized weight, and one for the weight, each gradient kernel reducing its step's gradient in the
    same pass. Under autocast the convolution / matmul runs on the integer levels times a power of two
    (exact in bfloat16 and float16) and its output is rescaled by the rest of the steps in float32: the
    levels are those of the float32 model and of its export, only the products are rounded.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, input_scale, weight_scale, layer, backend):
        aq, wq = layer.input_quantizer, layer.weight_quantizer
        # The native kernels skip the frozen test while nothing is frozen; the others always read the state,
        # so that no decision depends on a count the host may not have yet. In a graph `torch.compile`
        # traces, nothing depends on a host-side count at all (each change would compile the graph again):
        # no held weight, and the dense weight gradient, whose frozen entries are exact zeros.
        traced = torch.compiler.is_compiling()
        packed = layer._packed() if backend == "native" and not traced else layer.lts_state
        held = None if traced else layer._held_weight(backend)
        dtype = compute_dtype(x.device)
        xk = x.float() if backend == "native" else x  # (the other kernels read any float dtype)
        x_range, w_range = (input_scale, aq.qmin, aq.qmax), (weight_scale, wq.qmin, wq.qmax)
        if dtype != torch.float32:
            with torch.autocast(x.device.type, enabled=False):
                x_c, w_c, rx, rw, w_hat = layer_levels(xk, x_range, weight, w_range, packed, dtype, backend)
                out = layer._op(x_c, w_c, None)
                bias_c = None if bias is None else layer._channel_view(bias)
                out = rescale(out, layer._channel_view(rx * rw), bias_c, backend)
        else:
            if held is None:
                x_hat, w_hat = layer_forward(xk, x_range, weight.float(), w_range, packed, backend)
            else:
                x_hat, w_hat = lsq_forward(xk, input_scale, aq.qmin, aq.qmax, backend=backend), held
            out = layer._op(x_hat, w_hat, bias)
        # The quantized input is recomputed in the backward (kept, it would cost activation-sized memory
        # between the passes). So is the quantized weight on a CPU (a second copy of every layer's weight),
        # except a fully frozen layer's, which the layer keeps anyway; off the CPU it is kept: a kernel call
        # costs more host time than its memory is worth there.
        if backend == "native":
            w_hat = held
        ctx.save_for_backward(x, weight, input_scale, weight_scale, packed, w_hat)
        ctx.layer, ctx.dtype, ctx.backend = layer, dtype, backend
        ctx.active = None if traced else layer._active_channels
        ctx.grad_factor = aq.grad_factor(x)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, input_scale, weight_scale, packed, w_hat = ctx.saved_tensors
        layer, dtype, active, backend = ctx.layer, ctx.dtype, ctx.active, ctx.backend
        aq, wq = layer.input_quantizer, layer.weight_quantizer
        if w_hat is None:
            w_hat = lsq_forward(weight.float(), weight_scale, wq.qmin, wq.qmax, packed, backend, weight=True)
        need_x, need_input_scale = ctx.needs_input_grad[0], ctx.needs_input_grad[3]
        need_weight = (ctx.needs_input_grad[1] or ctx.needs_input_grad[4]) and (
            active is None or active.numel() > 0
        )
        grad_out, w_c = grad_out.to(dtype), w_hat.to(dtype)
        xf = x.float() if backend == "native" else x
        grad_x = grad_input_scale = grad_weight = grad_weight_scale = grad_bias = None
        if need_x:  # the input gradient takes the place of ∂L/∂x̂ (no second activation-sized buffer)
            grad_x_hat = layer._grad_input(grad_out, x if x.dtype == dtype else x.shape, w_c)
            if backend == "native":
                grad_x_hat = grad_x_hat.float()
            grad_x, step_sum, x_hat = input_backward(xf, input_scale, aq.qmin, aq.qmax, grad_x_hat, backend)
            grad_x = grad_x.to(x.dtype)
            del grad_x_hat  # replaced by grad_x (or, were it not contiguous, copied into it): free it now
            if need_input_scale:
                grad_input_scale = step_sum * ctx.grad_factor
        elif need_input_scale:
            # the pixels need no gradient: Σ ∂L/∂x̂ ⊙ dq = Σ ∂L/∂y ⊙ op(dq, ŵ), a forward op
            dq, x_hat = input_step_terms(xf, input_scale, aq.qmin, aq.qmax, backend)
            y = layer._op(dq.to(dtype), w_c, None)
            grad_input_scale = torch.dot(grad_out.float().reshape(-1), y.float().reshape(-1)).reshape(1)
            grad_input_scale = grad_input_scale * ctx.grad_factor
            del dq, y
        else:
            x_hat = lsq_forward(xf, input_scale, aq.qmin, aq.qmax, backend=backend)
        x_c = x_hat.to(dtype)
        if need_weight:  # for the channels with a trainable weight (all, or ``active``) only
            grad_w_hat = layer._grad_weight(grad_out, x_c, w_c, active).float()
            wf, args = weight.float(), (weight_scale, wq.qmin, wq.qmax, wq.grad_factor, grad_w_hat, packed)
            if active is None:
                grad_weight, grad_weight_scale = lsq_backward(wf, *args, backend, weight=True)
            else:
                grad_weight, grad_weight_scale = lsq_backward_rows(wf, *args, active, backend)
            grad_weight = grad_weight.to(weight.dtype)
        elif distributed():  # DDP expects a gradient for every parameter on every step: an exact zero
            grad_weight, grad_weight_scale = torch.zeros_like(weight), torch.zeros_like(weight_scale)
        if ctx.needs_input_grad[2]:
            grad_bias = layer._grad_bias(grad_out, x_c, w_c).to(layer.bias.dtype)
        return grad_x, grad_weight, grad_bias, grad_input_scale, grad_weight_scale, None, None
