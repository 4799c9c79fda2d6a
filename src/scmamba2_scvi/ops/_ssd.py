"""Chunked state-space-duality (SSD) scan: the pure-PyTorch reference and the backend dispatch."""

from __future__ import annotations

import functools
import math
import os
from typing import Literal, get_args

import torch
import torch.nn.functional as F

#: Scan backends understood by :func:`~scmamba2_scvi.ops.ssd_scan` (``"auto"`` picks one).
Backend = Literal["auto", "torch", "mamba_ssm", "triton"]

# Tokens per block when the torch scan runs on CPU (see ``ssd_scan_torch(tokens_per_block=...)``).
_CPU_TOKENS_PER_BLOCK = 2048
# Largest element offset one kernel call may address. mamba-ssm's SSD kernels compute pointer
# offsets in int32 and silently corrupt the output past 2**31 (state-spaces/mamba#1015), which a
# whole-transcriptome cell (~60k tokens) reaches; larger scans are split before the call.
_KERNEL_MAX_OFFSET = 2**31 - 1


@functools.cache
def _mamba_chunk_scan():
    """Import mamba-ssm's fused Triton scan lazily; ``None`` when it is not importable."""
    try:
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    except Exception:
        return None
    return mamba_chunk_scan_combined


def mamba_ssm_available() -> bool:
    """Whether mamba-ssm's Triton SSD kernel can be imported in this environment."""
    return _mamba_chunk_scan() is not None


@functools.cache
def _triton_scan():
    """Import the own Triton scan lazily; ``None`` when ``triton`` is not importable."""
    try:
        from ._triton_ssd import ssd_scan_triton
    except ImportError:
        return None
    return ssd_scan_triton


def triton_available() -> bool:
    """Whether the own Triton SSD kernel (``backend="triton"``) can be imported."""
    return _triton_scan() is not None


def segment_ids(seq_idx: torch.Tensor) -> torch.Tensor:
    """Monotone segment ids: a new segment starts wherever ``seq_idx`` changes along the sequence.

    Parameters
    ----------
    seq_idx
        ``(batch, length)`` integer sequence index per token.

    Returns
    -------
    ``(batch, length)`` int64 tensor, 0 at the first token and +1 at every change.
    """
    change = (seq_idx[:, 1:] != seq_idx[:, :-1]).long()
    return F.pad(change.cumsum(-1), (1, 0))


def _segsum(a: torch.Tensor) -> torch.Tensor:
    """Stable segment sums: ``out[..., j, k] = sum(a[..., k+1 : j+1])`` if ``k <= j``, else -inf.

    Built with a cumulative sum over a masked square (no subtraction of large cumulative sums), so
    ``-inf`` entries in ``a`` (hard state resets) propagate without producing NaN.
    """
    t = a.shape[-1]
    x = a[..., :, None].expand(*a.shape, t)  # x[..., j, k] = a[..., j]
    strict = torch.tril(torch.ones(t, t, dtype=torch.bool, device=a.device), -1)
    x = x.masked_fill(~strict, 0.0).cumsum(-2)
    incl = torch.tril(torch.ones(t, t, dtype=torch.bool, device=a.device))
    return x.masked_fill(~incl, float("-inf"))


def _pass_states(decay: torch.Tensor, states: torch.Tensor, initial: torch.Tensor):
    """States entering each chunk, ``S_c = exp(decay_c) S_{c-1} + states_c``, and the final one.

    Two levels of dense decay matrices instead of a loop over chunks: the chunks are cut into
    ``G ~ sqrt(n_chunks)`` groups of ``G``; states are combined within every group at once, then
    the groups' end states across groups, so the work is ``O(n_chunks**1.5)`` states.

    ``decay`` is ``(b, h, nc)`` (``-inf`` resets the state), ``states`` ``(b, h, nc, f)`` and
    ``initial`` ``(b, h, f)``; returns the ``(b, h, nc, f)`` entering states and the final state.
    """
    b, h, nc, f = states.shape
    size = max(1, math.isqrt(nc - 1) + 1)  # group size G with G * G >= nc
    n_groups = -(-nc // size)
    extra = n_groups * size - nc  # trailing chunks with decay 1 and no input: the state passes
    a = F.pad(decay, (0, extra)).view(b, h, n_groups, size)
    st = F.pad(states, (0, 0, 0, extra)).view(b, h, n_groups, size, f)
    local = _segsum(a).exp() @ st  # (b, h, G', G, f): each group's states, entering with zero
    a_in = a.cumsum(-1)  # decay from each group's start to each of its chunks
    total = a_in[..., -1]  # (b, h, G')
    ends = (
        _segsum(total).exp() @ local[..., -1, :]
        + total.cumsum(-1).exp()[..., None] * initial[:, :, None]
    )  # state at the end of every group
    into = torch.cat([initial[:, :, None], ends[:, :, :-1]], 2)  # state entering every group
    s_all = (local + a_in.exp()[..., None] * into[:, :, :, None]).view(b, h, -1, f)
    entering = torch.cat([initial[:, :, None], s_all[:, :, : nc - 1]], 2)
    return entering, s_all[:, :, nc - 1]


def ssd_scan_torch(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    *,
    D: torch.Tensor | None = None,
    chunk_size: int = 64,
    initial_state: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
    return_final_state: bool = False,
    tokens_per_block: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Pure-PyTorch chunked SSD scan; see :func:`~scmamba2_scvi.ops.ssd_scan` for the arguments.

    Computes in float32 (float64 when ``x`` is float64) whatever the input dtype. Memory is
    ``O(L * chunk_size)`` per head plus ``O(L / chunk_size * head_dim * d_state)`` for chunk states.

    Parameters
    ----------
    x, dt, A, B, C, D, chunk_size, initial_state, seq_idx, return_final_state
        As in :func:`ssd_scan`.
    tokens_per_block
        Scan the sequence in blocks of this many tokens, passing the state from block to block
        (exact). On CPU the default (2,048) keeps a block's intermediates in the processor's
        cache, which keeps the cost per token flat as sequences grow; ``0`` scans at once.
    """
    seqlen = x.shape[1]
    if tokens_per_block is None:
        tokens_per_block = _CPU_TOKENS_PER_BLOCK if x.device.type == "cpu" else 0
    if not tokens_per_block or seqlen <= tokens_per_block:
        return _ssd_chunked(
            x, dt, A, B, C, D, chunk_size, initial_state, seq_idx, return_final_state
        )
    tokens_per_block = max(chunk_size, tokens_per_block // chunk_size * chunk_size)
    return _scan_in_blocks(
        _ssd_chunked,
        (x, dt, A, B, C, D, chunk_size, initial_state, seq_idx, return_final_state),
        tokens_per_block,
    )


def _scan_in_blocks(call, args, block: int):
    """``call`` over blocks of ``block`` tokens, each from the previous one's final state (exact).

    ``call`` and ``args`` follow ``_ssd_chunked``'s signature. A packed sequence that starts at
    a block boundary does not inherit the state.
    """
    x, dt, A, B, C, D, chunk_size, initial_state, seq_idx, final = args
    # split, not slices: the backward of a slice allocates a full-length gradient per block
    blocks = zip(*(t.split(block, 1) for t in (x, dt, B, C)))
    idx = [None] * -(-x.shape[1] // block) if seq_idx is None else seq_idx.split(block, 1)
    state, ys, prev = initial_state, [], None
    for (xb, dtb, Bb, Cb), ib in zip(blocks, idx):
        if state is not None and ib is not None and prev is not None:
            state = state * (ib[:, 0] == prev[:, -1]).view(-1, 1, 1, 1).to(state.dtype)
        y, state = call(xb, dtb, A, Bb, Cb, D, chunk_size, state, ib, True)
        ys.append(y)
        prev = ib
    y = torch.cat(ys, 1)
    return (y, state) if final else y


def _ssd_chunked(x, dt, A, B, C, D, chunk_size, initial_state, seq_idx, return_final_state):
    """The chunked SSD algorithm over the whole sequence at once."""
    b, seqlen, h, p = x.shape
    g, n = B.shape[-2:]
    hg = h // g
    q = chunk_size
    out_dtype = x.dtype
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    x, dt, B, C, A = (t.to(cdt) for t in (x, dt, B, C, A))

    pad = (-seqlen) % q
    if pad:
        # dt = 0 on padding: decay exp(0) = 1 and no input, so the state passes through unchanged.
        x = F.pad(x, (0, 0, 0, 0, 0, pad))
        dt = F.pad(dt, (0, 0, 0, pad))
        B = F.pad(B, (0, 0, 0, 0, 0, pad))
        C = F.pad(C, (0, 0, 0, 0, 0, pad))
    nc = (seqlen + pad) // q

    seg = None
    if seq_idx is not None:
        seg = segment_ids(seq_idx)
        if pad:
            seg = torch.cat([seg, seg[:, -1:].expand(b, pad)], 1)
        seg = seg.view(b, nc, q)

    # Head-major layout (batch, group, head-in-group, chunk, token, feature): every contraction
    # below is a plain batched matmul, with no permuted copies inside the scan.
    x = x.view(b, nc, q, g, hg, p).permute(0, 3, 4, 1, 2, 5)  # (b, g, k, c, q, p)
    dt = dt.view(b, nc, q, g, hg).permute(0, 3, 4, 1, 2)  # (b, g, k, c, q)
    B = B.view(b, nc, q, g, n).permute(0, 3, 1, 2, 4)  # (b, g, c, q, n)
    C = C.view(b, nc, q, g, n).permute(0, 3, 1, 2, 4)
    xdt = x * dt[..., None]
    a_cum = (dt * A.view(g, hg, 1, 1)).cumsum(-1)  # (b, g, k, c, q) log-decay, cumulative in chunk

    # 1. Within each chunk: masked "attention" C_l . B_s * exp(a_cum[l] - a_cum[s]) for s <= l.
    # The mask goes on the scores, which a group's heads share; the log-decay is clamped at 0,
    # which changes only masked entries (s > l) and keeps their exp finite.
    causal = torch.tril(torch.ones(q, q, dtype=torch.bool, device=x.device))
    if seg is not None:
        seg = seg[:, None]  # (b, 1, c, q)
        causal = causal & (seg[..., :, None] == seg[..., None, :])
        seg = seg[:, None]  # (b, 1, 1, c, q), as a_cum
    cb = (C @ B.transpose(-1, -2)).masked_fill_(~causal, 0.0)[:, :, None]  # (b, g, 1, c, q, q)
    decay = (a_cum[..., :, None] - a_cum[..., None, :]).clamp_(max=0.0).exp_()
    y = (cb * decay) @ xdt  # (b, g, k, c, q, p)

    # 2. State contributed by each chunk at its end, stored as (d_state, head_dim).
    to_end = (a_cum[..., -1:] - a_cum).exp_()
    if seg is not None:
        to_end = to_end * (seg == seg[..., -1:])
    states = (B[:, :, None] * to_end[..., None]).transpose(-1, -2) @ xdt  # (b, g, k, c, n, p)
    states = states.reshape(b, h, nc, n * p)

    # 3. Pass states across chunks: S_c = exp(a_c) * S_{c-1} + states_c, in groups of chunks.
    chunk_decay = a_cum[..., -1].reshape(b, h, nc)
    if seg is not None:
        prev_end = torch.cat([seg[..., :1, 0], seg[..., :-1, -1]], -1)  # segment entering chunks
        chunk_decay = chunk_decay.masked_fill(prev_end[:, 0] != seg[..., -1][:, 0], float("-inf"))
    s_prev = (
        x.new_zeros(b, h, n * p)
        if initial_state is None
        else initial_state.to(cdt).transpose(-1, -2).reshape(b, h, n * p)
    )
    entering, s_prev = _pass_states(chunk_decay, states, s_prev)
    entering = entering.view(b, g, hg, nc, n, p)  # state entering each chunk

    # 4. Contribution of the entering state to every token of the chunk.
    from_start = a_cum.exp()
    if seg is not None:
        from_start = from_start * (seg == prev_end[..., None])
    y = y.add_((C[:, :, None] * from_start[..., None]) @ entering)
    if D is not None:  # the skip, still head-major: x needs no copy back to token-major
        D = D.to(cdt).view(g, hg, 1, 1, -1)
        y = y.addcmul_(x, D)

    y = y.permute(0, 3, 4, 1, 2, 5).reshape(b, nc * q, h, p)[:, :seqlen]
    s_prev = s_prev.view(b, h, n, p).transpose(-1, -2)
    y = y.to(out_dtype)
    if return_final_state:
        return y, s_prev
    return y


def _check_inputs(x, dt, A, B, C, D, chunk_size, initial_state, seq_idx) -> None:
    if x.dim() != 4:
        raise ValueError(f"x must be (batch, length, heads, head_dim); got shape {tuple(x.shape)}.")
    b, seqlen, h, p = x.shape
    if dt.shape != (b, seqlen, h):
        raise ValueError(f"dt must have shape {(b, seqlen, h)}; got {tuple(dt.shape)}.")
    if A.shape != (h,):
        raise ValueError(f"A must have shape ({h},); got {tuple(A.shape)}.")
    if B.dim() != 4 or B.shape[:2] != (b, seqlen) or B.shape != C.shape:
        raise ValueError(
            "B and C must both be (batch, length, groups, d_state) matching x; got "
            f"{tuple(B.shape)} and {tuple(C.shape)}."
        )
    if h % B.shape[2]:
        raise ValueError(f"heads ({h}) must be divisible by groups ({B.shape[2]}).")
    if D is not None and D.shape not in ((h,), (h, p)):
        raise ValueError(f"D must have shape ({h},) or ({h}, {p}); got {tuple(D.shape)}.")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive; got {chunk_size}.")
    if initial_state is not None and initial_state.shape != (b, h, p, B.shape[3]):
        raise ValueError(
            f"initial_state must have shape {(b, h, p, B.shape[3])}; "
            f"got {tuple(initial_state.shape)}."
        )
    if seq_idx is not None and seq_idx.shape != (b, seqlen):
        raise ValueError(f"seq_idx must have shape {(b, seqlen)}; got {tuple(seq_idx.shape)}.")


def _mamba_ssm_call(kernel, x, dt, A, B, C, D, chunk_size, initial_state, seq_idx, final):
    """Our scan through ``mamba_chunk_scan_combined``, with its semantics made to match ours.

    - ``dt`` is already positive here: no ``dt_bias``, ``dt_softplus=False`` (its default
      ``dt_limit=(0, inf)`` clamp is then the identity).
    - mamba-ssm compares ``seq_idx`` values, treats the state entering a row as belonging to
      sequence 0, and joins tokens of equal id even when they are not contiguous. It gets the
      monotone segment ids (0 at each row's start, +1 at every change): ``initial_state`` goes to
      the first packed sequence whatever its id, and a repeated id starts a new sequence.
    - The final state comes back float32.
    """
    out = kernel(
        x,
        dt,
        A,
        B,
        C,
        chunk_size,
        D=D,
        z=None,
        dt_bias=None,
        initial_states=initial_state,
        seq_idx=None if seq_idx is None else segment_ids(seq_idx).to(torch.int32).contiguous(),
        dt_softplus=False,
        return_final_states=final,
    )
    return (out[0], out[1].float()) if final else out


def _triton_call(kernel, x, dt, A, B, C, D, chunk_size, initial_state, seq_idx, final):
    return kernel(
        x,
        dt,
        A,
        B,
        C,
        D=D,
        chunk_size=chunk_size,
        initial_state=initial_state,
        seq_idx=seq_idx,
        return_final_state=final,
    )


def _kernel_extent(x, dt, B, C, chunk_size) -> tuple[int, int]:
    """Elements one kernel call addresses, per token and per batch row.

    Over its inputs (with their strides), its output and its largest intermediates (chunk states,
    ``h * p * n`` per chunk; in-chunk scores, ``g * Q`` per token).
    """
    h, p = x.shape[2:]
    g, n = B.shape[2:]
    per_token = max(
        *(t.stride(1) for t in (x, dt, B, C)), h * p, -(-h * p * n // chunk_size), g * chunk_size
    )
    row = per_token * x.shape[1]
    if x.shape[0] > 1:  # a batch stride only matters when there is a second row
        row = max(row, *(t.stride(0) for t in (x, dt, B, C)))
    return per_token, row


def _split_scan(call, x, dt, A, B, C, D, chunk_size, initial_state, seq_idx, final):
    """Run ``call`` on pieces small enough for int32 offsets (see ``_KERNEL_MAX_OFFSET``), exact.

    Over the batch first (each group of rows a compact copy); a single row still too large is
    scanned in blocks of whole chunks, each starting from the previous block's final state (reset
    where a packed sequence starts at the block boundary), by ``_scan_in_blocks`` as on CPU.
    """
    b = x.shape[0]
    row = _kernel_extent(x, dt, B, C, chunk_size)[1]
    if b * row <= _KERNEL_MAX_OFFSET:
        return call(x, dt, A, B, C, D, chunk_size, initial_state, seq_idx, final)
    if b > 1:
        step = max(1, _KERNEL_MAX_OFFSET // row)
        parts = [
            _split_scan(
                call,
                *(t[i : i + step].contiguous() for t in (x, dt)),
                A,
                *(t[i : i + step].contiguous() for t in (B, C)),
                D,
                chunk_size,
                None if initial_state is None else initial_state[i : i + step],
                None if seq_idx is None else seq_idx[i : i + step],
                True,
            )
            for i in range(0, b, step)
        ]
        y = torch.cat([part[0] for part in parts])
        return (y, torch.cat([part[1] for part in parts])) if final else y
    x, dt, B, C = (t.contiguous() for t in (x, dt, B, C))
    block = _KERNEL_MAX_OFFSET // _kernel_extent(x[:, :1], dt[:, :1], B[:, :1], C[:, :1],
                                                   chunk_size)[0]  # fmt: skip
    block = max(chunk_size, block // chunk_size * chunk_size)
    return _scan_in_blocks(
        call, (x, dt, A, B, C, D, chunk_size, initial_state, seq_idx, final), block
    )


def _pick_backend(backend: str, on_cuda: bool, chunk_size: int = 64) -> str:
    """The backend ``ssd_scan`` uses for a ``backend`` argument, the device and the chunk size."""
    names = get_args(Backend)
    if backend not in names:
        listed = ", ".join(map(repr, names[:-1])) + f" or {names[-1]!r}"
        raise ValueError(f"backend must be {listed}; got {backend!r}.")
    if backend != "auto":
        return backend
    if on_cuda and mamba_ssm_available():
        return "mamba_ssm"
    # the own kernel tiles chunks as powers of two >= 16
    if on_cuda and triton_available() and chunk_size >= 16 and not chunk_size & (chunk_size - 1):
        return "triton"
    return "torch"


def ssd_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    *,
    D: torch.Tensor | None = None,
    chunk_size: int = 64,
    initial_state: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
    return_final_state: bool = False,
    backend: Backend = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    r"""Selective state-space scan of Mamba2 (the SSD layer), computed chunk by chunk.

    Per head :math:`h` in group :math:`g(h)`, with a ``(head_dim, d_state)`` state :math:`s_t`:

    .. math::

        s_t = e^{\Delta_t A_h} s_{t-1} + \Delta_t\, x_t B_t^\top, \qquad
        y_t = s_t C_t + D_h x_t.

    Same arguments and meaning as mamba-ssm's ``mamba_chunk_scan_combined``.

    Parameters
    ----------
    x
        ``(batch, length, heads, head_dim)`` inputs.
    dt
        ``(batch, length, heads)`` step sizes, already positive (softplus applied).
    A
        ``(heads,)`` negative decay rates.
    B, C
        ``(batch, length, groups, d_state)`` input and output projections; ``heads`` must be a
        multiple of ``groups``.
    D
        Optional skip, ``(heads,)`` or ``(heads, head_dim)``.
    chunk_size
        Tokens per chunk. Any ``length`` works (padded internally).
    initial_state
        Optional ``(batch, heads, head_dim, d_state)`` state before the first token.
    seq_idx
        Optional ``(batch, length)`` int32 sequence index of packed sequences: the state resets
        wherever it changes, so each packed sequence is scanned as if alone. ``initial_state``
        applies to the first one.
    return_final_state
        Also return the ``(batch, heads, head_dim, d_state)`` state after the last token.
    backend
        ``"auto"``: on CUDA tensors mamba-ssm's Triton kernel when it imports, else the own
        Triton kernel when ``triton`` imports (and ``chunk_size`` is a power of two >= 16),
        else the torch reference; on CPU the torch
        reference. ``"torch"``, ``"mamba_ssm"`` or ``"triton"`` force one. The kernels run on
        CUDA tensors (or on CPU under ``TRITON_INTERPRET=1``, for tests); scans too large for
        their int32 offsets are split over the batch and over sequence blocks (exact).

    Returns
    -------
    ``y`` with the shape and dtype of ``x``, and the final state (float32) when asked.
    """
    _check_inputs(x, dt, A, B, C, D, chunk_size, initial_state, seq_idx)
    backend = _pick_backend(backend, x.is_cuda, chunk_size)
    args = (x, dt, A, B, C, D, chunk_size, initial_state, seq_idx, return_final_state)
    if backend == "torch":
        return ssd_scan_torch(
            x,
            dt,
            A,
            B,
            C,
            D=D,
            chunk_size=chunk_size,
            initial_state=initial_state,
            seq_idx=seq_idx,
            return_final_state=return_final_state,
        )
    if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(f"backend={backend!r} runs on CUDA tensors only; use backend='torch'.")
    if backend == "mamba_ssm":
        kernel = _mamba_chunk_scan()
        if kernel is None:
            raise RuntimeError(
                "backend='mamba_ssm' needs the mamba-ssm package with its CUDA extension: "
                "`pip install 'scmamba2-scvi[cuda]'` on a machine with an NVIDIA GPU, or use "
                "backend='triton' or 'torch'."
            )
        call = functools.partial(_mamba_ssm_call, kernel)
    else:
        kernel = _triton_scan()
        if kernel is None:
            raise RuntimeError(
                "backend='triton' needs the triton package (CUDA builds of torch bring it): "
                "`pip install 'scmamba2-scvi[triton]'`, or use backend='torch'."
            )
        call = functools.partial(_triton_call, kernel)
    return _split_scan(call, *args)
