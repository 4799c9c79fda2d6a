"""Genes' principal-component loadings, the data-driven start of the gene embeddings."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

__all__ = ["gene_loadings"]


def _log_normalised(X, rows, genes) -> sp.csr_matrix:
    """``log1p`` counts per 10,000 (of all genes) of the chosen rows and genes, float64 CSR."""
    X = sp.csr_matrix(X[rows], dtype=np.float64)  # a copy: the caller's matrix stays as it is
    totals = np.asarray(X.sum(1)).ravel()
    X = sp.csr_matrix(sp.diags(1e4 / np.maximum(totals, 1e-12)) @ X)
    if genes is not None:
        X = X[:, genes]
    np.log1p(X.data, out=X.data)
    return X


def gene_loadings(
    X,
    n_components: int,
    *,
    genes: np.ndarray | None = None,
    max_cells: int = 10_000,
    n_iter: int = 6,
    seed: int = 0,
) -> np.ndarray:
    """Each gene's loadings on the top principal components of ``log1p`` counts per 10,000.

    The components are those of scanpy's ``pp.normalize_total(target_sum=1e4)``, ``pp.log1p``,
    ``pp.pca`` (centred genes, not scaled), computed by a randomized SVD (Halko et al., 2011)
    that centres the sparse matrix implicitly, so memory stays that of the sparse counts.

    Parameters
    ----------
    X
        ``(cells, genes)`` counts, dense or sparse; not modified.
    n_components
        Components wanted; fewer come back when the data has fewer cells or genes.
    genes
        Columns of ``X`` to decompose (default: all); library sizes count every column.
    max_cells
        At most this many cells, drawn at random, enter the decomposition.
    n_iter
        Power iterations of the randomized SVD (more: closer to the exact components).
    seed
        Seed of the cell draw and of the random projection.

    Returns
    -------
    ``(len(genes), k)`` float32 loadings, ``k = min(n_components, cells - 1, genes)``: component
    ``j``'s unit vector times its standard deviation over cells, so that genes that vary more
    get longer vectors. Signs are arbitrary.
    """
    n_cells = X.shape[0]
    n_genes = X.shape[1] if genes is None else len(genes)
    k = min(n_components, n_cells - 1, n_genes)
    if k < 1:
        raise ValueError(
            f"Principal components need at least 2 cells and 1 gene; got {n_cells} x {n_genes}."
        )
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(n_cells, max_cells, replace=False)) if n_cells > max_cells else None
    A = _log_normalised(X, slice(None) if rows is None else rows, genes)
    mean = np.asarray(A.mean(0)).ravel()

    def right(B):  # (A - mean) @ B
        return A @ B - mean @ B

    def left(B):  # (A - mean).T @ B
        return A.T @ B - np.outer(mean, B.sum(0))

    q = min(k + 10, min(A.shape))
    Q = np.linalg.qr(right(rng.standard_normal((n_genes, q))))[0]
    for _ in range(n_iter):
        Q = np.linalg.qr(right(np.linalg.qr(left(Q))[0]))[0]
    _, s, vt = np.linalg.svd(left(Q).T, full_matrices=False)
    return (vt[:k].T * (s[:k] / np.sqrt(max(A.shape[0] - 1, 1)))).astype(np.float32)
