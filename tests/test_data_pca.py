"""gene_loadings: genes' PCA loadings against scanpy's normalisation and an exact SVD."""

import anndata as ad
import numpy as np
import pytest
import scanpy as sc
from scipy import sparse

from scmamba2_scvi.data import gene_loadings


def _counts(n_cells=300, n_genes=80, seed=0):
    """Poisson counts from three latent programs of very different strengths."""
    rng = np.random.default_rng(seed)
    programs = rng.gamma(1.0, 1.0, (3, n_genes))
    weights = rng.gamma(1.0, 1.0, (n_cells, 3)) * np.array([6.0, 2.5, 1.0])
    return sparse.csr_matrix(rng.poisson(0.3 + weights @ programs).astype(np.float32))


def _oracle(X, genes=None):
    """scanpy's normalize_total + log1p, then an exact SVD of the centred genes."""
    a = ad.AnnData(X.copy())
    sc.pp.normalize_total(a, target_sum=1e4)
    sc.pp.log1p(a)
    D = a.X.toarray().astype(np.float64)
    if genes is not None:
        D = D[:, genes]
    D -= D.mean(0)
    _, s, vt = np.linalg.svd(D, full_matrices=False)
    return vt.T * (s / np.sqrt(D.shape[0] - 1)), s


def _check_top(loadings, reference, s, n):
    """The top ``n`` components (separated singular values) agree up to sign."""
    assert np.all(s[:n] / s[1 : n + 1] > 1.1), "test data must separate the components"
    for j in range(n):
        a, b = loadings[:, j], reference[:, j]
        np.testing.assert_allclose(abs(a @ b) / (a @ a), 1.0, rtol=1e-3)
        np.testing.assert_allclose(np.linalg.norm(a), np.linalg.norm(b), rtol=1e-3)


def test_loadings_match_scanpy_normalisation_and_exact_svd():
    X = _counts()
    before = X.copy()
    loadings = gene_loadings(X, 20)
    assert loadings.shape == (80, 20) and loadings.dtype == np.float32
    reference, s = _oracle(X)
    _check_top(loadings, reference, s, 2)
    assert (X != before).nnz == 0  # the input is not modified
    np.testing.assert_allclose(gene_loadings(X.toarray(), 20), loadings, rtol=1e-5, atol=1e-6)


def test_gene_subset_keeps_library_sizes_of_all_genes():
    X = _counts()
    genes = np.arange(10, 70)
    reference, s = _oracle(X, genes)
    _check_top(gene_loadings(X, 10, genes=genes), reference, s, 2)


def test_fewer_components_than_asked_and_cell_draw():
    X = _counts(n_cells=12, n_genes=30)
    assert gene_loadings(X, 64).shape == (30, 11)  # at most cells - 1
    drawn = gene_loadings(_counts(), 5, max_cells=100, seed=3)
    np.testing.assert_array_equal(drawn, gene_loadings(_counts(), 5, max_cells=100, seed=3))
    assert not np.allclose(np.abs(drawn), np.abs(gene_loadings(_counts(), 5)), atol=1e-3)


def test_one_cell_is_refused():
    with pytest.raises(ValueError, match="at least 2 cells"):
        gene_loadings(_counts()[:1], 4)
