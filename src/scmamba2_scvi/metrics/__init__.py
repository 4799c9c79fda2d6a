"""scIB-style scores of embeddings (arrays in, numbers out)."""

from ._scores import (
    batch_asw,
    graph_connectivity,
    ilisi,
    integration_scores,
    label_asw,
    nmi_ari,
)

__all__ = ["batch_asw", "graph_connectivity", "ilisi", "integration_scores", "label_asw", "nmi_ari"]
