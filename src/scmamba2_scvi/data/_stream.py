"""A resumable stream of tokenized batches of a corpus, for (distributed) pretraining."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
from scvi import REGISTRY_KEYS
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ._corpus import CellCorpus, _rank_world
from ._loader import TokenCollate
from ._tokenize import Tokenizer, split_by_token_budget

__all__ = ["TokenStream"]


def _round_robin_counts(lengths: list[int], n: int) -> tuple[list[int], int]:
    """Items taken from each list after ``n`` steps of a round robin over non-empty lists.

    Returns the per-list counts and the list the round robin takes from next.
    """
    counts = [0] * len(lengths)
    left = n
    cycle = 0
    while True:
        active = [w for w, size in enumerate(lengths) if size > cycle]
        if not active:
            return counts, 0
        if left < len(active):
            for w in active[:left]:
                counts[w] += 1
            return counts, active[left]
        for w in active:
            counts[w] += 1
        left -= len(active)
        cycle += 1


class _Worker(IterableDataset):
    """Batches of the calling DataLoader worker's share of one rank's epoch."""

    def __init__(self, stream: TokenStream, epoch: int, start: int, stop: int) -> None:
        super().__init__()
        self.stream, self.epoch, self.start, self.stop = stream, epoch, start, stop

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        slot = info.id if info is not None else 0
        yield from self.stream._worker_batches(self.epoch, self.start, self.stop, slot)


class TokenStream:
    """Tokenized batches of a corpus for pretraining: sharded, rank-balanced and resumable.

    Every epoch the corpus's blocks (shuffled per epoch) are dealt to ``world_size x num_workers``
    shards as in :class:`~scmamba2_scvi.data.CellCorpus`; a shard's cells are cut into batches of
    ``batch_size`` cells (or, with ``token_budget``, of as many cells as fit the budget) and the
    workers of a rank take turns, so each rank sees one fixed sequence of batches. Batches are
    planned from block sizes and index pointers alone, before any expression value is read. All
    ranks run the same number of steps per epoch (:meth:`__len__`, the smallest rank's count; the
    few batches over it are left out of that epoch), so no rank waits for another in a
    collective. Every batch is tokenized with its own seeded generator, so
    masking does not depend on workers or restarts.

    The stream is *stateful* in Lightning's sense: :meth:`state_dict` is the data position
    (epoch and batches consumed, the same on every rank), saved in checkpoints, and after
    :meth:`load_state_dict` iteration continues at the next unconsumed batch, with no batch lost
    or repeated. The consumer reports consumption with :meth:`mark_consumed` (the pretraining plan
    does this), because DataLoaders and Lightning fetch batches ahead of use.

    Parameters
    ----------
    corpus
        The corpus; its ``rank``/``world_size`` are ignored in favour of the stream's.
    tokenizer
        Tokenizer over vocabulary columns, e.g. ``Tokenizer.from_vocab(corpus.vocab, ...)``.
    batch_size
        Cells per batch (a shard's last batch may be smaller); the most cells per batch with
        ``token_budget``.
    token_budget
        Tokens per batch: padded length x cells, or with ``packed`` the sum of lengths. Cells'
        lengths are bounded from their stored entries
        (:meth:`~scmamba2_scvi.data.CellCorpus.stored_counts`, capped by the tokenizer's
        ``max_len``) or taken as ``max_len`` when the storage does not tell; the budget must hold
        one cell of ``max_len`` tokens.
    num_workers
        DataLoader worker processes per rank, each reading and tokenizing its own blocks.
    packed
        Yield :meth:`Tokenizer.pack` batches (one row, ``seq_idx``/``cu_seqlens``) instead of
        padded ones.
    seed
        Seed of the per-batch generators (masking, random subsets).
    rank, world_size
        Distributed position; default from ``torch.distributed`` when it is initialised.
    **loader_kwargs
        Passed to the :class:`~torch.utils.data.DataLoader` (e.g. ``pin_memory``).

    Examples
    --------
    >>> corpus = H5adShardCorpus("shards/", vocab, shuffle=True)
    >>> stream = TokenStream(corpus, Tokenizer.from_vocab(vocab, mask_ratio=0.15), 64)
    >>> for batch in stream:
    ...     loss = module.token_loss(batch).loss
    ...     stream.mark_consumed(batch["step"])
    """

    def __init__(
        self,
        corpus: CellCorpus,
        tokenizer: Tokenizer,
        batch_size: int = 64,
        *,
        token_budget: int | None = None,
        num_workers: int = 0,
        packed: bool = False,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        **loader_kwargs: Any,
    ) -> None:
        if len(tokenizer.column_tokens) != len(corpus.vocab):
            raise ValueError(
                f"The tokenizer has {len(tokenizer.column_tokens)} columns but corpus batches "
                f"have one column per vocabulary token ({len(corpus.vocab)}); build it with "
                "Tokenizer.from_vocab(corpus.vocab, ...)."
            )
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}.")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}.")
        if token_budget is not None and (tokenizer.max_len or 0) > token_budget:
            raise ValueError(
                f"token_budget={token_budget} cannot hold one cell of max_len="
                f"{tokenizer.max_len} tokens; raise it (or lower the tokenizer's max_len)."
            )
        if token_budget is not None and tokenizer.max_len is None:
            raise ValueError("token_budget needs a tokenizer with a max_len.")
        self.corpus, self.tokenizer = corpus, tokenizer
        self._collate = TokenCollate(tokenizer, packed=packed)
        self.batch_size, self.num_workers, self.packed = batch_size, num_workers, packed
        self.token_budget = token_budget
        self._stored: dict[int, np.ndarray | None] = {}
        self._plans: dict[tuple[int, int, int], list[list[int]]] = {}
        self.seed = seed
        self.rank, self.world_size = rank, world_size
        self.loader_kwargs = loader_kwargs
        self.epoch = 0
        self.consumed = 0

    # ------------------------------------------------------------------ the plan of an epoch
    @property
    def _slots(self) -> int:
        return max(1, self.num_workers)

    def _shard_blocks(self, epoch: int, rank: int, world: int) -> list[list[tuple[int, int, int]]]:
        """Blocks of each worker of ``rank`` in ``epoch``."""
        self.corpus.set_epoch(epoch)
        blocks = self.corpus.blocks()
        n_shards = world * self._slots
        return [blocks[rank * self._slots + w :: n_shards] for w in range(self._slots)]

    def _batch_sizes(self, epoch: int, rank: int, world: int) -> list[list[int]]:
        """Cells of each batch of each worker of ``rank`` in ``epoch`` (planned once per epoch)."""
        key = (epoch, rank, world)
        if key not in self._plans:
            self._plans = {k: v for k, v in self._plans.items() if k[0] == epoch}
            self._plans[key] = self._plan(epoch, rank, world)
        return self._plans[key]

    def _plan(self, epoch: int, rank: int, world: int) -> list[list[int]]:
        plans = []
        for blocks in self._shard_blocks(epoch, rank, world):
            n = sum(stop - start for _, start, stop in blocks)
            if self.token_budget is None:
                plans.append([min(self.batch_size, n - k) for k in range(0, n, self.batch_size)])
                continue
            lengths = np.concatenate([self._cell_tokens(*b) for b in blocks] or [np.zeros(0)])
            sizes = []
            for batch in split_by_token_budget(lengths, self.token_budget, padded=not self.packed):
                size = len(batch)
                sizes += [self.batch_size] * (size // self.batch_size)
                sizes += [size % self.batch_size] if size % self.batch_size else []
            plans.append(sizes)
        return plans

    def _cell_tokens(self, source: int, start: int, stop: int) -> np.ndarray:
        """Upper bounds of the cells' token counts, in the order the block is read."""
        tok = self.tokenizer
        if tok.mode != "expressed":  # a fixed gene set: every cell has the same length
            return np.full(stop - start, tok.lengths(sp.csr_matrix((1, len(tok.column_tokens))))[0])
        if source not in self._stored:
            self._stored[source] = self.corpus.stored_counts(source)
        stored = self._stored[source]
        if stored is None:
            return np.full(stop - start, tok.max_len)
        lengths = np.minimum(stored[start:stop] + 1, tok.max_len)  # + <cls>
        order = self.corpus.block_order(source, start, stop)
        return lengths if order is None else lengths[order]

    def _worker_lengths(self, epoch: int, rank: int, world: int) -> list[int]:
        return [len(sizes) for sizes in self._batch_sizes(epoch, rank, world)]

    def steps_per_epoch(self, epoch: int | None = None) -> int:
        """Batches every rank yields in ``epoch`` (default: the current one)."""
        epoch = self.epoch if epoch is None else epoch
        _, world = _rank_world(self.rank, self.world_size)
        return min(sum(self._worker_lengths(epoch, r, world)) for r in range(world))

    def __len__(self) -> int:
        """Batches per epoch on each rank (computed from block sizes, without reading data)."""
        return self.steps_per_epoch()

    # ------------------------------------------------------------------ state
    def mark_consumed(self, step: int | torch.Tensor) -> None:
        """Record that the batch with index ``step`` (``batch["step"]``) has been trained on."""
        self.consumed = int(step) + 1

    def state_dict(self) -> dict[str, int]:
        """The data position: ``epoch`` and batches ``consumed`` in it (same on all ranks)."""
        return {"epoch": self.epoch, "consumed": self.consumed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from a position returned by :meth:`state_dict`."""
        self.epoch, self.consumed = int(state["epoch"]), int(state["consumed"])

    # ------------------------------------------------------------------ iteration
    def __iter__(self) -> Iterator[dict[str, Any]]:
        """Yield the rest of the current epoch, then move to the next epoch.

        Each batch is a tokenizer dictionary plus ``obs_index`` ``(b,)`` (the cells' positions
        in the corpus), ``step`` (its index in the epoch) and ``epoch``.
        """
        if self.consumed >= self.steps_per_epoch():
            self.epoch, self.consumed = self.epoch + 1, 0
        epoch, start = self.epoch, self.consumed
        stop = self.steps_per_epoch(epoch)
        dataset = _Worker(self, epoch, start, stop)
        if self.num_workers == 0:
            batches: Any = iter(dataset)
        else:
            batches = DataLoader(
                dataset, batch_size=None, num_workers=self.num_workers, **self.loader_kwargs
            )
        for step, batch in zip(range(start, stop), batches, strict=False):
            batch["step"] = step
            batch["epoch"] = epoch
            yield batch

    def _worker_batches(
        self, epoch: int, start: int, stop: int, slot: int
    ) -> Iterator[dict[str, Any]]:
        """Batches of DataLoader worker ``slot`` for steps ``start:stop`` of ``epoch``.

        Worker slots are rotated so that the DataLoader's round robin, which begins at slot 0,
        continues the epoch's order exactly where ``start`` left it.
        """
        rank, world = _rank_world(self.rank, self.world_size)
        plans = self._batch_sizes(epoch, rank, world)
        lengths = [len(sizes) for sizes in plans]
        done, first = _round_robin_counts(lengths, start)
        limit, _ = _round_robin_counts(lengths, stop)
        worker = (slot + first) % self._slots
        if limit[worker] <= done[worker]:
            return
        blocks = self._shard_blocks(epoch, rank, world)[worker]
        skip = sum(plans[worker][: done[worker]])  # cells consumed before a restart
        k = done[worker]
        X_rest, index_rest = None, np.zeros(0, dtype=np.int64)
        for source, b_start, b_stop in blocks:
            size = b_stop - b_start
            if skip >= size:  # consumed before the restart: not read at all
                skip -= size
                continue
            self.corpus.set_epoch(epoch)  # the within-block shuffle of this epoch
            block = self.corpus.read_block(source, b_start, b_stop)
            X, index = block["X"][skip:], block["obs_index"][skip:]
            skip = 0
            if X_rest is not None:
                X, index = sp.vstack([X_rest, X], format="csr"), np.concatenate([index_rest, index])
            used = 0
            while k < limit[worker] and used + plans[worker][k] <= X.shape[0]:
                cut = slice(used, used + plans[worker][k])
                yield self._batch(X[cut], index[cut], epoch, (rank, worker), k)
                used, k = cut.stop, k + 1
            if k == limit[worker]:
                return
            X_rest, index_rest = X[used:], index[used:]

    def _batch(
        self, X: sp.csr_matrix, index: np.ndarray, epoch: int, shard: tuple[int, int], k: int
    ) -> dict[str, Any]:
        """Tokenize batch ``k`` of ``shard`` (rank, worker) with its own seeded generator."""
        state = np.random.SeedSequence([self.seed, epoch, *shard, k]).generate_state(1)
        return self._collate((int(state[0]), index, {REGISTRY_KEYS.X_KEY: X}))
