"""Figures: training history, confusion matrix, UMAP of an embedding."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from anndata import AnnData

if TYPE_CHECKING:
    from scmamba2_scvi.model import SCMamba2


def _finish(fig, save: str | Path | None):
    if save is not None:
        fig.savefig(save, dpi=150, bbox_inches="tight")
    return fig


def history(
    model: SCMamba2,
    keys: Sequence[str] | None = None,
    *,
    save: str | Path | None = None,
):
    """Training curves from ``model.history``: one panel per metric, train and validation.

    Parameters
    ----------
    model
        A trained :class:`~scmamba2_scvi.SCMamba2`.
    keys
        Metric names without the ``_train``/``_validation`` suffix; default: every logged one of
        ``loss``, ``gep``, ``gepc``, ``masked_pearson``, ``cls``, ``accuracy``, ``dar``, ``ecs``.
    save
        Path to save the figure to.

    Returns
    -------
    The :class:`matplotlib.figure.Figure`.
    """
    hist = getattr(model, "history", None)
    if not hist:
        raise ValueError("The model has no training history: train it first.")
    if keys is None:
        keys = [
            k
            for k in ("loss", "gep", "gepc", "masked_pearson", "cls", "accuracy", "dar", "ecs")
            if f"{k}_train" in hist or f"train_{k}" in hist
        ]
    if not keys:
        raise ValueError(f"None of the requested metrics were logged; logged: {list(hist)}.")
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 2.8), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for split, style in (("train", "-"), ("validation", "--")):
            name = f"{split}_{key}" if key == "loss" else f"{key}_{split}"
            if name in hist:
                series = hist[name].dropna()
                ax.plot(series.index, series.iloc[:, 0], style, label=split)
        ax.set_title(key)
        ax.set_xlabel("epoch")
        ax.legend(frameon=False, fontsize=8)
    fig.tight_layout()
    return _finish(fig, save)


def confusion(
    adata: AnnData,
    true_key: str,
    pred_key: str,
    *,
    normalize: bool = True,
    save: str | Path | None = None,
):
    """Confusion matrix of two ``obs`` columns (rows: truth, columns: prediction).

    Parameters
    ----------
    adata
        AnnData with both columns.
    true_key, pred_key
        ``obs`` columns of true and predicted labels.
    normalize
        Show row fractions (recall per true class) instead of counts.
    save
        Path to save the figure to.

    Returns
    -------
    The :class:`matplotlib.figure.Figure`.
    """
    for key in (true_key, pred_key):
        if key not in adata.obs.columns:
            raise KeyError(f"{key!r} is not a column of adata.obs.")
    truth = adata.obs[true_key].astype(str)
    pred = adata.obs[pred_key].astype(str)
    labels = sorted(set(truth) | set(pred))
    table = pd.crosstab(truth, pred).reindex(index=labels, columns=labels, fill_value=0)
    values = table.to_numpy(dtype=float)
    if normalize:
        values = values / np.maximum(values.sum(1, keepdims=True), 1)
    size = 0.45 * len(labels) + 2.5
    fig, ax = plt.subplots(figsize=(size + 1, size))
    im = ax.imshow(values, cmap="Blues", vmin=0)
    ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=8)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.set_xlabel(f"predicted ({pred_key})")
    ax.set_ylabel(f"true ({true_key})")
    for i in range(len(labels)):
        for j in range(len(labels)):
            if values[i, j] > 0:
                text = f"{values[i, j]:.2f}" if normalize else f"{int(values[i, j])}"
                color = "white" if values[i, j] > 0.6 * values.max() else "black"
                ax.text(j, i, text, ha="center", va="center", fontsize=6, color=color)
    fig.colorbar(
        im, ax=ax, fraction=0.046, label="fraction of true class" if normalize else "cells"
    )
    fig.tight_layout()
    return _finish(fig, save)


def umap(
    adata: AnnData,
    *,
    use_rep: str = "X_scmamba2",
    color: str | Sequence[str] | None = None,
    n_neighbors: int = 15,
    seed: int = 0,
    save: str | Path | None = None,
    **kwargs,
):
    """UMAP of an embedding, coloured by ``obs`` keys or genes; ``adata`` is not modified.

    Parameters
    ----------
    adata
        AnnData with ``obsm[use_rep]``.
    use_rep
        ``obsm`` key of the embedding.
    color
        Keys to colour by (as :func:`scanpy.pl.embedding`).
    n_neighbors
        Neighbours of the graph behind the UMAP.
    seed
        UMAP random state.
    save
        Path to save the figure to.
    **kwargs
        Passed to :func:`scanpy.pl.embedding`.

    Returns
    -------
    The :class:`matplotlib.figure.Figure`.
    """
    import scanpy as sc

    if use_rep not in adata.obsm:
        raise KeyError(f"adata.obsm has no {use_rep!r}; run scmamba2_scvi.tl.embed first.")
    scratch = AnnData(
        X=adata.X,
        obs=adata.obs.copy(),
        var=pd.DataFrame(index=adata.var_names),
        obsm={use_rep: np.asarray(adata.obsm[use_rep])},
        uns={k: v for k, v in adata.uns.items() if k.endswith("_colors")},
    )
    sc.pp.neighbors(scratch, use_rep=use_rep, n_neighbors=n_neighbors)
    sc.tl.umap(scratch, random_state=seed)
    kwargs.setdefault("wspace", 0.9)  # room for long category names in the legends
    fig = sc.pl.embedding(scratch, "X_umap", color=color, show=False, return_fig=True, **kwargs)
    return _finish(fig, save)
