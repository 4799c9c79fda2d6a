"""Figures: training history, confusion matrix, UMAP of an embedding."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from anndata import AnnData
from matplotlib.axes import Axes

if TYPE_CHECKING:
    from scmamba2_scvi.model import SCMamba2


def _finish(axes: Any, name: str, show: bool | None, save: str | Path | bool | None) -> Any:
    """Save, then show (by default only a figure not saved); return the axes unless shown."""
    import scanpy as sc

    fig = (axes[0] if isinstance(axes, list) else axes).figure
    if save is True:  # scanpy's convention: a file named after the plot in sc.settings.figdir
        save = Path(sc.settings.figdir) / f"scmamba2_{name}.{sc.settings.file_format_figs}"
    if save:
        Path(save).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(save, dpi=150, bbox_inches="tight")
    if (sc.settings.autoshow and not save) if show is None else show:
        plt.show()
        return None
    return axes


_HISTORY_KEYS = (
    "loss",
    "gep",
    "gepc",
    "gepc_zero",
    "masked_pearson",
    "cls",
    "accuracy",
    "dar",
    "dar_confusion",
    "ecs",
)


def history(
    model: SCMamba2,
    keys: Sequence[str] | None = None,
    *,
    ax: Axes | Sequence[Axes] | None = None,
    show: bool | None = None,
    save: str | Path | bool | None = None,
) -> list[Axes] | None:
    """Training curves from ``model.history``: one panel per metric, train and validation.

    Parameters
    ----------
    model
        A trained :class:`~scmamba2_scvi.SCMamba2`.
    keys
        Metric names without the ``_train``/``_validation`` suffix; default: every logged one of
        ``loss``, ``gep``, ``gepc``, ``gepc_zero``, ``masked_pearson``, ``cls``, ``accuracy``,
        ``dar``, ``dar_confusion``, ``ecs``.
    ax
        Axes to draw into, one per metric; default: a new figure.
    show
        Show the figure; default: when ``scanpy.settings.autoshow`` is on and it is not saved.
    save
        Path to save the figure to (``True``: ``scmamba2_history`` in ``scanpy.settings.figdir``,
        as scanpy).

    Returns
    -------
    The list of axes, one per metric, or ``None`` when the figure is shown.
    """
    hist = getattr(model, "history", None)
    if not hist:
        raise ValueError("The model has no training history: train it first.")
    if keys is None:
        keys = [k for k in _HISTORY_KEYS if f"{k}_train" in hist or f"train_{k}" in hist]
    if not keys:
        raise ValueError(f"None of the requested metrics were logged; logged: {list(hist)}.")
    if ax is None:
        fig, grid = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 2.8), squeeze=False)
        axes = list(grid[0])
    else:
        axes = [ax] if isinstance(ax, Axes) else list(ax)
        if len(axes) != len(keys):
            raise ValueError(f"Got {len(axes)} axes for {len(keys)} metrics ({list(keys)}).")
    for panel, key in zip(axes, keys):
        for split, style in (("train", "-"), ("validation", "--")):
            name = f"{split}_{key}" if key == "loss" else f"{key}_{split}"
            if name in hist:
                series = hist[name].dropna()
                panel.plot(series.index, series.iloc[:, 0], style, label=split)
        panel.set_title(key)
        panel.set_xlabel("epoch")
        panel.legend(frameon=False, fontsize=8)
    if ax is None:
        fig.tight_layout()
    return _finish(axes, "history", show, save)


def confusion(
    adata: AnnData,
    true_key: str,
    pred_key: str,
    *,
    normalize: bool = True,
    ax: Axes | None = None,
    show: bool | None = None,
    save: str | Path | bool | None = None,
) -> Axes | None:
    """Confusion matrix of two ``obs`` columns (rows: truth, columns: prediction).

    Parameters
    ----------
    adata
        AnnData with both columns.
    true_key, pred_key
        ``obs`` columns of true and predicted labels.
    normalize
        Show row fractions (recall per true class) instead of counts.
    ax
        Axes to draw into; default: a new figure.
    show
        Show the figure; default: when ``scanpy.settings.autoshow`` is on and it is not saved.
    save
        Path to save the figure to (``True``: ``scmamba2_confusion`` in ``scanpy.settings.figdir``,
        as scanpy).

    Returns
    -------
    The axes, or ``None`` when the figure is shown.
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
    new = ax is None
    if new:
        _, ax = plt.subplots(figsize=(size + 1, size))
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
    ax.figure.colorbar(
        im, ax=ax, fraction=0.046, label="fraction of true class" if normalize else "cells"
    )
    if new:
        ax.figure.tight_layout()
    return _finish(ax, "confusion", show, save)


def _graph_on(adata: AnnData, use_rep: str, n_neighbors: int) -> str | None:
    """``uns`` key of a neighbour graph of ``adata`` built on ``use_rep`` with ``n_neighbors``."""
    for key in sorted(adata.uns, key=lambda k: k != "neighbors"):  # scanpy's default first
        entry = adata.uns[key]
        if not isinstance(entry, dict) or not isinstance(entry.get("params"), dict):
            continue
        params = entry["params"]
        if (
            params.get("use_rep") == use_rep
            and params.get("n_neighbors") == n_neighbors
            and entry.get("connectivities_key") in adata.obsp
            and entry.get("distances_key") in adata.obsp
        ):
            return key
    return None


def umap(
    adata: AnnData,
    *,
    use_rep: str = "X_scmamba2",
    color: str | Sequence[str] | None = None,
    n_neighbors: int = 15,
    seed: int = 0,
    ax: Axes | None = None,
    show: bool | None = None,
    save: str | Path | bool | None = None,
    **kwargs,
) -> Axes | list[Axes] | None:
    """UMAP of an embedding, coloured by ``obs`` keys or genes; ``adata`` is not modified.

    What ``adata`` already holds for ``use_rep`` is reused: a neighbour graph built on it with
    ``n_neighbors`` (by :func:`scanpy.pp.neighbors`, under any ``key_added``), and scanpy's
    ``obsm["X_umap"]`` when that graph is the default ``"neighbors"`` one (the graph
    :func:`scanpy.tl.umap` reads by default). What is missing is computed for the plot only; run
    ``sc.pp.neighbors(adata, use_rep=use_rep)`` and ``sc.tl.umap(adata)`` once to plot again
    without recomputing.

    Parameters
    ----------
    adata
        AnnData with ``obsm[use_rep]``.
    use_rep
        ``obsm`` key of the embedding.
    color
        Keys to colour by (as :func:`scanpy.pl.embedding`).
    n_neighbors
        Neighbours of the graph behind the UMAP (when it is computed here).
    seed
        UMAP random state (when it is computed here).
    ax
        Axes to draw into (one ``color`` only); default: a new figure.
    show
        Show the figure; default: when ``scanpy.settings.autoshow`` is on and it is not saved.
    save
        Path to save the figure to (``True``: ``scmamba2_umap`` in ``scanpy.settings.figdir``,
        as scanpy).
    **kwargs
        Passed to :func:`scanpy.pl.embedding`.

    Returns
    -------
    The axes (a list with several ``color`` keys), or ``None`` when the figure is shown.
    """
    import scanpy as sc

    if use_rep not in adata.obsm:
        raise KeyError(f"adata.obsm has no {use_rep!r}; run scmamba2_scvi.tl.embed first.")
    # the plot is drawn from a scratch AnnData: colours scanpy assigns are not written back
    scratch = AnnData(
        X=adata.X,
        obs=adata.obs.copy(),
        var=pd.DataFrame(index=adata.var_names),
        obsm={use_rep: np.asarray(adata.obsm[use_rep])},
        uns={k: v for k, v in adata.uns.items() if k.endswith("_colors")},
    )
    graph = _graph_on(adata, use_rep, n_neighbors)
    if graph == "neighbors" and "X_umap" in adata.obsm:
        scratch.obsm["X_umap"] = np.asarray(adata.obsm["X_umap"])
    else:
        if graph is None:
            sc.pp.neighbors(scratch, use_rep=use_rep, n_neighbors=n_neighbors)
        else:
            entry = adata.uns[graph]
            scratch.uns["neighbors"] = {
                "params": dict(entry["params"]),
                "connectivities_key": "connectivities",
                "distances_key": "distances",
            }
            scratch.obsp["connectivities"] = adata.obsp[entry["connectivities_key"]]
            scratch.obsp["distances"] = adata.obsp[entry["distances_key"]]
        sc.tl.umap(scratch, random_state=seed)
    kwargs.setdefault("wspace", 0.9)  # room for long category names in the legends
    axes = sc.pl.embedding(scratch, "X_umap", color=color, ax=ax, show=False, **kwargs)
    return _finish(axes, "umap", show, save)
