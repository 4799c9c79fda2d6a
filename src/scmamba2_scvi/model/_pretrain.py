"""Pretraining on corpora larger than memory: Lightning strategies, checkpoints, resume."""

from __future__ import annotations

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
import scvi
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

from ._model import SCMamba2, build_module
from ._trainingplan import param_groups, warmup_cosine

__all__ = ["PretrainPlan", "pretrain"]

logger = logging.getLogger(__name__)

_CKPT = re.compile(r"step=(\d+)\.ckpt$")


class PretrainPlan(pl.LightningModule):
    """Lightning module of corpus pretraining: masked expression (GEP + GEPC) on a token stream.

    AdamW (no decay on biases, norms, embeddings and SSM parameters) with linear warm-up and
    cosine decay per step. Checkpoints also hold the random states (torch, CUDA, numpy, python)
    and, through Lightning, the stream's data position.

    Parameters
    ----------
    module
        The network.
    stream
        The :class:`~scmamba2_scvi.data.TokenStream` being trained on; each trained batch is
        reported to it (:meth:`~scmamba2_scvi.data.TokenStream.mark_consumed`).
    lr, weight_decay, betas, min_lr_ratio
        Optimizer and schedule; the cosine spans the trainer's estimated steps.
    warmup_steps
        Linear warm-up steps (default: 5% of the run).
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
        warmup_steps: int | None = None,
        min_lr_ratio: float = 0.05,
        data_log: str | PathLike | None = None,
        **loss_kwargs: float,
    ) -> None:
        super().__init__()
        self.module, self.stream = module, stream
        self.lr, self.weight_decay, self.betas = lr, weight_decay, betas
        self.warmup_steps = warmup_steps
        self.min_lr_ratio = min_lr_ratio
        self.data_log = Path(data_log) if data_log is not None else None
        self.loss_kwargs = loss_kwargs

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        """Loss of one tokenized batch; logs ``train_loss``, ``gep``, ``gepc``, ``tokens``."""
        if self.stream is not None:
            self.stream.mark_consumed(batch["step"])
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
        """AdamW and the per-step warm-up + cosine schedule."""
        optimizer = torch.optim.AdamW(
            param_groups(self.module, self.weight_decay), lr=self.lr, betas=self.betas
        )
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = self.warmup_steps if self.warmup_steps is not None else max(1, total // 20)
        floor = self.min_lr_ratio
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, warmup, total, floor)
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

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


def save_pretrained(
    module: SCMamba2Module, params: dict[str, Any], vocab: GeneVocab, path: str | PathLike
) -> Path:
    """Save a pretrained network where :meth:`SCMamba2.load_query_data` can read it.

    Parameters
    ----------
    module
        The trained network.
    params
        The :class:`~scmamba2_scvi.model.SCMamba2` arguments it was built with.
    vocab
        Its gene vocabulary.
    path
        Folder to write ``model.pt`` (scvi-tools' format) and ``vocab.json`` to.

    Returns
    -------
    The folder.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    init = {**params, "vocab": vocab.to_dict(), "label_categories": [], "batch_categories": []}
    setup_args = {
        "layer": None,
        "batch_key": None,
        "labels_key": None,
        "unlabeled_category": "Unknown",
        "gene_key": None,
        "check_counts": params.get("value_transform", "bin") != "raw",
    }
    attr_dict = {
        "registry_": {
            "model_name": SCMamba2.__name__,
            "setup_args": setup_args,
            "setup_method_name": "setup_anndata",
            "scvi_version": scvi.__version__,
        },
        "init_params_": {"kwargs": {}, "non_kwargs": init},
        "is_trained_": True,
    }
    state = {k: v.detach().cpu() for k, v in module.state_dict().items()}
    torch.save(
        {
            "model_state_dict": state,
            "var_names": np.asarray(vocab.gene_keys, dtype=object),
            "attr_dict": attr_dict,
        },
        path / "model.pt",
    )
    vocab.save(path / "vocab.json")
    return path


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
    block_size: int = 1024,
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

    Parameters
    ----------
    corpus
        A :class:`~scmamba2_scvi.data.CellCorpus`, a folder (or list) of h5ad shards, or a
        TileDB-SOMA experiment (the CELLxGENE census format, counts in X layer ``"raw"``).
    out_dir
        Output folder: ``checkpoints/``, ``model/`` (the result), ``vocab.json``,
        ``config.json``, ``data_log/`` (with ``data_log``).
    vocab
        Gene vocabulary (or its JSON file); default: the union of the corpus's genes, built
        from ``var`` alone (or the one in ``out_dir`` when resuming).
    preset, model_kwargs
        Architecture: a preset of :class:`~scmamba2_scvi.model.SCMamba2` and any of its
        keyword arguments (``d_model``, ``mode``, ``max_len``, ``mask_ratio``, ``backend``...).
    batch_size
        Cells per step on each rank (the most, with ``token_budget``).
    token_budget
        Tokens per step on each rank: batches hold as many cells as fit (padded length x cells,
        or the sum of lengths when packed), planned from the shards' index pointers.
    max_steps, max_epochs
        Length of the run (default: one epoch).
    lr, weight_decay, warmup_steps
        AdamW and the warm-up (default: 5% of the steps) before the cosine decay.
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
    block_size, shuffle, seed
        Corpus blocks (the unit of reading and sharding), shuffled per epoch, and the seed of
        shuffling, masking and initialisation.
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
    The folder of the pretrained model (``out_dir/model``): load it onto your data with
    ``SCMamba2.load_query_data(adata, out_dir / "model")`` and fine-tune.
    """
    for name, value in (("batch_size", batch_size), ("checkpoint_every", checkpoint_every)):
        if value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value}.")
    params = {"preset": preset, **(model_kwargs or {})}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if resume and (out / "config.json").exists():
        before = json.loads((out / "config.json").read_text())["params"]
        if before != params:
            raise ValueError(
                f"The checkpoints in {out} are of a model built with {before}, not {params}; "
                "resume with the same preset and model_kwargs, or write to a new out_dir."
            )
    ckpt_path = None
    if resume:
        ckpt_path = latest_checkpoint(out) if resume is True else Path(resume)
        if ckpt_path is None:
            logger.info("No checkpoint in %s: starting from scratch.", out / "checkpoints")
        elif not ckpt_path.exists():
            raise FileNotFoundError(f"Checkpoint {ckpt_path} does not exist.")
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
    if vocab is None:
        vocab = corpus_vocab(corpus, gene_key=gene_key)
    if not isinstance(corpus, CellCorpus):
        common = {"block_size": block_size, "shuffle": shuffle, "seed": seed}
        if isinstance(corpus, str | PathLike) and _is_soma(corpus):
            corpus = SomaCorpus(
                str(corpus), vocab, layer=layer or "raw", gene_key=gene_key, **common
            )
        else:
            corpus = H5adShardCorpus(
                _shard_paths(corpus), vocab, layer=layer, gene_key=gene_key, **common
            )

    pl.seed_everything(seed, workers=True, verbose=False)
    module, sizes = build_module(len(vocab), 0, 0, params)
    on_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    packed = on_gpu if packed is None else packed
    tok_keys = ("mode", "max_len", "gene_order", "subsample", "value_transform", "n_bins")
    tok_params = {k: params[k] for k in tok_keys if k in params}
    tokenizer = Tokenizer.from_vocab(vocab, mask_ratio=module.mask_ratio, **tok_params)
    stream = TokenStream(
        corpus,
        tokenizer,
        batch_size,
        token_budget=token_budget,
        num_workers=num_workers,
        packed=packed,
        seed=seed,
        pin_memory=on_gpu,
    )
    if max_steps is None and max_epochs is None:
        max_epochs = 1
    plan = PretrainPlan(
        module,
        stream,
        lr=lr,
        weight_decay=weight_decay,
        warmup_steps=warmup_steps,
        data_log=(out / "data_log") if data_log else None,
    )
    if data_log:
        (out / "data_log").mkdir(exist_ok=True)

    def write_run_files(trainer: pl.Trainer, _: pl.LightningModule) -> None:
        # once every rank has read them (fit starts after the ranks' rendezvous), by one rank
        if trainer.is_global_zero:
            vocab.save(out / "vocab.json")
            config = {"params": params, "sizes": sizes}
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
    trainer = pl.Trainer(
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
    trainer.fit(plan, train_dataloaders=stream, ckpt_path=ckpt_path)
    if trainer.global_step % checkpoint_every:  # the end of the run, for a longer run to resume
        # (decided from the step, not from the file, so every rank joins this collective)
        trainer.save_checkpoint(out / "checkpoints" / f"step={trainer.global_step:08d}.ckpt")
    model_dir = out / "model"
    if trainer.is_global_zero:
        save_pretrained(plan.module, params, vocab, model_dir)
        logger.info("Pretrained model saved to %s (step %d).", model_dir, trainer.global_step)
    trainer.strategy.barrier("save_pretrained")
    return model_dir
