"""Tokenizer throughput (cells/s) on a 100k-cell CSR matrix tiled from pbmc3k.

Settings, one process, padded and masked batches (mask_ratio 0.15, bins):

* ``expressed``: non-zero genes, max_len 2048 (random subset above it), vocab order; batches of
  consecutive cells, and batches of similar-length cells (each window of 32 batches sorted by
  length; the time includes computing lengths and gathering rows);
* ``full``: every gene of a 20k-gene axis (pbmc3k's 13,714 genes padded with empty genes).

Usage: ``python benchmarks/tokenize_throughput.py [--n-cells 100000] [--batch-size 512]
[--threads N]``.
Writes ``benchmarks/results/tokenize_throughput_threads{N}.{json,md}`` (N = torch threads).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import time
from pathlib import Path

import anndata as ad
import numpy as np
import scipy.sparse as sp
import torch

from scmamba2_scvi.data import GeneVocab, Tokenizer

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
PBMC = DATA / "pbmc3k_10x_labeled.h5ad"
RESULTS = Path(__file__).resolve().parent / "results"


def tiled_matrix(n_cells: int, n_genes: int | None) -> tuple[sp.csr_matrix, list[str]]:
    """pbmc3k counts tiled to ``n_cells`` rows; gene axis padded with empty genes to n_genes."""
    adata = ad.read_h5ad(PBMC)
    X = sp.csr_matrix(adata.X, dtype=np.float32)
    reps = -(-n_cells // X.shape[0])
    X = sp.vstack([X] * reps, format="csr")[:n_cells]
    names = list(adata.var_names)
    if n_genes is not None and n_genes > X.shape[1]:
        extra = n_genes - X.shape[1]
        X = sp.hstack([X, sp.csr_matrix((n_cells, extra), dtype=np.float32)], format="csr")
        names += [f"EMPTY{i}" for i in range(extra)]
    X.sort_indices()
    return X, names


def run(tok: Tokenizer, X: sp.csr_matrix, batch_size: int, bucketed: bool = False) -> dict:
    """Tokenize all rows of X in batches; return cells/s and mean padded length.

    ``bucketed``: batches of similar-length cells: windows of 32 batches are gathered once in
    order of length (as a corpus loader would reorder each block it reads) and sliced into
    batches; the time includes computing the lengths and the gathers.
    """
    tok(X[:batch_size])  # warm-up
    lengths, tokens = [], 0
    start = time.perf_counter()
    if bucketed:  # gather each window of 32 batches once, sorted by length, then slice it
        span = 32 * batch_size
        lens = tok.lengths(X)
        batches = (
            xw[s : s + batch_size]
            for w in range(0, X.shape[0], span)
            for xw in [X[w + np.argsort(lens[w : w + span], kind="stable")]]
            for s in range(0, xw.shape[0], batch_size)
        )
    else:
        batches = (X[s : s + batch_size] for s in range(0, X.shape[0], batch_size))
    for xb in batches:
        batch = tok(xb)
        lengths.append(batch["genes"].shape[1])
        tokens += int((~batch["key_padding_mask"]).sum())
    seconds = time.perf_counter() - start
    return {
        "cells": X.shape[0],
        "batch_size": batch_size,
        "seconds": round(seconds, 3),
        "cells_per_s": round(X.shape[0] / seconds),
        "real_tokens_per_s": round(tokens / seconds),
        "mean_padded_length": round(float(np.mean(lengths)), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-cells", type=int, default=100_000)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--full-batch-size", type=int, default=256)
    parser.add_argument("--full-genes", type=int, default=20_000)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's)"
    )
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if not PBMC.is_file():
        sys.exit(f"{PBMC} not found: this benchmark needs the team's ../shared/data folder.")

    load_before = os.getloadavg()[0]  # the machine may be shared: record its load
    results = {}
    X, names = tiled_matrix(args.n_cells, None)
    vocab = GeneVocab.from_anndata(names)
    tok = Tokenizer(
        vocab.map(names), vocab, mode="expressed", max_len=2048, mask_ratio=0.15, seed=0
    )
    results["expressed_maxlen2048"] = run(tok, X, args.batch_size)
    print("expressed", results["expressed_maxlen2048"], flush=True)
    results["expressed_maxlen2048_length_buckets"] = run(tok, X, args.batch_size, bucketed=True)
    print("expressed, length buckets", results["expressed_maxlen2048_length_buckets"], flush=True)
    del X

    X, names = tiled_matrix(args.n_cells, args.full_genes)
    vocab = GeneVocab.from_anndata(names)
    tok = Tokenizer(vocab.map(names), vocab, mode="full", max_len=None, mask_ratio=0.15, seed=0)
    results[f"full_{args.full_genes // 1000}k_genes"] = run(tok, X, args.full_batch_size)
    print("full", results[f"full_{args.full_genes // 1000}k_genes"], flush=True)

    machine = {
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": dt.date.today().isoformat(),
        "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},
        "load_avg_1min_before": round(load_before, 2),
        "load_avg_1min_after": round(os.getloadavg()[0], 2),
    }
    report = {"machine": machine, "results": results}
    header = "| setting | cells | batch | cells/s | real tokens/s | mean padded L | seconds |"
    rows = [header, "|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        rows.append(
            f"| {name} | {r['cells']:,} | {r['batch_size']} | {r['cells_per_s']:,} | "
            f"{r['real_tokens_per_s']:,} | {r['mean_padded_length']} | {r['seconds']} |"
        )
    table = "\n".join(rows)
    print(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = f"tokenize_throughput_threads{machine['torch_threads']}"
    (RESULTS / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    md = [
        "# Tokenizer throughput",
        "",
        f"pbmc3k tiled to {args.n_cells:,} cells (CSR), padded + masked batches (mask 0.15, "
        "51 bins), one process.",
        "",
        table,
        "",
        f"Machine: {machine['cpu_cores']} cores, torch {machine['torch']} "
        f"({machine['torch_threads']} threads), Python {machine['python']}, "
        f"{machine['platform']}, {machine['date']}; "
        f"malloc env: {machine['malloc_env'] or 'default'}; 1-min load average before/after: "
        f"{machine['load_avg_1min_before']}/{machine['load_avg_1min_after']}.",
        "",
    ]
    (RESULTS / f"{stem}.md").write_text("\n".join(md))


if __name__ == "__main__":
    main()
