"""The own Triton SSD kernel (``backend="triton"``) against the torch reference; the int32 split.

Without CUDA the kernels run under Triton's interpreter (CPU tensors, fp32). ``TRITON_INTERPRET=1``
must be set before ``triton`` is imported, and torch imports it early (``torch._dynamo``) when it
is installed, so the variable cannot be switched on inside this process: the kernel tests skip
here and :func:`test_kernels_under_the_interpreter` runs them, with this file's mamba-ssm
counterpart, in one child pytest started with the variable set. The rest of the suite never runs
with it. With CUDA the kernel tests run here, compiled, on the GPU.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from scmamba2_scvi.ops import _ssd, ssd_scan, ssd_scan_torch

HAS_TRITON = importlib.util.find_spec("triton") is not None
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
RUN_KERNELS = HAS_TRITON and (torch.cuda.is_available() or INTERPRETED)
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRETED else "cpu"
kernel_test = pytest.mark.skipif(
    not RUN_KERNELS,
    reason="kernel test: runs on CUDA, or on CPU in test_kernels_under_the_interpreter's child",
)
ROOT = Path(__file__).resolve().parents[1]
INTERPRETED_FILES = ["tests/test_ops_triton.py", "tests/test_ops_mamba_ssm.py"]


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton (`pip install triton`)")
@pytest.mark.skipif(RUN_KERNELS, reason="the kernel tests run in this process")
def test_kernels_under_the_interpreter():
    """The kernel tests of both files, in a child pytest under ``TRITON_INTERPRET=1``."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "MAMBA_DETERMINISTIC": "1"}
    args = ["-q", "-p", "no:cacheprovider", "-k", "not under_the_interpreter"]
    result = subprocess.run(
        [sys.executable, "-m", "pytest", *args, *INTERPRETED_FILES],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    print(result.stdout[-3000:])
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]


@pytest.fixture(scope="module")
def device():
    """Where the kernels run: ``"cuda"``, or ``"cpu"`` under the interpreter."""
    assert _ssd.triton_available()
    return DEVICE


def make_inputs(b, length, h, p, g, n, device, seed, d_per_channel=False):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, length, h, p, generator=gen)
    dt = torch.rand(b, length, h, generator=gen) * 0.5 + 0.05
    A = -(torch.rand(h, generator=gen) + 0.3)
    B = torch.randn(b, length, g, n, generator=gen)
    C = torch.randn(b, length, g, n, generator=gen)
    D = torch.randn(h, p, generator=gen) if d_per_channel else torch.randn(h, generator=gen)
    s0 = torch.randn(b, h, p, n, generator=gen)
    return [t.to(device).requires_grad_() for t in (x, dt, A, B, C, D, s0)]


def rel_err(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()


def outputs_and_grads(scan, inputs, seq_idx, chunk_size, with_init=True, **kw):
    """``y``, final state and the gradients of every input under fixed random cotangents."""
    x, dt, A, B, C, D, s0 = inputs
    y, s = scan(
        x, dt, A, B, C, D=D, chunk_size=chunk_size, initial_state=s0 if with_init else None,
        seq_idx=seq_idx, return_final_state=True, **kw,
    )  # fmt: skip
    gen = torch.Generator().manual_seed(99)
    gy = torch.randn(y.shape, generator=gen).to(y.device)
    gs = torch.randn(s.shape, generator=gen).to(s.device)
    wrt = inputs if with_init else inputs[:-1]
    grads = torch.autograd.grad((y * gy).sum() + (s * gs).sum(), wrt)
    return [y, s, *grads]


NAMES = ["y", "final_state", "dx", "ddt", "dA", "dB", "dC", "dD", "dinitial_state"]

# (batch, length, heads, head_dim, groups, d_state, packed, initial state, D per channel)
CASES = {
    "plain": (2, 32, 2, 4, 1, 8, False, False, False),
    "groups_init_padded": (1, 40, 4, 4, 2, 8, False, True, True),
    "packed_init": (2, 48, 2, 4, 1, 16, True, True, False),
}


def packed_ids(b, length, device):
    """Ids that start away from 0, change inside and at a chunk boundary, and repeat."""
    seq = torch.zeros(b, length, dtype=torch.int32)
    seq[0, :5], seq[0, 5:16], seq[0, 16:37], seq[0, 37:] = 3, 4, 7, 3
    if b > 1:
        seq[1, 20:] = 1
    return seq.to(device)


@kernel_test
@pytest.mark.parametrize("case", list(CASES))
def test_triton_matches_torch_forward_and_gradients(device, case):
    b, length, h, p, g, n, packed, init, d_ch = CASES[case]
    inputs = make_inputs(b, length, h, p, g, n, device, seed=len(case), d_per_channel=d_ch)
    seq_idx = packed_ids(b, length, device) if packed else None
    got = outputs_and_grads(ssd_scan, inputs, seq_idx, 16, init, backend="triton")
    ref = outputs_and_grads(ssd_scan_torch, inputs, seq_idx, 16, init)
    errors = {name: rel_err(a, r) for name, a, r in zip(NAMES, got, ref)}
    assert max(errors.values()) <= 1e-4, errors


@kernel_test
def test_triton_packed_rows_equal_separate_scans(device):
    """A packed row equals its sequences scanned alone (an oracle independent of the reference)."""
    x, dt, A, B, C, D, _ = (t.detach() for t in make_inputs(1, 37, 2, 4, 1, 8, device, seed=5))
    seq_idx = torch.tensor([[0] * 20 + [1] * 17], dtype=torch.int32, device=device)
    y = ssd_scan(x, dt, A, B, C, D=D, chunk_size=16, seq_idx=seq_idx, backend="triton")
    parts = [
        ssd_scan(x[:, s], dt[:, s], A, B[:, s], C[:, s], D=D, chunk_size=16, backend="triton")
        for s in (slice(0, 20), slice(20, 37))
    ]
    assert rel_err(y, torch.cat(parts, 1)) <= 1e-5


@kernel_test
@pytest.mark.skipif(DEVICE != "cuda", reason="bf16 needs a GPU (not the interpreter)")
def test_triton_bf16_inputs_accumulate_in_fp32(device):
    inputs = make_inputs(2, 1000, 8, 64, 1, 64, device, seed=3)
    x, dt, A, B, C, D, _ = (t.detach() for t in inputs)
    lo = [t.bfloat16() for t in (x, dt, B, C)]
    y = ssd_scan(lo[0], lo[1], A, lo[2], lo[3], D=D, chunk_size=64, backend="triton")
    ref = ssd_scan_torch(*(t.float() for t in lo[:2]), A, *(t.float() for t in lo[2:]), D=D,
                         chunk_size=64)  # fmt: skip
    assert y.dtype == torch.bfloat16
    assert rel_err(y, ref) <= 2e-2


@kernel_test
def test_triton_chunk_size_must_be_a_power_of_two(device):
    x, dt, A, B, C, *_ = (t.detach() for t in make_inputs(1, 8, 2, 4, 1, 8, device, seed=0))
    with pytest.raises(ValueError, match="power of two"):
        ssd_scan(x, dt, A, B, C, chunk_size=24, backend="triton")


def test_kernel_backends_refuse_cpu_tensors_outside_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x, dt, A, B, C, *_ = (t.detach() for t in make_inputs(1, 8, 2, 4, 1, 8, "cpu", seed=0))
    for backend in ("triton", "mamba_ssm"):
        with pytest.raises(RuntimeError, match="CUDA tensors only"):
            ssd_scan(x, dt, A, B, C, backend=backend)


def test_auto_backend_choice(monkeypatch):
    monkeypatch.setattr(_ssd, "mamba_ssm_available", lambda: True)
    monkeypatch.setattr(_ssd, "triton_available", lambda: True)
    assert _ssd._pick_backend("auto", on_cuda=True) == "mamba_ssm"
    assert _ssd._pick_backend("auto", on_cuda=False) == "torch"
    monkeypatch.setattr(_ssd, "mamba_ssm_available", lambda: False)
    assert _ssd._pick_backend("auto", on_cuda=True) == "triton"
    assert _ssd._pick_backend("auto", on_cuda=True, chunk_size=100) == "torch"
    monkeypatch.setattr(_ssd, "triton_available", lambda: False)
    assert _ssd._pick_backend("auto", on_cuda=True) == "torch"
    assert _ssd._pick_backend("triton", on_cuda=False) == "triton"


def test_without_triton_the_kernel_backend_is_unavailable(monkeypatch):
    """``triton`` is optional: without it the lazy import fails quietly and forcing it explains."""
    monkeypatch.setitem(sys.modules, "triton", None)  # import triton -> ImportError
    monkeypatch.delitem(sys.modules, "scmamba2_scvi.ops._triton_ssd", raising=False)
    _ssd._triton_scan.cache_clear()
    try:
        assert not _ssd.triton_available()
        assert _ssd._pick_backend("auto", on_cuda=True) in ("torch", "mamba_ssm")
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        x, dt, A, B, C, *_ = (t.detach() for t in make_inputs(1, 8, 2, 4, 1, 8, "cpu", seed=0))
        with pytest.raises(RuntimeError, match=r"scmamba2-scvi\[triton\]"):
            ssd_scan(x, dt, A, B, C, backend="triton")
    finally:
        _ssd._triton_scan.cache_clear()


# ---- int32 split (state-spaces/mamba#1015): exact, checked with a lowered threshold ----


def recording_torch_call(calls):
    """A stand-in kernel call: the torch scan, recording the extent of every call it gets."""

    def call(x, dt, A, B, C, D, chunk_size, initial_state, seq_idx, final):
        calls.append(x.shape[0] * _ssd._kernel_extent(x, dt, B, C, chunk_size)[1])
        return ssd_scan_torch(
            x, dt, A, B, C, D=D, chunk_size=chunk_size, initial_state=initial_state,
            seq_idx=seq_idx, return_final_state=final, tokens_per_block=0,
        )  # fmt: skip

    return call


@pytest.mark.parametrize("limit", [3000, 900, 300])
def test_split_over_batch_and_sequence_is_exact(monkeypatch, limit):
    """Lowered threshold: every call stays under it, and results and gradients are unchanged."""
    inputs = make_inputs(3, 100, 2, 4, 1, 8, "cpu", seed=11)
    inputs = [t.detach().double().requires_grad_() for t in inputs]
    seq_idx = torch.zeros(3, 100, dtype=torch.int32)
    seq_idx[0, 32:], seq_idx[0, 70:] = 1, 2  # changes at a block boundary (blocks 16 or 48)
    seq_idx[2, 45:], seq_idx[2, 48:] = 5, 6
    ref = outputs_and_grads(ssd_scan_torch, inputs, seq_idx, 16, tokens_per_block=0)
    calls = []
    monkeypatch.setattr(_ssd, "_KERNEL_MAX_OFFSET", limit)
    split = functools_partial_split(recording_torch_call(calls))
    got = outputs_and_grads(split, inputs, seq_idx, 16)
    assert len(calls) >= 3 and max(calls) <= limit
    for name, a, r in zip(NAMES, got, ref):
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-10, msg=name)


def functools_partial_split(call):
    def scan(x, dt, A, B, C, *, D, chunk_size, initial_state, seq_idx, return_final_state):
        return _ssd._split_scan(
            call, x, dt, A, B, C, D, chunk_size, initial_state, seq_idx, return_final_state
        )

    return scan


def test_split_counts_strided_views(monkeypatch):
    """A view into a wider projection (as in the mixer) counts with its real row stride."""
    wide = torch.randn(1, 64, 2, 40)
    x = wide[..., :4]
    B = torch.randn(1, 64, 1, 8)
    dt = torch.rand(1, 64, 2)
    assert _ssd._kernel_extent(x, dt, B, B, 16)[1] == 64 * 80
    assert _ssd._kernel_extent(x.contiguous(), dt, B, B, 16)[1] == 64 * 16


@kernel_test
def test_split_with_the_triton_kernel(device, monkeypatch):
    inputs = make_inputs(2, 64, 2, 4, 1, 8, device, seed=13)
    seq_idx = torch.zeros(2, 64, dtype=torch.int32, device=device)
    seq_idx[1, 32:] = 1
    ref = outputs_and_grads(ssd_scan_torch, inputs, seq_idx, 16)
    monkeypatch.setattr(_ssd, "_KERNEL_MAX_OFFSET", 16 * 32 + 100)  # batch split + 32-token blocks
    got = outputs_and_grads(ssd_scan, inputs, seq_idx, 16, backend="triton")
    errors = {name: rel_err(a, r) for name, a, r in zip(NAMES, got, ref)}
    assert max(errors.values()) <= 1e-4, errors
