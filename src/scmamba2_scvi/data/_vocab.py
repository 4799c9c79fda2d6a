"""Gene vocabulary: stable gene keys, symbols, genomic positions and special tokens."""

from __future__ import annotations

import json
import logging
import re
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from os import PathLike
from typing import Any

import numpy as np
import pandas as pd
from anndata import AnnData

__all__ = ["SPECIAL_TOKENS", "GeneVocab", "MappingReport", "strip_ensembl_version"]

logger = logging.getLogger(__name__)

#: Special tokens present in every vocabulary, with ids 0, 1, 2.
SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<cls>", "<mask>")

_ENSEMBL_RE = re.compile(r"^(ENS[A-Z]*G\d{11})(?:\.\d+)?(_PAR_Y)?$")
_SYMBOL_COLUMNS = (
    "gene_symbol",
    "gene_symbols",
    "gene_name",
    "gene_names",
    "feature_name",
    "symbol",
    "symbols",
)
_ID_COLUMNS = ("gene_id", "gene_ids", "ensembl_id", "ensembl_gene_id", "feature_id")
_FORMAT_VERSION = 1


def strip_ensembl_version(name: str) -> str | None:
    """Return the Ensembl gene ID of ``name`` without its version, or ``None``.

    Parameters
    ----------
    name
        A gene identifier, e.g. ``"ENSG00000141510.18"`` or ``"TP53"``.

    Returns
    -------
    The unversioned ID (``"ENSG00000141510"``; a ``_PAR_Y`` suffix is kept because it
    names a distinct gene copy) or ``None`` when ``name`` is not an Ensembl gene ID.
    """
    match = _ENSEMBL_RE.match(str(name).strip())
    if match is None:
        return None
    return match.group(1) + (match.group(2) or "")


def _clean(value: Any) -> str | None:
    """Return ``value`` as a stripped string, or ``None`` for missing/empty values."""
    if value is None or (isinstance(value, float) and np.isnan(value)) or value is pd.NA:
        return None
    text = str(value).strip()
    return text if text and text.lower() not in ("nan", "none") else None


def _chrom_sort_key(chrom: str) -> tuple[int, int, str]:
    """Natural chromosome order: 1..22 (or any number), X, Y, M/MT, then others by name."""
    name = chrom[3:] if chrom.lower().startswith("chr") else chrom
    if name.isdigit():
        return (0, int(name), "")
    rank = {"X": 1, "Y": 2, "M": 3, "MT": 3}.get(name.upper())
    return (1, rank, "") if rank is not None else (2, 0, name)


def _var_table(data: AnnData | pd.DataFrame | Sequence[str]) -> pd.DataFrame:
    """Return a ``var``-like table from an AnnData, a DataFrame or a list of names."""
    if isinstance(data, AnnData):
        return data.var
    if isinstance(data, pd.DataFrame):
        return data
    if isinstance(data, str):
        raise TypeError("Expected an AnnData, a var DataFrame or a sequence of gene names.")
    return pd.DataFrame(index=pd.Index([str(x) for x in data]))


def _resolve_genes(
    var: pd.DataFrame, gene_key: str | None, symbol_key: str | None
) -> tuple[list[str | None], list[str | None], list[str | None]]:
    """Return the key, unversioned Ensembl ID and symbol (or ``None``) of every row of ``var``.

    ``gene_key`` names the column holding IDs or symbols (default: the index). Rows whose key is
    no Ensembl ID take their ID from the index or a recognised ID column (``gene_ids``,
    ``feature_id``, ...) when one holds it. Symbols come from ``symbol_key`` or a recognised
    symbol column, else from the keys that are not Ensembl IDs.
    """
    if gene_key is not None and gene_key not in var.columns:
        raise KeyError(
            f"gene_key={gene_key!r} is not a column of var (columns: {list(var.columns)}); "
            "pass one of these or gene_key=None to use var_names."
        )
    if symbol_key is not None and symbol_key not in var.columns:
        raise KeyError(
            f"symbol_key={symbol_key!r} is not a column of var (columns: {list(var.columns)})."
        )
    keys = [_clean(k) for k in (var[gene_key] if gene_key is not None else var.index)]
    ids = [strip_ensembl_version(k) if k is not None else None for k in keys]
    # IDs anywhere in var are used, also when gene_key names a symbol column: the index first,
    # then a recognised ID column, for every row whose key is no Ensembl ID.
    sources = [var.index] if gene_key is not None else []
    sources += [var[c] for c in _ID_COLUMNS if c in var.columns and c != gene_key]
    for source in sources:
        if all(ids):
            break
        col_ids = [strip_ensembl_version(v) if _clean(v) else None for v in source]
        ids = [i if i is not None else c for i, c in zip(ids, col_ids)]
    if symbol_key is None:
        symbol_key = next((c for c in _SYMBOL_COLUMNS if c in var.columns and c != gene_key), None)
    if symbol_key is not None:
        symbols = [_clean(s) for s in var[symbol_key]]
    else:
        symbols = [None] * len(keys)
    symbols = [
        s if s is not None else (k if strip_ensembl_version(k or "") is None else None)
        for s, k in zip(symbols, keys)
    ]
    return keys, ids, symbols


@dataclass
class MappingReport:
    """How the columns of a dataset matched a :class:`~scmamba2_scvi.data.GeneVocab`.

    Both sides are measured: how many of the dataset's columns map (``matched_fraction``), and
    how much of the vocabulary the dataset holds (``coverage``). A superset of the vocabulary
    has a low ``matched_fraction`` but full ``coverage``; a small subset the reverse.

    Attributes
    ----------
    n_genes
        Number of columns in the dataset.
    n_matched
        Columns that received a token id (duplicates included).
    n_by_id
        Matched by unversioned Ensembl ID (or by exact key for symbol-keyed vocabularies).
    n_by_symbol
        Matched by gene symbol (case-insensitive) after the ID lookup failed.
    duplicates
        Names of columns that map to a token an earlier column already has; their counts are
        summed into one token by :class:`~scmamba2_scvi.data.Tokenizer`.
    n_unmatched
        Columns without a vocabulary entry.
    unmatched
        Up to 20 example names of unmatched columns.
    n_vocab_genes
        Gene tokens of the vocabulary.
    n_vocab_present
        Vocabulary genes the dataset holds.
    coverage
        Share of the vocabulary the dataset holds: weighted by how often each gene is expressed
        in the vocabulary's training data when the vocabulary records it
        (:meth:`GeneVocab.record_expression`), else the plain fraction
        ``n_vocab_present / n_vocab_genes``.
    coverage_weighted
        Whether ``coverage`` is expression-weighted.
    """

    n_genes: int
    n_matched: int
    n_by_id: int
    n_by_symbol: int
    duplicates: list[str] = field(default_factory=list)
    n_unmatched: int = 0
    unmatched: list[str] = field(default_factory=list)
    n_vocab_genes: int = 0
    n_vocab_present: int = 0
    coverage: float = 0.0
    coverage_weighted: bool = False

    @property
    def matched_fraction(self) -> float:
        """Fraction of the dataset's columns that received a token id."""
        return self.n_matched / self.n_genes if self.n_genes else 0.0

    def __str__(self) -> str:
        weighted = "expression-weighted " if self.coverage_weighted else ""
        lines = [
            f"Gene mapping: {self.n_matched}/{self.n_genes} columns matched "
            f"({100 * self.matched_fraction:.1f}%): {self.n_by_id} by ID, "
            f"{self.n_by_symbol} by symbol.",
            f"Vocabulary coverage: {self.n_vocab_present}/{self.n_vocab_genes} vocabulary genes "
            f"present ({100 * self.coverage:.1f}% {weighted}coverage).",
        ]
        if self.duplicates:
            shown = ", ".join(self.duplicates[:10])
            more = "" if len(self.duplicates) <= 10 else ", ..."
            lines.append(
                f"{len(self.duplicates)} duplicated column(s), counts summed into the first: "
                f"{shown}{more}"
            )
        if self.n_unmatched:
            lines.append(
                f"{self.n_unmatched} unmatched column(s), e.g. {', '.join(self.unmatched[:10])}"
            )
        return "\n".join(lines)


def _check_report(
    report: MappingReport, min_fraction: float, warn_fraction: float, min_coverage: float
) -> None:
    """Raise or warn for a mapping whose matched fraction or coverage is too low."""
    frac = report.matched_fraction
    fix = (
        "Check that gene_key/symbol_key name the var columns holding Ensembl IDs or symbols and "
        "that the species matches"
    )
    if frac < min_fraction:
        raise ValueError(
            f"Only {100 * frac:.1f}% of the {report.n_genes} genes match the vocabulary "
            f"(min_fraction={min_fraction}).\n{report}\n{fix}; or lower min_fraction if this is "
            "intended."
        )
    if report.coverage < min_coverage:
        weighted = "expression-weighted " if report.coverage_weighted else ""
        raise ValueError(
            f"The data hold only {report.n_vocab_present} of the vocabulary's "
            f"{report.n_vocab_genes} genes ({100 * report.coverage:.1f}% {weighted}coverage, "
            f"below min_gene_fraction={min_coverage}): the model would read these cells with "
            f"most of its genes missing.\n{report}\n{fix}; or pass a lower min_gene_fraction if "
            "this is intended."
        )
    if frac < warn_fraction:
        warnings.warn(
            f"Only {100 * frac:.1f}% of the genes match the vocabulary; unmatched genes are "
            f"dropped.\n{report}",
            UserWarning,
            stacklevel=3,
        )
    if report.duplicates:
        warnings.warn(
            f"{len(report.duplicates)} column(s) name a gene an earlier column already has "
            f"(e.g. {', '.join(report.duplicates[:5])}); their counts are summed into one token. "
            "Rename or drop them first if they are different genes.",
            UserWarning,
            stacklevel=3,
        )


class GeneVocab:
    """Token vocabulary of genes plus special tokens.

    Ids 0, 1, 2 are ``<pad>``, ``<cls>`` and ``<mask>``; further special tokens (e.g. batch or
    condition tokens) can be appended with :meth:`add_special`. Each gene is keyed by a stable
    key: its Ensembl ID without version when one is known, otherwise its symbol. The symbol and
    an optional genomic position (chromosome, start) are kept beside the key.

    Parameters
    ----------
    genes
        Optional gene keys to add in order (symbols and positions can follow with
        :meth:`annotate`).

    Examples
    --------
    >>> vocab = GeneVocab.from_anndata(adata)
    >>> column_tokens = vocab.map(adata)  # token id per column, -1 when absent
    """

    def __init__(self, genes: Iterable[str] | None = None) -> None:
        self._reset()
        for name in SPECIAL_TOKENS:
            self.add_special(name)
        for gene in genes or ():
            self.add_gene(gene)

    def _reset(self) -> None:
        self._tokens: list[str] = []
        self._symbols: list[str | None] = []
        self._chroms: list[str | None] = []
        self._starts: list[int | None] = []
        self._special: list[bool] = []
        self._frequency: list[float | None] = []
        self._index: dict[str, int] = {}
        self._symbol_index: dict[str, int] = {}
        self.last_report: MappingReport | None = None

    # ------------------------------------------------------------------ building
    def add_special(self, name: str) -> int:
        """Add a special token (e.g. ``"<batch:A>"``) and return its id.

        Parameters
        ----------
        name
            Token name; must not collide with an existing token.

        Returns
        -------
        The token id (existing id when ``name`` is already a special token).
        """
        if name in self._index:
            if self._special[self._index[name]]:
                return self._index[name]
            raise ValueError(f"{name!r} is already a gene key; choose another special token name.")
        return self._append(name, None, None, None, special=True)

    def add_gene(
        self,
        key: str,
        symbol: str | None = None,
        chromosome: str | None = None,
        start: int | None = None,
    ) -> int:
        """Add a gene (or complete an existing one) and return its token id.

        Parameters
        ----------
        key
            Stable key: an Ensembl ID (its version is stripped) or, failing that, a symbol.
        symbol
            Gene symbol kept beside the key (defaults to ``key`` when ``key`` is no Ensembl ID).
        chromosome, start
            Optional genomic position.

        Returns
        -------
        The token id of the gene. Adding an existing key fills its missing symbol/position.
        """
        key = _clean(key)
        if key is None:
            raise ValueError("Gene keys must be non-empty strings.")
        ens = strip_ensembl_version(key)
        if ens is None and symbol is None:
            symbol = key
        key = ens or key
        symbol, chromosome = _clean(symbol), _clean(chromosome)
        start_int = None if start is None or pd.isna(start) else int(start)
        idx = self._index.get(key)
        if idx is None:
            return self._append(key, symbol, chromosome, start_int, special=False)
        if self._special[idx]:
            raise ValueError(f"{key!r} is a special token and cannot be used as a gene key.")
        if self._symbols[idx] is None and symbol is not None:
            self._symbols[idx] = symbol
            self._symbol_index.setdefault(symbol.upper(), idx)
        if self._chroms[idx] is None and chromosome is not None:
            self._chroms[idx], self._starts[idx] = chromosome, start_int
        return idx

    def _append(
        self,
        key: str,
        symbol: str | None,
        chromosome: str | None,
        start: int | None,
        *,
        special: bool,
    ) -> int:
        idx = len(self._tokens)
        self._tokens.append(key)
        self._symbols.append(symbol)
        self._chroms.append(chromosome)
        self._starts.append(start)
        self._special.append(special)
        self._frequency.append(None)
        self._index[key] = idx
        if symbol is not None:
            self._symbol_index.setdefault(symbol.upper(), idx)
        return idx

    @classmethod
    def from_anndata(
        cls,
        adata: AnnData | pd.DataFrame | Sequence[str] | Sequence[AnnData | pd.DataFrame],
        gene_key: str | None = None,
        *,
        symbol_key: str | None = None,
    ) -> GeneVocab:
        """Build a vocabulary from the union of one or several ``var`` tables.

        Parameters
        ----------
        adata
            An AnnData, a ``var`` DataFrame, a list of gene names, or a list of AnnData/var
            tables (genes are united in order of first appearance).
        gene_key
            ``var`` column holding gene IDs or symbols; default: ``var_names``. When these are
            not Ensembl IDs, a ``gene_ids``/``feature_id``-like column supplies IDs if present.
        symbol_key
            ``var`` column with symbols; default: the first of ``gene_symbol``, ``gene_name``,
            ``feature_name``, ``symbol`` (and plurals) that exists.

        Returns
        -------
        The vocabulary. ``chromosome`` and ``start`` columns, when present, give positions.
        """
        vocab = cls()
        is_list = isinstance(adata, list | tuple) and not all(isinstance(x, str) for x in adata)
        tables = list(adata) if is_list else [adata]
        for item in tables:
            var = _var_table(item)
            _, ids, symbols = _resolve_genes(var, gene_key, symbol_key)
            chroms = var["chromosome"] if "chromosome" in var.columns else [None] * len(var)
            starts = var["start"] if "start" in var.columns else [None] * len(var)
            for gid, sym, chrom, start in zip(ids, symbols, chroms, starts):
                if gid is None and sym is None:
                    continue
                vocab.add_gene(gid or sym, sym, _clean(chrom), start)
        return vocab

    @classmethod
    def from_gene_table(cls, table: pd.DataFrame) -> GeneVocab:
        """Build a vocabulary from a GENCODE-style table.

        Parameters
        ----------
        table
            Columns ``gene_id`` (Ensembl, versioned or not) and ``gene_name``; optional
            ``chromosome`` and ``start``. Rows keep their order; repeated IDs are merged.

        Returns
        -------
        The vocabulary, with positions when the table has them.
        """
        missing = {"gene_id", "gene_name"} - set(table.columns)
        if missing:
            raise KeyError(
                f"The gene table lacks column(s) {sorted(missing)}; expected gene_id, gene_name "
                "and optionally chromosome, start (e.g. a GENCODE export)."
            )
        vocab = cls()
        chroms = table["chromosome"] if "chromosome" in table.columns else [None] * len(table)
        starts = table["start"] if "start" in table.columns else [None] * len(table)
        for gid, sym, chrom, start in zip(table["gene_id"], table["gene_name"], chroms, starts):
            if _clean(gid) is not None:
                vocab.add_gene(gid, _clean(sym), _clean(chrom), start)
        return vocab

    def annotate(self, table: pd.DataFrame, *, overwrite: bool = False) -> int:
        """Add symbols and genomic positions from a GENCODE-style table.

        Genes are matched by unversioned Ensembl ID; symbol-keyed genes are matched by symbol
        (case-insensitive, first table row wins).

        Parameters
        ----------
        table
            Columns ``gene_id``, ``gene_name``, ``chromosome``, ``start``.
        overwrite
            Replace existing symbols/positions instead of only filling missing ones.

        Returns
        -------
        Number of vocabulary genes that matched a table row.
        """
        missing = {"gene_id", "gene_name", "chromosome", "start"} - set(table.columns)
        if missing:
            raise KeyError(
                f"The gene table lacks column(s) {sorted(missing)}; expected gene_id, gene_name, "
                "chromosome, start (e.g. a GENCODE export)."
            )
        by_id: dict[str, tuple[str | None, str | None, Any]] = {}
        by_symbol: dict[str, tuple[str | None, str | None, Any]] = {}
        for gid, sym, chrom, start in zip(
            table["gene_id"], table["gene_name"], table["chromosome"], table["start"]
        ):
            row = (_clean(sym), _clean(chrom), start)
            ens = strip_ensembl_version(_clean(gid) or "")
            if ens is not None:
                by_id.setdefault(ens, row)
            if row[0] is not None:
                by_symbol.setdefault(row[0].upper(), row)
        n = 0
        for idx, key in enumerate(self._tokens):
            if self._special[idx]:
                continue
            if strip_ensembl_version(key) is not None:
                row = by_id.get(key)
            else:
                row = by_symbol.get((self._symbols[idx] or key).upper())
            if row is None:
                continue
            n += 1
            sym, chrom, start = row
            if sym is not None and (overwrite or self._symbols[idx] is None):
                self._symbols[idx] = sym
                self._symbol_index.setdefault(sym.upper(), idx)
            if chrom is not None and (overwrite or self._chroms[idx] is None):
                self._chroms[idx] = chrom
                self._starts[idx] = None if pd.isna(start) else int(start)
        return n

    def record_expression(
        self,
        adata: AnnData,
        layer: str | None = None,
        gene_key: str | None = None,
        *,
        chunk: int = 20000,
    ) -> None:
        """Record how often each gene is expressed (non-zero) in ``adata``'s cells.

        :meth:`map` then weights the vocabulary coverage it reports and checks by these
        frequencies, so a query missing rarely expressed genes still covers most of what the
        model read in training. Saved with :meth:`to_dict`.

        Parameters
        ----------
        adata
            Cells x genes (the vocabulary's training data).
        layer
            Layer with the counts; ``None`` uses ``adata.X``.
        gene_key
            ``var`` column with IDs or symbols, as in :meth:`map`.
        chunk
            Cells read at a time (for backed AnnData).
        """
        column_tokens = self.map(adata, gene_key, min_fraction=0.0, warn_fraction=0.0)
        X = adata.X if layer is None else adata.layers[layer]
        nnz = np.zeros(adata.n_vars, dtype=np.int64)
        for start in range(0, adata.n_obs, chunk):
            block = X[start : start + chunk]
            nnz += np.asarray((block != 0).sum(0)).ravel().astype(np.int64)
        per_token = np.zeros(len(self), dtype=np.int64)
        mapped = column_tokens >= 0
        np.add.at(per_token, column_tokens[mapped], nnz[mapped])
        n_cells = max(adata.n_obs, 1)
        self._frequency = [
            None if special else float(n) / n_cells
            for special, n in zip(self._special, per_token.tolist())
        ]

    @property
    def expression_frequency(self) -> np.ndarray | None:
        """Fraction of training cells expressing each gene (order of :attr:`gene_keys`).

        NaN for genes without a record; ``None`` when none was recorded
        (:meth:`record_expression`).
        """
        freq = [f for f, s in zip(self._frequency, self._special) if not s]
        if all(f is None for f in freq):
            return None
        return np.array([np.nan if f is None else f for f in freq], dtype=np.float64)

    # ------------------------------------------------------------------ mapping
    def map(
        self,
        adata: AnnData | pd.DataFrame | Sequence[str],
        gene_key: str | None = None,
        *,
        symbol_key: str | None = None,
        min_fraction: float = 0.5,
        warn_fraction: float = 0.9,
        min_coverage: float = 0.0,
        return_report: bool = False,
    ) -> np.ndarray | tuple[np.ndarray, MappingReport]:
        """Map the columns of a dataset to token ids.

        Each column is matched by unversioned Ensembl ID (or exact key) first, then by symbol
        (case-insensitive). Several columns mapping to the same token (duplicated genes) all get
        it, with a warning: :class:`~scmamba2_scvi.data.Tokenizer` sums their counts into one
        token, so no column is silently dropped.

        Parameters
        ----------
        adata
            An AnnData, a ``var`` DataFrame or a sequence of gene names.
        gene_key
            ``var`` column with IDs or symbols; default: ``var_names``.
        symbol_key
            ``var`` column with symbols (default: auto-detected, see :meth:`from_anndata`).
        min_fraction
            Raise a ValueError when fewer than this fraction of the dataset's columns match.
        warn_fraction
            Emit a UserWarning when fewer than this fraction of the dataset's columns match.
        min_coverage
            Raise a ValueError when the dataset holds less than this share of the vocabulary
            (``report.coverage``: expression-weighted when the vocabulary records expression).
        return_report
            Also return the :class:`MappingReport` (always stored in the ``last_report`` attribute).

        Returns
        -------
        ``np.ndarray`` of int64, shape ``(n_vars,)``: token id per column, -1 when unmatched; with
        ``return_report=True`` a tuple ``(column_tokens, report)``.
        """
        var = _var_table(adata)
        keys, ids, symbols = _resolve_genes(var, gene_key, symbol_key)
        out = np.full(len(keys), -1, dtype=np.int64)
        n_by_id = n_by_symbol = 0
        taken: set[int] = set()
        duplicates: list[str] = []
        unmatched: list[str] = []
        n_unmatched = 0
        for j, (key, gid, sym) in enumerate(zip(keys, ids, symbols)):
            tok, by_id = self._lookup(key, gid, sym)
            name = str(key)
            if tok is None:
                n_unmatched += 1
                if len(unmatched) < 20:
                    unmatched.append(name)
                continue
            if tok in taken:
                duplicates.append(name)
            taken.add(tok)
            out[j] = tok
            n_by_id += by_id
            n_by_symbol += not by_id
        report = MappingReport(
            n_genes=len(keys),
            n_matched=n_by_id + n_by_symbol,
            n_by_id=n_by_id,
            n_by_symbol=n_by_symbol,
            duplicates=duplicates,
            n_unmatched=n_unmatched,
            unmatched=unmatched,
            **self._coverage(np.fromiter(taken, dtype=np.int64, count=len(taken))),
        )
        self.last_report = report
        logger.info("%s", report)
        _check_report(report, min_fraction, warn_fraction, min_coverage)
        return (out, report) if return_report else out

    def _coverage(self, present: np.ndarray) -> dict[str, Any]:
        """``MappingReport`` fields of the vocabulary side for the present token ids."""
        genes = self.gene_token_ids
        weights = self.expression_frequency
        weighted = weights is not None and float(np.nansum(weights)) > 0
        if weighted:
            w = np.zeros(len(self))
            w[genes] = np.nan_to_num(weights)
            coverage = float(w[present].sum() / w.sum())
        else:
            coverage = len(present) / len(genes) if len(genes) else 0.0
        return {
            "n_vocab_genes": len(genes),
            "n_vocab_present": len(present),
            "coverage": coverage,
            "coverage_weighted": weighted,
        }

    def _lookup(self, key: str | None, gid: str | None, sym: str | None) -> tuple[int | None, bool]:
        """Return ``(token id or None, matched_by_id)`` for one column."""
        for candidate in (gid, key):
            if candidate is not None:
                idx = self._index.get(candidate)
                if idx is not None and not self._special[idx]:
                    return idx, True
        for candidate in (sym, key):
            if candidate is not None:
                idx = self._symbol_index.get(candidate.upper())
                if idx is not None:
                    return idx, False
        return None, False

    # ------------------------------------------------------------------ access
    def __len__(self) -> int:
        return len(self._tokens)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and key in self._index

    def __getitem__(self, key: str) -> int:
        """Token id of a gene key (Ensembl version ignored) or special token name."""
        idx = self._index.get(strip_ensembl_version(key) or key)
        if idx is None:
            raise KeyError(f"{key!r} is not in the vocabulary.")
        return idx

    def __repr__(self) -> str:
        return (
            f"GeneVocab({self.n_genes} genes, {len(self) - self.n_genes} special tokens, "
            f"positions={'yes' if self.has_positions else 'no'})"
        )

    @property
    def pad_id(self) -> int:
        """Id of ``<pad>`` (0)."""
        return self._index["<pad>"]

    @property
    def cls_id(self) -> int:
        """Id of ``<cls>`` (1)."""
        return self._index["<cls>"]

    @property
    def mask_id(self) -> int:
        """Id of ``<mask>`` (2)."""
        return self._index["<mask>"]

    @property
    def tokens(self) -> list[str]:
        """All token names (gene keys and special tokens) in id order."""
        return list(self._tokens)

    @property
    def n_genes(self) -> int:
        """Number of gene tokens."""
        return len(self._special) - sum(self._special)

    @property
    def special_tokens(self) -> list[str]:
        """Names of the special tokens in id order."""
        return [t for t, s in zip(self._tokens, self._special) if s]

    @property
    def is_special(self) -> np.ndarray:
        """Boolean array of length ``len(self)``: True for special tokens."""
        return np.asarray(self._special, dtype=bool)

    @property
    def gene_token_ids(self) -> np.ndarray:
        """Token ids of the genes (special tokens excluded), ascending."""
        return np.flatnonzero(~self.is_special).astype(np.int64)

    @property
    def gene_keys(self) -> list[str]:
        """Gene keys (Ensembl IDs or symbols) in token id order."""
        return [t for t, s in zip(self._tokens, self._special) if not s]

    @property
    def gene_ids(self) -> list[str]:
        """Deprecated name of :attr:`gene_keys`."""
        warnings.warn("GeneVocab.gene_ids is renamed gene_keys.", DeprecationWarning, stacklevel=2)
        return self.gene_keys

    @property
    def symbols(self) -> list[str | None]:
        """Gene symbols (``None`` when unknown), in the order of :attr:`GeneVocab.gene_keys`."""
        return [t for t, s in zip(self._symbols, self._special) if not s]

    @property
    def has_positions(self) -> bool:
        """Whether at least one gene has a genomic position."""
        return any(c is not None for c in self._chroms)

    def genomic_order(self) -> np.ndarray:
        """Gene token ids sorted by chromosome (1..22, X, Y, M, others) then start.

        Returns
        -------
        ``np.ndarray`` of int64 with every gene token id once; genes without a position come
        last, in token id order.
        """
        genes = self.gene_token_ids
        with_pos = [i for i in genes if self._chroms[i] is not None]
        without = [i for i in genes if self._chroms[i] is None]
        with_pos.sort(key=lambda i: (_chrom_sort_key(self._chroms[i]), self._starts[i] or 0, i))
        return np.asarray(with_pos + without, dtype=np.int64)

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable dictionary (see :meth:`GeneVocab.from_dict`)."""
        data = {
            "format_version": _FORMAT_VERSION,
            "tokens": list(self._tokens),
            "special": list(self._special),
            "symbols": list(self._symbols),
            "chromosomes": list(self._chroms),
            "starts": list(self._starts),
        }
        if any(f is not None for f in self._frequency):  # absent in older saved vocabularies
            data["expression_frequency"] = list(self._frequency)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GeneVocab:
        """Rebuild a vocabulary from :meth:`GeneVocab.to_dict` output, keeping every token id."""
        if data.get("format_version") != _FORMAT_VERSION:
            raise ValueError(
                f"Unsupported GeneVocab format_version {data.get('format_version')!r}; "
                f"expected {_FORMAT_VERSION}."
            )
        vocab = cls.__new__(cls)
        vocab._reset()
        for tok, special, sym, chrom, start in zip(
            data["tokens"], data["special"], data["symbols"], data["chromosomes"], data["starts"]
        ):
            vocab._append(tok, sym, chrom, start, special=bool(special))
        if "expression_frequency" in data:
            vocab._frequency = list(data["expression_frequency"])
        return vocab

    def save(self, path: str | PathLike) -> None:
        """Write the vocabulary as JSON to ``path``."""
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(self.to_dict(), fh)

    @classmethod
    def load(cls, path: str | PathLike) -> GeneVocab:
        """Read a vocabulary written by :meth:`GeneVocab.save`."""
        with open(path, encoding="utf-8") as fh:
            return cls.from_dict(json.load(fh))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, GeneVocab) and self.to_dict() == other.to_dict()

    __hash__ = None  # type: ignore[assignment]
