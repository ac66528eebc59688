"""`Kernel`: a pure tensor function run by the backend `hf_lts.quantization.backend` chose for its device.

On a CPU the native C++ op (about 3 µs per call), elsewhere Inductor's code for it, compiled once per
variant for every shape (`_compile`: traced with symbolic sizes, run without Dynamo's per-call guards and
frame, which cost three times the call), or the function itself, eagerly. A compile failure makes every
later call eager (`backend.demote`), with the same results.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from . import backend as backends
from . import native

#: Inductor options that keep compiled arithmetic IEEE like the eager ops: no fused multiply-adds (Triton's
#: fp fusion is off under ``emulate_precision_casts``; the C++ backend does not contract by default) and
#: correctly rounded division (``1/s``).
_COMPILE_OPTIONS = {"emulate_precision_casts": True, "eager_numerics.division_rounding": True}


#: Sizes of the inputs a kernel is traced with: distinct primes, so that no two sizes are equal by chance
#: (a trace would assume it of every call).
_PRIMES = (11, 13, 17, 19, 23, 29, 31, 37)


def _example(args: list[object], dims: tuple[str, ...]) -> list[object]:
    """Inputs like ``args`` (dtype, device, sizes 0 and 1) with every other size the prime of its name in
    ``dims`` (a letter per dimension, ``"1"`` for a size of 1; one name, one size: equal by construction)."""
    primes: dict[str, int] = {}
    example: list[object] = []
    for a, names in zip(args, dims[: len(args)], strict=True):  # (optional arguments last)
        if not isinstance(a, torch.Tensor):
            example.append(a)
            continue
        shape = [
            size if size < 2 or name == "1" else primes.setdefault(name, _PRIMES[len(primes)])
            for size, name in zip(a.shape, names, strict=True)
        ]
        make = torch.rand if a.is_floating_point() else torch.zeros
        example.append(make(shape, dtype=a.dtype, device=a.device))
    return example


def _compile(fn: Callable[..., object], args: list[object]) -> Callable[..., object]:
    """``fn`` compiled by Inductor for every call like ``args`` (`_variant`): traced with symbolic sizes
    (each dimension a symbol of its own; the example of `_example`) and run without Dynamo. A Dynamo-compiled
    function evaluates its guards and frame on every call (about 30 µs, three times the call itself, per
    kernel and layer); this is Inductor's generated code alone. What it assumes is what `_variant` keys it
    by and equalities of sizes that hold by construction (one step per row, a gradient shaped like its
    input), which the generated code asserts."""
    from torch._inductor import config
    from torch.fx.experimental import _config as fx_config
    from torch.fx.experimental.proxy_tensor import make_fx

    positions = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
    single = False

    def tensors_only(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        nonlocal single
        full = list(args)
        for i, t in zip(positions, tensors, strict=True):
            full[i] = t
        out = fn(*full)
        single = isinstance(out, torch.Tensor)
        return (out,) if single else tuple(out)

    example = [args[i] for i in positions]
    with fx_config.patch(use_duck_shape=False):
        graph = make_fx(tensors_only, tracing_mode="symbolic")(*example)
    options = {k: v for k, v in _COMPILE_OPTIONS.items() if hasattr(config, k.split(".")[0])}
    with config.patch(options):
        compiled = torch._inductor.standalone_compile(graph, example, dynamic_shapes="from_graph")

    def call(*all_args: object) -> object:
        out = compiled(*[all_args[i] for i in positions])
        return out[0] if single else tuple(out)

    return call


class Kernel:
    """A pure tensor function run by the backend `hf_lts.quantization.backend` chose: the native op
    ``native`` (CPU), an Inductor kernel (`_compile`: symbolic shapes, one serves every layer, bit width and
    batch size), or eagerly.

    The arguments named in ``scalars`` are Python numbers; the compiled kernel takes them as 0-d tensors of
    the given dtype (one kernel for every value). ``dims`` names the dimensions of the tensor arguments
    (`_example`; or makes the names from the arguments). The native op writes the arguments named in
    ``mutates`` in place, and their version counters are bumped for it. Compiling is lazy (the first call)
    and shared by every caller; if it fails, `backend.demote` makes every later call eager, with the same
    results.
    """

    def __init__(
        self,
        fn: Callable[..., object],
        native: str | None,
        scalars: dict[str, torch.dtype],
        dims: dict[str, str] | Callable[[list[object]], tuple[str, ...]],
        mutates: tuple[str, ...] = (),
    ) -> None:
        names = list(inspect.signature(fn).parameters)
        self.fn, self.native = fn, native
        self.scalars = {names.index(name): dtype for name, dtype in scalars.items()}
        self.mutates = tuple(names.index(name) for name in mutates)
        self.dims = dims if callable(dims) else tuple(dims.get(name, "") for name in names)
        self._compiled: dict[tuple[object, ...], Callable[..., object]] = {}
        functools.update_wrapper(self, fn)
        Kernel.instances.append(self)

    #: Every kernel (`compiled_kernels`).
    instances: list[Kernel] = []

    def __call__(self, *args: object, backend: str) -> object:
        # Under a dispatch mode (FlopCounterMode, fake tensors, …), or while Dynamo traces a model that calls
        # the layers, the kernel is its math: run eagerly, or traced into the caller's graph.
        if backend == "eager" or torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None:
            return self.fn(*args)
        if backend == "native":
            out = getattr(native.ops(), self.native)(*args)
            if self.mutates:
                torch.autograd.graph.increment_version([args[i] for i in self.mutates])
            return out
        device = next(a.device for a in args if isinstance(a, torch.Tensor))
        tensors = [
            _scalar(a, self.scalars[i], device, i) if i in self.scalars and a is not None else a
            for i, a in enumerate(args)
        ]
        key = _variant(tensors)
        if key is None:  # a layout the compiled code does not take (`_variant`): the same math, eagerly
            return self.fn(*args)
        compiled = self._compiled.get(key)
        try:
            if compiled is None:
                dims = self.dims(tensors) if callable(self.dims) else self.dims
                compiled = self._compiled[key] = _compile(self.fn, _example(tensors, dims))
            return compiled(*tensors)
        except Exception as err:  # a missing or broken compiler shows up at the first call
            backends.demote("compiled", err)
            return self.fn(*args)


def _variant(args: list[object]) -> tuple[object, ...] | None:
    """What a compiled kernel is specialised on: each tensor's dtype, device and which of its sizes are 0
    or 1 (the others are symbols), and the other arguments (``None``, constants). ``None`` where compiled
    code cannot run: a non-contiguous tensor (the kernels index in memory order), or one of 2^31 elements
    or more (32-bit indexing)."""
    key: list[object] = []
    for a in args:
        if isinstance(a, torch.Tensor):
            if not a.is_contiguous() or a.numel() >= 1 << 31:
                return None
            key.append((a.dtype, a.device, *[min(size, 2) for size in a.shape]))
        else:
            key.append(a)
    return tuple(key)


def compiled_kernels() -> int:
    """Kernels compiled so far in this process, each serving every shape of its variant: a count that grows
    after a run's first steps is a recompile."""
    return sum(len(kernel._compiled) for kernel in Kernel.instances)


@functools.lru_cache(maxsize=4096)
def _scalar(value: float, dtype: torch.dtype, device: torch.device, position: int) -> torch.Tensor:
    return torch.tensor(value, dtype=dtype, device=device)
