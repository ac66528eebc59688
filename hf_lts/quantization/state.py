"""The LTS state of one quantized weight, packed into 4 bytes.

The reference code keeps four fp32 tensors per weight (16 B). hf_lts packs everything into one
``int32`` per weight, which is accurate where it matters (LTS.md §4)::

    bits 31..24  level q (int8): the previous level while trainable, the frozen level once frozen
    bit  23      frozen flag
    bits 22..0   trainable: the distance EMA d, fixed point with 19 fraction bits (0 ≤ d < 16),
                 updated with stochastic rounding so that even at momentum 0.9999 it tracks a
                 float64 EMA (an fp16 EMA would never move)
    bits 15..0   frozen: the bfloat16 bits of the latent weight, snapped onto its level at freezing,
                 so the latent value can be restored bit for bit after every optimizer step
"""

from __future__ import annotations

import torch

LEVEL_SHIFT = 24
FROZEN_BIT = 1 << 23
DISTANCE_MASK = FROZEN_BIT - 1
DISTANCE_FRACTION_BITS = 19
DISTANCE_ONE = 1 << DISTANCE_FRACTION_BITS
#: Largest storable distance (in steps); larger distances (far-clipped weights) saturate here, which
#: cannot change a freezing decision since every threshold is ≤ 1.
DISTANCE_MAX = DISTANCE_MASK / DISTANCE_ONE
LATENT_MASK = 0xFFFF


def initial_state(levels: torch.Tensor) -> torch.Tensor:
    """Trainable weights at ``levels`` with distance 1 (a whole step: nothing is close yet)."""
    return pack_trainable(levels, torch.full_like(levels, DISTANCE_ONE, dtype=torch.int32))


def pack_trainable(levels: torch.Tensor, distance_fixed: torch.Tensor) -> torch.Tensor:
    return levels.to(torch.int32) * (1 << LEVEL_SHIFT) + distance_fixed.to(torch.int32)


def bfloat16_bits(x: torch.Tensor) -> torch.Tensor:
    """The bfloat16 bits (in ``[0, 2^16)``, int32) of float32 ``x`` rounded to nearest even.

    Integer arithmetic on the float's bits, as ``x.to(torch.bfloat16)`` rounds finite values: unlike a
    bfloat16 view it vectorises when compiled (`hf_lts.update.update_layer_state`).
    """
    bits = x.float().view(torch.int32)
    return ((bits + (0x7FFF + ((bits >> 16) & 1))) >> 16) & LATENT_MASK


def from_bfloat16_bits(bits: torch.Tensor) -> torch.Tensor:
    """The float32 value of bfloat16 ``bits`` (the low 16 bits of an int32 tensor), exactly."""
    magnitude = ((bits & 0x7FFF) << 16).view(torch.float32)
    return torch.where((bits & 0x8000) != 0, -magnitude, magnitude)


def pack_frozen(levels: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
    """Frozen weights at ``levels`` whose latent value is ``latent`` (float32, rounded to bfloat16 here)."""
    return levels.to(torch.int32) * (1 << LEVEL_SHIFT) + FROZEN_BIT + bfloat16_bits(latent)


def levels(state: torch.Tensor) -> torch.Tensor:
    """The integer level of every weight (int32)."""
    return state >> LEVEL_SHIFT


def frozen(state: torch.Tensor) -> torch.Tensor:
    return (state & FROZEN_BIT) != 0


def distance_fixed(state: torch.Tensor) -> torch.Tensor:
    """The distance EMA in fixed point (meaningless for frozen weights)."""
    return state & DISTANCE_MASK


def distance(state: torch.Tensor) -> torch.Tensor:
    """The distance EMA in units of the step, as float32 (meaningless for frozen weights)."""
    return distance_fixed(state).float() / DISTANCE_ONE


def latent(state: torch.Tensor) -> torch.Tensor:
    """The held latent value of frozen weights, as float32 (meaningless for trainable ones)."""
    return from_bfloat16_bits(state)
