"""Exact k-nearest neighbours and UMAP connectivities, the graphs the scIB scores are built on."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import sparse
from sklearn.neighbors import NearestNeighbors


@dataclass(frozen=True)
class Neighbors:
    """Each cell's nearest neighbours, itself included (scib-metrics' ``NeighborsResults``).

    Attributes
    ----------
    indices
        ``(n_cells, k)`` neighbour indices, nearest first.
    distances
        ``(n_cells, k)`` Euclidean distances to them.
    """

    indices: np.ndarray
    distances: np.ndarray

    def subset(self, n_neighbors: int) -> Neighbors:
        """The ``n_neighbors`` nearest of the stored neighbours."""
        if n_neighbors > self.indices.shape[1]:
            raise ValueError(
                f"Only {self.indices.shape[1]} neighbours are stored; compute "
                f"neighbors(X, n_neighbors={n_neighbors}) instead."
            )
        return Neighbors(self.indices[:, :n_neighbors], self.distances[:, :n_neighbors])

    def distance_graph(self) -> sparse.csr_matrix:
        """Directed ``(n_cells, n_cells)`` kNN graph with the distances as edge weights."""
        n, k = self.indices.shape
        indptr = np.arange(0, n * k + 1, k)
        return sparse.csr_matrix(
            (self.distances.ravel(), self.indices.ravel(), indptr), shape=(n, n)
        )

    def connectivities(self) -> sparse.csr_matrix:
        """Symmetric UMAP fuzzy-set connectivities of the kNN graph (as in scanpy)."""
        from umap.umap_ import fuzzy_simplicial_set

        n, k = self.indices.shape
        graph = fuzzy_simplicial_set(
            sparse.coo_matrix((n, 1)),
            n_neighbors=k,
            random_state=None,
            metric=None,
            knn_indices=self.indices,
            knn_dists=self.distances,
            set_op_mix_ratio=1.0,
            local_connectivity=1.0,
        )[0]
        return graph.tocsr()


def neighbors(X: np.ndarray, n_neighbors: int = 90) -> Neighbors:
    """Exact Euclidean k-nearest neighbours of every cell, the cell itself first.

    Parameters
    ----------
    X
        ``(n_cells, n_dims)`` embedding.
    n_neighbors
        Neighbours per cell, the cell itself counted (scib-metrics uses 90, then the nearest 50
        for kBET and 15 for graph connectivity).

    Returns
    -------
    :class:`Neighbors` with at most ``n_cells`` neighbours per cell.
    """
    X = np.asarray(X, dtype=np.float32)
    k = min(n_neighbors, len(X))
    dist, idx = NearestNeighbors(n_neighbors=k).fit(X).kneighbors(X)
    return Neighbors(idx, dist.astype(np.float32))
