"""LSQ fake quantization (Esser et al., 2020): the quantizer modules a layer holds, and `fake_quantize`,
LSQ of one tensor with its gradients through the same fused kernels the layers run
(`hf_lts.quantization.fused`). `quantize_levels` rounds exactly as the forward pass does
(``v = x · (1/s)``, round half to even), so the levels the scratcher tracks are the levels the forward
pass used.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from . import backend as backends
from .fused import SCALE_EPS, lsq_backward, lsq_forward


def signed_range(bits: int) -> tuple[int, int]:
    """``(Qn, Qp)`` of a signed ``bits``-bit quantizer."""
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def unsigned_range(bits: int) -> tuple[int, int]:
    """``(0, Qp)`` of an unsigned ``bits``-bit quantizer."""
    return 0, 2**bits - 1


def broadcast_scale(scale: torch.Tensor, ndim: int) -> torch.Tensor:
    """View a per-tensor ``[1]`` or per-channel ``[C]`` step so it broadcasts over a weight of ``ndim`` dims."""
    return scale.view(-1, *([1] * (ndim - 1)))


class _LSQFakeQuantize(torch.autograd.Function):
    """LSQ fake quantization of one tensor with LTS-frozen values held at their level (`fake_quantize`)."""

    @staticmethod
    def forward(ctx, x, scale, qmin, qmax, grad_factor, packed, backend, weight):
        ctx.save_for_backward(x, scale, packed)
        ctx.args = (qmin, qmax, grad_factor, backend, weight)
        return lsq_forward(x, scale, qmin, qmax, packed, backend, weight)

    @staticmethod
    def backward(ctx, grad):
        x, scale, packed = ctx.saved_tensors
        qmin, qmax, grad_factor, backend, weight = ctx.args
        grad_x, grad_scale = lsq_backward(x, scale, qmin, qmax, grad_factor, grad, packed, backend, weight)
        return grad_x, grad_scale, None, None, None, None, None, None


def fake_quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    qmin: int,
    qmax: int,
    grad_factor: float,
    packed: torch.Tensor | None = None,
    backend: str | None = None,
    weight: bool = False,
) -> torch.Tensor:
    """``clamp(round(x / s), qmin, qmax) · s`` with LSQ gradients, per tensor (``scale`` of one element)
    or per channel along dim 0 (a ``weight``). With an LTS state ``packed``, its frozen elements are held at
    their frozen level with no gradient. ``backend``: `hf_lts.quantization.backend`'s choice by default."""
    backend = backend or backends.select(x.device)
    return _LSQFakeQuantize.apply(x.float(), scale, qmin, qmax, grad_factor, packed, backend, weight)


@torch.no_grad()
def quantize_levels(
    x: torch.Tensor, scale: torch.Tensor, qmin: int, qmax: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer levels ``q`` (as floats) and the unclamped ``v = x / s`` exactly as `fake_quantize` rounds."""
    v = x * torch.reciprocal(broadcast_scale(scale.detach().clamp(min=SCALE_EPS), x.ndim))
    return torch.round(v).clamp_(qmin, qmax), v


def lsq_init_scale(x: torch.Tensor, qmax: int, per_channel: bool = False) -> torch.Tensor:
    """LSQ's initial step ``2·mean(|x|)/sqrt(Qp)``, per tensor (shape ``[1]``) or per output channel."""
    mean_abs = x.detach().abs().flatten(1).mean(1) if per_channel else x.detach().abs().mean().reshape(1)
    return (2 * mean_abs / math.sqrt(qmax)).clamp_min(SCALE_EPS)


class WeightFakeQuantizer(nn.Module):
    """Signed LSQ quantizer of a weight tensor, holding the learnable step ``scale``."""

    def __init__(self, weight: torch.Tensor, bits: int, per_channel: bool) -> None:
        super().__init__()
        self.bits = bits
        self.per_channel = per_channel
        self.qmin, self.qmax = signed_range(bits)
        self.scale = nn.Parameter(lsq_init_scale(weight, self.qmax, per_channel))
        per_scale = weight[0].numel() if per_channel else weight.numel()
        self.grad_factor = 1.0 / math.sqrt(per_scale * self.qmax)

    def forward(self, weight: torch.Tensor, packed: torch.Tensor | None = None) -> torch.Tensor:
        """Fake-quantized ``weight``; with its LTS state ``packed``, frozen weights are held (see
        `fake_quantize`)."""
        return fake_quantize(weight, self.scale, self.qmin, self.qmax, self.grad_factor, packed, weight=True)

    def levels(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(q, v)`` of `quantize_levels` for this quantizer."""
        return quantize_levels(weight, self.scale, self.qmin, self.qmax)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, per_channel={self.per_channel}"


class ActivationFakeQuantizer(nn.Module):
    """LSQ quantizer of a layer's input, unsigned after ReLU/ReLU6, signed otherwise.

    Sign and initial step come from the first batch it sees (the first training batch). Under
    ``torch.distributed`` the statistics are all-reduced first, so every rank starts from the same
    quantizer — the reference code initialised per rank and its ranks drifted apart.
    """

    def __init__(self, bits: int) -> None:
        super().__init__()
        self.bits = bits
        self.scale = nn.Parameter(torch.ones(1))
        self.register_buffer("signed", torch.zeros((), dtype=torch.bool))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        self._sync_flags()

    def _sync_flags(self) -> None:
        # Python copies of the two flags: reading a buffer each forward would sync the device.
        self._initialized = bool(self.initialized)
        self.qmin, self.qmax = signed_range(self.bits) if bool(self.signed) else unsigned_range(self.bits)

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._sync_flags()

    @torch.no_grad()
    def _initialize(self, x: torch.Tensor) -> None:
        mean_abs = x.detach().abs().float().mean().reshape(1)
        neg_min = -x.detach().float().min().reshape(1)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(mean_abs)
            mean_abs /= dist.get_world_size()
            dist.all_reduce(neg_min, op=dist.ReduceOp.MAX)
        self.signed.fill_(bool(neg_min > 0))
        _, qmax = signed_range(self.bits) if bool(self.signed) else unsigned_range(self.bits)
        self.scale.copy_((2 * mean_abs / math.sqrt(qmax)).clamp_min(SCALE_EPS))
        self.initialized.fill_(True)
        self._sync_flags()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.initialize_from(x)
        return fake_quantize(x, self.scale, self.qmin, self.qmax, self.grad_factor(x))

    def initialize_from(self, x: torch.Tensor) -> None:
        """Initialise sign and step from ``x`` unless done already (the first training batch)."""
        if not self._initialized:
            self._initialize(x)

    def grad_factor(self, x: torch.Tensor) -> float:
        """LSQ's ``1/sqrt(N·Qp)`` with N = features of one example, so the step's gradient does not depend
        on the batch size (and hence not on how a global batch is split across processes)."""
        return 1.0 / math.sqrt(x.numel() // x.shape[0] * self.qmax)  # x[0].numel(), without indexing

    def extra_repr(self) -> str:
        return f"bits={self.bits}, signed={bool(self.signed)}"
