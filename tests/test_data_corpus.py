"""Corpora: AnnData, h5ad shards and TileDB-SOMA agree; sharding is disjoint and complete."""

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import scipy.sparse as sp
import torch

from scmamba2_scvi.data import (
    AnnDataCorpus,
    GeneVocab,
    H5adShardCorpus,
    SomaCorpus,
    Tokenizer,
    TokenStream,
)


@pytest.fixture(scope="module")
def pbmc():
    """pbmc68k_reduced with integer counts recovered from .raw, as a CSR AnnData."""
    a = sc.datasets.pbmc68k_reduced()
    raw = a.raw.to_adata()
    counts = np.round(np.expm1(raw.X.toarray()) * a.obs["n_counts"].to_numpy()[:, None] / 1e4)
    return ad.AnnData(
        X=sp.csr_matrix(counts.astype(np.float32)),
        obs=pd.DataFrame({"bulk_labels": a.obs["bulk_labels"].astype(str)}, index=a.obs_names),
        var=pd.DataFrame(index=raw.var_names),
    )


@pytest.fixture(scope="module")
def vocab(pbmc):
    # A vocabulary with genes in a different order than the data, plus genes absent from it.
    names = [*list(pbmc.var_names[::-1]), "ABSENT1", "ABSENT2"]
    return GeneVocab.from_anndata(names)


def expected_vocab_matrix(adata, vocab):
    """Slow reference: cells x len(vocab) matrix, column = token id."""
    ids = vocab.map(adata)
    dense = np.zeros((adata.n_obs, len(vocab)), dtype=np.float32)
    X = adata.X.toarray() if sp.issparse(adata.X) else np.asarray(adata.X)
    for j, t in enumerate(ids):
        if t >= 0:
            dense[:, t] = X[:, j]
    return dense


def collect(corpus):
    X, index, names = [], [], []
    for block in corpus:
        assert block["X"].shape[1] == len(corpus.vocab) and block["X"].has_sorted_indices
        X.append(block["X"].toarray())
        index.append(block["obs_index"])
        names.append(block["obs_names"])
    index = np.concatenate(index)
    order = np.argsort(index)
    return np.concatenate(X)[order], index[order], np.concatenate(names)[order]


def test_anndata_corpus_dense_sparse_backed(pbmc, vocab, tmp_path):
    expected = expected_vocab_matrix(pbmc, vocab)
    dense = pbmc.copy()
    dense.X = dense.X.toarray()
    path = tmp_path / "pbmc.h5ad"
    pbmc.write_h5ad(path)
    backed = ad.read_h5ad(path, backed="r")
    for adata in (pbmc, dense, backed):
        X, index, names = collect(AnnDataCorpus(adata, vocab, cells_per_block=128, shuffle=True))
        np.testing.assert_array_equal(X, expected)
        np.testing.assert_array_equal(index, np.arange(pbmc.n_obs))
        np.testing.assert_array_equal(names, pbmc.obs_names)


def test_h5ad_shards_with_different_genes(pbmc, vocab, tmp_path):
    rng = np.random.default_rng(0)
    bounds = [0, 250, 251, 700]
    expected = expected_vocab_matrix(pbmc, vocab)
    for k in range(3):
        part = pbmc[bounds[k] : bounds[k + 1]].copy()
        perm = rng.permutation(part.n_vars)[: part.n_vars - 40 * k]  # shuffled, fewer genes
        part[:, perm].copy().write_h5ad(tmp_path / f"shard_{k}.h5ad")
        if k:  # genes dropped from a shard must read as zeros
            dropped = vocab.map(part.var_names.delete(perm))
            expected[bounds[k] : bounds[k + 1]][:, dropped] = 0
    corpus = H5adShardCorpus(tmp_path, vocab, cells_per_block=100)
    assert corpus.n_cells == pbmc.n_obs and len(corpus.paths) == 3
    X, _index, names = collect(corpus)
    np.testing.assert_array_equal(X, expected)
    np.testing.assert_array_equal(names, pbmc.obs_names)
    # blocks never cross shard boundaries
    assert all(stop - start <= 100 for _, start, stop in corpus.blocks())
    with pytest.raises(FileNotFoundError):
        H5adShardCorpus(tmp_path / "missing", vocab)


def test_soma_matches_in_memory(pbmc, vocab, tmp_path):
    soma_io = pytest.importorskip("tiledbsoma.io")
    uri = str(tmp_path / "soma")
    soma_io.from_anndata(uri, pbmc, measurement_name="RNA")
    corpus = SomaCorpus(uri, vocab, layer="data", cells_per_block=200, shuffle=True, seed=3)
    X, _index, names = collect(corpus)
    np.testing.assert_array_equal(X, expected_vocab_matrix(pbmc, vocab))
    np.testing.assert_array_equal(names, pbmc.obs_names)
    filtered = SomaCorpus(
        uri, vocab, layer="data", obs_value_filter="bulk_labels == 'CD14+ Monocyte'"
    )
    keep = (pbmc.obs["bulk_labels"] == "CD14+ Monocyte").to_numpy()
    Xf, _, names_f = collect(filtered)
    np.testing.assert_array_equal(names_f, pbmc.obs_names[keep])
    np.testing.assert_array_equal(Xf, expected_vocab_matrix(pbmc, vocab)[keep])
    with pytest.raises(KeyError, match="layer"):
        SomaCorpus(uri, vocab, layer="raw")


@pytest.mark.parametrize("shuffle", [False, True])
def test_two_ranks_two_workers_partition(pbmc, vocab, shuffle):
    seen = []
    for rank in range(2):
        corpus = AnnDataCorpus(
            pbmc, vocab, cells_per_block=64, shuffle=shuffle, seed=1, rank=rank, world_size=2
        )
        corpus.set_epoch(4)
        # each DataLoader worker iterates the corpus and keeps only its own blocks
        loader = torch.utils.data.DataLoader(corpus, batch_size=None, num_workers=2)
        for block in loader:
            assert block["X"].shape[0] <= 64
            seen.append(block["obs_index"].numpy())
    seen = np.concatenate(seen)
    assert len(seen) == pbmc.n_obs  # disjoint ...
    np.testing.assert_array_equal(np.sort(seen), np.arange(pbmc.n_obs))  # ... and complete


def test_epochs_reshuffle(pbmc, vocab):
    corpus = AnnDataCorpus(pbmc, vocab, cells_per_block=64, shuffle=True)
    first = np.concatenate([b["obs_index"] for b in corpus])
    corpus.set_epoch(1)
    second = np.concatenate([b["obs_index"] for b in corpus])
    assert not np.array_equal(first, second)
    np.testing.assert_array_equal(np.sort(first), np.sort(second))


def test_stream_tokens_match_direct_tokenization(pbmc, vocab):
    corpus = AnnDataCorpus(pbmc, vocab, cells_per_block=96)
    tok = Tokenizer.from_vocab(vocab, max_len=None)
    direct_tok = Tokenizer(vocab.map(pbmc), vocab, max_len=None)
    for packed in (False, True):
        batches = list(TokenStream(corpus, tok, 128, packed=packed))
        assert [len(b["obs_index"]) for b in batches] == [128] * 5 + [60]
        first = batches[0]
        ref = (direct_tok.pack if packed else direct_tok)(pbmc.X[:128])
        torch.testing.assert_close(first["genes"], ref["genes"])
        torch.testing.assert_close(first["values"], ref["values"])
    with pytest.raises(ValueError, match="from_vocab"):
        TokenStream(corpus, direct_tok)


def test_seeded_masks_differ_between_workers(pbmc, vocab):
    corpus = AnnDataCorpus(pbmc, vocab, cells_per_block=350)
    tok = Tokenizer.from_vocab(vocab, mode="full", mask_ratio=0.3, seed=0)
    masks = [b["mask"] for b in TokenStream(corpus, tok, 350, num_workers=2)]
    assert len(masks) == 2 and masks[0].shape == masks[1].shape
    assert not torch.equal(masks[0], masks[1])
