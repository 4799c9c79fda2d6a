"""Depthwise 1-D convolution along the sequence, causal or centred, aware of packed sequences."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def depthwise_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    causal: bool = True,
    seq_idx: torch.Tensor | None = None,
) -> torch.Tensor:
    """Depthwise convolution of each channel along the sequence.

    Parameters
    ----------
    x
        ``(batch, length, channels)``.
    weight
        ``(channels, kernel)`` filter per channel; the last tap multiplies the current token when
        ``causal`` (as ``torch.nn.Conv1d`` with left padding ``kernel - 1``).
    bias
        Optional ``(channels,)``.
    causal
        ``True``: token ``t`` sees ``t - kernel + 1 .. t``. ``False``: a centred window
        ``t - (kernel - 1) // 2 .. t + kernel // 2``.
    seq_idx
        Optional ``(batch, length)`` sequence index of packed sequences: taps that would cross into
        another sequence read zero, as at the ends of a single sequence.

    Returns
    -------
    ``(batch, length, channels)``.
    """
    k = weight.shape[-1]
    left = k - 1 if causal else (k - 1) // 2
    y = _DepthwiseConv.apply(x, weight, bias, left)
    if seq_idx is None:
        return y
    # Packed: one plain convolution over the whole row, then the few tokens whose window reaches
    # into a neighbouring sequence (within ``kernel - 1`` of a boundary) are computed again with
    # those taps zeroed, instead of masking every tap of every token.
    seqlen = x.shape[1]
    taps = torch.arange(k, device=x.device) - left  # offset of each tap from the token
    idx_pad = F.pad(seq_idx, (left, k - 1 - left), value=-1).unfold(1, k, 1)  # (b, L, k)
    in_row = F.pad(torch.ones_like(seq_idx, dtype=torch.bool), (left, k - 1 - left)).unfold(1, k, 1)
    same = idx_pad == seq_idx[..., None]
    rows, pos = (in_row & ~same).any(-1).nonzero(as_tuple=True)
    if not len(rows):
        return y
    src = pos[:, None] + taps  # (n, k) token read by each tap
    keep = (same & in_row)[rows, pos].to(x.dtype)[..., None]  # (n, k, 1)
    windows = x[rows[:, None], src.clamp(0, seqlen - 1)] * keep  # (n, k, channels)
    edge = torch.einsum("nkc,ck->nc", windows, weight.to(windows.dtype))
    if bias is not None:
        edge = edge + bias
    return y.index_put((rows, pos), edge.to(y.dtype))


class _DepthwiseConv(torch.autograd.Function):
    """``F.conv1d`` forward; a backward of one transposed convolution and one contraction.

    The CPU backward of a depthwise ``conv1d`` (oneDNN) is many times slower than its forward;
    the input gradient is itself a depthwise convolution (flipped filter) and the filter gradient
    a contraction of the input windows with the output gradient.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, left):
        k = weight.shape[-1]
        ctx.save_for_backward(x, weight)
        ctx.left, ctx.has_bias = left, bias is not None
        xt = F.pad(x.transpose(1, 2), (left, k - 1 - left))
        return F.conv1d(xt, weight[:, None, :], bias, groups=x.shape[-1]).transpose(1, 2)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        k, left = weight.shape[-1], ctx.left
        dtype = torch.promote_types(grad.dtype, x.dtype)
        grad, xc = grad.to(dtype), x.to(dtype)
        # x[s] reaches y[s + left - j] through tap j
        gt = F.pad(grad.transpose(1, 2), (k - 1 - left, left))
        flipped = weight.flip(-1)[:, None, :].to(dtype)
        grad_x = F.conv1d(gt, flipped, groups=x.shape[-1]).transpose(1, 2)
        windows = F.pad(xc, (0, 0, left, k - 1 - left)).unfold(1, k, 1)  # (b, L, C, k)
        grad_w = torch.einsum("blck,blc->ck", windows, grad)
        grad_b = grad.sum((0, 1)) if ctx.has_bias else None
        return grad_x.to(x.dtype), grad_w.to(weight.dtype), grad_b, None
