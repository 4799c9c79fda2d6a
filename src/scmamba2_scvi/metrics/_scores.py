"""scIB-style scores of an embedding: arrays in, numbers out."""

from __future__ import annotations

import numpy as np
from scipy import sparse
from scipy.sparse.csgraph import connected_components
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score, silhouette_samples
from sklearn.neighbors import NearestNeighbors


def _codes(labels) -> np.ndarray:
    return np.unique(np.asarray(labels).astype(str), return_inverse=True)[1]


def nmi_ari(X: np.ndarray, labels, *, seed: int = 0) -> tuple[float, float]:
    """NMI and ARI between labels and a k-means clustering of the embedding.

    Parameters
    ----------
    X
        ``(n_cells, n_dims)`` embedding.
    labels
        ``(n_cells,)`` cell types.
    seed
        k-means random state; k is the number of distinct labels.

    Returns
    -------
    ``(nmi, ari)``, each in [0, 1] (ARI can be slightly negative for random clusterings).
    """
    y = _codes(labels)
    k = len(np.unique(y))
    pred = KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(np.asarray(X))
    return float(normalized_mutual_info_score(y, pred)), float(adjusted_rand_score(y, pred))


def label_asw(X: np.ndarray, labels) -> float:
    """Cell-type silhouette width, rescaled to [0, 1] (higher: types better separated).

    Parameters
    ----------
    X
        ``(n_cells, n_dims)`` embedding.
    labels
        ``(n_cells,)`` cell types.

    Returns
    -------
    ``(mean silhouette + 1) / 2``.
    """
    return float((silhouette_samples(np.asarray(X), _codes(labels)).mean() + 1) / 2)


def batch_asw(X: np.ndarray, batch, labels) -> float:
    """Batch mixing within cell types: ``1 - |silhouette of batch|``, averaged per type (scIB).

    Parameters
    ----------
    X
        ``(n_cells, n_dims)`` embedding.
    batch
        ``(n_cells,)`` batches.
    labels
        ``(n_cells,)`` cell types; types present in a single batch are skipped.

    Returns
    -------
    Score in [0, 1]; 1 means batches are perfectly mixed within every cell type.
    """
    X, b, y = np.asarray(X), _codes(batch), _codes(labels)
    scores = []
    for t in np.unique(y):
        sel = y == t
        if len(np.unique(b[sel])) < 2 or sel.sum() < 3:
            continue
        scores.append(np.mean(1 - np.abs(silhouette_samples(X[sel], b[sel]))))
    return float(np.mean(scores)) if scores else float("nan")


def _knn(X: np.ndarray, k: int) -> np.ndarray:
    k = min(k, len(X) - 1)
    return NearestNeighbors(n_neighbors=k + 1).fit(X).kneighbors(X, return_distance=False)[:, 1:]


def graph_connectivity(X: np.ndarray, labels, *, n_neighbors: int = 15) -> float:
    """Mean, over cell types, of the fraction of a type's cells in its largest kNN component.

    Parameters
    ----------
    X
        ``(n_cells, n_dims)`` embedding.
    labels
        ``(n_cells,)`` cell types.
    n_neighbors
        Neighbours of the kNN graph.

    Returns
    -------
    Score in [0, 1]; 1 means every type forms one connected piece.
    """
    X, y = np.asarray(X), _codes(labels)
    nn = _knn(X, n_neighbors)
    n = len(X)
    graph = sparse.csr_matrix(
        (np.ones(nn.size), (np.repeat(np.arange(n), nn.shape[1]), nn.ravel())), shape=(n, n)
    )
    scores = []
    for t in np.unique(y):
        idx = np.flatnonzero(y == t)
        _, comp = connected_components(graph[idx][:, idx], directed=False)
        scores.append(np.bincount(comp).max() / len(idx))
    return float(np.mean(scores))


def ilisi(X: np.ndarray, batch, *, n_neighbors: int = 90) -> float:
    """Integration LISI: effective number of batches among each cell's neighbours, scaled to [0, 1].

    The inverse Simpson index of the batch mix in each cell's ``n_neighbors`` nearest neighbours
    (uniform weights, not Harmony's perplexity-calibrated Gaussian), median over cells, then
    ``(lisi - 1) / (n_batches - 1)``.

    Parameters
    ----------
    X
        ``(n_cells, n_dims)`` embedding.
    batch
        ``(n_cells,)`` batches (at least two).
    n_neighbors
        Neighbourhood size.

    Returns
    -------
    Score in [0, 1]; 1 means neighbourhoods are as mixed as the batches allow.
    """
    b = _codes(batch)
    n_batches = len(np.unique(b))
    if n_batches < 2:
        raise ValueError("ilisi needs at least two batches.")
    nn = _knn(np.asarray(X), n_neighbors)
    frac = np.stack([(b[nn] == k).mean(1) for k in range(n_batches)], 1)
    lisi = 1.0 / (frac**2).sum(1)
    return float((np.median(lisi) - 1) / (n_batches - 1))


def integration_scores(X: np.ndarray, batch, labels, *, seed: int = 0) -> dict[str, float]:
    """All scIB-style scores and their bio / batch averages.

    Parameters
    ----------
    X
        ``(n_cells, n_dims)`` embedding.
    batch
        ``(n_cells,)`` batches.
    labels
        ``(n_cells,)`` cell types.
    seed
        k-means random state.

    Returns
    -------
    ``nmi``, ``ari``, ``label_asw`` (bio conservation), ``batch_asw``, ``graph_connectivity``,
    ``ilisi`` (batch correction), and ``bio`` and ``batch``: the means of each group.
    """
    nmi, ari = nmi_ari(X, labels, seed=seed)
    out = {
        "nmi": nmi,
        "ari": ari,
        "label_asw": label_asw(X, labels),
        "batch_asw": batch_asw(X, batch, labels),
        "graph_connectivity": graph_connectivity(X, labels),
        "ilisi": ilisi(X, batch),
    }
    out["bio"] = float(np.mean([out["nmi"], out["ari"], out["label_asw"]]))
    out["batch"] = float(np.mean([out["batch_asw"], out["graph_connectivity"], out["ilisi"]]))
    return out
