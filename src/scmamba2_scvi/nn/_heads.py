"""Input encoders and output heads around the encoder: values, batch norm per domain, decoders."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

#: Value of padding positions in token values (written by the tokenizer, read by the encoder).
PAD_VALUE: float = -2.0
#: Value of masked positions in input token values.
MASK_VALUE: float = -1.0


class ValueEncoder(nn.Module):
    """Embed one expression value per token.

    ``"continuous"`` (the released code): the value as a real number through
    ``Linear(1, d) -> ReLU -> Linear(d, d) -> LayerNorm``. ``"categorical"``: one embedding per
    bin, plus one for the mask value and one for padding.

    Parameters
    ----------
    d_model
        Output width.
    kind
        ``"continuous"`` or ``"categorical"``.
    n_bins
        Number of value bins (categorical only; values must be integers in ``[0, n_bins)``).
    max_value
        Continuous values are clipped to this before the MLP.
    """

    def __init__(
        self,
        d_model: int,
        kind: Literal["continuous", "categorical"] = "continuous",
        n_bins: int = 51,
        max_value: float = 512.0,
    ):
        super().__init__()
        if kind not in ("continuous", "categorical"):
            raise ValueError(f"value encoding must be 'continuous' or 'categorical'; got {kind!r}.")
        self.kind, self.n_bins, self.max_value = kind, n_bins, max_value
        if kind == "continuous":
            self.mlp = nn.Sequential(nn.Linear(1, d_model), nn.ReLU(), nn.Linear(d_model, d_model))
        else:
            self.embedding = nn.Embedding(n_bins + 2, d_model)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        """``(batch, length)`` values (mask -1, padding -2) -> ``(batch, length, d_model)``."""
        if self.kind == "continuous":
            return self.norm(self.mlp(values.clamp(max=self.max_value)[..., None]))
        idx = values.long().clamp(0, self.n_bins - 1)
        idx = torch.where(values == MASK_VALUE, self.n_bins, idx)
        idx = torch.where(values == PAD_VALUE, self.n_bins + 1, idx)
        return self.norm(self.embedding(idx))


class DomainBatchNorm(nn.Module):
    """Batch norm over the features of real tokens, one per domain (DSBN) or shared.

    Statistics come from real (non-padding) tokens only, so padding never changes real outputs.
    With ``n_domains > 1`` each cell's tokens use their domain's statistics and affine transform
    (domain-specific batch norm); cells of an unknown domain (index ``-1``) use the average of the
    domains' running statistics and affine parameters.

    Parameters
    ----------
    d_model
        Feature width.
    n_domains
        Number of domains (1 = one shared batch norm).
    eps, momentum
        As in :class:`torch.nn.BatchNorm1d`.
    """

    def __init__(self, d_model: int, n_domains: int = 1, eps: float = 1e-5, momentum: float = 0.1):
        super().__init__()
        self.n_domains = n_domains
        self.norms = nn.ModuleList(
            nn.BatchNorm1d(d_model, eps=eps, momentum=momentum) for _ in range(max(1, n_domains))
        )

    def _averaged(self, x: torch.Tensor) -> torch.Tensor:
        mean = torch.stack([n.running_mean for n in self.norms]).mean(0)
        var = torch.stack([n.running_var for n in self.norms]).mean(0)
        weight = torch.stack([n.weight for n in self.norms]).mean(0)
        bias = torch.stack([n.bias for n in self.norms]).mean(0)
        return F.batch_norm(x, mean, var, weight, bias, False, 0.0, self.norms[0].eps)

    def forward(
        self,
        x: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        domain: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Normalise ``(batch, length, d)`` token states; ``domain`` is ``(batch,)`` or ``None``."""
        b, seqlen = x.shape[:2]
        real = (
            torch.ones(b, seqlen, dtype=torch.bool, device=x.device)
            if key_padding_mask is None
            else ~key_padding_mask
        )
        out = x.clone()
        if self.n_domains <= 1 or domain is None:
            groups = [(self.norms[0], real)]
        else:
            domain = domain.view(-1).long()
            groups = [(self.norms[k], real & (domain == k)[:, None]) for k in range(self.n_domains)]
            unknown = real & ((domain < 0) | (domain >= self.n_domains))[:, None]
            if unknown.any():
                out[unknown] = self._averaged(x[unknown])
        for norm, sel in groups:
            n_sel = int(sel.sum())
            if n_sel == 0 or (norm.training and n_sel < 2):
                continue
            out[sel] = norm(x[sel])
        return out


class ExprDecoder(nn.Module):
    """Per-token expression value predictor (the masked-expression "GEP" head).

    Parameters
    ----------
    d_model
        Token width.
    """

    def __init__(self, d_model: int):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(d_model, d_model),
            nn.LeakyReLU(),
            nn.Linear(d_model, d_model),
            nn.LeakyReLU(),
            nn.Linear(d_model, 1),
        )

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(batch, length, d)`` -> ``(batch, length)`` predicted values."""
        return self.mlp(tokens).squeeze(-1)


class GeneQueryDecoder(nn.Module):
    """Predict any gene's value from the cell embedding and a gene query (the "GEPC"/MVC head).

    A hurdle head. ``value(cell, gene) = <sigmoid(W_q e_gene), W_c c>`` is the value if the gene
    is expressed; ``zero_logit(cell, gene) = <sigmoid(W_q e_gene), W_0 c> + w_0 . e_gene + b_0``
    the logit of the probability that it is not (scGPT's explicit zero probability). One inner
    product per (cell, gene), so genes absent from the input sequence (zeros, held-out genes)
    can be predicted. ``c`` is the cell embedding plus the decoder covariates
    (:class:`DecoderCovariates`).

    Parameters
    ----------
    d_model
        Width of cell embeddings and gene embeddings.
    """

    def __init__(self, d_model: int):
        super().__init__()
        self.query = nn.Linear(d_model, d_model)
        self.cell = nn.Linear(d_model, d_model)
        self.zero_cell = nn.Linear(d_model, d_model)
        self.zero_gene = nn.Linear(d_model, 1)

    def forward(
        self, cell_emb: torch.Tensor, gene_emb: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Values if expressed and zero logits of each cell's genes.

        Parameters
        ----------
        cell_emb
            ``(batch, d)``.
        gene_emb
            ``(batch, length, d)`` per-cell genes, or ``(n_genes, d)`` one gene set for all cells.

        Returns
        -------
        ``value`` and ``zero_logit``, each ``(batch, length)`` or ``(batch, n_genes)``.
        """
        q = torch.sigmoid(self.query(gene_emb))
        c, c0 = self.cell(cell_emb), self.zero_cell(cell_emb)
        bias = self.zero_gene(gene_emb).squeeze(-1)
        if q.dim() == 2:
            return c @ q.T, c0 @ q.T + bias
        return torch.einsum("bld,bd->bl", q, c), torch.einsum("bld,bd->bl", q, c0) + bias

    def per_token(
        self, cell_emb: torch.Tensor, gene_emb: torch.Tensor, cell_of_token: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`forward` for the tokens of packed cells.

        ``gene_emb`` is ``(T, d)`` and ``cell_of_token`` ``(T,)`` the cell of each token; returns
        two ``(T,)`` tensors.
        """
        q = torch.sigmoid(self.query(gene_emb))
        # index_select, not indexing: its backward is an index_add, many times faster on CPU than
        # the accumulating index_put that indexing's backward runs
        c = self.cell(cell_emb).index_select(0, cell_of_token)
        c0 = self.zero_cell(cell_emb).index_select(0, cell_of_token)
        return (q * c).sum(-1), (q * c0).sum(-1) + self.zero_gene(gene_emb).squeeze(-1)

    @staticmethod
    def expected(value: torch.Tensor, zero_logit: torch.Tensor) -> torch.Tensor:
        """Expected value ``P(expressed) * max(value, 0)`` (zeros counted) of the head's outputs."""
        # Every value space (counts, log1p, bins) is non-negative; the value head is not bounded.
        return torch.sigmoid(-zero_logit) * value.clamp(min=0)


class DecoderCovariates(nn.Module):
    """Per-cell offset added to the decoders' inputs: a batch embedding and log library size.

    Conditioning the decoders (GEP, GEPC) on batch and sequencing depth, as scVI conditions its
    decoder, lets the reconstruction explain them without the cell embedding carrying them. The
    encoder never sees the offset. Zero-initialised: an untrained (or older) model's outputs
    are unchanged.

    Parameters
    ----------
    d_model
        Width of the decoders' inputs.
    n_batch
        Batches; the batch embedding exists when ``n_batch > 1`` and ``batch``.
    batch
        Add a learned embedding of the cell's batch (cells of an unknown batch, -1, get the
        mean of the batches' embeddings).
    library
        Add a linear projection of ``log1p`` of the cell's total count.
    """

    def __init__(self, d_model: int, n_batch: int = 0, batch: bool = True, library: bool = True):
        super().__init__()
        self.batch = None
        if batch and n_batch > 1:
            self.batch = nn.Embedding(n_batch, d_model)
            nn.init.zeros_(self.batch.weight)
        self.library = None
        if library:
            self.library = nn.Linear(1, d_model)
            nn.init.zeros_(self.library.weight)
            nn.init.zeros_(self.library.bias)

    def forward(
        self,
        n_cells: int,
        batch_index: torch.Tensor | None = None,
        log_library: torch.Tensor | None = None,
        like: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        """``(n_cells, d_model)`` offset, or ``None`` when no covariate is used or given.

        ``like`` gives the dtype and device of the offset.
        """
        offset = None
        if self.batch is not None and batch_index is not None:
            idx = batch_index.reshape(-1).long()
            known = (idx >= 0) & (idx < self.batch.num_embeddings)
            emb = self.batch(idx.clamp(0, self.batch.num_embeddings - 1))
            offset = torch.where(known.unsqueeze(-1), emb, self.batch.weight.mean(0))
        if self.library is not None and log_library is not None:
            lib = self.library(log_library.reshape(n_cells, 1).to(self.library.weight.dtype))
            offset = lib if offset is None else offset + lib
        if offset is not None and like is not None:
            offset = offset.to(like.dtype)
        return offset


class MLPClassifier(nn.Module):
    """Two-layer classifier on cell embeddings (cell types, or batches for the discriminator).

    Parameters
    ----------
    d_model
        Input width.
    n_classes
        Output classes.
    dropout
        Dropout before the output layer.
    """

    def __init__(self, d_model: int, n_classes: int, dropout: float = 0.1):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(d_model, d_model),
            nn.ReLU(),
            nn.LayerNorm(d_model),
            nn.Dropout(dropout),
            nn.Linear(d_model, n_classes),
        )

    def forward(self, cell_emb: torch.Tensor) -> torch.Tensor:
        """``(batch, d)`` -> ``(batch, n_classes)`` logits."""
        return self.mlp(cell_emb)
