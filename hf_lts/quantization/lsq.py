"""LSQ fake quantization (Esser et al., 2020) as small composable modules.

The math runs in PyTorch's fused learnable fake-quantize kernels (the ones behind
``torch.ao.quantization._LearnableFakeQuantize``): one pass forward and one backward, instead of the
five or six element-wise passes of a hand-written LSQ. Their straight-through estimator passes the
gradient where the *rounded* value lies in ``[Qn, Qp]``, i.e. ``v ∈ [Qn - ½, Qp + ½)``, and gives the step
``s`` the LSQ gradient ``(q - v)`` inside that range and ``Qn``/``Qp`` outside, scaled by ``grad_factor``.
`quantize_levels` reproduces their rounding bit for bit (``v = x · (1/s)``, round half to even), so the
levels the scratcher tracks are the levels the forward pass used.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

#: Lower bound on a step size: keeps ``1/s`` finite if an optimizer drives ``s`` through zero.
SCALE_EPS = 1e-8


def signed_range(bits: int) -> tuple[int, int]:
    """``(Qn, Qp)`` of a signed ``bits``-bit quantizer."""
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def unsigned_range(bits: int) -> tuple[int, int]:
    """``(0, Qp)`` of an unsigned ``bits``-bit quantizer."""
    return 0, 2**bits - 1


def broadcast_scale(scale: torch.Tensor, ndim: int) -> torch.Tensor:
    """View a per-tensor ``[1]`` or per-channel ``[C]`` step so it broadcasts over a weight of ``ndim`` dims."""
    return scale.view(-1, *([1] * (ndim - 1)))


def fake_quantize(
    x: torch.Tensor, scale: torch.Tensor, qmin: int, qmax: int, grad_factor: float
) -> torch.Tensor:
    """``clamp(round(x / s), qmin, qmax) · s`` with LSQ gradients, per tensor (``scale`` of one element)
    or per channel along dim 0."""
    x = x.float()  # under autocast the fake quantization stays in fp32
    zero_point = torch.zeros_like(scale)
    if scale.numel() == 1:
        return torch._fake_quantize_learnable_per_tensor_affine(x, scale, zero_point, qmin, qmax, grad_factor)
    return torch._fake_quantize_learnable_per_channel_affine(x, scale, zero_point, 0, qmin, qmax, grad_factor)


@torch.no_grad()
def quantize_levels(
    x: torch.Tensor, scale: torch.Tensor, qmin: int, qmax: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer levels ``q`` (as floats) and the unclamped ``v = x / s`` exactly as `fake_quantize` rounds."""
    v = x * torch.reciprocal(broadcast_scale(scale.detach(), x.ndim))
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

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            self.scale.clamp_(min=SCALE_EPS)
        return fake_quantize(weight, self.scale, self.qmin, self.qmax, self.grad_factor)

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
        if not self._initialized:
            self._initialize(x)
        with torch.no_grad():
            self.scale.clamp_(min=SCALE_EPS)
        # LSQ: N = features of one example, so the step's gradient does not depend on the batch size
        # (and hence not on how a global batch is split across processes).
        grad_factor = 1.0 / math.sqrt(x[0].numel() * self.qmax)
        return fake_quantize(x, self.scale, self.qmin, self.qmax, grad_factor)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, signed={bool(self.signed)}"
