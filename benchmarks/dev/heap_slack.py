"""Cost of returning freed heap on the demo's small training steps, by heap-return policy.

``python benchmarks/dev/heap_slack.py [ROUNDS] [OUT]`` trains the demo's recipe (pbmc68k_reduced
training cells, ``cpu-small``, 5 epochs, minibatch 16, lr 2e-3) once per policy and round, each
in a fresh process, the policies alternating: ``off`` (no return), ``steps`` (two steps'
predicted peak as slack, no minimum) and ``default`` (the package's). Records training seconds,
heap returns and peak resident set; writes OUT.json and OUT.md (default
``benchmarks/results/heap_slack_demo``).
"""

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from train_efficiency import machine_info

POLICIES = ("off", "steps", "default")


def run_one(policy: str) -> dict:
    """Train once under ``policy`` (in this process) and report time, returns and peak RSS."""
    import logging

    import numpy as np
    import scvi
    from sklearn.model_selection import train_test_split

    import scmamba2_scvi.module._memory as mem
    from scmamba2_scvi import SCMamba2
    from scmamba2_scvi.datasets import pbmc68k_counts

    counts = {"returns": 0}
    package = mem.return_freed_heap

    def counted(floor, slack):
        new = package(floor, slack)
        counts["returns"] += floor is None or new != floor
        return new

    mem.return_freed_heap = (lambda floor, slack: floor) if policy == "off" else counted
    if policy == "steps":
        mem._HEAP_SLACK_MIN = 0
    scvi.settings.verbosity = logging.ERROR
    adata, key = pbmc68k_counts(), "bulk_labels"
    train, _ = train_test_split(
        np.arange(adata.n_obs), test_size=0.2, stratify=adata.obs[key], random_state=0
    )
    fit = adata[np.sort(train)].copy()
    scvi.settings.seed = 0
    SCMamba2.setup_anndata(fit, layer="counts", labels_key=key)
    model = SCMamba2(fit, preset="cpu-small", max_len=1024)
    t0 = time.perf_counter()
    model.train(
        max_epochs=5,
        batch_size=16,
        plan_kwargs={"lr": 2e-3},
        train_size=0.9,
        enable_progress_bar=False,
    )
    train_s = time.perf_counter() - t0
    status = Path("/proc/self/status").read_text().splitlines()
    hwm = next(int(line.split()[1]) for line in status if line.startswith("VmHWM"))
    return {
        "policy": policy,
        "train_s": round(train_s, 1),
        "heap_returns": counts["returns"],
        "peak_rss_mb": round(hwm / 1024),
    }


def markdown(result: dict) -> str:
    """The runs as a table: one row per policy, medians and every round."""
    lines = [
        f"# Heap return on the demo's training steps ({result['machine']['date']})",
        "",
        f"Machine: `{json.dumps(result['machine'])}`",
        "",
        "| policy | train (s), median | rounds | heap returns | peak RSS (MB) |",
        "|---|---|---|---|---|",
    ]
    for policy in POLICIES:
        runs = [r for r in result["runs"] if r["policy"] == policy]
        median = round(statistics.median(r["train_s"] for r in runs), 1)
        lines.append(
            f"| {policy} | {median} | {', '.join(str(r['train_s']) for r in runs)} | "
            f"{', '.join(str(r['heap_returns']) for r in runs)} | "
            f"{', '.join(str(r['peak_rss_mb']) for r in runs)} |"
        )
    return "\n".join(lines) + "\n"


def main(rounds: int, out: Path) -> dict:
    """Alternate the policies over ``rounds``, each run a fresh subprocess."""
    machine = machine_info()
    runs = []
    for _ in range(rounds):
        for policy in POLICIES:
            proc = subprocess.run(
                [sys.executable, __file__, "--one", policy],
                capture_output=True,
                text=True,
                check=True,
            )
            runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(runs[-1], flush=True)
    result = {"machine": machine, "runs": runs}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return result


if __name__ == "__main__":
    if sys.argv[1:2] == ["--one"]:
        print(json.dumps(run_one(sys.argv[2])))
    else:
        rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 2
        default = Path(__file__).resolve().parents[1] / "results" / "heap_slack_demo"
        main(rounds, Path(sys.argv[2]) if len(sys.argv) > 2 else default)
