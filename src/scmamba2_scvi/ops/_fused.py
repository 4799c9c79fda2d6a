"""Both directions of a shared-weight sequence layer, block by block, recomputed in backward.

The autograd graph of a Mamba2 mixer holds every intermediate of the chunked scan: the
``(chunk x chunk)`` decay matrices, the chunk states, the convolution and gate outputs, for every
token and both directions. :func:`bidirectional_blocks` instead runs the layer without a graph,
keeps only its input and the small state carried from one sequence block to the next, and in the
backward pass recomputes one block at a time (last to first), as mamba-ssm's fused kernels do on
GPU. The result and the gradients are those of the plain computation. Where the intermediates
fit, ``recompute=False`` keeps them instead and saves the second forward pass.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

Step = Callable[
    [torch.Tensor, torch.Tensor | None, int, torch.Tensor | None],
    tuple[torch.Tensor, torch.Tensor],
]


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``out[i, j] = x[i, index[i, j]]``; ``x`` ``(batch, length, ...)``, ``index`` ``(batch, m)``.

    One ``index_select`` over the flattened rows, which copies whole feature vectors: on CPU
    several times faster than ``torch.gather`` with the index expanded to every feature.
    """
    b, length = x.shape[:2]
    flat = index if b == 1 else index + torch.arange(b, device=index.device)[:, None] * length
    rows = x.reshape(b * length, *x.shape[2:]).index_select(0, flat.reshape(-1))
    return rows.view(*index.shape, *x.shape[2:])


def _spans(length: int, tokens_per_block: int | None, context: int):
    """``(lo, start, end)`` per block: outputs ``start:end``, inputs from ``lo`` (context)."""
    size = tokens_per_block if tokens_per_block and tokens_per_block < length else length
    return [(max(0, s - context), s, min(s + size, length)) for s in range(0, length, size)]


def _block_input(h, reverse, seqs, lo, end):
    h2 = torch.cat([h[:, lo:end], gather_rows(h, reverse[:, lo:end])], 0)
    return h2, None if seqs is None else seqs[:, lo:end]


def _run(step, h, reverse, seq_idx, spans, keep_states):
    seqs = None if seq_idx is None else torch.cat([seq_idx, seq_idx], 0)
    b = h.shape[0]
    fwd = bwd = state = None
    states = []
    for lo, start, end in spans:
        if keep_states:
            states.append(state)
        h2, idx2 = _block_input(h, reverse, seqs, lo, end)
        y2, state = step(h2, idx2, start - lo, state)
        if fwd is None:
            fwd = y2.new_empty(b, h.shape[1], *y2.shape[2:])
            bwd = torch.empty_like(fwd)
        fwd[:, start:end], bwd[:, start:end] = y2[:b], y2[b:]
    return fwd.add_(gather_rows(bwd, reverse)).mul_(0.5), states


class _Recompute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, step, spans, h, reverse, seq_idx, *params):
        with torch.no_grad():
            out, states = _run(step, h, reverse, seq_idx, spans, keep_states=True)
        ctx.step, ctx.spans, ctx.states = step, spans, states
        # the recomputation must round as the forward did
        device = h.device.type
        ctx.autocast = (device, torch.get_autocast_dtype(device), torch.is_autocast_enabled(device))
        ctx.save_for_backward(h, reverse, seq_idx, *params)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        h, reverse, seq_idx, *params = ctx.saved_tensors
        seqs = None if seq_idx is None else torch.cat([seq_idx, seq_idx], 0)
        b = h.shape[0]
        trained = [p for p in params if p.requires_grad]
        grad_h = torch.zeros_like(h) if ctx.needs_input_grad[2] else None
        grad_p = [None] * len(trained)
        grad_state = None
        for (lo, start, end), state in zip(reversed(ctx.spans), reversed(ctx.states)):
            device, dtype, enabled = ctx.autocast
            with torch.enable_grad(), torch.autocast(device, dtype, enabled=enabled):
                h2, idx2 = _block_input(h, reverse, seqs, lo, end)
                h2 = h2.detach().requires_grad_(grad_h is not None)
                if state is not None:
                    state = state.detach().requires_grad_()
                y2, state_out = ctx.step(h2, idx2, start - lo, state)
                g_bwd = gather_rows(grad_out, reverse[:, start:end])
                g2 = torch.cat([grad_out[:, start:end], g_bwd])
                outputs, grads = [y2], [0.5 * g2]
                if grad_state is not None:
                    outputs.append(state_out)
                    grads.append(grad_state)
                wrt = [t for t in (h2, state) if t is not None and t.requires_grad] + trained
                got = list(torch.autograd.grad(outputs, wrt, grads, allow_unused=True))
            if grad_h is not None:
                g2 = got.pop(0)
                grad_h[:, lo:end] += g2[:b]
                index = reverse[:, lo:end, None].expand(-1, -1, h.shape[-1])
                grad_h.scatter_add_(1, index, g2[b:])
            grad_state = got.pop(0) if state is not None else None
            for i, g in enumerate(got):
                if g is not None:
                    grad_p[i] = g if grad_p[i] is None else grad_p[i] + g
        it = iter(grad_p)
        grad_params = [next(it) if p.requires_grad else None for p in params]
        return (None, None, grad_h, None, None, *grad_params)


def bidirectional_blocks(
    step: Step,
    h: torch.Tensor,
    reverse: torch.Tensor,
    seq_idx: torch.Tensor | None,
    params: Sequence[torch.Tensor],
    *,
    tokens_per_block: int | None,
    context: int,
    recompute: bool = True,
) -> torch.Tensor:
    """Mean of ``step`` over a sequence and its reversal, block by block, recomputed in backward.

    Parameters
    ----------
    step
        ``step(h2, seq_idx2, n_context, state) -> (y2, state)``: the layer on one block of both
        directions stacked on the batch axis (forward rows first). ``h2`` starts with
        ``n_context`` tokens of the previous block (read-only context, e.g. for a convolution);
        ``y2`` covers the other tokens; ``state`` is the tensor carried to the next block
        (``None`` before the first). It must be deterministic (no dropout), since the backward
        pass runs it again.
    h
        ``(batch, length, features)`` layer input.
    reverse
        ``(batch, length)`` gather index of the reversed sequence (an involution per row, e.g.
        :func:`~scmamba2_scvi.nn.reverse_index`); block ``k`` of the backward direction reads
        positions ``reverse[:, block k]`` of ``h``.
    seq_idx
        Optional ``(batch, length)`` packed-sequence index, passed to ``step`` for both
        directions (a reversal within each sequence keeps every sequence in place).
    params
        The parameters ``step`` uses; their gradients are accumulated over the blocks.
    tokens_per_block
        Tokens of the sequence per block (``None``: the whole sequence in one block).
    context
        Tokens before each block that ``step`` reads as context.
    recompute
        Keep only the input and the block states, and run ``step`` again in the backward pass;
        ``False``: autograd keeps every intermediate of ``step`` (the same gradients, one
        forward pass fewer, the memory of all intermediates).

    Returns
    -------
    ``(batch, length, ...)``: the mean of the forward direction's output and the backward
    direction's, flipped back to the original order.
    """
    spans = _spans(h.shape[1], tokens_per_block, context)
    needs_grad = h.requires_grad or any(p.requires_grad for p in params)
    if recompute and torch.is_grad_enabled() and needs_grad:
        return _Recompute.apply(step, spans, h, reverse, seq_idx, *params)
    return _run(step, h, reverse, seq_idx, spans, keep_states=False)[0]
