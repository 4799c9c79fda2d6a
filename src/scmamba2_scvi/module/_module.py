"""SCMamba2Module: token embedding, bidirectional Mamba2 encoder and the objectives' heads."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from scvi import REGISTRY_KEYS
from scvi.module.base import BaseModuleClass, LossOutput, auto_move_data
from torch import nn

from scmamba2_scvi.nn import (
    BiMamba2Encoder,
    DomainBatchNorm,
    ExprDecoder,
    GeneQueryDecoder,
    MLPClassifier,
    ValueEncoder,
)


def _masked_mse(
    pred: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor,
    seq_idx: torch.Tensor | None = None,
    n_cells: int | None = None,
) -> torch.Tensor:
    """Per-cell mean squared error over ``mask`` (cells without masked tokens give 0).

    Rows are cells, or with ``seq_idx`` one packed row whose tokens belong to ``n_cells`` cells.
    """
    se = (pred - target).pow(2) * mask
    if seq_idx is None:
        return se.sum(1) / mask.sum(1).clamp(min=1)
    cell = seq_idx.reshape(-1).long()
    total = se.new_zeros(n_cells).index_add_(0, cell, se.reshape(-1))
    count = mask.new_zeros(n_cells).index_add_(0, cell, mask.reshape(-1))
    return total / count.clamp(min=1)


def _pearson(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = a - a.mean(), b - b.mean()
    return (a * b).sum() / (a.norm() * b.norm()).clamp(min=1e-8)


class SCMamba2Module(BaseModuleClass):
    """Tensors in, losses out: the SC-MAMBA2 network (scvi-tools module).

    A cell is a sequence ``<cls>, gene_1, ..., gene_n`` of (gene token, expression value) pairs.
    Token = gene embedding (+ LayerNorm) + value embedding, then batch norm over features (one per
    batch with ``dsbn``), then a :class:`~scmamba2_scvi.nn.BiMamba2Encoder`. The cell embedding is
    the mean of the outputs over real tokens (or the output at ``<cls>``, as in the paper).
    Heads: masked expression (GEP), gene-query expression from the cell embedding (GEPC),
    cell-type classifier, adversarial batch discriminator (DAR).

    Its input is a token dictionary (:class:`~scmamba2_scvi.data.TokenCollate` in the loader or
    :class:`~scmamba2_scvi.data.Tokenizer`), with batch and label codes that already are the heads'
    indices (-1: unknown). The module knows nothing of genes' names or of any AnnData.

    Parameters
    ----------
    n_vocab
        Size of the gene vocabulary (special tokens included).
    n_batch
        Number of batches (for DSBN and the discriminator); 0 or 1 disables both.
    n_labels
        Number of cell-type labels; 0 disables the classifier.
    d_model, n_layers, d_state, d_conv, expand, head_dim, n_groups, chunk_size
        Encoder sizes, see :class:`~scmamba2_scvi.nn.BiMamba2Encoder`.
    bidirectional
        ``"shared_flip"`` (the paper) or ``"hydra"``.
    ffn
        Feed-forward block after each mixer.
    dropout
        Dropout in the encoder and heads.
    checkpointing
        Activation checkpointing in the encoder.
    backend
        SSD backend (``"auto"``, ``"torch"``, ``"mamba_ssm"``).
    precision
        Encoder precision: ``"fp32"``, ``"bf16"`` (autocast) or ``"auto"`` (bfloat16 where the
        hardware runs it faster), see :class:`~scmamba2_scvi.nn.BiMamba2Encoder`.
    value_encoding
        ``"continuous"`` or ``"categorical"`` value embedding.
    n_bins
        Value bins (categorical encoding).
    dsbn
        Domain-specific batch norm (one per batch).
    cell_embedding
        ``"mean"``: mean of the encoder's outputs over real tokens (the default: every token's
        output receives the cell-level gradient, which trains faster on small data);
        ``"cls"``: output at ``<cls>``, as in the paper.
    mask_ratio
        Fraction of values masked for the GEP objective in training and validation (the
        model's loader masks them; the module only records the ratio).
    value_scale
        Values are divided by this inside the module (inputs and targets; mask and padding
        markers excepted) so that losses are of order one, e.g. ``n_bins - 1`` for binned values;
        predictions are returned on the original scale.
    """

    def __init__(
        self,
        n_vocab: int,
        n_batch: int = 0,
        n_labels: int = 0,
        *,
        d_model: int = 256,
        n_layers: int = 4,
        d_state: int = 64,
        d_conv: int = 4,
        expand: int = 2,
        head_dim: int = 64,
        n_groups: int = 1,
        chunk_size: int = 64,
        bidirectional: Literal["shared_flip", "hydra"] = "shared_flip",
        ffn: bool = False,
        dropout: float = 0.1,
        checkpointing: bool = False,
        backend: Literal["auto", "torch", "mamba_ssm"] = "auto",
        precision: Literal["auto", "fp32", "bf16"] = "fp32",
        value_encoding: Literal["continuous", "categorical"] = "continuous",
        n_bins: int = 51,
        dsbn: bool = False,
        cell_embedding: Literal["cls", "mean"] = "mean",
        mask_ratio: float = 0.15,
        value_scale: float = 1.0,
    ):
        super().__init__()
        if cell_embedding not in ("cls", "mean"):
            raise ValueError(f"cell_embedding must be 'cls' or 'mean'; got {cell_embedding!r}.")
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1); got {mask_ratio}.")
        self.n_vocab, self.n_batch, self.n_labels = n_vocab, n_batch, n_labels
        self.d_model, self.cell_embedding, self.mask_ratio = d_model, cell_embedding, mask_ratio
        self.value_scale = float(value_scale)
        self.gene_embedding = nn.Embedding(n_vocab, d_model)
        self.gene_norm = nn.LayerNorm(d_model)
        self.value_encoder = ValueEncoder(d_model, value_encoding, n_bins)
        self.token_norm = DomainBatchNorm(d_model, n_batch if dsbn and n_batch > 1 else 1)
        self.encoder = BiMamba2Encoder(
            d_model,
            n_layers,
            d_state=d_state,
            d_conv=d_conv,
            expand=expand,
            head_dim=head_dim,
            n_groups=n_groups,
            chunk_size=chunk_size,
            bidirectional=bidirectional,
            ffn=ffn,
            dropout=dropout,
            checkpointing=checkpointing,
            backend=backend,
            precision=precision,
        )
        self.expr_decoder = ExprDecoder(d_model)
        self.query_decoder = GeneQueryDecoder(d_model)
        self.classifier = MLPClassifier(d_model, n_labels, dropout) if n_labels > 0 else None
        self.discriminator = (
            MLPClassifier(d_model, n_batch, dropout, reverse_gradient=True) if n_batch > 1 else None
        )

    # ------------------------------------------------------------------ scvi-tools interface
    def _get_inference_input(self, tensors: dict[str, torch.Tensor]) -> dict:
        """Inputs of :meth:`inference` from a token dictionary (padded or packed).

        ``tensors`` holds the tokenizer's keys (``genes``, ``values``, ``input_values``,
        ``mask``, ``key_padding_mask``, and ``seq_idx``/``cu_seqlens`` when packed) and
        optionally ``batch`` codes ``(b,)``.
        """
        batch = tensors.get(REGISTRY_KEYS.BATCH_KEY)
        return {
            "genes": tensors["genes"],
            "values": self.scale_values(tensors["input_values"]),
            "key_padding_mask": tensors.get("key_padding_mask"),
            "batch_index": None if batch is None else batch.reshape(-1).long(),
            "targets": self.scale_values(tensors["values"]),
            "masked": tensors.get("mask"),
            "seq_idx": tensors.get("seq_idx"),
            "cu_seqlens": tensors.get("cu_seqlens"),
        }

    def scale_values(self, values: torch.Tensor) -> torch.Tensor:
        """Divide real values by :attr:`value_scale`; mask (-1) and padding (-2) codes stay."""
        if self.value_scale == 1.0:
            return values
        return torch.where(values >= 0, values / self.value_scale, values)

    @auto_move_data
    def inference(
        self,
        genes: torch.Tensor,
        values: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        batch_index: torch.Tensor | None = None,
        targets: torch.Tensor | None = None,
        masked: torch.Tensor | None = None,
        seq_idx: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Encode tokenized cells, padded ``(batch, length)`` or packed ``(1, total)``.

        Parameters
        ----------
        genes
            ``(batch, length)`` gene token ids, ``<cls>`` first.
        values
            ``(batch, length)`` input values, already scaled (see :meth:`scale_values`; mask -1,
            padding -2).
        key_padding_mask
            ``(batch, length)``, True at padding.
        batch_index
            ``(batch,)`` batch of each cell (DSBN), or ``None``.
        targets, masked
            Passed through for the loss: true values and the masked positions.
        seq_idx, cu_seqlens
            Packed cells (:meth:`~scmamba2_scvi.data.Tokenizer.pack`): ``(1, total)`` cell index
            of each token and ``(batch + 1,)`` cell boundaries. No padding is computed; results
            equal the padded batch's.

        Returns
        -------
        ``z`` (``(batch, d_model)`` cell embedding), ``tokens`` (``(batch, length, d_model)``, or
        ``(1, total, d_model)`` packed), and the inputs the heads need.
        """
        packed = seq_idx is not None
        if packed and (cu_seqlens is None or genes.shape[0] != 1):
            raise ValueError("Packed input needs genes of shape (1, total) and cu_seqlens.")
        if packed and batch_index is not None and self.token_norm.n_domains > 1:
            raise ValueError("Domain-specific batch norm needs padded batches, not packed ones.")
        gene_emb = self.gene_norm(self.gene_embedding(genes))
        x = self.token_norm(gene_emb + self.value_encoder(values), key_padding_mask, batch_index)
        tokens = self.encoder(x, key_padding_mask=key_padding_mask, seq_idx=seq_idx)
        if packed:
            cell = seq_idx.reshape(-1).long()
            n_cells = cu_seqlens.numel() - 1
            if self.cell_embedding == "cls":
                z = tokens[0, cu_seqlens[:-1].long()]
            else:
                z = tokens.new_zeros(n_cells, tokens.shape[-1]).index_add_(0, cell, tokens[0])
                z = z / torch.diff(cu_seqlens).clamp(min=1).unsqueeze(-1).to(z.dtype)
        elif self.cell_embedding == "cls":
            z = tokens[:, 0]
        else:
            real = (
                torch.ones_like(genes, dtype=torch.bool)
                if key_padding_mask is None
                else ~key_padding_mask
            ).unsqueeze(-1)
            z = (tokens * real).sum(1) / real.sum(1).clamp(min=1)
        return {
            "z": z,
            "tokens": tokens,
            "gene_emb": gene_emb,
            "key_padding_mask": key_padding_mask,
            "batch_index": batch_index,
            "targets": targets,
            "masked": masked,
            "seq_idx": seq_idx,
            "cu_seqlens": cu_seqlens,
        }

    def _get_generative_input(self, tensors, inference_outputs) -> dict:
        return {
            "z": inference_outputs["z"],
            "tokens": inference_outputs["tokens"],
            "gene_emb": inference_outputs["gene_emb"],
            "seq_idx": inference_outputs.get("seq_idx"),
        }

    @auto_move_data
    def generative(
        self,
        z: torch.Tensor,
        tokens: torch.Tensor,
        gene_emb: torch.Tensor,
        seq_idx: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Heads: per-token values (GEP), gene-query values (GEPC), label and batch logits.

        With packed tokens (``seq_idx``), each token's gene query meets its own cell's embedding.
        """
        if seq_idx is None:
            gepc = self.query_decoder(z, gene_emb)
        else:
            cell_tokens = self.query_decoder.cell(z)[seq_idx.reshape(-1).long()]
            query = torch.sigmoid(self.query_decoder.query(gene_emb[0]))
            gepc = (query * cell_tokens).sum(-1).unsqueeze(0)
        out = {"gep": self.expr_decoder(tokens), "gepc": gepc}
        if self.classifier is not None:
            out["label_logits"] = self.classifier(z)
        if self.discriminator is not None:
            out["batch_logits"] = self.discriminator(z)
        return out

    def loss(
        self,
        tensors: dict[str, torch.Tensor],
        inference_outputs: dict[str, torch.Tensor],
        generative_outputs: dict[str, torch.Tensor],
        gep_weight: float = 1.0,
        gepc_weight: float = 1.0,
        cls_weight: float = 1.0,
        dar_weight: float = 0.0,
        ecs_weight: float = 0.0,
        ecs_threshold: float = 0.6,
    ) -> LossOutput:
        """Weighted sum of the objectives; each weight can be set through ``plan_kwargs``.

        Parameters
        ----------
        tensors, inference_outputs, generative_outputs
            scvi-tools' usual arguments.
        gep_weight
            Masked expression prediction from each token (MSE on masked values).
        gepc_weight
            Expression of each masked gene from the cell embedding and the gene query (MSE).
        cls_weight
            Cross-entropy of the cell-type classifier (labelled cells only).
        dar_weight
            Cross-entropy of the batch discriminator behind gradient reversal (integration).
        ecs_weight
            Elastic cell similarity: pushes cosine similarities of cells away from
            ``ecs_threshold`` (integration).
        ecs_threshold
            Threshold of the ECS term.

        Returns
        -------
        :class:`~scvi.module.base.LossOutput` with per-term values in ``extra_metrics``
        (``gep``, ``gepc``, ``masked_pearson``, and ``cls``/``accuracy``, ``dar``, ``ecs``).
        """
        targets, masked = inference_outputs["targets"], inference_outputs["masked"]
        z = inference_outputs["z"]
        seq_idx, cu_seqlens = inference_outputs.get("seq_idx"), inference_outputs.get("cu_seqlens")
        if masked is None or not bool(masked.any()):
            pad = inference_outputs["key_padding_mask"]
            masked = torch.ones_like(targets, dtype=torch.bool) if pad is None else ~pad
            if seq_idx is None:
                masked[:, 0] = False  # never <cls>
            else:
                masked[0, cu_seqlens[:-1].long()] = False
        masked = masked.float()
        n_cells = z.shape[0]
        gep = _masked_mse(generative_outputs["gep"], targets, masked, seq_idx, n_cells)
        gepc = _masked_mse(generative_outputs["gepc"], targets, masked, seq_idx, n_cells)
        total = gep_weight * gep.mean() + gepc_weight * gepc.mean()
        extra: dict[str, torch.Tensor] = {"gep": gep.mean().detach(), "gepc": gepc.mean().detach()}
        sel = masked.bool()
        extra["masked_pearson"] = _pearson(
            generative_outputs["gep"][sel].detach().float(), targets[sel].float()
        )

        labels = tensors.get(REGISTRY_KEYS.LABELS_KEY)
        labels = None if labels is None else labels.reshape(-1).long()
        if "label_logits" in generative_outputs and labels is not None:
            known = labels >= 0
            logits = generative_outputs["label_logits"]
            if bool(known.any()):
                ce = F.cross_entropy(logits[known], labels[known])
                total = total + cls_weight * ce
                extra["cls"] = ce.detach()
                extra["accuracy"] = (logits[known].argmax(-1) == labels[known]).float().mean()
        batch = inference_outputs["batch_index"]
        if "batch_logits" in generative_outputs and dar_weight > 0 and batch is not None:
            known = batch >= 0
            if bool(known.any()):
                dar = F.cross_entropy(generative_outputs["batch_logits"][known], batch[known])
                total = total + dar_weight * dar
                extra["dar"] = dar.detach()
        if ecs_weight > 0 and z.shape[0] > 1:
            zn = F.normalize(z, dim=-1)
            cos = (zn @ zn.T).masked_fill(
                torch.eye(z.shape[0], dtype=torch.bool, device=z.device), 0
            )
            ecs = torch.mean(1 - (F.relu(cos) - ecs_threshold) ** 2)
            total = total + ecs_weight * ecs
            extra["ecs"] = ecs.detach()
        return LossOutput(
            loss=total,
            reconstruction_loss={"gep": gep, "gepc": gepc},
            n_obs_minibatch=z.shape[0],
            extra_metrics=extra,
        )

    @torch.inference_mode()
    def sample(self, tensors: dict[str, torch.Tensor], n_samples: int = 1) -> torch.Tensor:
        """Point predictions of the tokens' values from the cell embedding (no noise model).

        Returns
        -------
        ``(n_samples, batch, length)`` GEPC predictions at the tokens of each cell.
        """
        _, gen = self.forward(tensors, compute_loss=False)[:2]
        pred = gen["gepc"] * self.value_scale
        return pred.expand(n_samples, *pred.shape)

    # ------------------------------------------------------------------ model-side helpers
    @torch.inference_mode()
    def predict_genes(self, z: torch.Tensor, gene_tokens: torch.Tensor) -> torch.Tensor:
        """GEPC predictions for a fixed gene set.

        Parameters
        ----------
        z
            ``(cells, d_model)`` cell embeddings.
        gene_tokens
            ``(n_genes,)`` vocabulary ids.

        Returns
        -------
        ``(cells, n_genes)`` predicted values (in the tokenizer's value space).
        """
        gene_emb = self.gene_norm(self.gene_embedding(gene_tokens.to(z.device)))
        return self.query_decoder(z, gene_emb) * self.value_scale

    def token_loss(
        self,
        tokens: dict[str, torch.Tensor],
        batch_index: torch.Tensor | None = None,
        **loss_kwargs: float,
    ) -> LossOutput:
        """Losses of a token dictionary: the module's contract (training and pretraining).

        Parameters
        ----------
        tokens
            Output of :class:`~scmamba2_scvi.data.TokenCollate` or
            :class:`~scmamba2_scvi.data.Tokenizer` (padded) or of its
            :meth:`~scmamba2_scvi.data.Tokenizer.pack` (packed: ``seq_idx`` and ``cu_seqlens``),
            masked by the tokenizer; may hold ``labels`` codes for the classifier.
        batch_index
            ``(batch,)`` batch of each cell (-1: unknown), or ``None``; default: ``tokens``'
            ``batch`` codes.
        **loss_kwargs
            Loss weights, see :meth:`loss`.

        Returns
        -------
        :class:`~scvi.module.base.LossOutput`, as :meth:`loss`.
        """
        if batch_index is not None:
            tokens = {**tokens, REGISTRY_KEYS.BATCH_KEY: batch_index}
        return self.forward(tokens, loss_kwargs=loss_kwargs)[2]
