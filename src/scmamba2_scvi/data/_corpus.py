"""Streaming corpora of cells (AnnData, h5ad shards, TileDB-SOMA) aligned to a GeneVocab."""

from __future__ import annotations

import glob
import os
from collections.abc import Iterator, Sequence
from os import PathLike
from typing import Any

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from torch.utils.data import IterableDataset, get_worker_info

from ._vocab import GeneVocab

__all__ = [
    "AnnDataCorpus",
    "CellCorpus",
    "H5adShardCorpus",
    "SomaCorpus",
    "shard_info",
]


def _rank_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """Distributed rank and world size: as given, else from ``torch.distributed``, else 0 of 1."""
    dist = torch.distributed
    initialised = dist.is_available() and dist.is_initialized()
    if rank is None:
        rank = dist.get_rank() if initialised else 0
    if world_size is None:
        world_size = dist.get_world_size() if initialised else 1
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must lie in [0, world_size={world_size}).")
    return rank, world_size


def shard_info(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """Return ``(shard_id, n_shards)`` of the calling DataLoader worker across all ranks.

    Parameters
    ----------
    rank, world_size
        Distributed rank and world size; default: from ``torch.distributed`` when it is
        initialised, else ``0`` and ``1``.

    Returns
    -------
    ``shard_id = rank * num_workers + worker_id`` and ``n_shards = world_size * num_workers``.
    """
    rank, world_size = _rank_world(rank, world_size)
    info = get_worker_info()
    worker, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
    return rank * n_workers + worker, world_size * n_workers


def _to_vocab_space(X: Any, column_tokens: np.ndarray, n_vocab: int) -> sp.csr_matrix:
    """Re-index the columns of ``X`` to token ids; unmapped (-1) columns are dropped.

    Columns sharing a token (duplicated genes) are summed.
    """
    mapped = np.flatnonzero(column_tokens >= 0)
    order = mapped[np.argsort(column_tokens[mapped], kind="stable")]
    X = sp.csr_matrix(X) if not sp.issparse(X) else X.tocsr()
    sub = X[:, order]  # columns now in increasing token id
    sub.sort_indices()
    tokens = column_tokens[order]
    indices = tokens[sub.indices].astype(np.int32 if n_vocab < 2**31 else np.int64)
    out = sp.csr_matrix(
        (np.asarray(sub.data, dtype=np.float32), indices, sub.indptr), shape=(X.shape[0], n_vocab)
    )
    if len(np.unique(tokens)) < len(tokens):  # duplicated genes: one entry with their sum
        out.sum_duplicates()
    return out


class CellCorpus(IterableDataset):
    """Base class: a corpus of cells streamed in blocks, sharded over ranks and workers.

    Cells are cut into blocks of ``cells_per_block`` consecutive cells (blocks never span two
    sources). Each epoch every block goes to exactly one (rank, worker) shard: block ``k`` of
    the (optionally shuffled) block list goes to shard ``k % n_shards``, so shards are disjoint
    and together cover every cell once. Items are dictionaries with ``X`` (scipy CSR, cells x
    ``len(vocab)``: columns are token ids, so every source shares the same columns),
    ``obs_index`` (int64 position of each cell in the corpus) and ``obs_names``.

    Notes
    -----
    Under ``torch.distributed`` ranks may receive one block more or less than others; use
    ``drop_last``-style logic in the training loop (or equal-sized shards) if every rank must
    run the same number of steps; :class:`~scmamba2_scvi.data.TokenStream`, which tokenizes a
    corpus into training batches, balances the ranks for you.

    Parameters
    ----------
    vocab
        Vocabulary defining the output columns.
    cells_per_block
        Cells per block (the unit of reading, shuffling and sharding).
    shuffle
        Shuffle block order and cells within blocks, differently each epoch (see
        :meth:`set_epoch`).
    seed
        Seed of the shuffling.
    rank, world_size
        Distributed position; default from ``torch.distributed`` when initialised.
    """

    def __init__(
        self,
        vocab: GeneVocab,
        *,
        cells_per_block: int = 1024,
        shuffle: bool = False,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        super().__init__()
        if cells_per_block < 1:
            raise ValueError(f"cells_per_block must be positive, got {cells_per_block}.")
        self.vocab = vocab
        self.cells_per_block = cells_per_block
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self._sizes: list[int] = []  # cells per source, set by subclasses

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch used to seed shuffling (call before each epoch, as with samplers)."""
        self.epoch = int(epoch)

    @property
    def n_cells(self) -> int:
        """Total number of cells."""
        return int(sum(self._sizes))

    def __len__(self) -> int:
        """Number of cells in the corpus (not the number of items yielded)."""
        return self.n_cells

    def blocks(self) -> list[tuple[int, int, int]]:
        """All blocks of this epoch as ``(source, start, stop)``, in iteration order."""
        out = [
            (s, start, min(start + self.cells_per_block, n))
            for s, n in enumerate(self._sizes)
            for start in range(0, n, self.cells_per_block)
        ]
        if self.shuffle:
            rng = np.random.default_rng([self.seed, self.epoch])
            out = [out[i] for i in rng.permutation(len(out))]
        return out

    def shard_blocks(self) -> list[tuple[int, int, int]]:
        """The blocks of the calling (rank, worker) shard for this epoch."""
        shard, n_shards = shard_info(self.rank, self.world_size)
        return self.blocks()[shard::n_shards]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for block in self.shard_blocks():
            yield self.read_block(*block)

    def read_block(self, source: int, start: int, stop: int) -> dict[str, Any]:
        """Read one block (an item of :meth:`blocks`), its cells shuffled when ``shuffle``.

        Returns
        -------
        ``X`` (CSR, cells x ``len(vocab)``), ``obs_index`` (int64 position of each cell in the
        corpus) and ``obs_names``. The within-block order depends only on the seed, the epoch
        and the block, so the same block reads the same on every rank and after a restart.
        """
        X, column_tokens, names = self._read(source, start, stop)
        X = _to_vocab_space(X, column_tokens, len(self.vocab))
        offset = int(np.sum(self._sizes[:source], dtype=np.int64))
        index = np.arange(start, stop, dtype=np.int64) + offset
        names = np.asarray(names, dtype=object)
        perm = self.block_order(source, start, stop)
        if perm is not None:
            X, index, names = X[perm], index[perm], names[perm]
        return {"X": X, "obs_index": index, "obs_names": names}

    def block_order(self, source: int, start: int, stop: int) -> np.ndarray | None:
        """Order in which :meth:`read_block` yields the block's cells (``None``: as stored)."""
        if not self.shuffle:
            return None
        return np.random.default_rng([self.seed, self.epoch, source, start]).permutation(
            stop - start
        )

    def stored_counts(self, source: int) -> np.ndarray | None:
        """Stored (non-zero) entries of each cell of ``source``, read from metadata alone.

        An upper bound of each cell's expressed-gene tokens, used to plan token-budget batches
        without reading expression values; ``None`` when the storage does not tell.
        """
        return None

    def _read(self, source: int, start: int, stop: int) -> tuple[Any, np.ndarray, Sequence[str]]:
        """Return rows ``start:stop`` of ``source``, its column -> token map, and cell names."""
        raise NotImplementedError


class AnnDataCorpus(CellCorpus):
    """Corpus over one AnnData, in memory (dense or sparse) or backed (``backed="r"``).

    Parameters
    ----------
    adata
        The AnnData; it is never modified.
    vocab
        Vocabulary defining the output columns.
    layer
        Layer holding counts; default ``X``.
    gene_key
        ``var`` column with gene IDs or symbols (see :meth:`GeneVocab.map`).
    min_fraction
        Minimum fraction of genes that must map to ``vocab``.
    **kwargs
        ``cells_per_block``, ``shuffle``, ``seed``, ``rank``, ``world_size`` of :class:`CellCorpus`.
    """

    def __init__(
        self,
        adata: ad.AnnData,
        vocab: GeneVocab,
        *,
        layer: str | None = None,
        gene_key: str | None = None,
        min_fraction: float = 0.5,
        **kwargs: Any,
    ) -> None:
        super().__init__(vocab, **kwargs)
        if layer is not None and layer not in adata.layers:
            raise KeyError(f"layer={layer!r} not in adata.layers ({list(adata.layers)}).")
        self.adata = adata
        self.layer = layer
        self.column_tokens = vocab.map(adata, gene_key, min_fraction=min_fraction)
        self._sizes = [adata.n_obs]

    def _read(self, source: int, start: int, stop: int) -> tuple[Any, np.ndarray, Sequence[str]]:
        return self._matrix()[start:stop], self.column_tokens, self.adata.obs_names[start:stop]

    def _matrix(self) -> Any:
        return self.adata.X if self.layer is None else self.adata.layers[self.layer]

    def stored_counts(self, source: int) -> np.ndarray | None:
        """Stored entries per cell, from the CSR index pointer of an in-memory matrix."""
        X = self._matrix()
        return np.diff(X.indptr) if sp.issparse(X) and X.format == "csr" else None


class H5adShardCorpus(CellCorpus):
    """Corpus over h5ad files read lazily block by block (only ``var`` is read up front).

    Each shard may have its own genes: its columns are mapped to ``vocab`` separately.

    Parameters
    ----------
    paths
        A folder (all ``*.h5ad`` inside, sorted by name) or a list of h5ad files.
    vocab
        Vocabulary defining the output columns.
    layer
        Layer holding counts; default ``X``.
    gene_key
        ``var`` column with gene IDs or symbols.
    min_fraction
        Minimum fraction of each shard's genes that must map to ``vocab``.
    **kwargs
        ``cells_per_block``, ``shuffle``, ``seed``, ``rank``, ``world_size`` of :class:`CellCorpus`.
    """

    def __init__(
        self,
        paths: str | PathLike | Sequence[str | PathLike],
        vocab: GeneVocab,
        *,
        layer: str | None = None,
        gene_key: str | None = None,
        min_fraction: float = 0.5,
        **kwargs: Any,
    ) -> None:
        super().__init__(vocab, **kwargs)
        if isinstance(paths, str | PathLike):
            if not os.path.isdir(paths):
                raise FileNotFoundError(
                    f"{paths} is not a folder; pass a folder or a list of h5ad files."
                )
            files = sorted(glob.glob(os.path.join(os.fspath(paths), "*.h5ad")))
        else:
            files = [os.fspath(p) for p in paths]
        if not files:
            raise FileNotFoundError(f"No .h5ad files found in {paths}.")
        self.paths = files
        self.layer = layer
        self.shard_column_tokens: list[np.ndarray] = []
        for path in files:
            with h5py.File(path, "r") as f:
                var = ad.io.read_elem(f["var"])
                elem = self._matrix(f, path)
                shape = elem.attrs["shape"] if isinstance(elem, h5py.Group) else elem.shape
            self._sizes.append(int(shape[0]))
            self.shard_column_tokens.append(vocab.map(var, gene_key, min_fraction=min_fraction))

    def _matrix(self, f: h5py.File, path: str) -> h5py.Group | h5py.Dataset:
        if self.layer is None:
            return f["X"]
        if "layers" not in f or self.layer not in f["layers"]:
            raise KeyError(f"layer={self.layer!r} not found in {path}.")
        return f["layers"][self.layer]

    def stored_counts(self, source: int) -> np.ndarray | None:
        """Stored entries per cell, from the ``indptr`` of a CSR matrix (values are not read)."""
        path = self.paths[source]
        with h5py.File(path, "r") as f:
            elem = self._matrix(f, path)
            if isinstance(elem, h5py.Group) and elem.attrs.get("encoding-type") == "csr_matrix":
                return np.diff(elem["indptr"][:])
        return None

    def _read(self, source: int, start: int, stop: int) -> tuple[Any, np.ndarray, Sequence[str]]:
        path = self.paths[source]
        with h5py.File(path, "r") as f:
            elem = self._matrix(f, path)
            if isinstance(elem, h5py.Group):
                X = ad.io.sparse_dataset(elem)[start:stop]
            else:
                X = elem[start:stop]
            obs = f["obs"]
            names = obs[obs.attrs["_index"]][start:stop]
        names = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
        return X, self.shard_column_tokens[source], names


class SomaCorpus(CellCorpus):
    """Corpus over a TileDB-SOMA experiment (the CELLxGENE census format).

    Needs the optional ``tiledbsoma`` package (``pip install scmamba2-scvi[soma]``). The
    experiment is opened lazily in each worker; blocks of cells are read as sparse COO tables.

    Parameters
    ----------
    uri
        Experiment URI (local path or a cloud URI tiledbsoma can open).
    vocab
        Vocabulary defining the output columns.
    measurement_name
        Measurement holding the genes (census: ``"RNA"``).
    layer
        X layer with counts (census: ``"raw"``; ``tiledbsoma.io.from_anndata``: ``"data"``).
    obs_value_filter
        Optional SOMA value filter on ``obs`` (e.g. ``"is_primary_data == True"``).
    gene_key
        ``var`` column with gene IDs or symbols; default ``feature_id`` when present (census),
        else ``var_id``.
    obs_name_key
        ``obs`` column holding cell names (default ``obs_id`` when present).
    context
        Optional ``tiledbsoma.SOMATileDBContext`` (e.g. for cloud credentials).
    min_fraction
        Minimum fraction of genes that must map to ``vocab``.
    **kwargs
        ``cells_per_block``, ``shuffle``, ``seed``, ``rank``, ``world_size`` of :class:`CellCorpus`.
    """

    def __init__(
        self,
        uri: str,
        vocab: GeneVocab,
        *,
        measurement_name: str = "RNA",
        layer: str = "raw",
        obs_value_filter: str | None = None,
        gene_key: str | None = None,
        obs_name_key: str | None = None,
        context: Any = None,
        min_fraction: float = 0.5,
        **kwargs: Any,
    ) -> None:
        super().__init__(vocab, **kwargs)
        soma = _import_tiledbsoma()
        self.uri, self.measurement_name, self.layer = uri, measurement_name, layer
        self.context = context
        with soma.Experiment.open(uri, context=context) as exp:
            if measurement_name not in exp.ms:
                raise KeyError(f"Measurement {measurement_name!r} not in {uri} ({list(exp.ms)}).")
            ms = exp.ms[measurement_name]
            if layer not in ms.X:
                raise KeyError(f"X layer {layer!r} not in {uri} (layers: {list(ms.X)}).")
            var = ms.var.read().concat().to_pandas()
            obs_cols = exp.obs.schema.names
            self.obs_name_key = obs_name_key or ("obs_id" if "obs_id" in obs_cols else None)
            columns = ["soma_joinid"] + ([self.obs_name_key] if self.obs_name_key else [])
            obs = exp.obs.read(column_names=columns, value_filter=obs_value_filter)
            obs = obs.concat().to_pandas()
        if gene_key is None:
            gene_key = "feature_id" if "feature_id" in var.columns else "var_id"
        if gene_key not in var.columns:
            raise KeyError(f"gene_key={gene_key!r} not in var columns {list(var.columns)}.")
        var_table = var.set_index(pd.Index(var[gene_key].astype(str), name=None))
        self.column_tokens = vocab.map(var_table, min_fraction=min_fraction)
        self._var_joinids = var["soma_joinid"].to_numpy()
        self._obs_joinids = obs["soma_joinid"].to_numpy()
        order = np.argsort(self._obs_joinids, kind="stable")
        self._obs_joinids = self._obs_joinids[order]
        self._obs_names = (
            obs[self.obs_name_key].to_numpy()[order].astype(str)
            if self.obs_name_key
            else self._obs_joinids.astype(str)
        )
        self._sizes = [len(self._obs_joinids)]

    def _read(self, source: int, start: int, stop: int) -> tuple[Any, np.ndarray, Sequence[str]]:
        soma = _import_tiledbsoma()
        ids = self._obs_joinids[start:stop]
        with soma.Experiment.open(self.uri, context=self.context) as exp:
            array = exp.ms[self.measurement_name].X[self.layer]
            table = array.read(coords=(ids,)).tables().concat()
        dim0 = table["soma_dim_0"].to_numpy()
        dim1 = table["soma_dim_1"].to_numpy()
        data = table["soma_data"].to_numpy().astype(np.float32)
        rows = np.searchsorted(ids, dim0)
        cols = np.searchsorted(self._var_joinids, dim1)
        X = sp.csr_matrix((data, (rows, cols)), shape=(len(ids), len(self._var_joinids)))
        return X, self.column_tokens, self._obs_names[start:stop]


def _import_tiledbsoma() -> Any:
    try:
        import tiledbsoma
    except ImportError as err:  # pragma: no cover - exercised only without the extra
        raise ImportError(
            "SomaCorpus needs tiledbsoma: pip install 'scmamba2-scvi[soma]'."
        ) from err
    return tiledbsoma
