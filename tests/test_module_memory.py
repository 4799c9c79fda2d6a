"""Training memory guard: a batch over budget is split in the encoder, with the same result."""

import ctypes
import warnings

import pytest
import torch

from helpers import FAST, TINY, synthetic
from scmamba2_scvi import SCMamba2
from scmamba2_scvi.data import TokenDataLoader
from scmamba2_scvi.module import _memory
from scmamba2_scvi.module._memory import (
    StepMemory,
    batch_cells,
    batch_shape,
    guard_step,
    plan_groups,
    resident_bytes,
    return_freed_heap,
)


def _batch(model, adata, packed: bool) -> dict:
    collate = model._collate(adata, training=True)
    collate.packed = packed
    loader = TokenDataLoader(model.adata_manager, collate, batch_size=12, seed=0)
    batch = next(iter(loader))
    batch.pop("obs_index")
    return batch


@pytest.fixture(scope="module")
def model_and_batch():
    torch.manual_seed(0)
    adata = synthetic(n_cells=24)
    SCMamba2.setup_anndata(adata, labels_key="cell_type", batch_key="batch")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # DSBN (on by default with two batches) needs padded batches; both layouts are tested
        model = SCMamba2(adata, dsbn=False, **TINY)
        batches = {packed: _batch(model, adata, packed) for packed in (False, True)}
    model.module.train()
    return model, batches


def step(module, batch):
    module.zero_grad()
    torch.manual_seed(1)
    loss = module.token_loss(batch).loss
    loss.backward()
    return [loss.detach()] + [p.grad.clone() for p in module.parameters() if p.grad is not None]


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_over_budget_batch_is_split_with_the_same_loss_and_gradients(model_and_batch, packed):
    model, batches = model_and_batch
    module, batch = model.module, batches[packed]
    assert guard_step(module, batch, budget=2**40) is None  # fits: nothing changes
    whole = step(module, batch)
    memory = module._step_memory
    n_cells, seqlen = batch_shape(batch)
    assert n_cells == 12
    # a budget between one cell per group and the whole batch
    budget = (memory.peak(12, seqlen, 3) + memory.peak(12, seqlen)) / 2
    group = guard_step(module, batch, budget=budget)
    assert group is not None and 3 <= group < 12
    assert memory.peak(12, seqlen, group) <= budget < memory.peak(12, seqlen)
    split = step(module, batch)
    module.encoder.checkpoint_cells = None
    # packed groups start the scan's chunks at other offsets: same sums, another float order
    atol = 1e-6 if packed else 1e-7
    for a, b in zip(whole, split, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=atol)


def test_measured_bytes_per_token_are_positive_and_encoder_dominated(model_and_batch):
    memory = model_and_batch[0].module._step_memory
    assert memory.encoder > 0 and memory.rest > 0
    assert memory.encoder_input == 4 * 32
    # keeping the mixers' intermediates saves several times what recomputing them saves
    assert memory.encoder_kept > 2 * memory.encoder


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_small_step_keeps_activations_with_the_same_loss_and_gradients(model_and_batch, packed):
    model, batches = model_and_batch
    module, batch = model.module, batches[packed]
    n_cells, seqlen = batch_shape(batch)
    guard_step(module, batch, budget=2**40)
    memory = module._step_memory
    assert module.encoder.keep_activations and module.encoder.checkpoint_cells is None
    kept = step(module, batch)
    # a budget the kept intermediates exceed (a quarter of it), the recomputing step does not
    budget = 2 * memory.peak(n_cells, seqlen, kept=True)
    assert memory.peak(n_cells, seqlen) <= budget
    assert guard_step(module, batch, budget=budget) is None
    assert not module.encoder.keep_activations
    recomputed = step(module, batch)
    for a, b in zip(kept, recomputed, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_one_cell_too_large_names_the_fix():
    memory = StepMemory(encoder=1e5, rest=1e4, encoder_input=1e3, encoder_kept=1e6)
    with pytest.raises(MemoryError, match=r"`max_len`.*`preset`"):
        plan_groups(memory, 8, 1000, budget=1e6)
    assert plan_groups(memory, 8, 1000, budget=1e12) is None
    assert plan_groups(memory, 8, 1000, budget=memory.peak(8, 1000, 1)) == 1


def test_training_step_raises_the_guard_error(model_and_batch):
    model = model_and_batch[0]
    with pytest.raises(MemoryError, match="max_len"):
        model.train(max_epochs=1, batch_size=12, plan_kwargs={"memory_budget": 1e3}, **FAST)


def test_batch_shape_padded_and_packed():
    """Cells and longest sequence: rows when padded, ``len(cu_seqlens) - 1`` when packed."""
    padded = {"genes": torch.zeros(5, 9, dtype=torch.long)}
    packed = {"genes": torch.zeros(1, 12, dtype=torch.long), "cu_seqlens": torch.tensor([0, 4, 12])}
    assert batch_shape(padded) == (5, 9) and batch_cells(padded) == 5
    assert batch_shape(packed) == (2, 8) and batch_cells(packed) == 2


def test_freed_heap_is_returned_only_past_the_slack(monkeypatch):
    rss, calls = [5_000], []

    def trim(pad):
        calls.append(pad)
        rss[0] = 1_000

    monkeypatch.setattr(_memory, "resident_bytes", lambda: rss[0])
    monkeypatch.setattr(_memory, "_malloc_trim", lambda: trim)
    assert return_freed_heap(None, slack=100) == 1_000 and calls == [0]  # first call: return
    rss[0] = 1_100
    assert return_freed_heap(1_000, slack=100) == 1_000 and calls == [0]  # within the slack
    rss[0] = 1_101
    assert return_freed_heap(1_000, slack=100) == 1_000 and calls == [0, 0]
    monkeypatch.setattr(_memory, "_malloc_trim", lambda: None)  # no glibc: nothing, floor kept
    assert return_freed_heap(700, slack=0) == 700


@pytest.mark.skipif(
    resident_bytes() is None or _memory._malloc_trim() is None, reason="needs Linux and glibc"
)
def test_returning_freed_heap_shrinks_the_resident_set():
    """Every other 64 KB block freed: glibc keeps the holes, ``malloc_trim`` returns their pages."""
    blocks = [ctypes.create_string_buffer(b"x" * 2**16, 2**16) for _ in range(4096)]  # 256 MB
    del blocks[::2]
    before = resident_bytes()
    after = return_freed_heap(None, slack=0)
    assert before - after > 64 * 2**20


def test_guard_step_returns_freed_heap_on_cpu(model_and_batch, monkeypatch):
    module, batch = model_and_batch[0].module, model_and_batch[1][False]
    floors = []
    monkeypatch.setattr(_memory, "return_freed_heap", lambda f, s: floors.append((f, s)) or 42)
    module.__dict__.pop("_heap_floor", None)
    guard_step(module, batch)
    guard_step(module, batch)
    steps = _memory._HEAP_SLACK_STEPS * module._step_memory.peak(*batch_shape(batch))
    assert steps < _memory._HEAP_SLACK_MIN  # a small step: the minimum slack applies
    assert floors == [(None, _memory._HEAP_SLACK_MIN), (42, _memory._HEAP_SLACK_MIN)]
    assert module._heap_floor == 42
    monkeypatch.setattr(_memory, "_HEAP_SLACK_MIN", 0)
    guard_step(module, batch)
    assert floors[-1] == (42, steps)  # past the minimum: two steps' predicted peak


def test_heap_is_kept_only_for_a_module_on_cpu(monkeypatch):
    """A module off the CPU keeps its tensors off the host heap: nothing to return for it."""
    calls = []
    monkeypatch.setattr(_memory, "return_freed_heap", lambda f, s: calls.append((f, s)) or 9)
    off_cpu = torch.nn.Linear(2, 2, device="meta")
    _memory.keep_heap(off_cpu, 0)
    assert calls == [] and not hasattr(off_cpu, "_heap_floor")
    on_cpu = torch.nn.Linear(2, 2)
    _memory.keep_heap(on_cpu, 0)
    assert calls == [(None, _memory._HEAP_SLACK_MIN)] and on_cpu._heap_floor == 9


def test_embedding_and_validation_return_freed_heap_first(model_and_batch, monkeypatch):
    """After training, the heap holds the steps' freed memory: inference returns it first."""
    model = model_and_batch[0]
    calls = []
    monkeypatch.setattr(_memory, "return_freed_heap", lambda f, slack: calls.append(f) or 7)
    model.get_latent_representation(batch_size=4)
    n_batches = -(-model.adata.n_obs // 4)
    assert calls == [None] + [7] * n_batches  # all at once first, then past the slack per batch
    calls.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.train(max_epochs=1, batch_size=12, **FAST)
    assert None in calls and model.module._heap_floor == 7  # validation returned all at once
