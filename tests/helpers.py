"""Synthetic data and tiny sizes shared by the model-level tests (``pythonpath`` in pyproject)."""

import anndata as ad
import numpy as np
import pandas as pd
from scipy import sparse

TINY = {
    "preset": "cpu-small",
    "d_model": 32,
    "n_layers": 1,
    "d_state": 8,
    "head_dim": 16,
    "max_len": 64,
    "dropout": 0.0,
}
FAST = {"accelerator": "cpu", "enable_progress_bar": False}


def synthetic(n_cells=240, n_genes=60, n_types=3, seed=0, symbols=True):
    """Cell types with disjoint marker genes; counts are Poisson, markers 8x higher."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(n_types), n_cells // n_types)
    rate = np.full((n_cells, n_genes), 0.6)
    per = n_genes // (2 * n_types)
    for t in range(n_types):
        rate[labels == t, t * per : (t + 1) * per] = 5.0
    counts = rng.poisson(rate).astype(np.float32)
    counts[counts.sum(1) == 0, 0] = 1
    ens = [f"ENSG{i:011d}" for i in range(n_genes)]
    sym = [f"GENE{i}" for i in range(n_genes)]
    var = pd.DataFrame({"gene_symbol": sym, "gene_id": ens}, index=sym if symbols else ens)
    obs = pd.DataFrame(
        {
            "cell_type": pd.Categorical([f"type{t}" for t in labels]),
            "batch": pd.Categorical(rng.choice(["a", "b"], n_cells)),
        },
        index=[f"cell{i}" for i in range(n_cells)],
    )
    return ad.AnnData(sparse.csr_matrix(counts), obs=obs, var=var)


def query(adata, genes):
    """A copy of ``adata`` on ``genes``, without its registration: data a user brings."""
    q = adata[:, genes].copy()
    for key in ("_scvi_batch", "_scvi_labels"):
        q.obs.pop(key)
    q.uns.clear()
    return q
