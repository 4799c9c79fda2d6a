"""The ``scmamba2`` command: demo, pretrain, finetune, embed, annotate."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np

from .baselines import lr_pca_baseline

DEFAULT_DEMO_OUT = "scmamba2_demo"


def _quiet() -> None:
    """Keep the terminal readable: Lightning tips and scvi-tools notices off, warnings once."""
    warnings.filterwarnings("ignore", category=UserWarning, module="lightning")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", category=FutureWarning)
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "scvi"):
        logging.getLogger(name).setLevel(logging.ERROR)
    logging.getLogger("scmamba2_scvi").setLevel(logging.INFO)


def _read(path: str):
    import anndata as ad

    if not Path(path).is_file():
        raise FileNotFoundError(f"input file {path!r} does not exist; pass an existing .h5ad file.")
    try:
        return ad.read_h5ad(path)
    except Exception as e:  # h5py/anndata raise OSError, KeyError, ... for non-h5ad files
        raise ValueError(
            f"{path!r} is not a readable h5ad file ({type(e).__name__}: {e}); pass an AnnData "
            "written with adata.write_h5ad()."
        ) from e


def _check_keys(adata, path: str, **flags: str | None) -> None:
    """Keys given explicitly (not ``"reference"``) must exist in the input, checked up front."""
    tables = {"layer": "layers", "gene_key": "var", "labels_key": "obs", "batch_key": "obs"}
    for flag, key in flags.items():
        if key in (None, "reference"):
            continue
        where = tables[flag]
        names = list(adata.layers) if where == "layers" else list(getattr(adata, where).columns)
        if key not in names:
            shown = ", ".join(map(str, names[:20])) or "none"
            raise KeyError(
                f"--{flag.replace('_', '-')} {key!r} is not in {where} of {path} (it has: "
                f"{shown}); pass one of these."
            )


def _check_output_folder(path: str, flag: str) -> None:
    """The folder an output file goes to must exist (checked before any work is done)."""
    parent = Path(path).resolve().parent
    if not parent.is_dir():
        raise FileNotFoundError(
            f"the folder of {flag} {path!r} ({parent}) does not exist; create it first or "
            "choose another path."
        )


def demo(args: argparse.Namespace) -> dict:
    """Train on 80% of pbmc68k_reduced, annotate the other 20%, compare with LR on PCA."""
    import scanpy as sc
    from sklearn.metrics import accuracy_score, f1_score
    from sklearn.model_selection import train_test_split

    from . import pl, tl
    from .datasets import pbmc68k_counts
    from .model import SCMamba2

    t_start = time.perf_counter()
    import scvi

    scvi.settings.seed = args.seed
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    adata = pbmc68k_counts()
    key = "bulk_labels"
    train_idx, test_idx = train_test_split(
        np.arange(adata.n_obs), test_size=0.2, stratify=adata.obs[key], random_state=args.seed
    )
    adata.obs["split"] = "train"
    adata.obs.iloc[test_idx, adata.obs.columns.get_loc("split")] = "test"
    train = adata[np.sort(train_idx)].copy()
    test = adata[np.sort(test_idx)].copy()
    print(
        f"pbmc68k_reduced: {adata.n_obs} cells x {adata.n_vars} genes, {key}: "
        f"{adata.obs[key].nunique()} types; stratified split {train.n_obs} train / "
        f"{test.n_obs} held out"
    )

    SCMamba2.setup_anndata(train, layer="counts", labels_key=key)
    model = SCMamba2(train, preset=args.preset, max_len=args.max_len)
    print(model._model_summary_string)
    t0 = time.perf_counter()
    model.train(
        max_epochs=args.epochs,
        batch_size=args.batch_size,
        accelerator=args.accelerator,
        plan_kwargs={"lr": args.lr},
        train_size=0.9,
    )
    train_s = time.perf_counter() - t0

    pred = model.predict(test)
    truth = test.obs[key].astype(str).to_numpy()
    baseline = lr_pca_baseline(train, test, key, seed=args.seed)
    metrics = {
        "SCMamba2": {
            "accuracy": accuracy_score(truth, pred),
            "macro_f1": f1_score(truth, pred, average="macro"),
        },
        "LogReg on PCA": {
            "accuracy": accuracy_score(truth, baseline),
            "macro_f1": f1_score(truth, baseline, average="macro"),
        },
    }

    tl.embed(adata, model)
    tl.annotate(adata, model)
    adata.obs["true_label"] = adata.obs[key]
    held = adata[adata.obs["split"] == "test"]
    pl.umap(adata, color=[key, "scmamba2_label"], save=out / "umap.png")
    pl.confusion(held, "true_label", "scmamba2_label", save=out / "confusion.png")
    pl.history(model, save=out / "training.png")
    adata.write_h5ad(out / "pbmc68k_scmamba2.h5ad")
    model.save(out / "model", overwrite=True, save_anndata=False)
    elapsed = time.perf_counter() - t_start
    summary = {
        "metrics": metrics,
        "train_seconds": round(train_s, 1),
        "total_seconds": round(elapsed, 1),
        "epochs": args.epochs,
        "preset": args.preset,
        "n_train": train.n_obs,
        "n_test": test.n_obs,
    }
    (out / "metrics.json").write_text(json.dumps(summary, indent=2))

    print(f"\nHeld-out annotation ({test.n_obs} cells, {key}):")
    print(f"  {'method':16s} {'accuracy':>9s} {'macro-F1':>9s}")
    for name, m in metrics.items():
        print(f"  {name:16s} {m['accuracy']:9.3f} {m['macro_f1']:9.3f}")
    print(f"\ntrained in {train_s:.0f} s; whole demo {elapsed:.0f} s")
    print(
        f"wrote {out}/: pbmc68k_scmamba2.h5ad (obsm X_scmamba2, obs scmamba2_label), "
        "umap.png, confusion.png, training.png, metrics.json, model/"
    )
    sc.settings.verbosity = 0
    return summary


def pretrain(args: argparse.Namespace) -> None:
    """Masked-expression pretraining streamed from h5ad shards or a TileDB-SOMA experiment.

    Runs on one CPU or GPU, or on several GPUs and nodes with the same command (DDP by default,
    FSDP with --strategy fsdp; multi-node through torchrun or SLURM). Checkpoints go to
    OUT/checkpoints every --checkpoint-every steps; --resume continues from the latest one.
    """
    from .model import pretrain as run

    source = args.input if len(args.input) > 1 else args.input[0]
    model_kwargs = {"max_len": args.max_len, "mode": args.mode}
    devices = int(args.devices) if str(args.devices).isdigit() else args.devices
    same = (
        "batch_size token_budget max_steps lr checkpoint_every resume accelerator num_nodes "
        "strategy precision packed num_workers cells_per_block seed layer gene_key data_log"
    ).split()
    model_dir = run(
        source,
        args.out,
        preset=args.preset,
        model_kwargs=model_kwargs,
        max_epochs=args.epochs,
        devices=devices,
        progress_bar=not args.no_progress,
        **{name: getattr(args, name) for name in same},
    )
    print(f"saved the pretrained model to {model_dir}")


def _model_dir(path: str) -> str:
    """A saved model's folder, also given as the output folder of ``scmamba2 pretrain``."""
    if not Path(path).is_dir():
        raise FileNotFoundError(
            f"--model folder {path!r} does not exist; pass the folder a model was saved to "
            "(the --out of scmamba2 finetune, pretrain or demo)."
        )
    inner = Path(path) / "model"
    if not (Path(path) / "model.pt").exists() and (inner / "model.pt").exists():
        return str(inner)
    return path


def finetune(args: argparse.Namespace) -> None:
    """Load a (pre)trained model onto new data, fine-tune it, save it."""
    model_dir = _model_dir(args.model)
    adata = _read(args.input)
    _check_keys(
        adata,
        args.input,
        layer=args.layer,
        gene_key=args.gene_key,
        labels_key=args.labels_key,
        batch_key=args.batch_key,
    )
    from .model import SCMamba2

    model = SCMamba2.load_query_data(
        adata,
        model_dir,
        layer=args.layer,
        batch_key=args.batch_key,
        labels_key=args.labels_key,
        gene_key=args.gene_key,
    )
    model.train(
        max_epochs=args.epochs,
        batch_size=args.batch_size,
        accelerator=args.accelerator,
        plan_kwargs={"lr": args.lr},
    )
    model.save(args.out, overwrite=True, save_anndata=False)
    print(f"saved the fine-tuned model to {args.out}")


def _apply(args: argparse.Namespace, tool: str) -> None:
    _check_output_folder(args.output, "--output")
    model_dir = _model_dir(args.model)
    adata = _read(args.input)
    _check_keys(adata, args.input, gene_key=args.gene_key)
    from . import tl
    from .model import SCMamba2

    model = SCMamba2.load_query_data(
        adata,
        model_dir,
        gene_key=args.gene_key,
        labels_key=None,
        batch_key="reference",
        min_gene_fraction=args.min_gene_fraction,
    )
    if tool == "embed":
        tl.embed(adata, model, key_added=args.key)
    else:
        tl.annotate(adata, model, key_added=args.key)
    adata.write_h5ad(args.output)
    print(f"wrote {args.output} ({tool}: key {args.key!r})")


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line naming the problem and where to read the options."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _number(kind: type, minimum: float, what: str):
    """Argparse type: a number of ``kind`` at least ``minimum`` (exclusive for floats)."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        ok = value > minimum if kind is float else value >= minimum
        if not ok or (kind is float and not np.isfinite(value)):
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
        return value

    return parse


_POSITIVE = _number(int, 1, "a positive integer")
_MAX_LEN = _number(int, 2, "an integer >= 2 (<cls> plus at least one gene)")
_LR = _number(float, 0.0, "a positive number")
_ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")


def _fraction(text: str) -> float:
    value = _number(float, -1.0, "a fraction between 0 and 1")(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a fraction between 0 and 1")
    return value


def _preset(name: str) -> str:
    from .model import PRESETS

    if name not in PRESETS:
        raise argparse.ArgumentTypeError(f"unknown preset {name!r}; choose one of {list(PRESETS)}")
    return name


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``scmamba2`` command."""
    parser = _Parser(
        prog="scmamba2",
        description="SC-MAMBA2: bidirectional Mamba2 single-cell foundation model (scvi-tools).",
    )
    verbose_help = "show the full traceback on errors (also SCMAMBA2_DEBUG=1)"
    parser.add_argument("--verbose", action="store_true", help=verbose_help)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def common(p, epochs: int | None, preset: bool = True, batch_size: int = 16, lr: float = 1e-3):
        p.add_argument(
            "--verbose", action="store_true", default=argparse.SUPPRESS, help=verbose_help
        )
        if preset:
            p.add_argument(
                "--preset",
                type=_preset,
                default="cpu-small",
                help="architecture preset (cpu-small, default, paper-medium, "
                "paper-large); default: %(default)s",
            )
            p.add_argument(
                "--max-len",
                type=_MAX_LEN,
                default=1024,
                help="max tokens per cell; default: %(default)s",
            )
        p.add_argument(
            "--epochs",
            type=_POSITIVE,
            default=epochs,
            help="default: %(default)s"
            if epochs
            else "default: one epoch (unlimited when --max-steps is given)",
        )
        p.add_argument(
            "--batch-size", type=_POSITIVE, default=batch_size, help="default: %(default)s"
        )
        p.add_argument(
            "--lr", type=_LR, default=lr, help="peak learning rate; default: %(default)s"
        )
        p.add_argument("--accelerator", default="auto", choices=_ACCELERATORS)

    p = sub.add_parser(
        "demo",
        help="annotate held-out pbmc68k_reduced cells (built-in data)",
        description=demo.__doc__,
    )
    # chosen on a split of the demo's training cells (never its held-out cells)
    common(p, epochs=5, lr=2e-3)
    p.add_argument("--out", default=DEFAULT_DEMO_OUT, help="output folder; default: ./%(default)s")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=demo)

    p = sub.add_parser(
        "pretrain",
        help="pretrain on a corpus of h5ad shards or a TileDB-SOMA experiment",
        description=pretrain.__doc__,
    )
    p.add_argument(
        "input", nargs="+", help="folder of h5ad shards, h5ad file(s), or a SOMA experiment"
    )
    p.add_argument("--out", required=True, help="output folder (checkpoints/, model/, logs/)")
    p.add_argument("--layer", default=None, help="counts layer (h5ad: default X; SOMA: raw)")
    p.add_argument("--gene-key", default=None, help="var column with gene IDs or symbols")
    p.add_argument("--mode", default="expressed", choices=["expressed", "full"])
    p.add_argument("--max-steps", type=_POSITIVE, default=None, help="optimizer steps")
    p.add_argument("--checkpoint-every", type=_POSITIVE, default=1000, help="default: %(default)s")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    p.add_argument("--devices", default="auto", help="devices per node (auto, N)")
    p.add_argument("--num-nodes", type=_POSITIVE, default=1)
    p.add_argument("--strategy", default="auto", help="auto (DDP with several devices), fsdp")
    p.add_argument("--precision", default=None, help="default: bf16-mixed on GPU")
    p.add_argument(
        "--packed",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="packed variable-length batches (default: on GPU)",
    )
    p.add_argument("--num-workers", type=int, default=0, help="data processes per rank")
    p.add_argument(
        "--token-budget", type=_POSITIVE, default=None, help="tokens per step (batch size varies)"
    )
    p.add_argument("--cells-per-block", type=_POSITIVE, default=1024, help="cells per corpus block")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-log", action="store_true", help="log the cells of every batch")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    common(p, epochs=None, batch_size=64)
    p.set_defaults(func=pretrain)

    p = sub.add_parser(
        "finetune", help="fine-tune a saved model on an h5ad", description=finetune.__doc__
    )
    p.add_argument("input", help="h5ad file with counts")
    p.add_argument("--model", required=True, help="folder of a saved model")
    p.add_argument("--out", required=True, help="folder to save the fine-tuned model to")
    p.add_argument(
        "--layer",
        default="reference",
        help="layer with counts ('reference': the saved model's; default: %(default)s)",
    )
    p.add_argument(
        "--labels-key",
        default=None,
        help="obs column of cell-type labels to fine-tune the classifier on ('reference': the "
        "saved model's); default: none, no classifier loss",
    )
    p.add_argument(
        "--batch-key",
        default="reference",
        help="obs column of batches ('reference': the saved model's; default: %(default)s)",
    )
    p.add_argument("--gene-key", default=None, help="var column of gene IDs; default: var_names")
    common(p, epochs=10, preset=False)
    p.set_defaults(func=finetune)

    for name, key, what in (
        ("embed", "X_scmamba2", "obsm key"),
        ("annotate", "scmamba2_label", "obs key (also KEY_confidence, obsm KEY_probabilities)"),
    ):
        p = sub.add_parser(
            name,
            help=f"{name} the cells of an h5ad with a saved model",
            description=f"Write the model's {name} result into a copy of INPUT.",
        )
        p.add_argument("input", help="h5ad file with counts")
        p.add_argument("--model", required=True, help="folder of a saved model")
        p.add_argument("--output", required=True, help="h5ad file to write")
        p.add_argument("--key", default=key, help=f"{what}; default: %(default)s")
        p.add_argument(
            "--gene-key", default=None, help="var column of gene IDs; default: var_names"
        )
        p.add_argument(
            "--min-gene-fraction",
            type=_fraction,
            default=None,
            help="least share of the model's genes the input must hold (default: the model's)",
        )
        p.add_argument(
            "--verbose", action="store_true", default=argparse.SUPPRESS, help=verbose_help
        )
        p.set_defaults(func=lambda a, tool=name: _apply(a, tool))
    return parser


def _one_line(error: BaseException) -> str:
    text = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
    return " ".join(str(text).split()) or type(error).__name__


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``scmamba2`` console script.

    Errors print one line (``scmamba2: error: ...``) and exit with status 1; ``--verbose`` or
    ``SCMAMBA2_DEBUG=1`` shows the traceback instead.
    """
    args = build_parser().parse_args(argv)
    _quiet()
    try:
        args.func(args)
    except Exception as e:
        if args.verbose or os.environ.get("SCMAMBA2_DEBUG", "") not in ("", "0"):
            raise
        print(f"scmamba2: error: {_one_line(e)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
