"""LSQ step sizes stay positive whatever the optimizer does.

LSQ's forward ``clamp(round(x / s), Qn, Qp) · s`` and its gradients hold for ``s > 0`` only. An optimizer
whose learning rate suits the weights can move a small step — the 8-bit first layer's, about 1e-3 — past zero
in a single update: the forward then runs on `SCALE_EPS`, every value clips, and a following normalisation
layer divides by a vanishing variance (LeViT: NaN within two SGD steps at lr 0.05). So every optimizer step
is followed by a projection of each LSQ step back to at least `MIN_STEP_RATIO` of its value before that
optimizer step (and at least `SCALE_EPS`): a step may still shrink geometrically, but never reach zero.
Ordinary updates, which move a step by far less than half, are untouched, bit for bit.

It works for any `torch.optim.Optimizer` (the Trainer's, a hand-written loop's, one wrapped by Accelerate)
through torch's global optimizer step hooks, registered by the first `prepare_model`. They touch only the
step sizes of prepared layers; the projection is a function of the values before and after the update, so
it keeps nothing between steps and a resumed run projects exactly as an uninterrupted one.
"""

from __future__ import annotations

import functools
import weakref
from typing import Any

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from .lsq import SCALE_EPS

#: One optimizer step can at most halve an LSQ step size.
MIN_STEP_RATIO = 0.5

#: id → weak reference of every guarded step (a WeakSet would compare tensors with ``==``).
_steps: dict[int, weakref.ref] = {}
_before: weakref.WeakKeyDictionary[torch.optim.Optimizer, tuple[list, list]] = weakref.WeakKeyDictionary()
_hooks_registered = False


def guard_step_sizes(params: list[nn.Parameter]) -> None:
    """Keep ``params`` (LSQ step sizes) positive through every optimizer step from now on."""
    global _hooks_registered
    for p in params:
        key = id(p)
        _steps[key] = weakref.ref(p, functools.partial(_forget, key))
    if not _hooks_registered:
        register_optimizer_step_pre_hook(_remember)
        register_optimizer_step_post_hook(_project)
        _hooks_registered = True


def _forget(key: int, _: weakref.ref) -> None:
    _steps.pop(key, None)


def _guarded(param: torch.Tensor) -> bool:
    ref = _steps.get(id(param))
    return ref is not None and ref() is param


@torch.no_grad()
def _remember(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    steps = [p for group in optimizer.param_groups for p in group["params"] if _guarded(p)]
    if steps:
        _before[optimizer] = (steps, torch._foreach_mul(steps, MIN_STEP_RATIO))
    else:
        _before.pop(optimizer, None)


@torch.no_grad()
def _project(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    steps, floors = _before.pop(optimizer, ((), ()))
    if steps:
        torch._foreach_maximum_(steps, floors)
        torch._foreach_clamp_min_(steps, SCALE_EPS)
