"""Array backend choice: cupy on a CUDA device, numpy otherwise, and why (``gpu_mode``).

``gpu_mode`` is recorded with every event: ``gpu``, ``cpu_fallback`` (with the reason:
``cupy missing``, ``no device``, ``out of memory``, or the driver's error) or
``cpu_disabled`` (the spec asked for the CPU).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import structlog

log = structlog.get_logger("kernels.backend")  # kernels sit below the actor runtime: structlog itself


def select_backend(mode: str = "auto") -> tuple[Any, str, str | None]:
    """(xp, gpu_mode, reason). ``mode``: ``auto`` (GPU when possible), ``cpu`` (never)."""
    if mode not in ("auto", "cpu", "gpu"):
        raise ValueError(f"gpu mode must be auto, gpu or cpu, got {mode!r}")
    if mode == "cpu":
        return np, "cpu_disabled", "disabled in the spec"
    try:
        import cupy  # type: ignore[import-not-found]
    except ImportError:
        return _fallback("cupy missing")
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            return _fallback("no device")
        cupy.zeros(1)  # touches the device: fails here rather than mid-phase
    except Exception as exc:  # noqa: BLE001 - any driver error means "use the CPU"
        return _fallback(device_error_reason(exc))
    return cupy, "gpu", None


_OOM_MARKS = ("out of memory", "out_of_memory", "memoryallocation", "memory allocation")


def device_error_reason(exc: BaseException) -> str:
    """``gpu_reason`` for a device error: ``out of memory`` when the driver says so (not for
    every error that mentions memory: an illegal memory access is a device error)."""
    text = str(exc).lower()
    return "out of memory" if any(m in text for m in _OOM_MARKS) else f"device error: {exc}"


def _fallback(reason: str) -> tuple[Any, str, str]:
    log.info("GPU unavailable; using the CPU", reason=reason)
    return np, "cpu_fallback", reason


def to_numpy(xp: Any, a: Any) -> np.ndarray:
    return a.get() if hasattr(a, "get") else np.asarray(a)
