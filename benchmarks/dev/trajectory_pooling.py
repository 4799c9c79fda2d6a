"""A trajectory setting with either cell pooling, to see what the pooling does there.

``python benchmarks/dev/trajectory_pooling.py weighted|mean [SEED [nb04|quality [MAX_LEN [BS]]]]``:

- ``nb04`` (default), notebook 04's setting: 1,200 paul15 cells, 1,000 highly variable genes,
  ``max_len=256`` (or ``MAX_LEN``), minibatches of 64 (or ``BS``), 8 epochs, no labels;
- ``quality``, the trajectory task of ``benchmarks/quality.py``: all 2,660 cells, 2,000 highly
  variable genes, its ``max_len``, epochs and training arguments.

DPT from ``7MEP`` with :func:`scmamba2_scvi.tl.pseudotime`; Spearman with the slingshot
pseudotime over all cells and within each branch, and the share of the embedding's variance that
log depth explains (``pcr_counts``, as in ``benchmarks/quality.py``). Appends a JSON line to
``trajectory_pooling.jsonl`` in the working directory.
"""

import json
import logging
import os
import sys
import time
from pathlib import Path

import anndata as ad
import numpy as np
import scanpy as sc
import scvi
from scipy.stats import spearmanr

import scmamba2_scvi as sm

DATA = Path(os.environ.get("SCMAMBA2_DATA", Path(__file__).parents[3] / "shared" / "data"))
BRANCHES = {
    "ery": ("Multipotent progenitors", "Megakaryocytes", "Erythrocyte"),
    "myeloid": ("Multipotent progenitors", "GMP", "Monocytes", "Neutrophils", "Basophils"),
}


def _nb04(pool: str, seed: int, max_len: int = 256, batch_size: int = 64):
    """Notebook 04's cells and training; (adata, model, seconds)."""
    scvi.settings.seed = seed
    paul = ad.read_h5ad(DATA / "paul15_myeloid_tradeseq.h5ad")
    hvg = sc.pp.highly_variable_genes(paul, n_top_genes=1000, flavor="seurat_v3", inplace=False)
    cells = np.sort(np.random.default_rng(0).choice(paul.n_obs, 1200, replace=False))
    adata = paul[cells][:, hvg["highly_variable"].to_numpy()].copy()
    sc.pp.filter_cells(adata, min_counts=1)
    sm.SCMamba2.setup_anndata(adata)
    model = sm.SCMamba2(adata, preset="cpu-small", max_len=max_len, cell_embedding=pool)
    t0 = time.perf_counter()
    model.train(
        max_epochs=8, batch_size=batch_size, plan_kwargs={"lr": 1e-3}, enable_progress_bar=False
    )
    return adata, model, time.perf_counter() - t0


def _quality(pool: str, seed: int):
    """``benchmarks/quality.py``'s trajectory cells and training; (adata, model, seconds)."""
    sys.path.insert(0, str(Path(__file__).parents[1]))
    import quality

    quality.quiet()
    cfg = quality.Config(epochs=dict(quality.FULL_EPOCHS), seed=seed)
    adata = quality.hvg(quality.load("paul15"), cfg)
    model, seconds = quality.fit_scmamba2(
        adata, {}, cfg.epochs["trajectory"], cfg, {"cell_embedding": pool}, {}
    )
    return adata, model, seconds


def main(pool: str, seed: int = 0, setting: str = "nb04", *sizes: int) -> dict:
    """Train in ``setting`` with ``cell_embedding=pool``; score the DPT ordering."""
    scvi.settings.verbosity = logging.ERROR
    sc.settings.verbosity = 0
    adata, model, train_s = {"nb04": _nb04, "quality": _quality}[setting](pool, seed, *sizes)
    sm.tl.embed(adata, model)
    sm.tl.pseudotime(adata, root=("paul15_clusters", "7MEP"), groups="paul15_clusters")
    pt = adata.obs["scmamba2_pseudotime"].to_numpy()
    sling = adata.obs["Pseudotime"].to_numpy()
    types = adata.obs["cell_type2"].astype(str).to_numpy()
    ok = np.isfinite(pt)
    branch = {}
    for name, members in BRANCHES.items():
        sel = ok & np.isin(types, members)
        branch[name] = round(float(spearmanr(pt[sel], sling[sel])[0]), 3)
    log_depth = np.log1p(np.asarray(adata.X.sum(1)).ravel())
    out = {
        "setting": setting,
        "max_len": model.tokenizer_kwargs["max_len"],
        "batch_size": sizes[1] if len(sizes) > 1 else 64 if setting == "nb04" else "train()'s",
        "pool": pool,
        "seed": seed,
        "spearman_slingshot": round(float(spearmanr(pt[ok], sling[ok])[0]), 3),
        "branch": branch,
        "reached": int(ok.sum()),
        "pcr_counts": round(sm.metrics.pcr(adata.obsm["X_scmamba2"], log_depth), 3),
        "train_s": round(train_s),
    }
    with open("trajectory_pooling.jsonl", "a") as f:
        f.write(json.dumps(out) + "\n")
    return out


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], *(int(a) if a.isdigit() else a for a in sys.argv[2:]))))
