"""A DDP communication hook that leaves fully frozen weights out of the gradient all-reduce.

Once every weight of a layer is frozen, its weight (and its step size, which frozen weights do not train)
gets an exact zero gradient on every rank (see `QuantLayerMixin.quantized_weight`): all-reducing it moves
bytes and changes nothing. The hook all-reduces only the other gradients of each bucket, so the result is
bit-identical to DDP's default averaging hook, with less traffic late in an LTS run. It also counts the
bytes it sends, which is how the savings are measured.

(No ``from __future__ import annotations`` here: DDP checks the hook's annotations at registration.)
"""

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from .quantization.layers import QuantLayerMixin
from .quantization.prepare import quantized_layers


@dataclass
class FrozenAwareAllReduceState:
    """Which parameters belong to which quantized layer, and the traffic so far."""

    layer_of: dict[int, QuantLayerMixin]
    process_group: dist.ProcessGroup | None = None
    bytes_sent: int = 0
    bytes_default: int = field(default=0)

    def frozen(self, param: torch.Tensor) -> bool:
        layer = self.layer_of.get(id(param))
        return layer is not None and layer.num_frozen == layer.weight.numel()


def frozen_aware_allreduce_hook(
    state: FrozenAwareAllReduceState, bucket: dist.GradBucket
) -> torch.futures.Future[torch.Tensor]:
    """Average the bucket's gradients over the ranks, skipping those of fully frozen weights (zeros)."""
    buffer = bucket.buffer()
    world = dist.get_world_size(state.process_group)
    live = [g for p, g in zip(bucket.parameters(), bucket.gradients(), strict=True) if not state.frozen(p)]
    state.bytes_default += buffer.numel() * buffer.element_size()
    if not live:
        done: torch.futures.Future[torch.Tensor] = torch.futures.Future()
        done.set_result(buffer)
        return done
    flat = buffer if len(live) == len(bucket.gradients()) else torch.cat([g.reshape(-1) for g in live])
    flat.div_(world)
    state.bytes_sent += flat.numel() * flat.element_size()
    future = dist.all_reduce(flat, group=state.process_group, async_op=True).get_future()

    def unpack(fut: torch.futures.Future) -> torch.Tensor:
        reduced = fut.value()[0]
        if reduced is not buffer:  # the gradients are views of the bucket's buffer
            offset = 0
            for g in live:
                g.copy_(reduced[offset : offset + g.numel()].view_as(g))
                offset += g.numel()
        return buffer

    return future.then(unpack)


def register_frozen_aware_hook(ddp_model: nn.parallel.DistributedDataParallel) -> FrozenAwareAllReduceState:
    """Install `frozen_aware_allreduce_hook` on a DDP-wrapped LTS model; returns its state (byte counts)."""
    layer_of: dict[int, QuantLayerMixin] = {}
    for layer in quantized_layers(ddp_model.module).values():
        layer_of[id(layer.weight)] = layer
        layer_of[id(layer.weight_quantizer.scale)] = layer
    state = FrozenAwareAllReduceState(layer_of=layer_of, process_group=ddp_model.process_group)
    ddp_model.register_comm_hook(state, frozen_aware_allreduce_hook)
    return state
