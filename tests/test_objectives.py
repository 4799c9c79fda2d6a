"""Issue-13 objectives: zero genes, the hurdle GEPC head, decoder covariates, DAR by confusion."""

import math

import numpy as np
import pytest
import scipy.sparse as sp
import torch
import torch.nn.functional as F

import scmamba2_scvi.nn as snn
from scmamba2_scvi.data import GeneVocab, TokenCollate, Tokenizer
from scmamba2_scvi.module import SCMamba2Module
from scmamba2_scvi.nn import DecoderCovariates, GeneQueryDecoder

pytestmark = pytest.mark.filterwarnings("ignore:Sparse .*:UserWarning")

N_GENES = 30
TINY = {"d_model": 16, "n_layers": 1, "d_state": 8, "head_dim": 8, "dropout": 0.0}


def counts(n_cells=12, n_genes=N_GENES, rate=0.5, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.poisson(rate, (n_cells, n_genes)).astype(np.float32)
    X[:, 0] += 1  # no empty cell
    return X


def vocab_and_ids(n_genes=N_GENES, extra=5):
    vocab = GeneVocab([f"g{i}" for i in range(n_genes + extra)])
    ids = np.asarray(vocab.map([f"g{i}" for i in range(n_genes)]))
    return vocab, ids


# ---------------------------------------------------------------- zero genes in the tokens
@pytest.mark.parametrize("mode", ["expressed", "full", "genes"])
@pytest.mark.parametrize("max_len", [None, 6])
@pytest.mark.parametrize("shuffled", [False, True])
def test_zero_genes_are_never_expressed_nor_in_the_sequence(mode, max_len, shuffled):
    X = counts()
    X[3] = 1  # a cell expressing every gene: no candidate at all
    vocab, ids = vocab_and_ids()
    ids[5] = -1  # an unmapped column: never a zero gene
    ids[8] = ids[7]  # a duplicated gene: its columns are summed
    if shuffled:  # columns in another order than the vocabulary's
        ids = ids[np.random.default_rng(1).permutation(len(ids))]
    genes = [1, 2, 3, 4, 9, 10, 11] if mode == "genes" else None
    k = 10
    tok = Tokenizer(ids, vocab, mode=mode, max_len=max_len, genes=genes, n_zero_genes=k)
    out = tok(sp.csr_matrix(X), generator=torch.Generator().manual_seed(0))
    cols_of = {}
    for j, t in enumerate(ids):
        if t >= 0:
            cols_of.setdefault(int(t), []).append(j)
    for c in range(len(X)):
        expressed = {t for t, cols in cols_of.items() if X[c, cols].sum() > 0}
        in_seq = set(out["genes"][c][~out["key_padding_mask"][c]][1:].tolist())
        candidates = set(cols_of) - expressed - in_seq
        real = ~out["zero_padding_mask"][c]
        got = out["zero_genes"][c][real].tolist()
        assert len(got) == len(set(got)) == min(k, len(candidates))
        assert set(got) <= candidates
        assert (out["zero_genes"][c][~real] == vocab.pad_id).all()
        assert int(out["n_zero_candidates"][c]) == len(candidates)
    assert not (~out["zero_padding_mask"][3]).any()
    np.testing.assert_allclose(out["log_library"].numpy(), np.log1p(X.sum(1)), rtol=1e-6)


def test_zero_genes_are_uniform_over_the_candidates():
    vocab, ids = vocab_and_ids()
    x = np.zeros((1, N_GENES), np.float32)
    x[0, :4] = 1
    tok = Tokenizer(ids, vocab, n_zero_genes=3)
    gen = torch.Generator().manual_seed(1)
    hits = np.zeros(len(vocab))
    n = 2000
    for _ in range(n):
        hits[tok(sp.csr_matrix(x), generator=gen)["zero_genes"][0].numpy()] += 1
    cand = ids[4:]
    assert hits[ids[:4]].sum() == 0
    expect = n * 3 / len(cand)
    # binomial standard deviation ~ sqrt(expect): 6 of them is far in the tail
    assert np.abs(hits[cand] - expect).max() < 6 * math.sqrt(expect)


def test_packed_zero_genes_equal_padded_and_collate_passes_them():
    X = sp.csr_matrix(counts())
    vocab, ids = vocab_and_ids()
    tok = Tokenizer(ids, vocab, mask_ratio=0.3)
    padded = tok(X, generator=torch.Generator().manual_seed(2), n_zero_genes=7)
    packed = tok.pack(X, generator=torch.Generator().manual_seed(2), n_zero_genes=7)
    for key in ("zero_genes", "zero_padding_mask", "n_zero_candidates", "log_library"):
        assert torch.equal(padded[key], packed[key])
    assert "zero_genes" not in tok(X)  # off by default, log_library always there
    assert "log_library" in tok(X)
    collate = TokenCollate(tok, packed=True, n_zero_genes=5)
    out = collate((0, np.arange(X.shape[0]), {"X": X}))
    assert out["zero_genes"].shape == (X.shape[0], 5)
    with pytest.raises(ValueError, match="n_zero_genes must be a non-negative integer"):
        tok(X, n_zero_genes=-1)


# ---------------------------------------------------------------- the hurdle head
def test_expected_is_p_expressed_times_value():
    torch.manual_seed(0)
    dec = GeneQueryDecoder(8)
    cell, genes = torch.randn(3, 8), torch.randn(5, 8)
    value, zero_logit = dec(cell, genes)
    torch.testing.assert_close(
        dec.expected(value, zero_logit), torch.sigmoid(-zero_logit) * value.clamp(min=0)
    )
    # per-cell gene sets and packed tokens give the same numbers as the fixed gene set
    v3, z3 = dec(cell, genes.expand(3, 5, 8))
    torch.testing.assert_close(v3, value)
    torch.testing.assert_close(z3, zero_logit)
    cell_of = torch.tensor([0, 0, 2, 1])
    vp, zp = dec.per_token(cell, genes[:4], cell_of)
    torch.testing.assert_close(vp, value[cell_of, torch.arange(4)])
    torch.testing.assert_close(zp, zero_logit[cell_of, torch.arange(4)])


def bce(logit, target):
    p = 1 / (1 + math.exp(-logit))
    return -(target * math.log(p) + (1 - target) * math.log(1 - p))


def test_hurdle_loss_against_a_hand_computation():
    module = SCMamba2Module(10, **TINY)
    # two padded cells: <cls> + 3 genes, and <cls> + 2 genes + padding
    targets = torch.tensor([[0.0, 2.0, 0.0, 3.0], [0.0, 1.0, 4.0, -2.0]])
    masked = torch.tensor([[False, True, True, False], [False, True, False, False]])
    pad = torch.tensor([[False] * 4, [False, False, False, True]])
    gepc = torch.tensor([[9.0, 1.5, 7.0, 9.0], [9.0, 2.0, 9.0, 9.0]])
    zl = torch.tensor([[0.0, -1.0, 2.0, 0.0], [0.0, 0.5, 0.0, 0.0]])
    zero_logit = torch.tensor([[1.0, -0.5, 0.0], [2.0, 0.0, 0.0]])
    zero_pad = torch.tensor([[False, False, True], [False, True, True]])
    n_cand = torch.tensor([4, 1])
    inference = {
        "targets": targets,
        "masked": masked,
        "z": torch.zeros(2, 16),
        "key_padding_mask": pad,
        "batch_index": None,
    }
    generative = {
        "gep": targets.clone(),
        "gepc": gepc,
        "gepc_zero_logit": zl,
        "zero_gene_logit": zero_logit,
    }
    tensors = {"key_padding_mask": pad, "zero_padding_mask": zero_pad, "n_zero_candidates": n_cand}
    out = module.loss(tensors, inference, generative, gep_weight=0.0, zero_weight=0.5)
    # value MSE on masked expressed genes only: cell 0 gene 1, cell 1 gene 1
    gepc_hand = ((1.5 - 2.0) ** 2 + (2.0 - 1.0) ** 2) / 2
    # cell 0: 3 gene tokens, 2 masked (weight 3/2 each); 2 of 4 zero candidates sampled (weight 2)
    c0 = (1.5 * (bce(-1.0, 0) + bce(2.0, 1)) + 2 * (bce(1.0, 1) + bce(-0.5, 1))) / (3 + 4)
    # cell 1: 2 gene tokens, 1 masked (weight 2); 1 of 1 candidate (weight 1)
    c1 = (2 * bce(0.5, 0) + 1 * bce(2.0, 1)) / (2 + 1)
    zero_hand = (c0 + c1) / 2
    assert float(out.extra_metrics["gepc"]) == pytest.approx(gepc_hand, rel=1e-5)
    assert float(out.extra_metrics["gepc_zero"]) == pytest.approx(zero_hand, rel=1e-5)
    assert float(out.loss) == pytest.approx(gepc_hand + 0.5 * zero_hand, rel=1e-5)
    # without any zero target the zero head is left alone (it could only learn "expressed")
    del generative["zero_gene_logit"]
    inference["masked"] = torch.tensor([[False, True, False, True], [False] * 4])
    out = module.loss(tensors, inference, generative)
    assert "gepc_zero" not in out.extra_metrics


def tokens_for(module_kwargs=None, n_cells=10, seed=0):
    X = sp.csr_matrix(counts(n_cells, seed=seed))
    vocab, ids = vocab_and_ids()
    tok = Tokenizer(ids, vocab, mask_ratio=0.3)
    args = dict(generator=torch.Generator().manual_seed(seed), n_zero_genes=6)
    padded = tok(X, **args)
    args["generator"] = torch.Generator().manual_seed(seed)
    packed = tok.pack(X, **args)
    return len(vocab), padded, packed


def test_packed_and_padded_losses_are_equal_with_zero_genes():
    n_vocab, padded, packed = tokens_for()
    torch.manual_seed(0)
    module = SCMamba2Module(n_vocab, n_batch=3, **TINY)
    batch = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, -1])
    with torch.random.fork_rng():
        a = module.token_loss(padded, batch, dar_weight=1.0)
    b = module.token_loss(packed, batch, dar_weight=1.0)
    assert set(a.extra_metrics) >= {"gep", "gepc", "gepc_zero", "dar", "dar_confusion"}
    for key, value in a.extra_metrics.items():
        torch.testing.assert_close(value, b.extra_metrics[key], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- decoder covariates
def test_zero_initialised_covariates_leave_outputs_unchanged():
    n_vocab, padded, _ = tokens_for()
    batch = torch.tensor([0, 1] * 5)
    torch.manual_seed(0)
    plain = SCMamba2Module(n_vocab, n_batch=2, batch_decoder=False, library_decoder=False, **TINY)
    with_cov = SCMamba2Module(n_vocab, n_batch=2, **TINY)
    with_cov.load_state_dict(plain.state_dict())  # covariates keep their (zero) initial values
    tensors = {**padded, "batch": batch}
    plain.eval(), with_cov.eval()
    inf_a, gen_a = plain.forward(tensors, compute_loss=False)[:2]
    _, gen_b = with_cov.forward(tensors, compute_loss=False)[:2]
    for key in ("gep", "gepc", "gepc_zero_logit"):
        torch.testing.assert_close(gen_a[key], gen_b[key])
    # trained covariates move the decoders, never the embedding
    with torch.no_grad():
        for p in with_cov.covariates.parameters():
            p.normal_()
    inf_c, gen_c = with_cov.forward(tensors, compute_loss=False)[:2]
    torch.testing.assert_close(inf_c["z"], inf_a["z"])
    assert not torch.allclose(gen_c["gep"], gen_a["gep"])
    assert not torch.allclose(gen_c["gepc"], gen_a["gepc"])


def test_covariates_unknown_batch_takes_the_mean_embedding():
    cov = DecoderCovariates(4, n_batch=3, library=False)
    with torch.no_grad():
        cov.batch.weight.copy_(torch.arange(12.0).view(3, 4))
    out = cov(2, torch.tensor([1, -1]))
    torch.testing.assert_close(out[0], torch.tensor([4.0, 5, 6, 7]))
    torch.testing.assert_close(out[1], torch.tensor([4.0, 5, 6, 7]))  # mean of the 3 rows
    assert DecoderCovariates(4, n_batch=1, library=False)(2, torch.tensor([0, 0])) is None


# ---------------------------------------------------------------- DAR by confusion
def grads(module, names, loss):
    params = dict(module.named_parameters())
    out = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)
    return {n: (torch.zeros_like(params[n]) if g is None else g) for n, g in zip(names, out)}


def test_discriminator_learns_from_its_ce_and_the_encoder_from_confusion():
    n_vocab, padded, _ = tokens_for()
    torch.manual_seed(0)
    module = SCMamba2Module(n_vocab, n_batch=2, **TINY)
    tensors = {**padded, "batch": torch.tensor([0, 1] * 5)}
    disc = [n for n, _ in module.named_parameters() if n.startswith("discriminator.")]
    enc = [n for n, _ in module.named_parameters() if n.startswith("encoder.")]
    off = {"gep_weight": 0.0, "gepc_weight": 0.0, "zero_weight": 0.0}
    with torch.random.fork_rng():
        inf, _, only_ce = module.forward(tensors, loss_kwargs={**off, "dar_weight": 0.0})
    _, _, with_conf = module.forward(tensors, loss_kwargs={**off, "dar_weight": 2.0})
    # dar_weight = 0: the loss is the discriminator's CE; it reaches the discriminator only
    g_ce = grads(module, disc + enc, only_ce.loss)
    assert all(float(g_ce[n].abs().sum()) == 0 for n in enc)
    z = inf["z"].detach()
    hand_ce = F.cross_entropy(module.discriminator(z), tensors["batch"])
    torch.testing.assert_close(only_ce.extra_metrics["dar"], hand_ce.detach())
    g_hand = grads(module, disc, hand_ce)
    for n in disc:
        torch.testing.assert_close(g_ce[n], g_hand[n])
    # the confusion term adds nothing to the discriminator and reaches the encoder
    g_conf = grads(module, disc + enc, with_conf.loss)
    for n in disc:
        torch.testing.assert_close(g_conf[n], g_ce[n])
    assert sum(float(g_conf[n].abs().sum()) for n in enc) > 0
    log_p = F.log_softmax(module.discriminator(inf["z"]), -1)
    torch.testing.assert_close(with_conf.extra_metrics["dar_confusion"], -log_p.mean().detach())
    assert float(with_conf.loss.detach()) == pytest.approx(
        float(hand_ce.detach()) + 2.0 * float(-log_p.mean().detach()), rel=1e-5
    )


def test_confusion_is_smallest_when_the_discriminator_cannot_tell_batches_apart():
    n_vocab, padded, _ = tokens_for()
    module = SCMamba2Module(n_vocab, n_batch=4, **TINY)
    with torch.no_grad():
        module.discriminator.mlp[-1].weight.zero_()  # uniform posterior
        module.discriminator.mlp[-1].bias.zero_()
    out = module.token_loss({**padded, "batch": torch.arange(10) % 4}, dar_weight=1.0)
    assert float(out.extra_metrics["dar_confusion"]) == pytest.approx(math.log(4), rel=1e-5)
    assert not hasattr(snn, "grad_reverse")


# ---------------------------------------------------------------- classifier, old weights
def test_label_weights_weight_the_classifier_cross_entropy():
    n_vocab, padded, _ = tokens_for()
    module = SCMamba2Module(n_vocab, n_labels=3, **TINY)
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 2, -1, 0, 1])
    weights = torch.tensor([0.5, 2.0, 4.0])
    tensors = {**padded, "labels": labels}
    with torch.random.fork_rng():
        _, gen, _ = module.forward(tensors, loss_kwargs={})
    out = module.token_loss(tensors, label_weights=weights)
    logits, known = gen["label_logits"].detach(), labels >= 0
    ce = -F.log_softmax(logits[known], -1)[torch.arange(int(known.sum())), labels[known]]
    w = weights[labels[known]]
    torch.testing.assert_close(out.extra_metrics["cls"], (w * ce).sum() / w.sum())
    assert float(module.logit_temperature) == 1.0


def test_state_dicts_saved_before_the_new_entries_still_load():
    torch.manual_seed(0)
    old = SCMamba2Module(40, n_batch=2, n_labels=3, **TINY).state_dict()
    new_prefixes = ("covariates.", "query_decoder.zero_", "logit_temperature")
    old = {k: v for k, v in old.items() if not k.startswith(new_prefixes)}
    module = SCMamba2Module(40, n_batch=2, n_labels=3, **TINY)
    module.load_state_dict(old)  # strict: the new entries take their initial values
    assert float(module.logit_temperature) == 1.0
    assert all(float(p.detach().abs().sum()) == 0 for p in module.covariates.parameters())
    for key, value in old.items():
        torch.testing.assert_close(module.state_dict()[key], value)
    del old[next(k for k in old if k.startswith("encoder."))]  # a truly missing entry fails
    with pytest.raises(RuntimeError, match="Missing key"):
        module.load_state_dict(old)


# ---------------------------------------------------------------- depth out of the embedding
def test_depth_share_is_the_depth_pcr_of_the_embedding():
    from scmamba2_scvi.metrics import pcr
    from scmamba2_scvi.module._module import depth_share

    rng = np.random.default_rng(0)
    depth = rng.normal(size=40)
    z = rng.normal(size=(40, 6)) + np.outer(depth, [2.0, 0, 0, -1, 0, 0.5])
    got = float(depth_share(torch.tensor(z), torch.tensor(depth)))
    assert got == pytest.approx(pcr(z, depth), rel=1e-9)
    assert 0.3 < got < 0.9
    exact = np.outer(depth, [1.0, -3.0]) + 5.0
    assert float(depth_share(torch.tensor(exact), torch.tensor(depth))) == pytest.approx(1.0)


def test_depth_weight_adds_the_depth_share_and_trains_the_encoder():
    from scmamba2_scvi.module._module import depth_share

    n_vocab, padded, _ = tokens_for()
    torch.manual_seed(0)
    module = SCMamba2Module(n_vocab, **TINY)
    with torch.random.fork_rng():
        inf, _, plain = module.forward(padded, loss_kwargs={})
    _, _, with_depth = module.forward(padded, loss_kwargs={"depth_weight": 3.0})
    share = depth_share(inf["z"], padded["log_library"])
    assert "depth" not in plain.extra_metrics
    torch.testing.assert_close(with_depth.extra_metrics["depth"], share.detach())
    torch.testing.assert_close(with_depth.loss, plain.loss + 3.0 * share)
    enc = [n for n, _ in module.named_parameters() if n.startswith("encoder.")]
    g = grads(module, enc, with_depth.loss - plain.loss)
    assert sum(float(g[n].abs().sum()) for n in enc) > 0


# ---------------------------------------------------------------- value-weighted cell embedding
def test_weighted_cell_embedding_is_the_value_weighted_mean_of_the_outputs():
    vocab, ids = vocab_and_ids()
    tok = Tokenizer(ids, vocab, mask_ratio=0.3)
    batch = tok(sp.csr_matrix(counts()), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    module = SCMamba2Module(len(vocab), cell_embedding="weighted", value_scale=50.0, **TINY)
    out = module.inference(**module._get_inference_input(batch))
    values = module.scale_values(batch["input_values"])
    z = []
    for c in range(values.shape[0]):  # masked (-1), padding (-2) and <cls> (0) weigh nothing
        keep = values[c] > 0
        w = values[c][keep]
        z.append((out["tokens"][c][keep] * w[:, None]).sum(0) / w.sum())
    assert bool((batch["input_values"] == -1).any())  # some values are masked
    torch.testing.assert_close(out["z"], torch.stack(z), rtol=1e-5, atol=1e-6)
