"""Own Triton kernels for the chunked SSD scan (forward and backward), written from the algorithm.

The scan is split as in the Mamba2 paper's SSD algorithm (and :func:`~._ssd._ssd_chunked`):

1. chunk states: ``S_c = sum_s v_s B_s u_s^T`` per chunk (``u = dt * x``, ``v`` the decay from a
   token to its chunk's end, 0 across a packed-sequence boundary);
2. state passing: ``S_in[c+1] = gamma_c S_in[c] + S_c`` over chunks, one program per slice of the
   ``(d_state, head_dim)`` state;
3. chunk scan: ``y_l = sum_{s<=l} exp(a_l - a_s) (C_l . B_s) u_s + w_l C_l^T S_in[c]``, with
   ``a`` the cumulative log-decay inside the chunk and ``w`` the decay from the chunk's start.

Only the quadratic in-chunk work and the state products run in Triton. The per-token scalars
(cumulative decays ``a``, the weights ``v``, ``w`` and the per-chunk ``gamma``, with the packing
masks folded in) are cheap and computed in torch, so their gradients (and those of ``dt``, ``A``
and ``D``) come from autograd; the backward kernels return the gradients of ``u``, ``a``, ``v``,
``w``, ``gamma``, ``B``, ``C`` and the initial state. The backward state passing is the same
kernel run from the last chunk to the first.

Every program handles one (batch row, head, chunk); the two directions of a bidirectional layer
are stacked on the batch axis by the encoder, so one launch scans both. Inputs of any float dtype
are loaded and accumulated in float32. Offsets are computed in int64 (no int32 overflow on long
sequences). This module imports ``triton``: import it lazily (see :func:`._ssd.triton_available`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._ssd import segment_ids

# Elements of the (d_state * head_dim) state handled by one state-passing program.
_STATE_BLOCK = 256


@triton.jit
def _chunk_state_kernel(
    X, Y, WT, OUT, H, G, N, P, NC, Q: tl.constexpr, BN: tl.constexpr, BP: tl.constexpr
):
    """``OUT[b, h, c] = sum_s WT[b, h, s] X[b, s, group(h)]^T Y[b, s, h]``, an (N, P) matrix."""
    bh = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1).to(tl.int64)
    bi, hi = bh // H, bh % H
    gi = hi // (H // G)
    length = NC * Q
    tok = c * Q + tl.arange(0, Q)
    on, op = tl.arange(0, BN), tl.arange(0, BP)
    mn, mp = on < N, op < P
    x = tl.load(
        X + (bi * length + tok[:, None]) * G * N + gi * N + on[None, :], mask=mn[None, :], other=0.0
    ).to(tl.float32)
    y = tl.load(
        Y + (bi * length + tok[:, None]) * H * P + hi * P + op[None, :], mask=mp[None, :], other=0.0
    ).to(tl.float32)
    wt = tl.load(WT + bh * length + tok)
    acc = tl.dot(tl.trans(x * wt[:, None]), y, input_precision="ieee")
    out = OUT + (bh * NC + c) * N * P + on[:, None] * P + op[None, :]
    tl.store(out, acc, mask=mn[:, None] & mp[None, :])


@triton.jit
def _state_pass_kernel(
    INP, GAMMA, INIT, OUT, FINAL, NC, NP,
    HAS_INIT: tl.constexpr, REVERSE: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """``OUT[c] = s; s = GAMMA[c] * s + INP[c]`` over chunks (from the last when ``REVERSE``)."""
    bh = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < NP
    if HAS_INIT:
        s = tl.load(INIT + bh * NP + offs, mask=m, other=0.0).to(tl.float32)
    else:
        s = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(NC):
        if REVERSE:
            c = NC - 1 - i
        else:
            c = i
        tl.store(OUT + (bh * NC + c) * NP + offs, s, mask=m)
        gamma = tl.load(GAMMA + bh * NC + c)
        s = gamma * s + tl.load(INP + (bh * NC + c) * NP + offs, mask=m, other=0.0)
    tl.store(FINAL + bh * NP + offs, s, mask=m)


@triton.jit
def _load_chunk(U, Bm, Cm, A, SEG, bi, bh, hi, gi, tok, on, op, H, G, N, P, length):
    """The (Q, P) inputs, (Q, N) projections, log-decays and segment ids of one chunk."""
    mn, mp = on < N, op < P
    u = tl.load(
        U + (bi * length + tok[:, None]) * H * P + hi * P + op[None, :], mask=mp[None, :], other=0.0
    ).to(tl.float32)
    bc = (bi * length + tok[:, None]) * G * N + gi * N + on[None, :]
    b = tl.load(Bm + bc, mask=mn[None, :], other=0.0).to(tl.float32)
    c = tl.load(Cm + bc, mask=mn[None, :], other=0.0).to(tl.float32)
    a = tl.load(A + bh * length + tok)
    seg = tl.load(SEG + bi * length + tok)
    return u, b, c, a, seg


@triton.jit
def _decay_matrix(a, seg, Q: tl.constexpr):
    """``exp(a_l - a_s)`` for ``s <= l`` in the same packed sequence, else 0 (a (Q, Q) tile)."""
    r = tl.arange(0, Q)
    keep = (r[:, None] >= r[None, :]) & (seg[:, None] == seg[None, :])
    return tl.exp(tl.where(keep, a[:, None] - a[None, :], float("-inf")))


@triton.jit
def _chunk_scan_fwd_kernel(
    U, Bm, Cm, A, SEG, W, S, Y, H, G, N, P, NC,
    Q: tl.constexpr, BN: tl.constexpr, BP: tl.constexpr,
):  # fmt: skip
    """Outputs of one chunk: the in-chunk masked product plus the entering state's share."""
    bh = tl.program_id(0).to(tl.int64)
    ci = tl.program_id(1).to(tl.int64)
    bi, hi = bh // H, bh % H
    gi = hi // (H // G)
    length = NC * Q
    tok = ci * Q + tl.arange(0, Q)
    on, op = tl.arange(0, BN), tl.arange(0, BP)
    mn, mp = on < N, op < P
    u, b, c, a, seg = _load_chunk(
        U, Bm, Cm, A, SEG, bi, bh, hi, gi, tok, on, op, H, G, N, P, length
    )
    w = tl.load(W + bh * length + tok)
    s = tl.load(
        S + (bh * NC + ci) * N * P + on[:, None] * P + op[None, :],
        mask=mn[:, None] & mp[None, :],
        other=0.0,
    )
    cb = tl.dot(c, tl.trans(b), input_precision="ieee") * _decay_matrix(a, seg, Q)
    y = tl.dot(cb, u, input_precision="ieee")
    y += w[:, None] * tl.dot(c, s, input_precision="ieee")
    tl.store(Y + (bi * length + tok[:, None]) * H * P + hi * P + op[None, :], y, mask=mp[None, :])


@triton.jit
def _chunk_scan_bwd_kernel(
    U, Bm, Cm, A, SEG, W, V, S, GS, DY, DU, DB, DC, DA, DW, DV, H, G, N, P, NC,
    Q: tl.constexpr, BN: tl.constexpr, BP: tl.constexpr,
):  # fmt: skip
    """Gradients of one chunk's inputs.

    Given the entering state ``S`` and the gradient ``GS`` of the state leaving the chunk.
    ``DB``/``DC`` are per head (summed over a group in torch).
    """
    bh = tl.program_id(0).to(tl.int64)
    ci = tl.program_id(1).to(tl.int64)
    bi, hi = bh // H, bh % H
    gi = hi // (H // G)
    length = NC * Q
    tok = ci * Q + tl.arange(0, Q)
    on, op = tl.arange(0, BN), tl.arange(0, BP)
    mn, mp = on < N, op < P
    u, b, c, a, seg = _load_chunk(
        U, Bm, Cm, A, SEG, bi, bh, hi, gi, tok, on, op, H, G, N, P, length
    )
    w = tl.load(W + bh * length + tok)
    v = tl.load(V + bh * length + tok)
    pq = (bi * length + tok[:, None]) * H * P + hi * P + op[None, :]
    dy = tl.load(DY + pq, mask=mp[None, :], other=0.0)
    st = (bh * NC + ci) * N * P + on[:, None] * P + op[None, :]
    s = tl.load(S + st, mask=mn[:, None] & mp[None, :], other=0.0)
    gs = tl.load(GS + st, mask=mn[:, None] & mp[None, :], other=0.0)

    decay = _decay_matrix(a, seg, Q)
    lc = tl.dot(c, tl.trans(b), input_precision="ieee") * decay  # (l, s)
    dyu = tl.dot(dy, tl.trans(u), input_precision="ieee")  # (l, s)
    ld = decay * dyu
    prod = lc * dyu
    da = tl.sum(prod, axis=1) - tl.sum(prod, axis=0)
    bg = tl.dot(b, gs, input_precision="ieee")  # (Q, P)
    du = tl.dot(tl.trans(lc), dy, input_precision="ieee") + v[:, None] * bg
    dc = tl.dot(ld, b, input_precision="ieee")
    dc += w[:, None] * tl.dot(dy, tl.trans(s), input_precision="ieee")
    db = tl.dot(tl.trans(ld), c, input_precision="ieee")
    db += v[:, None] * tl.dot(u, tl.trans(gs), input_precision="ieee")
    dw = tl.sum(dy * tl.dot(c, s, input_precision="ieee"), axis=1)
    dv = tl.sum(bg * u, axis=1)

    tl.store(DU + pq, du, mask=mp[None, :])
    hn = (bi * length + tok[:, None]) * H * N + hi * N + on[None, :]
    tl.store(DB + hn, db, mask=mn[None, :])
    tl.store(DC + hn, dc, mask=mn[None, :])
    tl.store(DA + bh * length + tok, da)
    tl.store(DW + bh * length + tok, dw)
    tl.store(DV + bh * length + tok, dv)


def _blocks(n: int, p: int) -> tuple[int, int]:
    # tl.dot needs every tile dimension >= 16
    return max(16, triton.next_power_of_2(n)), max(16, triton.next_power_of_2(p))


def _chunk_states(x, y, wt, heads, q):
    """Launch :func:`_chunk_state_kernel`: ``(b, h, nc, n, p)`` float32."""
    b, length, g, n = x.shape
    p = y.shape[-1]
    nc = length // q
    out = torch.empty(b, heads, nc, n, p, device=x.device, dtype=torch.float32)
    bn, bp = _blocks(n, p)
    _chunk_state_kernel[(b * heads, nc)](x, y, wt, out, heads, g, n, p, nc, Q=q, BN=bn, BP=bp)
    return out


def _state_pass(inp, gamma, init, reverse):
    """Launch :func:`_state_pass_kernel`: the state at every chunk boundary, and the last one."""
    b, h, nc, n, p = inp.shape
    out = torch.empty_like(inp)
    final = torch.empty(b, h, n, p, device=inp.device, dtype=torch.float32)
    grid = (b * h, triton.cdiv(n * p, _STATE_BLOCK))
    _state_pass_kernel[grid](
        inp, gamma, inp if init is None else init, out, final, nc, n * p,
        HAS_INIT=init is not None, REVERSE=reverse, BLOCK=_STATE_BLOCK,
    )  # fmt: skip
    return out, final


class _SSDCore(torch.autograd.Function):
    """Chunked SSD on prepared, contiguous, chunk-padded float tensors (see the module docstring).

    ``u`` ``(b, L, h, p)``; ``a``, ``w``, ``v`` ``(b, h, L)``; ``gamma`` ``(b, h, nc)``; ``B``,
    ``C`` ``(b, L, g, n)``; ``seg`` ``(b, L)`` int32; ``init`` ``(b, h, n, p)`` or ``None``.
    Returns ``y`` ``(b, L, h, p)`` and the final state ``(b, h, n, p)``, float32.
    """

    @staticmethod
    def forward(ctx, u, a, w, v, gamma, B, C, seg, init, q):
        b, length, h, p = u.shape
        g, n = B.shape[-2:]
        nc = length // q
        states = _chunk_states(B, u, v, h, q)
        entering, final = _state_pass(states, gamma, init, reverse=False)
        y = torch.empty_like(u)
        bn, bp = _blocks(n, p)
        _chunk_scan_fwd_kernel[(b * h, nc)](
            u, B, C, a, seg, w, entering, y, h, g, n, p, nc, Q=q, BN=bn, BP=bp
        )
        ctx.save_for_backward(u, a, w, v, gamma, B, C, seg, entering)
        ctx.q, ctx.has_init = q, init is not None
        return y, final

    @staticmethod
    def backward(ctx, dy, dfinal):
        u, a, w, v, gamma, B, C, seg, entering = ctx.saved_tensors
        q = ctx.q
        b, length, h, p = u.shape
        g, n = B.shape[-2:]
        nc = length // q
        dy = torch.zeros_like(u) if dy is None else dy.float().contiguous()
        # gradient reaching each chunk's entering state from that chunk's outputs
        z = _chunk_states(C, dy, w, h, q)
        dfinal = None if dfinal is None else dfinal.float().contiguous()
        leaving, dinit = _state_pass(
            z, gamma, dfinal, reverse=True
        )  # leaving[c]: grad of S_in[c+1]
        dgamma = (entering * leaving).sum((-1, -2))
        du = torch.empty_like(u)
        db = torch.empty(b, length, h, n, device=u.device, dtype=torch.float32)
        dc = torch.empty_like(db)
        da, dw, dv = torch.empty_like(a), torch.empty_like(w), torch.empty_like(v)
        bn, bp = _blocks(n, p)
        _chunk_scan_bwd_kernel[(b * h, nc)](
            u, B, C, a, seg, w, v, entering, leaving, dy, du, db, dc, da, dw, dv,
            h, g, n, p, nc, Q=q, BN=bn, BP=bp,
        )  # fmt: skip
        db = db.view(b, length, g, h // g, n).sum(3).to(B.dtype)
        dc = dc.view(b, length, g, h // g, n).sum(3).to(C.dtype)
        return du, da, dw, dv, dgamma, db, dc, None, dinit if ctx.has_init else None, None


def ssd_scan_triton(
    x, dt, A, B, C, *, D=None, chunk_size=64, initial_state=None, seq_idx=None,
    return_final_state=False,
):  # fmt: skip
    """The SSD scan with the own Triton kernels; arguments as :func:`._ssd.ssd_scan`.

    ``chunk_size`` must be a power of two >= 16 (the kernels' tile size). Runs wherever Triton
    does: CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``.
    """
    if chunk_size < 16 or chunk_size & (chunk_size - 1):
        raise ValueError(
            f"backend='triton' needs chunk_size a power of two >= 16; got {chunk_size}."
        )
    b, seqlen, h = x.shape[:3]
    q = chunk_size
    pad = (-seqlen) % q
    xf = x.float()
    u = xf * dt.float()[..., None]
    dtf = dt.float()
    if pad:  # dt = 0 on padding: no input and no decay, the state passes through unchanged
        u = F.pad(u, (0, 0, 0, 0, 0, pad))
        dtf = F.pad(dtf, (0, 0, 0, pad))
        B = F.pad(B, (0, 0, 0, 0, 0, pad))
        C = F.pad(C, (0, 0, 0, 0, 0, pad))
    length = seqlen + pad
    nc = length // q
    a = (dtf * A.float()).view(b, nc, q, h).cumsum(2).permute(0, 3, 1, 2)  # (b, h, nc, q)
    if seq_idx is None:
        seg = torch.zeros(b, nc, q, dtype=torch.int32, device=x.device)
    else:
        seg = segment_ids(seq_idx)
        seg = F.pad(seg, (0, pad), value=0) if pad else seg
        if pad:
            seg[:, seqlen:] = seg[:, seqlen - 1 : seqlen]
        seg = seg.to(torch.int32).view(b, nc, q)
    entering = torch.cat([seg[:, :1, 0], seg[:, :-1, -1]], 1)  # segment entering each chunk
    a_end = a[..., -1:]
    w = a.exp() * (seg == entering[..., None])[:, None]
    v = (a_end - a).exp() * (seg == seg[..., -1:])[:, None]
    gamma = a_end[..., 0].exp() * (entering == seg[..., -1])[:, None]
    init = None
    if initial_state is not None:
        init = initial_state.float().transpose(-1, -2).contiguous()  # (b, h, n, p)
    y, final = _SSDCore.apply(
        u.contiguous(),
        a.reshape(b, h, length).contiguous(),
        w.reshape(b, h, length).contiguous(),
        v.reshape(b, h, length).contiguous(),
        gamma.contiguous(),
        B.contiguous(),
        C.contiguous(),
        seg.view(b, length).contiguous(),
        init,
        q,
    )
    y = y[:, :seqlen]
    if D is not None:
        D = D.float()
        y = y + xf * (D[:, None] if D.dim() == 1 else D)
    y = y.to(x.dtype)
    if return_final_state:
        return y, final.transpose(-1, -2)
    return y
