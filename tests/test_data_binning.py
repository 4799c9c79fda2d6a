"""Quantile binning, value transforms and count checks against slow references."""

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from scmamba2_scvi.data import check_counts, quantile_bin, transform_values


def reference_bins(X: np.ndarray, n_bins: int) -> np.ndarray:
    """scGPT-style per-cell binning: np.quantile edges + np.digitize, one cell at a time."""
    out = np.zeros(X.shape, dtype=np.int64)
    for i, row in enumerate(X):
        nz = row != 0
        if nz.any():
            edges = np.quantile(row[nz], np.linspace(0, 1, n_bins - 1))
            out[i, nz] = np.digitize(row[nz], edges)
    return out


def counts_matrix(rng, n_cells=60, n_genes=400, heavy_tail=True):
    X = rng.negative_binomial(1, 0.35, size=(n_cells, n_genes)).astype(np.float32)
    if heavy_tail:  # values above the histogram range exercise the sort path
        X[X > 0] *= rng.choice([1, 1, 1, 700], size=int((X > 0).sum()))
    X[0] = 0  # an empty cell
    X[1] = 0
    X[1, 5] = 3  # a cell with a single non-zero value
    return X


@pytest.mark.parametrize("n_bins", [2, 3, 11, 51])
@pytest.mark.parametrize("kind", ["integer", "heavy", "continuous"])
def test_matches_reference(n_bins, kind):
    rng = np.random.default_rng(n_bins)
    X = counts_matrix(rng, heavy_tail=kind == "heavy")
    if kind == "continuous":
        X = X * rng.random(X.shape).astype(np.float32) * 3.7
    expected = reference_bins(X, n_bins)
    np.testing.assert_array_equal(quantile_bin(X, n_bins), expected)
    got_sparse = quantile_bin(sp.csr_matrix(X), n_bins)
    assert sp.issparse(got_sparse) and got_sparse.format == "csr"
    np.testing.assert_array_equal(got_sparse.toarray(), expected)
    got_torch = quantile_bin(torch.from_numpy(X), n_bins)
    assert isinstance(got_torch, torch.Tensor)
    np.testing.assert_array_equal(got_torch.numpy(), expected)


def test_real_counts_match_reference(shared_data):
    import anndata as ad

    X = ad.read_h5ad(shared_data / "goolam2016_mouse_embryo_smartseq2.h5ad").X[:20]
    # Smart-seq2 read counts reach 1e5: the histogram path falls back to a sort.
    np.testing.assert_array_equal(quantile_bin(X).toarray(), reference_bins(X.toarray(), 51))


def test_properties():
    rng = np.random.default_rng(1)
    X = counts_matrix(rng)
    B = quantile_bin(X, 51)
    assert B.dtype == np.int64 and B.shape == X.shape
    assert ((B == 0) == (X == 0)).all()
    assert B[X != 0].min() >= 1 and B.max() <= 50
    for x, b in zip(X, B):
        nz = x != 0
        if nz.sum() > 1:
            order = np.argsort(x[nz], kind="stable")
            assert (np.diff(b[nz][order]) >= 0).all()  # larger value never gets a smaller bin
            assert b[nz].max() == 50 and b[nz][x[nz] == x[nz].min()].min() >= 1
    assert B[1, 5] == 50  # single non-zero value -> last bin (as np.digitize)


def test_ties_get_one_bin():
    X = np.array([[1, 1, 1, 1, 2, 5, 0, 9]], dtype=np.float32)
    B = quantile_bin(X, 5)
    assert len(set(B[0, :4])) == 1
    np.testing.assert_array_equal(B, reference_bins(X, 5))


def test_input_untouched_and_sparse_pattern_kept():
    X = sp.random(30, 50, density=0.2, format="csr", random_state=0, dtype=np.float32)
    X.data = np.ceil(X.data * 10)
    before = X.copy()
    out = quantile_bin(X)
    assert (X != before).nnz == 0 and np.shares_memory(out.indptr, X.indptr) is False
    np.testing.assert_array_equal(out.indices, X.indices)
    csc = quantile_bin(X.tocsc())
    assert csc.format == "csc"
    np.testing.assert_array_equal(csc.toarray(), out.toarray())


def test_negative_values_rejected():
    with pytest.raises(ValueError, match="non-negative"):
        quantile_bin(np.array([[1.0, -2.0]]))
    with pytest.raises(ValueError, match="n_bins"):
        quantile_bin(np.ones((2, 2)), n_bins=1)


def test_log1p_and_raw_match_scanpy():
    import anndata as ad
    import scanpy as sc

    rng = np.random.default_rng(2)
    X = counts_matrix(rng, heavy_tail=False)
    X[0, 0] = 1  # no empty cell for normalize_total
    a = ad.AnnData(sp.csr_matrix(X))
    sc.pp.normalize_total(a, target_sum=1e4)
    sc.pp.log1p(a)
    np.testing.assert_allclose(
        transform_values(sp.csr_matrix(X), "log1p").toarray(), a.X.toarray(), rtol=1e-5
    )
    np.testing.assert_array_equal(transform_values(X, "raw"), X)
    np.testing.assert_array_equal(transform_values(X, "bin"), quantile_bin(X))
    with pytest.raises(ValueError, match="value_transform"):
        transform_values(X, "zscore")


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (np.nan, "NaN or infinite"),
        (np.inf, "NaN or infinite"),
        (-1.0, "negative"),
        (0.5, "non-integer"),
    ],
)
@pytest.mark.parametrize("as_sparse", [False, True])
def test_check_counts_errors(bad, message, as_sparse):
    X = np.ones((3, 4), dtype=np.float32)
    X[1, 2] = bad
    X = sp.csr_matrix(X) if as_sparse else X
    with pytest.raises(ValueError, match=message) as err:
        check_counts(X)
    assert "layer='counts'" in str(err.value) and "check_counts=False" in str(err.value)


def test_check_counts_accepts_counts():
    check_counts(sp.csr_matrix(np.array([[0, 3], [7, 0]], dtype=np.float32)))
    check_counts(torch.tensor([[0.0, 2.0]]))
