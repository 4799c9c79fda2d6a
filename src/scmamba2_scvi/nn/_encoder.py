"""Bidirectional Mamba2 encoder: a stack of residual blocks reading a cell's tokens both ways."""

from __future__ import annotations

import math
from itertools import pairwise
from typing import Literal

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from scmamba2_scvi.ops import Backend, bidirectional_blocks, segment_ids

from ._mixer import HydraMixer, Mamba2Mixer, RMSNorm, reverse_index
from ._precision import Precision, autocast, bf16_pays

Bidirectional = Literal["shared_flip", "hydra"]


class BiMamba2Block(nn.Module):
    """One residual block: pre-norm, bidirectional mixer, and an optional pre-norm feed-forward.

    ``"shared_flip"`` (the paper's design) runs one :class:`Mamba2Mixer` over the sequence and over
    the reversal of its real tokens, stacked on the batch axis in a single call, and averages the
    two; ``"hydra"`` uses :class:`HydraMixer`.

    Parameters
    ----------
    d_model
        Token width.
    bidirectional
        ``"shared_flip"`` or ``"hydra"``.
    ffn
        Add ``x + FFN(LayerNorm(x))`` after the mixer (the paper's figure, not the released code).
    ffn_mult
        Hidden width of the feed-forward as a multiple of ``d_model``.
    dropout
        Dropout on the mixer and feed-forward outputs.
    **mixer_kwargs
        Passed to the mixer.
    """

    def __init__(
        self,
        d_model: int,
        *,
        bidirectional: Bidirectional = "shared_flip",
        ffn: bool = False,
        ffn_mult: int = 4,
        dropout: float = 0.0,
        **mixer_kwargs,
    ):
        super().__init__()
        if bidirectional not in ("shared_flip", "hydra"):
            raise ValueError(
                f"bidirectional must be 'shared_flip' or 'hydra'; got {bidirectional!r}."
            )
        self.bidirectional = bidirectional
        self.norm = RMSNorm(d_model)
        mixer_cls = Mamba2Mixer if bidirectional == "shared_flip" else HydraMixer
        self.mixer = mixer_cls(d_model, **mixer_kwargs)
        self.dropout = nn.Dropout(dropout)
        self.ffn = None
        if ffn:
            self.ffn = nn.Sequential(
                nn.LayerNorm(d_model),
                nn.Linear(d_model, ffn_mult * d_model),
                nn.GELU(),
                nn.Linear(ffn_mult * d_model, d_model),
            )

    def _shared_flip(self, h, reverse, seq_idx, tokens_per_block, recompute) -> torch.Tensor:
        """Both directions of the shared Mamba2, block by block, recomputed in the backward pass.

        The projections act token by token, so the backward direction reads the input tokens
        through the reverse index. With ``tokens_per_block`` the two scans step through the
        sequence block by block (forward: block k of the sequence; backward: block k of its
        reversal), carrying their SSM states and reading the previous block's last tokens for
        the convolution: exact, and a block's intermediates stay in cache. Only the layer input
        and the states between blocks are kept for the backward pass (see
        :func:`~scmamba2_scvi.ops.bidirectional_blocks`), unless ``recompute`` is False.
        ``out_proj`` is linear, so it runs once on the mean of the two directions, outside the
        recomputed part, instead of once per direction and again in the backward pass.
        """
        out_proj = self.mixer.out_proj
        y = bidirectional_blocks(
            self._mixer_step,
            h,
            reverse,
            seq_idx,
            [
                p
                for n, p in self.mixer.named_parameters()
                if p.requires_grad and n != "out_proj.weight"
            ],
            tokens_per_block=tokens_per_block,
            context=max(1, self.mixer.d_conv - 1),
            recompute=recompute,
        )
        return out_proj(y)

    def _mixer_step(self, h2, idx2, n_context, ssm_state):
        """The mixer up to ``out_proj`` on one block (both directions), after the context."""
        mixer = self.mixer
        zxbcdt = mixer.in_proj(h2)
        state = None
        if n_context or ssm_state is not None:
            gn = mixer.n_groups * mixer.d_state
            tail = zxbcdt[:, :n_context, mixer.d_inner : 2 * mixer.d_inner + 2 * gn]
            tail_idx = None if idx2 is None else idx2[:, :n_context]
            state = (tail, tail_idx, ssm_state)
        y, (_, _, ssm_state) = mixer.inner(
            zxbcdt[:, n_context:],
            seq_idx=None if idx2 is None else idx2[:, n_context:],
            state=state,
            return_state=True,
        )
        return y, ssm_state

    def forward(
        self,
        x: torch.Tensor,
        reverse: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        seq_idx: torch.Tensor | None = None,
        tokens_per_block: int | None = None,
        recompute: bool = True,
    ) -> torch.Tensor:
        """Update ``(batch, length, d_model)`` token states; see :class:`BiMamba2Encoder`.

        ``tokens_per_block`` (``"shared_flip"`` only): scan the sequence in blocks of this many
        tokens (exact). ``recompute`` (``"shared_flip"`` only): the mixer's intermediates are
        recomputed in the backward pass (``False``: kept; faster, more memory).
        """
        h = self.norm(x)
        if self.bidirectional == "shared_flip":
            m = self._shared_flip(h, reverse, seq_idx, tokens_per_block, recompute)
        else:
            m = self.mixer(h, reverse=reverse, key_padding_mask=key_padding_mask, seq_idx=seq_idx)
        x = x + self.dropout(m)
        if self.ffn is not None:
            x = x + self.dropout(self.ffn(x))
        return x


class BiMamba2Encoder(nn.Module):
    """Stack of bidirectional Mamba2 blocks with a final RMSNorm; cost linear in sequence length.

    Parameters
    ----------
    d_model
        Token width.
    n_layers
        Number of blocks.
    d_state, d_conv, expand, head_dim, n_groups, chunk_size
        Mixer sizes (see :class:`Mamba2Mixer`); defaults follow mamba-ssm's ``Mamba2``.
    bidirectional
        ``"shared_flip"``: the paper's design, one Mamba2 per layer shared by both directions
        (padding stays on the right of the reversed copy). ``"hydra"``: the quasiseparable mixer.
    ffn
        Add a pre-norm feed-forward after each mixer (the paper's figure).
    dropout
        Dropout on block outputs.
    checkpointing
        Also recompute each whole layer in the backward pass, keeping only the layer inputs (the
        ``"shared_flip"`` mixer recomputes its own intermediates unless ``keep_activations``).
    backend
        SSD backend, see :func:`scmamba2_scvi.ops.ssd_scan`.
    cpu_microbatch_elements
        On CPU, the batch of cells is encoded in micro-batches of about this many
        ``tokens x d_model`` elements, so that a micro-batch's intermediates stay in the
        processor's cache (the scan is bound by memory bandwidth); the result is the same, since
        cells are independent. ``None`` encodes the whole batch at once. Not used on GPU.
    tokens_per_block
        On CPU, ``"shared_flip"`` layers scan sequences longer than this in blocks of this many
        tokens, passing conv and SSM states between blocks (exact), so that the cost per token
        stays flat as sequences grow. ``None`` disables it. Not used on GPU or by ``"hydra"``.
    precision
        ``"fp32"``; ``"bf16"``: bfloat16 autocast inside the encoder (its output stays float32);
        ``"auto"``: bfloat16 where it makes this encoder faster, else float32 (see
        :meth:`compute_dtype`).

    Examples
    --------
    >>> enc = BiMamba2Encoder(64, 2, d_state=16, head_dim=16)
    >>> x = torch.randn(2, 10, 64)
    >>> pad = torch.zeros(2, 10, dtype=torch.bool)
    >>> pad[1, 7:] = True  # the second cell has 7 real tokens
    >>> enc(x, key_padding_mask=pad).shape
    torch.Size([2, 10, 64])
    """

    def __init__(
        self,
        d_model: int,
        n_layers: int,
        *,
        d_state: int = 64,
        d_conv: int = 4,
        expand: int = 2,
        head_dim: int = 64,
        n_groups: int = 1,
        chunk_size: int = 64,
        bidirectional: Bidirectional = "shared_flip",
        ffn: bool = False,
        dropout: float = 0.0,
        checkpointing: bool = False,
        backend: Backend = "auto",
        cpu_microbatch_elements: int | None = 2**19,
        tokens_per_block: int | None = 1024,
        precision: Precision = "fp32",
    ):
        super().__init__()
        self.d_model, self.n_layers, self.checkpointing = d_model, n_layers, checkpointing
        self.cpu_microbatch_elements = cpu_microbatch_elements
        self.tokens_per_block = tokens_per_block
        if precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"precision must be 'auto', 'fp32' or 'bf16'; got {precision!r}.")
        self.precision = precision
        #: encode the batch in groups of this many cells, each recomputed in the backward pass
        #: (same result, memory of one group); set by the training memory guard
        self.checkpoint_cells: int | None = None
        #: the ``"shared_flip"`` mixers keep their intermediates for the backward pass instead
        #: of recomputing them (same result, one forward pass fewer, more memory); set by the
        #: training memory guard where a step fits comfortably
        self.keep_activations = False
        self.layers = nn.ModuleList(
            BiMamba2Block(
                d_model,
                bidirectional=bidirectional,
                ffn=ffn,
                dropout=dropout,
                d_state=d_state,
                d_conv=d_conv,
                expand=expand,
                head_dim=head_dim,
                n_groups=n_groups,
                chunk_size=chunk_size,
                backend=backend,
            )
            for _ in range(n_layers)
        )
        self.norm_f = RMSNorm(d_model)
        # GPT-2 / mamba-ssm rescaling of the residual-branch output projections
        for layer in self.layers:
            nn.init.kaiming_uniform_(layer.mixer.out_proj.weight, a=math.sqrt(5))
            with torch.no_grad():
                layer.mixer.out_proj.weight /= math.sqrt(n_layers)

    def forward(
        self,
        x: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        seq_idx: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Encode token states.

        Parameters
        ----------
        x
            ``(batch, length, d_model)`` token embeddings.
        key_padding_mask
            ``(batch, length)`` bool, True at padding. Padding must be on the right; outputs at real
            tokens do not depend on how much padding follows.
        seq_idx
            ``(batch, length)`` index of packed sequences (several cells concatenated in one row);
            no information crosses from one sequence to another.

        Returns
        -------
        ``(batch, length, d_model)`` contextual token states.
        """
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"x must be (batch, length, {self.d_model}); got {tuple(x.shape)}.")
        b, seqlen = x.shape[:2]
        if key_padding_mask is not None:
            if key_padding_mask.shape != (b, seqlen):
                raise ValueError(
                    f"key_padding_mask must be {(b, seqlen)}; got {tuple(key_padding_mask.shape)}."
                )
            key_padding_mask = key_padding_mask.bool()
            if (key_padding_mask[:, :-1] & ~key_padding_mask[:, 1:]).any():
                raise ValueError(
                    "key_padding_mask must pad on the right only (real tokens first, then padding)."
                )
        with autocast(self.compute_dtype(x.device), x.device):
            return self._microbatches(x, key_padding_mask, seq_idx)

    def compute_dtype(self, device: torch.device) -> torch.dtype:
        """The dtype the encoder's matrix products run in on ``device`` (``precision`` resolved).

        ``"auto"`` is bfloat16 where :func:`~scmamba2_scvi.nn.bf16_pays` says so for this
        encoder's width, else float32.
        """
        if self.precision == "auto":
            return torch.bfloat16 if bf16_pays(self.d_model, device.type) else torch.float32
        return torch.bfloat16 if self.precision == "bf16" else torch.float32

    def _microbatches(self, x, key_padding_mask, seq_idx) -> torch.Tensor:
        b, seqlen = x.shape[:2]
        if b == 1 and seq_idx is not None and self.checkpoint_cells is not None:
            return self._packed_groups(x, key_padding_mask, seq_idx)
        n = b  # cells per micro-batch
        if self.cpu_microbatch_elements is not None and x.device.type == "cpu":
            n = max(1, self.cpu_microbatch_elements // (seqlen * self.d_model))
        recompute = self.checkpoint_cells is not None and self.training and torch.is_grad_enabled()
        if recompute:
            n = min(n, self.checkpoint_cells)
        if n >= b and not recompute:
            return self._encode(x, key_padding_mask, seq_idx)
        blocks = []
        for i in range(0, b, n):
            args = (
                x[i : i + n],
                None if key_padding_mask is None else key_padding_mask[i : i + n],
                None if seq_idx is None else seq_idx[i : i + n],
            )
            blocks.append(
                checkpoint(self._encode, *args, use_reentrant=False)
                if recompute
                else self._encode(*args)
            )
        return torch.cat(blocks)

    def _packed_groups(self, x, key_padding_mask, seq_idx) -> torch.Tensor:
        """One packed row in groups of ``checkpoint_cells`` whole cells, each recomputed (exact)."""
        if not (self.training and torch.is_grad_enabled()):
            return self._encode(x, key_padding_mask, seq_idx)
        seg = segment_ids(seq_idx)[0]
        firsts = torch.arange(0, int(seg[-1]) + 1, self.checkpoint_cells, device=seg.device)
        bounds = [*torch.searchsorted(seg, firsts).tolist(), x.shape[1]]
        pieces = [
            checkpoint(
                self._encode,
                x[:, a:e],
                None if key_padding_mask is None else key_padding_mask[:, a:e],
                seq_idx[:, a:e],
                use_reentrant=False,
            )
            for a, e in pairwise(bounds)
        ]
        return torch.cat(pieces, 1)

    def _encode(self, x, key_padding_mask, seq_idx) -> torch.Tensor:
        reverse = reverse_index(key_padding_mask, seq_idx, x.shape[:2], device=x.device)
        tokens_per_block = self.tokens_per_block if x.device.type == "cpu" else None
        recompute = self.checkpointing and self.training and torch.is_grad_enabled()
        recompute_mixer = not self.keep_activations
        for layer in self.layers:
            args = (x, reverse, key_padding_mask, seq_idx, tokens_per_block, recompute_mixer)
            x = checkpoint(layer, *args, use_reentrant=False) if recompute else layer(*args)
        return self.norm_f(x)
