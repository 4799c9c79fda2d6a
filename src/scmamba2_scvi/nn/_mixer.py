"""Mamba2 token mixers: the causal Mamba2 mixer and Hydra's quasiseparable bidirectional mixer."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from scmamba2_scvi.ops import Backend, depthwise_conv1d, gather_rows, segment_ids, ssd_scan


class RMSNorm(nn.Module):
    """Root-mean-square norm with an optional SiLU gate and grouped statistics.

    ``forward(x, z)`` returns ``rmsnorm(x * silu(z)) * weight`` (mamba-ssm's ``RMSNormGated`` with
    ``norm_before_gate=False``); statistics are taken over groups of ``group_size`` features.

    Parameters
    ----------
    dim
        Feature size.
    eps
        Added to the mean square.
    group_size
        Features normalised together; ``None`` means all of them.
    """

    def __init__(self, dim: int, eps: float = 1e-5, group_size: int | None = None):
        super().__init__()
        self.eps = eps
        self.group_size = group_size or dim
        if dim % self.group_size:
            raise ValueError(f"dim ({dim}) must be divisible by group_size ({self.group_size}).")
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        """Normalise ``x`` (``(..., dim)``), gated by ``silu(z)`` when given."""
        dtype = x.dtype
        cdt = torch.promote_types(dtype, torch.float32)  # at least float32, float64 stays
        x = x.to(cdt)
        if z is not None:
            x = F.silu(z.to(cdt)).mul_(x)
        xg = x.unflatten(-1, (-1, self.group_size))
        # in place only on the product, a fresh tensor (x may be the caller's input)
        xg = xg * torch.rsqrt(xg.pow(2).mean(-1, keepdim=True) + self.eps)
        return xg.flatten(-2).mul_(self.weight.to(cdt)).to(dtype)


def _init_ssm_params(
    nheads: int,
    dt_min: float,
    dt_max: float,
    dt_init_floor: float,
    A_init_range: tuple[float, float],
) -> tuple[nn.Parameter, nn.Parameter, nn.Parameter]:
    """``A_log``, ``dt_bias`` and ``D`` initialised as in mamba-ssm's ``Mamba2``."""
    dt = torch.exp(torch.rand(nheads) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    dt = dt.clamp(min=dt_init_floor)
    dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # inverse of softplus
    A_log = nn.Parameter(torch.log(torch.empty(nheads).uniform_(*A_init_range)))
    D = nn.Parameter(torch.ones(nheads))
    for p in (dt_bias, A_log, D):
        p._no_weight_decay = True
    return A_log, dt_bias, D


class _MixerBase(nn.Module):
    """Shared sizes and parameters of the Mamba2 and Hydra mixers (see :class:`Mamba2Mixer`)."""

    def __init__(
        self,
        d_model: int,
        *,
        d_state: int = 64,
        d_conv: int = 4,
        expand: int = 2,
        head_dim: int = 64,
        n_groups: int = 1,
        chunk_size: int = 64,
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        A_init_range: tuple[float, float] = (1.0, 16.0),
        backend: Backend = "auto",
    ):
        super().__init__()
        self.d_model = d_model
        self.d_inner = expand * d_model
        if self.d_inner % head_dim:
            raise ValueError(
                f"expand * d_model ({self.d_inner}) must be divisible by head_dim ({head_dim})."
            )
        self.n_heads = self.d_inner // head_dim
        if self.n_heads % n_groups:
            raise ValueError(f"heads ({self.n_heads}) must be divisible by n_groups ({n_groups}).")
        self.head_dim, self.d_state, self.n_groups = head_dim, d_state, n_groups
        self.d_conv, self.chunk_size, self.backend = d_conv, chunk_size, backend
        self.A_log, self.dt_bias, self.D = _init_ssm_params(
            self.n_heads, dt_min, dt_max, dt_init_floor, A_init_range
        )
        self.norm = RMSNorm(self.d_inner, group_size=self.d_inner // n_groups)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)
        self._build(n_groups * d_state)

    def _build(self, gn: int) -> None:
        """Create ``in_proj`` and ``conv1d`` (and any other layer of the subclass)."""
        raise NotImplementedError

    def _conv(self, n_channels: int) -> nn.Conv1d:
        return nn.Conv1d(n_channels, n_channels, self.d_conv, groups=n_channels, bias=True)

    def _scan(
        self, x, dt, B, C, *, D=None, seq_idx=None, initial_state=None, return_final_state=False
    ):
        """Run the SSD on flat ``(b, L, d_inner)`` x and ``(b, L, groups * d_state)`` B, C."""
        b, seqlen = x.shape[:2]
        return ssd_scan(
            x.view(b, seqlen, self.n_heads, self.head_dim),
            F.softplus(dt + self.dt_bias),
            -torch.exp(self.A_log.to(torch.promote_types(self.A_log.dtype, torch.float32))),
            B.view(b, seqlen, self.n_groups, self.d_state),
            C.view(b, seqlen, self.n_groups, self.d_state),
            D=D,
            chunk_size=self.chunk_size,
            seq_idx=seq_idx,
            initial_state=initial_state,
            return_final_state=return_final_state,
            backend=self.backend,
        )


class Mamba2Mixer(_MixerBase):
    """Causal Mamba2 mixer (the ``Mamba2`` block of mamba-ssm, in PyTorch).

    ``in_proj -> (z, x, B, C, dt)``; causal depthwise conv over ``(x, B, C)``; SiLU; SSD scan with
    ``D`` skip; gated RMSNorm with ``z``; ``out_proj``.

    Parameters
    ----------
    d_model
        Token width.
    d_state
        SSM state size per head.
    d_conv
        Width of the causal depthwise convolution.
    expand
        Inner width is ``expand * d_model``.
    head_dim
        Channels per SSM head; ``n_heads = expand * d_model / head_dim``.
    n_groups
        Groups sharing ``B`` and ``C`` (as grouped-query attention).
    chunk_size
        SSD chunk length.
    dt_min, dt_max, dt_init_floor, A_init_range
        Initialisation of step sizes and decay rates (mamba-ssm's defaults).
    backend
        SSD backend, see :func:`scmamba2_scvi.ops.ssd_scan`.
    """

    def _build(self, gn: int) -> None:
        self.in_proj = nn.Linear(self.d_model, 2 * self.d_inner + 2 * gn + self.n_heads, bias=False)
        self.conv1d = self._conv(self.d_inner + 2 * gn)

    def forward(self, hidden: torch.Tensor, *, seq_idx: torch.Tensor | None = None) -> torch.Tensor:
        """Mix ``(batch, length, d_model)`` tokens causally; ``seq_idx`` separates packed cells."""
        return self.out_proj(self.inner(self.in_proj(hidden), seq_idx=seq_idx))

    def inner(
        self,
        zxbcdt: torch.Tensor,
        *,
        seq_idx: torch.Tensor | None = None,
        state: tuple[torch.Tensor, ...] | None = None,
        return_state: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """Everything between the two projections: conv, SSD scan and gated norm.

        Parameters
        ----------
        zxbcdt
            Output of ``in_proj``, ``(batch, length, in_proj.out_features)``.
        seq_idx
            Optional packed-sequence index.
        state
            The state returned by the call on the preceding tokens (conv inputs, their sequence
            index or ``None`` when not packed, SSM state or ``None``), to continue a sequence block
            by block; ``None`` at its start.
        return_state
            Also return the state after the last token.

        Returns
        -------
        ``(batch, length, d_inner)``, the input of ``out_proj``, and the state when asked. The
        projections act token by token, so a bidirectional caller can project once and reverse
        the projected sequence.
        """
        gn = self.n_groups * self.d_state
        z, xbc, dt = zxbcdt.split([self.d_inner, self.d_inner + 2 * gn, self.n_heads], -1)
        seqlen = xbc.shape[1]
        ssm_state, context = None, self.d_conv - 1
        conv_in, conv_idx = xbc, seq_idx
        if state is not None:
            tail, tail_idx, ssm_state = state
            conv_in = torch.cat([tail, xbc], 1)
            if (seq_idx is None) != (tail_idx is None):
                raise ValueError("seq_idx and the state's sequence index must both be given.")
            if seq_idx is not None:  # a sequence starting right here does not inherit the state
                if ssm_state is not None:
                    same = seq_idx[:, :1] == tail_idx[:, -1:]
                    ssm_state = ssm_state * same.view(-1, 1, 1, 1)
                conv_idx = torch.cat([tail_idx, seq_idx], 1)
        conv = depthwise_conv1d(
            conv_in, self.conv1d.weight[:, 0], self.conv1d.bias, seq_idx=conv_idx
        )
        # in place where no graph is kept (inference, and the forward pass of recomputed blocks)
        act = F.silu(conv[:, conv.shape[1] - seqlen :], inplace=not torch.is_grad_enabled())
        x, B, C = act.split([self.d_inner, gn, gn], -1)
        y = self._scan(
            x,
            dt,
            B,
            C,
            D=self.D,
            seq_idx=seq_idx,
            initial_state=ssm_state,
            return_final_state=return_state,
        )
        if return_state:
            y, ssm_state = y
        out = self.norm(y.flatten(-2), z)
        if not return_state:
            return out
        tail_idx = None if conv_idx is None else conv_idx[:, conv_idx.shape[1] - context :]
        return out, (conv_in[:, conv_in.shape[1] - context :], tail_idx, ssm_state)


class HydraMixer(_MixerBase):
    """Hydra's quasiseparable bidirectional mixer (Hwang et al., 2024).

    Shared ``(z, x)`` projections, separate ``B``, ``C`` and ``dt`` for the forward and backward
    directions, a centred (non-causal) depthwise convolution, and ONE SSD call over both
    directions stacked on the batch axis. Each direction's output is shifted by one token so that
    the diagonal is not counted twice; a learned, input-dependent diagonal term replaces it.

    Parameters are those of :class:`Mamba2Mixer`.
    """

    def _build(self, gn: int) -> None:
        self.in_proj = nn.Linear(
            self.d_model, 2 * self.d_inner + 4 * gn + 2 * self.n_heads, bias=False
        )
        self.conv1d = self._conv(self.d_inner + 4 * gn)
        self.fc_D = nn.Linear(self.d_inner, self.n_heads, bias=False)

    def forward(
        self,
        hidden: torch.Tensor,
        *,
        reverse: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        seq_idx: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Mix ``(batch, length, d_model)`` tokens in both directions.

        Parameters
        ----------
        hidden
            Token states.
        reverse
            ``(batch, length)`` gather index that reverses each sequence's real tokens (see
            :func:`scmamba2_scvi.nn.reverse_index`).
        key_padding_mask
            ``(batch, length)``, True at (right) padding; zeroed before the centred convolution.
        seq_idx
            Optional packed-sequence index; no information crosses sequences.
        """
        b = hidden.shape[0]
        gn = self.n_groups * self.d_state
        z, xbc, dt = self.in_proj(hidden).split(
            [self.d_inner, self.d_inner + 4 * gn, 2 * self.n_heads], -1
        )
        if key_padding_mask is not None:
            xbc = xbc.masked_fill(key_padding_mask[..., None], 0.0)
        xbc = F.silu(
            depthwise_conv1d(
                xbc, self.conv1d.weight[:, 0], self.conv1d.bias, causal=False, seq_idx=seq_idx
            )
        )
        x, bc_fwd, bc_bwd = xbc.split([self.d_inner, 2 * gn, 2 * gn], -1)
        dt_fwd, dt_bwd = dt.chunk(2, -1)
        xs = torch.cat([x, flip(x, reverse)], 0)
        bcs = torch.cat([bc_fwd, flip(bc_bwd, reverse)], 0)
        dts = torch.cat([dt_fwd, flip(dt_bwd, reverse)], 0)
        seqs = None if seq_idx is None else torch.cat([seq_idx, seq_idx], 0)
        B, C = bcs.split([gn, gn], -1)
        y = self._scan(xs, dts, B, C, seq_idx=seqs).flatten(-2)
        # shift by one token: each direction sees strictly earlier (resp. later) tokens
        y = F.pad(y[:, :-1], (0, 0, 1, 0))
        if seqs is not None:
            starts = F.pad(seqs[:, 1:] != seqs[:, :-1], (1, 0), value=True)
            y = y.masked_fill(starts[..., None], 0.0)
        y = y[:b] + flip(y[b:], reverse)
        diag = (self.fc_D(x) + self.D).repeat_interleave(self.head_dim, -1)
        y = y + x * diag
        return self.out_proj(self.norm(y, z))


def flip(x: torch.Tensor, reverse: torch.Tensor) -> torch.Tensor:
    """Gather positions ``reverse`` (``(batch, m)``) of ``x`` (``(batch, length, ...)``).

    With a :func:`reverse_index` this reverses each sequence's real tokens; with a slice of one,
    it reads a block of the reversed sequence.
    """
    return gather_rows(x, reverse)


def reverse_index(
    key_padding_mask: torch.Tensor | None,
    seq_idx: torch.Tensor | None,
    shape: tuple[int, int],
    device: torch.device | None = None,
) -> torch.Tensor:
    """Gather index that reverses the real tokens of each (packed) sequence, padding left in place.

    Parameters
    ----------
    key_padding_mask
        ``(batch, length)`` bool, True at padding; padding must be on the right of each row.
    seq_idx
        ``(batch, length)`` packed-sequence index, or ``None`` for one sequence per row.
    shape
        ``(batch, length)``.
    device
        Device of the index when neither tensor is given.

    Returns
    -------
    ``(batch, length)`` int64 index ``r`` with ``flip(flip(x, r), r) == x``.
    """
    b, seqlen = shape
    if key_padding_mask is not None:
        device = key_padding_mask.device
    elif seq_idx is not None:
        device = seq_idx.device
    pos = torch.arange(seqlen, device=device).expand(b, seqlen)
    if seq_idx is None:
        if key_padding_mask is None:
            return seqlen - 1 - pos
        n_real = (~key_padding_mask).sum(1, keepdim=True)
        return torch.where(pos < n_real, n_real - 1 - pos, pos)
    seg = segment_ids(seq_idx)
    if key_padding_mask is not None:
        seg = seg.masked_fill(key_padding_mask, seqlen + 1)  # padding: one segment of its own
    start = torch.searchsorted(seg, seg, right=False)
    end = torch.searchsorted(seg, seg, right=True) - 1
    rev = start + end - pos
    if key_padding_mask is not None:
        rev = torch.where(key_padding_mask, pos, rev)
    return rev
