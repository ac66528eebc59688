"""LTS statistics of a model's quantized layers, read from their buffers (LTS.md §5): for the scratcher's
logs, the model card and the export, none of which needs a scratcher."""

from __future__ import annotations

from typing import Any

from .layers import QuantLayerMixin


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
