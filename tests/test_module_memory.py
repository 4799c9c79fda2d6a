"""Training memory guard: a batch over budget is split in the encoder, with the same result."""

import warnings

import pytest
import torch

from helpers import FAST, TINY, synthetic
from scmamba2_scvi import SCMamba2
from scmamba2_scvi.data import TokenDataLoader
from scmamba2_scvi.module._memory import (
    StepMemory,
    batch_cells,
    batch_shape,
    guard_step,
    plan_groups,
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
