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

    ``value(cell, gene) = <sigmoid(W_q e_gene), W_c z_cell>``: one inner product per (cell, gene),
    so values of genes absent from the input sequence (zeros, held-out genes) can be predicted.

    Parameters
    ----------
    d_model
        Width of cell embeddings and gene embeddings.
    """

    def __init__(self, d_model: int):
        super().__init__()
        self.query = nn.Linear(d_model, d_model)
        self.cell = nn.Linear(d_model, d_model)

    def forward(self, cell_emb: torch.Tensor, gene_emb: torch.Tensor) -> torch.Tensor:
        """Predictions for each cell's own genes.

        Parameters
        ----------
        cell_emb
            ``(batch, d)``.
        gene_emb
            ``(batch, length, d)`` per-cell genes, or ``(n_genes, d)`` one gene set for all cells.

        Returns
        -------
        ``(batch, length)`` or ``(batch, n_genes)``.
        """
        q = torch.sigmoid(self.query(gene_emb))
        c = self.cell(cell_emb)
        if q.dim() == 2:
            return c @ q.T
        return torch.einsum("bld,bd->bl", q, c)


class _GradReverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return -ctx.scale * grad, None


def grad_reverse(x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Identity forward; multiplies the gradient by ``-scale`` backward (gradient reversal)."""
    return _GradReverse.apply(x, scale)


class MLPClassifier(nn.Module):
    """Two-layer classifier on cell embeddings (cell types, or batches for the adversary).

    Parameters
    ----------
    d_model
        Input width.
    n_classes
        Output classes.
    dropout
        Dropout before the output layer.
    reverse_gradient
        Put a gradient-reversal layer in front (the adversarial batch discriminator, "DAR").
    """

    def __init__(
        self, d_model: int, n_classes: int, dropout: float = 0.1, reverse_gradient: bool = False
    ):
        super().__init__()
        self.reverse_gradient = reverse_gradient
        self.mlp = nn.Sequential(
            nn.Linear(d_model, d_model),
            nn.ReLU(),
            nn.LayerNorm(d_model),
            nn.Dropout(dropout),
            nn.Linear(d_model, n_classes),
        )

    def forward(self, cell_emb: torch.Tensor) -> torch.Tensor:
        """``(batch, d)`` -> ``(batch, n_classes)`` logits."""
        if self.reverse_gradient:
            cell_emb = grad_reverse(cell_emb)
        return self.mlp(cell_emb)
