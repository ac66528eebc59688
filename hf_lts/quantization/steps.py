"""LSQ step sizes stay positive whatever the optimizer does.

LSQ's forward ``clamp(round(x / s), Qn, Qp) · s`` and its gradients hold for ``s > 0`` only. An optimizer
whose learning rate suits the weights can move a small step — the 8-bit first layer's, about 1e-3 — past zero
in a single update. The forward already computes with ``max(s, SCALE_EPS)``; after every optimizer step the
step parameters themselves are clamped to `SCALE_EPS` too, so that no step is ever stored at zero or below
and momentum does not carry one further past it. Updates that keep a step positive are untouched, bit for
bit. (A learning rate that drives steps there still degrades the model: the layer then clips everything.)

It works for any `torch.optim.Optimizer` (the Trainer's, a hand-written loop's, one wrapped by Accelerate)
through torch's global optimizer step hook, registered by the first `prepare_model`; it touches only the
step sizes of prepared layers and keeps no state, so a resumed run clamps exactly as an uninterrupted one.
"""

from __future__ import annotations

import functools
import weakref
from typing import Any

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from . import backend as backends
from .lsq import SCALE_EPS

#: id → weak reference of every guarded step (a WeakSet would compare tensors with ``==``).
_steps: dict[int, weakref.ref] = {}
_hook_registered = False


def guard_step_sizes(params: list[nn.Parameter]) -> None:
    """Keep ``params`` (LSQ step sizes) at ``SCALE_EPS`` or above through every optimizer step from now on."""
    global _hook_registered
    for p in params:
        key = id(p)
        _steps[key] = weakref.ref(p, functools.partial(_forget, key))
    if not _hook_registered:
        register_optimizer_step_post_hook(_clamp)
        _hook_registered = True


def _forget(key: int, _: weakref.ref) -> None:
    _steps.pop(key, None)


def _guarded(param: torch.Tensor) -> bool:
    ref = _steps.get(id(param))
    return ref is not None and ref() is param


@torch.no_grad()
def _clamp(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    steps = [p for group in optimizer.param_groups for p in group["params"] if _guarded(p)]
    if steps and backends.select(steps[0].device, steps[0].dtype) == "native":
        # on the native (CPU) path reading is free: write (and so bump the version of) only the steps that need
        # it, which keeps a fully frozen layer's cached quantized weight valid (`QuantLayerMixin._held_weight`);
        # the device path never reads a value back
        steps = [p for p in steps if bool((p < SCALE_EPS).any())]
    if steps:
        torch._foreach_clamp_min_(steps, SCALE_EPS)
