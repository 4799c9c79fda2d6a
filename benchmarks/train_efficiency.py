"""Training and inference efficiency of this checkout vs a base commit, side by side in one run.

Each measurement runs in a fresh subprocess with ``PYTHONPATH`` pointing at the sources of one
version (this checkout, or the base commit checked out with ``git worktree add``), so that peak
memory is its own and both versions see the same machine load. Measured on pbmc3k
(``../shared/data/pbmc3k_10x_labeled.h5ad``; scanpy's pbmc68k_reduced when absent):

- ``train``: peak resident memory of one training step (forward, backward, AdamW) above what the
  process held before it, per real (non-padding) token; training cells/s over a few steps; model
  FLOPs utilisation (three times the forward's FLOPs counted by ``torch.utils.flop_counter``, over
  the step time, over this machine's float32 and bfloat16 matmul rates measured in the same run);
- ``train ... b16``: the same at ``train()``'s batch size, with the training memory guard before
  each step as in training (it keeps the mixers' intermediates where a step is small), and
  without it (recomputed);
- ``embed``: ``get_latent_representation`` cells/s;
- each ``train``/``embed`` result names the ``dtype`` of the encoder's matrix products: each
  version runs at its defaults (this checkout: ``precision="auto"``, bfloat16 where it is faster);
- ``layer``: one bidirectional layer (d_model 256), forward + backward at 4,096 and 65,536 tokens;
- ``full_cell``: the ``default`` preset trained on one 60,000-token cell (``mode="full"``);
- ``demo``: ``scmamba2 demo`` with its defaults, from before the package is imported to its
  end: seconds, peak resident memory, and its held-out macro-F1 and accuracy (each version's
  own defaults: the base's demo trains with the base's epochs and batch size);
- ``fp32`` and ``bf16`` rows (and ``compile`` with ``--compile``): this checkout only, with the
  precision pinned, and ``torch.compile``.

Peak memory on CPU is the process's peak resident set (``VmHWM`` after a reset through
``/proc/self/clear_refs``): approximate, since the allocator keeps freed memory. Timings on a
shared machine are noisy; the ratios of the two versions, measured alternately, are what counts.

Usage::

    python benchmarks/train_efficiency.py              # full run, writes results/
    python benchmarks/train_efficiency.py --quick      # smoke run, small sizes, nothing written
    python benchmarks/train_efficiency.py --rounds 3 --only "embed cpu-small"  # medians of 3
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
BASE = "ac61a74"
PBMC3K = ROOT.parent / "shared" / "data" / "pbmc3k_10x_labeled.h5ad"


# ----------------------------------------------------------------------------- in the subprocess
def _status_mb(key: str) -> float:
    return int(re.search(rf"{key}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024


def _reset_peak() -> float:
    """Return freed memory to the OS, reset the peak resident set; returns the current one (MB)."""
    import ctypes
    import gc

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # else the next step reuses memory the RSS holds
    Path("/proc/self/clear_refs").write_text("5")
    return _status_mb("VmRSS")


def _load(data: str | None, n_genes_full: int | None = None):
    import anndata as ad
    import numpy as np
    import scanpy as sc
    from scipy import sparse

    if n_genes_full:  # one long cell: every gene expressed
        rng = np.random.default_rng(0)
        X = sparse.csr_matrix(rng.poisson(2.0, (2, n_genes_full)).astype(np.float32) + 1)
        adata = ad.AnnData(X)
        adata.var_names = [f"GENE{i}" for i in range(n_genes_full)]
        return adata, None
    if data and Path(data).exists():
        return ad.read_h5ad(data), "cell_type"
    adata = sc.datasets.pbmc68k_reduced()
    adata = ad.AnnData(
        sparse.csr_matrix(np.expm1(adata.raw.X.toarray()).round()), obs=adata.obs, var=adata.raw.var
    )
    return adata, "bulk_labels"


def _model(p: dict):
    import numpy as np
    import torch

    from scmamba2_scvi import SCMamba2

    adata, labels = _load(p.get("data"), p.get("full_genes"))
    SCMamba2.setup_anndata(adata, labels_key=labels)
    torch.manual_seed(0)
    kwargs = {"mode": "full", "max_len": None} if p.get("full_genes") else {}
    model = SCMamba2(adata, preset=p["preset"], **kwargs, **p.get("model", {}))
    rng = np.random.default_rng(0)
    return model, adata, rng.permutation(adata.n_obs)


def _matmul(p: dict) -> dict:
    import torch

    out = {}
    n = p.get("n", 2048)
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        a @ b
        best = float("inf")
        for _ in range(p.get("repeats", 5)):
            t0 = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t0)
        out[f"{name}_gflops"] = round(2 * n**3 / best / 1e9, 1)
    return out


def _forward_flops(module, batch) -> float:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(batch)
    return float(counter.get_total_flops())


def _train_batches(model, adata, indices, batch_size: int) -> list:
    """Training minibatches as each version's ``train()`` makes them.

    The base commit tokenizes in the module (batches hold counts); this one in the loader
    (token dicts, packed when the model has no DSBN, cells of similar length together).
    """
    if not hasattr(model, "_collate"):
        return list(model._make_data_loader(adata, indices=indices, batch_size=batch_size))
    from scmamba2_scvi.data import TokenDataLoader

    collate = model._collate(adata, training=True)
    loader = TokenDataLoader(
        model.adata_manager, collate, indices=indices, batch_size=batch_size, shuffle=True, seed=0
    )
    return [{k: v for k, v in b.items() if k != "obs_index"} for b in loader]


def _lengths(module, batch):
    """Real tokens of each cell of a training batch, and the token slots computed."""
    import numpy as np

    if "X" in batch:  # base: padded to the longest cell
        lengths = module.tokenizer.lengths(batch["X"])
        return lengths, int(len(lengths) * lengths.max())
    if batch.get("cu_seqlens") is not None:  # packed: no padding computed
        lengths = np.diff(batch["cu_seqlens"].numpy())
        return lengths, int(lengths.sum())
    lengths = (~batch["key_padding_mask"]).sum(1).numpy()
    return lengths, int(batch["key_padding_mask"].numel())


def _train(p: dict) -> dict:
    import torch

    model, adata, order = _model(p)
    module = model.module
    if p.get("precision"):
        module.encoder.precision = p["precision"]
    bs, steps = p["batch_size"], p["steps"]
    batches = _train_batches(model, adata, order[: bs * (steps + 1)], bs)
    opt = torch.optim.AdamW(module.parameters(), lr=1e-4)
    module.train()
    guard = _guard() if p.get("guard") else None

    def step(batch):
        if guard is not None:  # as the training plan does before each step
            guard(module, batch)
        opt.zero_grad(set_to_none=True)
        loss = module(batch)[2].loss
        loss.backward()
        opt.step()
        return float(loss)

    torch.manual_seed(1)
    first_loss = step(batches[0])  # warm-up: allocates gradients and optimizer state
    base = _reset_peak()
    t0 = time.perf_counter()
    step(batches[1])
    times = [time.perf_counter() - t0]
    peak = _status_mb("VmHWM") - base
    for batch in batches[2:]:
        t0 = time.perf_counter()
        step(batch)
        times.append(time.perf_counter() - t0)
    lengths, slots = _lengths(module, batches[1])
    flops = _forward_flops(module, batches[1]) * 3  # forward + backward (2x), no recompute
    step_s = sum(times) / len(times)
    return {
        "first_loss": first_loss,
        "peak_mb": round(peak, 1),
        "real_tokens": int(lengths.sum()),
        "token_slots": slots,
        "kb_per_real_token": round(peak * 1024 / lengths.sum(), 2),
        "step_s": round(step_s, 3),
        "cells_per_s": round(bs / step_s, 2),
        "model_gflop_per_step": round(flops / 1e9, 2),
        "achieved_gflops": round(flops / step_s / 1e9, 2),
        "dtype": _dtype(module),
    }


def _guard():
    """The training memory guard of this checkout (``None`` in one that has none)."""
    try:
        from scmamba2_scvi.module._memory import guard_step
    except ImportError:
        return None
    return guard_step


def _embed(p: dict) -> dict:
    model, adata, order = _model(p)
    if p.get("precision"):
        model.module.encoder.precision = p["precision"]
    n = p["n_cells"]
    model.get_latent_representation(adata[order[:32]])  # warm-up
    t0 = time.perf_counter()
    model.get_latent_representation(adata[order[32 : 32 + n]])
    return {"cells_per_s": round(n / (time.perf_counter() - t0), 2), "dtype": _dtype(model.module)}


def _dtype(module) -> str:
    """The dtype of the encoder's matrix products on CPU (float32 in a base without precision)."""
    import torch

    encoder = module.encoder
    if hasattr(encoder, "compute_dtype"):
        return str(encoder.compute_dtype(torch.device("cpu"))).removeprefix("torch.")
    precision = getattr(encoder, "precision", "fp32")
    return {"bf16": "bfloat16", "fp32": "float32"}.get(precision, precision)


def _layer(p: dict) -> dict:
    import torch

    from scmamba2_scvi.nn import BiMamba2Encoder

    torch.manual_seed(0)
    layer = BiMamba2Encoder(256, 1)
    x = torch.randn(1, p["length"], 256, requires_grad=True)
    out = {}
    if p.get("compile"):
        t0 = time.perf_counter()
        layer = torch.compile(layer)
        layer(x).pow(2).mean().backward()
        out["compile_s"] = round(time.perf_counter() - t0, 1)

    def step():
        layer.zero_grad(set_to_none=True)
        x.grad = None
        layer(x).pow(2).mean().backward()

    base = _reset_peak()
    step()
    out["peak_mb"] = round(_status_mb("VmHWM") - base, 1)
    times = []
    for _ in range(p.get("repeats", 2)):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    out["time_s"] = round(min(times), 3)
    return out


def _full_cell(p: dict) -> dict:
    import torch

    model, adata, _ = _model(p)
    module = model.module
    batch = _train_batches(model, adata, [0], 1)[0]
    opt = torch.optim.AdamW(module.parameters(), lr=1e-4)
    module.train()
    base = _reset_peak()
    t0 = time.perf_counter()
    loss = module(batch)[2].loss
    loss.backward()
    opt.step()
    tokens = int(_lengths(module, batch)[0].max())
    return {
        "tokens": tokens,
        "step_s": round(time.perf_counter() - t0, 1),
        "peak_mb": round(_status_mb("VmHWM") - base, 1),
        "rss_peak_mb": round(_status_mb("VmHWM"), 1),
    }


def _demo(p: dict) -> dict:
    """``scmamba2 demo`` with its defaults, timed from before the package is imported."""
    import tempfile

    t0 = time.perf_counter()
    from scmamba2_scvi import cli

    with tempfile.TemporaryDirectory() as out:
        cli.main(["demo", "--out", out])
        metrics = json.loads((Path(out) / "metrics.json").read_text())
    return {
        "wall_s": round(time.perf_counter() - t0, 1),
        "train_s": metrics["train_seconds"],
        "peak_mb": round(_status_mb("VmHWM")),
        "macro_f1": round(metrics["metrics"]["SCMamba2"]["macro_f1"], 3),
        "accuracy": round(metrics["metrics"]["SCMamba2"]["accuracy"], 3),
        "logreg_macro_f1": round(metrics["metrics"]["LogReg on PCA"]["macro_f1"], 3),
    }


#: rows measured once whatever ``--rounds`` (minutes per run)
ONCE = {"demo"}

WORKERS = {
    "demo": _demo,
    "matmul": _matmul,
    "train": _train,
    "embed": _embed,
    "layer": _layer,
    "full_cell": _full_cell,
}


# ----------------------------------------------------------------------------- the driver
def base_checkout(commit: str) -> Path:
    """The base commit's sources, checked out once as a detached git worktree under /tmp."""
    path = Path(f"/tmp/scmamba2_base_{commit}")
    if not (path / "src").is_dir():
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(path), commit],
            check=True,
            capture_output=True,
        )
    return path / "src"


def measure(src: Path, kind: str, params: dict, timeout: float) -> dict:
    env = {**os.environ, "PYTHONPATH": str(src)}
    cmd = [sys.executable, __file__, "--worker", kind, json.dumps(params)]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode or not lines:
        return {"error": (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]}
    return json.loads(lines[-1])


def machine_info() -> dict:
    import torch

    cpu = re.search(r"model name\s*:\s*(.*)", Path("/proc/cpuinfo").read_text())
    load = os.getloadavg()
    return {
        "cpu": cpu.group(1) if cpu else platform.processor(),
        "cpu_cores": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "load_average_at_start": [round(x, 1) for x in load],
    }


def plan(quick: bool, data: str, compile_: bool) -> list[tuple[str, str, dict, bool]]:
    """``(row name, worker, params, also on base)`` per measurement."""
    long = 8192 if quick else 65536
    rows = [
        ("matmul rate", "matmul", {"n": 512 if quick else 2048}, False),
        ("train default", "train", {"preset": "default", "batch_size": 16, "steps": 3}, True),
        ("train cpu-small", "train", {"preset": "cpu-small", "batch_size": 64, "steps": 3}, True),
        ("embed cpu-small", "embed", {"preset": "cpu-small", "n_cells": 256}, True),
        # train()'s batch size, with the memory guard as in training (it may keep activations)
        (
            "train cpu-small b16",
            "train",
            {"preset": "cpu-small", "batch_size": 16, "steps": 6, "guard": True},
            True,
        ),
        (
            "train cpu-small b16 recompute",
            "train",
            {"preset": "cpu-small", "batch_size": 16, "steps": 6},
            False,
        ),
        ("layer 4096", "layer", {"length": 4096, "repeats": 2}, True),
        # the base needs ~10 GB here (encoder_scaling_cpu.md): this checkout only
        (f"layer {long}", "layer", {"length": long, "repeats": 1}, False),
        # the rows above run each version at its defaults (here precision="auto"); these pin it
        (
            "train default fp32",
            "train",
            {"preset": "default", "batch_size": 16, "steps": 3, "precision": "fp32"},
            False,
        ),
        ("embed default", "embed", {"preset": "default", "n_cells": 128}, True),
        (
            "embed default fp32",
            "embed",
            {"preset": "default", "n_cells": 128, "precision": "fp32"},
            False,
        ),
        (
            "train cpu-small bf16",
            "train",
            {"preset": "cpu-small", "batch_size": 64, "steps": 3, "precision": "bf16"},
            False,
        ),
        (
            "embed cpu-small bf16",
            "embed",
            {"preset": "cpu-small", "n_cells": 256, "precision": "bf16"},
            False,
        ),
        (
            "full cell default",
            "full_cell",
            {"preset": "default", "full_genes": 5999 if quick else 59999},
            False,
        ),
    ]
    # the whole main job, as a user runs it (imports included), on pbmc68k_reduced
    if not quick:
        rows.append(("demo", "demo", {}, True))
    if compile_:
        rows.append(("layer 4096 compile", "layer", {"length": 4096, "compile": True}, False))
    for _, _, params, _ in rows:
        params.setdefault("data", data)
    return rows


def summarize(rows: dict) -> dict:
    def get(name, version, key):
        return rows.get(name, {}).get(version, {}).get(key)

    out = {}
    for name, key in (
        ("train default", "kb_per_real_token"),
        ("train cpu-small", "cells_per_s"),
        ("train default", "cells_per_s"),
        ("embed cpu-small", "cells_per_s"),
        ("embed default", "cells_per_s"),
        ("train cpu-small b16", "cells_per_s"),
        ("demo", "wall_s"),
    ):
        before, after = get(name, "base", key), get(name, "current", key)
        if before and after:
            out[f"{name}: {key} after/before"] = round(after / before, 3)
        pairs = zip(*(rows.get(name, {}).get(f"{v} rounds", []) for v in ("base", "current")))
        per_round = [round(a[key] / b[key], 2) for b, a in pairs if key in a and key in b]
        if len(per_round) > 1:
            out[f"{name}: {key} after/before, each round"] = per_round
    longest = max((n for n in rows if n.startswith("layer ") and "compile" not in n), default=None)
    for version in ("base", "current"):
        short, long_ = get("layer 4096", version, "time_s"), get(longest, version, "time_s")
        if short and long_ and longest != "layer 4096":
            out[f"{version}: {longest} / layer 4096 time"] = round(long_ / short, 2)
    rate = rows.get("matmul rate", {}).get("current", {})
    for version in ("base", "current"):
        for name in ("train cpu-small", "train default"):
            achieved = get(name, version, "achieved_gflops")
            if achieved and rate:
                out[f"{version}: {name} MFU fp32"] = round(achieved / rate["fp32_gflops"], 4)
                out[f"{version}: {name} MFU bf16"] = round(achieved / rate["bf16_gflops"], 4)
    key = "cells_per_s"
    for name in ("train default", "embed default", "train cpu-small", "embed cpu-small"):
        auto, dtype = get(name, "current", key), get(name, "current", "dtype")
        for variant in ("fp32", "bf16"):
            other = get(f"{name} {variant}", "current", key)
            if auto and other:
                out[f"current: {name} ({dtype}) / {variant} {key}"] = round(auto / other, 3)
            loss, loss_v = (
                get(name, "current", "first_loss"),
                get(f"{name} {variant}", "current", "first_loss"),
            )
            if loss and loss_v and loss != loss_v:
                out[f"current: {name} ({dtype}) vs {variant} first loss, relative"] = round(
                    abs(loss - loss_v) / abs(loss_v), 5
                )
        before, fp32 = get(name, "base", key), get(f"{name} fp32", "current", key)
        if before and fp32:
            out[f"{name} fp32 (current) / base {key}"] = round(fp32 / before, 3)
    for key in ("cells_per_s", "peak_mb"):
        guarded = get("train cpu-small b16", "current", key)
        recomputed = get("train cpu-small b16 recompute", "current", key)
        if guarded and recomputed:
            out[f"current: train cpu-small b16 guarded/recomputed {key}"] = round(
                guarded / recomputed, 3
            )
    eager, comp = (
        get("layer 4096", "current", "time_s"),
        get("layer 4096 compile", "current", "time_s"),
    )
    if eager and comp:
        out["current: layer 4096 compile speed-up"] = round(eager / comp, 3)
    return out


def _median(results: list[dict]) -> dict:
    """Each numeric field's median over rounds (the first error, if a round failed)."""
    errors = [r for r in results if "error" in r]
    if errors:
        return errors[0]
    return {
        k: round(statistics.median(r[k] for r in results), 4)
        if all(isinstance(r.get(k), int | float) for r in results)
        else v
        for k, v in results[0].items()
    }


def _fmt(result: dict | None) -> str:
    if not result:
        return "-"
    if "error" in result:
        return f"error: {result['error'][:80]}"
    return ", ".join(f"{k} {v}" for k, v in result.items())


def markdown(results: dict) -> str:
    lines = [
        f"# Training efficiency (cpu, {results['machine']['date']})"
        + (" (partial: the run was stopped)" if results.get("partial") else ""),
        "",
        f"Machine: `{json.dumps(results['machine'])}`",
        "",
        f"Data: {results['data']}. Base: {results['base']} (before the efficiency work); current: "
        f"{results['current']}. Each cell is one fresh subprocess"
        + (
            f"; rows of both versions: medians of {results['rounds']} alternating rounds "
            "(each round in the JSON), the demo once."
            if results.get("rounds", 1) > 1
            else "."
        ),
        "",
        "| measurement | base | current |",
        "|---|---|---|",
    ]
    for name, by_version in results["rows"].items():
        lines.append(
            f"| {name} | {_fmt(by_version.get('base'))} | {_fmt(by_version.get('current'))} |"
        )
    lines += ["", "| summary | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in results["summary"].items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", nargs=2, metavar=("KIND", "PARAMS"), help=argparse.SUPPRESS)
    parser.add_argument("--base", default=BASE, help="commit to compare with")
    parser.add_argument("--data", default=str(PBMC3K))
    parser.add_argument("--quick", action="store_true", help="small sizes, nothing written")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per measurement")
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="measure each row of both versions this many times, alternating base and current, "
        "and report the medians (the demo runs once)",
    )
    parser.add_argument(
        "--only",
        help="comma-separated measurement names to run (a reduced run); results are then written "
        "to train_efficiency_cpu_reduced.{json,md}",
    )
    args = parser.parse_args(argv)
    if args.worker:
        kind, params = args.worker
        print(json.dumps(WORKERS[kind](json.loads(params))), flush=True)
        return 0
    versions = {"base": base_checkout(args.base), "current": ROOT / "src"}
    head = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    results = {
        "benchmark": "train_efficiency",
        "machine": machine_info(),
        "data": Path(args.data).name if Path(args.data).exists() else "pbmc68k_reduced",
        "base": args.base,
        "current": head + (" + uncommitted changes" if _dirty() else ""),
        "rows": {},
    }
    t_start = time.perf_counter()
    rows = plan(args.quick, args.data, args.compile)
    if args.only:
        wanted = {n.strip() for n in args.only.split(",")}
        unknown = wanted - {name for name, *_ in rows}
        if unknown:
            parser.error(f"unknown measurement(s) {sorted(unknown)}; known: {[r[0] for r in rows]}")
        rows = [r for r in rows if r[0] in wanted]
    stem = "train_efficiency_cpu_reduced" if args.only else "train_efficiency_cpu"
    results["rounds"] = args.rounds
    for name, kind, params, on_base in rows:
        row = results["rows"].setdefault(name, {})
        both = ("base", "current") if on_base else ("current",)
        rounds = args.rounds if on_base and name not in ONCE else 1
        per_round = {version: [] for version in both}
        for _ in range(rounds):
            for version in both:
                per_round[version].append(measure(versions[version], kind, params, args.timeout))
                print(f"{name:22s} {version:8s} {_fmt(per_round[version][-1])}", flush=True)
        for version, got in per_round.items():
            row[version] = _median(got)
            if rounds > 1:
                row[f"{version} rounds"] = got
        if not args.quick:  # keep what is measured so far
            _write({**results, "summary": summarize(results["rows"]), "partial": True}, stem)
    results["wall_s"] = round(time.perf_counter() - t_start, 1)
    results["machine"]["load_average_at_end"] = [round(x, 1) for x in os.getloadavg()]
    results["summary"] = summarize(results["rows"])
    print(markdown(results))
    if not args.quick:
        _write(results, stem)
        print(f"wrote {RESULTS / stem}.json and .md")
    return 0


def _write(results: dict, stem: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps(results, indent=2))
    (RESULTS / f"{stem}.md").write_text(markdown(results))


def _dirty() -> bool:
    out = subprocess.run(
        ["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
    ).stdout
    return bool(out.strip())


if __name__ == "__main__":
    sys.exit(main())
