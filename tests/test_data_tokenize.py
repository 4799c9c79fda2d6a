"""Tokenizer: every mode, order and value transform against a slow per-cell reference."""

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from scmamba2_scvi.data import (
    MASK_VALUE,
    PAD_VALUE,
    GeneVocab,
    Tokenizer,
    split_by_token_budget,
)

pytestmark = pytest.mark.filterwarnings("ignore:Sparse .*:UserWarning")

N_CELLS, N_GENES = 40, 120


def reference_values(x, mapped, transform, n_bins):
    """Per-cell value transform, one cell at a time (numpy)."""
    out = np.zeros_like(x, dtype=np.float64)
    if transform == "raw":
        return x.astype(np.float64)
    if transform == "log1p":
        return np.log1p(x / max(x.sum(), 1e-30) * 1e4)
    nz = (x != 0) & mapped
    if nz.any():
        edges = np.quantile(x[nz], np.linspace(0, 1, n_bins - 1))
        out[nz] = np.digitize(x[nz], edges)
    return out


def reference_tokenize(
    X, column_tokens, vocab, mode, max_len, order, columns, transform, n_bins, subsample="top"
):
    """Slow tokenizer: per cell, pick columns, order them, subsample ("top" only), pad."""
    X = np.asarray(X, dtype=np.float64)
    mapped = column_tokens >= 0
    rank = np.arange(len(vocab))  # vocab order: token id
    if order == "genomic":
        rank[vocab.genomic_order()] = np.arange(vocab.n_genes)
    seqs = []
    for x in X:
        if mode == "expressed":
            cols = [j for j in range(len(x)) if mapped[j] and x[j] != 0]
        elif mode == "full":
            cols = [j for j in range(len(x)) if mapped[j]]
        else:
            cols = sorted(columns)
        if max_len is not None and len(cols) > max_len - 1:
            assert subsample == "top"
            # ties by token id, so that the column order does not matter
            top = sorted(cols, key=lambda j: (-x[j], column_tokens[j]))
            cols = sorted(top[: max_len - 1])
        if order in ("vocab", "genomic"):
            cols.sort(key=lambda j: rank[column_tokens[j]])
        elif order == "expression":
            cols.sort(key=lambda j: -x[j])  # stable: ties keep column order
        seqs.append(cols)
    length = max(len(c) for c in seqs) + 1
    genes = np.full((len(X), length), vocab.pad_id)
    values = np.full((len(X), length), PAD_VALUE)
    out_cols = np.full((len(X), length), -1)
    for i, cols in enumerate(seqs):
        genes[i, 0], values[i, 0] = vocab.cls_id, 0
        genes[i, 1 : len(cols) + 1] = column_tokens[cols]
        values[i, 1 : len(cols) + 1] = reference_values(X[i], mapped, transform, n_bins)[cols]
        out_cols[i, 1 : len(cols) + 1] = cols
    return genes, values, out_cols


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    X = rng.negative_binomial(2, 0.6, size=(N_CELLS, N_GENES)).astype(np.float32)
    X *= rng.random(X.shape) < 0.4
    X[3] = 0  # an empty cell
    X[5, :] = rng.integers(1, 6, N_GENES)  # a long cell with many ties
    genes = [f"G{j}" for j in range(N_GENES)]
    vocab = GeneVocab.from_gene_table(
        pd.DataFrame(
            {
                "gene_id": [*genes[::-1], "EXTRA"],  # vocab order differs from column order
                "gene_name": [*genes[::-1], "EXTRA"],
                "chromosome": [f"chr{rng.integers(1, 4)}" for _ in range(N_GENES + 1)],
                "start": rng.permutation(N_GENES + 1) * 100,
            }
        )
    )
    column_tokens = vocab.map(genes)
    column_tokens[[7, 50]] = -1  # dropped columns
    return X, vocab, column_tokens


def as_numpy(batch):
    return {k: v.numpy() for k, v in batch.items()}


@pytest.mark.parametrize("mode", ["expressed", "full", "genes"])
@pytest.mark.parametrize("order", ["vocab", "genomic", "expression"])
@pytest.mark.parametrize("transform", ["bin", "log1p", "raw"])
@pytest.mark.parametrize("max_len", [None, 30])
def test_matches_reference(data, mode, order, transform, max_len):
    X, vocab, column_tokens = data
    genes = [0, 9, 11, 40, 41, 42, 99, 100, 101, 119] if mode == "genes" else None
    if mode == "genes" and max_len is not None:
        max_len = 6
    tok = Tokenizer(
        column_tokens,
        vocab,
        mode=mode,
        max_len=max_len,
        subsample="top",
        gene_order=order,
        genes=genes,
        value_transform=transform,
    )
    out = as_numpy(tok(sp.csr_matrix(X)))
    g, v, c = reference_tokenize(
        X, column_tokens, vocab, mode, max_len, order, genes, transform, 51
    )
    np.testing.assert_array_equal(out["genes"], g)
    np.testing.assert_array_equal(out["columns"], c)
    np.testing.assert_allclose(out["values"], v, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(out["key_padding_mask"], g == vocab.pad_id)
    np.testing.assert_array_equal(out["input_values"], out["values"])
    assert not out["mask"].any()
    assert out["genes"].dtype == np.int64 and out["values"].dtype == np.float32


@pytest.mark.parametrize("kind", ["numpy", "torch", "torch_csr", "scipy_csc"])
def test_input_kinds_agree(data, kind):
    X, vocab, column_tokens = data
    tok = Tokenizer(column_tokens, vocab, max_len=None)
    expected = as_numpy(tok(sp.csr_matrix(X)))
    Xin = {
        "numpy": X,
        "torch": torch.from_numpy(X),
        "torch_csr": torch.from_numpy(X).to_sparse_csr(),
        "scipy_csc": sp.csc_matrix(X),
    }[kind]
    got = as_numpy(tok(Xin))
    for key in expected:
        np.testing.assert_array_equal(got[key], expected[key])


def test_unsorted_torch_csr(data):
    """A torch CSR with unsorted column indices inside rows is ordered correctly."""
    X, vocab, column_tokens = data
    tok = Tokenizer(column_tokens, vocab, max_len=None)
    csr = sp.csr_matrix(X)
    crow, col, val = csr.indptr, csr.indices.copy(), csr.data.copy()
    for i in range(len(crow) - 1):  # reverse each row's entries
        sl = slice(crow[i], crow[i + 1])
        col[sl], val[sl] = col[sl][::-1], val[sl][::-1]
    shuffled = torch.sparse_csr_tensor(
        torch.from_numpy(crow.astype(np.int64)),
        torch.from_numpy(col.astype(np.int64)),
        torch.from_numpy(val),
        size=X.shape,
    )
    expected, got = as_numpy(tok(csr)), as_numpy(tok(shuffled))
    for key in expected:
        np.testing.assert_array_equal(got[key], expected[key])


@pytest.mark.parametrize("mode", ["expressed", "full"])
def test_random_subsample_and_order(data, mode):
    X, vocab, column_tokens = data
    max_len = 12
    ref_tok = Tokenizer(column_tokens, vocab, mode=mode, max_len=None, value_transform="raw")
    full = as_numpy(ref_tok(X))
    tok = Tokenizer(
        column_tokens,
        vocab,
        mode=mode,
        max_len=max_len,
        subsample="random",
        gene_order="random",
        value_transform="raw",
        seed=0,
    )
    a, b = as_numpy(tok(X)), as_numpy(tok(X))
    assert not np.array_equal(a["genes"], b["genes"])  # the generator advances
    again = Tokenizer(
        column_tokens,
        vocab,
        mode=mode,
        max_len=max_len,
        subsample="random",
        gene_order="random",
        value_transform="raw",
        seed=0,
    )
    np.testing.assert_array_equal(as_numpy(again(X))["genes"], a["genes"])
    assert a["genes"].shape[1] <= max_len
    for i in range(len(X)):
        real = ~a["key_padding_mask"][i]
        ref_real = ~full["key_padding_mask"][i]
        n_ref = ref_real.sum()
        assert real.sum() == min(n_ref, max_len)
        cols = a["columns"][i, real][1:]
        assert len(set(cols)) == len(cols)
        ref_cols = full["columns"][i, ref_real][1:]
        assert set(cols) <= set(ref_cols)
        np.testing.assert_array_equal(a["values"][i, real][1:], X[i, cols])
        np.testing.assert_array_equal(a["genes"][i, real][1:], column_tokens[cols])


def test_random_subsample_keeps_vocab_order(data):
    X, vocab, column_tokens = data
    tok = Tokenizer(column_tokens, vocab, max_len=10, subsample="random", seed=1)
    out = as_numpy(tok(X))
    for i in range(len(X)):
        g = out["genes"][i, ~out["key_padding_mask"][i]][1:]
        assert (np.diff(g) > 0).all()


def test_masking(data):
    X, vocab, column_tokens = data
    X = np.tile(X, (20, 1))
    tok = Tokenizer(column_tokens, vocab, mode="expressed", mask_ratio=0.15, seed=0)
    out = as_numpy(tok(X))
    eligible = ~out["key_padding_mask"]
    eligible[:, 0] = False
    frac = out["mask"][eligible].mean()
    assert abs(frac - 0.15) < 0.02
    assert not out["mask"][:, 0].any() and not out["mask"][out["key_padding_mask"]].any()
    np.testing.assert_array_equal(out["input_values"][out["mask"]], MASK_VALUE)
    np.testing.assert_array_equal(out["input_values"][~out["mask"]], out["values"][~out["mask"]])
    over = as_numpy(tok(X, mask_ratio=0.5))
    assert abs(over["mask"][eligible].mean() - 0.5) < 0.03
    g1 = torch.Generator().manual_seed(3)
    g2 = torch.Generator().manual_seed(3)
    np.testing.assert_array_equal(tok(X, generator=g1)["mask"], tok(X, generator=g2)["mask"])


@pytest.mark.parametrize("mode", ["expressed", "full"])
def test_pack_equals_padded(data, mode):
    X, vocab, column_tokens = data
    tok = Tokenizer(column_tokens, vocab, mode=mode, max_len=25, mask_ratio=0.3)
    padded = tok(X, generator=torch.Generator().manual_seed(0))
    packed = tok.pack(X, generator=torch.Generator().manual_seed(0))
    lengths = (~padded["key_padding_mask"]).sum(1)
    cu = packed["cu_seqlens"]
    assert cu.dtype == torch.int32 and packed["seq_idx"].dtype == torch.int32
    assert cu[-1] == packed["genes"].shape[1] and packed["genes"].shape[0] == 1
    for i in range(len(X)):
        n = int(lengths[i])
        sl = slice(int(cu[i]), int(cu[i + 1]))
        assert cu[i + 1] - cu[i] == n
        assert (packed["seq_idx"][0, sl] == i).all()
        for key in ("genes", "values", "input_values", "mask", "columns"):
            torch.testing.assert_close(packed[key][0, sl], padded[key][i, :n])
    assert not packed["key_padding_mask"].any()


def test_lengths_and_token_budget(data):
    X, vocab, column_tokens = data
    tok = Tokenizer(column_tokens, vocab, max_len=30)
    lengths = tok.lengths(X)
    expected = (~tok(X)["key_padding_mask"]).sum(1).numpy()
    np.testing.assert_array_equal(lengths, expected)
    # the scipy CSR path, with an explicit zero and with unmapped columns
    csr = sp.csr_matrix(X)
    csr.data[0] = 0
    some = column_tokens.copy()
    some[::3] = -1
    for ids in (column_tokens, some):
        t = Tokenizer(ids, vocab, max_len=30)
        want = (~t(csr)["key_padding_mask"]).sum(1).numpy()
        np.testing.assert_array_equal(t.lengths(csr), want)
    for padded in (True, False):
        batches = split_by_token_budget(lengths, 200, padded=padded)
        np.testing.assert_array_equal(np.concatenate(batches), np.arange(len(X)))
        for idx in batches:
            cost = len(idx) * lengths[idx].max() if padded else lengths[idx].sum()
            assert cost <= 200 or len(idx) == 1
    with pytest.raises(ValueError, match="max_tokens"):
        split_by_token_budget(lengths, 5)


def test_genes_by_name_and_errors(data):
    X, vocab, column_tokens = data
    tok = Tokenizer(column_tokens, vocab, mode="genes", genes=["G10", "g3"], gene_order="vocab")
    out = tok(X)
    assert out["genes"].shape == (N_CELLS, 3)
    assert set(out["columns"][0, 1:].tolist()) == {3, 10}
    with pytest.raises(ValueError, match="not among the mapped"):
        Tokenizer(column_tokens, vocab, mode="genes", genes=["G7"])
    with pytest.raises(ValueError, match="not in the vocabulary"):
        Tokenizer(column_tokens, vocab, mode="genes", genes=["NOPE"])
    with pytest.raises(ValueError, match="columns"):
        tok(X[:, :10])
    with pytest.raises(ValueError, match="gene_order"):
        Tokenizer(column_tokens, vocab, gene_order="alphabetical")
    no_pos = GeneVocab.from_anndata([f"G{j}" for j in range(5)])
    with pytest.raises(ValueError, match="genomic positions"):
        Tokenizer(no_pos.map([f"G{j}" for j in range(5)]), no_pos, gene_order="genomic")


def test_count_check_and_normalised_data(data):
    X, vocab, column_tokens = data
    tok = Tokenizer(column_tokens, vocab)
    with pytest.raises(ValueError, match="non-integer"):
        tok(X * 0.5)
    with pytest.raises(ValueError, match="NaN"):
        tok(np.where(X > 3, np.nan, X))
    lenient = Tokenizer(column_tokens, vocab, check_counts=False)
    scaled = X * 0.37  # same ranks -> same bins
    np.testing.assert_array_equal(lenient(scaled)["values"], tok(X)["values"])


def test_user_matrix_not_modified(data):
    X, vocab, column_tokens = data
    csr = sp.csr_matrix(X)
    before = csr.copy()
    Tokenizer(column_tokens, vocab, mask_ratio=0.2)(csr)
    assert (csr != before).nnz == 0


def test_from_vocab(data):
    _X, vocab, _gene_ids = data
    tok = Tokenizer.from_vocab(vocab, max_len=None)
    assert len(tok.column_tokens) == len(vocab) and (tok.column_tokens[:3] == -1).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode", ["expressed", "full"])
def test_cuda_matches_cpu(data, mode):
    X, vocab, column_tokens = data
    tok = Tokenizer(
        column_tokens,
        vocab,
        mode=mode,
        max_len=30,
        subsample="top",
        gene_order="genomic",
        mask_ratio=0.2,
        seed=0,
    )
    cpu = tok(torch.from_numpy(X))
    for gpu in (tok(torch.from_numpy(X).cuda()), tok(sp.csr_matrix(X), device="cuda")):
        assert gpu["genes"].is_cuda and gpu["mask"].is_cuda
        for key in ("genes", "values", "columns", "key_padding_mask"):
            torch.testing.assert_close(gpu[key].cpu(), cpu[key])
        assert not gpu["mask"][:, 0].any() and not gpu["mask"][gpu["key_padding_mask"]].any()


@pytest.mark.parametrize("mode", ["expressed", "full"])
def test_duplicated_columns_are_summed(data, mode):
    """Columns sharing a token give the tokens of the matrix with those columns summed."""
    X, vocab, column_tokens = data
    dup = np.concatenate([column_tokens, column_tokens[[0, 4, 4]]])
    Xd = np.concatenate([X, X[:, [9, 4, 20]]], axis=1)  # col 9's values onto gene of col 0
    summed = X.copy()
    summed[:, 0] += X[:, 9]
    summed[:, 4] += X[:, 4] + X[:, 20]
    for xd in (Xd, sp.csr_matrix(Xd)):
        got = as_numpy(Tokenizer(dup, vocab, mode=mode, max_len=None)(xd))
        want = as_numpy(Tokenizer(column_tokens, vocab, mode=mode, max_len=None)(summed))
        for key in ("genes", "values", "columns", "key_padding_mask"):
            np.testing.assert_array_equal(got[key], want[key])
    lengths = Tokenizer(dup, vocab, mode=mode, max_len=None).lengths(sp.csr_matrix(Xd))
    np.testing.assert_array_equal(lengths, (want["genes"] != vocab.pad_id).sum(1))


@pytest.mark.parametrize("mode", ["expressed", "full"])
@pytest.mark.parametrize("subsample", ["random", "top"])
def test_subsample_independent_of_column_order_and_batch(data, mode, subsample):
    X, vocab, column_tokens = data
    perm = np.random.default_rng(1).permutation(X.shape[1])
    tok = Tokenizer(column_tokens, vocab, mode=mode, max_len=12, subsample=subsample, seed=3)
    ptok = Tokenizer(column_tokens[perm], vocab, mode=mode, max_len=12, subsample=subsample, seed=3)
    a = as_numpy(tok(sp.csr_matrix(X)))
    b = as_numpy(ptok(sp.csr_matrix(X[:, perm])))
    np.testing.assert_array_equal(a["genes"], b["genes"])
    np.testing.assert_array_equal(a["values"], b["values"])
    # the same cell in another batch (alone, reversed) keeps its tokens
    rev = as_numpy(tok(sp.csr_matrix(X[::-1])))
    np.testing.assert_array_equal(rev["genes"][::-1], a["genes"])
    # the seed changes the random subset; an explicit generator draws a new one per call
    if subsample == "random":
        other = Tokenizer(column_tokens, vocab, mode=mode, max_len=12, seed=4)
        assert (as_numpy(other(sp.csr_matrix(X)))["genes"] != a["genes"]).any()
        g = torch.Generator().manual_seed(0)
        first, second = (tok(sp.csr_matrix(X), generator=g)["genes"] for _ in range(2))
        assert (first != second).any()
