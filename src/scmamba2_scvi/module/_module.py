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
    DecoderCovariates,
    DomainBatchNorm,
    ExprDecoder,
    GeneQueryDecoder,
    MLPClassifier,
    ValueEncoder,
)
from scmamba2_scvi.ops import Backend


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


def _per_cell_sum(x: torch.Tensor, seq_idx: torch.Tensor | None, n_cells: int) -> torch.Tensor:
    """Sum over each cell's tokens, feature dimensions kept: cells are rows, or packed in one."""
    if seq_idx is None:
        return x.sum(1)
    return x.new_zeros((n_cells, *x.shape[2:])).index_add_(0, seq_idx.reshape(-1).long(), x[0])


#: State-dict entries added after the first released format, with the prefixes that name them:
#: a state dict saved before them loads with their initial values (see ``_fill_new_entries``).
_NEW_ENTRIES = (
    "covariates.",
    "query_decoder.zero_cell.",
    "query_decoder.zero_gene.",
    "logit_temperature",
)


def _fill_new_entries(module, state_dict, prefix, *args) -> None:
    """``load_state_dict`` pre-hook letting state dicts saved before the new entries load.

    Entries of :data:`_NEW_ENTRIES` that ``state_dict`` lacks take the module's current values
    (the initial ones, for a new module).
    """
    for name, value in module.state_dict().items():
        if name.startswith(_NEW_ENTRIES) and prefix + name not in state_dict:
            state_dict[prefix + name] = value.detach().clone()


def depth_share(z: torch.Tensor, log_library: torch.Tensor) -> torch.Tensor:
    """Share of the variance of ``z`` ``(cells, dims)`` explained linearly by ``log_library``.

    The R² of the least-squares regression of every dimension on ``log_library`` ``(cells,)``,
    pooled over dimensions by their variance: the quantity scib's principal component
    regression measures with all components. 0 when fewer than two cells.
    """
    zc = z - z.mean(0)
    lc = (log_library - log_library.mean()).to(z.dtype)
    explained = (lc @ zc).pow(2).sum() / lc.pow(2).sum().clamp(min=1e-8)
    return explained / zc.pow(2).sum().clamp(min=1e-8)


def _pearson(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = a - a.mean(), b - b.mean()
    return (a * b).sum() / (a.norm() * b.norm()).clamp(min=1e-8)


class SCMamba2Module(BaseModuleClass):
    """Tensors in, losses out: the SC-MAMBA2 network (scvi-tools module).

    A cell is a sequence ``<cls>, gene_1, ..., gene_n`` of (gene token, expression value) pairs.
    Token = gene embedding (+ LayerNorm) + value embedding, then batch norm over features (one per
    batch with ``dsbn``), then a :class:`~scmamba2_scvi.nn.BiMamba2Encoder`. The cell embedding is
    the mean of the outputs over real tokens weighted by their values (or unweighted, or the
    output at ``<cls>``, as in the paper).
    Heads: masked expression (GEP), gene-query expression from the cell embedding (GEPC, a
    hurdle head: the value if expressed and the probability of a zero), cell-type classifier,
    batch discriminator (DAR). The decoders (GEP, GEPC) also read the cell's batch and log
    library size (:class:`~scmamba2_scvi.nn.DecoderCovariates`), so that the cell embedding
    need not carry them; the encoder and the cell embedding never see them.

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
        SSD backend, see :func:`scmamba2_scvi.ops.ssd_scan`.
    precision
        Encoder precision: ``"fp32"``, ``"bf16"`` (autocast) or ``"auto"`` (bfloat16 where it
        makes the encoder faster, see :func:`~scmamba2_scvi.nn.bf16_pays`).
    value_encoding
        ``"continuous"`` or ``"categorical"`` value embedding.
    n_bins
        Value bins (categorical encoding).
    dsbn
        Domain-specific batch norm (one per batch).
    cell_embedding
        ``"weighted"`` (the default): mean of the encoder's outputs weighted by each token's
        input value (masked tokens and ``<cls>`` weigh nothing), so that the more a gene is
        expressed the more it counts, as in a linear projection of the expression values;
        ``"mean"``: their plain mean over real tokens. With either, the outputs of (unmasked)
        tokens receive the cell-level gradient, which trains faster on small data than
        ``"cls"``: the output at ``<cls>``, as in the paper.
    mask_ratio
        Fraction of values masked for the GEP objective in training and validation (the
        model's loader masks them; the module only records the ratio).
    value_scale
        Values are divided by this inside the module (inputs and targets; mask and padding
        markers excepted) so that losses are of order one, e.g. ``n_bins - 1`` for binned values;
        predictions are returned on the original scale.
    batch_decoder
        Give the decoders an embedding of the cell's batch (with ``n_batch > 1``).
    library_decoder
        Give the decoders the cell's ``log1p`` total count (``log_library`` of the tokens).
    zero_genes
        Non-expressed genes the model's loader draws per cell in training (``zero_genes`` of
        the tokens): the negatives of GEPC's zero probability. The module only records it.

    Notes
    -----
    Buffer ``logit_temperature`` (scalar, 1.0) divides the classifier's logits for calibrated
    probabilities (``predict(soft=True)``); it does not enter the training loss.
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
        backend: Backend = "auto",
        precision: Literal["auto", "fp32", "bf16"] = "auto",
        value_encoding: Literal["continuous", "categorical"] = "continuous",
        n_bins: int = 51,
        dsbn: bool = False,
        cell_embedding: Literal["cls", "mean", "weighted"] = "weighted",
        mask_ratio: float = 0.15,
        value_scale: float = 1.0,
        batch_decoder: bool = True,
        library_decoder: bool = True,
        zero_genes: int = 64,
    ):
        super().__init__()
        if cell_embedding not in ("cls", "mean", "weighted"):
            raise ValueError(
                f"cell_embedding must be 'cls', 'mean' or 'weighted'; got {cell_embedding!r}."
            )
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1); got {mask_ratio}.")
        if isinstance(zero_genes, bool) or not isinstance(zero_genes, int) or zero_genes < 0:
            raise ValueError(f"zero_genes must be a non-negative integer; got {zero_genes!r}.")
        self.zero_genes = zero_genes
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
        self.covariates = DecoderCovariates(d_model, n_batch, batch_decoder, library_decoder)
        self.classifier = MLPClassifier(d_model, n_labels, dropout) if n_labels > 0 else None
        self.discriminator = MLPClassifier(d_model, n_batch, dropout) if n_batch > 1 else None
        self.register_buffer("logit_temperature", torch.tensor(1.0))
        self.register_load_state_dict_pre_hook(_fill_new_entries)

    # ------------------------------------------------------------------ scvi-tools interface
    def _get_inference_input(self, tensors: dict[str, torch.Tensor]) -> dict:
        """Inputs of :meth:`inference` from a token dictionary (padded or packed).

        ``tensors`` holds the tokenizer's keys (``genes``, ``values``, ``input_values``,
        ``mask``, ``key_padding_mask``, and ``seq_idx``/``cu_seqlens`` when packed, and
        ``log_library``) and optionally ``batch`` codes ``(b,)``.
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
            "log_library": tensors.get("log_library"),
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
        log_library: torch.Tensor | None = None,
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
        log_library
            ``(batch,)`` log1p total count of each cell, passed through for the decoders.

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
        if self.cell_embedding == "cls":
            z = tokens[0, cu_seqlens[:-1].long()] if packed else tokens[:, 0]
        else:
            z = self._pool(tokens, values, key_padding_mask, seq_idx, cu_seqlens)
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
            "log_library": log_library,
        }

    def _pool(self, tokens, values, key_padding_mask, seq_idx, cu_seqlens) -> torch.Tensor:
        """Mean of the outputs over real tokens, or weighted by input value (``"weighted"``)."""
        if self.cell_embedding == "weighted":  # masked (-1), padding (-2), <cls> (0): weight 0
            w = values.clamp(min=0).to(tokens.dtype)
        elif key_padding_mask is None:
            w = torch.ones(values.shape, dtype=tokens.dtype, device=tokens.device)
        else:
            w = (~key_padding_mask).to(tokens.dtype)
        n_cells = tokens.shape[0] if seq_idx is None else cu_seqlens.numel() - 1
        z = _per_cell_sum(tokens * w.unsqueeze(-1), seq_idx, n_cells)
        return z / _per_cell_sum(w, seq_idx, n_cells).clamp(min=1e-6).unsqueeze(-1)

    def _get_generative_input(self, tensors, inference_outputs) -> dict:
        return {
            "z": inference_outputs["z"],
            "tokens": inference_outputs["tokens"],
            "gene_emb": inference_outputs["gene_emb"],
            "seq_idx": inference_outputs.get("seq_idx"),
            "batch_index": inference_outputs.get("batch_index"),
            "log_library": inference_outputs.get("log_library"),
            "zero_genes": tensors.get("zero_genes"),
        }

    @auto_move_data
    def generative(
        self,
        z: torch.Tensor,
        tokens: torch.Tensor,
        gene_emb: torch.Tensor,
        seq_idx: torch.Tensor | None = None,
        batch_index: torch.Tensor | None = None,
        log_library: torch.Tensor | None = None,
        zero_genes: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Heads: per-token values (GEP), gene-query values (GEPC), label and batch logits.

        The decoders read the cell embedding plus the decoder covariates of ``batch_index`` and
        ``log_library``. With packed tokens (``seq_idx``), each token's gene query meets its own
        cell's embedding. ``zero_genes`` ``(batch, k)`` adds GEPC's zero logits of those genes.
        The discriminator gives two sets of logits: ``batch_logits`` on the detached embedding
        (trains the discriminator only) and ``batch_logits_encoder`` with the discriminator's
        parameters detached (trains the encoder only).
        """
        cov = self.covariates(z.shape[0], batch_index, log_library, like=z)
        cell = z if cov is None else z + cov
        if seq_idx is None:
            dec_tokens = tokens if cov is None else tokens + cov.unsqueeze(1)
            value, zero_logit = self.query_decoder(cell, gene_emb)
        else:
            cell_of_token = seq_idx.reshape(-1).long()
            if cov is not None:  # index_select: see ``GeneQueryDecoder.per_token``
                dec_tokens = tokens + cov.index_select(0, cell_of_token).unsqueeze(0)
            else:
                dec_tokens = tokens
            value, zero_logit = self.query_decoder.per_token(cell, gene_emb[0], cell_of_token)
            value, zero_logit = value.unsqueeze(0), zero_logit.unsqueeze(0)
        out = {"gep": self.expr_decoder(dec_tokens), "gepc": value, "gepc_zero_logit": zero_logit}
        if zero_genes is not None:
            zero_emb = self.gene_norm(self.gene_embedding(zero_genes))
            out["zero_gene_logit"] = self.query_decoder(cell, zero_emb)[1]
        if self.classifier is not None:
            out["label_logits"] = self.classifier(z)
        if self.discriminator is not None:
            out["batch_logits"] = self.discriminator(z.detach())
            frozen = {k: v.detach() for k, v in self.discriminator.named_parameters()}
            out["batch_logits_encoder"] = torch.func.functional_call(
                self.discriminator, frozen, (z,)
            )
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
        zero_weight: float = 1.0,
        depth_weight: float = 0.0,
        label_weights: torch.Tensor | None = None,
    ) -> LossOutput:
        """Weighted sum of the objectives; each weight can be set through ``plan_kwargs``.

        Parameters
        ----------
        tensors, inference_outputs, generative_outputs
            scvi-tools' usual arguments.
        gep_weight
            Masked expression prediction from each token (MSE on masked values).
        gepc_weight
            Expression of each masked expressed gene from the cell embedding and the gene query
            (MSE of GEPC's value if expressed).
        cls_weight
            Cross-entropy of the cell-type classifier (labelled cells only).
        dar_weight
            Batch confusion of the encoder (integration): cross-entropy between the batch
            discriminator's posterior on the cell embedding and the uniform distribution over
            batches, smallest when the discriminator cannot tell batches apart; only the encoder
            receives its gradient. The discriminator itself always learns (plain cross-entropy
            on the detached embedding, added with weight 1; it moves only its own parameters).
        ecs_weight
            Elastic cell similarity: pushes cosine similarities of cells away from
            ``ecs_threshold`` (integration).
        ecs_threshold
            Threshold of the ECS term.
        zero_weight
            Binary cross-entropy of GEPC's zero probability over each cell's genes, estimated
            from its masked genes (zero or not) and the sampled non-expressed ``zero_genes`` of
            the tokens, each weighted by the share of the cell's genes it stands for (so the
            probability is calibrated, not that of the sample's mix). Computed when the batch
            holds a zero target (without one it could only learn "always expressed").
        depth_weight
            Sequencing depth out of the cell embedding: the share of the minibatch embeddings'
            variance explained linearly by the cells' log library size (:func:`depth_share`),
            which the encoder lowers. A token model sees more genes in a deeper cell, so its
            mean-pooled embedding drifts with depth unless told otherwise; the decoders read
            the library size themselves (``library_decoder``). Off by default: depth often goes
            with biology (RNA content differs between cell types and along differentiation),
            and taking it out lowered the quality of the benchmark's trajectory and integration
            embeddings; for data where depth is only technical.
        label_weights
            ``(n_labels,)`` weight of each class in the classifier's cross-entropy (e.g.
            inverse class frequencies for class balance); ``None``: equal weights.

        Returns
        -------
        :class:`~scvi.module.base.LossOutput` with per-term values in ``extra_metrics``
        (``gep``, ``gepc``, ``masked_pearson``, and ``gepc_zero``, ``cls``/``accuracy``, ``dar``
        (discriminator cross-entropy)/``dar_confusion``, ``ecs``, ``depth`` when computed).
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
        sel = masked
        masked = masked.float()
        n_cells = z.shape[0]
        gep = _masked_mse(generative_outputs["gep"], targets, masked, seq_idx, n_cells)
        expressed = masked * (targets > 0)
        gepc = _masked_mse(generative_outputs["gepc"], targets, expressed, seq_idx, n_cells)
        total = gep_weight * gep.mean() + gepc_weight * gepc.mean()
        extra: dict[str, torch.Tensor] = {"gep": gep.mean().detach(), "gepc": gepc.mean().detach()}
        recon = {"gep": gep, "gepc": gepc}
        zero = self._zero_loss(tensors, generative_outputs, targets, masked, seq_idx, n_cells)
        if zero is not None:
            total = total + zero_weight * zero.mean()
            extra["gepc_zero"] = zero.mean().detach()
            recon["gepc_zero"] = zero
        else:  # the zero head stays in the graph: DistributedDataParallel needs every parameter
            total = total + 0.0 * generative_outputs["gepc_zero_logit"].sum()
        extra["masked_pearson"] = _pearson(
            generative_outputs["gep"][sel].detach().float(), targets[sel].float()
        )

        labels = tensors.get(REGISTRY_KEYS.LABELS_KEY)
        labels = None if labels is None else labels.reshape(-1).long()
        if "label_logits" in generative_outputs and labels is not None:
            known = labels >= 0
            logits = generative_outputs["label_logits"]
            if bool(known.any()):
                weight = None if label_weights is None else label_weights.to(logits)
                ce = F.cross_entropy(logits[known], labels[known], weight=weight)
                total = total + cls_weight * ce
                extra["cls"] = ce.detach()
                extra["accuracy"] = (logits[known].argmax(-1) == labels[known]).float().mean()
        batch = inference_outputs["batch_index"]
        if "batch_logits" in generative_outputs and batch is not None:
            known = batch >= 0
            if bool(known.any()):
                dar = F.cross_entropy(generative_outputs["batch_logits"][known], batch[known])
                log_p = F.log_softmax(generative_outputs["batch_logits_encoder"][known], -1)
                confusion = -log_p.mean(-1).mean()  # cross-entropy with the uniform posterior
                total = total + dar
                if dar_weight > 0:
                    total = total + dar_weight * confusion
                extra["dar"] = dar.detach()
                extra["dar_confusion"] = confusion.detach()
        log_library = inference_outputs.get("log_library")
        if depth_weight > 0 and log_library is not None and z.shape[0] > 2:
            depth = depth_share(z.float(), log_library.reshape(-1).float())
            total = total + depth_weight * depth
            extra["depth"] = depth.detach()
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
            reconstruction_loss=recon,
            n_obs_minibatch=z.shape[0],
            extra_metrics=extra,
        )

    @staticmethod
    def _zero_loss(
        tensors: dict[str, torch.Tensor],
        generative_outputs: dict[str, torch.Tensor],
        targets: torch.Tensor,
        masked: torch.Tensor,
        seq_idx: torch.Tensor | None,
        n_cells: int,
    ) -> torch.Tensor | None:
        """Per-cell BCE of GEPC's zero logit, an estimate of its mean over the cell's genes.

        The masked tokens are a uniform sample of the cell's gene tokens (``n_tokens``) and the
        zero genes one of its ``n_zero_candidates`` other zeros: each term is weighted by the
        genes it stands for. ``None`` when the batch holds no zero target.
        """
        is_zero = (targets == 0).float()
        masked = masked.float()
        bce = F.binary_cross_entropy_with_logits(
            generative_outputs["gepc_zero_logit"].float(), is_zero, reduction="none"
        )
        n_masked = _per_cell_sum(masked, seq_idx, n_cells)
        pad = tensors.get("key_padding_mask")
        real = torch.ones_like(masked) if pad is None else (~pad).float()
        n_tokens = _per_cell_sum(real, seq_idx, n_cells) - 1  # without <cls>
        w_tok = n_tokens / n_masked.clamp(min=1)
        total = w_tok * _per_cell_sum(bce * masked, seq_idx, n_cells)
        weight = w_tok * n_masked
        has_zero = bool((is_zero * masked).any())
        if "zero_gene_logit" in generative_outputs:
            logit = generative_outputs["zero_gene_logit"].float()
            pad0 = tensors.get("zero_padding_mask")
            real0 = torch.ones_like(logit) if pad0 is None else (~pad0).float()
            n_sampled = real0.sum(1)
            n_cand = tensors.get("n_zero_candidates")
            n_cand = n_sampled if n_cand is None else n_cand.reshape(-1).float()
            w_zero = n_cand / n_sampled.clamp(min=1)
            ones = torch.ones_like(logit)
            bce0 = F.binary_cross_entropy_with_logits(logit, ones, reduction="none")
            total = total + w_zero * (bce0 * real0).sum(1)
            weight = weight + w_zero * n_sampled
            has_zero = has_zero or bool(real0.any())
        if not has_zero:
            return None
        return total / weight.clamp(min=1)

    @torch.inference_mode()
    def sample(self, tensors: dict[str, torch.Tensor], n_samples: int = 1) -> torch.Tensor:
        """Point predictions of the tokens' values from the cell embedding (no noise model).

        Returns
        -------
        ``(n_samples, batch, length)`` GEPC expected values (``P(expressed) * max(value, 0)``)
        at the tokens of each cell.
        """
        _, gen = self.forward(tensors, compute_loss=False)[:2]
        pred = self.query_decoder.expected(gen["gepc"], gen["gepc_zero_logit"]) * self.value_scale
        return pred.expand(n_samples, *pred.shape)

    # ------------------------------------------------------------------ model-side helpers
    @torch.no_grad()
    def init_gene_embedding(
        self, tokens: torch.Tensor, vectors: torch.Tensor, noise: float = 0.1
    ) -> None:
        """Start the embeddings of ``tokens`` from ``vectors`` (e.g. genes' PCA loadings).

        Parameters
        ----------
        tokens
            ``(n,)`` vocabulary ids.
        vectors
            ``(n, k)`` with ``k <= d_model``: they fill the first ``k`` features, rescaled to a
            root mean square of one, the scale of the default ``N(0, 1)`` start, so that their
            relative lengths stay.
        noise
            ``noise * N(0, 1)`` is added to every feature of these rows, so that the features
            beyond ``k`` and genes with near-zero vectors still differ.
        """
        weight = self.gene_embedding.weight
        n, k = vectors.shape
        if tokens.shape != (n,) or k > weight.shape[1]:
            raise ValueError(
                f"tokens must be ({n},) and vectors (n, k <= {weight.shape[1]}); got "
                f"{tuple(tokens.shape)} and {tuple(vectors.shape)}."
            )
        vectors = vectors.to(weight)
        rows = noise * torch.randn(n, weight.shape[1], dtype=weight.dtype, device=weight.device)
        rows[:, :k] += vectors / vectors.pow(2).mean().sqrt().clamp_min(1e-12)
        weight[tokens.to(weight.device)] = rows

    @torch.inference_mode()
    def predict_genes(
        self,
        z: torch.Tensor,
        gene_tokens: torch.Tensor,
        offset: torch.Tensor | None = None,
        quantity: Literal["expected", "value", "p_expressed"] = "expected",
    ) -> torch.Tensor:
        """GEPC predictions for a fixed gene set.

        Parameters
        ----------
        z
            ``(cells, d_model)`` cell embeddings.
        gene_tokens
            ``(n_genes,)`` vocabulary ids.
        offset
            ``(cells, d_model)`` decoder covariates of the cells (:attr:`covariates`), or
            ``None`` for none.
        quantity
            ``"expected"``: ``P(expressed) * max(value, 0)``, the mean prediction with zeros
            counted;
            ``"value"``: the value if expressed; ``"p_expressed"``: the probability that the
            gene is expressed.

        Returns
        -------
        ``(cells, n_genes)`` predictions (values in the tokenizer's value space).
        """
        gene_emb = self.gene_norm(self.gene_embedding(gene_tokens.to(z.device)))
        cell = z if offset is None else z + offset.to(z)
        value, zero_logit = self.query_decoder(cell, gene_emb)
        if quantity == "p_expressed":
            return torch.sigmoid(-zero_logit)
        if quantity == "value":
            return value * self.value_scale
        if quantity == "expected":
            return self.query_decoder.expected(value, zero_logit) * self.value_scale
        raise ValueError(
            f"quantity must be 'expected', 'value' or 'p_expressed'; got {quantity!r}."
        )

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
