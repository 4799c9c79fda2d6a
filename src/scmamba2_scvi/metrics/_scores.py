"""scIB scores of an embedding with scib-metrics' definitions, in NumPy (no jax).

Each score follows scib-metrics 0.5 (``scib_metrics.<name>``, same defaults and rescaling); the
tests compare them with it on the same neighbours. Deliberate differences: neighbours are exact
(scib-metrics' ``Benchmarker`` uses pynndescent), and k-means is scikit-learn's (10 restarts)
rather than scib-metrics' jax k-means, so NMI/ARI can differ by the clustering's randomness.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import sparse
from scipy.sparse.csgraph import connected_components
from scipy.sparse.linalg import eigsh
from scipy.stats import chi2
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score, pairwise_distances

from ._neighbors import Neighbors, neighbors

BIO = ("isolated_labels", "nmi", "ari", "silhouette_label", "clisi")
BATCH = ("bras", "ilisi", "kbet", "graph_connectivity", "pcr_comparison")


def _codes(values) -> np.ndarray:
    return np.unique(np.asarray(values).astype(str), return_inverse=True)[1]


def _silhouette_samples(
    X: np.ndarray, labels, *, metric: str = "euclidean", between: str = "nearest"
) -> np.ndarray:
    """Per-cell silhouette; ``between="mean_other"`` is BRAS' mean distance to all other groups."""
    X, y = np.asarray(X, dtype=np.float64), _codes(labels)
    freq = np.bincount(y).astype(np.float64)
    onehot = np.eye(len(freq))[y]
    intra, inter = np.empty(len(X)), np.empty(len(X))
    for start in range(0, len(X), 1024):
        rows = slice(start, start + 1024)
        sums = pairwise_distances(X[rows], X, metric=metric) @ onehot  # (chunk, n_groups)
        own = y[rows]
        intra[rows] = sums[np.arange(len(own)), own]
        if between == "mean_other":
            inter[rows] = (sums.sum(1) - intra[rows]) / (len(X) - freq[own])
        else:
            sums[np.arange(len(own)), own] = np.inf
            inter[rows] = (sums / freq).min(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        intra /= freq[y] - 1
        sil = (inter - intra) / np.maximum(intra, inter)
    return np.nan_to_num(sil)  # singleton groups score 0, as in scikit-learn


def silhouette_label(X: np.ndarray, labels) -> float:
    """Cell-type silhouette width, rescaled to [0, 1] (``scib_metrics.silhouette_label``).

    Parameters
    ----------
    X
        ``(n_cells, n_dims)`` embedding.
    labels
        ``(n_cells,)`` cell types.

    Returns
    -------
    ``(mean silhouette + 1) / 2`` with Euclidean distances; higher: types better separated.
    """
    return float((_silhouette_samples(X, labels).mean() + 1) / 2)


def isolated_labels(X: np.ndarray, labels, batch) -> float:
    """Silhouette of the cell types found in the fewest batches (``scib_metrics.isolated_labels``).

    Parameters
    ----------
    X
        ``(n_cells, n_dims)`` embedding.
    labels
        ``(n_cells,)`` cell types.
    batch
        ``(n_cells,)`` batches.

    Returns
    -------
    Mean over the isolated types of their cells' rescaled silhouette ``(s + 1) / 2`` against all
    other types; isolated types are those in no more batches than the least shared type.
    """
    labels, batch = np.asarray(labels).astype(str), np.asarray(batch).astype(str)
    n_batches = pd.DataFrame({"l": labels, "b": batch}).groupby("l")["b"].nunique()
    isolated = n_batches.index[n_batches <= n_batches.min()]
    sil = (_silhouette_samples(X, labels) + 1) / 2
    return float(np.mean([sil[labels == t].mean() for t in isolated]))


def nmi_ari(X: np.ndarray, labels, *, seed: int = 0) -> tuple[float, float]:
    """NMI and ARI between labels and a k-means clustering of the embedding.

    As ``scib_metrics.nmi_ari_cluster_labels_kmeans`` (k = number of labels), with scikit-learn's
    k-means.

    Parameters
    ----------
    X
        ``(n_cells, n_dims)`` embedding.
    labels
        ``(n_cells,)`` cell types.
    seed
        k-means random state.

    Returns
    -------
    ``(nmi, ari)``, each in [0, 1] (ARI can be slightly negative for random clusterings).
    """
    y = _codes(labels)
    k = len(np.unique(y))
    pred = KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(np.asarray(X))
    return float(normalized_mutual_info_score(y, pred)), float(adjusted_rand_score(y, pred))


def bras(X: np.ndarray, labels, batch) -> float:
    """Batch removal adapted silhouette within cell types (``scib_metrics.bras``).

    Parameters
    ----------
    X
        ``(n_cells, n_dims)`` embedding.
    labels
        ``(n_cells,)`` cell types; types in a single batch (or with one cell per batch) are
        skipped.
    batch
        ``(n_cells,)`` batches.

    Returns
    -------
    Mean over types of the mean ``1 - |s|``, where ``s`` is the cosine-distance silhouette of a
    cell's batch against the mean distance to all other batches of its type; 1 is perfectly mixed.
    ``nan`` if no type is in two batches.
    """
    X, labels, batch = np.asarray(X), np.asarray(labels).astype(str), np.asarray(batch)
    scores = []
    for t in np.unique(labels):
        sel = labels == t
        n_batches = len(np.unique(batch[sel]))
        if n_batches in (1, sel.sum()):
            continue
        sil = _silhouette_samples(X[sel], batch[sel], metric="cosine", between="mean_other")
        scores.append(np.mean(1 - np.abs(sil)))
    return float(np.mean(scores)) if scores else float("nan")


def _simpson(nn: Neighbors, values, perplexity: float, tol: float = 1e-5) -> np.ndarray:
    """Harmony's Simpson index per cell: Gaussian weights with per-cell perplexity calibration."""
    codes = _codes(values)
    d = nn.distances.astype(np.float64)
    not_self = nn.indices != np.arange(len(d))[:, None]

    def entropy(beta):
        P = np.where(not_self, np.exp(-d * beta[:, None]), 0.0)
        total = P.sum(1)
        with np.errstate(divide="ignore", invalid="ignore"):
            H = np.where(total == 0, 0.0, np.log(total) + beta * (d * P).sum(1) / total)
            P = np.where(total[:, None] == 0, 0.0, P / total[:, None])
        return H, P

    beta, lo, hi = np.ones(len(d)), np.full(len(d), -np.inf), np.full(len(d), np.inf)
    H, P = entropy(beta)
    for _ in range(50):  # bisection on beta until the entropy matches log(perplexity)
        diff = H - np.log(perplexity)
        todo = np.abs(diff) >= tol
        if not todo.any():
            break
        up = diff > 0
        new_beta = np.where(
            up,
            np.where(np.isinf(hi), beta * 2, (beta + hi) / 2),
            np.where(np.isinf(lo), beta / 2, (beta + lo) / 2),
        )
        lo = np.where(todo & up, beta, lo)
        hi = np.where(todo & ~up, beta, hi)
        beta = np.where(todo, new_beta, beta)
        H, P = entropy(beta)
    neighbour_codes = codes[nn.indices]
    mass = np.stack([(P * (neighbour_codes == c)).sum(1) for c in range(codes.max() + 1)], 1)
    return np.where(H == 0, -1.0, (mass**2).sum(1))


def _as_neighbors(nn: Neighbors | np.ndarray, n_neighbors: int) -> Neighbors:
    return nn if isinstance(nn, Neighbors) else neighbors(nn, n_neighbors)


def _lisi(nn: Neighbors, values, perplexity: float | None) -> float:
    if perplexity is None:
        perplexity = float(nn.indices.shape[1] // 3)
    return float(np.nanmedian(1 / _simpson(nn, values, perplexity)))


def ilisi(nn: Neighbors | np.ndarray, batch, *, perplexity: float | None = None) -> float:
    """Integration LISI, scaled to [0, 1] (``scib_metrics.ilisi_knn``).

    Parameters
    ----------
    nn
        :func:`neighbors` of the embedding, or the ``(n_cells, n_dims)`` embedding itself
        (then 90 exact neighbours, as scib-metrics).
    batch
        ``(n_cells,)`` batches (at least two).
    perplexity
        Effective neighbourhood size of the Gaussian weights; default ``n_neighbors // 3``.

    Returns
    -------
    ``(median LISI - 1) / (n_batches - 1)``; 1 means neighbourhoods are as mixed as the batches
    allow.
    """
    n_batches = len(np.unique(_codes(batch)))
    if n_batches < 2:
        raise ValueError("ilisi needs at least two batches.")
    return (_lisi(_as_neighbors(nn, 90), batch, perplexity) - 1) / (n_batches - 1)


def clisi(nn: Neighbors | np.ndarray, labels, *, perplexity: float | None = None) -> float:
    """Cell-type LISI, scaled to [0, 1] (``scib_metrics.clisi_knn``).

    Parameters
    ----------
    nn
        :func:`neighbors` of the embedding, or the ``(n_cells, n_dims)`` embedding itself
        (then 90 exact neighbours, as scib-metrics).
    labels
        ``(n_cells,)`` cell types (at least two).
    perplexity
        Effective neighbourhood size of the Gaussian weights; default ``n_neighbors // 3``.

    Returns
    -------
    ``(n_labels - median LISI) / (n_labels - 1)``; 1 means every neighbourhood is one type.
    """
    n_labels = len(np.unique(_codes(labels)))
    if n_labels < 2:
        raise ValueError("clisi needs at least two cell types.")
    return (n_labels - _lisi(_as_neighbors(nn, 90), labels, perplexity)) / (n_labels - 1)


def graph_connectivity(nn: Neighbors | np.ndarray, labels) -> float:
    """Mean, over cell types, of the fraction of a type's cells in its largest kNN component.

    As ``scib_metrics.graph_connectivity``: strongly connected components of the directed kNN
    graph restricted to each type.

    Parameters
    ----------
    nn
        :func:`neighbors` of the embedding, or the ``(n_cells, n_dims)`` embedding itself
        (then 15 exact neighbours, as scib-metrics).
    labels
        ``(n_cells,)`` cell types.

    Returns
    -------
    Score in [0, 1]; 1 means every type forms one connected piece.
    """
    graph, labels = _as_neighbors(nn, 15).distance_graph(), np.asarray(labels).astype(str)
    scores = []
    for t in np.unique(labels):
        sel = labels == t
        _, comp = connected_components(graph[sel][:, sel], connection="strong")
        scores.append(np.bincount(comp).max() / sel.sum())
    return float(np.mean(scores))


def _arpack_start(n: int) -> np.ndarray:
    """ARPACK's start vector for an ``n``-row problem: fixed, as ARPACK's own is stateful."""
    return np.random.default_rng(0).uniform(-1, 1, n)


def _diffusion_neighbors(conn: sparse.csr_matrix, k: int, n_comps: int) -> Neighbors:
    """Neighbours in a multiscale diffusion map of a connectivity graph (scib-metrics' kBET)."""
    q = np.asarray(conn.sum(0)).ravel()
    K = sparse.diags(1 / q) @ conn @ sparse.diags(1 / q)  # density normalisation
    z = np.sqrt(np.asarray(K.sum(0)).ravel())
    T = (sparse.diags(1 / z) @ K @ sparse.diags(1 / z)).astype(np.float64)
    evals, evecs = eigsh(T, k=min(T.shape[0] - 1, n_comps), which="LM", v0=_arpack_start(len(q)))
    evals = evals.astype(np.float32) + np.float32(1e-8)
    with np.errstate(divide="ignore"):
        scale = np.where(evals == 1, evals, evals / (1 - evals))
    return neighbors(evecs.astype(np.float32) * scale, n_neighbors=k + 1)


def _kbet_acceptance(nn: Neighbors, batch: np.ndarray, alpha: float) -> float:
    """Fraction of cells whose neighbourhood (itself included) passes the chi-squared test."""
    expected = np.bincount(batch) / len(batch) * nn.indices.shape[1]
    observed = np.stack([(batch[nn.indices] == b).sum(1) for b in range(len(expected))], 1)
    stat = ((observed - expected) ** 2 / expected).sum(1)
    return float((chi2.sf(stat, len(expected) - 1) >= alpha).mean())


def _kbet_one_type(
    conn: sparse.csr_matrix, batch: np.ndarray, alpha: float, n_comps: int
) -> tuple[float, int]:
    """Acceptance of one type, and the diffusion component count left for the next type."""
    n = conn.shape[0]
    if n < 10 or len(np.unique(batch)) == 1:
        return float("nan"), n_comps
    k0 = int(min(70, max(10, np.floor(np.bincount(batch)[np.bincount(batch) > 0].mean() / 4))))
    _, comp = connected_components(conn, connection="strong")
    sizes = np.bincount(comp)
    keep = sizes[comp] >= 3 * k0 if len(sizes) > 1 else np.ones(n, bool)
    if keep.mean() < 0.75:  # too many small components: 100% rejection
        return 0.0, n_comps
    sub, b = conn[keep][:, keep], np.unique(batch[keep], return_inverse=True)[1]
    n_comps = min(n_comps, sub.shape[0] - 1)
    try:
        nn = _diffusion_neighbors(sub, k0, n_comps)
    except ValueError:  # the diffusion map failed: 100% rejection, as scib-metrics
        return 0.0, n_comps
    return _kbet_acceptance(nn, b, alpha), n_comps


def kbet_per_label(nn: Neighbors | np.ndarray, batch, labels, *, alpha: float = 0.05) -> float:
    """Acceptance rate of kBET within each cell type (``scib_metrics.kbet_per_label``).

    Per type, cells' neighbourhoods are taken in a diffusion map of the type's UMAP connectivity
    subgraph (``k0`` = a quarter of the mean batch size, clipped to [10, 70]) and each is tested
    against the type's batch proportions with a chi-squared test.

    Parameters
    ----------
    nn
        :func:`neighbors` of the embedding, or the ``(n_cells, n_dims)`` embedding itself
        (then 50 exact neighbours, as scib-metrics).
    batch
        ``(n_cells,)`` batches.
    labels
        ``(n_cells,)`` cell types; types under 10 cells or in one batch are skipped.
    alpha
        Significance level of the test.

    Returns
    -------
    Mean acceptance rate over types in [0, 1]; 1 means neighbourhoods match the batch mix.
    """
    conn = _as_neighbors(nn, 50).connectivities()
    b, labels = _codes(batch), np.asarray(labels)
    scores, n_comps = [], 100
    for t in np.unique(labels):  # scib-metrics 0.5 carries the shrinking n_comps across types
        sel = labels == t
        score, n_comps = _kbet_one_type(conn[sel][:, sel], b[sel], alpha, n_comps)
        scores.append(score)
    return float(np.nanmean(scores)) if not np.isnan(scores).all() else float("nan")


def pcr(X: np.ndarray, covariate, *, categorical: bool = False) -> float:
    """Share of an embedding's variance a covariate explains (principal component regression).

    As ``scib_metrics.utils.principal_component_regression``: the covariate (one-hot when
    categorical) is centred and regressed on every principal component of ``X``, and the
    components' R^2 are averaged weighted by their variance. For a continuous covariate such as
    sequencing depth this is how much of the embedding is depth.

    Parameters
    ----------
    X
        ``(n_cells, n_dims)`` embedding.
    covariate
        ``(n_cells,)`` values: numbers (e.g. log total counts), or categories (e.g. batches)
        with ``categorical=True``.
    categorical
        One-hot encode ``covariate``.

    Returns
    -------
    Score in [0, 1]; 0 means no principal component varies with the covariate.
    """
    X = np.asarray(X, dtype=np.float64)
    if categorical:
        codes = _codes(covariate)
        design = np.eye(codes.max() + 1)[codes]
    else:
        design = np.asarray(covariate, dtype=np.float64)
        design = design.reshape(len(design), -1)
    if len(design) != len(X):
        raise ValueError(f"covariate has {len(design)} values for {len(X)} cells.")
    u, s, _ = np.linalg.svd(X - X.mean(0), full_matrices=False)
    pcs, var = u * s, s**2 / (len(X) - 1)
    design = design - design.mean(0)
    fit = design @ np.linalg.lstsq(design, pcs, rcond=None)[0]
    total = (pcs**2).sum(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        r2 = np.where(total > 0, np.maximum(0, 1 - ((pcs - fit) ** 2).sum(0) / total), 0.0)
    return float(r2 @ var / var.sum())


def pcr_comparison(X_pre: np.ndarray, X: np.ndarray, batch) -> float:
    """How much less variance batch explains after integration (``scib_metrics.pcr_comparison``).

    Parameters
    ----------
    X_pre
        ``(n_cells, n_dims)`` unintegrated embedding (e.g. PCA of log-normalised counts).
    X
        ``(n_cells, n_dims)`` integrated embedding.
    batch
        ``(n_cells,)`` batches.

    Returns
    -------
    ``(pcr_pre - pcr_post) / pcr_pre`` clipped at 0, where ``pcr`` is the variance-weighted
    R^2 of batch on every principal component; 1 means batch explains nothing left.
    """
    pre = pcr(X_pre, batch, categorical=True)
    return max(0.0, (pre - pcr(X, batch, categorical=True)) / pre)


def integration_scores(
    X: np.ndarray, batch, labels, *, X_pre: np.ndarray | None = None, seed: int = 0
) -> dict[str, float]:
    """All scIB scores of an embedding and scib-metrics' aggregates.

    The neighbour counts (90 for LISI, 50 for kBET, 15 for graph connectivity) and the
    aggregation are those of ``scib_metrics.benchmark.Benchmarker``.

    Parameters
    ----------
    X
        ``(n_cells, n_dims)`` embedding.
    batch
        ``(n_cells,)`` batches (at least two).
    labels
        ``(n_cells,)`` cell types (at least two).
    X_pre
        Unintegrated embedding of the same cells for ``pcr_comparison``; without it that score
        is ``nan`` and left out of ``batch``.
    seed
        k-means random state.

    Returns
    -------
    Bio conservation ``isolated_labels``, ``nmi``, ``ari``, ``silhouette_label``, ``clisi``;
    batch correction ``bras``, ``ilisi``, ``kbet``, ``graph_connectivity``, ``pcr_comparison``;
    ``bio`` and ``batch``, the means of each group, and ``total = 0.6 bio + 0.4 batch``.
    """
    X = np.asarray(X)
    nn = neighbors(X, 90)
    nmi, ari = nmi_ari(X, labels, seed=seed)
    out = {
        "isolated_labels": isolated_labels(X, labels, batch),
        "nmi": nmi,
        "ari": ari,
        "silhouette_label": silhouette_label(X, labels),
        "clisi": clisi(nn, labels),
        "bras": bras(X, labels, batch),
        "ilisi": ilisi(nn, batch),
        "kbet": kbet_per_label(nn.subset(50), batch, labels),
        "graph_connectivity": graph_connectivity(nn.subset(15), labels),
        "pcr_comparison": float("nan") if X_pre is None else pcr_comparison(X_pre, X, batch),
    }
    out["bio"] = float(np.nanmean([out[k] for k in BIO]))
    out["batch"] = float(np.nanmean([out[k] for k in BATCH]))
    out["total"] = 0.6 * out["bio"] + 0.4 * out["batch"]
    return out
