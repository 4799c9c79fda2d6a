"""SCMamba2: the user-facing scvi-tools model (AnnData in, embeddings and predictions out)."""

from __future__ import annotations

import copy
import inspect
import logging
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from anndata import AnnData
from scipy import sparse
from scvi import REGISTRY_KEYS, settings
from scvi.data import AnnDataManager
from scvi.data.fields import CategoricalObsField, LabelsWithUnlabeledObsField, LayerField
from scvi.model.base import BaseModelClass, UnsupervisedTrainingMixin
from scvi.utils import track

from scmamba2_scvi.data import (
    GeneVocab,
    TokenCollate,
    TokenDataLoader,
    TokenDataSplitter,
    Tokenizer,
    check_counts,
    gene_loadings,
)
from scmamba2_scvi.module import SCMamba2Module
from scmamba2_scvi.module._memory import keep_heap, release_heap
from scmamba2_scvi.ops import Backend

from ._checksum import verify_weights, write_checksum
from ._pretrained import from_pretrained, is_pretrained
from ._trainingplan import SCMamba2TrainingPlan
from ._utils import check_keywords

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


def _fields(
    layer: str | None,
    batch_key: str | None,
    labels_key: str | None,
    unlabeled_category: str | None,
    check_counts: bool,
) -> list:
    """scvi-tools fields of an :class:`SCMamba2` AnnData: counts, batch and label codes."""
    return [
        LayerField(REGISTRY_KEYS.X_KEY, layer, is_count_data=check_counts),
        CategoricalObsField(REGISTRY_KEYS.BATCH_KEY, batch_key),
        LabelsWithUnlabeledObsField(REGISTRY_KEYS.LABELS_KEY, labels_key, unlabeled_category)
        if labels_key is not None
        else CategoricalObsField(REGISTRY_KEYS.LABELS_KEY, None),
    ]


# Cells x epochs that train() runs by default; integration needs more (see train's Notes).
_CELL_PASSES = 20_000
_INTEGRATION_CELL_PASSES = 100_000


def _default_epochs(n_cells: int, integration: bool) -> int:
    """``train()``'s epochs when none are given: a budget of cell passes, 5 to 50 epochs."""
    passes = _INTEGRATION_CELL_PASSES if integration else _CELL_PASSES
    return int(np.clip(passes // max(1, n_cells), 5, 50))


_SETUP_KEYS = {REGISTRY_KEYS.BATCH_KEY: "batch_key", REGISTRY_KEYS.LABELS_KEY: "labels_key"}


def _source_registry(registry: dict, adata: AnnData, columns: dict[str, str | None]) -> dict | None:
    """A registry to transfer onto ``adata`` (scvi-tools' ``source_registry``).

    The reference's categories keep their codes, which are the heads' indices; categories of
    ``adata``'s ``columns`` (registry key -> ``obs`` column) that it does not know come after
    them (the loader reads them as unknown, -1). ``adata``'s genes may differ from the
    reference's (they are mapped through the vocabulary), so its gene count is not compared.
    ``None`` for a registry without fields (a pretrained network's).
    """
    if "field_registries" not in registry:
        return None
    source = copy.deepcopy(registry)
    fields = source["field_registries"]
    x_state = fields[REGISTRY_KEYS.X_KEY]["state_registry"]
    x_state["n_vars"], x_state["column_names"] = adata.n_vars, np.asarray(adata.var_names)
    for key, column in columns.items():
        state = fields[key]["state_registry"]
        if column is None:  # scvi-tools' default field (one code, 0): read as unknown
            state["categorical_mapping"] = np.zeros(1, dtype=np.int64)
            continue
        known = []
        if registry["setup_args"].get(_SETUP_KEYS[key]) is not None:
            known = list(state["categorical_mapping"])
        present = np.unique(adata.obs[column].astype(str)).tolist()
        new = [c for c in present if c not in set(map(str, known))]
        state["categorical_mapping"] = np.asarray(known + new, dtype=object)
    return source


def _read_saved(path: str | Path) -> tuple[dict, dict, dict[str, torch.Tensor]]:
    """Registry, init parameters and weights of a model saved by :meth:`SCMamba2.save`."""
    file = Path(path) / "model.pt"
    if not file.is_file():
        raise FileNotFoundError(
            f"{file} does not exist: pass the folder an SCMamba2 was saved to (model.save)."
        )
    saved = torch.load(file, map_location="cpu", weights_only=False)
    attr_dict, state = saved["attr_dict"], saved["model_state_dict"]
    state.pop("pyro_param_store", None)  # scvi-tools' save adds it to every model
    return attr_dict["registry_"], attr_dict["init_params_"], state


def _model_defaults() -> dict[str, Any]:
    """:class:`SCMamba2`'s keyword arguments and their defaults."""
    return {
        name: p.default
        for name, p in inspect.signature(SCMamba2.__init__).parameters.items()
        if p.default is not inspect.Parameter.empty
    }


def _torch_device(accelerator: str, device: int | str) -> torch.device:
    """The one device of Lightning-style ``accelerator``/``device`` arguments."""
    if accelerator == "auto":
        accelerator = "cuda" if torch.cuda.is_available() else "cpu"
    if accelerator == "gpu":
        accelerator = "cuda"
    if accelerator == "cpu" or device == "auto":
        return torch.device(accelerator)
    return torch.device(accelerator, int(device))


def _check_count_arg(name: str, value: Any, *, none_ok: bool = True) -> None:
    """Raise a ValueError naming ``name`` unless ``value`` is a positive integer (or None)."""
    if value is None and none_ok:
        return
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")


def _check_train_args(
    max_epochs: Any, max_steps: Any, batch_size: Any, plan_kwargs: dict | None
) -> None:
    """Arguments of :meth:`SCMamba2.train` that would train nothing or fail deep inside."""
    _check_count_arg("max_epochs", max_epochs)
    _check_count_arg("max_steps", max_steps)
    _check_count_arg("batch_size", batch_size, none_ok=False)
    lr = (plan_kwargs or {}).get("lr")
    if lr is not None and not (isinstance(lr, int | float) and np.isfinite(lr) and lr > 0):
        raise ValueError(f"plan_kwargs['lr'] must be a positive number, got {lr!r}.")


def _check_obs_column(adata: AnnData, key: str | None, arg: str, fill: str) -> None:
    """Refuse NaN in a categorical ``obs`` column before scvi-tools turns it into codes."""
    if key is None:
        return
    n_nan = int(adata.obs[key].isna().sum())
    if n_nan:
        raise ValueError(
            f"adata.obs[{key!r}] ({arg}) has {n_nan} NaN value(s). Fill them, e.g. "
            f"adata.obs[{key!r}] = adata.obs[{key!r}].astype(str).replace('nan', {fill!r}), "
            "or drop those cells before setup_anndata."
        )


def _check_label_categories(categories: list[str], labels_key: str, unlabeled: str) -> None:
    """A classifier needs two classes at least."""
    if not categories:
        raise ValueError(
            f"Every label in adata.obs[{labels_key!r}] is the unlabeled category {unlabeled!r}: "
            "the classifier has no class to learn. Set up with labels_key=None for a model "
            "without classifier, or label some cells."
        )
    if len(categories) == 1:
        warnings.warn(
            f"adata.obs[{labels_key!r}] has one label class ({categories[0]!r}): the classifier "
            "will predict it for every cell with probability 1. Add cells of other types, or "
            "set up with labels_key=None.",
            UserWarning,
            stacklevel=3,
        )


def _check_saved_folder(folder: Path, prefix: str | None) -> None:
    """A saved model's folder exists and holds intact weights (checksum when saved with one)."""
    if not folder.is_dir():
        raise FileNotFoundError(
            f"The model folder {folder} does not exist. Pass the folder a model was saved to "
            "(model.save(path), or the --out folder of scmamba2 finetune / pretrain)."
        )
    verify_weights(folder / f"{prefix or ''}model.pt")


def build_module(
    n_vocab: int, n_batch: int, n_labels: int, params: dict[str, Any]
) -> tuple[SCMamba2Module, dict[str, Any]]:
    """The network of an :class:`SCMamba2` with arguments ``params``; also its resolved sizes.

    ``params`` holds :class:`SCMamba2`'s keyword arguments (missing ones take their defaults);
    the preset's sizes apply unless a size is given. Used by :class:`SCMamba2` and by
    :func:`~scmamba2_scvi.model.pretrain`, so both build the same architecture.

    Raises
    ------
    TypeError
        For a key of ``params`` that is not an :class:`SCMamba2` argument.
    """
    defaults = _model_defaults()
    check_keywords("build_module()", params, defaults)
    params = {**defaults, **params}
    preset = params["preset"]
    if preset not in PRESETS:
        raise ValueError(f"Unknown preset {preset!r}; choose one of {list(PRESETS)}.")
    sizes = {"checkpointing": False, **PRESETS[preset]}
    sizes.update({k: params[k] for k in _SIZE_KEYS if params[k] is not None})
    options = (
        "d_conv n_groups chunk_size bidirectional ffn dropout backend precision value_encoding "
        "n_bins dsbn cell_embedding mask_ratio batch_decoder library_decoder zero_genes"
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
    precision
        Encoder arithmetic on CPU: ``"fp32"``, ``"bf16"`` (autocast) or ``"auto"``: bfloat16
        on CPUs with native bfloat16 (AVX512-BF16 or AMX) for encoders at least
        :data:`~scmamba2_scvi.nn.BF16_MIN_WIDTH` wide (the ``"default"`` preset and larger,
        where it trains faster; not ``"cpu-small"``), float32 otherwise. Pass ``"fp32"`` for
        the same arithmetic on every machine. On a GPU,
        training runs in Lightning's ``"bf16-mixed"`` precision (pass ``precision="32-true"`` to
        :meth:`train` for float32) and inference under bfloat16 autocast, whatever this says.
    n_bins
        Quantile bins of ``value_transform="bin"`` (the module divides bin values by
        ``n_bins - 1``) and the categorical value encoder's bins.
    value_encoding, cell_embedding, mask_ratio
        Module options, see :class:`~scmamba2_scvi.module.SCMamba2Module`.
    dsbn
        Domain-specific batch norm (one per batch), see
        :class:`~scmamba2_scvi.module.SCMamba2Module`; ``None``: on when more than one batch
        is registered (the integration recipe, see :meth:`train`).
    batch_decoder, library_decoder
        The decoders read the cell's batch / log library size, so the cell embedding need not
        carry them (see :class:`~scmamba2_scvi.nn.DecoderCovariates`).
    zero_genes
        Non-expressed genes drawn per cell in training, the negatives of GEPC's zero
        probability (0: none).
    gene_init
        ``"pca"``: when a new model first trains, the embeddings of ``adata``'s genes start as
        their loadings on the top ``d_model`` principal components of ``adata``'s ``log1p``
        counts per 10,000 (:func:`~scmamba2_scvi.data.gene_loadings`; at most 10,000 cells),
        so the model starts from the genes' co-expression instead of learning it from random
        vectors (scBERT starts its gene embeddings from gene2vec the same way, from public
        data). ``"random"``: ``N(0, 1)``. A model given trained weights (:meth:`load`,
        :meth:`load_query_data`, :meth:`from_pretrained`) keeps them.
    mode, max_len, gene_order, subsample, value_transform
        How a cell becomes a sequence, see :class:`~scmamba2_scvi.data.Tokenizer` (``mode``:
        ``"expressed"`` or ``"full"``). Default: expressed genes in vocabulary order, at most
        2,048 tokens, quantile-binned values.
    min_gene_fraction
        Least share of the model's vocabulary an AnnData must hold (``MappingReport.coverage``):
        weighted by how often each gene is expressed in the training data when the vocabulary
        recorded it (a model built from ``adata``; a pretrained backbone's vocabulary counts
        plain genes), so missing rarely expressed genes costs little. A superset of the
        vocabulary passes; a dataset holding few of the model's genes is refused. Can also be
        passed to each inference method.
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
    _data_splitter_cls = TokenDataSplitter

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
        backend: Backend = "auto",
        precision: Literal["auto", "fp32", "bf16"] = "auto",
        value_encoding: Literal["continuous", "categorical"] = "continuous",
        n_bins: int = 51,
        dsbn: bool | None = None,
        cell_embedding: Literal["cls", "mean", "weighted"] = "weighted",
        mask_ratio: float = 0.15,
        batch_decoder: bool = True,
        library_decoder: bool = True,
        zero_genes: int = 64,
        gene_init: Literal["pca", "random"] = "pca",
        mode: Literal["expressed", "full"] = "expressed",
        max_len: int | None = 2048,
        gene_order: Literal["vocab", "genomic", "expression", "random"] = "vocab",
        subsample: Literal["random", "top"] = "random",
        value_transform: Literal["bin", "log1p", "raw"] = "bin",
        min_gene_fraction: float = 0.5,
        vocab: GeneVocab | dict | None = None,
        label_categories: Sequence[str] | None = None,
        batch_categories: Sequence[str] | None = None,
        **kwargs: Any,
    ):
        check_keywords("SCMamba2()", kwargs, _model_defaults())
        if adata is None:
            raise ValueError("SCMamba2 needs an AnnData registered with SCMamba2.setup_anndata.")
        if preset not in PRESETS:
            raise ValueError(f"Unknown preset {preset!r}; choose one of {list(PRESETS)}.")
        if mode not in ("expressed", "full"):  # the Tokenizer's "genes" needs a list we never pass
            raise ValueError(f"SCMamba2 reads mode 'expressed' or 'full'; got {mode!r}.")
        super().__init__(adata)
        setup = self.adata_manager.registry["setup_args"]
        if vocab is None:
            vocab = GeneVocab.from_anndata(adata, gene_key=setup.get("gene_key"))
            vocab.record_expression(adata, setup.get("layer"), setup.get("gene_key"))
        elif isinstance(vocab, dict):
            vocab = GeneVocab.from_dict(vocab)
        self.vocab = vocab
        if batch_categories is None:
            batch_categories = self._registry_categories(REGISTRY_KEYS.BATCH_KEY, "batch_key")
        if label_categories is None:
            label_categories = self._registry_categories(REGISTRY_KEYS.LABELS_KEY, "labels_key")
            if setup.get("labels_key") is not None:
                _check_label_categories(
                    label_categories, setup["labels_key"], setup.get("unlabeled_category")
                )
        self.batch_categories = [str(c) for c in batch_categories]
        dsbn_arg, dsbn = dsbn, len(self.batch_categories) > 1 if dsbn is None else dsbn
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
        if gene_init not in ("pca", "random"):
            raise ValueError(f"gene_init must be 'pca' or 'random'; got {gene_init!r}.")
        self.gene_init = gene_init
        _, self.gene_report_ = self._gene_tokens(adata, report=True)

        arguments = locals()
        self.module, sizes = build_module(
            len(vocab),
            len(self.batch_categories),
            len(self.label_categories),
            {k: arguments[k] for k in _model_defaults()},
        )
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
            dsbn=dsbn_arg,  # None (the recipe) is resolved again for a query's batches
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
            Cells x genes. Not modified except for scvi-tools' registry: ``obs`` columns
            ``_scvi_batch`` and ``_scvi_labels``, ``uns`` keys ``_scvi_uuid`` and
            ``_scvi_manager_uuid``.
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
        _check_obs_column(adata, batch_key, "batch_key", "unknown")
        _check_obs_column(adata, labels_key, "labels_key", unlabeled_category)
        X = _matrix(adata, layer)
        _validate_counts(
            X, "adata.X" if layer is None else f"adata.layers[{layer!r}]", check_counts
        )
        fields = _fields(layer, batch_key, labels_key, unlabeled_category, check_counts)
        adata_manager = AnnDataManager(fields=fields, setup_method_args=setup_method_args)
        obs_before, uns_before = set(adata.obs.columns), set(adata.uns)
        try:
            adata_manager.register_fields(adata, **kwargs)
        except Exception:
            # a failed setup leaves the AnnData as it was: no half-written _scvi_* keys
            adata.obs.drop(columns=list(set(adata.obs.columns) - obs_before), inplace=True)
            for key in set(adata.uns) - uns_before:
                del adata.uns[key]
            raise
        cls.register_manager(adata_manager)

    def _registry_categories(self, registry_key: str, setup_key: str) -> list[str]:
        if self.adata_manager.registry["setup_args"].get(setup_key) is None:
            return []
        state = self.adata_manager.get_state_registry(registry_key)
        unlabeled = state.get("unlabeled_category")
        return [str(c) for c in state.categorical_mapping if c != unlabeled]

    def _gene_tokens(
        self, adata: AnnData, *, report: bool = False, min_gene_fraction: float | None = None
    ) -> tuple[np.ndarray, Any]:
        """Vocabulary token of each of ``adata``'s genes (-1: not in it) and the mapping report.

        Raises when the genes cover less than ``min_gene_fraction`` (default: the model's) of
        the vocabulary.
        """
        gene_key = self.adata_manager.registry["setup_args"].get("gene_key")
        if gene_key is not None and gene_key not in adata.var.columns:
            gene_key = None
        if min_gene_fraction is None:
            min_gene_fraction = self.min_gene_fraction
        column_tokens, rep = self.vocab.map(
            adata,
            gene_key,
            min_fraction=0.0,
            warn_fraction=0.0,
            min_coverage=min_gene_fraction,
            return_report=True,
        )
        if report:
            logger.info("Gene mapping onto the model's vocabulary:\n%s", rep)
        return np.asarray(column_tokens), rep

    def _collate(
        self,
        adata: AnnData,
        *,
        training: bool,
        batch_key: str | None = None,
        min_gene_fraction: float | None = None,
    ) -> TokenCollate:
        """The loader's tokenizing step for ``adata``'s genes (training: masked, zero genes).

        Codes count only where a column was registered (``batch_key`` for another AnnData than
        the model's); scvi-tools' default field gives every cell code 0, read as unknown.
        """
        ids, _ = self._gene_tokens(
            adata,
            report=training is False and adata is not self.adata,
            min_gene_fraction=min_gene_fraction,
        )
        setup = self.adata_manager.registry["setup_args"]
        if adata is self.adata:
            batch_key = setup.get("batch_key")
        return TokenCollate(
            Tokenizer(ids, self.vocab, **self.tokenizer_kwargs),
            mask_ratio=self.module.mask_ratio if training else 0.0,
            packed=self.module.token_norm.n_domains == 1,  # DSBN normalises padded batches
            n_batch=len(self.batch_categories) if batch_key is not None else 0,
            n_labels=len(self.label_categories) if setup.get("labels_key") is not None else 0,
            n_zero_genes=self.module.zero_genes if training else 0,
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
        batch_size: int = 16,
        token_budget: int | None = None,
        early_stopping: bool = False,
        plan_kwargs: dict | None = None,
        datasplitter_kwargs: dict | None = None,
        **trainer_kwargs,
    ):
        """Train (pretrain or fine-tune) the model.

        Parameters
        ----------
        max_epochs
            Epochs; default ``clip(20000 / n_cells, 5, 50)``, and five times that budget,
            ``clip(100000 / n_cells, 5, 50)``, for the integration recipe (see Notes), which
            keeps gaining from longer training (50 epochs for 2,000 cells).
        max_steps
            Stop after this many optimizer steps (overrides ``max_epochs`` when reached first).
        accelerator, devices
            Lightning's; ``"auto"`` picks a GPU when there is one.
        train_size, validation_size
            Random split of the cells; validation losses appear in :attr:`history`.
        batch_size
            Most cells per minibatch. Minibatches hold cells of similar length (sorted within
            pools of 50 minibatches, a new draw every epoch). Small by default: fine-tuning
            data sets are small, they need optimizer steps more than large minibatches, and a
            step costs about the same per cell with 16 cells as with 64.
        token_budget
            Most tokens per minibatch (cells x longest when padded; the sum of lengths when
            packed, which is how a model without DSBN is trained); ``None``: only
            ``batch_size`` bounds a minibatch.
        early_stopping
            Stop when scvi-tools' ``elbo_validation`` (here the reconstruction terms on the
            validation cells: GEP, GEPC and its zero head) stops improving for
            ``early_stopping_patience`` epochs (scvi-tools' default 45; pass it, or
            ``early_stopping_monitor``, among the trainer arguments). The annotation recipe
            keeps its best epoch by validation macro-F1 whether or not this is on.
        plan_kwargs
            :class:`~scmamba2_scvi.model.SCMamba2TrainingPlan` arguments: ``lr``,
            ``weight_decay``, ``warmup_ratio``, the recipe switches ``class_balance``,
            ``keep_best``, ``calibrate``, ``dar_warmup``, and the loss weights ``gep_weight``,
            ``gepc_weight``, ``zero_weight``, ``cls_weight``, ``dar_weight``, ``ecs_weight``,
            ``depth_weight`` (off by default, see
            :meth:`~scmamba2_scvi.module.SCMamba2Module.loss`). They override the task recipes
            (see Notes).
        datasplitter_kwargs
            Passed to scvi-tools' ``DataSplitter`` and to the
            :class:`~scmamba2_scvi.data.TokenDataLoader` (e.g. ``num_workers``: minibatches are
            read and tokenized in that many worker processes).
        **trainer_kwargs
            Passed to the Lightning trainer. Defaults: ``gradient_clip_val=1.0``, and
            ``precision="bf16-mixed"`` on CUDA, validation every epoch.

        Notes
        -----
        Task recipes: what :meth:`setup_anndata` registered switches objectives on, with no
        ``plan_kwargs``; an argument given in ``plan_kwargs`` (or to :class:`SCMamba2`) wins.

        - Integration, ``batch_key`` with more than one batch: domain-specific batch norm
          (``dsbn=None`` becomes ``True`` when the model is created), a batch discriminator
          trained on the cell embedding and the encoder trained to confuse it (cross-entropy of
          the discriminator's batch posterior to the uniform one) with ``dar_weight=1.0``,
          ramped up from 0 over the first 20% of the steps
          (``dar_warmup=0.2``), and elastic cell similarity with ``ecs_weight=0.01``: scGPT's
          weight of 10 against a squared error on unscaled bins, rescaled to this model's
          expression losses (values divided by ``n_bins - 1``); not tuned on a benchmark.
          Unless ``max_epochs`` is given, five times the default budget of cell passes:
          mixing and biology kept improving with longer training on a development dataset.
        - Annotation, ``labels_key``: class-balanced cross-entropy (weights
          ``count ** -0.5`` of the training cells' labels), the weights of the epoch with the
          best validation macro-F1 kept (``validation_macro_f1`` in :attr:`history`), and a
          temperature fitted on the validation cells so that ``predict(soft=True)`` gives
          calibrated probabilities. The last two need validation cells (``train_size < 1``, the
          default); without them the last epoch's weights and a temperature of 1 stay.

        Switch a recipe off with e.g. ``plan_kwargs={"keep_best": False}`` or
        ``plan_kwargs={"dar_weight": 0.0}``, and DSBN with ``SCMamba2(adata, dsbn=False)``.
        """
        _check_train_args(max_epochs, max_steps, batch_size, plan_kwargs)
        integration = self.adata_manager.registry["setup_args"].get("batch_key") is not None and (
            len(self.batch_categories) > 1
        )
        recipe = {"dar_weight": 1.0, "ecs_weight": 0.01} if integration else {}  # see Notes
        # the annotation recipe is the plan's own default with a classifier
        plan_kwargs = {**recipe, **(plan_kwargs or {})}
        if max_epochs is None:
            max_epochs = _default_epochs(self.adata.n_obs, integration)
        if max_steps is not None:
            trainer_kwargs["max_steps"] = max_steps
        trainer_kwargs.setdefault("gradient_clip_val", 1.0)
        if train_size < 1.0 or validation_size:
            trainer_kwargs.setdefault("check_val_every_n_epoch", 1)
        if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
            trainer_kwargs.setdefault("precision", "bf16-mixed")
        trainer_kwargs.setdefault("use_distributed_sampler", False)  # the loader shards by rank
        datasplitter_kwargs = {
            "collate": self._collate(self.adata, training=True),
            "token_budget": token_budget,
            **(datasplitter_kwargs or {}),
        }
        if self.gene_init == "pca" and not self.is_trained_ and self.history_ is None:
            self._init_gene_embedding()
        if self.history_ is None:  # weights given by load_query_data: the history starts here
            self.is_trained_ = False
        was_trained = self.is_trained_
        result = super().train(
            max_epochs=max_epochs,
            accelerator=accelerator,
            devices=devices,
            train_size=train_size,
            validation_size=validation_size,
            batch_size=batch_size,
            load_sparse_tensor=True,
            early_stopping=early_stopping,
            plan_kwargs=plan_kwargs,
            datasplitter_kwargs=datasplitter_kwargs,
            **trainer_kwargs,
        )
        self._mark_trained(was_trained)
        return result

    def _init_gene_embedding(self) -> None:
        """Gene embeddings from the training data's principal components (``gene_init``)."""
        setup = self.adata_manager.registry["setup_args"]
        tokens, _ = self._gene_tokens(self.adata)
        columns = np.flatnonzero(tokens >= 0)
        X = _matrix(self.adata, setup.get("layer"))
        loadings = gene_loadings(X, self.module.d_model, genes=columns, seed=settings.seed or 0)
        self.module.init_gene_embedding(
            torch.as_tensor(tokens[columns]), torch.from_numpy(loadings)
        )
        logger.info("Gene embeddings start from %d principal components.", loadings.shape[1])

    def _mark_trained(self, was_trained: bool) -> None:
        """``is_trained_`` only for a model that took an optimizer step (now or before)."""
        trainer = getattr(self, "trainer", None)
        if trainer is not None and trainer.global_step == 0:
            self.is_trained_ = was_trained

    # ------------------------------------------------------------------ inference
    def _inference_manager(self, adata: AnnData) -> tuple[AnnDataManager, str | None]:
        """A manager of ``adata``'s counts and batch codes, and the batch column it read.

        The codes are transferred from the model's registry.

        Another AnnData is not registered itself: a light AnnData sharing its count matrix and
        holding its batch column is, so the user's AnnData is left untouched.
        """
        if adata is self.adata:
            return self.adata_manager, None
        setup = self.adata_manager.registry["setup_args"]
        X = _matrix(adata, setup.get("layer"))
        _validate_counts(X, "the AnnData's counts", setup.get("check_counts", True))
        batch_key = setup.get("batch_key")
        if batch_key not in adata.obs.columns:
            batch_key = None
        obs = pd.DataFrame(index=pd.RangeIndex(adata.n_obs).astype(str))
        if batch_key is not None:
            obs[batch_key] = adata.obs[batch_key].to_numpy()
        light = AnnData(X=X, obs=obs)
        manager = AnnDataManager(fields=_fields(None, batch_key, None, None, False)[:2])
        source = _source_registry(
            self.adata_manager.registry, light, {REGISTRY_KEYS.BATCH_KEY: batch_key}
        )
        manager.register_fields(light, source_registry=source, extend_categories=True)
        return manager, batch_key

    @torch.inference_mode()
    def _embed(
        self,
        adata: AnnData | None,
        indices: Sequence[int] | None,
        batch_size: int | None,
        token_budget: int | None,
        progress_bar: bool | None,
        desc: str,
        min_gene_fraction: float | None = None,
        head: Callable[[torch.Tensor, dict], torch.Tensor | None] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Cell embeddings of ``adata``'s cells, in ``indices`` order, and what ``head`` gives.

        ``head(z, batch)`` is called on each minibatch's embeddings and tensors (e.g. the
        classifier's logits); the second output is its rows concatenated, or ``None`` without
        a head or when it returns ``None``.
        """
        _check_count_arg("batch_size", batch_size)
        self._check_if_trained(warn=True)
        self.module.eval()
        adata = self.adata if adata is None else adata
        manager, batch_key = self._inference_manager(adata)
        loader = TokenDataLoader(
            manager,
            self._collate(
                adata, training=False, batch_key=batch_key, min_gene_fraction=min_gene_fraction
            ),
            indices=indices,
            batch_size=batch_size or 128,
            token_budget=token_budget,
        )
        if progress_bar is None:
            progress_bar = len(loader) > 1 and settings.verbosity <= logging.INFO
        zs, extra, positions = [], [], []
        release_heap(self.module)
        use_bf16 = self.device.type == "cuda"
        bar = track(
            loader, description=desc, disable=not progress_bar, style=settings.progress_bar_style
        )
        for batch in bar:
            positions.append(batch.pop("obs_index"))
            batch = {k: v.to(self.device) for k, v in batch.items()}
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_bf16):
                z = self.module.inference(**self.module._get_inference_input(batch))["z"].float()
                zs.append(z.cpu())
                out = None if head is None else head(z, batch)
                if out is not None:
                    extra.append(out.float().cpu())
            keep_heap(self.module, 0)
        back = torch.argsort(torch.cat(positions))  # to the order of `indices`
        return torch.cat(zs)[back], (torch.cat(extra)[back] if extra else None)

    def get_latent_representation(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        batch_size: int | None = None,
        token_budget: int | None = None,
        progress_bar: bool | None = None,
        min_gene_fraction: float | None = None,
    ) -> np.ndarray:
        """Cell embeddings, deterministic in eval mode.

        The encoder's outputs pooled over each cell's tokens as the model's ``cell_embedding``
        says: weighted by each token's input value (the default, ``"weighted"``), their plain
        mean (``"mean"``) or the output at ``<cls>`` (``"cls"``).

        Parameters
        ----------
        adata
            Any AnnData whose genes map onto the model's vocabulary (another gene order, a
            subset or superset, symbols vs Ensembl IDs); default: the training data.
        indices
            Cells to embed; default all.
        batch_size
            Most cells per minibatch (cells of similar length are embedded together; the
            results do not depend on the minibatches).
        token_budget
            Most tokens per minibatch; ``None``: only ``batch_size`` bounds a minibatch.
        progress_bar
            Show a progress bar; default: when there is more than one minibatch and
            ``scvi.settings.verbosity`` is at most ``logging.INFO`` (its style is
            ``scvi.settings.progress_bar_style``).
        min_gene_fraction
            Least share of the vocabulary ``adata`` must hold (see :class:`SCMamba2`); default:
            the model's.

        Returns
        -------
        ``(n_cells, d_model)`` array.
        """
        z, _ = self._embed(
            adata, indices, batch_size, token_budget, progress_bar, "embedding", min_gene_fraction
        )
        return z.numpy()

    def sequence_lengths(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        min_gene_fraction: float | None = None,
    ) -> np.ndarray:
        """Number of tokens (``<cls>`` included) each cell becomes when the model reads it.

        A minibatch costs time and memory in proportion to its tokens: use this to choose
        ``max_len`` or a ``token_budget``. With ``mode="expressed"`` a cell's tokens are its
        non-zero genes that the vocabulary knows, at most ``max_len``; with ``mode="full"``,
        every vocabulary gene.

        Parameters
        ----------
        adata, indices, min_gene_fraction
            As in :meth:`get_latent_representation`.

        Returns
        -------
        ``(n_cells,)`` int64 array, in ``indices`` order.
        """
        adata = self.adata if adata is None else adata
        X = _matrix(adata, self.adata_manager.registry["setup_args"].get("layer"))
        if indices is not None:
            X = X[np.asarray(indices)]
        collate = self._collate(adata, training=False, min_gene_fraction=min_gene_fraction)
        return collate.tokenizer.lengths(X)

    def predict(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        soft: bool = False,
        batch_size: int | None = None,
        token_budget: int | None = None,
        progress_bar: bool | None = None,
        min_gene_fraction: float | None = None,
    ) -> np.ndarray | pd.DataFrame:
        """Cell-type predictions of the classifier head.

        Parameters
        ----------
        adata, indices, batch_size, token_budget, progress_bar, min_gene_fraction
            As in :meth:`get_latent_representation`.
        soft
            Return class probabilities instead of labels: ``softmax(logits / T)`` with the
            temperature ``T`` fitted on the validation cells when training ends (``calibrate``
            in :meth:`train`; 1 for a model trained without calibration).

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
        _, logits = self._embed(
            adata,
            indices,
            batch_size,
            token_budget,
            progress_bar,
            "predicting",
            min_gene_fraction,
            head=lambda z, _: self.module.classifier(z),
        )
        probs = torch.softmax(logits / self.module.logit_temperature.float().cpu(), -1).numpy()
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
        token_budget: int | None = None,
        progress_bar: bool | None = None,
        min_gene_fraction: float | None = None,
        quantity: Literal["expected", "value", "p_expressed"] = "expected",
    ) -> pd.DataFrame | np.ndarray:
        """Expression of each gene predicted from the cell embedding (the GEPC head).

        By default the expected value, ``P(expressed) * max(value if expressed, 0)``, of GEPC's
        hurdle head: a mean over zeros and non-zeros, as scVI's
        :meth:`~scvi.model.SCVI.get_normalized_expression` is the mean of its count
        distribution (there of normalised counts), so the two compare on the same entries,
        zeros included (e.g. by correlation with the held-out values). Values are in the model's
        value space (quantile bins by default; ``log1p(x / total * 1e4)`` with
        ``value_transform="log1p"``), and the decoders read each cell's own batch and library
        size, for zeros and held-out entries alike.

        Parameters
        ----------
        adata, indices, batch_size, token_budget, progress_bar, min_gene_fraction
            As in :meth:`get_latent_representation`.
        genes
            ``var_names`` of ``adata`` to predict; default all genes in the vocabulary.
        return_numpy
            Return an array instead of a DataFrame.
        quantity
            ``"expected"`` (the default, above), ``"value"`` (the value if expressed, for
            comparisons on non-zero entries) or ``"p_expressed"`` (the probability that the
            gene is expressed).

        Returns
        -------
        Cells x genes predictions.
        """
        if quantity not in ("expected", "value", "p_expressed"):
            raise ValueError(
                f"quantity must be 'expected', 'value' or 'p_expressed'; got {quantity!r}."
            )
        adata_ = self.adata if adata is None else adata
        ids, _ = self._gene_tokens(adata_, min_gene_fraction=min_gene_fraction)
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
        z, offset = self._embed(
            adata,
            indices,
            batch_size,
            token_budget,
            progress_bar,
            "reconstructing",
            min_gene_fraction,
            # the decoders' input offset of each cell (batch, library size)
            head=lambda z, batch: self.module.covariates(
                len(z), batch.get(REGISTRY_KEYS.BATCH_KEY), batch.get("log_library")
            ),
        )
        with torch.inference_mode():
            pred = (
                self.module.predict_genes(
                    z.to(self.device),
                    torch.as_tensor(ids[cols], device=self.device),
                    None if offset is None else offset.to(self.device),
                    quantity,
                )
                .float()
                .cpu()
                .numpy()
            )
        if return_numpy:
            return pred
        obs = adata_.obs_names if indices is None else adata_.obs_names[np.asarray(indices)]
        return pd.DataFrame(pred, index=obs, columns=names[cols])

    # ------------------------------------------------------------------ save / load
    def save(
        self,
        dir_path: str | Path,
        prefix: str | None = None,
        overwrite: bool = False,
        save_anndata: bool = False,
        **kwargs,
    ) -> None:
        """Save the model with scvi-tools' layout, plus a checksum of the weights.

        Parameters
        ----------
        dir_path
            Folder to write (``model.pt``, its checksum ``model.pt.sha256``, optionally the
            AnnData).
        prefix, overwrite, save_anndata, **kwargs
            As in :meth:`scvi.model.base.BaseModelClass.save`.
        """
        super().save(
            str(dir_path), prefix=prefix, overwrite=overwrite, save_anndata=save_anndata, **kwargs
        )
        write_checksum(Path(dir_path) / f"{prefix or ''}model.pt")

    @classmethod
    def load(
        cls,
        dir_path: str | Path,
        adata: AnnData | None = None,
        accelerator: str = "auto",
        device: int | str = "auto",
        prefix: str | None = None,
        backup_url: str | None = None,
        **kwargs,
    ) -> SCMamba2:
        """Load a model saved by :meth:`save` (weights checked), or a pretrained backbone.

        A folder written by :func:`~scmamba2_scvi.model.pretrain`, given an AnnData, goes to
        :meth:`from_pretrained`; so ``scvi.hub.HubModel(folder).load_model(adata=...)`` maps
        data with other genes onto a pretrained backbone. Anything else goes to scvi-tools'
        :meth:`~scvi.model.base.BaseModelClass.load`.

        Parameters
        ----------
        dir_path
            Folder the model was saved to (:meth:`save`), or a pretrained-model folder.
        adata
            The AnnData the model was trained on (same genes in the same order); for other data
            use :meth:`load_query_data` (or, for a pretrained folder, any AnnData).
        accelerator, device, prefix, backup_url, **kwargs
            As in :meth:`scvi.model.base.BaseModelClass.load`.

        Returns
        -------
        The model.

        Raises
        ------
        FileNotFoundError
            When the folder or its ``model.pt`` is missing.
        ValueError
            When ``model.pt`` is empty, truncated, corrupt or fails its checksum, or when
            ``adata`` has other genes than the training data.
        """
        if adata is not None and is_pretrained(dir_path):
            return cls.from_pretrained(dir_path, adata, accelerator=accelerator, device=device)
        if backup_url is None:
            _check_saved_folder(Path(dir_path), prefix)
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message="`var_names` for the loaded", append=False)
            try:
                return super().load(
                    str(dir_path),
                    adata=adata,
                    accelerator=accelerator,
                    device=device,
                    prefix=prefix,
                    backup_url=backup_url,
                    **kwargs,
                )
            except UserWarning as e:
                raise ValueError(
                    f"The AnnData's genes (var_names) differ from those the model in {dir_path} "
                    "was trained on. load() needs the training data's genes in the same order; "
                    "for other data use SCMamba2.load_query_data(adata, reference) (or "
                    "from_pretrained for a pretrained model)."
                ) from e

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
            Least share of the reference's vocabulary the query must hold
            (``MappingReport.coverage``); default: the reference's.
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
            _check_saved_folder(Path(reference), None)
            registry, init, state = _read_saved(reference)
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
        # Codes of the reference's categories are its heads' indices; new categories read as
        # unknown. A new head takes the query's categories.
        columns = {key: setup.get(setup_key) for key, setup_key in _SETUP_KEYS.items()}
        source = _source_registry(registry, adata, columns)
        transfer = {} if source is None else {"source_registry": source, "extend_categories": True}
        cls.setup_anndata(adata, **setup, **transfer)
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
        model.to_device(_torch_device(accelerator, device))
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
            Least share of the vocabulary the data must hold (default: the backbone's).
        accelerator, device
            Where to put the model.

        Returns
        -------
        An :class:`SCMamba2` on ``adata`` with the pretrained weights.
        """
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
