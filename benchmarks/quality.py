"""Quality of SCMamba2 against the classic baselines on real data from ../shared/data.

Every model is trained from scratch in the same run on this CPU (not run in CI); SCMamba2 uses
the ``cpu-small`` preset and the defaults for its task, ``train()``'s epochs included (no
``max_epochs``, no ``plan_kwargs``; ``--epochs`` overrides them). Tasks:

- annotation, pbmc3k (stratified 80/20): accuracy and macro-F1 of SCMamba2, scANVI (test cells
  unlabelled) and logistic regression on PCA;
- integration, kang2018 control vs IFN-beta (batch = condition): scib-metrics' ``Benchmarker``
  on SCMamba2, scVI and PCA (also the unintegrated embedding of PCR comparison): bio (isolated
  labels, k-means NMI/ARI, label silhouette, cLISI), batch (BRAS, iLISI, kBET per label, graph
  connectivity, PCR comparison), their means and ``total = 0.6 bio + 0.4 batch``;
- trajectory, paul15: DPT from each embedding, rooted in the 7MEP cluster; Spearman with the
  given slingshot ``Pseudotime`` and with the differentiation stage (multipotent progenitors 0,
  GMP 1, mature types 2); SCMamba2 vs scVI vs PCA;
- reconstruction, kang2018: 10% of the non-zero entries and 10% of the zero entries are hidden
  (the non-zero ones set to zero) before training; Pearson (and Spearman) of predicted vs true
  log1p-normalised values at all hidden entries (``*_all``, zeros included) and at the hidden
  non-zeros (``*_nonzero``); SCMamba2's ``get_reconstructed_expression`` vs scVI's normalised
  expression and PCA's rebuilt values (50 components).

Depth check (trajectory, reconstruction: models without labels): ``pcr_counts`` and
``pcr_genes``, the share of each embedding's variance explained by log total counts and log genes
per cell (:func:`scmamba2_scvi.metrics.pcr`; lower is better, PCA is the reference).

``--ablations`` adds SCMamba2 rows with one task recipe turned off, or ``depth_weight`` on (a row
notes when this version has no such option; ``--ablations dar_weight,dsbn``: only those rows);
``--transfer`` adds SCMamba2 pretrained (``scmamba2_scvi.model.pretrain``) on the other datasets
of ../shared/data plus scanpy's pbmc68k_reduced, never the evaluated one, then fine-tuned with
the same epochs as the from-scratch row (pretrained models are cached in ``benchmarks/.cache``).
The Markdown starts with SCMamba2 against the best baseline of the same run (target met when at
or above it), beside the previous results file (``--before``).

Writes ``OUT/quality_cpu.json`` and ``.md`` (``quality_cpu_quick.*`` with ``--quick``,
``quality_cpu_dev.*`` with ``--dev``: annotation scored on a quarter of its training cells, to
choose recipes without the test cells) after each task. A run can be split by tasks:
``--merge`` keeps the other tasks of OUT's file and its "before". Usage (times on 2 cores)::

    python benchmarks/quality.py                       # 4 tasks, ~55 min
    python benchmarks/quality.py --ablations --transfer  # + 22 ablated models, 4 pretrainings
                                                       # and 4 fine-tunings: ~5 h in all
    python benchmarks/quality.py --tasks integration --ablations --transfer --merge  # one part
    python benchmarks/quality.py --tasks integration --ablations dar_weight,dsbn --merge
    python benchmarks/quality.py --tasks annotation,trajectory --epochs trajectory=6
    python benchmarks/quality.py --tasks annotation --ablations --dev --seed 1  # recipes
    python benchmarks/quality.py --quick --out /tmp/q  # smoke test, ~5 min
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import hashlib
import inspect
import json
import logging
import os
import platform
import subprocess
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path

import anndata as ad
import numpy as np
import scanpy as sc
import scipy.sparse as sp
import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "benchmarks" / "results"
CACHE = ROOT / "benchmarks" / ".cache"
FILES = {
    "pbmc3k": "pbmc3k_10x_labeled.h5ad",
    "kang2018": "kang2018_pbmc_scgen_ctrl_stim.h5ad",
    "paul15": "paul15_myeloid_tradeseq.h5ad",
    "cellbench": "cellbench_5cellline_celseq2_3plates.h5ad",
    "goolam2016": "goolam2016_mouse_embryo_smartseq2.h5ad",
}


@dataclasses.dataclass
class Config:
    """What a run trains: epochs per task, data sizes, which extra rows."""

    epochs: dict[str, int | None]  # None: train()'s default
    scvi_epochs: int = 200
    scanvi_epochs: int = 20
    max_len: int = 1024
    n_hvg: int = 2000
    n_cells: int | None = None  # subsample every dataset (smoke runs)
    pretrain_steps: int = 200
    ablations: tuple[str, ...] = ()  # option names whose rows run; ("all",): every row
    transfer: bool = False
    quick: bool = False
    dev: bool = False  # annotation on a development split of the training cells
    seed: int = 0  # of the SCMamba2 models (the baselines keep 0)


# None: train()'s default epochs, what a user gets (on these 1,975 to 2,660 cells 7 to 10 epochs,
# and 50 for the integration recipe, near 17 minutes on 2 cores).
FULL_EPOCHS = {"annotation": None, "integration": None, "trajectory": None, "reconstruction": None}
# Reconstruction is scored on log1p values per 10,000: the model predicts in that space.
TASK_MODEL = {"reconstruction": {"value_transform": "log1p"}}
QUICK = {"scvi_epochs": 2, "scanvi_epochs": 1, "max_len": 64, "n_hvg": 300, "n_cells": 200}
QUICK_PRETRAIN_STEPS = 3


def quiet() -> None:
    import scvi

    warnings.filterwarnings("ignore")
    scvi.settings.verbosity = logging.ERROR
    for name in ("lightning", "lightning.pytorch", "pytorch_lightning", "scmamba2_scvi", "jax"):
        logging.getLogger(name).setLevel(logging.ERROR)


def attempt(fn: Callable[[], dict]) -> dict:
    """``fn()``, or a row holding the error as its note, so one failing model spares the rest."""
    try:
        return fn()
    except Exception as err:  # a benchmark row, not a library call: report and go on
        traceback.print_exc()
        return {"note": f"failed: {type(err).__name__}: {err}"[:400]}


# ---------------------------------------------------------------- data


def load(name: str) -> ad.AnnData:
    path = DATA / FILES[name]
    if not path.exists():
        sys.exit(f"{path} is missing: this benchmark needs the team's ../shared/data folder.")
    adata = ad.read_h5ad(path)
    adata.X = sp.csr_matrix(adata.X, dtype=np.float32)
    return adata


def subsample(adata: ad.AnnData, cfg: Config, stratify: str | None = None) -> ad.AnnData:
    """About ``cfg.n_cells`` cells (smoke runs), an equal share per type so every type stays."""
    if cfg.n_cells is None or adata.n_obs <= cfg.n_cells:
        return adata
    rng = np.random.default_rng(0)
    groups = np.zeros(adata.n_obs) if stratify is None else adata.obs[stratify].astype(str)
    names, codes = np.unique(groups, return_inverse=True)
    share = -(-cfg.n_cells // len(names))
    keep = [rng.permutation(np.flatnonzero(codes == c))[:share] for c in range(len(names))]
    return adata[np.sort(np.concatenate(keep))].copy()


def hvg(adata: ad.AnnData, cfg: Config, batch_key: str | None = None) -> ad.AnnData:
    """Top highly variable genes (Seurat v3 on counts), as a copy."""
    sel = sc.pp.highly_variable_genes(
        adata, n_top_genes=cfg.n_hvg, flavor="seurat_v3", batch_key=batch_key, inplace=False
    )
    return adata[:, sel["highly_variable"].to_numpy()].copy()


def lognorm(adata: ad.AnnData) -> ad.AnnData:
    a = adata.copy()
    sc.pp.normalize_total(a, target_sum=1e4)
    sc.pp.log1p(a)
    return a


def pca_embedding(adata: ad.AnnData, n_pcs: int = 50) -> np.ndarray:
    a = lognorm(adata)
    sc.pp.pca(a, n_comps=min(n_pcs, a.n_obs - 1, a.n_vars - 1), random_state=0)
    return a.obsm["X_pca"]


def depth_pcr(embedding: np.ndarray, adata: ad.AnnData) -> dict:
    """Share of the embedding's variance explained by log sequencing depth (lower is better)."""
    from scmamba2_scvi.metrics import pcr

    counts = np.asarray(adata.X.sum(1)).ravel()
    genes = np.asarray((adata.X > 0).sum(1)).ravel()
    return {
        "pcr_counts": pcr(embedding, np.log1p(counts)),
        "pcr_genes": pcr(embedding, np.log1p(genes)),
    }


# ---------------------------------------------------------------- models


def has_option(kind: str, name: str) -> bool:
    """Whether this version's SCMamba2 takes ``name`` (``"model"``: constructor, ``"plan"``)."""
    from scmamba2_scvi import SCMamba2
    from scmamba2_scvi.model import SCMamba2TrainingPlan
    from scmamba2_scvi.module import SCMamba2Module

    if kind == "model":
        owners = [SCMamba2.__init__]
    else:  # the plan passes unknown keywords on to the module's loss
        owners = [SCMamba2TrainingPlan.__init__, SCMamba2Module.loss]
    return any(name in inspect.signature(f).parameters for f in owners)


def trainer_kwargs() -> dict:
    return {"accelerator": "cpu", "enable_progress_bar": False}


def fit_scmamba2(adata, keys: dict, epochs: int | None, cfg: Config, model: dict, plan: dict):
    """SCMamba2 from scratch with this task's defaults (or one option changed); (model, s)."""
    import scvi

    from scmamba2_scvi import SCMamba2

    scvi.settings.seed = cfg.seed
    SCMamba2.setup_anndata(adata, **keys)
    net = SCMamba2(adata, preset="cpu-small", max_len=cfg.max_len, **model)
    t0 = time.perf_counter()
    net.train(max_epochs=epochs, plan_kwargs=plan or None, **trainer_kwargs())
    return net, time.perf_counter() - t0


def finetune_scmamba2(adata, keys: dict, epochs: int | None, cfg: Config, pretrained: Path):
    """The pretrained backbone put on ``adata`` and trained as :func:`fit_scmamba2`; (model, s)."""
    import scvi

    from scmamba2_scvi import SCMamba2

    scvi.settings.seed = cfg.seed
    net = SCMamba2.from_pretrained(
        pretrained, adata, **keys, min_gene_fraction=0.0, accelerator="cpu"
    )
    t0 = time.perf_counter()
    net.train(max_epochs=epochs, **trainer_kwargs())
    return net, time.perf_counter() - t0


def train_scvi(adata, epochs: int, batch_key: str | None = None):
    import scvi

    scvi.settings.seed = 0
    scvi.model.SCVI.setup_anndata(adata, batch_key=batch_key)
    model = scvi.model.SCVI(adata, n_latent=10)
    t0 = time.perf_counter()
    model.train(max_epochs=epochs, **trainer_kwargs())
    return model, time.perf_counter() - t0


# One recipe changed per row: (options of the constructor, options of the training plan).
RANDOM_GENES = ({"gene_init": "random"}, {})  # gene embeddings not started from PCA
MEAN_POOL = ({"cell_embedding": "mean"}, {})  # outputs averaged without the values' weights
ABLATIONS = {
    "annotation": [
        MEAN_POOL,
        ({}, {"class_balance": False}),
        ({}, {"keep_best": False}),
        ({"mask_ratio": 0.0}, {}),  # unmasked, as scGPT fine-tunes (quality_cpu_dev_mask_ratio)
        RANDOM_GENES,
    ],
    "integration": [
        MEAN_POOL,
        RANDOM_GENES,
        ({}, {"dar_weight": 0.0}),
        ({"batch_decoder": False}, {}),
        ({"dsbn": False}, {}),
        ({}, {"ecs_weight": 0.0}),
        ({}, {"depth_weight": 1.0}),
    ],
    # depth_weight is off by default; these rows turn it on (depth out of the embedding)
    "trajectory": [
        MEAN_POOL,
        RANDOM_GENES,
        ({"library_decoder": False}, {}),
        ({}, {"depth_weight": 1.0}),
    ],
    "reconstruction": [
        MEAN_POOL,
        RANDOM_GENES,
        ({}, {"zero_weight": 0.0}),
        ({"zero_genes": 0}, {}),
        ({"library_decoder": False}, {}),
        ({"value_transform": "bin"}, {}),  # the default value space, for Spearman
    ],
}


def variants(task: str, cfg: Config) -> list[tuple[str, dict, dict]]:
    """SCMamba2 rows of a task: the default, then its ablations when asked."""
    rows = [("SCMamba2", {}, {})]
    for model, plan in ABLATIONS[task]:
        if "all" not in cfg.ablations and not set(cfg.ablations) & {*model, *plan}:
            continue
        name = "SCMamba2, " + ", ".join(f"{k}={v}" for k, v in {**model, **plan}.items())
        rows.append((name, model, plan))
    return rows


def scmamba2_rows(task: str, cfg: Config, data: Callable, keys: dict, evaluate: Callable) -> dict:
    """Every SCMamba2 row of a task: ``evaluate(model)`` scores a model trained on ``data()``."""
    rows = {}
    for name, model, plan in variants(task, cfg):
        missing = [k for k in model if not has_option("model", k)]
        missing += [k for k in plan if not has_option("plan", k)]
        if missing:
            rows[name] = {"note": f"skipped: this version has no option {', '.join(missing)}"}
        else:
            rows[name] = attempt(
                lambda m=model, p=plan: scratch_row(task, cfg, data, keys, evaluate, m, p)
            )
    if cfg.transfer:
        rows["SCMamba2, pretrained"] = attempt(
            lambda: transfer_row(task, cfg, data, keys, evaluate)
        )
    return rows


def scratch_row(task, cfg: Config, data, keys: dict, evaluate, model: dict, plan: dict) -> dict:
    model = {**TASK_MODEL.get(task, {}), **model}
    return scored(evaluate, *fit_scmamba2(data(), keys, cfg.epochs[task], cfg, model, plan))


def scored(evaluate: Callable, model, seconds: float) -> dict:
    return {**evaluate(model), "train_s": round(seconds, 1), "epochs": model.trainer.max_epochs}


# ---------------------------------------------------------------- transfer


def code_hash() -> str:
    """Hash of the installed package's source: a cached backbone is reused only by its code."""
    import scmamba2_scvi

    digest = hashlib.sha256()
    for path in sorted(Path(scmamba2_scvi.__file__).parent.rglob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:10]


def pbmc68k_counts() -> ad.AnnData:
    """scanpy's pbmc68k_reduced with its counts recovered from ``raw`` (see the data README)."""
    small = sc.datasets.pbmc68k_reduced()
    lognormed = small.raw.X.toarray() if sp.issparse(small.raw.X) else small.raw.X
    counts = np.round(np.expm1(lognormed) * small.obs["n_counts"].to_numpy()[:, None] / 1e4)
    return ad.AnnData(sp.csr_matrix(counts, dtype=np.float32), var=small.raw.var.copy())


def corpus_shard(name: str, cfg: Config) -> Path:
    """One pretraining shard (all genes, counts) in the cache, written once."""
    path = CACHE / ("corpus_quick" if cfg.quick else "corpus") / f"{name}.h5ad"
    if path.exists():
        return path
    adata = pbmc68k_counts() if name == "pbmc68k_reduced" else subsample(load(name), cfg)
    if name == "cellbench":  # doublets out, as the data README says
        adata = adata[adata.obs["demuxlet_cls"] == "SNG"].copy()
    shard = ad.AnnData(adata.X, var=adata.var.copy())
    shard.obs_names = [f"{name}-{i}" for i in range(shard.n_obs)]
    path.parent.mkdir(parents=True, exist_ok=True)
    shard.write_h5ad(path)
    return path


def pretrained_backbone(evaluated: str, cfg: Config, model: dict) -> tuple[Path, dict]:
    """Backbone pretrained on every corpus dataset but ``evaluated`` (cached); folder, facts."""
    from scmamba2_scvi.model import pretrain

    sources = [n for n in [*FILES, "pbmc68k_reduced"] if n != evaluated]
    model = {"max_len": cfg.max_len, **model}
    options = "_".join(f"{k}-{v}" for k, v in sorted(model.items()))
    out = CACHE / f"pretrain_no-{evaluated}_{cfg.pretrain_steps}steps_{options}_{code_hash()}"
    facts_path = out / "benchmark.json"
    if not facts_path.exists():
        shards = [corpus_shard(n, cfg) for n in sources]
        t0 = time.perf_counter()
        pretrain(
            shards,
            out,
            preset="cpu-small",
            model_kwargs=model,
            max_steps=cfg.pretrain_steps,
            accelerator="cpu",
            progress_bar=False,
        )
        facts = {"sources": sources, "steps": cfg.pretrain_steps}
        facts["pretrain_s"] = round(time.perf_counter() - t0, 1)
        facts_path.write_text(json.dumps(facts))
    return out / "model", json.loads(facts_path.read_text())


TASK_DATA = {"annotation": "pbmc3k", "integration": "kang2018", "trajectory": "paul15"}
TASK_DATA["reconstruction"] = "kang2018"


def transfer_row(task: str, cfg: Config, data: Callable, keys: dict, evaluate: Callable) -> dict:
    backbone, facts = pretrained_backbone(TASK_DATA[task], cfg, TASK_MODEL.get(task, {}))
    model, seconds = finetune_scmamba2(data(), keys, cfg.epochs[task], cfg, backbone)
    rep = model.gene_report_
    note = (
        f"pretrained {facts['steps']} steps ({facts['pretrain_s']:.0f} s) on "
        f"{', '.join(facts['sources'])}; {rep.n_matched}/{rep.n_genes} genes in its vocabulary"
    )
    return {**scored(evaluate, model, seconds), "note": note}


# ---------------------------------------------------------------- tasks


def annotation(cfg: Config) -> dict:
    from sklearn.model_selection import train_test_split

    from scmamba2_scvi.baselines import lr_pca_baseline

    key = "cell_type"
    adata = subsample(hvg(load("pbmc3k"), cfg), cfg, key)
    train_idx, test_idx = train_test_split(
        np.arange(adata.n_obs), test_size=0.2, stratify=adata.obs[key], random_state=0
    )
    train_idx, test_idx = np.sort(train_idx), np.sort(test_idx)
    split = "80/20 stratified"
    if cfg.dev:  # the test cells dropped; a quarter of the training cells scored instead
        adata = adata[train_idx].copy()
        train_idx, test_idx = train_test_split(
            np.arange(adata.n_obs), test_size=0.25, stratify=adata.obs[key], random_state=1
        )
        train_idx, test_idx = np.sort(train_idx), np.sort(test_idx)
        split = "development split: 75/25 of the 80% training cells, test cells unused"
    test = adata[test_idx].copy()
    truth = test.obs[key].astype(str).to_numpy()

    def score(pred) -> dict:
        from sklearn.metrics import accuracy_score, f1_score

        return {
            "accuracy": accuracy_score(truth, pred),
            "macro_f1": f1_score(truth, pred, average="macro"),
        }

    methods = scmamba2_rows(
        "annotation",
        cfg,
        lambda: adata[train_idx].copy(),
        {"labels_key": key},
        lambda model: score(model.predict(test)),
    )
    methods["scANVI"] = attempt(lambda: scanvi_row(adata, key, test_idx, cfg, score))
    t0 = time.perf_counter()
    pred = lr_pca_baseline(adata[train_idx].copy(), test, key)
    methods["LogReg on PCA"] = {**score(pred), "train_s": round(time.perf_counter() - t0, 1)}
    return {
        "data": f"pbmc3k, {adata.n_obs} cells x {adata.n_vars} HVG, {split}",
        "methods": methods,
    }


def scanvi_row(adata, key: str, test_idx, cfg: Config, score: Callable) -> dict:
    """scANVI from scVI with the test cells unlabelled (semi-supervised, as its tutorials)."""
    import scvi

    both = adata.copy()
    both.obs["label"] = both.obs[key].astype(str)
    both.obs.iloc[test_idx, both.obs.columns.get_loc("label")] = "Unknown"
    vae, seconds = train_scvi(both, cfg.scvi_epochs)
    scanvi = scvi.model.SCANVI.from_scvi_model(
        vae, unlabeled_category="Unknown", labels_key="label"
    )
    t0 = time.perf_counter()
    scanvi.train(max_epochs=cfg.scanvi_epochs, **trainer_kwargs())
    seconds += time.perf_counter() - t0
    return {**score(scanvi.predict(both)[test_idx]), "train_s": round(seconds, 1)}


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


def integration(cfg: Config) -> dict:
    batch, label = "condition", "cell_type"
    adata = subsample(hvg(load("kang2018"), cfg, batch_key=batch), cfg)
    methods = scmamba2_rows(
        "integration",
        cfg,
        adata.copy,
        {"batch_key": batch},
        lambda model: {"embedding": model.get_latent_representation()},
    )
    methods["scVI"] = attempt(
        lambda: scored(
            lambda m: {"embedding": m.get_latent_representation()},
            *train_scvi(adata.copy(), cfg.scvi_epochs, batch_key=batch),
        )
    )
    methods["PCA"] = {"embedding": pca_embedding(adata), "train_s": 0.0}
    done = {name: row.pop("embedding") for name, row in methods.items() if "embedding" in row}
    scores = scib_scores(adata.obs, done, batch_key=batch, label_key=label, unintegrated="PCA")
    for name, row in methods.items():
        row.update(scores.get(name, {}))
    return {
        "data": f"kang2018, {adata.n_obs} cells x {adata.n_vars} HVG, batch = condition; "
        "scib-metrics Benchmarker, PCR comparison against PCA",
        "methods": methods,
    }


STAGE = {"Multipotent progenitors": 0, "GMP": 1}


def trajectory(cfg: Config) -> dict:
    adata = subsample(hvg(load("paul15"), cfg), cfg, "paul15_clusters")

    def evaluate(embedding: np.ndarray) -> dict:
        return {**pseudotime_scores(adata, embedding), **depth_pcr(embedding, adata)}

    methods = scmamba2_rows(
        "trajectory", cfg, adata.copy, {}, lambda model: evaluate(model.get_latent_representation())
    )
    methods["scVI"] = attempt(
        lambda: scored(
            lambda m: evaluate(m.get_latent_representation()),
            *train_scvi(adata.copy(), cfg.scvi_epochs),
        )
    )
    methods["PCA"] = {**evaluate(pca_embedding(adata)), "train_s": 0.0}
    return {
        "data": f"paul15, {adata.n_obs} cells x {adata.n_vars} HVG, root 7MEP; "
        "pcr_*: variance explained by log depth, lower is better",
        "methods": methods,
    }


def pseudotime_scores(adata: ad.AnnData, embedding: np.ndarray) -> dict:
    from scipy.stats import spearmanr

    from scmamba2_scvi import tl

    stage = adata.obs["cell_type2"].astype(str).map(lambda t: STAGE.get(t, 2)).to_numpy()
    b = ad.AnnData(obs=adata.obs[["paul15_clusters"]].copy(), obsm={"X": embedding})
    tl.pseudotime(b, use_rep="X", root=("paul15_clusters", "7MEP"))
    pt = b.obs["scmamba2_pseudotime"].to_numpy()
    ok = np.isfinite(pt)
    return {
        "spearman_slingshot": float(spearmanr(pt[ok], adata.obs["Pseudotime"][ok])[0]),
        "spearman_stage": float(spearmanr(pt[ok], stage[ok])[0]),
    }


def hide_entries(X: sp.csr_matrix, fraction: float = 0.1, seed: int = 0):
    """Hide ``fraction`` of the non-zero and of the zero entries; (corrupted X, rows, cols, true).

    The non-zeros are drawn first, with the draw of earlier versions of this benchmark, so the
    hidden non-zeros stay the same entries.
    """
    X = X.tocsr().copy()
    rng = np.random.default_rng(seed)
    hide = rng.random(X.nnz) < fraction
    rows = np.repeat(np.arange(X.shape[0]), np.diff(X.indptr))[hide]
    cols, true = X.indices[hide], X.data[hide].copy()
    zero_rows, zero_cols = np.nonzero(X.toarray() == 0)
    pick = rng.random(len(zero_rows)) < fraction
    X.data[hide] = 0
    X.eliminate_zeros()
    rows = np.concatenate([rows, zero_rows[pick]])
    cols = np.concatenate([cols, zero_cols[pick]])
    return X, rows, cols, np.concatenate([true, np.zeros(pick.sum(), np.float32)])


def hidden_scores(pred: np.ndarray, rows, cols, truth: np.ndarray) -> dict:
    """Agreement at the hidden entries, all of them and the non-zero ones."""
    from scipy.stats import pearsonr, spearmanr

    p, nz = pred[rows, cols], truth > 0
    return {
        "pearson_all": float(pearsonr(p, truth)[0]),
        "pearson_nonzero": float(pearsonr(p[nz], truth[nz])[0]),
        "spearman_all": float(spearmanr(p, truth)[0]),
        "spearman_nonzero": float(spearmanr(p[nz], truth[nz])[0]),
    }


def scmamba2_expression(model, adata: ad.AnnData) -> np.ndarray:
    """SCMamba2's reconstruction of every entry of ``adata``, in its genes' order."""
    rec = model.get_reconstructed_expression()
    return rec.to_numpy()[:, rec.columns.get_indexer(adata.var_names)]


def pca_reconstruction(adata: ad.AnnData, n_pcs: int = 50) -> tuple[np.ndarray, np.ndarray]:
    """Log-normalised values rebuilt from their top principal components; (values, embedding)."""
    from sklearn.decomposition import PCA

    X = lognorm(adata).X.toarray()
    pca = PCA(n_components=min(n_pcs, X.shape[0] - 1, X.shape[1] - 1), random_state=0)
    z = pca.fit_transform(X)
    return pca.inverse_transform(z), z


def reconstruction(cfg: Config) -> dict:
    adata = subsample(hvg(load("kang2018"), cfg, batch_key="condition"), cfg)
    X, rows, cols, true = hide_entries(adata.X)
    lib = np.asarray(X.sum(1)).ravel()
    keep = lib > 0  # cells left without counts cannot be normalised
    sel = keep[rows]
    truth = np.log1p(true[sel] / lib[rows[sel]] * 1e4)
    rows, cols = (np.cumsum(keep) - 1)[rows[sel]], cols[sel]
    corrupted = ad.AnnData(X, obs=adata.obs.copy(), var=adata.var.copy())[keep].copy()

    def evaluate(pred: np.ndarray, embedding: np.ndarray) -> dict:
        return {**hidden_scores(pred, rows, cols, truth), **depth_pcr(embedding, corrupted)}

    def scmamba2(model) -> dict:
        return evaluate(scmamba2_expression(model, corrupted), model.get_latent_representation())

    def scvi_eval(model) -> dict:
        rate = model.get_normalized_expression(return_numpy=True, library_size=1e4)
        return evaluate(np.log1p(rate), model.get_latent_representation())

    methods = scmamba2_rows("reconstruction", cfg, corrupted.copy, {}, scmamba2)
    methods["scVI"] = attempt(
        lambda: scored(scvi_eval, *train_scvi(corrupted.copy(), cfg.scvi_epochs))
    )
    methods["PCA (50 PCs)"] = {**evaluate(*pca_reconstruction(corrupted)), "train_s": 0.0}
    n_nonzero = int((truth > 0).sum())
    return {
        "data": f"kang2018, {corrupted.n_obs} cells x {corrupted.n_vars} HVG; hidden: "
        f"{n_nonzero} non-zero and {len(truth) - n_nonzero} zero entries (10% of each); "
        "log1p values per 10,000 (SCMamba2 with value_transform='log1p'; its default, "
        "value_transform=bin, compares by Spearman only); pcr_*: variance explained by log "
        "depth, lower is better",
        "methods": methods,
    }


TASKS = {
    "annotation": annotation,
    "integration": integration,
    "trajectory": trajectory,
    "reconstruction": reconstruction,
}


# ---------------------------------------------------------------- report

# The target of each task (SCMamba2 at or above the best baseline), then figures shown beside it.
PRIMARY = {
    "annotation": "macro_f1",
    "integration": "total",
    "trajectory": "spearman_slingshot",
    "reconstruction": "pearson_all",
}
SECONDARY = {
    "annotation": ["accuracy"],
    "integration": ["bio", "batch", "ilisi"],
    "trajectory": ["spearman_stage", "pcr_counts"],
    "reconstruction": ["pearson_nonzero", "pcr_counts"],
}
OLD_NAMES = {"pearson_nonzero": "pearson"}  # before the zeros were hidden too
LOWER_IS_BETTER = ("pcr_counts", "pcr_genes")


def value(row: dict, metric: str) -> float | None:
    v = row.get(metric, row.get(OLD_NAMES.get(metric, "")))
    return None if v is None or not np.isfinite(v) else float(v)


def standing(methods: dict, metric: str) -> tuple[float | None, float | None, str]:
    """SCMamba2's value (the default row), the best baseline's, and that baseline's name."""
    ours = methods.get("SCMamba2") or next(
        (m for n, m in methods.items() if n.startswith("SCMamba2")), {}
    )
    pick = min if metric in LOWER_IS_BETTER else max
    baselines = {n: value(m, metric) for n, m in methods.items() if not n.startswith("SCMamba2")}
    baselines = {n: v for n, v in baselines.items() if v is not None}
    best = pick(baselines, key=baselines.get) if baselines else ""
    return value(ours, metric), baselines.get(best), best


def summary(results: dict, before: dict) -> list[dict]:
    rows = []
    for task, res in results["tasks"].items():
        old = before.get("tasks", {}).get(task, {}).get("methods", {})
        for metric in [PRIMARY[task], *SECONDARY[task]]:
            ours, best, name = standing(res["methods"], metric)
            old_ours, old_best, old_name = standing(old, metric)
            row = {"task": task, "metric": metric, "before": old_ours, "before_best": old_best}
            row.update({"before_best_name": old_name, "now": ours, "best": best, "best_name": name})
            if metric == PRIMARY[task] and ours is not None and best is not None:
                row["met"] = bool(ours >= best)
                row["gap"] = ours - best
            rows.append(row)
    return rows


def fmt(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def summary_table(rows: list[dict]) -> list[str]:
    lines = [
        "| task | metric | SCMamba2 before | best baseline before | SCMamba2 | best baseline | "
        "target met |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        met = "" if "met" not in r else "yes" if r["met"] else f"no ({r['gap']:+.3f})"
        old_best = fmt(r["before_best"]) + (
            f" {r['before_best_name']}" if r["before_best_name"] else ""
        )
        best = fmt(r["best"]) + (f" {r['best_name']}" if r["best_name"] else "")
        lines.append(
            f"| {r['task']} | {r['metric']} | {fmt(r['before'])} | {old_best} | "
            f"{fmt(r['now'])} | {best} | {met} |"
        )
    return lines


def variant_table(results: dict) -> list[str]:
    """Ablation and transfer rows against the default SCMamba2 row, on each task's target."""
    lines = []
    for task, res in results["tasks"].items():
        base = value(res["methods"].get("SCMamba2", {}), PRIMARY[task])
        for name, m in res["methods"].items():
            if name.startswith("SCMamba2,"):
                v = value(m, PRIMARY[task])
                diff = "-" if v is None or base is None else f"{v - base:+.3f}"
                change = name.removeprefix("SCMamba2, ")
                lines.append(f"| {task} | {change} | {PRIMARY[task]} | {fmt(v)} | {diff} |")
    if not lines:
        return []
    head = ["| task | change | metric | value | vs SCMamba2 |", "|---|---|---|---|---|"]
    return ["## Ablations and transfer", "", *head, *lines, ""]


def task_table(task: str, res: dict) -> list[str]:
    rows = res["methods"]
    metrics = list(
        dict.fromkeys(k for m in rows.values() for k in m if k not in ("train_s", "note", "epochs"))
    )
    notes = any("note" in m for m in rows.values())
    head = ["method", *metrics, "train (s)", *(["note"] if notes else [])]
    lines = [
        f"## {task}",
        "",
        res["data"],
        "",
        "| " + " | ".join(head) + " |",
        "|---" * len(head) + "|",
    ]
    for name, m in rows.items():
        seconds = f"{m['train_s']:.0f}" if "train_s" in m else "-"
        cells = [name, *(fmt(value(m, k)) for k in metrics), seconds]
        lines.append("| " + " | ".join([*cells, *([m.get("note", "")] if notes else [])]) + " |")
    return [*lines, ""]


def markdown(results: dict) -> str:
    cfg = results["config"]
    epochs = ", ".join(
        f"{t} {r.get('epochs')} ({r.get('date')})" for t, r in results["tasks"].items()
    )
    before = results["before"]
    quick = ", quick smoke run: not results" if cfg["quick"] else ""
    lines = [
        f"# Quality benchmark ({results['machine']['date']}, CPU{quick})",
        "",
        f"Machine: `{json.dumps(results['machine'])}`",
        "",
        f"SCMamba2 preset cpu-small, max_len {cfg['max_len']}, defaults of each task; epochs: "
        f"{epochs}; seed {cfg.get('seed', 0)}; scVI {cfg['scvi_epochs']} epochs (scANVI "
        f"+{cfg['scanvi_epochs']}). "
        "Higher is better except pcr_*.",
        "",
        "## SCMamba2 against the best baseline of the same run",
        "",
        f"Before: `{before['source']}` ({before.get('date', '-')}).",
        "",
        *summary_table(results["summary"]),
        "",
        *variant_table(results),
    ]
    for task, res in results["tasks"].items():
        lines += task_table(task, res)
    return "\n".join(lines)


# ---------------------------------------------------------------- run


def version(module: str) -> str:
    try:
        return __import__(module).__version__
    except ImportError:
        return "not installed"


def git_commit() -> str:
    def git(*cmd):
        return subprocess.run(["git", "-C", str(ROOT), *cmd], capture_output=True, text=True).stdout

    dirty = " + uncommitted changes" if git("status", "--porcelain", "--", "src").strip() else ""
    return git("rev-parse", "--short", "HEAD").strip() + dirty


def machine() -> dict:
    cpu = platform.processor()
    if Path("/proc/cpuinfo").exists():
        models = [
            line for line in Path("/proc/cpuinfo").read_text().splitlines() if "model name" in line
        ]
        cpu = models[0].split(":", 1)[1].strip() if models else cpu
    return {
        "device": "cpu",
        "cpu": cpu,
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "scvi-tools": version("scvi"),
        "scib-metrics": version("scib_metrics"),
        "jax": version("jax"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "commit": git_commit(),
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "load_average_at_start": [round(x, 1) for x in os.getloadavg()],
    }


def read_before(path: Path) -> dict:
    """The previous results file, read before this run overwrites it."""
    if not path.exists():
        return {"source": str(path) + " (missing)", "tasks": {}}
    old = json.loads(path.read_text())
    source = path.resolve()
    source = source.relative_to(ROOT) if source.is_relative_to(ROOT) else source
    return {
        "source": str(source),
        "date": old.get("machine", {}).get("date"),
        "tasks": old["tasks"],
    }


def epochs_arg(text: str) -> dict:
    """``N`` (every task) or ``task=N,task=N``."""
    if text.isdigit():
        return dict.fromkeys(TASKS, int(text))
    pairs = dict(item.split("=", 1) for item in text.split(","))
    unknown = set(pairs) - set(TASKS)
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown task(s) {sorted(unknown)}; tasks: {list(TASKS)}")
    return {task: int(n) for task, n in pairs.items()}


def ablations_arg(text: str) -> tuple[str, ...]:
    names = tuple(n for n in text.split(",") if n)
    options = {k for rows in ABLATIONS.values() for model, plan in rows for k in {*model, *plan}}
    unknown = [n for n in names if n not in options | {"all"}]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"no ablation of option(s) {unknown}; options: {','.join(sorted(options))}"
        )
    return names


def tasks_arg(text: str) -> list[str]:
    tasks = [t for t in text.split(",") if t]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown task(s) {unknown}; tasks: {','.join(TASKS)}")
    return tasks


def parse(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add(
        "--tasks",
        type=tasks_arg,
        default=list(TASKS),
        help=f"comma-separated, of {','.join(TASKS)}",
    )
    add("--epochs", type=epochs_arg, default={}, help=f"N or task=N,...; default {FULL_EPOCHS}")
    add("--scvi-epochs", type=int, default=None, help=f"scVI epochs (default {Config.scvi_epochs})")
    add(
        "--ablations",
        nargs="?",
        const="all",
        default="",
        type=ablations_arg,
        help="rows with one task recipe changed (~10 min each): all of them, or those of the "
        "options named (comma-separated, e.g. dar_weight,dsbn)",
    )
    add("--transfer", action="store_true", help="pretrained + fine-tuned rows")
    add(
        "--pretrain-steps",
        type=int,
        default=None,
        help=f"pretraining steps per corpus (default {Config.pretrain_steps})",
    )
    add("--quick", action="store_true", help="tiny subsets and epochs: a smoke test")
    add("--seed", type=int, default=0, help="seed of the SCMamba2 models (baselines: 0)")
    add(
        "--dev",
        action="store_true",
        help="annotation scored on a quarter of its training cells, never the test cells "
        "(for choosing recipes); writes quality_cpu_dev.*",
    )
    add("--out", type=Path, default=RESULTS, help="results folder (default benchmarks/results)")
    add("--before", type=Path, default=RESULTS / "quality_cpu.json", help="previous results JSON")
    add("--merge", action="store_true", help="keep the other tasks (and the before) of OUT's file")
    return parser.parse_args(argv)


def config(args: argparse.Namespace) -> Config:
    cfg = Config(
        epochs={**FULL_EPOCHS},
        ablations=args.ablations,
        transfer=args.transfer,
        dev=args.dev,
        seed=args.seed,
    )
    if args.dev and set(args.tasks) != {"annotation"}:
        sys.exit("--dev scores the annotation task only: add --tasks annotation.")
    if args.quick:
        cfg = dataclasses.replace(cfg, epochs=dict.fromkeys(TASKS, 1), quick=True, **QUICK)
        cfg.pretrain_steps = QUICK_PRETRAIN_STEPS
    cfg.epochs.update(args.epochs)
    if args.scvi_epochs is not None:
        cfg.scvi_epochs = args.scvi_epochs
    if args.pretrain_steps is not None:
        cfg.pretrain_steps = args.pretrain_steps
    return cfg


def output(out: Path, cfg: Config) -> Path:
    suffix = "_quick" if cfg.quick else "_dev" if cfg.dev else ""
    return out / f"quality_cpu{suffix}.json"


def write(results: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2))
    path.with_suffix(".md").write_text(markdown(results) + "\n")


def start(args: argparse.Namespace, cfg: Config) -> dict:
    """The results record; with ``--merge``, holding the earlier tasks of a run split in parts."""
    results = {"benchmark": "quality", "config": dataclasses.asdict(cfg), "machine": machine()}
    path = output(args.out, cfg)
    earlier = json.loads(path.read_text()) if args.merge and path.exists() else {}
    results["before"] = earlier.get("before") or read_before(args.before)
    kept = {t: r for t, r in earlier.get("tasks", {}).items() if t not in args.tasks}
    results["tasks"] = kept
    return results


def main(argv=None) -> int:
    args = parse(argv)
    cfg = config(args)
    quiet()
    results = start(args, cfg)
    for task in args.tasks:
        t0 = time.perf_counter()
        print(f"== {task}", flush=True)
        res = TASKS[task](cfg)
        trained = res["methods"].get("SCMamba2", {}).get("epochs")
        res.update(epochs=cfg.epochs[task] or f"default ({trained})", date=machine()["date"])
        res["seconds"] = round(time.perf_counter() - t0, 1)
        results["tasks"][task] = res
        results["tasks"] = {t: results["tasks"][t] for t in TASKS if t in results["tasks"]}
        results["summary"] = summary(results, results["before"])
        results["machine"]["load_average_at_end"] = [round(x, 1) for x in os.getloadavg()]
        write(results, output(args.out, cfg))
        print(json.dumps(res, indent=1, default=str), flush=True)
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
