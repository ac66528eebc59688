"""The fake quantization as hf_lts computed it before the fused layer function (issue #11): LSQ forward
saving its straight-through mask and ``∂(q·s)/∂s``, composed with the convolution / matmul by autograd.
The fused path must give the same bits; this is the reference it is checked against."""

import torch
from torch.nn import functional as F

from hf_lts.quantization import state
from hf_lts.quantization.layers import QuantConv2d


class ReferenceLSQ(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, qmin, qmax, grad_factor, packed):
        channels = scale.numel()
        x2, s = x.reshape(channels, -1), scale.view(channels, 1)
        v = x2 * torch.reciprocal(s)
        rounded = torch.round(v)
        q = torch.clamp(rounded, qmin, qmax)
        inside = q == rounded
        if packed is not None:
            packed = packed.view(channels, -1)
            frozen = (packed & state.FROZEN_BIT) != 0
            q = torch.where(frozen, (packed >> state.LEVEL_SHIFT).to(q.dtype), q)
            inside = inside & ~frozen
        dq = torch.where(inside, rounded - v, q)
        if packed is not None:
            dq = dq.masked_fill(frozen, 0.0)
        ctx.save_for_backward(inside, dq)
        ctx.grad_factor, ctx.shape = grad_factor, x.shape
        return (q * s).view(x.shape)

    @staticmethod
    def backward(ctx, grad):
        inside, dq = ctx.saved_tensors
        grad = grad.reshape(inside.shape)
        grad_x = (grad * inside).view(ctx.shape)
        if inside.shape[0] == 1:
            grad_scale = torch.dot(grad.reshape(-1), dq.reshape(-1)).reshape(1)
        else:
            grad_scale = (grad * dq).sum(1)
        return grad_x, grad_scale * ctx.grad_factor, None, None, None, None


def reference_forward(layer, x):
    """The layer's output as the pre-#11 implementation computed it (the same autograd graph)."""
    aq, wq = layer.input_quantizer, layer.weight_quantizer
    x_hat = ReferenceLSQ.apply(x.float(), aq.scale, aq.qmin, aq.qmax, aq.grad_factor(x), None)
    packed = layer.lts_state if layer.num_frozen else None
    w_hat = ReferenceLSQ.apply(layer.weight, wq.scale, wq.qmin, wq.qmax, wq.grad_factor, packed)
    if isinstance(layer, QuantConv2d):
        return F.conv2d(x_hat, w_hat, layer.bias, layer.stride, layer.padding, layer.dilation, layer.groups)
    return F.linear(x_hat, w_hat, layer.bias)
