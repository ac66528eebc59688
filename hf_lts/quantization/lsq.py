"""LSQ fake quantization (Esser et al., 2020) as small composable modules.

The straight-through estimator passes the gradient where the *rounded* value lies in ``[Qn, Qp]``, i.e.
``v ∈ [Qn - ½, Qp + ½)``, and gives the step ``s`` the LSQ gradient ``(q - v)`` inside that range and
``Qn``/``Qp`` outside, scaled by ``grad_factor`` (the semantics of PyTorch's learnable fake-quantize
kernels, which are scalar loops and several times slower than the vectorised passes used here).
`quantize_levels` rounds exactly as the forward pass does (``v = x · (1/s)``, round half to even), so the
levels the scratcher tracks are the levels the forward pass used.
"""

from __future__ import annotations

import functools
import math
import warnings

import torch
import torch.distributed as dist
from torch import nn

from . import state

#: Models with at least this many quantized weights run their fake quantization and the scratcher's
#: update as fused `torch.compile` kernels: there one pass instead of several saves far more than the
#: one-off compile costs; small models stay eager (``prepare_model`` decides, see ``fused``).
COMPILE_MIN_WEIGHTS = 1_000_000

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


def _fake_quantize_math(
    x: torch.Tensor, scale: torch.Tensor, qmin: torch.Tensor, qmax: torch.Tensor, packed: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Output, straight-through mask and ``∂(q·s)/∂s`` of ``[C, K]`` values with ``[C, 1]`` steps.

    A pure function of tensors (the bounds too, so that one compiled kernel serves every bit width):
    `torch.compile` fuses it into one pass, eagerly it is a few vectorised passes. Both give the same bits.
    """
    v = x * torch.reciprocal(scale)
    rounded = torch.round(v)
    q = torch.clamp(rounded, qmin, qmax)
    inside = q == rounded  # round(v) ∈ [Qn, Qp]: the straight-through estimator passes the gradient
    if packed is not None:
        frozen = (packed & state.FROZEN_BIT) != 0
        q = torch.where(frozen, (packed >> state.LEVEL_SHIFT).to(q.dtype), q)
        inside = inside & ~frozen
    dq = torch.where(inside, rounded - v, q)  # ∂(q·s)/∂s: q - v inside, Qn or Qp outside
    if packed is not None:
        dq = dq.masked_fill(frozen, 0.0)
    return q * scale, inside, dq


_compiled_math = None


def _math(fused: bool):
    """`_fake_quantize_math`, compiled once (dynamic shapes) when ``fused``; eager if compiling fails."""
    global _compiled_math
    if not fused or _compiled_math is False:
        return _fake_quantize_math
    if _compiled_math is None:
        _compiled_math = torch.compile(_fake_quantize_math, dynamic=True, fullgraph=True)
    return _compiled_math


@functools.cache
def _bounds(qmin: int, qmax: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``Qn``/``Qp`` as tensors, made once per device rather than copied to it on every call."""
    return torch.tensor(float(qmin), device=device), torch.tensor(float(qmax), device=device)


class _LSQFakeQuantize(torch.autograd.Function):
    """LSQ fake quantization with LTS-frozen weights held at their level.

    PyTorch's fused learnable fake-quantize kernels are scalar loops (≈ 7 ns per element forward and
    11 ns backward on the reference CPU); a few vectorised passes — or one compiled kernel — forward and
    two backward cost a fraction of that. The forward saves what the backward needs — the
    straight-through mask and ``∂(q·s)/∂s`` — rather than recomputing them from ``x``. With ``packed`` (an
    LTS state), frozen weights output ``q_frozen · s`` and take no part in either gradient: zero gradient
    for them, nothing from them in the step's gradient.
    """

    @staticmethod
    def forward(ctx, x, scale, qmin, qmax, grad_factor, packed, fused):
        global _compiled_math
        channels = scale.numel()
        args = (
            x.reshape(channels, -1),
            scale.view(channels, 1),
            *_bounds(qmin, qmax, x.device),
            None if packed is None else packed.view(channels, -1),
        )
        try:
            out, inside, dq = _math(fused)(*args)
        except Exception as err:  # a missing compiler shows up at the first call
            if not fused or _compiled_math is False:
                raise
            warnings.warn(
                f"torch.compile of the fake quantization failed ({err!r}); running it eagerly.", stacklevel=2
            )
            _compiled_math = False
            out, inside, dq = _fake_quantize_math(*args)
        ctx.save_for_backward(inside, dq)
        ctx.grad_factor, ctx.shape = grad_factor, x.shape
        return out.view(x.shape)

    @staticmethod
    def backward(ctx, grad):
        inside, dq = ctx.saved_tensors
        grad = grad.reshape(inside.shape)
        grad_x = (grad * inside).view(ctx.shape) if ctx.needs_input_grad[0] else None
        grad_scale = None
        if ctx.needs_input_grad[1]:
            if inside.shape[0] == 1:
                grad_scale = torch.dot(grad.reshape(-1), dq.reshape(-1)).reshape(1)
            else:
                grad_scale = (grad * dq).sum(1)
            grad_scale = grad_scale * ctx.grad_factor
        return grad_x, grad_scale, None, None, None, None, None


def fake_quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    qmin: int,
    qmax: int,
    grad_factor: float,
    packed: torch.Tensor | None = None,
    fused: bool = False,
) -> torch.Tensor:
    """``clamp(round(x / s), qmin, qmax) · s`` with LSQ gradients, per tensor (``scale`` of one element)
    or per channel along dim 0. With an LTS state ``packed``, its frozen elements are held at their
    frozen level with no gradient. ``fused`` runs the forward as one `torch.compile` kernel."""
    return _LSQFakeQuantize.apply(x.float(), scale, qmin, qmax, grad_factor, packed, fused)


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
        self.fused = False  # one compiled kernel instead of a few eager passes (set by prepare_model)
        per_scale = weight[0].numel() if per_channel else weight.numel()
        self.grad_factor = 1.0 / math.sqrt(per_scale * self.qmax)

    def forward(self, weight: torch.Tensor, packed: torch.Tensor | None = None) -> torch.Tensor:
        """Fake-quantized ``weight``; with its LTS state ``packed``, frozen weights are held (see
        `fake_quantize`)."""
        with torch.no_grad():
            self.scale.clamp_(min=SCALE_EPS)
        return fake_quantize(weight, self.scale, self.qmin, self.qmax, self.grad_factor, packed, self.fused)

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
        self.fused = False  # one compiled kernel instead of a few eager passes (set by prepare_model)
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
        return fake_quantize(x, self.scale, self.qmin, self.qmax, grad_factor, fused=self.fused)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, signed={bool(self.signed)}"
