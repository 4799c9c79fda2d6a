"""bfloat16 on CPU: where ``precision="auto"`` chooses it, and whether it trains as float32 does.

Two parts, on 2 cores of a CPU with native bfloat16 (AVX512-BF16 or AMX):

- ``crossover``: training-step and embedding cells/s in float32 and under bfloat16 autocast by
  encoder width (the ``cpu-small`` sizes with ``d_model`` 128 to 384), where
  :data:`~scmamba2_scvi.nn.BF16_MIN_WIDTH`, the width from which ``precision="auto"`` uses
  bfloat16, should sit;
- ``train``: the ``default`` preset trained on the same pbmc3k cells (a stratified sample of
  1,000, 80/20 split, ``train()``'s defaults but 2 epochs) once in float32 and once in bfloat16,
  from the same seed: losses per epoch, held-out macro-F1 and accuracy, training seconds; and
  the float32 model's embeddings computed again under bfloat16 (relative difference, shared
  15-nearest neighbours, predictions that agree).

Usage::

    python benchmarks/bf16_cpu.py            # writes results/bf16_cpu.{json,md}
    python benchmarks/bf16_cpu.py --quick    # 300 cells of 256 tokens, 1 epoch, nothing written
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_efficiency import PBMC3K, RESULTS, machine_info


def crossover(quick: bool) -> dict:
    """Training-step and embedding speed-up of bfloat16 by encoder width (2 layers), in-process."""
    from train_efficiency import _embed, _train

    from scmamba2_scvi.nn import BF16_MIN_WIDTH
    from scmamba2_scvi.nn._precision import cpu_has_native_bf16

    out = {"native_bf16": cpu_has_native_bf16(), "min_width": BF16_MIN_WIDTH, "widths": {}}
    for width in (128, 256) if quick else (128, 192, 256, 384):
        row = {}
        for precision in ("fp32", "bf16"):
            common = {"preset": "cpu-small", "data": str(PBMC3K), "precision": precision}
            common["model"] = {"d_model": width}
            step = _train({**common, "batch_size": 16, "steps": 2 if quick else 6})
            emb = _embed({**common, "n_cells": 64 if quick else 256})
            row[precision] = {"train_cells_per_s": step["cells_per_s"]}
            row[precision]["embed_cells_per_s"] = emb["cells_per_s"]
        for what in ("train_cells_per_s", "embed_cells_per_s"):
            row[f"{what} bf16/fp32"] = round(row["bf16"][what] / row["fp32"][what], 3)
        out["widths"][width] = row
        print(width, row, flush=True)
    return out


def train(quick: bool) -> dict:
    import anndata as ad
    import scvi
    from sklearn.metrics import accuracy_score, f1_score
    from sklearn.model_selection import train_test_split

    from scmamba2_scvi import SCMamba2

    adata = ad.read_h5ad(PBMC3K)
    key, n = "cell_type", 300 if quick else 1000
    keep, _ = train_test_split(
        np.arange(adata.n_obs), train_size=n, stratify=adata.obs[key], random_state=0
    )
    adata = adata[np.sort(keep)].copy()
    fit, test = train_test_split(
        np.arange(adata.n_obs), test_size=0.2, stratify=adata.obs[key], random_state=0
    )
    fit, test = adata[np.sort(fit)].copy(), adata[np.sort(test)].copy()
    truth = test.obs[key].astype(str).to_numpy()
    runs, models = {}, {}
    size = {"max_len": 256} if quick else {}
    for precision in ("fp32", "bf16"):
        scvi.settings.seed = 0
        SCMamba2.setup_anndata(fit, labels_key=key)
        model = SCMamba2(fit, preset="default", precision=precision, **size)
        t0 = time.perf_counter()
        model.train(max_epochs=1 if quick else 2, enable_progress_bar=False)
        seconds = time.perf_counter() - t0
        pred = model.predict(test)
        hist = model.history
        runs[precision] = {
            "train_s": round(seconds, 1),
            "cells_per_s": round(len(hist["train_loss"]) * 0.9 * fit.n_obs / seconds, 2),
            "train_loss": [round(float(v), 4) for v in hist["train_loss"].iloc[:, 0]],
            "validation_loss": [round(float(v), 4) for v in hist["validation_loss"].iloc[:, 0]],
            "macro_f1": round(f1_score(truth, pred, average="macro"), 4),
            "accuracy": round(accuracy_score(truth, pred), 4),
        }
        models[precision] = model
        print(precision, runs[precision], flush=True)
    # the float32 model's weights, embedded again under bfloat16
    model = models["fp32"]
    z32 = model.get_latent_representation(test, progress_bar=False)
    p32 = model.predict(test)
    model.module.encoder.precision = "bf16"
    z16 = model.get_latent_representation(test, progress_bar=False)
    p16 = model.predict(test)
    runs["fp32 weights under bf16"] = {
        "embedding_relative_difference": round(
            float(np.linalg.norm(z16 - z32) / np.linalg.norm(z32)), 5
        ),
        "shared_15nn": round(_shared_neighbours(z32, z16, 15), 4),
        "predictions_agree": round(float((p32 == p16).mean()), 4),
    }
    print(runs["fp32 weights under bf16"], flush=True)
    return {"data": f"pbmc3k, {fit.n_obs} training / {test.n_obs} held-out cells", **runs}


def _shared_neighbours(a: np.ndarray, b: np.ndarray, k: int) -> float:
    """Mean share of each cell's ``k`` nearest neighbours (Euclidean) found in both embeddings."""
    from sklearn.neighbors import NearestNeighbors

    def knn(z):
        return (
            NearestNeighbors(n_neighbors=k + 1).fit(z).kneighbors(z, return_distance=False)[:, 1:]
        )

    na, nb = knn(a), knn(b)
    return float(np.mean([len(set(x) & set(y)) / k for x, y in zip(na, nb, strict=True)]))


def markdown(res: dict) -> str:
    lines = [
        f"# bfloat16 on CPU ({res['machine']['date']})",
        "",
        f"Machine: `{json.dumps(res['machine'])}`",
        "",
        "## Speed-up of bfloat16 by encoder width",
        "",
        "`cpu-small` sizes (2 layers) with `d_model` changed, pbmc3k; module training steps at "
        "`train()`'s minibatch of 16 and `get_latent_representation`, cells/s. "
        f'`precision="auto"` uses bfloat16 from width {res["crossover"]["min_width"]}.',
        "",
        "| d_model | train fp32 | train bf16 | train bf16/fp32 | embed fp32 | embed bf16 "
        "| embed bf16/fp32 |",
        "|---|---|---|---|---|---|---|",
    ]
    for width, r in res["crossover"]["widths"].items():
        lines.append(
            f"| {width} | {r['fp32']['train_cells_per_s']} | {r['bf16']['train_cells_per_s']} "
            f"| {r['train_cells_per_s bf16/fp32']} | {r['fp32']['embed_cells_per_s']} "
            f"| {r['bf16']['embed_cells_per_s']} | {r['embed_cells_per_s bf16/fp32']} |"
        )
    t = res["train"]
    lines += [
        "",
        f"## The `default` preset trained in float32 and in bfloat16 ({t['data']})",
        "",
        "| precision | train loss per epoch | validation loss per epoch | held-out macro-F1 "
        "| accuracy | train (s) | cells/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for precision in ("fp32", "bf16"):
        r = t[precision]
        lines.append(
            f"| {precision} | {r['train_loss']} | {r['validation_loss']} | {r['macro_f1']:.3f} "
            f"| {r['accuracy']:.3f} | {r['train_s']:.0f} | {r['cells_per_s']} |"
        )
    same = t["fp32 weights under bf16"]
    lines += [
        "",
        "The float32 model's weights embedded under bfloat16: relative difference "
        f"{same['embedding_relative_difference']}, shared 15 nearest neighbours "
        f"{same['shared_15nn']:.3f}, predictions agreeing {same['predictions_agree']:.3f}.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, nothing written")
    args = parser.parse_args(argv)
    res = {"machine": machine_info()}
    res["crossover"] = crossover(args.quick)
    res["train"] = train(args.quick)
    if not args.quick:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "bf16_cpu.json").write_text(json.dumps(res, indent=2))
        (RESULTS / "bf16_cpu.md").write_text(markdown(res))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
