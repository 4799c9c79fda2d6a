"""scvi-tools module: tensors in, losses out."""

from ._module import SCMamba2Module

__all__ = ["SCMamba2Module"]
