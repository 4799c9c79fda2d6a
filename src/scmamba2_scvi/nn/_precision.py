"""Compute precision of the encoder: float32, or bfloat16 autocast where the hardware makes it pay.

Under bfloat16 autocast the projections and the scan's matrix products run in bfloat16 (with
float32 accumulation); cumulative sums, exponentials, norms and the state carried between blocks
stay in float32. On CPU this pays only with native bfloat16 instructions (AVX512-BF16 or AMX):
elsewhere bfloat16 is emulated and slower than float32.
"""

from __future__ import annotations

import contextlib
import functools
import time
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F

Precision = Literal["auto", "fp32", "bf16"]

# bf16 must beat fp32 by this factor on the probe below to be chosen automatically: the casts
# around the non-matmul parts eat part of the matmul gain in a whole step.
_MIN_SPEEDUP = 1.5


def cpu_has_native_bf16() -> bool:
    """Whether this CPU reports AVX512-BF16 or AMX-BF16 (Linux ``/proc/cpuinfo`` flags)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


@functools.cache
def bf16_pays(device_type: str = "cpu") -> bool:
    """Whether bfloat16 autocast is faster than float32 on this machine (decided once).

    CUDA: when the GPU supports bfloat16. CPU: when the CPU has native bfloat16 instructions and
    a projection of the encoder's shape (``4096 x 256 -> 1160``) runs at least 1.5x faster
    under bfloat16 autocast than in float32 (best of a few repeats, well under a second).

    Parameters
    ----------
    device_type
        ``"cpu"`` or ``"cuda"``.

    Returns
    -------
    ``True`` when ``precision="auto"`` should use bfloat16.
    """
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device_type != "cpu" or not cpu_has_native_bf16():
        return False
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(4096, 256, generator=gen), torch.randn(1160, 256, generator=gen)

    def best(enabled: bool) -> float:
        times = []
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
            for _ in range(4):
                t0 = time.perf_counter()
                F.linear(x, w)
                times.append(time.perf_counter() - t0)
        return min(times[1:])

    return best(False) > _MIN_SPEEDUP * best(True)


def resolve_precision(precision: Precision, device: torch.device) -> torch.dtype:
    """The dtype ``precision`` means on ``device``: ``"auto"`` is bfloat16 where it pays.

    Parameters
    ----------
    precision
        ``"fp32"``, ``"bf16"`` or ``"auto"`` (see :func:`bf16_pays`).
    device
        Device of the computation.

    Returns
    -------
    ``torch.float32`` or ``torch.bfloat16``.
    """
    if precision not in ("auto", "fp32", "bf16"):
        raise ValueError(f"precision must be 'auto', 'fp32' or 'bf16'; got {precision!r}.")
    if precision == "bf16" or (precision == "auto" and bf16_pays(device.type)):
        return torch.bfloat16
    return torch.float32


def autocast(precision: Precision, device: torch.device):
    """Context in which the encoder runs: bfloat16 autocast, or nothing for float32.

    Float64 computations are never cast (autocast leaves float64 alone).
    """
    if resolve_precision(precision, device) == torch.float32 or device.type not in ("cpu", "cuda"):
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)
