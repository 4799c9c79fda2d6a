"""Tokenization in the loader: collate vs Tokenizer, batching, workers, strict keywords, queries."""

import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scvi
import torch
from scvi import REGISTRY_KEYS

from helpers import FAST, TINY, query, synthetic
from scmamba2_scvi import SCMamba2
from scmamba2_scvi.data import LengthBatchSampler, TokenDataLoader, Tokenizer
from scmamba2_scvi.model import build_module

pytestmark = pytest.mark.usefixtures("quiet")  # warnings off (conftest)


@pytest.fixture(scope="module")
def untrained():
    torch.manual_seed(0)
    adata = synthetic(n_cells=90)
    SCMamba2.setup_anndata(adata, labels_key="cell_type", batch_key="batch")
    # DSBN off (on by default with two batches): a packed model; DSBN's padded one is made below
    return adata, SCMamba2(adata, dsbn=False, **TINY)


def test_collate_gives_the_tokenizers_tokens(untrained):
    adata, model = untrained
    collate = model._collate(adata, training=True)
    loader = TokenDataLoader(model.adata_manager, collate, batch_size=16, shuffle=True, seed=3)
    ids = model.vocab.map(adata, min_fraction=0.0)
    direct = Tokenizer(ids, model.vocab, **model.tokenizer_kwargs)
    n_seen = 0
    for (seed, positions), batch in zip(loader.sampler, loader, strict=True):
        rows = np.sort(positions)
        ref = direct.pack(
            adata.X[rows], model.module.mask_ratio, torch.Generator().manual_seed(seed)
        )
        for key, value in ref.items():
            torch.testing.assert_close(batch[key], value, rtol=0, atol=0)
        np.testing.assert_array_equal(batch["obs_index"].numpy(), rows)
        codes = adata.obs["_scvi_labels"].to_numpy()[rows]
        np.testing.assert_array_equal(batch[REGISTRY_KEYS.LABELS_KEY].numpy(), codes)
        assert bool(batch["mask"].any())  # training batches are masked
        n_seen += len(rows)
    assert n_seen == adata.n_obs


def test_sampler_budget_buckets_and_rank_shards():
    lengths = np.random.default_rng(0).integers(2, 60, 500)
    for packed in (False, True):
        sampler = LengthBatchSampler(lengths, 32, 400, packed=packed, shuffle=True, seed=1)
        batches = [b for _, b in sampler]
        for b in batches:
            cost = lengths[b].sum() if packed else len(b) * lengths[b].max()
            assert cost <= 400 and len(b) <= 32
        np.testing.assert_array_equal(np.sort(np.concatenate(batches)), np.arange(500))
        sampler.set_epoch(1)
        assert [b.tolist() for _, b in sampler] != [b.tolist() for b in batches]
    ranks = [
        [b for _, b in LengthBatchSampler(lengths, 32, shuffle=True, rank=r, world_size=2)]
        for r in range(2)
    ]
    assert len(ranks[0]) == len(ranks[1])
    assert not set(np.concatenate(ranks[0])) & set(np.concatenate(ranks[1]))
    with pytest.raises(ValueError, match="token_budget=10 cannot hold a cell of"):
        LengthBatchSampler(lengths, 32, 10)


@pytest.mark.parametrize("dsbn", [False, True])  # packed, and padded (DSBN)
def test_embeddings_do_not_depend_on_the_minibatches(untrained, dsbn):
    adata, model = untrained
    if dsbn:
        torch.manual_seed(0)
        model = SCMamba2(adata, dsbn=True, **TINY)
    assert model._collate(adata, training=False).packed is not dsbn
    z = model.get_latent_representation(batch_size=128)
    np.testing.assert_allclose(model.get_latent_representation(batch_size=7), z, atol=2e-5)
    np.testing.assert_allclose(
        model.get_latent_representation(batch_size=50, token_budget=300), z, atol=2e-5
    )
    idx = np.random.default_rng(0).permutation(adata.n_obs)[:31]
    np.testing.assert_allclose(model.get_latent_representation(indices=idx), z[idx], atol=2e-5)


def test_padded_and_packed_batches_give_the_same_loss(untrained):
    adata, model = untrained
    collate = model._collate(adata, training=True)
    loader = TokenDataLoader(model.adata_manager, collate, batch_size=30, seed=0)
    (seed, positions), packed = next(zip(loader.sampler, loader, strict=False))
    collate.packed = False
    padded = collate(loader.dataset[(seed, positions)])
    model.module.eval()
    losses = [model.module.token_loss(b).loss for b in (padded, packed)]
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)


def test_workers_give_the_same_losses():
    adata = synthetic(n_cells=96)
    SCMamba2.setup_anndata(adata, labels_key="cell_type")
    losses = []
    for workers in (0, 2):
        scvi.settings.seed = 0
        model = SCMamba2(adata, **TINY)
        model.train(
            max_epochs=2, batch_size=24, datasplitter_kwargs={"num_workers": workers}, **FAST
        )
        losses.append(model.history["train_loss"]["train_loss"].to_numpy())
    np.testing.assert_array_equal(losses[0], losses[1])


def test_typod_keywords_raise_at_the_call(untrained):
    adata, model = untrained
    with pytest.raises(TypeError, match=r"SCMamba2\(\).*'n_layer'.*'n_layers'.*valid ones"):
        SCMamba2(adata, n_layer=2)
    with pytest.raises(TypeError, match=r"build_module\(\).*'d_modle'.*'d_model'"):
        build_module(10, 0, 0, {"d_modle": 64})
    with pytest.raises(TypeError, match=r"plan_kwargs.*'lrr'.*'lr'"):
        model.train(max_steps=1, plan_kwargs={"lrr": 1}, **FAST)
    with pytest.raises(TypeError, match=r"'gep_weigth'"):
        model.train(max_steps=1, plan_kwargs={"gep_weigth": 1}, **FAST)
    assert not model.is_trained


def test_progress_bar_follows_the_argument_and_verbosity(untrained, capsys):
    _, model = untrained
    model.get_latent_representation(batch_size=10, progress_bar=False)
    quiet = capsys.readouterr()
    model.get_latent_representation(batch_size=10, progress_bar=True)
    shown = capsys.readouterr()
    assert "embedding" not in quiet.out + quiet.err
    assert "embedding" in shown.out + shown.err
    verbosity = scvi.settings.verbosity
    scvi.settings.verbosity = logging.WARNING
    try:
        model.get_latent_representation(batch_size=10)
    finally:
        scvi.settings.verbosity = verbosity
    default = capsys.readouterr()
    assert "embedding" not in default.out + default.err


def test_query_categories_unknown_to_the_reference_read_as_unknown(untrained):
    adata, model = untrained
    q = query(adata, list(adata.var_names))
    q.obs["cell_type"] = q.obs["cell_type"].cat.add_categories(["type9"])
    q.obs.iloc[:5, q.obs.columns.get_loc("cell_type")] = "type9"
    q.obs["batch"] = q.obs["batch"].cat.add_categories(["c"])
    q.obs.iloc[3:8, q.obs.columns.get_loc("batch")] = "c"
    qm = SCMamba2.load_query_data(q, model)
    loader = TokenDataLoader(qm.adata_manager, qm._collate(q, training=False), batch_size=200)
    batch = next(iter(loader))
    order = batch["obs_index"].numpy()
    labels = batch[REGISTRY_KEYS.LABELS_KEY].numpy()
    expect = [
        model.label_categories.index(t) if t in model.label_categories else -1
        for t in q.obs["cell_type"].astype(str).to_numpy()[order]
    ]
    np.testing.assert_array_equal(labels, expect)
    codes = batch[REGISTRY_KEYS.BATCH_KEY].numpy()
    expect = [model.batch_categories.index(b) if b != "c" else -1 for b in q.obs["batch"][order]]
    np.testing.assert_array_equal(codes, expect)
    qm.train(max_steps=1, batch_size=32, **FAST)  # fine-tuning reads the same codes


def test_reading_rows_raises_no_torch_sparse_warning():
    # torch warns once per process when a CSR tensor is built with its invariant checks off
    # implicitly: a fresh interpreter, so that no earlier test has used up the warning
    code = """
import warnings
from scipy import sparse
from helpers import TINY, synthetic
from scmamba2_scvi import SCMamba2
from scmamba2_scvi.data import TokenDataLoader
adata = synthetic(n_cells=30)
adata.X = sparse.csr_matrix(adata.X)
SCMamba2.setup_anndata(adata)
model = SCMamba2(adata, **TINY)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    collate = model._collate(adata, training=True)
    loader = TokenDataLoader(model.adata_manager, collate, batch_size=8)
    assert sum(len(b["obs_index"]) for b in loader) == 30
print("\\n".join(str(w.message) for w in caught))
"""
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=Path(__file__).parent,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "Sparse invariant checks" not in out
    assert "Sparse CSR tensor support is in beta" not in out
