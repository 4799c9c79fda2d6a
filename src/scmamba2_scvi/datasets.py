"""Built-in real data: scanpy's bundled PBMC sample with its counts recovered."""

from __future__ import annotations

import numpy as np
from anndata import AnnData
from scipy import sparse


def pbmc68k_counts() -> AnnData:
    """Scanpy's bundled ``pbmc68k_reduced`` (700 PBMCs, 765 genes, 10 ``bulk_labels``) as counts.

    The bundled ``.raw`` holds ``log1p(normalize_total(counts, 1e4))``; counts are recovered as
    ``round(expm1(raw.X) * n_counts / 1e4)``. Nothing is downloaded.

    Returns
    -------
    AnnData with integer counts (float32 CSR) in ``X`` and in ``layers["counts"]``, ``obs``
    columns ``bulk_labels``, ``louvain``, ``phase``, ``n_counts``, and the bundled
    ``obsm["X_umap"]``.
    """
    import scanpy as sc

    ref = sc.datasets.pbmc68k_reduced()
    lognorm = ref.raw.X.toarray() if sparse.issparse(ref.raw.X) else np.asarray(ref.raw.X)
    counts = np.round(np.expm1(lognorm) * ref.obs["n_counts"].to_numpy()[:, None] / 1e4)
    X = sparse.csr_matrix(counts.astype(np.float32))
    adata = AnnData(
        X=X,
        obs=ref.obs[["bulk_labels", "louvain", "phase", "n_counts"]].copy(),
        var=ref.raw.var[[]].copy(),
        obsm={"X_umap": ref.obsm["X_umap"].copy()},
        layers={"counts": X.copy()},
    )
    adata.uns["bulk_labels_colors"] = list(ref.uns["bulk_labels_colors"])
    return adata
