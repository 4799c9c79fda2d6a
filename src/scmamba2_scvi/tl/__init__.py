"""scanpy-style tools (``tl``): embeddings, annotation, reconstruction, pseudotime."""

from ._tools import annotate, embed, pseudotime, reconstruct

__all__ = ["annotate", "embed", "pseudotime", "reconstruct"]
