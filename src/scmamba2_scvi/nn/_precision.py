"""Compute precision of the encoder: float32, or bfloat16 autocast where the hardware makes it pay.

Under bfloat16 autocast the projections and the scan's matrix products run in bfloat16 (with
float32 accumulation); cumulative sums, exponentials, norms and the state carried between blocks
stay in float32. On CPU this pays only with native bfloat16 instructions (AVX512-BF16 or AMX),
and only for encoders wide enough that their matrix products outweigh the casts around them.
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path
from typing import Literal

import torch

Precision = Literal["auto", "fp32", "bf16"]

#: Narrowest encoder (``d_model``) that ``precision="auto"`` runs in bfloat16 on a CPU with
#: native bfloat16. The matrix products grow with the square of the width, the casts and the
#: element-wise work around them only linearly: from this width on bfloat16 trained faster in
#: every measurement (``benchmarks/bf16_cpu.py``); below it the gain varied from run to run,
#: and the ``cpu-small`` models of the quality benchmark are float32. A rule rather than a
#: timing, so that the same model on the same machine always computes the same way.
BF16_MIN_WIDTH = 256


@functools.cache  # read once: the encoder asks at every forward pass
def cpu_has_native_bf16() -> bool:
    """Whether this CPU reports AVX512-BF16 or AMX-BF16 (Linux ``/proc/cpuinfo`` flags)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def bf16_pays(d_model: int, device_type: str = "cpu") -> bool:
    """Whether ``precision="auto"`` runs an encoder of width ``d_model`` under bfloat16 autocast.

    On CPU: when the CPU has native bfloat16 instructions and ``d_model`` is at least
    :data:`BF16_MIN_WIDTH`. Elsewhere never: on a GPU the caller's precision decides (the model
    trains in Lightning's ``"bf16-mixed"`` and embeds under bfloat16 autocast), and an encoder in
    float32 leaves a surrounding autocast in force.

    Parameters
    ----------
    d_model
        Token width of the encoder.
    device_type
        ``"cpu"``, ``"cuda"``, ...

    Returns
    -------
    ``True`` for bfloat16 autocast, ``False`` for float32.
    """
    return device_type == "cpu" and d_model >= BF16_MIN_WIDTH and cpu_has_native_bf16()


def autocast(dtype: torch.dtype, device: torch.device):
    """Context in which the encoder runs: bfloat16 autocast, or nothing for float32.

    Float64 computations are never cast (autocast leaves float64 alone).
    """
    if dtype == torch.float32 or device.type not in ("cpu", "cuda"):
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)
