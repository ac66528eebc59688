"""hf_lts's native CPU kernels (``csrc/kernels.cpp``), built on first use and cached per machine.

Why native code on a CPU: a `torch.compile` kernel costs 25–45 µs of Python, guard and wrapper work per
call, and a quantized layer makes three calls per step, several times the work itself on a small layer;
a call to a native op costs about 3 µs from Python, and the scratcher updates every layer in one. The
build uses `torch.utils.cpp_extension` (a C++ compiler, which `torch.compile` on a CPU needs too, and
ninja) and takes about 20 s once (on an idle 2-core CPU); later processes load the cached library.
Where it fails, the kernels run eagerly (same results) after one warning.
"""

from __future__ import annotations

import logging
import os
import shutil
import warnings
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

_SOURCE = Path(__file__).parent / "csrc" / "kernels.cpp"
# -ffp-contract=off: no fused multiply-adds, so every float op rounds as the eager torch op does;
# -fno-trapping-math lets floor() vectorise (no floating-point traps are used; results do not change).
_CFLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-trapping-math", "-fopenmp"]
_loaded: bool | None = None


def ops() -> object | None:
    """``torch.ops.hf_lts`` once the native kernels are loaded (built if needed), ``None`` if they cannot be."""
    global _loaded
    if _loaded is None:
        try:
            from torch.utils.cpp_extension import load

            if shutil.which("ninja") is None:  # pip's ninja where its scripts folder is not on PATH
                import ninja

                os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
            logger.info("Loading hf_lts's CPU kernels (built once per machine, about 20 s).")
            load(
                name="hf_lts_kernels",
                sources=[str(_SOURCE)],
                extra_cflags=_CFLAGS,
                extra_ldflags=["-fopenmp"],
                is_python_module=False,
            )
            _register_fakes()
            _loaded = True
        except Exception as err:  # no compiler, no ninja, a failed build: stay eager, say so once
            warnings.warn(
                f"hf_lts could not build its CPU kernels ({err!r}); fake quantization and the LTS update run "
                "as eager PyTorch ops instead (same results, slower). Install a C++ compiler and ninja to fix.",
                stacklevel=3,
            )
            _loaded = False
    return torch.ops.hf_lts if _loaded else None


def _register_fakes() -> None:
    """Fake (meta) implementations of the ``hf_lts::`` ops: shapes and dtypes only, so that tracing,
    FakeTensor and ``torch.compile`` of code that calls them need no special case. (``quant_layer`` is a
    composite of these and ATen ops.)"""
    from torch.library import register_fake

    def per_step(scale):
        return scale.new_empty(scale.shape)

    register_fake("hf_lts::fake_quant")(lambda x, scale, qmin, qmax, packed=None: torch.empty_like(x))
    register_fake("hf_lts::layer_forward")(
        lambda x, xs, x_min, x_max, w, ws, w_min, w_max, packed=None: (
            torch.empty_like(x),
            torch.empty_like(w),
        )
    )
    register_fake("hf_lts::grad")(
        lambda x, scale, qmin, qmax, grad, packed=None: (torch.empty_like(x), per_step(scale))
    )
    register_fake("hf_lts::grad_rows")(
        lambda x, scale, qmin, qmax, grad, packed, rows: (torch.empty_like(x), per_step(scale))
    )
    register_fake("hf_lts::input_grad")(
        lambda x, scale, qmin, qmax, grad: (per_step(scale), torch.empty_like(x))
    )
    register_fake("hf_lts::input_step_terms")(
        lambda x, scale, qmin, qmax: (torch.empty_like(x), torch.empty_like(x))
    )

    @register_fake("hf_lts::update_layers")
    def _update_layers(weights, packed, scales, keys, keep, threshold, restart_observed, qmin, qmax, restore):
        newly = packed[0].new_empty((len(packed),), dtype=torch.int64)
        return newly, [p.new_empty((p.shape[0],), dtype=torch.int64) for p in packed]
