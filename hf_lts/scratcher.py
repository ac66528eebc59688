"""The lottery ticket scratcher: distance EMA, freezing schedule, freezing, statistics (LTS.md §2–5).

It works on the LTS state buffers of a prepared model and knows nothing of the Trainer: call
`LotteryTicketScratcher.step` once after every optimizer step.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from .config import LTSConfig
from .quantization import native, state
from .quantization.layers import QuantLayerMixin
from .quantization.lsq import SCALE_EPS, Kernel, compile_default
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


def _step_key(t: int, index: int) -> int:
    """The hash key of optimizer step ``t`` in layer ``index`` (spreads (t, layer) over 32 bits)."""
    return (t * 0x9E3779B1 + index * 0x85EBCA77) & _LOW32


def update_layer_state(
    weight: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    key: int,
    keep: float,
    threshold: int,
    restart_observed: bool,
    qmin: int,
    qmax: int,
    restore: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One LTS update of a layer (LTS.md §2–4), in place; returns how many weights froze now and how many
    are frozen per output channel (which channels can skip their weight gradient, or be completed).

    ``weight`` and ``packed`` are ``[out_channels, -1]`` aliases of the layer's weight and state, ``scale``
    its ``C`` steps, ``key`` seeds the stochastic rounding, ``keep = 1 - m`` (rounded to float32),
    ``threshold`` is ``r(t)`` in fixed point (``-1`` while nothing may freeze) and ``restart_observed``
    selects ``distance_init="observed"`` (a compiled kernel takes the last three as 0-d tensors). Frozen
    weights keep their state and get their held latent value back; trainable ones update their distance
    EMA in fixed point,

        d ← d + floor((1 - m) · (d_now - d) + u),    u ~ U[0, 1)   (stochastic rounding),

    restart at a whole step when their level changed (with ``restart_observed``, an EMA at exactly one
    step instead takes the distance it observes: ``1 - m`` is 1 there), and freeze (snapped onto their
    level) once ``d ≤ r(t)``. Only integer ops and single IEEE float ops: the eager and compiled results
    agree bit for bit. ``restore=False`` (a layer with no frozen weight yet) leaves ``weight`` alone, a
    weight-sized write saved: the caller snaps weights that froze now (`QuantLayerMixin._restore_frozen`).
    """
    channels = scale.shape[0]
    flat_weight, flat_packed = weight, packed
    weight, packed = weight.view(channels, -1), packed.view(channels, -1)
    scale = torch.clamp(scale, min=SCALE_EPS).view(channels, 1)
    frozen = (packed & state.FROZEN_BIT) != 0
    v = weight.float() * torch.reciprocal(scale)
    q = torch.round(v).clamp_(qmin, qmax)
    d_now = (v - q).abs_().clamp_(max=state.DISTANCE_MAX).mul_(state.DISTANCE_ONE)
    old = packed & state.DISTANCE_MASK
    rate = torch.where((old == state.DISTANCE_ONE) & restart_observed, 1.0, keep)
    index = torch.arange(packed.numel(), device=packed.device).view(packed.shape)
    delta = torch.floor(rate * (d_now - old.float()) + _hash_uniform(index, key))
    fixed = (old + delta.to(torch.int32)).clamp_(0, state.DISTANCE_MASK)
    level = q.to(torch.int32)
    fixed = torch.where(level != (packed >> state.LEVEL_SHIFT), state.DISTANCE_ONE, fixed)
    newly = ~frozen & (fixed <= threshold)
    low = torch.where(newly, state.bfloat16_bits(q * scale) + state.FROZEN_BIT, fixed)
    new = torch.where(frozen, packed, level * (1 << state.LEVEL_SHIFT) + low)
    flat_packed.copy_(new.view_as(flat_packed))
    frozen_now = (new & state.FROZEN_BIT) != 0
    if restore:
        held = state.from_bfloat16_bits(new).to(weight.dtype)
        flat_weight.copy_(torch.where(frozen_now, held, weight).view_as(flat_weight))
    return newly.sum(), frozen_now.view_as(flat_packed).sum(1)


#: One layer's update as a `torch.compile` kernel off the CPU, or eagerly; on a CPU the scratcher updates
#: every layer in one native call instead (`LotteryTicketScratcher._update`), so there is no per-layer op.
_UPDATE = Kernel(update_layer_state, None, {4: torch.float32, 5: torch.int32, 6: torch.bool})


class LotteryTicketScratcher:
    """Tracks how far each quantized weight is from its level and freezes the settled ones.

    Args:
        model: a model prepared with `hf_lts.prepare_model`.
        config: its `LTSConfig` (default: ``model.lts_config``).
        total_steps: ``T``, the run's number of optimizer steps (sets warm-up and schedule).
        compile: run the per-layer update as one fused kernel (native on a CPU, `torch.compile` elsewhere;
            bit-identical to eager). ``None``: unless ``HF_LTS_COMPILE=0``. If that fails, it warns and
            stays eager.

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
        compile: bool | None = None,
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
        self._compile = compile_default() if compile is None else compile
        # weight._version after our last write, per fully frozen layer: unchanged means no optimizer
        # touched it (its gradient was None), so there is nothing to restore.
        self._restored_version: dict[str, int] = {}
        self._aliases: dict[str, tuple[torch.Tensor, ...]] = {}

    @property
    def step_count(self) -> int:
        """Optimizer steps seen so far (read from the layers' buffers)."""
        return int(next(iter(self.layers.values())).lts_step)

    @torch.no_grad()
    def step(self) -> None:
        """Account for one optimizer step: restore frozen latent weights, update distances, freeze."""
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
            newly_frozen, per_channels = self._update(updates, scalars)
            for (layer, _, _), newly, per_channel in zip(updates, newly_frozen, per_channels, strict=True):
                if newly:
                    first = layer._num_frozen == 0  # the kernel did not touch its weight: snap them here
                    layer._num_frozen += newly
                    if first:
                        layer._restore_frozen()
                    if config.channel_completion is not None:
                        per_channel = self._complete_channels(layer, config.channel_completion, per_channel)
                    layer._refresh_active_channels(per_channel)
        layers = list(self.layers.values())  # the counters, as one op each rather than one per layer
        torch._foreach_add_(
            [layer.lts_frozen_steps for layer in layers], [layer.num_frozen for layer in layers]
        )
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
        ratio = per_channel / per_row
        rows = ((ratio >= share) & (ratio < 1)).nonzero().flatten()
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
        if cached is None or [a.data_ptr() for a in cached] != [
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

    def _update(
        self, updates: list[tuple[QuantLayerMixin, str, int]], scalars: tuple[float, int, bool]
    ) -> tuple[list[int], list[torch.Tensor]]:
        """`update_layer_state` of ``updates`` (layer, name, hash key): weights frozen now per layer, and
        frozen weights per output channel. On a CPU one native call updates every layer."""
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
        restore = [layer.num_frozen > 0 for layer in layers]
        ops = native.ops() if self._compile and layers[0].weight.device.type == "cpu" else None
        if ops is not None:
            weights, packed, scales = (list(column) for column in zip(*flats, strict=True))
            newly, per_channel = ops.update_layers(
                weights, packed, scales, [key for _, _, key in updates], *scalars,
                *([list(b) for b in zip(*bounds, strict=True)]), [int(r) for r in restore],
            )  # fmt: skip
            torch.autograd.graph.increment_version(weights + packed)  # written in place by the native op
            newly = newly.tolist()
        else:
            results = [
                _UPDATE(*flat, key, *scalars, *bound, again, compiled=self._compile)
                for flat, (_, _, key), bound, again in zip(flats, updates, bounds, restore, strict=True)
            ]
            newly = torch.stack([n for n, _ in results]).tolist()
            per_channel = [c for _, c in results]
        for layer, flat in zip(layers, flats, strict=True):
            if flat[0].data_ptr() != layer.weight.data_ptr():
                layer.weight.detach().copy_(flat[0].view_as(layer.weight))
        return newly, per_channel

    def stats(self) -> dict[str, Any]:
        """Frozen ratio now, and the weight updates and backward FLOPs saved so far (LTS.md §5).

        ``backward_flops_saved`` is the paper's count (every frozen weight's share of its layer's
        weight-gradient work); ``backward_flops_saved_realised`` is the work the backward pass actually
        skipped: the weight gradients of output channels (or whole layers) with no trainable weight left.
        """
        t = self.step_count
        numel = {n: layer.weight.numel() for n, layer in self.layers.items()}
        total = sum(numel.values())
        frozen_steps = {n: float(layer.lts_frozen_steps) for n, layer in self.layers.items()}
        skipped_steps = {n: float(layer.lts_skipped_steps) for n, layer in self.layers.items()}
        macs = {n: int(layer.lts_macs) for n, layer in self.layers.items()}
        all_macs = sum(macs.values())
        saved_flops = realised_flops = 0.0
        if t and all_macs:
            saved_flops = sum(frozen_steps[n] / numel[n] * macs[n] for n in self.layers) / (2 * all_macs * t)
            realised_flops = sum(skipped_steps[n] * macs[n] for n in self.layers) / (2 * all_macs * t)
        return {
            "step": t,
            "total_steps": self.total_steps,
            "frozen_ratio": sum(layer.num_frozen for layer in self.layers.values()) / total,
            "weight_updates_saved": sum(frozen_steps.values()) / (total * t) if t else 0.0,
            "backward_flops_saved": saved_flops,
            "backward_flops_saved_realised": realised_flops,
            "state_bytes_per_weight": sum(
                layer.lts_state.numel() * layer.lts_state.element_size() for layer in self.layers.values()
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
                for n, layer in self.layers.items()
            },
        }
