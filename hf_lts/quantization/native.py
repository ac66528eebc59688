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
            _loaded = True
        except Exception as err:  # no compiler, no ninja, a failed build: stay eager, say so once
            warnings.warn(
                f"hf_lts could not build its CPU kernels ({err!r}); fake quantization and the LTS update run "
                "as eager PyTorch ops instead (same results, slower). Install a C++ compiler and ninja to fix.",
                stacklevel=3,
            )
            _loaded = False
    return torch.ops.hf_lts if _loaded else None
