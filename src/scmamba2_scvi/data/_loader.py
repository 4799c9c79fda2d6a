"""Minibatches of AnnData rows, tokenized in the loader (in DataLoader workers when asked).

One collate step, :class:`TokenCollate`, turns a minibatch of CSR rows (and its batch / label
codes) into the token dictionary the module reads. Training, inference and
:class:`~scmamba2_scvi.data.TokenStream` all call it; padded and packed batches come from it.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from scvi import REGISTRY_KEYS, settings
from scvi.data import AnnDataManager
from scvi.dataloaders import DataSplitter
from torch.utils.data import DataLoader, Dataset, Sampler

from ._tokenize import Tokenizer, split_by_token_budget

__all__ = ["LengthBatchSampler", "TokenCollate", "TokenDataLoader", "TokenDataSplitter"]

#: Cells pooled before sorting by length in a shuffled epoch: batches hold cells of similar
#: length (little padding) while their composition still changes from epoch to epoch.
_POOL_BATCHES = 50


class TokenCollate:
    """Turn a minibatch of cells into the module's token dictionary.

    Parameters
    ----------
    tokenizer
        Maps the rows' columns onto the vocabulary.
    mask_ratio
        Fraction of gene positions masked for the masked-expression loss; ``None``: the
        tokenizer's own.
    packed
        One packed row (``seq_idx``/``cu_seqlens``, :meth:`Tokenizer.pack`) instead of padded
        rows.
    n_batch, n_labels
        Categories of the batch and label heads. The loader's codes already are the heads'
        indices (scvi-tools' registry, transferred from the reference for a query); codes at or
        past these counts (categories the heads do not know, unlabelled cells) become -1.
    n_zero_genes
        Non-expressed genes drawn per cell (``zero_genes``, see :class:`Tokenizer`); training
        negatives of the zero-probability head, 0 for inference.

    Notes
    -----
    Called with ``(seed, obs_index, tensors)``: ``tensors`` as scvi-tools'
    :class:`~scvi.data.AnnTorchDataset` returns them (``X`` a CSR tensor or matrix, ``batch``
    and ``labels`` codes), ``seed`` that of the batch's own generator (masking, random subsets),
    so a batch gets the same tokens in any worker. Returns the tokenizer's dictionary plus
    ``batch`` and ``labels`` ``(b,)`` int64 codes (when loaded) and ``obs_index`` ``(b,)``;
    it always holds ``log_library`` and, with ``n_zero_genes > 0``, ``zero_genes``,
    ``zero_padding_mask`` and ``n_zero_candidates``.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        mask_ratio: float | None = None,
        packed: bool = False,
        n_batch: int = 0,
        n_labels: int = 0,
        n_zero_genes: int = 0,
    ) -> None:
        self.tokenizer, self.mask_ratio, self.packed = tokenizer, mask_ratio, packed
        self.n_zero_genes = n_zero_genes
        self.n_codes = {REGISTRY_KEYS.BATCH_KEY: n_batch, REGISTRY_KEYS.LABELS_KEY: n_labels}

    def __call__(self, item: tuple[int, np.ndarray, dict[str, Any]]) -> dict[str, torch.Tensor]:
        seed, obs_index, tensors = item
        generator = torch.Generator().manual_seed(int(seed))
        fn = self.tokenizer.pack if self.packed else self.tokenizer
        out = fn(
            tensors[REGISTRY_KEYS.X_KEY],
            self.mask_ratio,
            generator,
            n_zero_genes=self.n_zero_genes,
        )
        for key, n in self.n_codes.items():
            if key in tensors:
                codes = torch.as_tensor(np.asarray(tensors[key])).reshape(-1).long()
                out[key] = torch.where(codes < n, codes, -1)
        out["obs_index"] = torch.as_tensor(np.asarray(obs_index, dtype=np.int64))
        return out


class LengthBatchSampler(Sampler):
    """Minibatches of cells of similar length, bounded by cells and by tokens.

    Each item is ``(seed, positions)``: the batch's generator seed and its cells' positions.

    Parameters
    ----------
    lengths
        Sequence length of each cell (:meth:`Tokenizer.lengths`).
    batch_size
        Most cells per batch.
    token_budget
        Most tokens per batch (padded: cells x longest; packed: sum of lengths); ``None``: no
        bound beyond ``batch_size``.
    packed
        How a batch's tokens are counted.
    shuffle
        A new random order every epoch (cells are sorted by length within pools of
        ``50 x batch_size`` cells, and the batches shuffled); otherwise all cells sorted by length.
    seed
        Seed of the shuffling and of the batches' generators.
    drop_last
        Leave out the last batch of an epoch when it has fewer than ``batch_size`` cells.
    rank, world_size
        With several processes, each takes every ``world_size``-th batch (the same number on
        every rank).
    """

    def __init__(
        self,
        lengths: np.ndarray,
        batch_size: int,
        token_budget: int | None = None,
        *,
        packed: bool = False,
        shuffle: bool = False,
        seed: int = 0,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}.")
        self.lengths = np.asarray(lengths, dtype=np.int64)
        if token_budget is not None and len(self.lengths) and self.lengths.max() > token_budget:
            raise ValueError(
                f"token_budget={token_budget} cannot hold a cell of {self.lengths.max()} tokens; "
                "raise it to at least the model's max_len."
            )
        self.batch_size, self.token_budget, self.packed = batch_size, token_budget, packed
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.rank, self.world_size = rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Order of epoch ``epoch`` (Lightning calls this at every epoch)."""
        self.epoch = epoch

    def _cut(self, order: np.ndarray) -> list[np.ndarray]:
        """Consecutive cells of ``order`` into batches within both bounds."""
        if self.token_budget is None:
            parts = [np.arange(len(order))]
        else:
            parts = split_by_token_budget(
                self.lengths[order], self.token_budget, padded=not self.packed
            )
        bs = self.batch_size
        return [order[p[k : k + bs]] for p in parts for k in range(0, len(p), bs)]

    def _batches(self) -> list[tuple[int, np.ndarray]]:
        n = len(self.lengths)
        rng = np.random.default_rng([self.seed, self.epoch])
        if not self.shuffle:
            batches = self._cut(np.argsort(self.lengths, kind="stable"))
        else:
            perm = rng.permutation(n)
            pool = _POOL_BATCHES * self.batch_size
            batches = []
            for start in range(0, n, pool):
                cells = perm[start : start + pool]
                batches += self._cut(cells[np.argsort(self.lengths[cells], kind="stable")])
            batches = [batches[i] for i in rng.permutation(len(batches))]
        if self.drop_last:
            batches = [b for b in batches if len(b) == self.batch_size]
        seeds = rng.integers(0, 2**62, len(batches)) if self.shuffle else np.zeros(len(batches))
        items = list(zip(seeds.tolist(), batches, strict=True))
        per_rank = len(items) // self.world_size if self.world_size > 1 else len(items)
        return items[self.rank :: self.world_size][:per_rank]

    def __iter__(self) -> Iterator[tuple[int, np.ndarray]]:
        yield from self._batches()

    def __len__(self) -> int:
        return len(self._batches())


class _Minibatches(Dataset):
    """Rows of an :class:`~scvi.data.AnnTorchDataset` for a sampler's ``(seed, positions)``."""

    def __init__(self, dataset: Dataset, indices: np.ndarray) -> None:
        self.dataset, self.indices = dataset, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, item: tuple[int, np.ndarray]) -> tuple[int, np.ndarray, dict]:
        seed, positions = item
        rows = self.indices[positions]
        order = np.argsort(rows, kind="stable")  # backed AnnData reads rows in ascending order
        # CSR rows from SciPy are valid by construction: opt out of torch's invariant checks
        # explicitly (torch warns when they are off implicitly) and hide its "beta" notice
        with warnings.catch_warnings(), torch.sparse.check_sparse_tensor_invariants(enable=False):
            warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta")
            tensors = self.dataset[rows[order].tolist()]
        return seed, positions[order], tensors


class TokenDataLoader(DataLoader):
    """Tokenized minibatches of a registered AnnData.

    Rows are read as sparse CSR tensors (never densified) by scvi-tools'
    :class:`~scvi.data.AnnTorchDataset` and tokenized by ``collate`` in the loader (in its
    worker processes when ``num_workers > 0``). Batches hold cells of similar length
    (:class:`LengthBatchSampler`).

    Parameters
    ----------
    adata_manager
        The AnnData's manager (``X``, and ``batch``/``labels`` codes when registered).
    collate
        The tokenizing collate step.
    indices
        Cells to load; default all.
    batch_size
        Most cells per batch.
    token_budget
        Most tokens per batch, see :class:`LengthBatchSampler`.
    shuffle
        A new order every epoch (training) instead of cells sorted by length (inference).
    drop_last
        Leave out incomplete batches.
    distributed_sampler
        Share the batches among the ``torch.distributed`` ranks.
    seed
        Seed of the order and the batches' generators; default: drawn from torch's generator.
    load_sparse_tensor
        Accepted for scvi-tools' :class:`~scvi.dataloaders.DataSplitter`; rows are always loaded
        sparse.
    **kwargs
        Passed to :class:`~torch.utils.data.DataLoader` (``num_workers`` defaults to
        ``scvi.settings.dl_num_workers``).
    """

    def __init__(
        self,
        adata_manager: AnnDataManager,
        collate: TokenCollate,
        indices: np.ndarray | None = None,
        batch_size: int = 128,
        token_budget: int | None = None,
        shuffle: bool = False,
        drop_last: bool = False,
        distributed_sampler: bool = False,
        seed: int | None = None,
        load_sparse_tensor: bool = True,
        **kwargs: Any,
    ) -> None:
        n_obs = adata_manager.adata.n_obs
        indices = np.arange(n_obs) if indices is None else np.asarray(indices)
        if indices.dtype == bool:
            indices = np.flatnonzero(indices)
        X = adata_manager.get_from_registry(REGISTRY_KEYS.X_KEY)
        chunk = 20000  # lengths from the CSR arrays, a block of rows at a time
        lengths = np.concatenate(
            [np.zeros(0, dtype=np.int64)]
            + [
                collate.tokenizer.lengths(X[indices[k : k + chunk]])
                for k in range(0, len(indices), chunk)
            ]
        )
        rank, world = 0, 1
        if distributed_sampler and torch.distributed.is_initialized():
            rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        if seed is None:
            seed = int(torch.randint(0, 2**62, ()).item())
        sampler = LengthBatchSampler(
            lengths,
            batch_size,
            token_budget,
            packed=collate.packed,
            shuffle=shuffle,
            seed=seed,
            drop_last=drop_last,
            rank=rank,
            world_size=world,
        )
        kwargs.setdefault("num_workers", settings.dl_num_workers)
        kwargs.setdefault("persistent_workers", settings.dl_persistent_workers)
        if not kwargs["num_workers"]:
            kwargs.pop("persistent_workers")
        dataset = _Minibatches(adata_manager.create_torch_dataset(load_sparse_tensor=True), indices)
        super().__init__(dataset, sampler=sampler, batch_size=None, collate_fn=collate, **kwargs)


class TokenDataSplitter(DataSplitter):
    """scvi-tools' :class:`~scvi.dataloaders.DataSplitter` with tokenized minibatches.

    Takes :class:`TokenDataLoader`'s ``collate`` and ``token_budget`` (through ``train()``'s
    ``datasplitter_kwargs``); the split itself is scvi-tools'.
    """

    data_loader_cls = TokenDataLoader
