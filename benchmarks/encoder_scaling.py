"""Time and memory of one bidirectional Mamba2 layer vs one transformer layer, as length grows.

Forward + backward of one layer at batch 1, d_model 256 by default:
- ``mamba``: one :class:`~scmamba2_scvi.nn.BiMamba2Encoder` layer ("shared_flip"), eager;
- ``mamba+compile``: the same under ``torch.compile`` (steady state; compile time reported);
- ``attention``: one pre-norm transformer encoder layer (4x feed-forward) whose attention is
  ``torch.nn.functional.scaled_dot_product_attention``;
- on CUDA, also the SSD backends ``torch`` vs ``mamba_ssm``.

Each measurement runs in a fresh subprocess so that peak memory is its own: the peak during the
first forward+backward above what the model and input hold (CPU: peak resident set read from
/proc, approximate since the allocator may reuse memory; CUDA: ``max_memory_allocated``). Times
are the median of the following steps. Attention stops when
its projected time or memory (quadratic in length) exceeds the budget; the table says where.

Usage::

    python benchmarks/encoder_scaling.py                 # full run, CPU (+ CUDA when present)
    python benchmarks/encoder_scaling.py --quick         # seconds: small sizes, no JSON
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import multiprocessing as mp
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def _peak_rss_mb() -> float:
    return int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024


def _rss_mb() -> float:
    return int(re.search(r"VmRSS:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _build(kind: str, d_model: int, backend: str):
    import torch
    from torch import nn
    from torch.nn import functional as F

    from scmamba2_scvi.nn import BiMamba2Encoder

    if kind.startswith("mamba"):
        return BiMamba2Encoder(d_model, 1, backend=backend)

    class AttentionLayer(nn.Module):
        def __init__(self, d: int, n_heads: int):
            super().__init__()
            self.n_heads = n_heads
            self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
            self.qkv, self.out = nn.Linear(d, 3 * d), nn.Linear(d, d)
            self.ff = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b, length, d = x.shape
            q, k, v = self.qkv(self.norm1(x)).view(b, length, 3, self.n_heads, -1).unbind(2)
            a = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            )
            x = x + self.out(a.transpose(1, 2).reshape(b, length, d))
            return x + self.ff(self.norm2(x))

    return AttentionLayer(d_model, max(1, d_model // 32))


def _measure(
    kind: str, length: int, d_model: int, device: str, backend: str, repeats: int, queue
) -> None:
    """Run in a subprocess: build, warm up, time forward+backward, report peak memory."""
    try:
        import torch

        torch.manual_seed(0)
        model = _build(kind, d_model, backend).to(device)
        x = torch.randn(1, length, d_model, device=device, requires_grad=True)
        compile_s = None
        if kind == "mamba+compile":
            t0 = time.perf_counter()
            model = torch.compile(model)
            (model(x).float().pow(2).mean()).backward()
            compile_s = time.perf_counter() - t0

        def step():
            model.zero_grad(set_to_none=True)
            x.grad = None
            model(x).float().pow(2).mean().backward()
            if device == "cuda":
                torch.cuda.synchronize()

        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else None
        if autocast is not None:
            autocast.__enter__()
        # peak memory over the first step, above what the model and input hold
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated() / 2**20
        else:
            base = _rss_mb()
            _reset_peak_rss()
        step()
        peak = (
            torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else _peak_rss_mb()
        ) - base
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
        queue.put(
            {
                "time_s": statistics.median(times),
                "peak_mem_mb": round(peak, 1),
                "compile_s": compile_s,
            }
        )
    except Exception as e:
        queue.put({"error": f"{type(e).__name__}: {e}"[:300]})


def measure(kind, length, d_model, device, backend="torch", repeats=2, timeout=1800):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(
        target=_measure, args=(kind, length, d_model, device, backend, repeats, queue)
    )
    proc.start()
    proc.join(timeout)
    if proc.is_alive():
        proc.kill()
        return {"error": f"timed out after {timeout} s"}
    return queue.get() if not queue.empty() else {"error": f"exit code {proc.exitcode}"}


def machine_info(device: str) -> dict:
    import torch

    info = {
        "device": device,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "date": dt.date.today().isoformat(),
    }
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def run(
    device: str,
    lengths: list[int],
    d_model: int,
    budget_s: float,
    budget_mb: float,
    compile_: bool,
    repeats: int,
) -> list[dict]:
    from scmamba2_scvi.ops import mamba_ssm_available

    kinds = [("mamba", "torch")]
    if compile_:
        kinds.append(("mamba+compile", "torch"))
    if device == "cuda" and mamba_ssm_available():
        kinds.append(("mamba", "mamba_ssm"))
    kinds.append(("attention", "-"))
    rows, last_attn = [], None
    for length in lengths:
        for kind, backend in kinds:
            row = {"impl": kind, "backend": backend, "length": length}
            if kind == "attention" and last_attn is not None:
                scale = (length / last_attn["length"]) ** 2
                proj_t = last_attn["time_s"] * scale
                proj_m = max(last_attn["peak_mem_mb"], 1.0) * scale
                if proj_t > budget_s or proj_m > budget_mb:
                    row["skipped"] = (
                        f"projected {proj_t:.0f} s / {proj_m:.0f} MB exceeds the "
                        f"budget ({budget_s:.0f} s / {budget_mb:.0f} MB)"
                    )
            if "skipped" not in row:
                row.update(measure(kind, length, d_model, device, backend, repeats))
                if kind == "attention" and "time_s" in row:
                    last_attn = row
            rows.append(row)
            shown = row.get("time_s")
            print(
                f"  {device} {kind:14s} {backend:9s} L={length:6d}  "
                + (
                    f"{shown:8.3f} s  {row['peak_mem_mb']:9.1f} MB"
                    if shown is not None
                    else row.get("skipped") or row.get("error")
                ),
                flush=True,
            )
    return rows


def summarize(rows: list[dict]) -> dict:
    def t(kind, length, backend="torch"):
        for r in rows:
            if (r["impl"], r["length"]) == (kind, length) and r["backend"] in (backend, "-"):
                return r.get("time_s")
        return None

    lengths = sorted({r["length"] for r in rows})
    out = {}
    lo, hi = (4096, 65536) if {4096, 65536} <= set(lengths) else (lengths[0], lengths[-1])
    for kind in ("mamba", "mamba+compile"):
        if t(kind, lo) and t(kind, hi):
            out[f"{kind}_time_ratio_{hi}_over_{lo}"] = round(t(kind, hi) / t(kind, lo), 2)
        for length in lengths:
            if t(kind, length) and t("attention", length):
                out[f"attention_over_{kind}_at_{length}"] = round(
                    t("attention", length) / t(kind, length), 2
                )
    return out


def markdown(results: dict) -> str:
    lines = [
        f"# Encoder scaling ({results['machine']['device']}, {results['machine']['date']})",
        "",
        f"Machine: `{json.dumps(results['machine'])}`",
        "",
        f"One layer, d_model {results['d_model']}, batch 1, forward + backward.",
        "",
        "| impl | SSD backend | length | time (s) | peak memory (MB) | note |",
        "|---|---|---|---|---|---|",
    ]
    for r in results["rows"]:
        note = (
            r.get("skipped")
            or r.get("error")
            or (f"compile {r['compile_s']:.0f} s" if r.get("compile_s") else "")
        )
        time_s = f"{r['time_s']:.3f}" if "time_s" in r else "-"
        mem = f"{r['peak_mem_mb']:.0f}" if "peak_mem_mb" in r else "-"
        lines.append(
            f"| {r['impl']} | {r['backend']} | {r['length']} | {time_s} | {mem} | {note} |"
        )
    lines += ["", "Summary: " + ", ".join(f"{k} = {v}" for k, v in results["summary"].items()), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384, 65536])
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument(
        "--budget-s",
        type=float,
        default=120.0,
        help="stop attention when its projected time exceeds this",
    )
    parser.add_argument(
        "--budget-mb",
        type=float,
        default=16000.0,
        help="stop attention when its projected peak memory exceeds this",
    )
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--quick", action="store_true", help="small sizes for a smoke run (no results written)"
    )
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default: results/)")
    args = parser.parse_args(argv)
    import torch

    if args.quick:
        args.lengths, args.d_model, args.no_compile, args.repeats = [512, 2048], 64, True, 1
    devices = (
        ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
        if args.device == "auto"
        else [args.device]
    )
    for device in devices:
        print(f"encoder scaling on {device}: d_model={args.d_model}, lengths={args.lengths}")
        rows = run(
            device,
            args.lengths,
            args.d_model,
            args.budget_s,
            args.budget_mb,
            not args.no_compile,
            args.repeats,
        )
        results = {
            "benchmark": "encoder_scaling",
            "machine": machine_info(device),
            "d_model": args.d_model,
            "rows": rows,
            "summary": summarize(rows),
        }
        print(markdown(results))
        if not args.quick:
            name = "encoder_scaling_" + (
                "cpu" if device == "cpu" else torch.cuda.get_device_name().split()[-1].lower()
            )
            out = args.out or RESULTS / f"{name}.json"
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(results, indent=2))
            out.with_suffix(".md").write_text(markdown(results))
            print(f"wrote {out} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
