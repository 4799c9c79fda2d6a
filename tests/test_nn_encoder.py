"""Bidirectional Mamba2 encoder: padding, both directions, reference flips, packing, checkpoints."""

import io

import pytest
import torch

from scmamba2_scvi.nn import BiMamba2Encoder, Mamba2Mixer, RMSNorm, flip, reverse_index

BIDIRECTIONAL = ["shared_flip", "hydra"]


def small_encoder(bidirectional, **kw):
    torch.manual_seed(0)
    kw = {"d_state": 8, "head_dim": 8, "chunk_size": 8, **kw}
    return BiMamba2Encoder(32, 2, bidirectional=bidirectional, **kw).double()


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("grad", [False, True])
def test_rmsnorm_matches_formula_and_leaves_inputs(gated, grad):
    """Grouped, gated RMSNorm against its formula written out, values and gradients; the
    caller's tensors are not modified (the norm computes partly in place)."""
    norm = RMSNorm(12, group_size=4).double()
    with torch.no_grad():
        norm.weight.copy_(rand(12, seed=3))
    x, z = rand(2, 5, 12, seed=1), rand(2, 5, 12, seed=2)
    x0, z0 = x.clone(), z.clone()
    xs = [t.clone().requires_grad_(grad) for t in (x, z)]
    with torch.set_grad_enabled(grad):
        out = norm(xs[0], xs[1] if gated else None)
    rx, rz = (t.clone().requires_grad_() for t in (x, z))
    v = (rx * torch.nn.functional.silu(rz) if gated else rx).view(2, 5, 3, 4)
    ref = (v / (v.pow(2).mean(-1, keepdim=True) + norm.eps).sqrt()).view(2, 5, 12)
    ref = ref * norm.weight.detach()
    torch.testing.assert_close(out, ref)
    assert torch.equal(xs[0].detach(), x0) and torch.equal(xs[1].detach(), z0)
    if grad:
        out.square().sum().backward()
        ref.square().sum().backward()
        torch.testing.assert_close(xs[0].grad, rx.grad)
        if gated:
            torch.testing.assert_close(xs[1].grad, rz.grad)


@pytest.mark.parametrize("bidirectional", BIDIRECTIONAL)
def test_real_tokens_ignore_right_padding(bidirectional):
    enc = small_encoder(bidirectional)
    lengths = [29, 17, 3]
    x = rand(3, 29, 32)
    pad = torch.arange(29)[None] >= torch.tensor(lengths)[:, None]
    y = enc(x, key_padding_mask=pad)
    # more padding, filled with different junk
    x_more = torch.cat([x, rand(3, 40, 32, seed=1)], 1)
    x_more[pad.nonzero(as_tuple=True)] = 1e3
    pad_more = torch.cat([pad, torch.ones(3, 40, dtype=torch.bool)], 1)
    y_more = enc(x_more, key_padding_mask=pad_more)
    for i, n in enumerate(lengths):
        torch.testing.assert_close(y[i, :n], y_more[i, :n], rtol=1e-12, atol=1e-12)
        # and each cell alone, with no padding at all
        torch.testing.assert_close(enc(x[i : i + 1, :n])[0], y[i, :n], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("bidirectional", BIDIRECTIONAL)
def test_output_depends_on_both_sides(bidirectional):
    enc = small_encoder(bidirectional)
    x = rand(1, 40, 32)
    y = enc(x)
    i = 20
    for j in (5, 35):  # one token before i, one after
        x2 = x.clone()
        x2[0, j] += 1.0
        assert (enc(x2)[0, i] - y[0, i]).abs().max() > 1e-6, f"token {j} does not reach {i}"


def test_causal_mixer_alone_is_one_directional():
    """Control for the test above: a single Mamba2 mixer does not see later tokens."""
    torch.manual_seed(0)
    mixer = Mamba2Mixer(32, d_state=8, head_dim=8, chunk_size=8).double()
    x = rand(1, 40, 32)
    x2 = x.clone()
    x2[0, 35] += 1.0
    torch.testing.assert_close(mixer(x)[0, :35], mixer(x2)[0, :35])


def test_shared_flip_equals_explicit_two_pass_reference():
    enc = small_encoder("shared_flip")
    lengths = [25, 11]
    x = rand(2, 25, 32)
    pad = torch.arange(25)[None] >= torch.tensor(lengths)[:, None]
    y = enc(x, key_padding_mask=pad)
    for i, n in enumerate(lengths):
        h = x[i : i + 1, :n]
        for layer in enc.layers:  # slow reference: each direction separately, explicit flips
            normed = layer.norm(h)
            fwd = layer.mixer(normed)
            bwd = layer.mixer(normed.flip(1)).flip(1)
            h = h + (fwd + bwd) / 2
        ref = enc.norm_f(h)[0]
        torch.testing.assert_close(y[i, :n], ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("bidirectional", BIDIRECTIONAL)
def test_packed_sequences_equal_separate_runs(bidirectional):
    enc = small_encoder(bidirectional)
    lengths = [13, 30, 5]
    x = rand(1, sum(lengths), 32)
    seq_idx = torch.repeat_interleave(torch.arange(3), torch.tensor(lengths))[None].int()
    y = enc(x, seq_idx=seq_idx)
    start = 0
    for n in lengths:
        alone = enc(x[:, start : start + n])
        torch.testing.assert_close(y[:, start : start + n], alone, rtol=1e-12, atol=1e-12)
        start += n


def test_reverse_index_is_an_involution_that_keeps_padding():
    pad = torch.tensor([[0, 0, 0, 1, 1], [0, 0, 0, 0, 0]], dtype=torch.bool)
    r = reverse_index(pad, None, (2, 5))
    assert r.tolist() == [[2, 1, 0, 3, 4], [4, 3, 2, 1, 0]]
    seq_idx = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 2, 2]])
    r = reverse_index(pad, seq_idx, (2, 5))
    assert r.tolist() == [[1, 0, 2, 3, 4], [0, 2, 1, 4, 3]]
    x = rand(2, 5, 3)
    torch.testing.assert_close(flip(flip(x, r), r), x)


@pytest.mark.parametrize("bidirectional", BIDIRECTIONAL)
def test_state_dict_round_trip(bidirectional):
    enc = small_encoder(bidirectional, ffn=True)
    buf = io.BytesIO()
    torch.save(enc.state_dict(), buf)
    buf.seek(0)
    torch.manual_seed(123)  # a different initialisation...
    other = BiMamba2Encoder(
        32, 2, bidirectional=bidirectional, ffn=True, d_state=8, head_dim=8, chunk_size=8
    ).double()
    x = rand(2, 20, 32)
    assert not torch.allclose(other(x), enc(x))
    other.load_state_dict(torch.load(buf))  # ...is overwritten by the saved weights
    torch.testing.assert_close(other(x), enc(x), rtol=0, atol=0)


@pytest.mark.parametrize("bidirectional", BIDIRECTIONAL)
def test_checkpointing_gives_same_gradients(bidirectional):
    enc = small_encoder(bidirectional, ffn=True).train()
    x = rand(2, 20, 32)
    pad = torch.zeros(2, 20, dtype=torch.bool)
    pad[1, 12:] = True

    def grads(checkpointing):
        enc.checkpointing = checkpointing
        enc.zero_grad()
        xi = x.clone().requires_grad_()
        (enc(xi, key_padding_mask=pad) ** 2).sum().backward()
        return [xi.grad] + [p.grad.clone() for p in enc.parameters()]

    for a, b in zip(grads(False), grads(True), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_ffn_option_adds_parameters_and_changes_output():
    plain, with_ffn = small_encoder("shared_flip"), small_encoder("shared_flip", ffn=True)
    assert sum(p.numel() for p in with_ffn.parameters()) > sum(
        p.numel() for p in plain.parameters()
    )
    assert with_ffn.layers[0].ffn is not None and plain.layers[0].ffn is None


def test_bad_inputs_raise_clear_errors():
    enc = small_encoder("shared_flip")
    with pytest.raises(ValueError, match="pad on the right"):
        enc(rand(1, 5, 32), key_padding_mask=torch.tensor([[1, 0, 0, 0, 0]], dtype=torch.bool))
    with pytest.raises(ValueError, match=r"\(batch, length, 32\)"):
        enc(rand(1, 5, 16))
    with pytest.raises(ValueError, match="bidirectional"):
        BiMamba2Encoder(32, 1, bidirectional="both")
    with pytest.raises(ValueError, match="head_dim"):
        BiMamba2Encoder(32, 1, head_dim=48)


@pytest.mark.parametrize("bidirectional", BIDIRECTIONAL)
def test_cpu_micro_batches_give_the_same_result_and_gradients(bidirectional):
    enc = small_encoder(bidirectional)
    x = rand(5, 12, 32)
    pad = torch.arange(12)[None] >= torch.tensor([12, 3, 7, 12, 1])[:, None]

    def run(block):
        enc.cpu_microbatch_elements = block
        enc.zero_grad()
        xi = x.clone().requires_grad_()
        y = enc(xi, key_padding_mask=pad)
        (y.masked_fill(pad[..., None], 0) ** 2).sum().backward()
        return [y.masked_fill(pad[..., None], 0), xi.grad] + [p.grad for p in enc.parameters()]

    whole = run(None)
    split = run(2 * 12 * 32)  # two cells per block: blocks of 2, 2, 1
    for a, b in zip(whole, split, strict=True):  # parameter gradients sum in another order
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("packed", [False, True])
def test_sequence_blocks_give_the_same_result_and_gradients(packed):
    enc = small_encoder("shared_flip", ffn=True)
    if packed:  # three cells packed in one row, boundaries off and on block edges (block 8)
        x = rand(1, 41, 32)
        pad = None
        seq_idx = torch.repeat_interleave(torch.arange(3), torch.tensor([16, 11, 14]))[None].int()
    else:
        x = rand(3, 41, 32)
        pad = torch.arange(41)[None] >= torch.tensor([41, 9, 30])[:, None]
        seq_idx = None

    def run(block, checkpointing=False):
        enc.tokens_per_block, enc.checkpointing = block, checkpointing
        enc.zero_grad()
        xi = x.clone().requires_grad_()
        y = enc(xi, key_padding_mask=pad, seq_idx=seq_idx)
        if pad is not None:
            y = y.masked_fill(pad[..., None], 0)
        (y**2).sum().backward()
        return [y, xi.grad] + [p.grad for p in enc.parameters()]

    whole = run(None)
    # 13 is not a multiple of the SSD chunk (8); checkpointing recomputes each block
    for block, checkpointing in ((8, False), (13, False), (8, True)):
        for a, b in zip(whole, run(block, checkpointing), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
