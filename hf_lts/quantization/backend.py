"""Which kernels run: one decision per device and dtype, for the layers and the scratcher alike.

- ``native``: hf_lts's C++ CPU kernels (`hf_lts.quantization.native`): a layer's forward and backward as
  one autograd node, every layer's LTS update in one call. Float32 on a CPU only.
- ``compiled``: the same math as Inductor kernels (Triton on a GPU, C++ on a CPU; `hf_lts.quantization.kernel`),
  driven from Python without host synchronisation: what a GPU runs.
- ``eager``: the same math as plain PyTorch ops (no compiler needed; the reference of the other two).

The default is ``native`` for float32 on a CPU (``eager`` where the C++ build fails) and ``compiled``
elsewhere (``eager`` where compiling fails). ``HF_LTS_BACKEND=native|compiled|eager`` forces one for
every device (read once, at import; tests run the GPU's ``compiled`` path on the CPU this way). Each
decision is logged once.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator
from typing import Literal

import torch

from . import native

logger = logging.getLogger(__name__)

Backend = Literal["native", "compiled", "eager"]
BACKENDS: tuple[Backend, ...] = ("native", "compiled", "eager")


def _from_environment() -> Backend | None:
    value = os.environ.get("HF_LTS_BACKEND", "").strip().lower()
    if value:
        if value not in BACKENDS:
            raise ValueError(
                f"HF_LTS_BACKEND={value!r}: use one of {', '.join(BACKENDS)} (or leave it unset)."
            )
        return value  # type: ignore[return-value]
    return None


_forced: Backend | None = _from_environment()
_decided: dict[tuple[str, torch.dtype], Backend] = {}
_failed: set[str] = set()  # backends that failed to build or compile in this process


def select(device: torch.device, dtype: torch.dtype = torch.float32) -> Backend:
    """The backend for tensors of ``dtype`` on ``device`` (decided once per pair, then cached)."""
    key = (device.type, dtype)
    backend = _decided.get(key)
    if backend is None or backend == "native" and native.ops() is None:  # (a build that failed since)
        backend = _decide(device, dtype)
        _decided[key] = backend
        logger.info("hf_lts kernels on %s/%s: %s", device.type, str(dtype).removeprefix("torch."), backend)
    return backend


def _decide(device: torch.device, dtype: torch.dtype) -> Backend:
    native_fits = device.type == "cpu" and dtype == torch.float32
    wanted = _forced or ("native" if native_fits else "compiled")
    if wanted == "native" and not native_fits:
        raise ValueError(
            f"HF_LTS_BACKEND=native runs float32 on a CPU only, not {dtype} on {device.type}: "
            "use compiled or eager there."
        )
    if wanted == "native" and native.ops() is None:
        wanted = "eager"  # native.ops() warned why
    if wanted in _failed:
        wanted = "eager"
    return wanted


def demote(backend: Backend, error: BaseException) -> None:
    """``backend`` failed in this process (a missing compiler shows up at the first call): warn once and
    run every later call eagerly, with the same results."""
    if backend not in _failed:
        _failed.add(backend)
        warnings.warn(f"hf_lts's {backend} kernels failed ({error!r}); running them eagerly.", stacklevel=3)
    for key, chosen in list(_decided.items()):
        if chosen == backend:
            _decided[key] = "eager"


def decisions() -> dict[str, Backend]:
    """What ran so far, as ``{"cuda/float32": "compiled", ...}`` (for logs and benchmark reports)."""
    return {f"{device}/{str(dtype).removeprefix('torch.')}": b for (device, dtype), b in _decided.items()}


@contextlib.contextmanager
def forced(backend: Backend | None) -> Iterator[None]:
    """Run ``backend`` for every device inside the block (as ``HF_LTS_BACKEND`` does for a process)."""
    global _forced
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: use one of {', '.join(BACKENDS)}.")
    saved = _forced, dict(_decided)
    _forced = backend
    _decided.clear()
    try:
        yield
    finally:
        _forced = saved[0]
        _decided.clear()
        _decided.update(saved[1])
