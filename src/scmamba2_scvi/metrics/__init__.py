"""scIB scores of embeddings with scib-metrics' definitions (arrays in, numbers out; no jax)."""

from ._neighbors import Neighbors, neighbors
from ._scores import (
    bras,
    clisi,
    graph_connectivity,
    ilisi,
    integration_scores,
    isolated_labels,
    kbet_per_label,
    nmi_ari,
    pcr,
    pcr_comparison,
    silhouette_label,
)

__all__ = [
    "Neighbors",
    "bras",
    "clisi",
    "graph_connectivity",
    "ilisi",
    "integration_scores",
    "isolated_labels",
    "kbet_per_label",
    "neighbors",
    "nmi_ari",
    "pcr",
    "pcr_comparison",
    "silhouette_label",
]
