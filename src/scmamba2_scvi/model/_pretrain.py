"""Pretraining on corpora larger than memory: Lightning strategies, checkpoints, resume."""

from __future__ import annotations

import inspect
import json
import logging
import os
import random
import re
from collections.abc import Sequence
from os import PathLike
from pathlib import Path
from typing import Any

import anndata as ad
import h5py
import lightning.pytorch as pl
import numpy as np
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import LambdaCallback, ModelCheckpoint

from scmamba2_scvi.data import (
    CellCorpus,
    GeneVocab,
    H5adShardCorpus,
    SomaCorpus,
    Tokenizer,
    TokenStream,
)
from scmamba2_scvi.module import SCMamba2Module
from scmamba2_scvi.module._memory import guard_step

from ._model import PRESETS, SCMamba2, build_module
from ._pretrained import save_pretrained
from ._trainingplan import adamw_warmup_cosine

__all__ = ["PretrainPlan", "corpus_vocab", "latest_checkpoint", "pretrain"]

logger = logging.getLogger(__name__)

_CKPT = re.compile(r"step=(\d+)\.ckpt$")


class PretrainPlan(pl.LightningModule):
    """Lightning module of corpus pretraining: masked expression (GEP + GEPC) on a token stream.

    AdamW (no decay on biases, norms, embeddings and SSM parameters) with linear warm-up and
    cosine decay per step, as in fine-tuning (:func:`~scmamba2_scvi.model.adamw_warmup_cosine`),
    and the same memory guard before every step (a batch that would not fit is encoded in
    recomputed groups of cells, with the same loss and gradients).
    Checkpoints also hold the random states (torch, CUDA, numpy, python) and, through
    Lightning, the stream's data position.

    Parameters
    ----------
    module
        The network.
    stream
        The :class:`~scmamba2_scvi.data.TokenStream` being trained on; each trained batch is
        reported to it (:meth:`~scmamba2_scvi.data.TokenStream.mark_consumed`).
    lr, weight_decay, betas, min_lr_ratio
        Optimizer and schedule; the cosine spans the trainer's estimated steps.
    warmup_ratio, warmup_steps
        Linear warm-up: a fraction of the run, or (when given) a number of steps.
    data_log
        Folder where each rank appends ``step epoch obs_index...`` per trained batch
        (``rank{r}.tsv``): an audit of which cells were trained on. ``None``: no log.
    **loss_kwargs
        Loss weights of :meth:`~scmamba2_scvi.module.SCMamba2Module.loss`.
    """

    def __init__(
        self,
        module: SCMamba2Module,
        stream: TokenStream | None,
        *,
        lr: float = 1e-3,
        weight_decay: float = 0.01,
        betas: tuple[float, float] = (0.9, 0.98),
        warmup_ratio: float = 0.05,
        warmup_steps: int | None = None,
        min_lr_ratio: float = 0.05,
        data_log: str | PathLike | None = None,
        **loss_kwargs: float,
    ) -> None:
        super().__init__()
        self.module, self.stream = module, stream
        self.lr, self.weight_decay, self.betas = lr, weight_decay, betas
        self.warmup_ratio, self.warmup_steps = warmup_ratio, warmup_steps
        self.min_lr_ratio = min_lr_ratio
        self.data_log = Path(data_log) if data_log is not None else None
        self.loss_kwargs = loss_kwargs

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        """Loss of one tokenized batch; logs ``train_loss``, ``gep``, ``gepc``, ``tokens``."""
        if self.stream is not None:
            self.stream.mark_consumed(batch["step"])
        guard_step(self.module, batch)
        out = self.module.token_loss(batch, **self.loss_kwargs)
        n_cells = int(batch["obs_index"].numel())
        n_tokens = int((~batch["key_padding_mask"]).sum())
        self.log("train_loss", out.loss, prog_bar=True, batch_size=n_cells, sync_dist=False)
        for key in ("gep", "gepc", "masked_pearson"):
            self.log(key, out.extra_metrics[key], batch_size=n_cells)
        self.log("tokens", float(n_tokens), reduce_fx="sum", batch_size=n_cells)
        if self.data_log is not None:
            cells = " ".join(map(str, batch["obs_index"].tolist()))
            path = self.data_log / f"rank{self.global_rank}.tsv"
            with open(path, "a") as f:
                f.write(f"{self.global_step + 1}\t{batch['epoch']}\t{cells}\n")
        return out.loss

    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW and the per-step warm-up + cosine schedule (shared with fine-tuning)."""
        return adamw_warmup_cosine(
            self.module,
            self.trainer.estimated_stepping_batches,
            lr=self.lr,
            weight_decay=self.weight_decay,
            betas=self.betas,
            warmup_ratio=self.warmup_ratio,
            warmup_steps=self.warmup_steps,
            min_lr_ratio=self.min_lr_ratio,
        )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Add the random states, so that a resumed run draws what the first would have."""
        checkpoint["rng_states"] = {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": _numpy_state(np.random.get_state()),
            "python": random.getstate(),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore the random states saved by :meth:`on_save_checkpoint`."""
        states = checkpoint.get("rng_states")
        if states is None:
            return
        torch.set_rng_state(states["torch"])
        if states["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(states["cuda"])
        name, keys, *rest = states["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
        random.setstate(states["python"])


def _numpy_state(state: tuple) -> tuple:
    """Random state of numpy, with its key array as a tensor (loadable with ``weights_only``)."""
    name, keys, *rest = state
    return (
        name,
        torch.from_numpy(keys.astype(np.int64)),
        *(int(v) if i < 2 else float(v) for i, v in enumerate(rest)),
    )


class _AtomicCheckpointIO(TorchCheckpointIO):
    """Write checkpoints to a temporary file, then rename: a kill never leaves a torn file."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options=None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        torch.save(checkpoint, tmp)
        os.replace(tmp, path)


def latest_checkpoint(out_dir: str | PathLike) -> Path | None:
    """The checkpoint with the highest step in ``out_dir/checkpoints``, or ``None``."""
    folder = Path(out_dir) / "checkpoints"
    found = [
        (int(m.group(1)), p) for p in folder.glob("step=*.ckpt") if (m := _CKPT.search(p.name))
    ]
    return max(found)[1] if found else None


def _is_soma(source: str | PathLike) -> bool:
    return str(source).startswith(("s3://", "gs://", "tiledb://")) or (
        Path(source).is_dir() and any(Path(source).glob("__tiledb_group*"))
    )


def _shard_paths(source: str | PathLike | Sequence[str | PathLike]) -> list[str]:
    if isinstance(source, str | PathLike):
        if Path(source).is_file():
            return [os.fspath(source)]
        paths = sorted(str(p) for p in Path(source).glob("*.h5ad"))
        if not paths:
            raise FileNotFoundError(f"No .h5ad files in {source}; pass a folder of h5ad shards.")
        return paths
    return [os.fspath(p) for p in source]


def corpus_vocab(
    source: str | PathLike | Sequence[str | PathLike],
    *,
    gene_key: str | None = None,
    measurement_name: str = "RNA",
) -> GeneVocab:
    """Gene vocabulary of a corpus: the union of its shards' genes (only ``var`` is read).

    Parameters
    ----------
    source
        A folder of h5ad shards, a list of h5ad files, or a TileDB-SOMA experiment.
    gene_key
        ``var`` column with gene IDs or symbols (default: ``var_names`` for h5ad; for SOMA
        ``feature_id`` when present, else ``var_id``).
    measurement_name
        SOMA measurement holding the genes.

    Returns
    -------
    The vocabulary, genes in order of first appearance.
    """
    if isinstance(source, str | PathLike) and _is_soma(source):
        import tiledbsoma as soma

        with soma.Experiment.open(str(source)) as exp:
            var = exp.ms[measurement_name].var.read().concat().to_pandas()
        key = gene_key or ("feature_id" if "feature_id" in var.columns else "var_id")
        return GeneVocab.from_anndata(var[key].astype(str).tolist())
    tables = []
    for path in _shard_paths(source):
        with h5py.File(path, "r") as f:
            tables.append(ad.io.read_elem(f["var"]))
    return GeneVocab.from_anndata(tables, gene_key=gene_key)


def _strategy(strategy: str, devices: Any, num_nodes: int, accelerator: str) -> Any:
    """Lightning strategy: FSDP wraps (and checkpoints) each bidirectional block."""
    if strategy == "fsdp":
        from lightning.pytorch.strategies import FSDPStrategy

        from scmamba2_scvi.nn import BiMamba2Block

        return FSDPStrategy(
            auto_wrap_policy={BiMamba2Block},
            activation_checkpointing_policy={BiMamba2Block},
            state_dict_type="full",
        )
    if strategy == "auto" and (num_nodes > 1 or _n_devices(devices, accelerator) > 1):
        return "ddp"
    return strategy


def _n_devices(devices: Any, accelerator: str) -> int:
    if isinstance(devices, int):
        return devices
    if isinstance(devices, list | tuple):
        return len(devices)
    if str(devices).isdigit():
        return int(devices)
    if devices in ("auto", "-1", -1) and accelerator in ("auto", "gpu", "cuda"):
        return max(1, torch.cuda.device_count())
    return 1


# Keyword arguments of SCMamba2 that are not architecture or tokenization options: pretraining
# sets them itself (the vocabulary, no heads) or they only concern AnnData inputs.
_NOT_MODEL_KWARGS = frozenset(
    {"vocab", "label_categories", "batch_categories", "min_gene_fraction"}
)


def _model_params(preset: str, model_kwargs: dict[str, Any] | None) -> dict[str, Any]:
    """``{"preset": preset, **model_kwargs}``, refusing unknown names before any data is read."""
    if preset not in PRESETS:
        raise ValueError(f"Unknown preset {preset!r}; choose one of {list(PRESETS)}.")
    valid = sorted(
        name
        for name, p in inspect.signature(SCMamba2.__init__).parameters.items()
        if p.kind is inspect.Parameter.KEYWORD_ONLY and name not in _NOT_MODEL_KWARGS
    )
    unknown = sorted(set(model_kwargs or {}) - set(valid))
    if unknown:
        raise TypeError(
            f"pretrain() got unknown model_kwargs {unknown}; valid keys: {', '.join(valid)} "
            "(the architecture preset is the `preset` argument)."
        )
    return {"preset": preset, **(model_kwargs or {})}


def _resume_point(out: Path, params: dict[str, Any], resume: bool | str | PathLike) -> Path | None:
    """The checkpoint to continue from (``None``: start afresh); refuses another model's run."""
    if not resume:
        return None
    if (out / "config.json").exists():
        before = json.loads((out / "config.json").read_text())["params"]
        if before != params:
            raise ValueError(
                f"The checkpoints in {out} are of a model built with {before}, not {params}; "
                "resume with the same preset and model_kwargs, or write to a new out_dir."
            )
    ckpt_path = latest_checkpoint(out) if resume is True else Path(resume)
    if ckpt_path is None:
        logger.info("No checkpoint in %s: starting from scratch.", out / "checkpoints")
    elif not ckpt_path.exists():
        raise FileNotFoundError(f"Checkpoint {ckpt_path} does not exist.")
    return ckpt_path


def _resolve_corpus(
    corpus: CellCorpus | str | PathLike | Sequence[str | PathLike],
    out: Path,
    vocab: GeneVocab | str | PathLike | None,
    resume: bool | str | PathLike,
    *,
    layer: str | None,
    gene_key: str | None,
    **corpus_kwargs: Any,
) -> CellCorpus:
    """The corpus on its vocabulary: given, resumed (``out/vocab.json``), or the corpus's genes."""
    if isinstance(vocab, str | PathLike):
        vocab = GeneVocab.load(vocab)
    if isinstance(corpus, CellCorpus):
        vocab = corpus.vocab
    saved = out / "vocab.json"
    if resume and saved.exists():
        previous = GeneVocab.load(saved)
        if vocab is not None and vocab.tokens != previous.tokens:
            raise ValueError(
                f"The vocabulary differs from the one the checkpoints in {out} were trained "
                f"with ({len(vocab)} vs {len(previous)} tokens); resume with the same vocabulary "
                "(omit `vocab` to reuse it) or write to a new out_dir."
            )
        vocab = previous
    if isinstance(corpus, CellCorpus):
        return corpus
    if vocab is None:
        vocab = corpus_vocab(corpus, gene_key=gene_key)
    if isinstance(corpus, str | PathLike) and _is_soma(corpus):
        return SomaCorpus(
            str(corpus), vocab, layer=layer or "raw", gene_key=gene_key, **corpus_kwargs
        )
    return H5adShardCorpus(
        _shard_paths(corpus), vocab, layer=layer, gene_key=gene_key, **corpus_kwargs
    )


def _build(
    corpus: CellCorpus,
    params: dict[str, Any],
    *,
    stream_kwargs: dict[str, Any],
    plan_kwargs: dict[str, Any],
) -> tuple[PretrainPlan, dict[str, Any]]:
    """The network, the token stream over the corpus, and the plan training one on the other."""
    module, sizes = build_module(len(corpus.vocab), 0, 0, params)
    tok_keys = ("mode", "max_len", "gene_order", "subsample", "value_transform", "n_bins")
    tokenizer = Tokenizer.from_vocab(
        corpus.vocab,
        mask_ratio=module.mask_ratio,
        **{k: params[k] for k in tok_keys if k in params},
    )
    stream = TokenStream(corpus, tokenizer, **stream_kwargs)
    return PretrainPlan(module, stream, **plan_kwargs), sizes


def _trainer(
    out: Path,
    run_files: dict[str, Any],
    *,
    checkpoint_every: int,
    keep_checkpoints: int,
    strategy: str,
    devices: Any,
    num_nodes: int,
    accelerator: str,
    on_gpu: bool,
    precision: str | None,
    max_steps: int | None,
    max_epochs: int | None,
    progress_bar: bool,
    **trainer_kwargs: Any,
) -> pl.Trainer:
    """The Lightning trainer: step checkpoints (atomic), CSV logs, the run files at fit start."""

    def write_run_files(trainer: pl.Trainer, _: pl.LightningModule) -> None:
        # once every rank has read them (fit starts after the ranks' rendezvous), by one rank
        if trainer.is_global_zero:
            run_files["vocab"].save(out / "vocab.json")
            config = {"params": run_files["params"], "sizes": run_files["sizes"]}
            (out / "config.json").write_text(json.dumps(config, indent=2))

    checkpoint = ModelCheckpoint(
        dirpath=out / "checkpoints",
        filename="step={step:08d}",
        auto_insert_metric_name=False,
        every_n_train_steps=checkpoint_every,
        save_top_k=keep_checkpoints,
        monitor="step",
        mode="max",
        save_on_train_epoch_end=False,
    )
    trainer_kwargs.setdefault("gradient_clip_val", 1.0 if strategy != "fsdp" else None)
    if max_steps is None and max_epochs is None:
        max_epochs = 1
    return pl.Trainer(
        accelerator=accelerator,
        devices=devices,
        num_nodes=num_nodes,
        strategy=_strategy(strategy, devices, num_nodes, accelerator),
        precision=precision or ("bf16-mixed" if on_gpu else "32-true"),
        max_steps=-1 if max_steps is None else max_steps,
        max_epochs=-1 if max_epochs is None else max_epochs,
        callbacks=[checkpoint, LambdaCallback(on_fit_start=write_run_files)],
        plugins=[_AtomicCheckpointIO()],
        default_root_dir=out,
        logger=pl.loggers.CSVLogger(out, name="logs"),
        log_every_n_steps=min(50, checkpoint_every),
        enable_progress_bar=progress_bar,
        enable_model_summary=False,
        use_distributed_sampler=False,
        **trainer_kwargs,
    )


def _save(
    trainer: pl.Trainer, plan: PretrainPlan, params: dict[str, Any], out: Path, every: int
) -> Path:
    """The last checkpoint (for a longer run to resume) and the pretrained-model folder."""
    if trainer.global_step % every:
        # decided from the step, not from the file, so every rank joins this collective
        trainer.save_checkpoint(out / "checkpoints" / f"step={trainer.global_step:08d}.ckpt")
    model_dir = out / "model"
    if trainer.is_global_zero:
        corpus = plan.stream.corpus
        training = {
            "steps": trainer.global_step,
            "epochs": trainer.current_epoch,
            "corpus_cells": corpus.n_cells,
            "devices": trainer.world_size,
            "batch_size": plan.stream.batch_size,
            "token_budget": plan.stream.token_budget,
            "packed": plan.stream.packed,
        }
        save_pretrained(plan.module, params, corpus.vocab, model_dir, training=training)
        logger.info("Pretrained model saved to %s (step %d).", model_dir, trainer.global_step)
    trainer.strategy.barrier("save_pretrained")
    return model_dir


def pretrain(
    corpus: CellCorpus | str | PathLike | Sequence[str | PathLike],
    out_dir: str | PathLike,
    *,
    vocab: GeneVocab | str | PathLike | None = None,
    preset: str = "default",
    model_kwargs: dict[str, Any] | None = None,
    batch_size: int = 64,
    token_budget: int | None = None,
    max_steps: int | None = None,
    max_epochs: int | None = None,
    lr: float = 1e-3,
    weight_decay: float = 0.01,
    warmup_steps: int | None = None,
    checkpoint_every: int = 1000,
    keep_checkpoints: int = 2,
    resume: bool | str | PathLike = False,
    accelerator: str = "auto",
    devices: int | str | list[int] = "auto",
    num_nodes: int = 1,
    strategy: str = "auto",
    precision: str | None = None,
    packed: bool | None = None,
    num_workers: int = 0,
    cells_per_block: int = 1024,
    shuffle: bool = True,
    seed: int = 0,
    layer: str | None = None,
    gene_key: str | None = None,
    data_log: bool = False,
    progress_bar: bool = True,
    **trainer_kwargs: Any,
) -> Path:
    """Pretrain SC-MAMBA2 by masked expression on a corpus streamed from disk.

    The same call runs on a laptop CPU, on several GPUs (DDP, the default with several devices)
    or several nodes (Lightning's ``torchrun``/SLURM environment variables; ``num_nodes``), and
    with FSDP (``strategy="fsdp"``) for models that do not fit one GPU. Each rank reads its own
    disjoint share of the corpus's blocks; no rank loads the corpus. Checkpoints (weights,
    optimizer, schedule, data position, random states) are written every ``checkpoint_every``
    steps; ``resume=True`` continues from the latest one, with no cell lost or repeated.

    The run has four steps: resolve the corpus and its vocabulary, build the network, stream and
    plan, fit, and save the pretrained-model folder (:func:`save_pretrained`).

    Parameters
    ----------
    corpus
        A :class:`~scmamba2_scvi.data.CellCorpus`, a folder (or list) of h5ad shards, or a
        TileDB-SOMA experiment (the CELLxGENE census format, counts in X layer ``"raw"``).
    out_dir
        Output folder: ``checkpoints/``, ``model/`` (the result), ``vocab.json``,
        ``config.json``, ``logs/``, ``data_log/`` (with ``data_log``).
    vocab
        Gene vocabulary (or its JSON file); default: the union of the corpus's genes, built
        from ``var`` alone (or the one in ``out_dir`` when resuming).
    preset, model_kwargs
        Architecture: a preset of :class:`~scmamba2_scvi.model.SCMamba2` and any of its
        keyword-only arguments (``d_model``, ``mode``, ``max_len``, ``mask_ratio``,
        ``backend``...). An unknown name raises a :class:`TypeError` before any data is read.
        Pretraining starts the gene embeddings from ``N(0, 1)`` (no ``gene_init="pca"``: the
        corpus is read as a stream) and draws no non-expressed genes (``zero_genes``): with
        ``mode="expressed"``, GEPC's zero-probability head learns only in fine-tuning.
    batch_size
        Cells per step on each rank (the most, with ``token_budget``).
    token_budget
        Tokens per step on each rank: batches hold as many cells as fit (padded length x cells,
        or the sum of lengths when packed), planned from the shards' index pointers.
    max_steps, max_epochs
        Length of the run (default: one epoch).
    lr, weight_decay, warmup_steps
        AdamW and the warm-up (default: 5% of the steps) before the cosine decay
        (:func:`~scmamba2_scvi.model.adamw_warmup_cosine`).
    checkpoint_every
        Steps between checkpoints.
    keep_checkpoints
        Most recent checkpoints kept.
    resume
        ``True``: continue from the latest checkpoint in ``out_dir`` (start afresh if none);
        a path: continue from that checkpoint.
    accelerator, devices, num_nodes, strategy
        Lightning's (``strategy``: ``"auto"``, ``"ddp"``, ``"fsdp"``, or a strategy object).
    precision
        Default ``"bf16-mixed"`` on GPU, ``"32-true"`` on CPU.
    packed
        Packed variable-length batches (no padding computed); default on GPU.
    num_workers
        Data-loading processes per rank.
    cells_per_block, shuffle, seed
        Cells per corpus block (the unit of reading and sharding), blocks shuffled per epoch,
        and the seed of shuffling, masking and initialisation.
    layer, gene_key
        Where h5ad shards hold counts and gene IDs (see
        :class:`~scmamba2_scvi.data.H5adShardCorpus`).
    data_log
        Each rank appends the cells of every trained batch to ``data_log/rank{r}.tsv``.
    progress_bar
        Show Lightning's progress bar.
    **trainer_kwargs
        Passed to :class:`lightning.pytorch.Trainer` (e.g. ``accumulate_grad_batches``).

    Returns
    -------
    The pretrained-model folder (``out_dir/model``): put it onto your data with
    ``SCMamba2.from_pretrained(out_dir / "model", adata)``
    (:meth:`~scmamba2_scvi.SCMamba2.from_pretrained`) to embed it or fine-tune;
    :class:`scvi.hub.HubModel` opens it too.
    """
    params = _model_params(preset, model_kwargs)
    for name, value in (("batch_size", batch_size), ("checkpoint_every", checkpoint_every)):
        if value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value}.")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = _resume_point(out, params, resume)
    corpus = _resolve_corpus(
        corpus,
        out,
        vocab,
        resume,
        layer=layer,
        gene_key=gene_key,
        cells_per_block=cells_per_block,
        shuffle=shuffle,
        seed=seed,
    )
    pl.seed_everything(seed, workers=True, verbose=False)
    on_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    if data_log:
        (out / "data_log").mkdir(exist_ok=True)
    plan, sizes = _build(
        corpus,
        params,
        stream_kwargs={
            "batch_size": batch_size,
            "token_budget": token_budget,
            "num_workers": num_workers,
            "packed": on_gpu if packed is None else packed,
            "seed": seed,
            "pin_memory": on_gpu,
        },
        plan_kwargs={
            "lr": lr,
            "weight_decay": weight_decay,
            "warmup_steps": warmup_steps,
            "data_log": (out / "data_log") if data_log else None,
        },
    )
    trainer = _trainer(
        out,
        {"vocab": corpus.vocab, "params": params, "sizes": sizes},
        checkpoint_every=checkpoint_every,
        keep_checkpoints=keep_checkpoints,
        strategy=strategy,
        devices=devices,
        num_nodes=num_nodes,
        accelerator=accelerator,
        on_gpu=on_gpu,
        precision=precision,
        max_steps=max_steps,
        max_epochs=max_epochs,
        progress_bar=progress_bar,
        **trainer_kwargs,
    )
    trainer.fit(plan, train_dataloaders=plan.stream, ckpt_path=ckpt_path)
    return _save(trainer, plan, params, out, checkpoint_every)
