"""scmamba2-scvi: SC-MAMBA2, a bidirectional Mamba2 single-cell foundation model for scverse."""

from importlib.metadata import PackageNotFoundError, version

from . import baselines, data, datasets, metrics, model, module, nn, ops, pl, tl
from .model import SCMamba2

try:
    __version__ = version("scmamba2-scvi")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

__all__ = [
    "SCMamba2",
    "baselines",
    "data",
    "datasets",
    "metrics",
    "model",
    "module",
    "nn",
    "ops",
    "pl",
    "tl",
]
