"""Plots (``pl``): training history, confusion matrix, UMAP of an embedding."""

from ._plots import confusion, history, umap

__all__ = ["confusion", "history", "umap"]
