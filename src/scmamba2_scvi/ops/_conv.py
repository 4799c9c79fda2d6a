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
    ``(batch, length, channels)``, in the promoted dtype of ``x`` and ``weight``.
    """
    k = weight.shape[-1]
    left = k - 1 if causal else (k - 1) // 2
    cross = None
    if seq_idx is not None:
        # the few (row, token, tap) whose tap reads a neighbouring sequence: within kernel - 1
        # tokens of a boundary; their contributions are taken out again
        idx = F.pad(seq_idx, (left, k - 1 - left), value=-1).unfold(1, k, 1)  # (b, L, k)
        in_row = F.pad(torch.ones_like(seq_idx, dtype=torch.bool), (left, k - 1 - left))
        cross = (in_row.unfold(1, k, 1) & (idx != seq_idx[..., None])).nonzero(as_tuple=True)
        if not len(cross[0]):
            cross = None
    return _DepthwiseConv.apply(x, weight, bias, left, cross)


def _taps(x: torch.Tensor, weight: torch.Tensor, left: int, dtype: torch.dtype) -> torch.Tensor:
    """``y[t] = sum_j weight[:, j] * x[t - left + j]`` (zero outside the row), one add per tap.

    On CPU, a multiply-add per tap on the channel-last layout runs several times faster than
    ``F.conv1d``'s depthwise kernel (which also needs the channel-first layout); kernels are short.
    """
    seqlen = x.shape[1]
    w = weight.to(dtype)
    y = x * w[:, left]
    for j in range(weight.shape[-1]):
        o = j - left  # tap j of token t reads token t + o
        if o and abs(o) < seqlen:
            y[:, max(0, -o) : seqlen - max(0, o)].addcmul_(
                x[:, max(0, o) : seqlen - max(0, -o)], w[:, j]
            )
    return y


class _DepthwiseConv(torch.autograd.Function):
    """Tap-wise depthwise convolution; packed-sequence taps removed at the few boundary tokens.

    The input gradient is itself a depthwise convolution (flipped filter), the filter gradient one
    product-sum per tap.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, left, cross):
        dtype = torch.promote_types(x.dtype, weight.dtype)
        y = _taps(x, weight, left, dtype)
        if bias is not None:
            y += bias
        if cross is not None:
            rows, pos, tap = cross
            wt = weight.t().to(dtype)
            y.index_put_((rows, pos), -(x[rows, pos + tap - left] * wt[tap]), accumulate=True)
            ctx.save_for_backward(x, weight, rows, pos, tap)
        else:
            ctx.save_for_backward(x, weight)
        ctx.left, ctx.has_bias = left, bias is not None
        return y

    @staticmethod
    def backward(ctx, grad):
        x, weight, *cross = ctx.saved_tensors
        k, left, seqlen = weight.shape[-1], ctx.left, x.shape[1]
        dtype = torch.promote_types(grad.dtype, torch.promote_types(x.dtype, weight.dtype))
        grad, xc = grad.to(dtype), x.to(dtype)
        # x[s] reaches y[s - o] through the tap of offset o
        grad_x = _taps(grad, weight.flip(-1), k - 1 - left, dtype)
        grad_w = torch.empty(weight.shape, dtype=dtype, device=weight.device)
        for j in range(k):
            o = j - left
            a, e = max(0, -o), seqlen - max(0, o)
            grad_w[:, j] = (xc[:, a + o : e + o] * grad[:, a:e]).sum((0, 1))
        if cross:
            rows, pos, tap = cross
            src = pos + tap - left
            g = grad[rows, pos]
            grad_x.index_put_((rows, src), -(g * weight.t().to(dtype)[tap]), accumulate=True)
            grad_w.t().index_put_((tap,), -(xc[rows, src] * g), accumulate=True)
        grad_b = grad.sum((0, 1)) if ctx.has_bias else None
        return grad_x.to(x.dtype), grad_w.to(weight.dtype), grad_b, None, None
