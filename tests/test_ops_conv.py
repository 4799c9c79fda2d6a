"""Packed depthwise convolution against a tap-by-tap oracle, forward and gradients."""

import pytest
import torch
import torch.nn.functional as F

from scmamba2_scvi.ops import depthwise_conv1d


def windowed_conv(x, weight, bias, causal, seq_idx):
    """Oracle: every tap of every token, taps from another sequence (or outside the row) zero."""
    k = weight.shape[-1]
    left = k - 1 if causal else (k - 1) // 2
    seqlen = x.shape[1]
    y = torch.zeros_like(x) + bias
    for t in range(seqlen):
        for j in range(k):
            s = t - left + j
            if 0 <= s < seqlen:
                same = (seq_idx[:, s] == seq_idx[:, t]).to(x.dtype)[:, None]
                y[:, t] = y[:, t] + x[:, s] * weight[:, j] * same
    return y


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("k", [2, 4])
def test_packed_conv_matches_oracle_with_gradients(causal, k):
    gen = torch.Generator().manual_seed(k)
    # sequences shorter than the kernel, a boundary at the first token, different rows
    lengths = [[1, 5, 2, 9, 3], [7, 1, 1, 11]]
    seq_idx = torch.stack(
        [torch.repeat_interleave(torch.arange(len(r)), torch.tensor(r)) for r in lengths]
    )
    x = torch.randn(2, 20, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, k, generator=gen, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(6, generator=gen, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 20, 6, generator=gen, dtype=torch.float64)
    y = depthwise_conv1d(x, w, bias, causal=causal, seq_idx=seq_idx)
    ref = windowed_conv(x, w, bias, causal, seq_idx)
    torch.testing.assert_close(y, ref)
    got = torch.autograd.grad(y, (x, w, bias), g)
    want = torch.autograd.grad(ref, (x, w, bias), g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_single_sequence_index_equals_unpacked():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, 17, 3, generator=gen, dtype=torch.float64)
    w = torch.randn(3, 4, generator=gen, dtype=torch.float64)
    y = depthwise_conv1d(x, w, seq_idx=torch.zeros(1, 17, dtype=torch.long))
    torch.testing.assert_close(y, depthwise_conv1d(x, w))
    ref = F.conv1d(F.pad(x.transpose(1, 2), (3, 0)), w[:, None], groups=3).transpose(1, 2)
    torch.testing.assert_close(y, ref)


def test_bfloat16_input_is_convolved_in_float32():
    """Under autocast the projections hand bfloat16 to the conv; it computes in float32."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 13, 4, generator=gen).bfloat16()
    w, bias = torch.randn(4, 4, generator=gen), torch.randn(4, generator=gen)
    seq_idx = torch.tensor([[0] * 5 + [1] * 8, [0] * 13])
    y = depthwise_conv1d(x, w, bias, seq_idx=seq_idx)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, depthwise_conv1d(x.float(), w, bias, seq_idx=seq_idx))
