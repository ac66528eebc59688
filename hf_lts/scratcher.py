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
from .quantization import state
from .quantization.layers import QuantLayerMixin
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


class LotteryTicketScratcher:
    """Tracks how far each quantized weight is from its level and freezes the settled ones.

    Args:
        model: a model prepared with `hf_lts.prepare_model`.
        config: its `LTSConfig` (default: ``model.lts_config``).
        total_steps: ``T``, the run's number of optimizer steps (sets warm-up and schedule).

    All state, the step counter included, lives in the layers' buffers: a model restored from a
    ``state_dict`` mid-run continues exactly, and a new scratcher over it picks up where it was.
    Stochastic rounding of the distance draws from a generator seeded by (step, layer), so the update is
    reproducible on resume and identical on every DDP rank.
    """

    def __init__(self, model: nn.Module, config: LTSConfig | None = None, total_steps: int = 1) -> None:
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
        self._generators: dict[torch.device, torch.Generator] = {}

    @property
    def step_count(self) -> int:
        """Optimizer steps seen so far (read from the layers' buffers)."""
        return int(next(iter(self.layers.values())).lts_step)

    @torch.no_grad()
    def step(self) -> None:
        """Account for one optimizer step: restore frozen latent weights, update distances, freeze."""
        t = self.step_count + 1
        threshold = freeze_threshold(self.config, t, self.total_steps) if self.config.freeze else None
        for index, layer in enumerate(self.layers.values()):
            layer._restore_frozen()
            if self.config.freeze:
                self._update(layer, t, index, threshold)
            layer.lts_step.fill_(t)
            layer.lts_frozen_steps += layer.num_frozen

    def _uniform(self, like: torch.Tensor, t: int, index: int) -> torch.Tensor:
        generator = self._generators.get(like.device)
        if generator is None:
            generator = self._generators[like.device] = torch.Generator(device=like.device)
        generator.manual_seed((t << 16) + index)
        return torch.rand(like.shape, generator=generator, device=like.device)

    def _update(self, layer: QuantLayerMixin, t: int, index: int, threshold: float | None) -> None:
        packed = layer.lts_state
        trainable = ~state.frozen(packed)
        levels, v = layer.weight_quantizer.levels(layer.weight)
        d_now = (v - levels).abs_().clamp_(max=state.DISTANCE_MAX)
        # d ← m·d + (1-m)·d_now, written as a lerp so that d_now is an exact fixed point in fp32.
        d = torch.lerp(state.distance(packed), d_now, 1.0 - self.config.distance_momentum)
        fixed = torch.floor_(d.mul_(state.DISTANCE_ONE).add_(self._uniform(d, t, index)))
        fixed = fixed.clamp_(max=state.DISTANCE_MASK).to(torch.int32)
        # A weight whose level changed has just crossed a boundary: it restarts a whole step away.
        fixed = torch.where(levels.to(torch.int32) != state.levels(packed), state.DISTANCE_ONE, fixed)
        packed.copy_(torch.where(trainable, state.pack_trainable(levels, fixed), packed))
        if threshold is not None:
            newly = trainable & (fixed <= threshold * state.DISTANCE_ONE)
            layer._freeze_at(newly, levels)

    def stats(self) -> dict[str, Any]:
        """Frozen ratio now, and the weight updates and backward FLOPs saved so far (LTS.md §5)."""
        t = self.step_count
        numel = {n: layer.weight.numel() for n, layer in self.layers.items()}
        total = sum(numel.values())
        frozen_steps = {n: float(layer.lts_frozen_steps) for n, layer in self.layers.items()}
        macs = {n: int(layer.lts_macs) for n, layer in self.layers.items()}
        all_macs = sum(macs.values())
        saved_flops = 0.0
        if t and all_macs:
            saved_flops = sum(frozen_steps[n] / numel[n] * macs[n] for n in self.layers) / (2 * all_macs * t)
        return {
            "step": t,
            "total_steps": self.total_steps,
            "frozen_ratio": sum(layer.num_frozen for layer in self.layers.values()) / total,
            "weight_updates_saved": sum(frozen_steps.values()) / (total * t) if t else 0.0,
            "backward_flops_saved": saved_flops,
            "state_bytes_per_weight": sum(
                layer.lts_state.numel() * layer.lts_state.element_size() for layer in self.layers.values()
            )
            / total,
            "quantized_weights": total,
            "per_layer": {
                n: {
                    "frozen_ratio": layer.num_frozen / numel[n],
                    "weight_bits": layer.weight_quantizer.bits,
                    "activation_bits": layer.input_quantizer.bits,
                    "numel": numel[n],
                }
                for n, layer in self.layers.items()
            },
        }
