"""Neural-network building blocks (torch only): Mamba2 mixers, the bidirectional encoder, heads."""

from ._encoder import BiMamba2Block, BiMamba2Encoder
from ._heads import (
    MASK_VALUE,
    PAD_VALUE,
    DecoderCovariates,
    DomainBatchNorm,
    ExprDecoder,
    GeneQueryDecoder,
    MLPClassifier,
    ValueEncoder,
)
from ._mixer import HydraMixer, Mamba2Mixer, RMSNorm, flip, reverse_index
from ._precision import BF16_MIN_WIDTH, bf16_pays

__all__ = [
    "BF16_MIN_WIDTH",
    "MASK_VALUE",
    "PAD_VALUE",
    "BiMamba2Block",
    "BiMamba2Encoder",
    "DecoderCovariates",
    "DomainBatchNorm",
    "ExprDecoder",
    "GeneQueryDecoder",
    "HydraMixer",
    "MLPClassifier",
    "Mamba2Mixer",
    "RMSNorm",
    "ValueEncoder",
    "bf16_pays",
    "flip",
    "reverse_index",
]
