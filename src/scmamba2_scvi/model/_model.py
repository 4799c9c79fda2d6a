"""SCMamba2: the user-facing scvi-tools model (AnnData in, embeddings and predictions out)."""

from __future__ import annotations

import inspect
import logging
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from anndata import AnnData
from scipy import sparse
from scvi import REGISTRY_KEYS
from scvi.data import AnnDataManager
from scvi.data.fields import CategoricalObsField, LabelsWithUnlabeledObsField, LayerField
from scvi.model._utils import parse_device_args
from scvi.model.base import BaseModelClass, UnsupervisedTrainingMixin
from scvi.model.base._save_load import _load_saved_files
from tqdm.auto import tqdm

from scmamba2_scvi.data import GeneVocab, Tokenizer, check_counts
from scmamba2_scvi.module import SCMamba2Module

from ._trainingplan import SCMamba2TrainingPlan

logger = logging.getLogger(__name__)

#: Named architecture sizes. ``"cpu-small"`` trains in minutes on a laptop CPU; the ``"paper-*"``
#: presets are the sizes of the SC-MAMBA2 paper's released scripts (GPU).
PRESETS: dict[str, dict[str, Any]] = {
    "cpu-small": {"d_model": 128, "n_layers": 2, "d_state": 32, "head_dim": 64, "expand": 2},
    "default": {"d_model": 256, "n_layers": 4, "d_state": 64, "head_dim": 64, "expand": 2},
    "paper-medium": {
        "d_model": 768,
        "n_layers": 24,
        "d_state": 64,
        "head_dim": 64,
        "expand": 2,
        "checkpointing": True,
    },
    "paper-large": {
        "d_model": 1536,
        "n_layers": 36,
        "d_state": 64,
        "head_dim": 64,
        "expand": 2,
        "checkpointing": True,
    },
}
_SIZE_KEYS = ("d_model", "n_layers", "d_state", "head_dim", "expand", "checkpointing")


def _matrix(adata: AnnData, layer: str | None):
    if layer is None:
        return adata.X
    if layer not in adata.layers:
        raise KeyError(
            f"Layer {layer!r} is not in adata.layers (available: {list(adata.layers.keys())}). "
            "Pass the layer that holds raw counts, or layer=None to use adata.X."
        )
    return adata.layers[layer]


def _validate_counts(X, where: str, check: bool, chunk: int = 20000) -> None:
    """Counts check (NaN, negative, non-integer) and empty-cell check, chunk by chunk."""
    n_empty = 0
    for start in range(0, X.shape[0], chunk):
        block = X[start : start + chunk]
        if not sparse.issparse(block):
            block = np.asarray(block)
        if check:
            try:
                check_counts(block)
            except ValueError as e:
                raise ValueError(f"{where}: {e}") from None
        else:
            data = block.data if sparse.issparse(block) else block
            if not np.isfinite(data).all():
                raise ValueError(f"{where} contains NaN or infinite values; remove or fix them.")
        n_empty += int((np.asarray(abs(block).sum(1)).ravel() == 0).sum())
    if n_empty:
        raise ValueError(
            f"{where} has {n_empty} cell(s) with no counts at all: they have no expressed gene to "
            "read. Remove them first, e.g. `sc.pp.filter_cells(adata, min_counts=1)`."
        )


def build_module(
    n_vocab: int, n_batch: int, n_labels: int, params: dict[str, Any]
) -> tuple[SCMamba2Module, dict[str, Any]]:
    """The network of an :class:`SCMamba2` with arguments ``params``; also its resolved sizes.

    ``params`` holds :class:`SCMamba2`'s keyword arguments (missing ones take their defaults);
    the preset's sizes apply unless a size is given. Used by :class:`SCMamba2` and by
    :func:`~scmamba2_scvi.model.pretrain`, so both build the same architecture.
    """
    defaults = {
        name: p.default
        for name, p in inspect.signature(SCMamba2.__init__).parameters.items()
        if p.default is not inspect.Parameter.empty
    }
    params = {**defaults, **{k: v for k, v in params.items() if k in defaults}}
    preset = params["preset"]
    if preset not in PRESETS:
        raise ValueError(f"Unknown preset {preset!r}; choose one of {list(PRESETS)}.")
    sizes = {"checkpointing": False, **PRESETS[preset]}
    sizes.update({k: params[k] for k in _SIZE_KEYS if params[k] is not None})
    options = (
        "d_conv n_groups chunk_size bidirectional ffn dropout backend value_encoding n_bins dsbn "
        "cell_embedding mask_ratio"
    ).split()
    module = SCMamba2Module(
        n_vocab,
        n_batch=n_batch,
        n_labels=n_labels,
        value_scale=params["n_bins"] - 1 if params["value_transform"] == "bin" else 1.0,
        **{k: params[k] for k in options},
        **sizes,
    )
    return module, sizes


class SCMamba2(UnsupervisedTrainingMixin, BaseModelClass):
    """SC-MAMBA2: a bidirectional Mamba2 single-cell foundation model, as an scvi-tools model.

    Each cell is read as one sequence of (gene, expression) tokens, whole-transcriptome if asked,
    at a cost linear in its length. The model learns by masked expression modelling (GEP, GEPC),
    plus a cell-type classifier when labels are registered, and optionally an adversarial batch
    discriminator (DAR) and domain-specific batch norm (DSBN) for integration.

    Parameters
    ----------
    adata
        AnnData registered with :meth:`setup_anndata`.
    preset
        Architecture sizes: ``"cpu-small"`` (128 x 2), ``"default"`` (256 x 4),
        ``"paper-medium"`` (768 x 24), ``"paper-large"`` (1536 x 36). Any size argument given
        explicitly overrides the preset.
    d_model, n_layers, d_state, head_dim, expand, checkpointing
        Architecture sizes (``None``: from the preset).
    d_conv, n_groups, chunk_size, bidirectional, ffn, dropout, backend
        Encoder options, see :class:`~scmamba2_scvi.nn.BiMamba2Encoder`.
    value_encoding, n_bins, dsbn, cell_embedding, mask_ratio
        Module options, see :class:`~scmamba2_scvi.module.SCMamba2Module`.
    mode, max_len, gene_order, subsample, value_transform
        How a cell becomes a sequence, see :class:`~scmamba2_scvi.data.Tokenizer`. Default:
        expressed genes in vocabulary order, at most 2,048 tokens, quantile-binned values.
    min_gene_fraction
        Fewest fraction of an AnnData's genes that must map to the vocabulary.
    vocab
        Gene vocabulary (a :class:`~scmamba2_scvi.data.GeneVocab` or its ``to_dict()``); default:
        built from ``adata``. Saved with the model, so other data can be mapped onto it.
    label_categories, batch_categories
        Categories of the classifier and of the batch heads; default: from ``adata``'s registry.
        Set by :meth:`load_query_data` to the reference's.

    Examples
    --------
    >>> SCMamba2.setup_anndata(adata, layer="counts", batch_key="donor", labels_key="cell_type")
    >>> model = SCMamba2(adata)
    >>> model.train()
    >>> adata.obsm["X_scmamba2"] = model.get_latent_representation()
    >>> adata.obs["scmamba2_label"] = model.predict()
    """

    _module_cls = SCMamba2Module
    _training_plan_cls = SCMamba2TrainingPlan

    def __init__(
        self,
        adata: AnnData | None = None,
        preset: str = "default",
        *,
        d_model: int | None = None,
        n_layers: int | None = None,
        d_state: int | None = None,
        head_dim: int | None = None,
        expand: int | None = None,
        checkpointing: bool | None = None,
        d_conv: int = 4,
        n_groups: int = 1,
        chunk_size: int = 64,
        bidirectional: Literal["shared_flip", "hydra"] = "shared_flip",
        ffn: bool = False,
        dropout: float = 0.1,
        backend: Literal["auto", "torch", "mamba_ssm"] = "auto",
        value_encoding: Literal["continuous", "categorical"] = "continuous",
        n_bins: int = 51,
        dsbn: bool = False,
        cell_embedding: Literal["cls", "mean"] = "mean",
        mask_ratio: float = 0.15,
        mode: Literal["expressed", "full", "genes"] = "expressed",
        max_len: int | None = 2048,
        gene_order: Literal["vocab", "genomic", "expression", "random"] = "vocab",
        subsample: Literal["random", "top"] = "random",
        value_transform: Literal["bin", "log1p", "raw"] = "bin",
        min_gene_fraction: float = 0.5,
        vocab: GeneVocab | dict | None = None,
        label_categories: Sequence[str] | None = None,
        batch_categories: Sequence[str] | None = None,
    ):
        if adata is None:
            raise ValueError("SCMamba2 needs an AnnData registered with SCMamba2.setup_anndata.")
        if preset not in PRESETS:
            raise ValueError(f"Unknown preset {preset!r}; choose one of {list(PRESETS)}.")
        super().__init__(adata)
        setup = self.adata_manager.registry["setup_args"]
        if vocab is None:
            vocab = GeneVocab.from_anndata(adata, gene_key=setup.get("gene_key"))
        elif isinstance(vocab, dict):
            vocab = GeneVocab.from_dict(vocab)
        self.vocab = vocab
        if batch_categories is None:
            batch_categories = self._registry_categories(REGISTRY_KEYS.BATCH_KEY, "batch_key")
        if label_categories is None:
            label_categories = self._registry_categories(REGISTRY_KEYS.LABELS_KEY, "labels_key")
        self.batch_categories = [str(c) for c in batch_categories]
        self.label_categories = [str(c) for c in label_categories]
        self.tokenizer_kwargs = {
            "mode": mode,
            "max_len": max_len,
            "gene_order": gene_order,
            "subsample": subsample,
            "value_transform": value_transform,
            "n_bins": n_bins,
            "check_counts": setup.get("check_counts", True),
        }
        self.min_gene_fraction = min_gene_fraction

        self.module, sizes = build_module(
            len(vocab), len(self.batch_categories), len(self.label_categories), locals()
        )
        self._attach_training_data()
        n_params = sum(p.numel() for p in self.module.parameters())
        self._model_summary_string = (
            f"SCMamba2 ({preset}): d_model={sizes['d_model']}, n_layers={sizes['n_layers']}, "
            f"{bidirectional}, {n_params / 1e6:.2f}M parameters; vocabulary {vocab.n_genes} "
            f"genes; mode={mode}, max_len={max_len}; {len(self.label_categories)} labels, "
            f"{len(self.batch_categories)} batches."
        )
        self.init_params_ = self._get_init_params(locals())
        # Saved with the model so that load() / load_query_data() rebuild the same heads and map
        # any data onto the same vocabulary.
        self.init_params_["non_kwargs"].update(
            vocab=vocab.to_dict(),
            label_categories=self.label_categories,
            batch_categories=self.batch_categories,
        )

    # ------------------------------------------------------------------ setup
    @classmethod
    def setup_anndata(
        cls,
        adata: AnnData,
        layer: str | None = None,
        batch_key: str | None = None,
        labels_key: str | None = None,
        unlabeled_category: str = "Unknown",
        gene_key: str | None = None,
        check_counts: bool = True,
        **kwargs,
    ) -> None:
        """Register an AnnData with the model.

        Parameters
        ----------
        adata
            Cells x genes. Not modified except for scvi-tools' registry columns in ``obs``.
        layer
            Layer holding raw counts; ``None`` uses ``adata.X``.
        batch_key
            ``obs`` column of batches (DSBN and the adversarial discriminator).
        labels_key
            ``obs`` column of cell types (the classifier). Cells whose label is
            ``unlabeled_category`` are not used by the classifier.
        unlabeled_category
            Label of unlabelled cells.
        gene_key
            ``var`` column with gene IDs or symbols; default ``var_names``.
        check_counts
            Require raw counts (finite, non-negative integers). ``False`` accepts normalised
            values (use with ``value_transform="bin"`` or ``"raw"``).
        **kwargs
            Passed to :meth:`~scvi.data.AnnDataManager.register_fields`.

        Raises
        ------
        KeyError
            For a layer, ``obs`` or ``var`` key that does not exist.
        ValueError
            For non-count data, NaN, or cells without any count.
        """
        setup_method_args = cls._get_setup_method_args(**locals())
        for key, table, what in (
            (batch_key, adata.obs, "obs"),
            (labels_key, adata.obs, "obs"),
            (gene_key, adata.var, "var"),
        ):
            if key is not None and key not in table.columns:
                raise KeyError(
                    f"{key!r} is not a column of adata.{what} "
                    f"(columns: {list(table.columns)[:20]})."
                )
        X = _matrix(adata, layer)
        _validate_counts(
            X, "adata.X" if layer is None else f"adata.layers[{layer!r}]", check_counts
        )
        fields = [
            LayerField(REGISTRY_KEYS.X_KEY, layer, is_count_data=check_counts),
            CategoricalObsField(REGISTRY_KEYS.BATCH_KEY, batch_key),
            LabelsWithUnlabeledObsField(REGISTRY_KEYS.LABELS_KEY, labels_key, unlabeled_category)
            if labels_key is not None
            else CategoricalObsField(REGISTRY_KEYS.LABELS_KEY, None),
        ]
        adata_manager = AnnDataManager(fields=fields, setup_method_args=setup_method_args)
        adata_manager.register_fields(adata, **kwargs)
        cls.register_manager(adata_manager)

    def _registry_categories(self, registry_key: str, setup_key: str) -> list[str]:
        if self.adata_manager.registry["setup_args"].get(setup_key) is None:
            return []
        state = self.adata_manager.get_state_registry(registry_key)
        unlabeled = state.get("unlabeled_category")
        return [str(c) for c in state.categorical_mapping if c != unlabeled]

    def _code_map(
        self, registry_key: str, setup_key: str, categories: list[str]
    ) -> torch.Tensor | None:
        """Registry code -> index in ``categories`` (-1 when absent) for the training AnnData."""
        if not categories or self.adata_manager.registry["setup_args"].get(setup_key) is None:
            return None
        mapping = self.adata_manager.get_state_registry(registry_key).categorical_mapping
        index = {c: i for i, c in enumerate(categories)}
        return torch.tensor([index.get(str(c), -1) for c in mapping], dtype=torch.long)

    def _tokenizer(self, adata: AnnData, *, seed: int | None = None, report: bool = False):
        gene_key = self.adata_manager.registry["setup_args"].get("gene_key")
        if gene_key is not None and gene_key not in adata.var.columns:
            gene_key = None
        ids, rep = self.vocab.map(
            adata, gene_key, min_fraction=self.min_gene_fraction, return_report=True
        )
        if report:
            logger.info("Gene mapping onto the model's vocabulary:\n%s", rep)
        return Tokenizer(ids, self.vocab, seed=seed, **self.tokenizer_kwargs), rep

    def _attach_training_data(self) -> None:
        tokenizer, self.gene_report_ = self._tokenizer(self.adata, report=True)
        self.module.tokenizer = tokenizer
        self.module.label_map = self._code_map(
            REGISTRY_KEYS.LABELS_KEY, "labels_key", self.label_categories
        )
        self.module.batch_map = self._code_map(
            REGISTRY_KEYS.BATCH_KEY, "batch_key", self.batch_categories
        )

    # ------------------------------------------------------------------ training
    def train(
        self,
        max_epochs: int | None = None,
        max_steps: int | None = None,
        accelerator: str = "auto",
        devices: int | list[int] | str = "auto",
        train_size: float = 0.9,
        validation_size: float | None = None,
        batch_size: int = 64,
        early_stopping: bool = False,
        plan_kwargs: dict | None = None,
        datasplitter_kwargs: dict | None = None,
        **trainer_kwargs,
    ):
        """Train (pretrain or fine-tune) the model.

        Parameters
        ----------
        max_epochs
            Epochs; default ``clip(20000 / n_cells, 5, 50)``.
        max_steps
            Stop after this many optimizer steps (overrides ``max_epochs`` when reached first).
        accelerator, devices
            Lightning's; ``"auto"`` picks a GPU when there is one.
        train_size, validation_size
            Random split of the cells; validation losses appear in :attr:`history`.
        batch_size
            Cells per minibatch.
        early_stopping
            Stop when the validation loss stops improving.
        plan_kwargs
            :class:`~scmamba2_scvi.model.SCMamba2TrainingPlan` arguments: ``lr``,
            ``weight_decay``, ``warmup_ratio``, and the loss weights ``gep_weight``,
            ``gepc_weight``, ``cls_weight``, ``dar_weight``, ``ecs_weight``.
        datasplitter_kwargs
            Passed to scvi-tools' ``DataSplitter``.
        **trainer_kwargs
            Passed to the Lightning trainer. Defaults: ``gradient_clip_val=1.0``, and
            ``precision="bf16-mixed"`` on CUDA, validation every epoch.
        """
        if max_epochs is None:
            max_epochs = int(np.clip(20000 // max(1, self.adata.n_obs), 5, 50))
        if max_steps is not None:
            trainer_kwargs["max_steps"] = max_steps
        trainer_kwargs.setdefault("gradient_clip_val", 1.0)
        if train_size < 1.0 or validation_size:
            trainer_kwargs.setdefault("check_val_every_n_epoch", 1)
        if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
            trainer_kwargs.setdefault("precision", "bf16-mixed")
        self._attach_training_data()
        if self.history_ is None:  # weights given by load_query_data: the history starts here
            self.is_trained_ = False
        return super().train(
            max_epochs=max_epochs,
            accelerator=accelerator,
            devices=devices,
            train_size=train_size,
            validation_size=validation_size,
            batch_size=batch_size,
            early_stopping=early_stopping,
            plan_kwargs=plan_kwargs,
            datasplitter_kwargs=datasplitter_kwargs,
            **trainer_kwargs,
        )

    # ------------------------------------------------------------------ inference
    def _batches(
        self,
        adata: AnnData | None,
        indices: Sequence[int] | None,
        batch_size: int | None,
        desc: str,
        tokenizer: Tokenizer | None = None,
    ) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor, np.ndarray]]:
        """Tokenized minibatches of any AnnData whose genes map onto the vocabulary.

        Yields the tokens, the batch codes, and the positions of the batch's cells in
        ``indices`` (cells are visited by sequence length).
        """
        adata = self.adata if adata is None else adata
        setup = self.adata_manager.registry["setup_args"]
        X = _matrix(adata, setup.get("layer"))
        if adata is not self.adata:
            _validate_counts(X, "the AnnData's counts", setup.get("check_counts", True))
        if tokenizer is None:
            tokenizer, _ = self._tokenizer(adata, seed=0, report=adata is not self.adata)
        batch_key = setup.get("batch_key")
        codes = np.full(adata.n_obs, -1, dtype=np.int64)
        if batch_key is not None and batch_key in adata.obs and self.batch_categories:
            index = {c: i for i, c in enumerate(self.batch_categories)}
            codes = np.array([index.get(str(c), -1) for c in adata.obs[batch_key]], dtype=np.int64)
        idx = np.arange(adata.n_obs) if indices is None else np.asarray(indices)
        bs = batch_size or 128
        device = self.device
        # cells of similar length together: less padding, same per-cell results
        order = np.argsort(tokenizer.lengths(X[idx]), kind="stable")
        for start in tqdm(range(0, len(idx), bs), desc=desc, disable=len(idx) <= bs, leave=False):
            pos = order[start : start + bs]
            rows = idx[pos]
            xb = X[rows]
            if not sparse.issparse(xb):
                xb = np.asarray(xb)
            yield (
                tokenizer(xb, mask_ratio=0.0, device=device),
                torch.as_tensor(codes[rows], device=device),
                pos,
            )

    @torch.inference_mode()
    def _embed(
        self, adata, indices, batch_size, desc, tokenizer=None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        self._check_if_trained(warn=True)
        self.module.eval()
        zs, logits, positions = [], [], []
        use_bf16 = self.device.type == "cuda"
        for tokens, batch, pos in self._batches(adata, indices, batch_size, desc, tokenizer):
            positions.append(pos)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_bf16):
                out = self.module.inference(
                    tokens["genes"],
                    self.module.scale_values(tokens["input_values"]),
                    tokens["key_padding_mask"],
                    batch,
                )
                z = out["z"].float()
                zs.append(z.cpu())
                if self.module.classifier is not None:
                    logits.append(self.module.classifier(z).float().cpu())
        back = torch.as_tensor(np.argsort(np.concatenate(positions)))  # to the input order
        return torch.cat(zs)[back], (torch.cat(logits)[back] if logits else None)

    def get_latent_representation(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        batch_size: int | None = None,
    ) -> np.ndarray:
        """Cell embeddings, deterministic in eval mode.

        The mean of the encoder's outputs over each cell's tokens (or the output at ``<cls>``
        for a model with ``cell_embedding="cls"``).

        Parameters
        ----------
        adata
            Any AnnData whose genes map onto the model's vocabulary (another gene order, a
            subset or superset, symbols vs Ensembl IDs); default: the training data.
        indices
            Cells to embed; default all.
        batch_size
            Cells per minibatch.

        Returns
        -------
        ``(n_cells, d_model)`` array.
        """
        return self._embed(adata, indices, batch_size, "embedding")[0].numpy()

    def predict(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        soft: bool = False,
        batch_size: int | None = None,
    ) -> np.ndarray | pd.DataFrame:
        """Cell-type predictions of the classifier head.

        Parameters
        ----------
        adata, indices, batch_size
            As in :meth:`get_latent_representation`.
        soft
            Return class probabilities instead of labels.

        Returns
        -------
        ``(n_cells,)`` array of labels, or with ``soft=True`` a DataFrame of probabilities
        (cells x label categories).
        """
        if self.module.classifier is None:
            raise ValueError(
                "This model has no classifier: register labels with "
                "SCMamba2.setup_anndata(..., labels_key=...) before creating the model."
            )
        adata_ = self.adata if adata is None else adata
        _, logits = self._embed(adata, indices, batch_size, "predicting")
        probs = torch.softmax(logits, -1).numpy()
        if soft:
            names = adata_.obs_names if indices is None else adata_.obs_names[np.asarray(indices)]
            return pd.DataFrame(probs, index=names, columns=self.label_categories)
        return np.asarray(self.label_categories, dtype=object)[probs.argmax(1)]

    def get_reconstructed_expression(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        genes: Sequence[str] | None = None,
        batch_size: int | None = None,
        return_numpy: bool = False,
    ) -> pd.DataFrame | np.ndarray:
        """Expression of each gene predicted from the cell embedding (the GEPC head).

        Values are in the model's value space (quantile bins by default; ``log1p`` with
        ``value_transform="log1p"``), for zeros and held-out entries alike.

        Parameters
        ----------
        adata, indices, batch_size
            As in :meth:`get_latent_representation`.
        genes
            ``var_names`` of ``adata`` to predict; default all genes in the vocabulary.
        return_numpy
            Return an array instead of a DataFrame.

        Returns
        -------
        Cells x genes predictions.
        """
        adata_ = self.adata if adata is None else adata
        tokenizer, _ = self._tokenizer(adata_, seed=0, report=adata_ is not self.adata)
        ids = tokenizer.gene_ids.numpy()
        names = adata_.var_names
        if genes is None:
            cols = np.flatnonzero(ids >= 0)
        else:
            pos = names.get_indexer(list(genes))
            if (pos < 0).any():
                missing = [g for g, p in zip(genes, pos) if p < 0][:5]
                raise KeyError(f"Genes not in adata.var_names: {missing}.")
            unmapped = [names[p] for p in pos if ids[p] < 0][:5]
            if unmapped:
                raise KeyError(f"Genes not in the model's vocabulary: {unmapped}.")
            cols = pos
        z, _ = self._embed(adata, indices, batch_size, "reconstructing", tokenizer)
        with torch.inference_mode():
            pred = (
                self.module.predict_genes(
                    z.to(self.device), torch.as_tensor(ids[cols], device=self.device)
                )
                .float()
                .cpu()
                .numpy()
            )
        if return_numpy:
            return pred
        obs = adata_.obs_names if indices is None else adata_.obs_names[np.asarray(indices)]
        return pd.DataFrame(pred, index=obs, columns=names[cols])

    # ------------------------------------------------------------------ transfer learning
    @classmethod
    def load_query_data(
        cls,
        adata: AnnData,
        reference: str | Path | SCMamba2,
        *,
        layer: str | Literal["reference"] | None = "reference",
        batch_key: str | Literal["reference"] | None = "reference",
        labels_key: str | Literal["reference"] | None = "reference",
        gene_key: str | None = None,
        min_gene_fraction: float | None = None,
        accelerator: str = "auto",
        device: int | str = "auto",
    ) -> SCMamba2:
        """Put a trained (or pretrained) model onto new data whose genes may differ.

        The query's genes are mapped onto the reference's vocabulary (by Ensembl ID, then by
        symbol; another order, a subset or a superset are fine) and a coverage report is logged.
        The classifier keeps the reference's cell types and the batch heads its batches; query
        cells of unknown batches use averaged batch-norm statistics. Fine-tune with
        :meth:`train`, or use the model as it is.

        Parameters
        ----------
        adata
            Query AnnData (set up here with the reference's arguments).
        reference
            A trained :class:`SCMamba2` or the directory it was saved to.
        layer, batch_key, labels_key
            Setup arguments for the query; ``"reference"`` reuses the reference's (a missing
            ``obs`` column is dropped with a warning).
        gene_key
            ``var`` column of the query with gene IDs or symbols; default ``var_names``.
        min_gene_fraction
            Fewest fraction of the query's genes that must map (default: the reference's).
        accelerator, device
            Where to put the model.

        Returns
        -------
        A new :class:`SCMamba2` on ``adata`` with the reference's weights.
        """
        if isinstance(reference, SCMamba2):
            registry = reference.adata_manager.registry
            init = reference.init_params_
            state = {k: v.detach().cpu() for k, v in reference.module.state_dict().items()}
        else:
            attr_dict, _, state, _ = _load_saved_files(str(reference), False, map_location="cpu")
            state.pop("pyro_param_store", None)
            registry = attr_dict["registry_"]
            init = attr_dict["init_params_"]
        if registry.get("model_name", cls.__name__) != cls.__name__:
            raise ValueError(f"{reference} is not a saved {cls.__name__} model.")
        setup = dict(registry["setup_args"])
        setup["gene_key"] = gene_key
        for key, value in (("layer", layer), ("batch_key", batch_key), ("labels_key", labels_key)):
            if value != "reference":
                setup[key] = value
        for key in ("batch_key", "labels_key"):
            if setup.get(key) is not None and setup[key] not in adata.obs.columns:
                warnings.warn(
                    f"The query has no obs column {setup[key]!r} ({key} of the reference); "
                    "it is set up without it.",
                    UserWarning,
                    stacklevel=2,
                )
                setup[key] = None
        cls.setup_anndata(adata, **setup)
        kwargs = {
            **init["non_kwargs"],
            **{k: v for d in init["kwargs"].values() for k, v in d.items()},
        }
        if min_gene_fraction is not None:
            kwargs["min_gene_fraction"] = min_gene_fraction
        # A reference without a classifier (or batch heads), e.g. a pretrained backbone, gets new
        # heads for the query's labels (batches): they start untrained, fine-tune them.
        new_heads = []
        for key, categories in (
            ("labels_key", "label_categories"),
            ("batch_key", "batch_categories"),
        ):
            if setup.get(key) is not None and not kwargs.get(categories):
                kwargs.pop(categories, None)
                new_heads.append(key)
        model = cls(adata, **kwargs)
        missing, unexpected = model.module.load_state_dict(state, strict=not new_heads)
        fresh = ("classifier.", "discriminator.", "token_norm.")
        if unexpected or any(not k.startswith(fresh) for k in missing):
            raise ValueError(
                f"The saved weights do not fit this architecture (missing {missing[:3]}, "
                f"unexpected {unexpected[:3]}); was {reference} saved by another version?"
            )
        if new_heads:
            logger.info(
                "New heads for the query's %s (the reference has none); fine-tune with train().",
                " and ".join(new_heads),
            )
        _, _, torch_device = parse_device_args(
            accelerator, device, return_device="torch", validate_single_device=True
        )
        model.to_device(torch_device)
        model.is_trained_ = True
        logger.info("Query genes on the reference vocabulary:\n%s", model.gene_report_)
        return model

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        adata: AnnData,
        *,
        layer: str | None = None,
        batch_key: str | None = None,
        labels_key: str | None = None,
        gene_key: str | None = None,
        min_gene_fraction: float | None = None,
        accelerator: str = "auto",
        device: int | str = "auto",
    ) -> SCMamba2:
        """Put a pretrained backbone (the model folder ``pretrain`` wrote) onto data.

        The data's genes are mapped onto the backbone's vocabulary (another order, a subset or a
        superset are fine; a coverage report is logged), as in :meth:`load_query_data`. The
        folder's layout is described in :func:`~scmamba2_scvi.model.save_pretrained`.

        Parameters
        ----------
        path
            The pretrained-model folder (``out_dir/model`` of ``pretrain``).
        adata
            Cells to embed or fine-tune on (set up here).
        layer
            Layer holding raw counts; ``None`` uses ``adata.X``.
        batch_key, labels_key
            ``obs`` columns of batches and cell types: new batch heads and a new classifier,
            untrained until you :meth:`train`.
        gene_key
            ``var`` column with gene IDs or symbols; default ``var_names``.
        min_gene_fraction
            Fewest fraction of the genes that must map to the vocabulary.
        accelerator, device
            Where to put the model.

        Returns
        -------
        An :class:`SCMamba2` on ``adata`` with the pretrained weights.
        """
        from ._pretrained import from_pretrained

        return from_pretrained(
            cls,
            path,
            adata,
            layer=layer,
            batch_key=batch_key,
            labels_key=labels_key,
            gene_key=gene_key,
            min_gene_fraction=min_gene_fraction,
            accelerator=accelerator,
            device=device,
        )

    @classmethod
    def load(
        cls,
        dir_path: str,
        adata: AnnData | None = None,
        accelerator: str = "auto",
        device: int | str = "auto",
        **kwargs,
    ) -> SCMamba2:
        """Load a saved model, or put a pretrained-model folder onto ``adata``.

        A folder written by :func:`~scmamba2_scvi.model.pretrain`, given an AnnData, goes to
        :meth:`from_pretrained`; anything else to scvi-tools'
        :meth:`~scvi.model.base.BaseModelClass.load`. So
        ``scvi.hub.HubModel(folder).load_model(adata=...)`` maps data with other genes onto a
        pretrained backbone.

        Parameters
        ----------
        dir_path
            The folder of :meth:`save`, or of :func:`~scmamba2_scvi.model.pretrain`'s model.
        adata
            The data to load the model onto (see scvi-tools' ``load``).
        accelerator, device
            Where to put the model.
        **kwargs
            Other arguments of scvi-tools' ``load``.

        Returns
        -------
        The model.
        """
        from ._pretrained import is_pretrained

        if adata is not None and is_pretrained(dir_path):
            return cls.from_pretrained(dir_path, adata, accelerator=accelerator, device=device)
        return super().load(dir_path, adata=adata, accelerator=accelerator, device=device, **kwargs)
