"""mamba-ssm's Triton SSD kernel through our adapter (``backend="mamba_ssm"``) vs the torch scan.

On CPU these run under Triton's interpreter in the child pytest started by
``tests/test_ops_triton.py::test_kernels_under_the_interpreter`` (``TRITON_INTERPRET=1``), and
skip in the main process. mamba-ssm installs without its CUDA build
(``MAMBA_SKIP_CUDA_BUILD=TRUE``, see ``.ci/run``); its package ``__init__`` imports the compiled
``selective_scan_cuda`` and the language-model stack, so the fixture loads only its
``mamba_ssm.ops.triton`` modules (a stub parent package, a stub ``selective_scan_cuda``) and
shims the two CUDA queries its kernels make on CPU tensors. Skipped when mamba-ssm is absent.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from scmamba2_scvi.ops import _ssd, ssd_scan, ssd_scan_torch

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
ON_GPU = torch.cuda.is_available() and not INTERPRETED
DEVICE = "cuda" if ON_GPU else "cpu"
_NEEDED = ("mamba_ssm", "triton", "einops")
MISSING = [m for m in _NEEDED if importlib.util.find_spec(m) is None]
pytestmark = [
    pytest.mark.skipif(bool(MISSING), reason=f"needs {', '.join(MISSING)} (see .ci/run)"),
    pytest.mark.skipif(
        not (ON_GPU or INTERPRETED),
        reason="on CPU run by test_ops_triton.py::test_kernels_under_the_interpreter",
    ),
]


def _drop_mamba_modules():
    for name in [m for m in sys.modules if m == "mamba_ssm" or m.startswith("mamba_ssm.")]:
        del sys.modules[name]


@pytest.fixture(scope="module")
def kernel():
    """``mamba_chunk_scan_combined``, wired into ``ssd_scan(backend="mamba_ssm")``."""
    mp = pytest.MonkeyPatch()
    fn = _ssd._mamba_chunk_scan() if ON_GPU else None
    if fn is None:  # mamba-ssm without its CUDA build: load only its Triton modules
        if not ON_GPU:
            mp.setenv("MAMBA_DETERMINISTIC", "1")  # one autotune config: no benchmarking on CPU
        _drop_mamba_modules()
        spec = importlib.util.find_spec("mamba_ssm")
        pkg = types.ModuleType("mamba_ssm")
        pkg.__path__ = list(spec.submodule_search_locations)
        mp.setitem(sys.modules, "mamba_ssm", pkg)
        mp.setitem(sys.modules, "selective_scan_cuda", types.ModuleType("selective_scan_cuda"))
    if not ON_GPU:  # the two CUDA queries its kernels make, answered for CPU tensors
        device = torch.cuda.device
        mp.setattr(
            torch.cuda, "device", lambda i: contextlib.nullcontext() if i is None else device(i)
        )
        mp.setattr(
            torch.cuda,
            "get_device_properties",
            lambda d: types.SimpleNamespace(multi_processor_count=2),
        )
    if fn is None:
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined as fn
    mp.setattr(_ssd, "_mamba_chunk_scan", lambda: fn)
    yield fn
    mp.undo()
    _drop_mamba_modules()


def make_inputs(b, length, h, p, g, n, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, length, h, p, generator=gen)
    dt = torch.rand(b, length, h, generator=gen) * 0.5 + 0.05
    A = -(torch.rand(h, generator=gen) + 0.3)
    B = torch.randn(b, length, g, n, generator=gen)
    C = torch.randn(b, length, g, n, generator=gen)
    D = torch.randn(h, generator=gen)
    s0 = torch.randn(b, h, p, n, generator=gen)
    return [t.to(DEVICE).requires_grad_() for t in (x, dt, A, B, C, D, s0)]


def rel_err(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()


def outputs_and_grads(scan, inputs, seq_idx, with_init, **kw):
    x, dt, A, B, C, D, s0 = inputs
    y, s = scan(
        x, dt, A, B, C, D=D, chunk_size=16, initial_state=s0 if with_init else None,
        seq_idx=seq_idx, return_final_state=True, **kw,
    )  # fmt: skip
    gen = torch.Generator().manual_seed(99)
    gy = torch.randn(y.shape, generator=gen).to(y.device)
    gs = torch.randn(s.shape, generator=gen).to(s.device)
    wrt = inputs if with_init else inputs[:-1]
    return [y, s, *torch.autograd.grad((y * gy).sum() + (s * gs).sum(), wrt)]


NAMES = ["y", "final_state", "dx", "ddt", "dA", "dB", "dC", "dD", "dinitial_state"]


def packed_ids(b, length):
    """Ids that start away from 0, change inside and at a chunk boundary, and repeat."""
    seq = torch.zeros(b, length, dtype=torch.int32)
    seq[0, :5], seq[0, 5:16], seq[0, 16:37], seq[0, 37:] = 3, 4, 7, 3
    if b > 1:
        seq[1, 20:] = 1
    return seq.to(DEVICE)


# (batch, length, heads, head_dim, groups, d_state, packed, initial state)
CASES = {
    "plain_padded": (2, 40, 2, 4, 1, 8, False, False),
    "groups_init": (1, 32, 4, 4, 2, 8, False, True),
    "packed_init": (2, 48, 2, 4, 1, 16, True, True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_mamba_ssm_matches_torch_forward_and_gradients(kernel, case):
    b, length, h, p, g, n, packed, init = CASES[case]
    inputs = make_inputs(b, length, h, p, g, n, seed=len(case))
    seq_idx = packed_ids(b, length) if packed else None
    got = outputs_and_grads(ssd_scan, inputs, seq_idx, init, backend="mamba_ssm")
    ref = outputs_and_grads(ssd_scan_torch, inputs, seq_idx, init)
    errors = {name: rel_err(a, r) for name, a, r in zip(NAMES, got, ref)}
    assert max(errors.values()) <= 1e-4, errors


@pytest.mark.parametrize(
    ("ids", "wrong"),
    [
        ([3] * 48, slice(0, 48)),  # first id not 0: mamba-ssm drops the initial state
        ([0] * 20 + [1] * 10 + [0] * 18, slice(30, 48)),  # id 0 again: joined to the first
    ],
)
def test_raw_seq_idx_would_disagree_the_adapter_fixes_it(kernel, ids, wrong):
    """Called with our raw ids, mamba-ssm's results differ; the adapter's segment ids agree."""
    x, dt, A, B, C, D, s0 = (t.detach() for t in make_inputs(1, 48, 2, 4, 1, 8, seed=4))
    seq_idx = torch.tensor([ids], dtype=torch.int32, device=DEVICE)
    ref = ssd_scan_torch(x, dt, A, B, C, D=D, chunk_size=16, initial_state=s0, seq_idx=seq_idx)
    raw = kernel(x, dt, A, B, C, 16, D=D, initial_states=s0, seq_idx=seq_idx)
    assert rel_err(raw[:, wrong], ref[:, wrong]) > 1e-3
    ours = ssd_scan(x, dt, A, B, C, D=D, chunk_size=16, initial_state=s0, seq_idx=seq_idx,
                    backend="mamba_ssm")  # fmt: skip
    assert rel_err(ours, ref) <= 1e-5


def test_softplus_and_bias_inside_the_kernel_equal_ours_outside(kernel):
    """The mixer passes ``softplus(dt_raw + dt_bias)``; mamba-ssm's fused version is the same."""
    x, dt, A, B, C, D, _ = (t.detach() for t in make_inputs(1, 32, 2, 4, 1, 8, seed=6))
    raw = torch.randn_like(dt)
    bias = torch.randn(dt.shape[-1], device=DEVICE)
    fused = kernel(x, raw, A, B, C, 16, D=D, dt_bias=bias, dt_softplus=True)
    ours = ssd_scan(x, F.softplus(raw + bias), A, B, C, D=D, chunk_size=16, backend="mamba_ssm")
    assert rel_err(ours, fused) <= 1e-5


def test_mamba_ssm_split_with_lowered_threshold(kernel, monkeypatch):
    inputs = make_inputs(2, 64, 2, 4, 1, 8, seed=13)
    seq_idx = torch.zeros(2, 64, dtype=torch.int32, device=DEVICE)
    seq_idx[1, 32:] = 1
    ref = outputs_and_grads(ssd_scan_torch, inputs, seq_idx, True)
    monkeypatch.setattr(_ssd, "_KERNEL_MAX_OFFSET", 16 * 32 + 100)  # batch split + 32-token blocks
    got = outputs_and_grads(ssd_scan, inputs, seq_idx, True, backend="mamba_ssm")
    errors = {name: rel_err(a, r) for name, a, r in zip(NAMES, got, ref)}
    assert max(errors.values()) <= 1e-4, errors
