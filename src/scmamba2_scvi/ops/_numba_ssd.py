"""The SSD scan on CPU as a token-by-token recurrence compiled with numba (``backend="numba"``).

On a CPU the chunked algorithm of :func:`~scmamba2_scvi.ops.ssd_scan_torch` spends most of its
time moving ``(chunk x chunk)`` intermediates through memory. The recurrence itself keeps one
``(head_dim, d_state)`` state per head, which stays in the processor's L1 cache, and does a
fixed amount of work per token: compiled, it is the fast way to scan on a CPU. numba comes with
scanpy and scvi-tools, so this needs nothing beyond the package's dependencies; kernels are
compiled on first use and cached on disk.

The backward pass recomputes the states from the inputs (checkpoints every ``_CHECKPOINT``
tokens), so the autograd graph holds only the inputs, as for mamba-ssm's fused GPU kernels.
"""

from __future__ import annotations

import functools
import math
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from numba import njit

# Tokens between the states kept when the backward pass recomputes the forward one.
_CHECKPOINT = 64


# compiled on first call and cached on disk; nogil so that threads run kernels side by side
_jit = njit(fastmath=True, cache=True, nogil=True)


@_jit
def _forward(rows, x, dt, A, B, C, D, init, reset, y, final):
    _, length, h, p = x.shape
    hg = h // B.shape[2]
    for bh in range(rows[0], rows[1]):
        i, k = bh // h, bh % h
        g = k // hg
        s = init[i, k].copy()
        for t in range(length):
            if reset[i, t]:
                s[:] = 0.0
            d = dt[i, t, k]
            a = math.exp(d * A[k])
            for j in range(p):
                xd = x[i, t, k, j] * d
                acc = 0.0
                for m in range(s.shape[1]):
                    v = a * s[j, m] + xd * B[i, t, g, m]
                    s[j, m] = v
                    acc += v * C[i, t, g, m]
                y[i, t, k, j] = acc + D[k, j] * x[i, t, k, j]
        final[i, k] = s


@_jit
def _backward(rows, x, dt, A, B, C, D, init, reset, dy, dfinal, dx, ddt, dA, dB, dC, dD, dinit):
    """Gradients; ``dA``/``dD`` per row and ``dB``/``dC`` per head (summed by the caller)."""
    _, length, h, p = x.shape
    n = B.shape[3]
    hg = h // B.shape[2]
    q = _CHECKPOINT
    n_chunks = (length + q - 1) // q
    for bh in range(rows[0], rows[1]):
        i, k = bh // h, bh % h
        g = k // hg
        # states entering every chunk
        starts = np.empty((n_chunks, p, n), x.dtype)
        s = init[i, k].copy()
        for t in range(length):
            if t % q == 0:
                starts[t // q] = s
            if reset[i, t]:
                s[:] = 0.0
            d = dt[i, t, k]
            a = math.exp(d * A[k])
            for j in range(p):
                xd = x[i, t, k, j] * d
                for m in range(n):
                    s[j, m] = a * s[j, m] + xd * B[i, t, g, m]
        grad = dfinal[i, k].copy()  # dL/ds_t, carried backwards
        states = np.empty((q + 1, p, n), x.dtype)
        g_b = np.empty(n, x.dtype)
        g_c = np.empty(n, x.dtype)
        da_sum, dd = 0.0, np.zeros(p, x.dtype)
        for c in range(n_chunks - 1, -1, -1):
            lo, hi = c * q, min(length, (c + 1) * q)
            states[0] = starts[c]
            for t in range(lo, hi):  # states[t - lo + 1] = s_t, from s_{t-1} (or 0 at a reset)
                u = t - lo
                d = dt[i, t, k]
                a = 0.0 if reset[i, t] else math.exp(d * A[k])
                for j in range(p):
                    xd = x[i, t, k, j] * d
                    for m in range(n):
                        states[u + 1, j, m] = a * states[u, j, m] + xd * B[i, t, g, m]
            for t in range(hi - 1, lo - 1, -1):
                u = t - lo
                d = dt[i, t, k]
                a = math.exp(d * A[k])
                cut = reset[i, t]
                g_b[:] = 0.0
                g_c[:] = 0.0
                dot_x, dot_prev = 0.0, 0.0
                for j in range(p):
                    dyj, xj = dy[i, t, k, j], x[i, t, k, j]
                    gb, gp = 0.0, 0.0
                    for m in range(n):
                        v = grad[j, m] + dyj * C[i, t, g, m]
                        grad[j, m] = v
                        g_c[m] += states[u + 1, j, m] * dyj
                        g_b[m] += v * xj
                        gb += v * B[i, t, g, m]
                        gp += v * states[u, j, m]
                    dx[i, t, k, j] = d * gb + D[k, j] * dyj
                    dot_x += xj * gb
                    if not cut:
                        dot_prev += gp
                    dd[j] += dyj * xj
                for m in range(n):
                    dB[i, t, k, m] = d * g_b[m]
                    dC[i, t, k, m] = g_c[m]
                ddt[i, t, k] = dot_x + dot_prev * A[k] * a
                da_sum += dot_prev * d * a
                if cut:
                    grad[:] = 0.0
                else:
                    for j in range(p):
                        for m in range(n):
                            grad[j, m] *= a
        dinit[i, k] = grad
        dA[i, k] = da_sum
        dD[i, k] = dd


def _resets(seq_idx: torch.Tensor | None, shape: tuple[int, int]) -> np.ndarray:
    """``(batch, length)`` bool, True where a packed sequence starts (never at token 0)."""
    if seq_idx is None:
        return np.zeros(shape, np.bool_)
    change = torch.zeros(shape, dtype=torch.bool)
    change[:, 1:] = seq_idx[:, 1:] != seq_idx[:, :-1]
    return change.numpy()


def _numpy(t: torch.Tensor, dtype: torch.dtype) -> np.ndarray:
    return t.detach().to(dtype).contiguous().numpy()


class _NumbaScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dt, A, B, C, D, init, reset):
        cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
        b, length, h, p = x.shape
        arrays = [_numpy(t, cdt) for t in (x, dt, A, B, C, D, init)]
        y = np.empty((b, length, h, p), arrays[0].dtype)
        final = np.empty_like(arrays[-1])
        _in_threads(_forward, b * h, *arrays, reset, y, final)
        ctx.save_for_backward(x, dt, A, B, C, D, init)
        ctx.reset = reset
        return torch.from_numpy(y).to(x.dtype), torch.from_numpy(final)

    @staticmethod
    def backward(ctx, dy, dfinal):
        x, dt, A, B, C, D, init = ctx.saved_tensors
        cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
        b, length, h, p = x.shape
        n = B.shape[3]
        arrays = [_numpy(t, cdt) for t in (x, dt, A, B, C, D, init)]
        dy = np.zeros(x.shape, arrays[0].dtype) if dy is None else _numpy(dy, cdt)
        dfinal = np.zeros_like(arrays[-1]) if dfinal is None else _numpy(dfinal, cdt)
        dx, ddt = np.empty_like(arrays[0]), np.empty_like(arrays[1])
        dA, dD = np.empty((b, h), ddt.dtype), np.empty((b, h, p), ddt.dtype)
        dB, dC = np.empty((b, length, h, n), ddt.dtype), np.empty((b, length, h, n), ddt.dtype)
        dinit = np.empty_like(arrays[-1])
        _in_threads(
            _backward, b * h, *arrays, ctx.reset, dy, dfinal, dx, ddt, dA, dB, dC, dD, dinit
        )
        per_group = (b, length, B.shape[2], h // B.shape[2], n)
        grads = (
            dx,
            ddt,
            dA.sum(0),
            dB.reshape(per_group).sum(3),
            dC.reshape(per_group).sum(3),
            dD.sum(0),
            dinit,
        )
        out = [torch.from_numpy(np.ascontiguousarray(g)) for g in grads]
        return (*(g.to(t.dtype) for g, t in zip(out, (x, dt, A, B, C, D, init))), None)


def _in_threads(kernel, n_rows: int, *args) -> None:
    """``kernel`` over ``n_rows`` (batch x head) rows split among ``torch.get_num_threads()``.

    Python threads, not numba's threading layers: the kernels release the GIL, and this is
    thread- and fork-safe wherever torch is (numba's default layer aborts on concurrent calls).
    """
    n = max(1, min(torch.get_num_threads(), n_rows))
    bounds = np.linspace(0, n_rows, n + 1).astype(np.int64)
    spans = [bounds[j : j + 2] for j in range(n)]
    if n == 1:
        kernel(spans[0], *args)
        return
    list(_pool(n, os.getpid()).map(lambda rows: kernel(rows, *args), spans))


@functools.cache
def _pool(n: int, pid: int) -> ThreadPoolExecutor:
    """One pool per thread count and process: a forked child does not inherit the threads."""
    return ThreadPoolExecutor(n, thread_name_prefix="scmamba2-scan")


def ssd_scan_numba(x, dt, A, B, C, D, initial_state, seq_idx, return_final_state):
    """The scan of :func:`~scmamba2_scvi.ops.ssd_scan` by the compiled recurrence (CPU tensors)."""
    b, length, h, p = x.shape
    n = B.shape[3]
    D = x.new_zeros(h, p) if D is None else D.expand(p, h).T if D.dim() == 1 else D
    if initial_state is None:
        initial_state = x.new_zeros(b, h, p, n, dtype=torch.promote_types(x.dtype, torch.float32))
    y, final = _NumbaScan.apply(x, dt, A, B, C, D, initial_state, _resets(seq_idx, (b, length)))
    return (y, final) if return_final_state else y
