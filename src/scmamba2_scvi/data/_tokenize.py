"""Turn cells x genes matrices into padded or packed token sequences (vectorised torch)."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import scipy.sparse as sp
import torch

from scmamba2_scvi.nn import MASK_VALUE, PAD_VALUE

from ._binning import (
    _CSR,
    VALUE_TRANSFORMS,
    ArrayLike,
    _check_count_values,
    _float_key,
    _is_integral,
    _row_totals,
    _to_csr,
    _transform,
)
from ._vocab import GeneVocab

__all__ = [
    "GENE_ORDERS",
    "MASK_VALUE",
    "MODES",
    "PAD_VALUE",
    "Tokenizer",
    "split_by_token_budget",
]

#: Sequence contents understood by :class:`~scmamba2_scvi.data.Tokenizer`.
MODES: tuple[str, ...] = ("expressed", "full", "genes")
#: Gene orders understood by :class:`~scmamba2_scvi.data.Tokenizer`.
GENE_ORDERS: tuple[str, ...] = ("vocab", "genomic", "expression", "random")

#: Keys of a token dictionary with one entry per cell rather than per token.
_PER_CELL = ("log_library", "zero_genes", "zero_padding_mask", "n_zero_candidates")

_KEY_MAX = (1 << 31) - 1  # float32 bit keys of non-negative values are below this


def _sort_within_rows(row: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """Permutation sorting entries by (row, key), ties kept in input order; ``0 <= key < 2**32``."""
    return torch.sort((row << 32) | key, stable=True).indices


def _random_keys(n: int, device: torch.device, generator: torch.Generator | None) -> torch.Tensor:
    """Uniform int64 keys in ``[0, 2**31)``."""
    return torch.empty(n, dtype=torch.long, device=device).random_(generator=generator) >> 32


_M31 = (1 << 31) - 1


def _hash31(x: torch.Tensor) -> torch.Tensor:
    """Integer hash of int64 ``x`` into ``[0, 2**31)`` (products stay below ``2**63``)."""
    x = x & _M31
    x = ((x ^ (x >> 16)) * 0x45D9F3B) & _M31
    x = ((x ^ (x >> 16)) * 0x45D9F3B) & _M31
    return x ^ (x >> 16)


def _cell_keys(row: torch.Tensor, tokens: torch.Tensor, raw: torch.Tensor, n_rows: int):
    """A key per cell from its content: the (gene token, value) pairs of its entries.

    A sum over the entries, so it does not depend on the order of the columns nor on the other
    cells of the batch.
    """
    entry = _hash31(_hash31(tokens) ^ _float_key(raw))
    return _hash31(
        torch.zeros(n_rows, dtype=torch.long, device=row.device).index_add_(0, row, entry)
    )


def _identity_keys(cell_key: torch.Tensor, tokens: torch.Tensor, salt: int) -> torch.Tensor:
    """Seeded hash of (cell, gene token) in ``[0, 2**31)``; shapes broadcast."""
    return _hash31(cell_key ^ _hash31(tokens + salt))


def _merge_duplicate_columns(csr: _CSR, canonical: torch.Tensor) -> _CSR:
    """Move every entry to its gene's first column (``canonical``) and sum entries that meet."""
    dev = csr.val.device
    row = csr.rows()
    key = row * csr.n_cols + canonical.to(dev)[csr.col]
    uniq, inverse = torch.unique(key, sorted=True, return_inverse=True)
    val = torch.zeros(len(uniq), dtype=csr.val.dtype, device=dev).index_add_(0, inverse, csr.val)
    new_row = uniq // csr.n_cols
    crow = torch.zeros(csr.n_rows + 1, dtype=torch.long, device=dev)
    torch.cumsum(torch.bincount(new_row, minlength=csr.n_rows), 0, out=crow[1:])
    return _CSR(crow, uniq % csr.n_cols, val, csr.n_rows, csr.n_cols, True)


def _is_canonical_csr(X: sp.spmatrix) -> bool:
    """CSR without repeated column indices in a row (their entries would be counted twice)."""
    return X.format == "csr" and X.has_canonical_format


def _first_columns(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Deduplicated column tokens and each column's first column of the same gene.

    Later columns of a duplicated gene get -1 in the first output; the second is ``None``
    when no gene is duplicated.
    """
    mapped = torch.nonzero(ids >= 0).flatten()
    tokens = ids[mapped]
    if len(torch.unique(tokens)) == len(tokens):
        return ids, None
    order = torch.sort(tokens, stable=True).indices  # same tokens together, by column
    sorted_tok = tokens[order]
    is_first = torch.ones(len(order), dtype=torch.bool)
    is_first[1:] = sorted_tok[1:] != sorted_tok[:-1]
    group_first = mapped[order][is_first]
    first = group_first[torch.cumsum(is_first.long(), 0) - 1]
    canonical = torch.arange(len(ids))
    canonical[mapped[order]] = first
    unique = ids.clone()
    unique[canonical != torch.arange(len(ids))] = -1
    return unique, canonical


def _bernoulli(
    shape: tuple[int, ...], p: float, device: torch.device, generator: torch.Generator | None
) -> torch.Tensor:
    """Boolean tensor, True with probability ``p`` (resolution 2**-15).

    Draws 64 random bits per four positions (several times faster than ``torch.rand`` on CPU)
    and compares 15 of each 16 bits with the threshold.
    """
    n = int(np.prod(shape))
    bits = torch.empty((n + 3) // 4, dtype=torch.long, device=device).random_(generator=generator)
    return ((bits.view(torch.int16)[:n] & 0x7FFF) < round(p * 32768)).view(shape)


class Tokenizer:
    """Turn cells x genes matrices into token sequences for the model.

    Every sequence starts with ``<cls>`` (value 0) followed by gene tokens. Works on CPU and on
    CUDA tensors alike; collation is vectorised over the batch (no Python loop over cells or
    genes).

    Parameters
    ----------
    column_tokens
        ``(n_vars,)`` token id of each column of ``X`` (from :meth:`GeneVocab.map`); -1 drops
        the column. Columns sharing a token (duplicated genes) are summed into one token.
    vocab
        The vocabulary (pad/cls ids, genomic positions).
    mode
        ``"expressed"``: the non-zero genes of the mapped columns (scGPT/SC-MAMBA2 default);
        ``"full"``: every mapped column, zeros included; ``"genes"``: the fixed list ``genes``.
    max_len
        Maximum tokens per cell including ``<cls>``; ``None`` for no limit.
    subsample
        When a cell has more genes than ``max_len - 1``: keep a ``"random"`` subset
        (as the reference) or the ``"top"`` expressed genes (by raw value; ties by token id).
        The random subset ranks genes by a seeded hash of (cell, gene token), the cell known by
        its content (its genes and values), so a cell gets the same subset in any column order
        and in any batch. The hash's salt is ``seed`` when the tokenizer is seeded and called
        without a ``generator`` (the same subset on every call: deterministic embeddings), else
        drawn from the generator on each call (a new subset at each training step).
    gene_order
        ``"vocab"`` (token id order, the default: the same gene keeps the same relative place
        in every dataset, unlike the dataset's column order, and it needs no annotation),
        ``"genomic"`` (chromosome then start; needs positions in the vocabulary),
        ``"expression"`` (descending raw value, ties by column) or ``"random"``.
    genes
        For ``mode="genes"``: column indices of ``X``, or gene names (keys or symbols) looked up
        in ``vocab``. The set is fixed; the order inside sequences follows ``gene_order``.
    value_transform
        ``"bin"`` (per-cell quantile bins as floats, see :func:`quantile_bin`; quantiles over
        the cell's non-zero mapped columns), ``"log1p"`` (``log1p(x / total * 1e4)``, ``total``
        over all columns) or ``"raw"``.
    n_bins
        Bins for ``"bin"`` (bin 0 = zero).
    mask_ratio
        Probability that a gene position is masked (each independently, as BERT-style
        collators, resolution 2**-15); ``<cls>`` and padding are never masked.
    check_counts
        Raise when ``X`` holds NaN/inf, negative or non-integer values (pass ``False`` for
        normalised data).
    n_zero_genes
        Non-expressed genes drawn per cell (uniformly, without replacement) and returned as
        ``zero_genes``: the training negatives of the zero-probability head. They come from the
        mapped genes of ``X``'s columns (genes the data does not measure are unknown, not zero),
        leaving out every gene with a non-zero count in the cell (kept in its sequence or not)
        and every gene of its sequence.
    seed
        Seed of the tokenizer's own generator (masking, random subsets and orders); ``None``
        uses torch's global generator.

    Examples
    --------
    >>> tok = Tokenizer(vocab.map(adata), vocab, max_len=2048, mask_ratio=0.15, seed=0)
    >>> batch = tok(adata.X[:256])
    >>> batch["genes"].shape  # (256, longest sequence)
    """

    def __init__(
        self,
        column_tokens: np.ndarray | Sequence[int] | torch.Tensor,
        vocab: GeneVocab,
        mode: Literal["expressed", "full", "genes"] = "expressed",
        max_len: int | None = 2048,
        subsample: Literal["random", "top"] = "random",
        gene_order: Literal["vocab", "genomic", "expression", "random"] = "vocab",
        genes: Sequence[int] | Sequence[str] | np.ndarray | None = None,
        value_transform: Literal["bin", "log1p", "raw"] = "bin",
        n_bins: int = 51,
        mask_ratio: float = 0.0,
        check_counts: bool = True,
        n_zero_genes: int = 0,
        seed: int | None = None,
    ) -> None:
        for name, value, allowed in (
            ("mode", mode, MODES),
            ("subsample", subsample, ("random", "top")),
            ("gene_order", gene_order, GENE_ORDERS),
            ("value_transform", value_transform, VALUE_TRANSFORMS),
        ):
            if value not in allowed:
                raise ValueError(f"Unknown {name}={value!r}; choose one of {allowed}.")
        if max_len is not None and max_len < 2:
            raise ValueError(f"max_len must be >= 2 (<cls> + one gene) or None, got {max_len}.")
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}.")
        if n_bins < 2:
            raise ValueError(f"n_bins must be at least 2, got {n_bins}.")
        _check_n_zero_genes(n_zero_genes)
        ids = torch.as_tensor(np.asarray(column_tokens), dtype=torch.long).cpu()
        if ids.dim() != 1:
            raise ValueError("column_tokens must be a 1-D array with one token id per column of X.")
        mapped = ids[ids >= 0]
        if len(mapped) == 0:
            raise ValueError("No column of X maps to the vocabulary (all column_tokens are -1).")
        if int(mapped.max()) >= len(vocab):
            raise ValueError("column_tokens contains token ids outside the vocabulary.")
        if bool(torch.as_tensor(vocab.is_special)[mapped].any()):
            raise ValueError("column_tokens points columns at special tokens; map genes only.")
        self.column_tokens = ids
        ids, self._canonical = _first_columns(ids)
        self.vocab = vocab
        self.mode = mode
        self.max_len = max_len
        self.subsample = subsample
        self.gene_order = gene_order
        self.value_transform = value_transform
        self.n_bins = n_bins
        self.mask_ratio = mask_ratio
        self.check_counts = check_counts
        self.n_zero_genes = n_zero_genes
        self.seed = seed
        self._col_tokens = ids  # column_tokens with duplicated genes' later columns at -1
        # The genes zero genes are drawn from (sorted) and each column's place among them.
        self._pool = torch.unique(ids[ids >= 0])
        self._pool_index = torch.where(ids >= 0, torch.searchsorted(self._pool, ids), -1)
        self._tokens_monotone = bool((ids[ids >= 0].diff() > 0).all())
        self._generators: dict[str, torch.Generator] = {}

        # Sort key of each column for the fixed orders (token id or genomic rank).
        if gene_order == "genomic":
            if not vocab.has_positions:
                raise ValueError(
                    "gene_order='genomic' needs genomic positions in the vocabulary; add them "
                    "with vocab.annotate(gene_table) or choose gene_order='vocab'."
                )
            rank = torch.empty(len(vocab), dtype=torch.long)
            order = torch.as_tensor(vocab.genomic_order())
            rank[order] = torch.arange(len(order))
            self._col_key = torch.where(ids >= 0, rank[ids.clamp_min(0)], -1)
        else:
            self._col_key = ids.clone()
        self._all_mapped = bool((ids >= 0).all())
        # Whether the keys of the mapped columns increase with the column index.
        mapped_keys = self._col_key[ids >= 0]
        self._monotone = bool((mapped_keys[1:] > mapped_keys[:-1]).all())

        # Columns of the dense modes, in the fixed order (vocab order for expression/random).
        if mode == "expressed":
            if genes is not None:
                raise ValueError("genes= is only used with mode='genes'.")
            self._columns = None
        else:
            if mode == "full":
                cols = torch.nonzero(ids >= 0).flatten()
            else:
                cols = torch.sort(self._gene_columns(genes)).values
            if gene_order in ("vocab", "genomic"):
                cols = cols[torch.argsort(self._col_key[cols])]
            self._columns = cols  # base order; ties of "expression"/"top" keep column order
        self._cache: dict[torch.device, tuple[torch.Tensor, ...]] = {}

    @classmethod
    def from_vocab(cls, vocab: GeneVocab, **kwargs: Any) -> Tokenizer:
        """Tokenizer for matrices whose columns are the vocabulary's token ids.

        Corpora (:class:`~.CellCorpus`) yield such matrices (cells x ``len(vocab)``); special
        token columns are dropped.

        Parameters
        ----------
        vocab
            The vocabulary.
        **kwargs
            Other :class:`Tokenizer` arguments (``mode``, ``max_len``, ...).

        Returns
        -------
        The tokenizer.
        """
        column_tokens = np.where(vocab.is_special, -1, np.arange(len(vocab)))
        return cls(column_tokens, vocab, **kwargs)

    def _gene_columns(
        self, genes: Sequence[int] | Sequence[str] | np.ndarray | None
    ) -> torch.Tensor:
        """Column indices of the fixed gene list of ``mode="genes"``."""
        if genes is None or len(genes) == 0:
            raise ValueError("mode='genes' needs genes= (column indices or gene names).")
        arr = np.asarray(genes)
        if arr.dtype.kind in "iu":
            cols = torch.as_tensor(arr, dtype=torch.long)
            if int(cols.min()) < 0 or int(cols.max()) >= len(self._col_tokens):
                raise ValueError("genes= holds column indices outside X.")
        else:
            col_of_token = {int(t): j for j, t in enumerate(self._col_tokens.tolist()) if t >= 0}
            idx = []
            for name in arr.tolist():
                tok = self._token_of_name(str(name))
                if tok not in col_of_token:
                    raise ValueError(f"Gene {name!r} of genes= is not among the mapped columns.")
                idx.append(col_of_token[tok])
            cols = torch.as_tensor(idx, dtype=torch.long)
        if bool((self._col_tokens[cols] < 0).any()):
            raise ValueError("genes= holds columns that are not mapped to the vocabulary (-1).")
        if len(torch.unique(cols)) != len(cols):
            raise ValueError("genes= lists a gene more than once.")
        return cols

    def _token_of_name(self, name: str) -> int:
        if name in self.vocab:
            return self.vocab[name]
        ids, _ = self.vocab.map([name], min_fraction=0.0, warn_fraction=0.0, return_report=True)
        if ids[0] < 0:
            raise ValueError(f"Gene {name!r} of genes= is not in the vocabulary.")
        return int(ids[0])

    @property
    def gene_ids(self) -> torch.Tensor:
        """Deprecated name of :attr:`column_tokens`."""
        warnings.warn(
            "Tokenizer.gene_ids is renamed column_tokens.", DeprecationWarning, stacklevel=2
        )
        return self.column_tokens

    def __repr__(self) -> str:
        return (
            f"Tokenizer(mode={self.mode!r}, max_len={self.max_len}, subsample={self.subsample!r}, "
            f"gene_order={self.gene_order!r}, value_transform={self.value_transform!r}, "
            f"mask_ratio={self.mask_ratio})"
        )

    # ------------------------------------------------------------------ helpers
    def _device_tables(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        """Column tokens, column keys and dense-mode columns on ``device`` (cached)."""
        if device not in self._cache:
            cols = self._columns.to(device) if self._columns is not None else None
            self._cache[device] = (self._col_tokens.to(device), self._col_key.to(device), cols)
        return self._cache[device]

    def _pool_tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Zero-gene pool and each column's index in it on ``device`` (cached)."""
        key = ("pool", device)
        if key not in self._cache:
            self._cache[key] = (self._pool.to(device), self._pool_index.to(device))
        return self._cache[key]

    def _generator(
        self, device: torch.device, generator: torch.Generator | None
    ) -> torch.Generator | None:
        if generator is not None or self.seed is None:
            return generator
        if device.type not in self._generators:
            self._generators[device.type] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[device.type]

    def _merged(self, csr: _CSR) -> _CSR:
        """``csr`` with the columns of duplicated genes summed into the gene's first column."""
        return csr if self._canonical is None else _merge_duplicate_columns(csr, self._canonical)

    def _salt(self, gen: torch.Generator | None, explicit: torch.Generator | None) -> int:
        """Salt of the identity hash: ``seed`` for a seeded call without generator, else drawn."""
        if self.seed is not None and explicit is None:
            return self.seed & _M31
        return int(_random_keys(1, torch.device("cpu") if gen is None else gen.device, gen))

    def lengths(self, X: ArrayLike) -> np.ndarray:
        """Sequence length (``<cls>`` included) each cell of ``X`` will get.

        Parameters
        ----------
        X
            Cells x genes matrix.

        Returns
        -------
        ``np.ndarray`` of int64, shape ``(n_cells,)``; use with :func:`split_by_token_budget`.
        """
        if self._columns is not None:
            n = np.full(X.shape[0], len(self._columns) + 1, dtype=np.int64)
        elif self._canonical is None and sp.issparse(X) and _is_canonical_csr(X):
            # straight from the CSR arrays, no copy
            keep = X.data != 0
            if not self._all_mapped:
                keep &= self._col_tokens.numpy()[X.indices] >= 0
            if keep.all():
                n = np.diff(X.indptr).astype(np.int64) + 1
            else:
                kept = np.concatenate([[0], np.cumsum(keep)])
                n = kept[X.indptr[1:]] - kept[X.indptr[:-1]] + 1
        else:
            csr = self._merged(_to_csr(X))
            keep = (csr.val != 0) & (self._col_tokens[csr.col] >= 0)
            n = torch.bincount(csr.rows()[keep], minlength=csr.n_rows).numpy() + 1
        return n if self.max_len is None else np.minimum(n, self.max_len)

    # ------------------------------------------------------------------ main entry points
    def __call__(
        self,
        X: ArrayLike,
        mask_ratio: float | None = None,
        generator: torch.Generator | None = None,
        *,
        device: torch.device | str | None = None,
        n_zero_genes: int | None = None,
    ) -> dict[str, torch.Tensor]:
        """Tokenize a batch of cells into right-padded sequences.

        Parameters
        ----------
        X
            ``(b, n_vars)`` torch dense or sparse CSR tensor, scipy sparse matrix or numpy array.
        mask_ratio
            Override of the tokenizer's ``mask_ratio`` for this call.
        generator
            Random generator (on X's device) for masking and random subsets/orders; default:
            the tokenizer's seeded generator, else torch's global one.
        device
            Device of the outputs (default: X's device; CPU for scipy/numpy input).
        n_zero_genes
            Override of the tokenizer's ``n_zero_genes`` for this call.

        Returns
        -------
        Dictionary of tensors of shape ``(b, L)``, ``L`` the longest sequence (``<= max_len``):
        ``genes`` (int64 token ids; ``<cls>`` first, ``<pad>`` after the real tokens),
        ``values`` (float32 targets; ``<cls>`` 0, padding ``PAD_VALUE``), ``input_values``
        (``values`` with masked positions set to ``MASK_VALUE``), ``mask`` (bool, masked gene
        positions), ``key_padding_mask`` (bool, True at padding) and ``columns`` (int64 column
        of X of each token, -1 for ``<cls>``/padding); per cell, ``log_library`` ``(b,)``
        (``log1p`` of the cell's total count over all columns of X). With ``n_zero_genes`` k > 0
        also ``zero_genes`` ``(b, k)`` (token ids of non-expressed genes, ``<pad>`` where a cell
        has fewer than k), ``zero_padding_mask`` ``(b, k)`` (True at those ``<pad>``) and
        ``n_zero_candidates`` ``(b,)`` (how many genes they were drawn from: the weight of the
        sample in an estimate over all of the cell's zeros).
        """
        csr = _to_csr(X, device)
        if csr.n_cols != len(self._col_tokens):
            raise ValueError(
                f"X has {csr.n_cols} columns but the tokenizer was built for "
                f"{len(self._col_tokens)} (column_tokens); build it from vocab.map() of the same "
                "data."
            )
        csr = self._merged(csr)
        dev = csr.val.device
        gen = self._generator(dev, generator)
        ratio = self.mask_ratio if mask_ratio is None else mask_ratio
        if not 0.0 <= ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {ratio}.")
        if self.check_counts:
            _check_count_values(csr.val)
        col_tokens, col_key, columns = self._device_tables(dev)
        all_rows = csr.rows()
        tokens = col_tokens[csr.col]
        keep = csr.val != 0
        if not self._all_mapped:
            keep &= tokens >= 0
        if bool(keep.all()):
            row, col, raw = all_rows, csr.col, csr.val
        else:
            sel = torch.nonzero(keep).flatten()
            row, col, raw, tokens = all_rows[sel], csr.col[sel], csr.val[sel], tokens[sel]
        integral = self.value_transform == "bin" and (self.check_counts or _is_integral(raw))
        totals = _row_totals(csr, all_rows) if self.value_transform == "log1p" else None
        tval = _transform(row, raw, csr.n_rows, self.value_transform, self.n_bins, integral, totals)
        if columns is None:
            out = self._expressed(csr, row, col, tokens, raw, tval, col_key, gen, generator)
        else:
            out = self._dense(csr, row, col, raw, tval, col_tokens, columns, gen, generator)
        self._apply_mask(out, ratio, gen)
        out["log_library"] = torch.log1p(_row_totals(csr, all_rows))
        k = self.n_zero_genes if n_zero_genes is None else n_zero_genes
        _check_n_zero_genes(k)
        if k > 0:
            # Expressed sequences hold only expressed genes: the entries alone are excluded,
            # already sorted by (cell, pool index) when columns follow the token order.
            only_entries = columns is None
            in_order = only_entries and self._tokens_monotone and csr.sorted_cols
            zero = self._zero_genes(csr.n_rows, row, col, out, k, gen, only_entries, in_order)
            out["zero_genes"], out["zero_padding_mask"], out["n_zero_candidates"] = zero
        return out

    def _zero_genes(
        self,
        n_rows: int,
        row: torch.Tensor,
        col: torch.Tensor,
        out: dict[str, torch.Tensor],
        k: int,
        gen: torch.Generator | None,
        only_entries: bool = False,
        in_order: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``k`` genes of the pool per cell, neither expressed nor in its sequence.

        ``row``/``col`` are the cell's non-zero mapped entries. Candidates are counted per cell;
        ``k`` distinct candidate ranks are drawn (Floyd's algorithm, vectorised over cells) and
        the rank-``j`` candidate is found from the sorted excluded pool indices ``e_i``: it is
        ``j + #{i : e_i - i <= j}``.
        """
        dev = row.device
        pool, pool_index = self._pool_tables(dev)
        n_pool = len(pool)
        ex_row, ex_pos = row, pool_index[col]
        if not only_entries:
            seq_cols = out["columns"]
            in_seq = seq_cols >= 0
            ex_row = torch.cat([ex_row, torch.nonzero(in_seq)[:, 0]])
            ex_pos = torch.cat([ex_pos, pool_index[seq_cols[in_seq]]])
        key = ex_row * n_pool + ex_pos
        if not in_order:
            key = torch.unique(key)  # sorted: by cell, then pool index
            ex_row, ex_pos = key // n_pool, key % n_pool
        n_ex = torch.bincount(ex_row, minlength=n_rows)
        start = torch.cumsum(n_ex, 0) - n_ex
        rank_in_row = torch.arange(len(key), device=dev) - torch.repeat_interleave(start, n_ex)
        gap = ex_row * (n_pool + 1) + ex_pos - rank_in_row  # sorted; rows apart
        n_cand = n_pool - n_ex
        # Floyd: for j = n-k .. n-1 draw t in [0, j]; take t unless already taken, else j.
        n_eff = n_cand.clamp(min=k).unsqueeze(1)
        u = torch.rand((n_rows, k), generator=gen, device=dev, dtype=torch.float64)
        taken = torch.empty((n_rows, k), dtype=torch.long, device=dev)
        for i in range(k):
            j = n_eff[:, 0] - k + i
            t = (u[:, i] * (j + 1).double()).long().clamp(max=j)
            seen = (taken[:, :i] == t.unsqueeze(1)).any(1)
            taken[:, i] = torch.where(seen, j, t)
        slot = torch.arange(k, device=dev).expand(n_rows, k)
        few = (n_cand < k).unsqueeze(1)
        ranks = torch.where(few, slot, taken)
        valid = slot < n_cand.unsqueeze(1)
        query = torch.arange(n_rows, device=dev).unsqueeze(1) * (n_pool + 1) + ranks
        before = torch.searchsorted(gap, query, right=True) - start.unsqueeze(1)
        pos = (ranks + before).clamp(max=n_pool - 1)
        genes = torch.where(valid, pool[pos], self.vocab.pad_id)
        return genes, ~valid, n_cand

    def pack(
        self,
        X: ArrayLike,
        mask_ratio: float | None = None,
        generator: torch.Generator | None = None,
        *,
        device: torch.device | str | None = None,
        n_zero_genes: int | None = None,
    ) -> dict[str, torch.Tensor]:
        """Tokenize a batch into one packed sequence (no padding), for varlen kernels.

        Parameters
        ----------
        X, mask_ratio, generator, device, n_zero_genes
            As in :meth:`__call__`.

        Returns
        -------
        The per-token keys of :meth:`__call__` with shape ``(1, T)`` (cells concatenated, ``T``
        the total number of tokens; ``key_padding_mask`` is all False), its per-cell keys
        (``log_library``, ``zero_genes``, ...) as they are, plus ``seq_idx``
        ``(1, T)`` int32 (cell index of each token) and ``cu_seqlens`` ``(b + 1,)`` int32 (cell
        boundaries). Given the same generator state the tokens equal the real tokens of
        :meth:`__call__`.
        """
        padded = self(X, mask_ratio, generator, device=device, n_zero_genes=n_zero_genes)
        real = ~padded["key_padding_mask"]
        out = {k: v if k in _PER_CELL else v[real].unsqueeze(0) for k, v in padded.items()}
        lengths = real.sum(1)
        rows = torch.arange(len(lengths), device=real.device, dtype=torch.int32)
        out["seq_idx"] = torch.repeat_interleave(rows, lengths).unsqueeze(0)
        cu = torch.zeros(len(lengths) + 1, dtype=torch.int32, device=real.device)
        cu[1:] = torch.cumsum(lengths, 0)
        out["cu_seqlens"] = cu
        return out

    # ------------------------------------------------------------------ pipelines
    def _expressed(
        self,
        csr: _CSR,
        row: torch.Tensor,
        col: torch.Tensor,
        tokens: torch.Tensor,
        raw: torch.Tensor,
        tval: torch.Tensor,
        col_key: torch.Tensor,
        gen: torch.Generator | None,
        explicit: torch.Generator | None,
    ) -> dict[str, torch.Tensor]:
        """Sequences of the non-zero mapped entries (``row`` sorted, CSR order).

        Each entry's destination is ``row * L + rank + 1`` with ``rank`` its place in the row in
        the requested order. Entries of rows longer than ``max_len - 1`` that are not kept go
        to a trash slot past the outputs, so subsampling only touches the long rows.
        """
        dev, n_rows, n = row.device, csr.n_rows, len(row)
        counts = torch.bincount(row, minlength=n_rows)
        start = torch.cumsum(counts, 0) - counts
        idx = torch.arange(n, device=dev)

        def per_entry(per_row: torch.Tensor) -> torch.Tensor:
            # per_row[row], faster than a gather because rows are contiguous
            return torch.repeat_interleave(per_row, counts, output_size=n)

        rank = None  # None: entries are already in output order, rank = idx - start[row]
        if self.gene_order in ("vocab", "genomic"):
            if not (self._monotone and csr.sorted_cols):
                key = col_key[col]
                new_row = row[1:] != row[:-1]
                if n > 1 and not bool(((key[1:] > key[:-1]) | new_row).all()):
                    rank = self._rank_by(row, key, idx - per_entry(start))
        elif self.gene_order == "expression":
            rank = self._rank_by(row, _KEY_MAX - _float_key(raw), idx - per_entry(start))
        else:
            rank = self._rank_by(row, _random_keys(n, dev, gen), idx - per_entry(start))
        cap = n if self.max_len is None else self.max_len - 1
        longest = int(counts.max()) if n else 0
        length = min(longest, cap) + 1
        if rank is None:
            dest = idx + per_entry(torch.arange(n_rows, device=dev) * length - start + 1)
        else:
            dest = row * length + rank + 1
        trash = longest > cap
        if trash:
            salt = self._salt(gen, explicit) if self.subsample == "random" else 0
            sub, new_rank = self._subsample(row, tokens, raw, rank, counts, start, cap, salt)
            dest[sub] = torch.where(
                new_rank >= 0, row[sub] * length + new_rank + 1, n_rows * length
            )
            counts = counts.clamp(max=cap)
        size = n_rows * length
        genes = torch.full((size + trash,), self.vocab.pad_id, dtype=torch.long, device=dev)
        values = torch.full((size + trash,), PAD_VALUE, dtype=torch.float32, device=dev)
        columns = torch.full((size + trash,), -1, dtype=torch.long, device=dev)
        genes[dest] = tokens
        values[dest] = tval
        columns[dest] = col
        genes, values, columns = (t[:size].view(n_rows, length) for t in (genes, values, columns))
        genes[:, 0] = self.vocab.cls_id
        values[:, 0] = 0.0
        kpm = torch.arange(length, device=dev).unsqueeze(0) > counts.unsqueeze(1)
        return {"genes": genes, "values": values, "key_padding_mask": kpm, "columns": columns}

    @staticmethod
    def _rank_by(row: torch.Tensor, key: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """Rank of each entry inside its row when sorted by ``key`` (ties: input order)."""
        perm = _sort_within_rows(row, key)
        return torch.empty_like(position).index_put_((perm,), position)

    def _subsample(
        self,
        row: torch.Tensor,
        tokens: torch.Tensor,
        raw: torch.Tensor,
        rank: torch.Tensor | None,
        counts: torch.Tensor,
        start: torch.Tensor,
        cap: int,
        salt: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keep ``cap`` entries of each longer row.

        Returns the entries of the long rows and their rank among the kept entries of their
        row in output order (-1: dropped).
        """
        dev = row.device
        long_rows = torch.nonzero(counts > cap).flatten()
        seg = counts[long_rows]
        seg_start = torch.cumsum(seg, 0) - seg
        offset = torch.repeat_interleave(start[long_rows] - seg_start, seg)
        position = torch.arange(len(offset), device=dev)
        sub = offset + position  # entries of the long rows, in CSR order
        r = row[sub]
        # Sorting keeps the row segments in place, so position - seg_start = rank in the row.
        in_row = position - torch.repeat_interleave(seg_start, seg)
        tok = tokens[sub]
        # Priorities and ties depend on gene tokens, not on column positions.
        by_token = _sort_within_rows(r, tok)
        if self.subsample == "random":
            cell = _cell_keys(r, tok, raw[sub], len(counts))
            prio = _identity_keys(cell[r], tok, salt)
        else:  # "top": descending raw value, ties by token id
            prio = _KEY_MAX - _float_key(raw[sub])
        chosen = torch.empty(len(sub), dtype=torch.bool, device=dev)
        chosen[by_token[_sort_within_rows(r[by_token], prio[by_token])]] = in_row < cap
        # New rank: number of chosen entries of the row that come earlier in the output order.
        order = in_row if rank is None else rank[sub]
        by_rank = _sort_within_rows(r, order)
        flag = chosen[by_rank].long()
        csum = torch.cumsum(flag, 0)  # row segments keep their place in sorted order
        before = torch.where(seg_start > 0, csum[(seg_start - 1).clamp_min(0)], 0)
        kept_rank = csum - 1 - torch.repeat_interleave(before, seg)
        new_rank = torch.empty_like(sub)
        new_rank[by_rank] = torch.where(flag.bool(), kept_rank, -1)
        return sub, new_rank

    def _dense(
        self,
        csr: _CSR,
        row: torch.Tensor,
        col: torch.Tensor,
        raw: torch.Tensor,
        tval: torch.Tensor,
        col_tokens: torch.Tensor,
        columns: torch.Tensor,
        gen: torch.Generator | None,
        explicit: torch.Generator | None,
    ) -> dict[str, torch.Tensor]:
        """Sequences over a fixed column set (``full``/``genes`` modes), zeros included."""
        dev = row.device
        b, n = csr.n_rows, len(columns)
        where = torch.full((csr.n_cols,), -1, dtype=torch.long, device=dev)
        where[columns] = torch.arange(n, device=dev)
        j = where[col]
        inside = j >= 0
        row, j, raw, tval = row[inside], j[inside], raw[inside], tval[inside]
        subsampled = self.max_len is not None and n > self.max_len - 1
        genes = torch.empty((b, 1), dtype=torch.long, device=dev).fill_(self.vocab.cls_id)
        minus_one = torch.full((b, 1), -1, dtype=torch.long, device=dev)
        if not subsampled and self.gene_order in ("vocab", "genomic"):
            # Same columns in the same order for every cell: no gathers needed.
            values = torch.zeros((b, n + 1), dtype=torch.float32, device=dev)
            values.view(-1)[row * (n + 1) + j + 1] = tval
            kpm = torch.zeros((b, n + 1), dtype=torch.bool, device=dev)
            return {
                "genes": torch.cat([genes, col_tokens[columns].expand(b, n)], 1),
                "values": values,
                "key_padding_mask": kpm,
                "columns": torch.cat([minus_one, columns.expand(b, n)], 1),
            }
        flat = row * n + j
        vals = torch.zeros(b * n, dtype=torch.float32, device=dev)
        vals[flat] = tval
        vals = vals.view(b, n)
        raws = None
        if self.gene_order == "expression" or (subsampled and self.subsample == "top"):
            raws = torch.zeros(b * n, dtype=torch.float32, device=dev)
            raws[flat] = raw
            raws = raws.view(b, n)
        idx = torch.arange(n, device=dev).expand(b, n)
        if subsampled:
            cap = self.max_len - 1
            col_tok = col_tokens[columns]
            by_tok = torch.argsort(col_tok)  # ties by token id: independent of column order
            if self.subsample == "random":
                cell = _cell_keys(row, col_tok[j], raw, b)
                prio = _identity_keys(cell[:, None], col_tok[None, :], self._salt(gen, explicit))
                top = torch.sort(prio[:, by_tok], dim=1, descending=True, stable=True)
            else:  # top raw values
                top = torch.sort(raws[:, by_tok], dim=1, descending=True, stable=True)
            idx = by_tok[top.indices[:, :cap]]
            idx = torch.sort(idx, dim=1).values
        if self.gene_order == "expression":
            r = torch.gather(raws, 1, idx)
            idx = torch.gather(idx, 1, torch.sort(r, dim=1, descending=True, stable=True).indices)
        elif self.gene_order == "random":
            shuffle = torch.argsort(_random_keys(idx.numel(), dev, gen).view(idx.shape), dim=1)
            idx = torch.gather(idx, 1, shuffle)
        cols = columns[idx]
        zero = torch.zeros((b, 1), dtype=torch.float32, device=dev)
        return {
            "genes": torch.cat([genes, col_tokens[cols]], 1),
            "values": torch.cat([zero, torch.gather(vals, 1, idx)], 1),
            "key_padding_mask": torch.zeros((b, idx.shape[1] + 1), dtype=torch.bool, device=dev),
            "columns": torch.cat([minus_one, cols], 1),
        }

    def _apply_mask(
        self, out: dict[str, torch.Tensor], ratio: float, gen: torch.Generator | None
    ) -> None:
        """Add ``mask`` and ``input_values`` to ``out`` (Bernoulli per gene position)."""
        values = out["values"]
        if ratio > 0:
            mask = _bernoulli(tuple(values.shape), ratio, values.device, gen)
            mask &= ~out["key_padding_mask"]
            mask[:, 0] = False
            out["input_values"] = values.masked_fill(mask, MASK_VALUE)
        else:
            mask = torch.zeros(values.shape, dtype=torch.bool, device=values.device)
            out["input_values"] = values.clone()
        out["mask"] = mask


def _check_n_zero_genes(k: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 0:
        raise ValueError(f"n_zero_genes must be a non-negative integer, got {k!r}.")


def split_by_token_budget(
    lengths: np.ndarray | Sequence[int] | torch.Tensor,
    max_tokens: int,
    *,
    padded: bool = True,
) -> list[np.ndarray]:
    """Split cells, in order, into batches whose token count stays within a budget.

    Parameters
    ----------
    lengths
        Sequence length of each cell (e.g. :meth:`Tokenizer.lengths`).
    max_tokens
        Token budget per batch.
    padded
        Count a batch as ``n_cells * longest`` (padded batches, the default) or as the sum of
        lengths (packed batches).

    Returns
    -------
    List of index arrays (int64) covering every cell once, in order.
    """
    lens = np.asarray(torch.as_tensor(lengths).cpu(), dtype=np.int64)
    if len(lens) and int(lens.max()) > max_tokens:
        raise ValueError(
            f"A cell has {int(lens.max())} tokens, more than max_tokens={max_tokens}; raise "
            "max_tokens to at least the tokenizer's max_len."
        )
    batches: list[np.ndarray] = []
    start, longest, total = 0, 0, 0
    for i, n in enumerate(lens.tolist()):
        new_longest, new_total = max(longest, n), total + n
        cost = (i - start + 1) * new_longest if padded else new_total
        if cost > max_tokens and i > start:
            batches.append(np.arange(start, i))
            start, new_longest, new_total = i, n, n
        longest, total = new_longest, new_total
    if start < len(lens):
        batches.append(np.arange(start, len(lens)))
    return batches
