"""`QuantConv2d` and `QuantLinear`: fake-quantized layers that carry their LTS state.

Each layer fake-quantizes its input (`ActivationFakeQuantizer`) and its weight (`WeightFakeQuantizer`)
and keeps, in buffers (so ``state_dict``, checkpoints and DDP carry them):

- ``lts_state``: the packed per-weight state (level, frozen flag, distance EMA / held latent),
  see `hf_lts.quantization.state`;
- ``lts_step``: optimizer steps the scratcher has seen; ``lts_frozen_steps``: Σ over those steps of
  this layer's frozen weights (for "weight updates saved"); ``lts_macs``: forward multiply-accumulates
  per example, taken from the first training batch (for "backward FLOPs saved").

A frozen weight contributes ``q · s`` with ``s`` detached: its gradient is zero and it adds nothing to
the step's gradient. That is what makes the saving real: a tensor whose weights are all frozen needs no
weight-gradient computation at all, and autograd skips it.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

from . import state
from .lsq import SCALE_EPS, ActivationFakeQuantizer, WeightFakeQuantizer, broadcast_scale


class _ZeroGrad(torch.autograd.Function):
    """Identity on a constant tensor that gives ``params`` zero gradients.

    DDP without ``find_unused_parameters`` expects a gradient for every parameter on every step; a
    fully frozen weight has none, so under ``torch.distributed`` it gets an explicit (cheap) zero.
    """

    @staticmethod
    def forward(ctx, out: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        ctx.shapes = [(p.shape, p.dtype, p.device) for p in params]
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return (None, *(torch.zeros(s, dtype=d, device=dev) for s, d, dev in ctx.shapes))


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class QuantLayerMixin:
    """What `QuantConv2d` and `QuantLinear` share: quantizers, LTS state, frozen-weight handling."""

    weight: nn.Parameter

    def _setup_quantization(self, weight_bits: int, activation_bits: int, per_channel: bool) -> None:
        self.weight_quantizer = WeightFakeQuantizer(self.weight, weight_bits, per_channel)
        self.input_quantizer = ActivationFakeQuantizer(activation_bits)
        levels, _ = self.weight_quantizer.levels(self.weight)
        device = self.weight.device
        self.register_buffer("lts_state", state.initial_state(levels))
        self.register_buffer("lts_step", torch.zeros((), dtype=torch.int64, device=device))
        self.register_buffer("lts_frozen_steps", torch.zeros((), dtype=torch.float64, device=device))
        self.register_buffer("lts_macs", torch.zeros((), dtype=torch.int64, device=device))
        self._refresh_cache()

    @classmethod
    def from_float(cls, module: nn.Module, weight_bits: int, activation_bits: int, per_channel: bool = False):
        """A quantized layer that takes over ``module``'s parameters (the same `nn.Parameter` objects)."""
        new = cls._empty_like(module)
        new.weight = module.weight
        new.bias = module.bias
        new._setup_quantization(weight_bits, activation_bits, per_channel)
        return new.train(module.training)

    # -- state -------------------------------------------------------------------------------------
    def _refresh_cache(self) -> None:
        # Python copies, so the forward pass never reads a device tensor to decide its path.
        self._num_frozen = int(state.frozen(self.lts_state).sum())
        self._macs_known = bool(self.lts_macs > 0)

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._refresh_cache()

    @property
    def frozen_mask(self) -> torch.Tensor:
        """Which weights are frozen (bool, weight-shaped; a fresh tensor: change it with `freeze_`)."""
        return state.frozen(self.lts_state)

    @property
    def num_frozen(self) -> int:
        return self._num_frozen

    @property
    def weight_levels(self) -> torch.Tensor:
        """The integer level of every weight: the frozen level of frozen weights, the last tracked level
        of the others (int32, weight-shaped)."""
        return state.levels(self.lts_state)

    @torch.no_grad()
    def freeze_(self, mask: torch.Tensor) -> None:
        """Freeze the weights selected by ``mask`` (in addition to those already frozen) at their current
        level. Freezing is permanent."""
        mask = mask.to(device=self.weight.device, dtype=torch.bool).expand_as(self.weight)
        levels, _ = self.weight_quantizer.levels(self.weight)
        self._freeze_at(mask & ~self.frozen_mask, levels)

    @torch.no_grad()
    def _freeze_at(self, new: torch.Tensor, levels: torch.Tensor) -> None:
        """Freeze ``new`` (trainable weights) at ``levels``: snap the latent value onto the level, once."""
        scale = broadcast_scale(self.weight_quantizer.scale, self.weight.ndim)
        packed = state.pack_frozen(levels, levels * scale)
        self.lts_state.copy_(torch.where(new, packed, self.lts_state))
        self.weight.copy_(torch.where(new, state.latent(packed).to(self.weight.dtype), self.weight))
        self._num_frozen += int(new.sum())

    @torch.no_grad()
    def _restore_frozen(self) -> None:
        """Undo whatever the optimizer did to frozen latent weights (momentum, weight decay, …)."""
        if self._num_frozen:
            held = state.latent(self.lts_state).to(self.weight.dtype)
            self.weight.copy_(torch.where(self.frozen_mask, held, self.weight))

    # -- forward -----------------------------------------------------------------------------------
    def quantized_weight(self) -> torch.Tensor:
        """The fake-quantized weight: LSQ for trainable weights, ``q · s`` (no gradient) for frozen ones."""
        quantizer = self.weight_quantizer
        if self._num_frozen == 0:
            return quantizer(self.weight)
        if self._num_frozen < self.weight.numel():
            return quantizer(self.weight, self.lts_state)
        with torch.no_grad():
            quantizer.scale.clamp_(min=SCALE_EPS)
        held = state.levels(self.lts_state) * broadcast_scale(quantizer.scale.detach(), self.weight.ndim)
        return _ZeroGrad.apply(held, self.weight, quantizer.scale) if _distributed() else held

    def _after_forward(self, out: torch.Tensor) -> None:
        if self.training and not self._macs_known:
            self.lts_macs.fill_(out[0].numel() * self.weight[0].numel())
            self._macs_known = True


class QuantConv2d(QuantLayerMixin, nn.Conv2d):
    """`nn.Conv2d` (any ``groups``, depthwise included) with LSQ fake quantization and LTS freezing."""

    @classmethod
    def _empty_like(cls, m: nn.Conv2d) -> QuantConv2d:
        return cls(
            m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation, m.groups,
            m.bias is not None, m.padding_mode, device="meta", dtype=m.weight.dtype,
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._conv_forward(self.input_quantizer(x), self.quantized_weight(), self.bias)
        self._after_forward(out)
        return out


class QuantLinear(QuantLayerMixin, nn.Linear):
    """`nn.Linear` with LSQ fake quantization and LTS freezing."""

    @classmethod
    def _empty_like(cls, m: nn.Linear) -> QuantLinear:
        return cls(m.in_features, m.out_features, m.bias is not None, device="meta", dtype=m.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(self.input_quantizer(x), self.quantized_weight(), self.bias)
        self._after_forward(out)
        return out
