"""The demo's recipe on a development split of its own training cells (never its held-out cells).

``python benchmarks/dev/demo_recipe.py NAME EPOCHS BATCH_SIZE LR TRAIN_SIZE [MODEL [PLAN]]``
(MODEL, PLAN: JSON keyword arguments of the model and of ``plan_kwargs``), with ``SEED`` in the
environment (the split of the training cells and the training seed). Appends one JSON line per
run to ``demo_recipe.jsonl`` in the working directory; tabulated in
``benchmarks/results/demo_dev_recipe.md``.
"""

import json
import logging
import os
import sys
import time

import numpy as np
import scvi
from sklearn.metrics import accuracy_score, f1_score
from sklearn.model_selection import train_test_split

from scmamba2_scvi import SCMamba2
from scmamba2_scvi.baselines import lr_pca_baseline
from scmamba2_scvi.datasets import pbmc68k_counts


def main(argv: list[str]) -> dict:
    """Train one recipe on the fitting cells; score it and LogReg on PCA on the others."""
    name, epochs, bs, lr, train_size = argv[0], int(argv[1]), int(argv[2]), *map(float, argv[3:5])
    model_kw = json.loads(argv[5]) if len(argv) > 5 else {}
    plan_kw = json.loads(argv[6]) if len(argv) > 6 else {}
    seed = int(os.environ.get("SEED", "0"))
    scvi.settings.verbosity = logging.ERROR
    adata, key = pbmc68k_counts(), "bulk_labels"
    cells = np.arange(adata.n_obs)
    train, _ = train_test_split(cells, test_size=0.2, stratify=adata.obs[key], random_state=0)
    train = np.sort(train)  # the demo's training cells
    fit, dev = train_test_split(
        train, test_size=0.2, stratify=adata.obs[key].iloc[train], random_state=100 + seed
    )
    fit, dev = adata[np.sort(fit)].copy(), adata[np.sort(dev)].copy()
    truth = dev.obs[key].astype(str).to_numpy()
    out = {"name": name, "epochs": epochs, "bs": bs, "lr": lr, "train_size": train_size}
    out.update(model=model_kw, plan=plan_kw, seed=seed)
    baseline = lr_pca_baseline(fit, dev, key, seed=0)
    out["lr_macro_f1"] = round(f1_score(truth, baseline, average="macro"), 4)
    scvi.settings.seed = seed
    SCMamba2.setup_anndata(fit, layer="counts", labels_key=key)
    model = SCMamba2(fit, preset="cpu-small", max_len=1024, **model_kw)
    t0 = time.perf_counter()
    model.train(
        max_epochs=epochs,
        batch_size=bs,
        plan_kwargs={"lr": lr, **plan_kw},
        train_size=train_size,
        enable_progress_bar=False,
    )
    out["train_s"] = round(time.perf_counter() - t0, 1)
    pred = model.predict(dev)
    out["dev_macro_f1"] = round(f1_score(truth, pred, average="macro"), 4)
    out["dev_accuracy"] = round(accuracy_score(truth, pred), 4)
    if "validation_macro_f1" in model.history:
        out["val_f1"] = [
            round(float(v), 3) for v in model.history["validation_macro_f1"].iloc[:, 0]
        ]
    with open("demo_recipe.jsonl", "a") as f:
        f.write(json.dumps(out) + "\n")
    return out


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:])))
