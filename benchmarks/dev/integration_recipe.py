"""Integration recipes on a development dataset (cellbench, 3 plates), never on kang2018.

``python benchmarks/dev/integration_recipe.py NAME EPOCHS [MODEL [PLAN]]`` (MODEL, PLAN: JSON
keyword arguments of the model and of ``plan_kwargs``), with ``SEED`` in the environment.
Cellbench's single cells (``demuxlet_cls == 'SNG'``), 2,000 highly variable genes chosen per
plate, batch = plate, label = cell line; SCMamba2 at ``cpu-small``, ``max_len`` 1024, as the
integration task of ``benchmarks/quality.py`` trains it, scored with the same scib-metrics
``Benchmarker`` beside scVI and PCA. Appends one JSON line per run to
``integration_recipe.jsonl`` in the working directory.
"""

import json
import logging
import os
import sys
from pathlib import Path

import scvi

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import quality as q  # the benchmark's data, baselines and scoring

BATCH, LABEL = "batch", "cell_line"


def data(cfg: "q.Config") -> "q.ad.AnnData":
    """Cellbench's single cells on ``cfg.n_hvg`` per-plate highly variable genes."""
    adata = q.load("cellbench")
    adata = adata[adata.obs["demuxlet_cls"] == "SNG"].copy()
    adata.obs[BATCH] = adata.obs[BATCH].astype(str).astype("category")
    return q.hvg(adata, cfg, batch_key=BATCH)


def main(argv: list[str]) -> dict:
    """Train one recipe and the baselines; score all with scib-metrics."""
    name, epochs = argv[0], int(argv[1])
    model_kw = json.loads(argv[2]) if len(argv) > 2 else {}
    plan_kw = json.loads(argv[3]) if len(argv) > 3 else {}
    seed = int(os.environ.get("SEED", "0"))
    scvi.settings.verbosity = logging.ERROR
    cfg = q.Config(epochs={}, seed=seed)
    adata = data(cfg)
    keys = {"batch_key": BATCH}
    model, seconds = q.fit_scmamba2(adata.copy(), keys, epochs, cfg, model_kw, plan_kw)
    embeddings = {"SCMamba2": model.get_latent_representation(), "PCA": q.pca_embedding(adata)}
    scvi_model, _ = q.train_scvi(adata.copy(), cfg.scvi_epochs, batch_key=BATCH)
    embeddings["scVI"] = scvi_model.get_latent_representation()
    scores = q.scib_scores(
        adata.obs, embeddings, batch_key=BATCH, label_key=LABEL, unintegrated="PCA"
    )
    keep = ("bio", "batch", "total", "ilisi", "graph_connectivity", "kbet")
    out = {
        "name": name,
        "epochs": epochs,
        "model": model_kw,
        "plan": plan_kw,
        "seed": seed,
        "cells": adata.n_obs,
        "train_s": round(seconds, 1),
    }
    for method, row in scores.items():
        out[method] = {k: round(row[k], 4) for k in keep}
    with open("integration_recipe.jsonl", "a") as fh:
        fh.write(json.dumps(out) + "\n")
    return out


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:]), indent=1))
