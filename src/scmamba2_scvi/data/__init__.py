"""Data layer: gene vocabulary, value transforms, tokenization and streaming corpora."""

from ._binning import VALUE_TRANSFORMS, check_counts, quantile_bin, transform_values
from ._corpus import AnnDataCorpus, CellCorpus, H5adShardCorpus, SomaCorpus, shard_info
from ._loader import LengthBatchSampler, TokenCollate, TokenDataLoader, TokenDataSplitter
from ._pca import gene_loadings
from ._stream import TokenStream
from ._tokenize import (
    GENE_ORDERS,
    MASK_VALUE,
    MODES,
    PAD_VALUE,
    Tokenizer,
    split_by_token_budget,
)
from ._vocab import SPECIAL_TOKENS, GeneVocab, MappingReport, strip_ensembl_version

__all__ = [
    "GENE_ORDERS",
    "MASK_VALUE",
    "MODES",
    "PAD_VALUE",
    "SPECIAL_TOKENS",
    "VALUE_TRANSFORMS",
    "AnnDataCorpus",
    "CellCorpus",
    "GeneVocab",
    "H5adShardCorpus",
    "LengthBatchSampler",
    "MappingReport",
    "SomaCorpus",
    "TokenCollate",
    "TokenDataLoader",
    "TokenDataSplitter",
    "TokenStream",
    "Tokenizer",
    "check_counts",
    "gene_loadings",
    "quantile_bin",
    "shard_info",
    "split_by_token_budget",
    "strip_ensembl_version",
    "transform_values",
]
