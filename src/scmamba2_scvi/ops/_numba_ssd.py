"""The SSD scan on CPU as a token-by-token recurrence compiled with numba (``backend="numba"``).

On a CPU the chunked algorithm of :func:`~scmamba2_scvi.ops.ssd_scan_torch` spends most of its
time moving ``(chunk x chunk)`` intermediates through memory. The recurrence itself keeps one
``(head_dim, d_state)`` state per head, which stays in the processor's L1 cache, and does a
fixed amount of work per token: compiled, it is the fast way to scan on a CPU. numba comes with
scanpy and scvi-tools, so this needs nothing beyond the package's dependencies; kernels are
compiled on first use and cached on disk.

The forward pass keeps the state entering every ``_CHECKPOINT`` tokens; the backward pass
recomputes the states between them, so the autograd graph holds the inputs and ``1/_CHECKPOINT``
of the states, as mamba-ssm's fused GPU kernels keep their chunk states.
"""

from __future__ import annotations

import functools
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from numba import njit

# Tokens between the states kept when the backward pass recomputes the forward one.
_CHECKPOINT = 64


# compiled on first call and cached on disk; nogil so that threads run kernels side by side
_jit = njit(fastmath=True, cache=True, nogil=True)

# The kernels keep every scalar in the inputs' dtype (``zero``, ``np.exp``): a float64 literal or
# ``math.exp`` would turn float32 arithmetic into float64 and stop it from being vectorised.


@_jit
def _forward(rows, x, dt, A, B, C, D, init, reset, y, final, starts):
    """``y`` and the final states; ``starts`` gets the state entering every checkpoint chunk."""
    _, length, h, p = x.shape
    hg = h // B.shape[2]
    zero = np.zeros(1, x.dtype)[0]
    for bh in range(rows[0], rows[1]):
        i, k = bh // h, bh % h
        g = k // hg
        s = init[i, k].copy()
        for t in range(length):
            if t % _CHECKPOINT == 0:
                starts[i, k, t // _CHECKPOINT] = s
            if reset[i, t]:
                s[:] = zero
            d = dt[i, t, k]
            a = np.exp(d * A[k])
            b_t, c_t = B[i, t, g], C[i, t, g]
            for j in range(p):
                x_j = x[i, t, k, j]
                xd = x_j * d
                s_j = s[j]
                acc = zero
                for m in range(s.shape[1]):
                    v = a * s_j[m] + xd * b_t[m]
                    s_j[m] = v
                    acc += v * c_t[m]
                y[i, t, k, j] = acc + D[k, j] * x_j
        final[i, k] = s


@_jit
def _states(x, dt, A, B, i, k, g, reset, lo, hi, states):
    """``states[u + 1] = s_{lo + u}`` from ``states[0] = s_{lo - 1}`` (zero at a reset)."""
    zero = np.zeros(1, x.dtype)[0]
    for t in range(lo, hi):
        u = t - lo
        d = dt[i, t, k]
        a = zero if reset[i, t] else np.exp(d * A[k])
        b_t = B[i, t, g]
        for j in range(x.shape[3]):
            xd = x[i, t, k, j] * d
            prev, new = states[u, j], states[u + 1, j]
            for m in range(b_t.shape[0]):
                new[m] = a * prev[m] + xd * b_t[m]


@_jit
def _backward(rows, x, dt, A, B, C, D, starts, reset, dy, dfinal, dx, ddt, dA, dB, dC, dD, dinit):
    """Gradients; ``dA``/``dD`` per row and ``dB``/``dC`` per head (summed by the caller)."""
    _, length, h, p = x.shape
    n = B.shape[3]
    hg = h // B.shape[2]
    q = _CHECKPOINT
    zero = np.zeros(1, x.dtype)[0]
    states = np.empty((q + 1, p, n), x.dtype)
    g_b = np.empty(n, x.dtype)
    g_c = np.empty(n, x.dtype)
    for bh in range(rows[0], rows[1]):
        i, k = bh // h, bh % h
        g = k // hg
        grad = dfinal[i, k].copy()  # dL/ds_t, carried backwards
        da_sum, dd = zero, np.zeros(p, x.dtype)
        for c in range((length + q - 1) // q - 1, -1, -1):
            lo, hi = c * q, min(length, (c + 1) * q)
            states[0] = starts[i, k, c]
            _states(x, dt, A, B, i, k, g, reset, lo, hi, states)
            for t in range(hi - 1, lo - 1, -1):
                u = t - lo
                d = dt[i, t, k]
                a = np.exp(d * A[k])
                decay = zero if reset[i, t] else a  # how s_t depends on s_{t-1}
                b_t, c_t = B[i, t, g], C[i, t, g]
                g_b[:] = zero
                g_c[:] = zero
                dot_x, dot_prev = zero, zero
                for j in range(p):
                    dy_j, x_j = dy[i, t, k, j], x[i, t, k, j]
                    grad_j, s_j, prev_j = grad[j], states[u + 1, j], states[u, j]
                    gb, gp = zero, zero
                    for m in range(n):
                        v = grad_j[m] + dy_j * c_t[m]
                        grad_j[m] = v * decay
                        g_c[m] += s_j[m] * dy_j
                        g_b[m] += v * x_j
                        gb += v * b_t[m]
                        gp += v * prev_j[m]
                    dx[i, t, k, j] = d * gb + D[k, j] * dy_j
                    dot_x += x_j * gb
                    dot_prev += gp
                    dd[j] += dy_j * x_j
                for m in range(n):
                    dB[i, t, k, m] = d * g_b[m]
                    dC[i, t, k, m] = g_c[m]
                ddt[i, t, k] = dot_x + dot_prev * A[k] * decay
                da_sum += dot_prev * d * decay
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
        n_chunks = (length + _CHECKPOINT - 1) // _CHECKPOINT
        starts = np.empty((b, h, n_chunks, *init.shape[2:]), arrays[0].dtype)
        _in_threads(_forward, b * h, *arrays, reset, y, final, starts)
        ctx.save_for_backward(x, dt, A, B, C, D, init)
        # the checkpoints are 1/_CHECKPOINT of the states; kept only when a backward will run
        ctx.starts = starts if any(ctx.needs_input_grad) else None
        ctx.reset = reset
        return torch.from_numpy(y).to(x.dtype), torch.from_numpy(final)

    @staticmethod
    def backward(ctx, dy, dfinal):
        x, dt, A, B, C, D, init = ctx.saved_tensors
        cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
        b, length, h, p = x.shape
        n = B.shape[3]
        x_, dt_, A_, B_, C_, D_ = (_numpy(t, cdt) for t in (x, dt, A, B, C, D))
        dy = np.zeros(x.shape, x_.dtype) if dy is None else _numpy(dy, cdt)
        dfinal = np.zeros(init.shape, x_.dtype) if dfinal is None else _numpy(dfinal, cdt)
        dx, ddt = np.empty_like(x_), np.empty_like(dt_)
        dA, dD = np.empty((b, h), ddt.dtype), np.empty((b, h, p), ddt.dtype)
        dB, dC = np.empty((b, length, h, n), ddt.dtype), np.empty((b, length, h, n), ddt.dtype)
        dinit = np.empty_like(dfinal)
        args = (x_, dt_, A_, B_, C_, D_, ctx.starts, ctx.reset, dy, dfinal)
        _in_threads(_backward, b * h, *args, dx, ddt, dA, dB, dC, dD, dinit)
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
