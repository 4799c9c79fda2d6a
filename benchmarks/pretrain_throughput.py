"""Pretraining throughput: SC-MAMBA2 (torch SSD, mamba-ssm, own Triton) vs a same-size transformer.

One optimizer step (forward, backward, AdamW) of the whole pretraining network on packed cells
(no padding) of a given length, bf16 autocast on GPU. Per configuration: tokens/s, cells/s, peak
memory, and model FLOPs utilisation (MFU: FLOPs of the step, counted by
``torch.utils.flop_counter`` on the torch SSD path, over the device's dense bf16 peak).

- ``mamba/torch``: :class:`~scmamba2_scvi.module.SCMamba2Module`, pure-PyTorch chunked SSD;
- ``mamba/mamba_ssm``: the same weights with mamba-ssm's Triton SSD kernel (GPU, when installed;
  a mamba-ssm installed without its CUDA extensions is used through its Triton modules alone);
- ``mamba/triton``: the same weights with the package's own Triton SSD kernel (GPU, with triton);
- ``transformer``: same ``d_model`` and depth, pre-norm encoder layers with 4x feed-forward and
  ``scaled_dot_product_attention`` (flash attention on GPU), the same embedding and heads.

The paper-medium preset (768 x 24) at 2,048, 20,000 and 60,000 tokens per cell is the default on
GPU; ``--smoke`` runs tiny sizes in seconds (CPU) to check the script. Results are written to
``benchmarks/results/pretrain_throughput_<device>.{json,md}`` with the device name and date,
rewritten after every row (a run stopped by a time limit keeps what it measured).
``benchmarks/gpu_check.sh`` runs it on a GPU machine.

Usage::

    python benchmarks/pretrain_throughput.py            # GPU: the full table
    python benchmarks/pretrain_throughput.py --smoke    # anywhere: a quick check, no files
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import importlib.util
import json
import platform
import re
import statistics
import sys
import time
import types
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from scmamba2_scvi.model import build_module
from scmamba2_scvi.ops import _ssd, mamba_ssm_available, triton_available

RESULTS = Path(__file__).resolve().parent / "results"

#: Dense bf16 tensor-core peaks (FLOP/s) of common devices, for MFU.
PEAK_BF16 = {
    "H100 SXM": 989e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,
    "H200": 989e12,
    "A100": 312e12,
}


def device_peak(name: str) -> float | None:
    """Dense bf16 peak of a CUDA device from its name, or ``None`` when unknown."""
    for key in sorted(PEAK_BF16, key=len, reverse=True):
        if all(part in name for part in key.split()):
            return PEAK_BF16[key]
    return None


class TransformerEncoder(nn.Module):
    """Pre-norm transformer layers (SDPA attention, 4x GELU feed-forward), packed input."""

    def __init__(self, d_model: int, n_layers: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.layers = nn.ModuleList(
            nn.ModuleDict(
                {
                    "norm1": nn.LayerNorm(d_model),
                    "qkv": nn.Linear(d_model, 3 * d_model),
                    "out": nn.Linear(d_model, d_model),
                    "norm2": nn.LayerNorm(d_model),
                    "ff": nn.Sequential(
                        nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model)
                    ),
                }
            )
            for _ in range(n_layers)
        )
        self.norm = nn.LayerNorm(d_model)

    def forward(self, x, key_padding_mask=None, seq_idx=None):
        """``x`` ``(1, total, d)`` packed cells of equal length (``seq_idx`` gives them)."""
        n_cells = int(seq_idx.max()) + 1
        b, total, d = x.shape
        length = total // n_cells
        for layer in self.layers:
            h = layer["norm1"](x).view(n_cells, length, d)
            q, k, v = layer["qkv"](h).view(n_cells, length, 3, self.n_heads, -1).unbind(2)
            a = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            )
            x = x + layer["out"](a.transpose(1, 2).reshape(b, total, d))
            x = x + layer["ff"](layer["norm2"](x))
        return self.norm(x)


def build(kind: str, preset: str, sizes: dict, n_vocab: int, device: str) -> nn.Module:
    """The pretraining network; the transformer swaps the encoder, keeps embeddings and heads."""
    backend = {"mamba/mamba_ssm": "mamba_ssm", "mamba/triton": "triton"}.get(kind, "torch")
    module, resolved = build_module(
        n_vocab, 0, 0, {"preset": preset, "backend": backend, "dropout": 0.0, **sizes}
    )
    if kind == "transformer":
        module.encoder = TransformerEncoder(
            resolved["d_model"], resolved["n_layers"], max(1, resolved["d_model"] // 64)
        )
    return module.to(device)


def packed_batch(n_cells: int, length: int, n_vocab: int, device: str) -> dict:
    """``n_cells`` random cells of ``length`` tokens each, packed, 15% of values masked."""
    total = n_cells * length
    g = torch.Generator(device="cpu").manual_seed(0)
    genes = torch.randint(4, n_vocab, (1, total), generator=g)
    values = torch.randint(0, 51, (1, total), generator=g).float()
    mask = torch.rand(1, total, generator=g) < 0.15
    starts = torch.arange(0, total, length)
    genes[0, starts], values[0, starts], mask[0, starts] = 1, 0.0, False
    seq_idx = torch.arange(n_cells, dtype=torch.int32).repeat_interleave(length)[None]
    cu = torch.arange(0, total + 1, length, dtype=torch.int32)
    batch = {
        "genes": genes,
        "values": values,
        "input_values": torch.where(mask, torch.full_like(values, -1.0), values),
        "mask": mask,
        "key_padding_mask": torch.zeros(1, total, dtype=torch.bool),
        "seq_idx": seq_idx,
        "cu_seqlens": cu,
    }
    return {k: v.to(device) for k, v in batch.items()}


def step_flops(module: nn.Module, batch: dict, device: str) -> float:
    """FLOPs of one forward + backward (matmuls and attention): three times the forward's.

    The forward is counted by torch; the backward is not run under the counter, whose module
    tracker refuses the ``autograd.grad`` call of the recomputing mixer's backward.
    """
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
        module.token_loss(batch)
    return 3.0 * float(counter.get_total_flops())


def measure(kind, preset, sizes, length, tokens_per_step, n_vocab, device, steps) -> dict:
    """Throughput and peak memory of training steps of one configuration."""
    n_cells = max(1, tokens_per_step // length)
    row = {"model": kind, "tokens_per_cell": length, "cells_per_step": n_cells}
    try:
        torch.manual_seed(0)
        module = build(kind, preset, sizes, n_vocab, device)
        row["params_M"] = round(sum(p.numel() for p in module.parameters()) / 1e6, 1)
        batch = packed_batch(n_cells, length, n_vocab, device)
        flop_module = build("mamba/torch" if kind.startswith("mamba") else kind, preset, sizes,
                            n_vocab, device)  # fmt: skip
        flop_module.load_state_dict(module.state_dict())
        row["flops_per_step"] = step_flops(flop_module, batch, device)
        del flop_module
        optimizer = torch.optim.AdamW(module.parameters(), lr=1e-4, fused=device == "cuda")
        times = []
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        for _ in range(steps + 1):
            start = time.perf_counter()
            with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
                loss = module.token_loss(batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        t = statistics.median(times[1:])  # the first step warms up kernels and autotuning
        row.update(
            seconds_per_step=round(t, 4),
            tokens_per_s=round(n_cells * length / t),
            cells_per_s=round(n_cells / t, 2),
            loss=round(float(loss), 4),
        )
        if device == "cuda":
            row["peak_memory_GB"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            peak = device_peak(torch.cuda.get_device_name())
            if peak:
                row["mfu"] = round(row["flops_per_step"] / t / peak, 3)
        del module, optimizer, batch
    except torch.cuda.OutOfMemoryError:
        row["error"] = "out of memory"
    except (RuntimeError, ImportError) as err:  # e.g. mamba-ssm missing or failing
        row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
    if device == "cuda":
        torch.cuda.empty_cache()
    return row


def machine(device: str) -> dict:
    """Device name, software versions and date of the run."""
    info = {
        "date": dt.date.today().isoformat(),
        "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu_threads": torch.get_num_threads(),
    }
    if device == "cuda":
        info["cuda"] = torch.version.cuda
        info["peak_bf16_flops"] = device_peak(info["device"])
    for name in ("mamba_ssm", "triton"):
        try:
            info[name] = importlib.metadata.version(name.replace("_", "-"))
        except importlib.metadata.PackageNotFoundError:
            pass
    return info


def load_mamba_ssm_triton() -> bool:
    """Make mamba-ssm's Triton SSD kernel reachable, also when mamba-ssm lacks its CUDA build.

    ``import mamba_ssm`` needs the compiled ``selective_scan_cuda``; its SSD kernels do not. When
    the normal import fails, load ``mamba_ssm.ops.triton.ssd_combined`` under a bare parent
    package with a stub ``selective_scan_cuda`` and hand it to the dispatch (benchmark only).
    """
    if mamba_ssm_available():
        return True
    spec = importlib.util.find_spec("mamba_ssm")
    if spec is None:
        return False
    for name in [m for m in sys.modules if m == "mamba_ssm" or m.startswith("mamba_ssm.")]:
        del sys.modules[name]
    pkg = types.ModuleType("mamba_ssm")
    pkg.__path__ = list(spec.submodule_search_locations)
    sys.modules["mamba_ssm"] = pkg
    sys.modules.setdefault("selective_scan_cuda", types.ModuleType("selective_scan_cuda"))
    try:
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    except Exception as err:  # an incompatible triton, say: the rows will be missing
        print(f"mamba-ssm's Triton kernels do not load: {err}")
        return False
    _ssd._mamba_chunk_scan = lambda: mamba_chunk_scan_combined
    return True


def markdown(result: dict) -> str:
    """The results as a markdown table, with the machine line."""
    m = result["machine"]
    lines = [
        f"# Pretraining throughput ({result['preset']})",
        "",
        f"{m['device']}, torch {m['torch']}, {m['date']}. One AdamW step on packed cells, "
        f"{result['tokens_per_step']} tokens per step, bf16 autocast on GPU. MFU: counted "
        "FLOPs / time / dense bf16 peak.",
        "",
        "| model | tokens/cell | cells/step | params (M) | s/step | tokens/s | cells/s "
        "| peak GB | MFU |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        if "error" in r:
            lines.append(
                f"| {r['model']} | {r['tokens_per_cell']} | {r['cells_per_step']} | | "
                f"{r['error']} | | | | |"
            )
            continue
        lines.append(
            f"| {r['model']} | {r['tokens_per_cell']} | {r['cells_per_step']} | "
            f"{r.get('params_M', '')} | {r['seconds_per_step']} | {r['tokens_per_s']:,} | "
            f"{r['cells_per_s']} | {r.get('peak_memory_GB', '')} | {r.get('mfu', '')} |"
        )
    for length, ratio in result.get("speedup_vs_transformer", {}).items():
        lines.append(f"\nMamba2 / transformer tokens/s at {length} tokens per cell: {ratio}x")
    for length, ratio in result.get("triton_time_vs_mamba_ssm", {}).items():
        lines.append(
            f"\nOwn Triton / mamba-ssm time per step at {length} tokens per cell: {ratio}x"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print (and, unless ``--smoke``, write) the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, no files written")
    parser.add_argument("--preset", default="paper-medium")
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 20000, 60000])
    parser.add_argument("--tokens-per-step", type=int, default=61440)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--n-vocab", type=int, default=60697)
    parser.add_argument("--models", nargs="+", default=None)
    parser.add_argument("--device-name", default=None, help="file-name suffix (default: the GPU's)")
    args = parser.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    sizes: dict = {}
    if args.smoke:
        sizes = {"d_model": 64, "n_layers": 2, "d_state": 16, "head_dim": 16}
        args.preset, args.lengths, args.tokens_per_step = "cpu-small", [128, 256], 512
        args.steps, args.n_vocab = 1, 2000
    models = args.models or ["mamba/torch", "transformer"]
    if args.models is None and device == "cuda":
        if triton_available():
            models.insert(1, "mamba/triton")
        if load_mamba_ssm_triton():
            models.insert(1, "mamba/mamba_ssm")
    name = args.device_name or (
        re.sub(r"[^A-Za-z0-9]+", "-", torch.cuda.get_device_name()).strip("-")
        if device == "cuda"
        else device
    )
    rows = []
    for length in args.lengths:
        for kind in models:
            row = measure(
                kind, args.preset, sizes, length, args.tokens_per_step, args.n_vocab, device,
                args.steps,
            )  # fmt: skip
            print(json.dumps(row), flush=True)
            rows.append(row)
            if not args.smoke:
                write(args, sizes, device, name, rows)
    table = write(args, sizes, device, name, rows, files=not args.smoke)
    print(table)
    return 0


def write(args, sizes, device, name, rows, files=True) -> str:
    """The result so far as JSON and markdown (files unless ``files=False``); the table."""
    best, own = {}, {}
    for length in args.lengths:
        speeds = {r["model"]: r.get("tokens_per_s") for r in rows if r["tokens_per_cell"] == length}
        mamba = max((v for k, v in speeds.items() if k.startswith("mamba") and v), default=None)
        if mamba and speeds.get("transformer"):
            best[str(length)] = round(mamba / speeds["transformer"], 2)
        if speeds.get("mamba/triton") and speeds.get("mamba/mamba_ssm"):
            own[str(length)] = round(speeds["mamba/mamba_ssm"] / speeds["mamba/triton"], 2)
    result = {
        "preset": args.preset,
        "sizes": sizes,
        "tokens_per_step": args.tokens_per_step,
        "machine": machine(device),
        "rows": rows,
        "speedup_vs_transformer": best,
        "triton_time_vs_mamba_ssm": own,
    }
    table = markdown(result)
    if files:
        RESULTS.mkdir(exist_ok=True)
        stem = RESULTS / f"pretrain_throughput_{name}"
        stem.with_suffix(".json").write_text(json.dumps(result, indent=2))
        stem.with_suffix(".md").write_text(table)
    return table


if __name__ == "__main__":
    raise SystemExit(main())
