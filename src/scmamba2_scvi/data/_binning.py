"""Expression value transforms: per-cell quantile binning, log1p normalisation, count checks."""

from __future__ import annotations

from typing import Literal, NamedTuple

import numpy as np
import scipy.sparse as sp
import torch

__all__ = ["VALUE_TRANSFORMS", "check_counts", "quantile_bin", "transform_values"]

#: Value transforms understood by :func:`~scmamba2_scvi.data.transform_values` and
#: :class:`~scmamba2_scvi.data.Tokenizer`.
VALUE_TRANSFORMS: tuple[str, ...] = ("bin", "log1p", "raw")

ArrayLike = np.ndarray | sp.spmatrix | sp.sparray | torch.Tensor

# Integer values are binned with per-cell histograms when n_cells * (max + 1) stays below
# _HIST_MAX_BINS (and about twice the entries); otherwise values below _HIST_CAP use histograms
# and the rest a sort.
_HIST_MAX_BINS = 1 << 22
_HIST_CAP = 256


class _CSR(NamedTuple):
    """Compressed rows as torch tensors: ``values[crow[i]:crow[i+1]]`` belong to row ``i``."""

    crow: torch.Tensor  # (n_rows + 1,) int64
    col: torch.Tensor  # (nnz,) int64
    val: torch.Tensor  # (nnz,) float32
    n_rows: int
    n_cols: int
    sorted_cols: bool  # column indices known to increase within each row

    def rows(self) -> torch.Tensor:
        """Row index of every stored entry."""
        counts = self.crow[1:] - self.crow[:-1]
        return torch.repeat_interleave(
            torch.arange(self.n_rows, device=self.crow.device), counts, output_size=len(self.val)
        )


def _to_csr(X: ArrayLike, device: torch.device | str | None = None) -> _CSR:
    """Convert scipy sparse, numpy or torch (dense or sparse CSR) input to :class:`_CSR`.

    The input is never modified; scipy matrices that are not canonical (unsorted or duplicated
    column indices) are canonicalised on a copy.
    """
    if sp.issparse(X):
        X = X.tocsr() if X.format != "csr" else X
        if not X.has_canonical_format:
            X = X.copy()
            X.sum_duplicates()
        crow = torch.from_numpy(np.asarray(X.indptr, dtype=np.int64))
        col = torch.from_numpy(np.asarray(X.indices, dtype=np.int64))
        val = torch.from_numpy(np.asarray(X.data, dtype=np.float32))
        n_rows, n_cols = X.shape
        if device is not None:
            crow, col, val = crow.to(device), col.to(device), val.to(device)
        return _CSR(crow, col, val, n_rows, n_cols, True)
    if isinstance(X, np.ndarray):
        X = torch.from_numpy(X)
    if not isinstance(X, torch.Tensor):
        raise TypeError(
            f"Unsupported matrix type {type(X).__name__}; pass a scipy sparse matrix, a numpy "
            "array or a torch tensor (dense or sparse CSR)."
        )
    if device is not None:
        X = X.to(device)
    if X.dim() != 2:
        raise ValueError(f"Expected a 2-D cells x genes matrix, got shape {tuple(X.shape)}.")
    if X.layout == torch.strided:
        nz = X != 0
        crow = torch.zeros(X.shape[0] + 1, dtype=torch.long, device=X.device)
        torch.cumsum(nz.sum(1), 0, out=crow[1:])
        col = nz.nonzero()[:, 1]
        return _CSR(crow, col, X[nz].float(), X.shape[0], X.shape[1], True)
    known_sorted = X.layout != torch.sparse_csr  # other layouts are coalesced on conversion
    if known_sorted:
        X = X.to_sparse_csr()
    crow, col, val = X.crow_indices().long(), X.col_indices().long(), X.values().float()
    return _CSR(crow, col, val, X.shape[0], X.shape[1], known_sorted)


def _check_count_values(val: torch.Tensor) -> None:
    """Raise a ValueError when ``val`` holds NaN/inf, negative or non-integer values."""
    # Fast path: frac() is 0 for integers and NaN for NaN/inf.
    if len(val) == 0 or (bool((torch.frac(val) == 0).all()) and float(val.min()) >= 0):
        return
    fix = (
        "Pass raw counts (e.g. layer='counts' when X is normalised), or pass "
        "check_counts=False to accept normalised data (with value_transform='bin' or 'raw'; "
        "'log1p' would normalise it again)."
    )
    finite = torch.isfinite(val)
    if not bool(finite.all()):
        n = int((~finite).sum())
        raise ValueError(f"X contains {n} NaN or infinite value(s); counts must be finite. {fix}")
    neg = val < 0
    if bool(neg.any()):
        raise ValueError(
            f"X contains {int(neg.sum())} negative value(s) (min {float(val.min()):g}); counts "
            f"cannot be negative: the data look scaled or centred. {fix}"
        )
    frac = val != torch.round(val)
    example = float(val[frac][0])
    raise ValueError(
        f"X contains {int(frac.sum())} non-integer value(s) (e.g. {example:g}): the data "
        f"look normalised or log-transformed, not counts. {fix}"
    )


def check_counts(X: ArrayLike) -> None:
    """Check that ``X`` holds raw counts: finite, non-negative integers.

    Parameters
    ----------
    X
        Cells x genes matrix: scipy sparse, numpy array or torch tensor.

    Raises
    ------
    ValueError
        Naming the problem (NaN/inf, negative or non-integer values) and what to pass instead
        (``layer="counts"``, or ``check_counts=False`` for normalised data).
    """
    _check_count_values(_to_csr(X).val)


def _float_key(val: torch.Tensor) -> torch.Tensor:
    """Int64 key that orders non-negative float32 values like the values themselves."""
    return val.float().contiguous().view(torch.int32).to(torch.int64)


def _count_le(row: torch.Tensor, val: torch.Tensor, n_rows: int, integral: bool) -> torch.Tensor:
    """For each entry, how many entries of its row have a value ``<=`` its value.

    ``val`` must be non-negative. Integer values below ``_HIST_CAP`` are counted with one
    histogram per row; other entries are ranked by a sort of (row, value) keys.
    """
    out = torch.empty_like(row)
    n_small = torch.zeros(n_rows, dtype=torch.long, device=row.device)
    if integral:
        small = val < _HIST_CAP
        flat = row[small] * _HIST_CAP + val[small].long()
        hist = torch.bincount(flat, minlength=n_rows * _HIST_CAP).view(n_rows, _HIST_CAP)
        cum = hist.cumsum(1)
        out[small] = cum.view(-1)[flat]
        n_small = cum[:, -1]
        large = ~small
        r, v = row[large], val[large]
    else:
        large, r, v = None, row, val
    key = (r << 32) | _float_key(v)
    sorted_key = torch.sort(key).values
    n_large = torch.bincount(r, minlength=n_rows)
    start = torch.cumsum(n_large, 0) - n_large
    rank_le = n_small[r] + torch.searchsorted(sorted_key, key, right=True) - start[r]
    if large is None:
        return rank_le
    out[large] = rank_le
    return out


def _bins_from_ranks(count_le: torch.Tensor, n: torch.Tensor, n_bins: int) -> torch.Tensor:
    """``floor((count_le - 1) (n_bins - 2) / (n - 1)) + 1`` (``n_bins - 1`` where ``n == 1``).

    float64 division of integers below 2**53 is correctly rounded, so the floor is exact.
    """
    ratio = ((count_le - 1) * (n_bins - 2)).double() / (n - 1).clamp_min(1).double()
    bins = torch.floor(ratio).add_(1).float()
    return bins.masked_fill_(n == 1, n_bins - 1)


def _bin_entries(
    row: torch.Tensor, val: torch.Tensor, n_rows: int, n_bins: int, integral: bool
) -> torch.Tensor:
    """Quantile bins (1..n_bins-1, float32) of the non-zero, non-negative ``val`` of each row.

    ``row`` must be sorted (CSR order).

    Equals ``np.digitize(v, np.quantile(nonzero_row, np.linspace(0, 1, n_bins - 1)))`` computed
    in exact arithmetic: the edge at quantile ``k / (n_bins - 2)`` is ``<= v`` iff its
    interpolation position ``k (n - 1) / (n_bins - 2)`` is at most the last sorted position
    ``J`` holding ``v``, so the bin is ``floor(J (n_bins - 2) / (n - 1)) + 1`` (``n_bins - 1``
    when the row has a single non-zero value). For integer values whose per-row histograms are
    small, bins are computed once per (row, value) and gathered.
    """
    counts = torch.bincount(row, minlength=n_rows)
    if integral and len(val):
        width = int(val.max()) + 1
        if n_rows * width <= min(_HIST_MAX_BINS, 2 * len(val) + 65536):
            flat = row * width + val.long()
            hist = torch.bincount(flat, minlength=n_rows * width).view(n_rows, width)
            table = _bins_from_ranks(hist.cumsum(1), counts.unsqueeze(1), n_bins)
            return table.view(-1)[flat]
    n = torch.repeat_interleave(counts, counts, output_size=len(row))  # counts[row], rows sorted
    return _bins_from_ranks(_count_le(row, val, n_rows, integral), n, n_bins)


def _transform(
    row: torch.Tensor,
    val: torch.Tensor,
    n_rows: int,
    value_transform: str,
    n_bins: int,
    integral: bool,
    totals: torch.Tensor | None = None,
    target_sum: float = 1e4,
) -> torch.Tensor:
    """Transformed float32 values of non-zero entries (``row``, ``val``) of ``n_rows`` cells.

    ``bin`` quantiles are computed over the given entries of each row; ``log1p`` gives
    ``log1p(val / totals * target_sum)`` with ``totals`` the per-row library size (summed over
    all columns, see :func:`_row_totals`).
    """
    if value_transform == "raw":
        return val
    if value_transform == "log1p":
        if totals is None:
            raise ValueError("log1p needs the per-cell totals.")
        scale = target_sum / totals.clamp_min(torch.finfo(torch.float32).tiny)
        return torch.log1p(val * scale[row])
    if value_transform == "bin":
        if bool((val < 0).any()):
            raise ValueError(
                "Quantile binning needs non-negative values but X has negative entries; pass "
                "counts or normalised (unscaled) data, or value_transform='raw'."
            )
        return _bin_entries(row, val, n_rows, n_bins, integral)
    raise ValueError(
        f"Unknown value_transform={value_transform!r}; choose one of {VALUE_TRANSFORMS}."
    )


def _row_totals(csr: _CSR, row: torch.Tensor) -> torch.Tensor:
    """Sum of the stored values of each row (float32)."""
    totals = torch.zeros(csr.n_rows, dtype=torch.float32, device=csr.val.device)
    return totals.index_add_(0, row, csr.val)


def _is_integral(val: torch.Tensor) -> bool:
    return bool((val == torch.round(val)).all())


def _rebuild(X: ArrayLike, csr: _CSR, nz: torch.Tensor, new: torch.Tensor) -> ArrayLike:
    """Return ``new`` (values of the non-zero entries ``nz``) in the same kind/shape as ``X``."""
    if sp.issparse(X):
        data = torch.zeros(len(csr.val), dtype=new.dtype)
        data[nz] = new
        out = sp.csr_matrix(
            (data.numpy(), csr.col.numpy().astype(np.int32), csr.crow.numpy().copy()), shape=X.shape
        )
        return out if X.format == "csr" else out.asformat(X.format)
    dense = torch.zeros(csr.n_rows, csr.n_cols, dtype=new.dtype, device=csr.val.device)
    dense[csr.rows()[nz], csr.col[nz]] = new
    return dense.numpy() if isinstance(X, np.ndarray) else dense


def quantile_bin(X: ArrayLike, n_bins: int = 51) -> ArrayLike:
    """Per-cell quantile binning of non-zero values (the scGPT value encoding).

    For each cell, the bin edges are the quantiles ``linspace(0, 1, n_bins - 1)`` (linear
    interpolation) of the cell's non-zero values, and each non-zero value gets
    ``np.digitize(value, edges)``: the number of edges ``<= value``. Zeros get bin 0; non-zero
    values get bins ``1 .. n_bins - 1`` (the smallest value bin 1, the largest ``n_bins - 1``).

    Tie rule (deterministic, no random tie-breaking): equal values in a cell get the same bin,
    the highest their tied block reaches (as ``np.digitize(..., right=False)``). Within a cell a
    larger value never gets a smaller bin.

    The computation is vectorised over all cells (a per-cell histogram for integer values
    below 256 and one sort for the rest) and exact; it matches ``np.quantile`` +
    ``np.digitize`` except where float rounding of the edges would break an exact tie.

    Parameters
    ----------
    X
        Cells x genes non-negative matrix: scipy sparse (CSR preferred), numpy array, or torch
        tensor (dense or sparse CSR, any device).
    n_bins
        Number of bins including the zero bin (scGPT uses 51).

    Returns
    -------
    Bin indices (int64) with the shape and kind of ``X`` (scipy sparse with the same sparsity
    pattern, numpy array, or dense torch tensor on the same device).
    """
    if n_bins < 2:
        raise ValueError(f"n_bins must be at least 2 (one zero bin + one value bin), got {n_bins}.")
    csr = _to_csr(X)
    nz = csr.val != 0
    val = csr.val[nz]
    bins = _transform(csr.rows()[nz], val, csr.n_rows, "bin", n_bins, _is_integral(val))
    return _rebuild(X, csr, nz, bins.long())


def transform_values(
    X: ArrayLike,
    value_transform: Literal["bin", "log1p", "raw"] = "bin",
    *,
    n_bins: int = 51,
    target_sum: float = 1e4,
) -> ArrayLike:
    """Apply a value transform to a cells x genes matrix (for inspection and tests).

    Parameters
    ----------
    X
        Cells x genes matrix: scipy sparse, numpy array or torch tensor.
    value_transform
        ``"bin"``: :func:`quantile_bin`; ``"log1p"``: ``log1p(x / total * target_sum)`` with
        ``total`` the cell's sum over all columns (scanpy's ``normalize_total`` + ``log1p``);
        ``"raw"``: values unchanged.
    n_bins
        Bins for ``"bin"``.
    target_sum
        Library size after normalisation for ``"log1p"``.

    Returns
    -------
    The transformed matrix, same shape and kind as ``X`` (int64 for ``"bin"``, float32
    otherwise).
    """
    if value_transform == "bin":
        return quantile_bin(X, n_bins)
    if value_transform not in VALUE_TRANSFORMS:
        raise ValueError(
            f"Unknown value_transform={value_transform!r}; choose one of {VALUE_TRANSFORMS}."
        )
    csr = _to_csr(X)
    row = csr.rows()
    nz = csr.val != 0
    totals = _row_totals(csr, row) if value_transform == "log1p" else None
    new = _transform(
        row[nz], csr.val[nz], csr.n_rows, value_transform, n_bins, False, totals, target_sum
    )
    return _rebuild(X, csr, nz, new)
