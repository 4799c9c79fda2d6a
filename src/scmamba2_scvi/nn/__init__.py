"""Neural-network building blocks (torch only): Mamba2 mixers and the bidirectional encoder."""

from ._encoder import BiMamba2Block, BiMamba2Encoder
from ._mixer import HydraMixer, Mamba2Mixer, RMSNorm, flip, reverse_index

__all__ = [
    "BiMamba2Block",
    "BiMamba2Encoder",
    "HydraMixer",
    "Mamba2Mixer",
    "RMSNorm",
    "flip",
    "reverse_index",
]
