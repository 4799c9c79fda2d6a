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
    if seq_idx is None:
        y = F.conv1d(
            F.pad(x.transpose(1, 2), (left, k - 1 - left)),
            weight[:, None, :],
            bias,
            groups=x.shape[-1],
        )
        return y.transpose(1, 2)
    # every tap at once: (batch, length, channels, kernel) windows, taps from other sequences zeroed
    windows = F.pad(x, (0, 0, left, k - 1 - left)).unfold(1, k, 1)
    same = F.pad(seq_idx, (left, k - 1 - left), value=-1).unfold(1, k, 1) == seq_idx[..., None]
    y = (windows * same[:, :, None, :].to(x.dtype) * weight).sum(-1)
    return y if bias is None else y + bias
