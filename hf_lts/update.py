"""The LTS update of a layer on the device (the compiled and eager backends; the CPU's is the native
``hf_lts::update_layers``): distance EMA with stochastic rounding, freezing, channel completion, in one
`Kernel` per layer, and `UpdateGraph`, which replays a step's updates as one CUDA graph.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable

import torch

from .quantization import state
from .quantization.fused import SCALE_EPS
from .quantization.kernel import Kernel
from .quantization.layers import QuantLayerMixin

_HASH_MULTIPLIER = 0x45D9F3B  # < 2^27: the int64 products below never overflow
_LOW32 = 0xFFFFFFFF


def _hash_uniform(index: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """A uniform draw in ``[0, 1)`` (24 bits) per element from a 32-bit integer hash of ``index + key``.

    Counter-based rather than a generator: it depends only on (key, element), so it is the same in
    every process, on resume, eagerly and compiled, and a fused kernel computes it in registers.
    """
    h = (index + key) & _LOW32
    h = h ^ (h >> 16)
    h = (h * _HASH_MULTIPLIER) & _LOW32
    h = h ^ (h >> 16)
    h = (h * _HASH_MULTIPLIER) & _LOW32
    h = h ^ (h >> 16)
    return (h >> 8).to(torch.float32) * 2.0**-24


def step_key(t: int | torch.Tensor, index: int) -> int | torch.Tensor:
    """The hash key of optimizer step ``t`` (a number, or the device's step counter) in layer ``index``
    (spreads (t, layer) over 32 bits)."""
    return (t * 0x9E3779B1 + index * 0x85EBCA77) & _LOW32


def update_layer_state(
    weight: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    held_scale: torch.Tensor,
    step: torch.Tensor,
    thresholds: torch.Tensor,
    index: int,
    keep: float,
    restart_observed: bool,
    qmin: int,
    qmax: int,
    complete_at: int | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One LTS update of a layer (LTS.md §2–4) on its device, in place, without a host synchronisation;
    returns the frozen weights per output channel (int32) and in all.

    ``weight`` and ``packed`` are ``[out_channels, K]`` views of the layer's weight and state, ``scale`` its
    ``C`` steps and ``held_scale`` their copy kept for a fully frozen weight (restored here: under DDP it
    gets zero gradients, which momentum would turn into updates). ``step`` is the layer's ``lts_step`` (this
    optimizer step, on the device), ``thresholds[t]`` is ``r(t)`` in fixed point (``-1`` while nothing may
    freeze), ``index`` the layer's position (with ``step``, it seeds the stochastic rounding), ``keep = 1 - m``
    (rounded to float32), ``restart_observed`` selects ``distance_init="observed"`` and ``complete_at``
    (frozen weights of a channel that complete it, or ``None``) channel completion. Frozen weights keep
    their state and get their held latent value back; trainable ones update their distance EMA in fixed
    point,

        d ← d + floor((1 - m) · (d_now - d) + u),    u ~ U[0, 1)   (stochastic rounding),

    restart at a whole step when their level changed (with ``restart_observed``, an EMA at exactly one
    step instead takes the distance it observes: ``1 - m`` is 1 there), and freeze (snapped onto their
    level) once ``d ≤ r(t)``. Only integer ops and single IEEE float ops: the native, eager and compiled
    results agree bit for bit.
    """
    channels, per_row = weight.shape
    frozen = (packed & state.FROZEN_BIT) != 0
    scale = scale.copy_(torch.where(frozen.all(), held_scale, scale))
    held_scale.copy_(scale)
    s = torch.clamp(scale, min=SCALE_EPS).view(-1, 1)
    v = weight.float() * torch.reciprocal(s)
    q = torch.round(v).clamp_(qmin, qmax)
    d_now = (v - q).abs_().clamp_(max=state.DISTANCE_MAX).mul_(state.DISTANCE_ONE)
    old = packed & state.DISTANCE_MASK
    rate = torch.where((old == state.DISTANCE_ONE) & restart_observed, 1.0, keep)
    key = step_key(step, index)  # on the device: ``step`` is a tensor
    draws = torch.arange(packed.numel(), device=packed.device).view(packed.shape)
    delta = torch.floor(rate * (d_now - old.float()) + _hash_uniform(draws, key))
    fixed = (old + delta.to(torch.int32)).clamp_(0, state.DISTANCE_MASK)
    level = q.to(torch.int32)
    fixed = torch.where(level != (packed >> state.LEVEL_SHIFT), state.DISTANCE_ONE, fixed)
    threshold = torch.index_select(thresholds, 0, step.clamp(max=thresholds.numel() - 1).view(1))
    newly = ~frozen & (fixed <= threshold)
    low = torch.where(newly, state.bfloat16_bits(q * s) + state.FROZEN_BIT, fixed)
    new = torch.where(frozen, packed, level * (1 << state.LEVEL_SHIFT) + low)
    frozen_now = (new & state.FROZEN_BIT) != 0
    per_channel = frozen_now.sum(1)
    if complete_at is not None:  # freeze the rest of each channel past the share, at its level
        complete = (per_channel >= complete_at) & (per_channel < per_row)
        fill = complete.view(-1, 1) & ~frozen_now
        levels = state.levels(new)
        new = torch.where(fill, state.pack_frozen(levels, levels * s), new)
        frozen_now = (new & state.FROZEN_BIT) != 0
        per_channel = frozen_now.sum(1)
    packed.copy_(new)
    weight.copy_(torch.where(frozen_now, state.from_bfloat16_bits(new).to(weight.dtype), weight))
    return per_channel.to(torch.int32), per_channel.sum()


UPDATE = Kernel(
    update_layer_state,
    None,
    {
        "index": torch.int64,
        "keep": torch.float32,
        "restart_observed": torch.bool,
        "qmin": torch.float32,
        "qmax": torch.float32,
        "complete_at": torch.int64,
    },
    {"weight": "RK", "packed": "RK", "scale": "R", "held_scale": "R", "thresholds": "T"},
)


@functools.lru_cache(maxsize=1024)
def completion_count(share: float, per_row: int) -> int:
    """The fewest frozen weights of ``per_row`` that complete a channel at ``share``: the count ``c`` from
    which ``c / per_row ≥ share`` in float32, as the native update compares."""
    counts = torch.arange(per_row + 1)
    return int((counts / per_row >= share).nonzero()[0])


class UpdateGraph:
    """The scratcher's updates (``updates``: `hf_lts.scratcher.LotteryTicketScratcher`'s) as one CUDA graph: a step of a few
    dozen small kernels costs the host more than the device (about 0.5 ms per layer on an H200 host,
    launched one by one), a replay costs one call.

    A plan (which layers update, at which completion count) runs eagerly the first time (that compiles
    its kernels and makes their constants), is captured the second, and replays from then on, until the
    plan or a tensor's address changes (a layer fully frozen, the model moved). Off CUDA, or with
    ``HF_LTS_CUDA_GRAPHS=0``, or once a capture failed (with a warning), every step runs eagerly.
    """

    def __init__(self, layers: dict[str, QuantLayerMixin], updates: Callable[..., list]) -> None:
        self.layers, self.updates = layers, updates
        self.enabled = os.environ.get("HF_LTS_CUDA_GRAPHS", "1") != "0"
        self._seen: tuple[object, ...] | None = None
        self._captured: tuple[tuple[object, ...], torch.cuda.CUDAGraph, list] | None = None

    def _key(self, plan: list[tuple[int, int | None]], thresholds: torch.Tensor) -> tuple[object, ...]:
        tensors = [thresholds]
        for layer in self.layers.values():
            tensors += [layer.weight, layer.lts_state, layer.weight_quantizer.scale, layer.lts_held_scale]
            tensors += [layer.lts_step]
        return (tuple(plan), *[t.data_ptr() for t in tensors])

    def run(self, plan: list[tuple[int, int | None]], thresholds: torch.Tensor, backend: str) -> list:
        updates = self.updates
        if not self.enabled or thresholds.device.type != "cuda":
            return updates(plan, thresholds, backend)
        key = self._key(plan, thresholds)
        if self._captured is not None and self._captured[0] == key:
            _, graph, outputs = self._captured
        elif self._seen != key:
            self._seen, self._captured = key, None
            return updates(plan, thresholds, backend)
        else:
            self._captured = None  # (its memory goes back to the pool before the new capture)
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph):
                    outputs = updates(plan, thresholds, backend)
            except Exception as err:  # nothing ran: run eagerly, now and from now on
                warnings.warn(
                    f"hf-lts: the scratcher's CUDA graph failed ({err}); it runs eagerly.", stacklevel=4
                )
                self.enabled = False
                return updates(plan, thresholds, backend)
            self._captured = (key, graph, outputs)
        graph.replay()
        layers = self.layers.values()
        written = [
            t for layer in layers for t in (layer.weight, layer.lts_state, layer.weight_quantizer.scale)
        ]
        torch.autograd.graph.increment_version(written)  # what eager writes would have bumped
        return outputs
