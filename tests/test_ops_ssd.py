"""ssd_scan against an independent per-token recurrence."""

import pytest
import torch

from scmamba2_scvi.ops import depthwise_conv1d, mamba_ssm_available, ssd_scan, ssd_scan_torch


def naive_scan(x, dt, A, B, C, D=None, initial_state=None, seq_idx=None):
    """s_t = exp(dt_t A) s_{t-1} + dt_t x_t B_t^T ; y_t = s_t C_t + D x_t, one token at a time."""
    b, length, h, p = x.shape
    g, n = B.shape[-2:]
    hg = h // g
    s = torch.zeros(b, h, p, n, dtype=x.dtype) if initial_state is None else initial_state.clone()
    ys = []
    for t in range(length):
        if seq_idx is not None and t > 0:
            keep = (seq_idx[:, t] == seq_idx[:, t - 1]).to(x.dtype)
            s = s * keep[:, None, None, None]
        bt = B[:, t].repeat_interleave(hg, 1)
        ct = C[:, t].repeat_interleave(hg, 1)
        decay = torch.exp(dt[:, t] * A)[..., None, None]
        s = decay * s + dt[:, t][..., None, None] * x[:, t][..., None] * bt[:, :, None, :]
        y = (s * ct[:, :, None, :]).sum(-1)
        if D is not None:
            y = y + x[:, t] * (D[:, None] if D.dim() == 1 else D)
        ys.append(y)
    return torch.stack(ys, 1), s


def make_case(b, length, h, p, g, n, dtype, seed):
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    x = rnd(b, length, h, p)
    dt = torch.rand(b, length, h, generator=gen, dtype=torch.float64) * 0.5 + 0.01
    A = -(torch.rand(h, generator=gen, dtype=torch.float64) * 2 + 0.05)
    B, C = rnd(b, length, g, n), rnd(b, length, g, n)
    return [t.to(dtype) for t in (x, dt, A, B, C)]


CASES = [
    # (b, length, heads, head_dim, groups, state, chunk)
    (2, 37, 4, 8, 1, 16, 16),  # length not a multiple of the chunk
    (1, 130, 6, 4, 3, 8, 32),  # groups > 1
    (3, 64, 2, 16, 2, 4, 64),  # exactly one chunk
    (1, 300, 2, 4, 1, 8, 8),  # many chunks: more than one group of chunks in the inter-chunk pass
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("d_shape", ["none", "heads", "heads_x_dim"])
def test_matches_recurrence_fp64(case, d_shape):
    b, length, h, p, g, n, q = case
    x, dt, A, B, C = make_case(b, length, h, p, g, n, torch.float64, seed=length + h)
    D = {
        "none": None,
        "heads": torch.randn(h, dtype=torch.float64),
        "heads_x_dim": torch.randn(h, p, dtype=torch.float64),
    }[d_shape]
    y, s = ssd_scan(x, dt, A, B, C, D=D, chunk_size=q, return_final_state=True, backend="torch")
    y_ref, s_ref = naive_scan(x, dt, A, B, C, D)
    assert y.dtype == torch.float64 and y.shape == x.shape
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(s, s_ref, rtol=1e-10, atol=1e-10)


def test_initial_state_and_final_state_chain():
    x, dt, A, B, C = make_case(2, 90, 4, 8, 2, 16, torch.float64, seed=3)
    s0 = torch.randn(2, 4, 8, 16, dtype=torch.float64)
    y, s = ssd_scan(x, dt, A, B, C, chunk_size=16, initial_state=s0, return_final_state=True)
    y_ref, s_ref = naive_scan(x, dt, A, B, C, initial_state=s0)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(s, s_ref, rtol=1e-10, atol=1e-10)
    # scanning two halves with the first half's final state as initial state equals one scan
    y1, s1 = ssd_scan(
        *(t[:, :41] if t.dim() > 1 else t for t in (x, dt, A, B, C)),
        chunk_size=16,
        initial_state=s0,
        return_final_state=True,
    )
    y2, s2 = ssd_scan(
        *(t[:, 41:] if t.dim() > 1 else t for t in (x, dt, A, B, C)),
        chunk_size=16,
        initial_state=s1,
        return_final_state=True,
    )
    torch.testing.assert_close(torch.cat([y1, y2], 1), y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(s2, s_ref, rtol=1e-10, atol=1e-10)


def test_seq_idx_equals_separate_sequences():
    lengths = [23, 40, 7, 50]
    x, dt, A, B, C = make_case(1, sum(lengths), 4, 8, 2, 16, torch.float64, seed=11)
    seq_idx = torch.repeat_interleave(torch.arange(4, dtype=torch.int32), torch.tensor(lengths))[
        None
    ]
    D = torch.randn(4, dtype=torch.float64)
    y, s = ssd_scan(x, dt, A, B, C, D=D, chunk_size=16, seq_idx=seq_idx, return_final_state=True)
    y_ref, s_ref = naive_scan(x, dt, A, B, C, D, seq_idx=seq_idx)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(s, s_ref, rtol=1e-10, atol=1e-10)
    start = 0
    for length in lengths:
        sl = slice(start, start + length)
        alone, s_alone = ssd_scan(
            x[:, sl], dt[:, sl], A, B[:, sl], C[:, sl], D=D, chunk_size=16, return_final_state=True
        )
        torch.testing.assert_close(y[:, sl], alone, rtol=1e-10, atol=1e-10)
        start += length
    torch.testing.assert_close(s, s_alone, rtol=1e-10, atol=1e-10)  # final state = last sequence's


def test_seq_idx_with_initial_state_applies_to_first_sequence():
    x, dt, A, B, C = make_case(2, 70, 2, 4, 1, 8, torch.float64, seed=5)
    s0 = torch.randn(2, 2, 4, 8, dtype=torch.float64)
    seq_idx = torch.zeros(2, 70, dtype=torch.int32)
    seq_idx[0, 30:] = 1
    seq_idx[1, 64:] = 7
    y = ssd_scan(x, dt, A, B, C, chunk_size=32, initial_state=s0, seq_idx=seq_idx)
    y_ref, _ = naive_scan(x, dt, A, B, C, initial_state=s0, seq_idx=seq_idx)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)


def test_fp32_close_to_fp64_oracle():
    x, dt, A, B, C = make_case(2, 200, 4, 16, 1, 32, torch.float64, seed=7)
    y_ref, _ = naive_scan(x, dt, A, B, C)
    y = ssd_scan(*(t.float() for t in (x, dt, A, B, C)), chunk_size=64)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-4, atol=1e-4)


def test_strong_decay_stays_finite_in_fp32():
    """Log-decays far below fp32's exp range (down to -160 per token): output and gradients
    stay finite and match the oracle; the masked (future) entries must not overflow."""
    x, dt, A, B, C = make_case(1, 96, 2, 8, 1, 4, torch.float64, seed=21)
    dt = dt * 20.0  # up to 10
    A = A * 8.0  # down to -16
    seq_idx = torch.tensor([[0] * 40 + [1] * 56], dtype=torch.int32)
    y_ref, _ = naive_scan(x, dt, A, B, C, seq_idx=seq_idx)
    inputs = [t.float().requires_grad_() for t in (x, dt, A, B, C)]
    y = ssd_scan(*inputs, chunk_size=32, seq_idx=seq_idx)
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-4, atol=1e-4)
    y.square().sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in inputs)


def test_bf16_input_returns_bf16_and_accumulates_in_fp32():
    x, dt, A, B, C = make_case(1, 256, 4, 16, 1, 32, torch.float64, seed=9)
    bf = [t.bfloat16() for t in (x, dt, A, B, C)]
    y = ssd_scan(*bf, chunk_size=64)
    assert y.dtype == torch.bfloat16
    # oracle on the same (rounded) inputs: the only error left is bf16 rounding of the output
    y_ref, _ = naive_scan(*(t.double() for t in bf))
    rel = (y.double() - y_ref).norm() / y_ref.norm()
    assert rel < 1e-2


def test_gradcheck_tiny_fp64():
    x, dt, A, B, C = make_case(1, 11, 2, 3, 1, 4, torch.float64, seed=13)
    D = torch.randn(2, dtype=torch.float64)
    seq_idx = torch.tensor([[0] * 5 + [1] * 6], dtype=torch.int32)
    inputs = [t.clone().requires_grad_() for t in (x, dt, A, B, C, D)]

    def f(x, dt, A, B, C, D):
        return ssd_scan(x, dt, A, B, C, D=D, chunk_size=4, seq_idx=seq_idx)

    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6)


def test_memory_does_not_grow_quadratically():
    """No saved tensor grows with L^2: at 4x the length the largest one is at most ~4x larger.

    A tiny chunk makes L / chunk large, so a dense (chunks x chunks) decay matrix would show up.
    """
    sizes = {}
    for length in (1024, 4096):
        x, dt, A, B, C = make_case(1, length, 2, 8, 1, 8, torch.float32, seed=1)
        largest = 0

        def hook(t):
            nonlocal largest
            largest = max(largest, t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(hook, lambda t: t):
            x.requires_grad_()
            ssd_scan(x, dt, A, B, C, chunk_size=4).sum().backward()
        sizes[length] = largest
    assert sizes[4096] <= 4.5 * sizes[1024]


def test_input_validation_messages():
    x, dt, A, B, C = make_case(1, 10, 4, 2, 2, 3, torch.float32, seed=0)
    with pytest.raises(ValueError, match="dt must have shape"):
        ssd_scan(x, dt[:, :5], A, B, C)
    with pytest.raises(ValueError, match="divisible by groups"):
        ssd_scan(x[:, :, :3], dt[:, :, :3], A[:3], B, C)
    with pytest.raises(ValueError, match="backend"):
        ssd_scan(x, dt, A, B, C, backend="cuda")


@pytest.mark.skipif(mamba_ssm_available() and torch.cuda.is_available(), reason="kernel present")
def test_forcing_mamba_ssm_without_it_explains_the_fix():
    x, dt, A, B, C = make_case(1, 10, 2, 2, 1, 3, torch.float32, seed=0)
    with pytest.raises(RuntimeError, match=r"mamba-ssm|CUDA"):
        ssd_scan(x, dt, A, B, C, backend="mamba_ssm")


@pytest.mark.parametrize("causal", [True, False])
def test_depthwise_conv_seq_idx_equals_separate(causal):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 30, 5, generator=gen, dtype=torch.float64)
    w = torch.randn(5, 4, generator=gen, dtype=torch.float64)
    bias = torch.randn(5, generator=gen, dtype=torch.float64)
    seq_idx = torch.tensor([[0] * 12 + [1] * 18])
    y = depthwise_conv1d(x, w, bias, causal=causal, seq_idx=seq_idx)
    a = depthwise_conv1d(x[:, :12], w, bias, causal=causal)
    b = depthwise_conv1d(x[:, 12:], w, bias, causal=causal)
    torch.testing.assert_close(y, torch.cat([a, b], 1))
    # and the causal path agrees with torch.nn.Conv1d's left-padded convolution
    if causal:
        conv = torch.nn.Conv1d(5, 5, 4, groups=5, padding=3).double()
        with torch.no_grad():
            conv.weight.copy_(w[:, None])
            conv.bias.copy_(bias)
        ref = conv(x[:, :12].transpose(1, 2))[..., :12].transpose(1, 2)
        torch.testing.assert_close(a, ref)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.skipif(not mamba_ssm_available(), reason="needs mamba-ssm")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mamba_ssm_backend_matches_torch(dtype):
    x, dt, A, B, C = make_case(2, 1000, 8, 64, 1, 64, torch.float32, seed=21)
    seq_idx = torch.zeros(2, 1000, dtype=torch.int32)
    seq_idx[:, 400:] = 1
    args = [t.cuda() for t in (x, dt, A, B, C)]
    args = [t.to(dtype) if t.dim() > 1 else t for t in args]
    D = torch.randn(8, device="cuda")
    kw = dict(D=D, chunk_size=64, seq_idx=seq_idx.cuda(), return_final_state=True)
    y_k, s_k = ssd_scan(*args, backend="mamba_ssm", **kw)
    y_t, s_t = ssd_scan(*args, backend="torch", **kw)
    tol = 2e-2 if dtype == torch.bfloat16 else 2e-3
    torch.testing.assert_close(y_k.float(), y_t.float(), rtol=tol, atol=tol)
    torch.testing.assert_close(s_k.float(), s_t.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("tokens_per_block", [32, 48, 100])
def test_sequence_blocks_are_exact(tokens_per_block):
    """Blocked scanning (state passed between blocks) equals the recurrence, packed or not."""

    x, dt, A, B, C = make_case(2, 200, 4, 8, 2, 8, torch.float64, seed=17)
    D = torch.randn(4, dtype=torch.float64)
    s0 = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    seq_idx = torch.zeros(2, 200, dtype=torch.int32)
    seq_idx[0, 64:] = 1  # a sequence starting exactly at a block boundary (block 32)
    seq_idx[0, 150:] = 2
    seq_idx[1, 77:] = 3
    for sidx in (None, seq_idx):
        y, s = ssd_scan_torch(
            x,
            dt,
            A,
            B,
            C,
            D=D,
            chunk_size=16,
            initial_state=s0,
            seq_idx=sidx,
            return_final_state=True,
            tokens_per_block=tokens_per_block,
        )
        y_ref, s_ref = naive_scan(x, dt, A, B, C, D, initial_state=s0, seq_idx=sidx)
        torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(s, s_ref, rtol=1e-10, atol=1e-10)
