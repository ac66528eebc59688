"""The lottery ticket scratcher: distance EMA, freezing schedule, freezing, statistics (LTS.md §2–5).

It works on the LTS state buffers of a prepared model and knows nothing of the Trainer: call
`LotteryTicketScratcher.step` once after every optimizer step.
"""

from __future__ import annotations

import functools
import math
import os
import warnings
from typing import Any

import numpy as np
import torch
from torch import nn

from .config import LTSConfig
from .quantization import backend as backends
from .quantization import native, state
from .quantization.layers import QuantLayerMixin
from .quantization.lsq import SCALE_EPS, Kernel
from .quantization.prepare import quantized_layers


def warmup_steps(config: LTSConfig, total_steps: int) -> int:
    """``t_w = round(freeze_warmup_ratio · T)``: no weight freezes at ``t ≤ t_w``."""
    return round(config.freeze_warmup_ratio * total_steps)


def freeze_threshold(config: LTSConfig, step: int, total_steps: int) -> float | None:
    """The threshold ``r(t)`` in units of the step, or ``None`` while nothing may freeze (warm-up)."""
    t_w = warmup_steps(config, total_steps)
    if step <= t_w:
        return None
    if config.freeze_schedule == "constant":
        return config.freeze_threshold
    p = min(1.0, (step - t_w) / max(1, total_steps - t_w))
    return p if config.freeze_schedule == "linear" else math.sin(math.pi / 2 * p)


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


def _step_key(t: int | torch.Tensor, index: int) -> int | torch.Tensor:
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
    key = _step_key(step, index)  # on the device: ``step`` is a tensor
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


_UPDATE = Kernel(
    update_layer_state,
    None,
    {6: torch.int64, 7: torch.float32, 8: torch.bool, 9: torch.float32, 10: torch.float32, 11: torch.int64},
    ("RK", "RK", "R", "R", "", "T", "", "", "", "", "", ""),
)


@functools.lru_cache(maxsize=1024)
def completion_count(share: float, per_row: int) -> int:
    """The fewest frozen weights of ``per_row`` that complete a channel at ``share``: the count ``c`` from
    which ``c / per_row ≥ share`` in float32, as the native update compares."""
    counts = torch.arange(per_row + 1)
    return int((counts / per_row >= share).nonzero()[0])


class _Graph:
    """The scratcher's updates (`LotteryTicketScratcher._updates`) as one CUDA graph: a step of a few
    dozen small kernels costs the host more than the device (about 0.5 ms per layer on an H200 host,
    launched one by one), a replay costs one call.

    A plan (which layers update, at which completion count) runs eagerly the first time (that compiles
    its kernels and makes their constants), is captured the second, and replays from then on, until the
    plan or a tensor's address changes (a layer fully frozen, the model moved). Off CUDA, or with
    ``HF_LTS_CUDA_GRAPHS=0``, or once a capture failed (with a warning), every step runs eagerly.
    """

    def __init__(self, scratcher: LotteryTicketScratcher) -> None:
        self.scratcher = scratcher
        self.enabled = os.environ.get("HF_LTS_CUDA_GRAPHS", "1") != "0"
        self._seen: tuple[object, ...] | None = None
        self._captured: tuple[tuple[object, ...], torch.cuda.CUDAGraph, list] | None = None

    def _key(self, plan: list[tuple[int, int | None]], thresholds: torch.Tensor) -> tuple[object, ...]:
        tensors = [thresholds]
        for layer in self.scratcher.layers.values():
            tensors += [layer.weight, layer.lts_state, layer.weight_quantizer.scale, layer.lts_held_scale]
            tensors += [layer.lts_step]
        return (tuple(plan), *[t.data_ptr() for t in tensors])

    def run(self, plan: list[tuple[int, int | None]], thresholds: torch.Tensor, backend: str) -> list:
        updates = self.scratcher._updates
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
        layers = self.scratcher.layers.values()
        written = [
            t for layer in layers for t in (layer.weight, layer.lts_state, layer.weight_quantizer.scale)
        ]
        torch.autograd.graph.increment_version(written)  # what eager writes would have bumped
        return outputs


class LotteryTicketScratcher:
    """Tracks how far each quantized weight is from its level and freezes the settled ones.

    Args:
        model: a model prepared with `hf_lts.prepare_model`.
        config: its `LTSConfig` (default: ``model.lts_config``).
        total_steps: ``T``, the run's number of optimizer steps (sets warm-up and schedule).

    All state, the step counter included, lives in the layers' buffers: a model restored from a
    ``state_dict`` mid-run continues exactly, and a new scratcher over it picks up where it was.
    Stochastic rounding of the distance draws from a counter-based hash keyed by (step, layer, weight),
    so the update is reproducible on resume and identical on every DDP rank.
    """

    def __init__(
        self,
        model: nn.Module,
        config: LTSConfig | None = None,
        total_steps: int = 1,
    ) -> None:
        self.config = config if config is not None else getattr(model, "lts_config", None)
        if self.config is None:
            raise ValueError(
                "The model is not prepared for LTS: call hf_lts.prepare_model(model, config) first."
            )
        self.layers: dict[str, QuantLayerMixin] = quantized_layers(model)
        if not self.layers:
            raise ValueError(
                "The model has no QuantConv2d/QuantLinear layer: call hf_lts.prepare_model(model, config) first."
            )
        if not isinstance(total_steps, int) or total_steps < 1:
            raise ValueError(f"total_steps={total_steps!r}: pass the run's number of optimizer steps (≥ 1).")
        self.total_steps = total_steps
        # weight._version after our last write, per fully frozen layer: unchanged means no optimizer
        # touched it (its gradient was None), so there is nothing to restore.
        self._restored_version: dict[str, int] = {}
        self._aliases: dict[str, tuple[torch.Tensor, ...]] = {}
        self._thresholds: tuple[tuple[int, str], torch.Tensor] | None = None
        self._pending: tuple[torch.Tensor, torch.cuda.Event | None] | None = None
        self._counts: list[np.ndarray | None] = [None] * len(self.layers)
        # frozen counts (per channel, in all) of fully frozen layers: constant
        self._full_counts: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._graph = _Graph(self)
        # A checkpoint is taken with the counts applied (and a loaded one applies them exactly), so a run
        # resumed from it skips the channels the uninterrupted run skips, step for step.
        model.register_state_dict_pre_hook(lambda *args, **kwargs: self._collect())
        model.register_load_state_dict_pre_hook(lambda *args, **kwargs: setattr(self, "_pending", None))

    @property
    def step_count(self) -> int:
        """Optimizer steps seen so far (read from the layers' buffers)."""
        return int(next(iter(self.layers.values())).lts_step)

    def _backend(self) -> str:
        layer = next(iter(self.layers.values()))
        return backends.select(layer.weight.device, layer.weight.dtype)

    @torch.no_grad()
    def step(self) -> None:
        """Account for one optimizer step: restore frozen latent weights, update distances, freeze."""
        backend = self._backend()
        if backend == "native":
            self._native_step()
        else:
            self._device_step(backend)

    def _native_step(self) -> None:
        """The step on a CPU: one native call updates every layer, and the host reads what froze at once."""
        t = self.step_count + 1
        config = self.config
        threshold = freeze_threshold(config, t, self.total_steps) if config.freeze else None
        device = next(iter(self.layers.values())).lts_state.device
        scalars = (
            1.0 - config.distance_momentum,
            -1 if threshold is None else math.floor(threshold * state.DISTANCE_ONE),
            config.distance_init == "observed",
        )
        updates = []  # (layer, name, key) of the layers with a trainable weight
        for index, (name, layer) in enumerate(self.layers.items()):
            if not config.freeze:
                layer._restore_frozen()
            elif layer.num_frozen < layer.weight.numel():
                updates.append((layer, name, _step_key(t, index)))
            elif self._restored_version.get(name) != layer.weight._version:
                layer._restore_frozen()
                self._restored_version[name] = layer.weight._version
        step = torch.tensor(t, dtype=torch.int64, device=device)
        torch._foreach_copy_([layer.lts_step for layer in self.layers.values()], [step] * len(self.layers))
        if updates:
            newly_frozen, per_channels = self._native_update(updates, scalars)
            for (layer, _, _), newly, per_channel in zip(updates, newly_frozen, per_channels, strict=True):
                if newly:
                    first = layer._num_frozen == 0  # the kernel did not touch its weight: snap them here
                    layer._note_frozen(newly)
                    if first:
                        layer._restore_frozen()
                    if config.channel_completion is not None:
                        per_channel = self._complete_channels(layer, config.channel_completion, per_channel)
                    layer._refresh_active_channels(per_channel)
        self._add_counters([layer.num_frozen for layer in self.layers.values()])

    def _add_counters(self, frozen: list[int] | list[torch.Tensor]) -> None:
        """Σ frozen weights and Σ skipped weight-gradient share, one op each rather than one per layer."""
        layers = list(self.layers.values())
        torch._foreach_add_([layer.lts_frozen_steps for layer in layers], frozen)
        torch._foreach_add_(
            [layer.lts_skipped_steps for layer in layers],
            [layer.skipped_weight_grad_ratio for layer in layers],
        )

    @staticmethod
    def _complete_channels(layer: QuantLayerMixin, share: float, per_channel: torch.Tensor) -> torch.Tensor:
        """Freeze the rest of every output channel of which at least ``share`` is frozen (``per_channel``
        frozen weights of ``layer.weight[0].numel()``), at its current level: the channel's weight gradient
        is then skipped (LTS.md §7, channel completion). Returns the frozen weights per channel after it."""
        per_row = layer.weight[0].numel()
        rows = (
            ((per_channel >= completion_count(share, per_row)) & (per_channel < per_row)).nonzero().flatten()
        )
        if rows.numel() == 0:
            return per_channel
        part = layer.lts_state.index_select(0, rows)
        layer._freeze_at(~state.frozen(part), state.levels(part), rows)
        return per_channel.index_fill(0, rows, per_row)

    def _flat_args(self, name: str, layer: QuantLayerMixin) -> tuple[torch.Tensor, ...] | None:
        """Detached ``[out_channels, -1]`` aliases of the layer's weight and state, and its steps (made once:
        they share storage, so they see every update), or ``None`` for a non-contiguous weight."""
        cached = self._aliases.get(name)
        weight, packed, scale = layer.weight, layer.lts_state, layer.weight_quantizer.scale
        if cached is None or [a.data_ptr() for a in cached[:3]] != [
            weight.data_ptr(),
            packed.data_ptr(),
            scale.data_ptr(),
        ]:
            if not (weight.is_contiguous() and weight.dtype == scale.dtype == torch.float32):
                return None
            channels = weight.shape[0]
            cached = self._aliases[name] = (
                weight.detach().view(channels, -1),
                packed.view(channels, -1),
                scale.detach().view(-1),
            )
        return cached

    def _native_update(
        self, updates: list[tuple[QuantLayerMixin, str, int]], scalars: tuple[float, int, bool]
    ) -> tuple[list[int], list[torch.Tensor]]:
        """`hf_lts::update_layers` of ``updates`` (layer, name, hash key): weights frozen now per layer, and
        frozen weights per output channel."""
        layers = [layer for layer, _, _ in updates]
        flats = []
        for layer, name, _ in updates:
            flat = self._flat_args(name, layer)
            if flat is None:  # a non-contiguous (or non-fp32) layer: flat fp32 copies, written back below
                weight = layer.weight.detach()
                flat = (
                    weight.reshape(weight.shape[0], -1).to(torch.float32, copy=True),
                    layer.lts_state.view(weight.shape[0], -1),
                    layer.weight_quantizer.scale.detach().float(),
                )
            flats.append(flat)
        bounds = [(layer.weight_quantizer.qmin, layer.weight_quantizer.qmax) for layer in layers]
        restore = [int(layer.num_frozen > 0) for layer in layers]
        weights, packed, scales = (list(column) for column in zip(*flats, strict=True))
        newly, per_channel = native.ops().update_layers(
            weights, packed, scales, [key for _, _, key in updates], *scalars,
            *([list(b) for b in zip(*bounds, strict=True)]), restore,
        )  # fmt: skip
        torch.autograd.graph.increment_version(weights + packed)  # written in place by the native op
        for layer, flat in zip(layers, flats, strict=True):
            if flat[0].data_ptr() != layer.weight.data_ptr():
                layer.weight.detach().copy_(flat[0].view_as(layer.weight))
        return newly.tolist(), per_channel

    # -- the device's step: no host synchronisation ----------------------------------------------------
    def _device_step(self, backend: str) -> None:
        """The step of the compiled and eager backends (a GPU's): every decision stays on the device. The
        step counter advances there, thresholds come from a device table, each layer's update (with channel
        completion) is one kernel, the counters add device values, and the frozen counts per channel travel
        to the host without waiting: the host applies them (skipped channels, fully frozen layers) at the
        next step, when they have long arrived. On a GPU the updates replay as one CUDA graph (`_Graph`)."""
        config = self.config
        layers = list(self.layers.values())
        self._collect()
        if not config.freeze:
            torch._foreach_add_([layer.lts_step for layer in layers], 1)
            for layer in layers:
                layer._restore_frozen()
            self._add_counters([0] * len(layers))
            return
        thresholds = self._threshold_table(layers[0].lts_state.device)
        counts: list[torch.Tensor | None] = [None] * len(layers)
        totals: list[torch.Tensor | None] = [None] * len(layers)
        plan = []  # (index, completion count) of the layers to update
        for index, (name, layer) in enumerate(self.layers.items()):
            full = layer.num_frozen == layer.weight.numel()  # (as the host knows it: late, but monotone)
            if full and self._restored_version.get(name) == layer.weight._version:
                counts[index], totals[index] = self._full_counts[index]  # nothing touched it: nothing to hold
                continue
            complete_at = None
            if config.channel_completion is not None:
                complete_at = completion_count(config.channel_completion, layer.weight[0].numel())
            plan.append((index, complete_at))
        outputs = self._graph.run(plan, thresholds, backend)
        names = list(self.layers)
        for (index, _), (per_channel, total) in zip(plan, outputs, strict=True):
            counts[index], totals[index] = per_channel, total
            layer = layers[index]
            if layer.num_frozen == layer.weight.numel():
                self._restored_version[names[index]] = layer.weight._version
                self._full_counts[index] = (per_channel.clone(), total.clone())  # (a replay overwrites them)
        self._add_counters(totals)
        self._send(torch.cat(counts))

    def _updates(
        self, plan: list[tuple[int, int | None]], thresholds: torch.Tensor, backend: str
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Advance the step counters and update the layers of ``plan``: frozen weights per channel and in
        all, per layer (device tensors)."""
        config, layers = self.config, list(self.layers.values())
        keep, observed = 1.0 - config.distance_momentum, config.distance_init == "observed"
        torch._foreach_add_([layer.lts_step for layer in layers], 1)
        outputs = []
        for index, complete_at in plan:
            layer = layers[index]
            wq, channels = layer.weight_quantizer, layer.weight.shape[0]
            args = (layer.weight.view(channels, -1).detach(), layer.lts_state.view(channels, -1).detach())
            args += (
                wq.scale.detach(),
                layer.lts_held_scale,
                layer.lts_step,
                thresholds,
                index,
                keep,
                observed,
            )
            outputs.append(_UPDATE(*args, wq.qmin, wq.qmax, complete_at, backend=backend))
        return outputs

    def _threshold_table(self, device: torch.device) -> torch.Tensor:
        """``r(t)`` in fixed point for ``t = 0 … T`` on ``device`` (``-1`` during warm-up), computed by
        `freeze_threshold` once per run length: the device indexes it with its own step counter."""
        key = (self.total_steps, str(device))
        if self._thresholds is None or self._thresholds[0] != key:
            table = [
                -1 if (r := freeze_threshold(self.config, t, self.total_steps)) is None
                else math.floor(r * state.DISTANCE_ONE)
                for t in range(self.total_steps + 1)
            ]  # fmt: skip
            self._thresholds = (key, torch.tensor(table, dtype=torch.int32).to(device))
        return self._thresholds[1]

    def _send(self, counts: torch.Tensor) -> None:
        """Start copying the frozen counts per channel to the host, without waiting for them."""
        if counts.device.type == "cuda":
            host = torch.empty(counts.shape, dtype=counts.dtype, pin_memory=True)
            host.copy_(counts, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self._pending = (host, event)
        else:
            self._pending = (counts.clone(), None)

    def _collect(self) -> None:
        """Apply the counts `_send` sent (after the step that sent them, they are there: waiting for them
        does not stall the device's queue, which already holds the next step)."""
        if self._pending is None:
            return
        host, event = self._pending
        self._pending = None
        if event is not None:
            event.synchronize()
        counts = host.numpy()
        offset = 0
        for i, layer in enumerate(self.layers.values()):
            channels = layer.weight.shape[0]
            part = counts[offset : offset + channels]
            offset += channels
            if self._counts[i] is None or not np.array_equal(part, self._counts[i]):
                self._counts[i] = part.copy()
                layer._set_frozen_counts(part)

    def stats(self) -> dict[str, Any]:
        """`layer_stats` of this scratcher's layers (the savings so far; reads the device)."""
        self._collect()
        return layer_stats(self.layers, self.total_steps)


def layer_stats(layers: dict[str, QuantLayerMixin], total_steps: int | None = None) -> dict[str, Any]:
    """Frozen ratio now, and the weight updates and backward FLOPs saved so far (LTS.md §5), from the
    layers' buffers (`LotteryTicketScratcher.stats`; an export reads them without a scratcher).

    ``backward_flops_saved`` is the paper's count (every frozen weight's share of its layer's
    weight-gradient work); ``backward_flops_saved_realised`` is the work the backward pass actually
    skipped: the weight gradients of output channels (or whole layers) with no trainable weight left.
    """
    t = int(next(iter(layers.values())).lts_step)
    numel = {n: layer.weight.numel() for n, layer in layers.items()}
    total = sum(numel.values())
    frozen_steps = {n: float(layer.lts_frozen_steps) for n, layer in layers.items()}
    skipped_steps = {n: float(layer.lts_skipped_steps) for n, layer in layers.items()}
    macs = {n: int(layer.lts_macs) for n, layer in layers.items()}
    all_macs = sum(macs.values())
    saved_flops = realised_flops = 0.0
    if t and all_macs:
        saved_flops = sum(frozen_steps[n] / numel[n] * macs[n] for n in layers) / (2 * all_macs * t)
        realised_flops = sum(skipped_steps[n] * macs[n] for n in layers) / (2 * all_macs * t)
    return {
        "step": t,
        "total_steps": total_steps,
        "frozen_ratio": sum(layer.num_frozen for layer in layers.values()) / total,
        "weight_updates_saved": sum(frozen_steps.values()) / (total * t) if t else 0.0,
        "backward_flops_saved": saved_flops,
        "backward_flops_saved_realised": realised_flops,
        "state_bytes_per_weight": sum(
            layer.lts_state.numel() * layer.lts_state.element_size() for layer in layers.values()
        )
        / total,
        "quantized_weights": total,
        "per_layer": {
            n: {
                "frozen_ratio": layer.num_frozen / numel[n],
                "skipped_weight_grad_ratio": layer.skipped_weight_grad_ratio,
                "weight_bits": layer.weight_quantizer.bits,
                "activation_bits": layer.input_quantizer.bits,
                "numel": numel[n],
            }
            for n, layer in layers.items()
        },
    }
