"""Peak memory of the README's quick start on pbmc3k with every default, as a user runs it.

``SCMamba2.setup_anndata(adata, labels_key="cell_type")``, ``SCMamba2(adata).train()``,
``get_latent_representation()`` on ``../shared/data/pbmc3k_10x_labeled.h5ad`` (2,638 cells, all
13,714 genes, the ``default`` preset, ``max_len`` 2048), in one process; the resident set is
sampled every second and its peak per phase written with the process's peak (``ru_maxrss``).
All defaults except the number of epochs (an argument: one epoch holds every kind of step,
training, validation, the kept epoch and calibration, at a fraction of the time).

Usage::

    python benchmarks/defaults_memory.py [EPOCHS [OUT.json]]   # default 1, results/

Writes ``OUT.json`` (with every sample) and ``OUT.md`` (the table).
"""

import json
import resource
import sys
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
PBMC3K = ROOT.parent / "shared" / "data" / "pbmc3k_10x_labeled.h5ad"


def main(epochs: int, out: Path) -> dict:
    samples, phase, proc, t0 = [], ["import"], psutil.Process(), time.perf_counter()
    done = threading.Event()

    def sample():
        while not done.is_set():
            rss = round(proc.memory_info().rss / 2**20)
            samples.append((round(time.perf_counter() - t0, 1), rss, phase[0]))
            time.sleep(1.0)

    threading.Thread(target=sample, daemon=True).start()
    import anndata as ad

    from scmamba2_scvi.model import SCMamba2

    phase[0] = "setup"
    adata = ad.read_h5ad(PBMC3K)
    SCMamba2.setup_anndata(adata, labels_key="cell_type")
    model = SCMamba2(adata)
    phase[0] = "train"
    t_train = time.perf_counter()
    model.train(max_epochs=epochs)
    train_s = time.perf_counter() - t_train
    phase[0] = "embed"
    z = model.get_latent_representation()
    done.set()
    by_phase = {}
    for _, rss, name in samples:
        by_phase[name] = max(by_phase.get(name, 0), rss)
    result = {
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "peak_by_phase_mb": by_phase,
        "train_s": round(train_s, 1),
        "n_cells": adata.n_obs,
        "n_genes": adata.n_vars,
        "epochs": model.trainer.max_epochs,
        "encoder_dtype": str(model.module.encoder.compute_dtype(model.device)),
        "latent_shape": list(z.shape),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "samples": samples,
    }
    out.write_text(json.dumps(result))
    out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return result


def markdown(result: dict) -> str:
    """The result as a table: peak resident set per phase and of the whole process."""
    rows = [f"| {name} | {mb} |" for name, mb in result["peak_by_phase_mb"].items()]
    return "\n".join(
        [
            f"# Quick start on pbmc3k with every default ({result['date']})",
            "",
            f"{result['n_cells']} cells x {result['n_genes']} genes, {result['epochs']} epoch(s), "
            f"encoder in {result['encoder_dtype']}, training {result['train_s']} s.",
            "",
            "| phase | peak RSS (MiB, sampled each second) |",
            "|---|---|",
            *rows,
            f"| process (ru_maxrss) | {result['peak_rss_mb']} |",
            "",
        ]
    )


if __name__ == "__main__":
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 1
    default = ROOT / "benchmarks" / "results" / "defaults_memory_pbmc3k.json"
    main(n, Path(sys.argv[2]) if len(sys.argv) > 2 else default)
