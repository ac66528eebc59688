"""The lottery ticket scratcher: distance EMA, freezing schedule, freezing, statistics (LTS.md §2–5).

It works on the LTS state buffers of a prepared model and knows nothing of the Trainer: call
`LotteryTicketScratcher.step` once after every optimizer step.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn

from .config import LTSConfig
from .quantization import backend as backends
from .quantization import native, state
from .quantization.layers import QuantLayerMixin
from .quantization.prepare import quantized_layers
from .quantization.stats import layer_stats
from .update import UPDATE, UpdateGraph, completion_count, step_key


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
        self._graph = UpdateGraph(self.layers, self._updates)
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
                updates.append((layer, name, step_key(t, index)))
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
        next step, when they have long arrived. On a GPU the updates replay as one CUDA graph (`UpdateGraph`)."""
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
            outputs.append(UPDATE(*args, wq.qmin, wq.qmax, complete_at, backend=backend))
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
