"""Quality of SCMamba2 against the classic baselines on real data from ../shared/data.

Tasks (each model trained from scratch on this CPU; not run in CI):

- annotation, pbmc3k (stratified 80/20): accuracy and macro-F1 of SCMamba2, scANVI (test cells
  unlabelled) and logistic regression on PCA;
- integration, kang2018 control vs IFN-beta (batch = condition): scib-metrics' ``Benchmarker``
  on SCMamba2 (DSBN + DAR), scVI and PCA in one run (PCA is also the unintegrated embedding of
  PCR comparison): bio (isolated labels, k-means NMI/ARI, label silhouette, cLISI), batch (BRAS,
  iLISI, kBET per label, graph connectivity, PCR comparison), their means and
  ``total = 0.6 bio + 0.4 batch``; needs ``pip install ".[benchmark]"``;
- trajectory, paul15 (2,000 HVG): DPT from each embedding, rooted in the 7MEP cluster; Spearman
  with the given slingshot ``Pseudotime`` and with the differentiation stage (multipotent
  progenitors 0, GMP 1, mature types 2); SCMamba2 vs scVI vs PCA;
- reconstruction, kang2018: 10% of non-zero entries hidden (set to zero) before training;
  Pearson of predicted vs true log1p-normalised values at the hidden entries, SCMamba2 (GEPC
  head, log1p values) vs scVI's normalised expression.

Writes ``results/quality_cpu.json`` and ``.md``. Usage::

    python benchmarks/quality.py                 # all tasks (~1 hour on 2 cores)
    python benchmarks/quality.py --tasks annotation --epochs 5
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import scanpy as sc
import scipy.sparse as sp
import torch

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
RESULTS = Path(__file__).resolve().parent / "results"
HVG = 2000


def quiet() -> None:
    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "scvi", "scmamba2_scvi"):
        logging.getLogger(name).setLevel(logging.ERROR)


def load(name: str) -> ad.AnnData:
    path = DATA / name
    if not path.exists():
        sys.exit(f"{path} is missing: this benchmark needs the team's ../shared/data folder.")
    adata = ad.read_h5ad(path)
    adata.X = sp.csr_matrix(adata.X, dtype=np.float32)
    return adata


def hvg(adata: ad.AnnData, batch_key: str | None = None) -> ad.AnnData:
    """Top highly variable genes (Seurat v3 on counts), as a copy."""
    sel = sc.pp.highly_variable_genes(
        adata, n_top_genes=HVG, flavor="seurat_v3", batch_key=batch_key, inplace=False
    )
    return adata[:, sel["highly_variable"].to_numpy()].copy()


def pca_embedding(adata: ad.AnnData, n_pcs: int = 50) -> np.ndarray:
    a = adata.copy()
    sc.pp.normalize_total(a, target_sum=1e4)
    sc.pp.log1p(a)
    sc.pp.pca(a, n_comps=n_pcs, random_state=0)
    return a.obsm["X_pca"]


def train_scmamba2(adata, epochs: int, *, plan_kwargs=None, **model_kwargs):
    from scmamba2_scvi import SCMamba2

    kwargs = {"preset": "cpu-small", "max_len": 1024, **model_kwargs}
    model = SCMamba2(adata, **kwargs)
    t0 = time.perf_counter()
    model.train(
        max_epochs=epochs,
        batch_size=64,
        accelerator="cpu",
        enable_progress_bar=False,
        plan_kwargs={"lr": 1e-3, **(plan_kwargs or {})},
    )
    return model, time.perf_counter() - t0


def train_scvi(adata, epochs: int, batch_key: str | None = None):
    import scvi

    scvi.model.SCVI.setup_anndata(adata, batch_key=batch_key)
    model = scvi.model.SCVI(adata, n_latent=10)
    t0 = time.perf_counter()
    model.train(max_epochs=epochs, accelerator="cpu", enable_progress_bar=False)
    return model, time.perf_counter() - t0


def annotation(args) -> dict:
    from sklearn.metrics import accuracy_score, f1_score
    from sklearn.model_selection import train_test_split

    from scmamba2_scvi import SCMamba2
    from scmamba2_scvi.baselines import lr_pca_baseline

    adata = hvg(load("pbmc3k_10x_labeled.h5ad"))
    key = "cell_type"
    train_idx, test_idx = train_test_split(
        np.arange(adata.n_obs), test_size=0.2, stratify=adata.obs[key], random_state=0
    )
    train, test = adata[np.sort(train_idx)].copy(), adata[np.sort(test_idx)].copy()
    truth = test.obs[key].astype(str).to_numpy()

    def score(pred, seconds):
        return {
            "accuracy": accuracy_score(truth, pred),
            "macro_f1": f1_score(truth, pred, average="macro"),
            "train_s": round(seconds, 1),
        }

    out = {}
    SCMamba2.setup_anndata(train, labels_key=key)
    model, secs = train_scmamba2(train, args.epochs)
    out["SCMamba2"] = score(model.predict(test), secs)

    import scvi

    both = adata.copy()
    both.obs["label"] = both.obs[key].astype(str)
    both.obs.iloc[np.sort(test_idx), both.obs.columns.get_loc("label")] = "Unknown"
    vae, secs = train_scvi(both, args.scvi_epochs)
    scanvi = scvi.model.SCANVI.from_scvi_model(
        vae, unlabeled_category="Unknown", labels_key="label"
    )
    t0 = time.perf_counter()
    scanvi.train(max_epochs=20, accelerator="cpu", enable_progress_bar=False)
    pred = scanvi.predict(both)[np.sort(test_idx)]
    out["scANVI"] = score(pred, secs + time.perf_counter() - t0)

    t0 = time.perf_counter()
    out["LogReg on PCA"] = score(lr_pca_baseline(train, test, key), time.perf_counter() - t0)
    return {
        "data": f"pbmc3k, {adata.n_obs} cells x {adata.n_vars} HVG, 80/20 stratified",
        "methods": out,
    }


SCIB_NAMES = {
    "isolated_labels": "isolated_labels",
    "nmi_ari_cluster_labels_kmeans_nmi": "nmi",
    "nmi_ari_cluster_labels_kmeans_ari": "ari",
    "silhouette_label": "silhouette_label",
    "clisi_knn": "clisi",
    "bras": "bras",
    "ilisi_knn": "ilisi",
    "kbet_per_label": "kbet",
    "graph_connectivity": "graph_connectivity",
    "pcr_comparison": "pcr_comparison",
    "Bio conservation": "bio",
    "Batch correction": "batch",
    "Total": "total",
}


def scib_scores(obs, embeddings: dict, *, batch_key: str, label_key: str, unintegrated: str):
    """scib-metrics' Benchmarker on all embeddings at once: {name: {metric: value}}."""
    try:
        from scib_metrics.benchmark import Benchmarker
    except ImportError:
        sys.exit('The integration task needs scib-metrics: pip install ".[benchmark]"')
    names = {f"emb{i}": name for i, name in enumerate(embeddings)}
    a = ad.AnnData(obs=obs[[batch_key, label_key]].copy())
    for key, name in names.items():
        a.obsm[key] = np.asarray(embeddings[name], dtype=np.float32)
    bm = Benchmarker(
        a,
        batch_key=batch_key,
        label_key=label_key,
        embedding_obsm_keys=list(names),
        pre_integrated_embedding_obsm_key=next(k for k, n in names.items() if n == unintegrated),
        progress_bar=False,
    )
    bm.benchmark()
    res = bm.get_results(min_max_scale=False, clean_names=False).drop("Metric Type")
    return {
        names[key]: {SCIB_NAMES[c]: float(row[c]) for c in SCIB_NAMES}
        for key, row in res.iterrows()
    }


def integration(args) -> dict:
    from scmamba2_scvi import SCMamba2

    adata = hvg(load("kang2018_pbmc_scgen_ctrl_stim.h5ad"), batch_key="condition")
    reps = {}
    a = adata.copy()
    SCMamba2.setup_anndata(a, batch_key="condition")
    model, secs = train_scmamba2(
        a, args.epochs, dsbn=True, plan_kwargs={"dar_weight": 1.0, "ecs_weight": 0.0}
    )
    reps["SCMamba2 (DSBN+DAR)"] = (model.get_latent_representation(), secs)
    vae, secs = train_scvi(adata.copy(), args.scvi_epochs, batch_key="condition")
    reps["scVI"] = (vae.get_latent_representation(), secs)
    reps["PCA"] = (pca_embedding(adata), 0.0)
    scores = scib_scores(
        adata.obs,
        {name: rep for name, (rep, _) in reps.items()},
        batch_key="condition",
        label_key="cell_type",
        unintegrated="PCA",
    )
    return {
        "data": f"kang2018, {adata.n_obs} cells x {adata.n_vars} HVG, batch = condition; "
        "scib-metrics, PCR against PCA",
        "methods": {
            name: {**scores[name], "train_s": round(secs, 1)} for name, (_, secs) in reps.items()
        },
    }


STAGE = {"Multipotent progenitors": 0, "GMP": 1}


def trajectory(args) -> dict:
    from scipy.stats import spearmanr

    from scmamba2_scvi import SCMamba2, tl

    adata = hvg(load("paul15_myeloid_tradeseq.h5ad"))
    stage = adata.obs["cell_type2"].astype(str).map(lambda t: STAGE.get(t, 2)).to_numpy()
    root = ("paul15_clusters", "7MEP")
    reps = {}
    a = adata.copy()
    SCMamba2.setup_anndata(a)
    model, secs = train_scmamba2(a, args.epochs)
    reps["SCMamba2"] = (model.get_latent_representation(), secs)
    vae, secs = train_scvi(adata.copy(), args.scvi_epochs)
    reps["scVI"] = (vae.get_latent_representation(), secs)
    reps["PCA"] = (pca_embedding(adata), 0.0)
    out = {}
    for name, (rep, secs) in reps.items():
        b = ad.AnnData(obs=adata.obs[["paul15_clusters"]].copy(), obsm={"X": rep})
        tl.pseudotime(b, use_rep="X", root=root)
        pt = b.obs["scmamba2_pseudotime"].to_numpy()
        ok = np.isfinite(pt)
        out[name] = {
            "spearman_slingshot": float(spearmanr(pt[ok], adata.obs["Pseudotime"][ok])[0]),
            "spearman_stage": float(spearmanr(pt[ok], stage[ok])[0]),
            "train_s": round(secs, 1),
        }
    return {
        "data": f"paul15, {adata.n_obs} cells x {adata.n_vars} HVG, root 7MEP",
        "methods": out,
    }


def reconstruction(args) -> dict:
    from scmamba2_scvi import SCMamba2

    adata = hvg(load("kang2018_pbmc_scgen_ctrl_stim.h5ad"), batch_key="condition")
    X = adata.X.tocsr().copy()
    rng = np.random.default_rng(0)
    hide = rng.random(X.nnz) < 0.10
    rows = np.repeat(np.arange(X.shape[0]), np.diff(X.indptr))[hide]
    cols, true = X.indices[hide], X.data[hide].copy()
    X.data[hide] = 0
    X.eliminate_zeros()
    keep = np.asarray(X.sum(1)).ravel() > 0
    corrupted = ad.AnnData(X, obs=adata.obs.copy(), var=adata.var.copy())
    lib = np.asarray(X.sum(1)).ravel()
    sel = keep[rows]
    rows, cols, true = rows[sel], cols[sel], true[sel]
    truth = np.log1p(true / lib[rows] * 1e4)
    corrupted = corrupted[keep].copy()
    new_row = np.cumsum(keep) - 1
    rows = new_row[rows]
    out = {}
    SCMamba2.setup_anndata(corrupted)
    model, secs = train_scmamba2(corrupted, args.epochs, value_transform="log1p")
    rec = model.get_reconstructed_expression()
    pred = rec.to_numpy()[:, rec.columns.get_indexer(corrupted.var_names)]  # var order
    out["SCMamba2 (GEPC)"] = {
        "pearson": float(np.corrcoef(pred[rows, cols], truth)[0, 1]),
        "train_s": round(secs, 1),
    }
    vae, secs = train_scvi(corrupted.copy(), args.scvi_epochs)
    rate = vae.get_normalized_expression(return_numpy=True, library_size=1e4)
    out["scVI (normalised expression)"] = {
        "pearson": float(np.corrcoef(np.log1p(rate[rows, cols]), truth)[0, 1]),
        "train_s": round(secs, 1),
    }
    return {
        "data": f"kang2018, {corrupted.n_obs} cells x {corrupted.n_vars} HVG, "
        f"{len(rows)} hidden non-zero entries (10%)",
        "methods": out,
    }


TASKS = {
    "annotation": annotation,
    "integration": integration,
    "trajectory": trajectory,
    "reconstruction": reconstruction,
}


def markdown(results: dict) -> str:
    lines = [
        f"# Quality benchmark ({results['machine']['date']}, CPU)",
        "",
        f"Machine: `{json.dumps(results['machine'])}`",
        "",
        f"SCMamba2 preset cpu-small, {results['epochs']} epochs; scVI "
        f"{results['scvi_epochs']} epochs (scANVI +20). Higher is better everywhere.",
        "",
    ]
    for task, res in results["tasks"].items():
        lines += [f"## {task}", "", res["data"], ""]
        metrics = [k for k in next(iter(res["methods"].values())) if k != "train_s"]
        lines.append("| method | " + " | ".join(metrics) + " | train (s) |")
        lines.append("|---" * (len(metrics) + 2) + "|")
        for name, m in res["methods"].items():
            lines.append(
                f"| {name} | "
                + " | ".join(f"{m[k]:.3f}" for k in metrics)
                + f" | {m['train_s']:.0f} |"
            )
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--epochs", type=int, default=12, help="SCMamba2 epochs per task")
    parser.add_argument("--scvi-epochs", type=int, default=200)
    parser.add_argument("--out", type=Path, default=RESULTS / "quality_cpu.json")
    args = parser.parse_args(argv)
    quiet()
    import scvi

    scvi.settings.seed = 0
    results = {
        "benchmark": "quality",
        "epochs": args.epochs,
        "scvi_epochs": args.scvi_epochs,
        "machine": {
            "device": "cpu",
            "cpu_cores": os.cpu_count(),
            "torch": torch.__version__,
            "scvi-tools": scvi.__version__,
            "platform": platform.platform(),
            "date": dt.date.today().isoformat(),
        },
        "tasks": {},
    }
    for task in args.tasks:
        t0 = time.perf_counter()
        print(f"== {task}", flush=True)
        results["tasks"][task] = TASKS[task](args)
        results["tasks"][task]["seconds"] = round(time.perf_counter() - t0, 1)
        print(json.dumps(results["tasks"][task], indent=1), flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))
        args.out.with_suffix(".md").write_text(markdown(results))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
