"""SCMamba2 model: setup errors, training, latent, predict, save/load, transfer learning."""

import warnings

import numpy as np
import pytest
import torch
from scipy import sparse

from helpers import FAST, TINY, query, synthetic
from scmamba2_scvi import SCMamba2
from scmamba2_scvi.datasets import pbmc68k_counts

pytestmark = pytest.mark.usefixtures("quiet")  # warnings off (conftest)


@pytest.fixture(scope="module")
def trained():
    """A tiny model trained on the synthetic task (shared by several tests)."""
    torch.manual_seed(0)
    adata = synthetic()
    SCMamba2.setup_anndata(adata, labels_key="cell_type", batch_key="batch")
    model = SCMamba2(adata, **TINY)
    model.train(max_epochs=15, batch_size=48, plan_kwargs={"lr": 3e-3}, **FAST)
    return adata, model


# ---------------------------------------------------------------- setup_anndata errors
def test_setup_missing_layer_names_it():
    adata = synthetic()
    with pytest.raises(KeyError, match=r"'counts' is not in adata.layers"):
        SCMamba2.setup_anndata(adata, layer="counts")


def test_setup_unknown_obs_key():
    adata = synthetic()
    with pytest.raises(KeyError, match=r"'donor' is not a column of adata.obs"):
        SCMamba2.setup_anndata(adata, batch_key="donor")


def test_setup_rejects_normalised_data_and_says_what_to_do():
    adata = synthetic()
    adata.X = sparse.csr_matrix(np.log1p(adata.X.toarray()))
    before = adata.X.copy()
    with pytest.raises(ValueError, match=r"non-integer.*layer='counts'"):
        SCMamba2.setup_anndata(adata)
    assert (adata.X != before).nnz == 0  # the user's X is untouched
    SCMamba2.setup_anndata(adata, check_counts=False)  # the explicit opt-out works


def test_setup_rejects_nan_and_empty_cells():
    adata = synthetic()
    X = adata.X.toarray()
    X[3, 2] = np.nan
    adata.X = X
    with pytest.raises(ValueError, match="NaN"):
        SCMamba2.setup_anndata(adata)
    adata = synthetic()
    X = adata.X.toarray()
    X[5] = 0
    adata.X = sparse.csr_matrix(X)
    with pytest.raises(ValueError, match=r"1 cell.*no counts.*filter_cells"):
        SCMamba2.setup_anndata(adata)


def test_unknown_preset():
    adata = synthetic()
    SCMamba2.setup_anndata(adata)
    with pytest.raises(ValueError, match="Unknown preset"):
        SCMamba2(adata, preset="huge")


def test_mode_genes_refused_at_construction():
    adata = synthetic()
    SCMamba2.setup_anndata(adata)
    with pytest.raises(ValueError, match="mode 'expressed' or 'full'; got 'genes'"):
        SCMamba2(adata, mode="genes")


def test_presets_set_sizes_and_explicit_args_override():
    adata = synthetic(n_cells=30)
    SCMamba2.setup_anndata(adata)
    m = SCMamba2(adata, preset="cpu-small", n_layers=1)
    assert m.module.d_model == 128 and len(m.module.encoder.layers) == 1


# ---------------------------------------------------------------- training
def test_train_on_pbmc68k_records_history():
    adata = pbmc68k_counts()[:120].copy()
    SCMamba2.setup_anndata(adata, layer="counts", labels_key="bulk_labels")
    model = SCMamba2(adata, **TINY)
    model.train(max_epochs=2, batch_size=32, **FAST)
    for key in (
        "train_loss",
        "gep_train",
        "gepc_train",
        "masked_pearson_train",
        "accuracy_train",
        "validation_loss",
    ):
        assert key in model.history, key
    assert model.is_trained


def test_packed_training_logs_with_the_number_of_cells():
    """Packed minibatches are one row: Lightning must be told the cells, not guess 1 and warn."""
    adata = synthetic()
    SCMamba2.setup_anndata(adata)  # no labels, no batches: packed minibatches
    model = SCMamba2(adata, **TINY)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.train(max_epochs=1, batch_size=32, **FAST)
    messages = [str(w.message) for w in caught]
    assert not [m for m in messages if "ambiguous collection" in m], messages
    assert "validation_loss" in model.history


def test_loss_decreases_on_learnable_task(trained):
    _, model = trained
    loss = model.history["train_loss"]["train_loss"].to_numpy()
    assert loss[-1] < 0.7 * loss[0]
    pearson = model.history["masked_pearson_train"]["masked_pearson_train"].to_numpy()
    assert pearson[-1] > pearson[0]


def test_predict_is_accurate_on_easy_task(trained):
    adata, model = trained
    pred = model.predict()
    assert (pred == adata.obs["cell_type"].astype(str).to_numpy()).mean() > 0.9
    soft = model.predict(soft=True)
    assert list(soft.columns) == ["type0", "type1", "type2"]
    np.testing.assert_allclose(soft.sum(1), 1.0, rtol=1e-5)
    assert (soft.index == adata.obs_names).all()


def test_latent_shape_and_determinism(trained):
    adata, model = trained
    z1 = model.get_latent_representation()
    z2 = model.get_latent_representation(batch_size=17)
    assert z1.shape == (adata.n_obs, 32)
    np.testing.assert_allclose(z1, z2, rtol=1e-5, atol=1e-5)
    sub = model.get_latent_representation(indices=[5, 7])
    np.testing.assert_allclose(sub, z1[[5, 7]], rtol=1e-5, atol=1e-5)


def test_reconstructed_expression_tracks_markers(trained):
    adata, model = trained
    rec = model.get_reconstructed_expression(genes=["GENE0", "GENE15"], quantity="value")
    assert rec.shape == (adata.n_obs, 2)
    t0 = (adata.obs["cell_type"] == "type0").to_numpy()
    # GENE0 is a marker of type0: predicted higher there than elsewhere
    assert rec["GENE0"][t0].mean() > rec["GENE0"][~t0].mean()
    # the default is the hurdle head's expected value: P(expressed) x max(value if expressed, 0)
    p = model.get_reconstructed_expression(genes=["GENE0", "GENE15"], quantity="p_expressed")
    expected = model.get_reconstructed_expression(genes=["GENE0", "GENE15"])
    np.testing.assert_allclose(expected.to_numpy(), (p * rec.clip(lower=0)).to_numpy(), rtol=1e-5)
    assert ((p.to_numpy() > 0) & (p.to_numpy() < 1)).all()
    with pytest.raises(KeyError, match=r"not in adata.var_names"):
        model.get_reconstructed_expression(genes=["NOPE"])


def test_save_load_identical_embeddings(trained, tmp_path):
    adata, model = trained
    model.save(tmp_path / "m", save_anndata=False)
    loaded = SCMamba2.load(tmp_path / "m", adata=adata)
    np.testing.assert_allclose(
        loaded.get_latent_representation(), model.get_latent_representation(), atol=1e-6
    )
    assert loaded.label_categories == model.label_categories
    assert loaded.vocab == model.vocab


# ---------------------------------------------------------------- transfer learning
def test_transfer_gene_subset_and_permutation(trained, tmp_path):
    adata, model = trained
    rng = np.random.default_rng(1)
    full = model.get_latent_representation()
    perm = query(adata, list(adata.var_names[rng.permutation(adata.n_vars)]))
    q = SCMamba2.load_query_data(perm, model)
    # the same genes in another order give the same embedding (vocabulary order is used)
    np.testing.assert_allclose(q.get_latent_representation(), full, atol=1e-5)
    assert q.gene_report_.matched_fraction == 1.0
    # a subset maps (coverage < 1) and still embeds
    sub = query(adata, list(adata.var_names[:45]))
    model.save(tmp_path / "ref", save_anndata=False)
    q2 = SCMamba2.load_query_data(sub, tmp_path / "ref")
    assert q2.get_latent_representation().shape == (adata.n_obs, 32)
    # and the vocabulary is the reference's, not the query's
    assert len(q2.vocab) == len(model.vocab)


def test_transfer_symbols_vs_ensembl_ids(trained):
    adata, model = trained
    q = query(adata, list(adata.var_names))
    q.var_names = q.var["gene_id"].to_numpy()  # query keyed by Ensembl IDs (with versions)
    q.var_names = [f"{g}.3" for g in q.var_names]
    q.var = q.var.drop(columns=["gene_symbol"])
    q.var["gene_name"] = adata.var["gene_symbol"].to_numpy()
    qm = SCMamba2.load_query_data(q, model)
    np.testing.assert_allclose(
        qm.get_latent_representation(), model.get_latent_representation(), atol=1e-5
    )


def test_transfer_too_little_overlap_errors(trained):
    adata, model = trained
    q = query(adata, list(adata.var_names[:10]))
    q.var_names = [f"UNRELATED{i}" for i in range(10)]
    q.var = q.var.drop(columns=["gene_symbol", "gene_id"])
    with pytest.raises(ValueError, match="match"):
        SCMamba2.load_query_data(q, model)


def test_sequence_lengths_count_expressed_vocabulary_genes_up_to_max_len():
    adata = synthetic()
    SCMamba2.setup_anndata(adata)
    model = SCMamba2(adata, **{**TINY, "max_len": 30})
    expressed = np.asarray((adata.X > 0).sum(1)).ravel()
    assert (expressed + 1 > 30).any() and (expressed + 1 < 30).any()  # both sides of the cap
    np.testing.assert_array_equal(model.sequence_lengths(), np.minimum(expressed + 1, 30))
    np.testing.assert_array_equal(
        model.sequence_lengths(indices=[9, 2]), np.minimum(expressed[[9, 2]] + 1, 30)
    )
    # another AnnData: only its genes count, in any order
    genes = list(adata.var_names[40:0:-1])
    other = query(adata, genes)
    sub = np.asarray((other.X > 0).sum(1)).ravel()
    np.testing.assert_array_equal(
        model.sequence_lengths(other, min_gene_fraction=0.1), np.minimum(sub + 1, 30)
    )
    full = SCMamba2(adata, **{**TINY, "max_len": None}, mode="full")
    np.testing.assert_array_equal(full.sequence_lengths(), np.full(adata.n_obs, 61))


def test_get_latent_on_other_adata_without_setup(trained):
    adata, model = trained
    other = query(adata, list(adata.var_names[::-1]))
    np.testing.assert_allclose(
        model.get_latent_representation(other), model.get_latent_representation(), atol=1e-5
    )


def test_finetune_after_transfer_keeps_label_space(trained):
    adata, model = trained
    q = query(adata, list(adata.var_names[:50]))
    qm = SCMamba2.load_query_data(q, model)
    qm.train(max_steps=2, batch_size=64, **FAST)
    assert qm.label_categories == model.label_categories
    assert set(qm.predict()) <= set(model.label_categories)


def test_dsbn_and_dar_train(trained):
    adata, _ = trained
    adata = adata.copy()
    SCMamba2.setup_anndata(adata, batch_key="batch")
    model = SCMamba2(adata, dsbn=True, **TINY)
    model.train(
        max_steps=3, batch_size=64, plan_kwargs={"dar_weight": 1.0, "ecs_weight": 0.5}, **FAST
    )
    assert "dar_train" in model.history and "ecs_train" in model.history
    assert len(model.module.token_norm.norms) == 2
    # cells of an unknown batch are embedded with averaged statistics
    other = adata.copy()
    other.obs["batch"] = "new"
    z = model.get_latent_representation(other)
    assert np.isfinite(z).all()


def test_precision_bf16_embeddings_close_to_fp32(trained):
    _, model = trained
    adata = synthetic()
    SCMamba2.setup_anndata(adata, labels_key="cell_type", batch_key="batch")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bf16 = SCMamba2(adata, vocab=model.vocab, **{**TINY, "precision": "bf16"})
    bf16.module.load_state_dict(model.module.state_dict())
    bf16.is_trained_ = True
    z32 = model.get_latent_representation(adata, progress_bar=False)
    z16 = bf16.get_latent_representation(progress_bar=False)
    assert not np.array_equal(z32, z16)  # bf16 really ran
    rel = np.linalg.norm(z16 - z32) / np.linalg.norm(z32)
    assert rel < 3e-2
    with pytest.raises(ValueError, match="precision must be"):
        SCMamba2(adata, **{**TINY, "precision": "fp16"})


# ---------------------------------------------------------------- gene embeddings from PCA
def test_init_gene_embedding_writes_scaled_vectors_and_leaves_other_rows():
    adata = synthetic()
    SCMamba2.setup_anndata(adata)
    module = SCMamba2(adata, **TINY).module
    before = module.gene_embedding.weight.detach().clone()
    tokens = torch.tensor([5, 7, 9])
    vectors = torch.tensor([[3.0, 0.0], [0.0, 4.0], [1.0, 1.0]])
    module.init_gene_embedding(tokens, vectors, noise=0.0)
    after = module.gene_embedding.weight.detach()
    rms = vectors.pow(2).mean().sqrt()
    torch.testing.assert_close(after[tokens, :2], vectors / rms)
    assert after[tokens, 2:].abs().max() == 0
    others = torch.ones(len(after), dtype=torch.bool)
    others[tokens] = False
    torch.testing.assert_close(after[others], before[others])
    with pytest.raises(ValueError, match="vectors"):
        module.init_gene_embedding(tokens, torch.ones(3, 33))


def _spy_gene_init(model, monkeypatch):
    calls = []
    original = model.module.init_gene_embedding
    monkeypatch.setattr(
        model.module, "init_gene_embedding", lambda *a, **k: calls.append(a) or original(*a, **k)
    )
    return calls


def test_new_model_starts_from_its_data_principal_components(monkeypatch):
    from scmamba2_scvi.data import gene_loadings

    adata = synthetic()
    adata.layers["counts"] = adata.X.copy()
    adata.X = sparse.csr_matrix(adata.shape, dtype=np.float32)  # the layer is what counts
    SCMamba2.setup_anndata(adata, layer="counts", labels_key="cell_type")
    model = SCMamba2(adata, **TINY)
    calls = _spy_gene_init(model, monkeypatch)
    model.train(max_steps=1, **FAST)
    ((tokens, loadings),) = calls
    expected = gene_loadings(adata.layers["counts"], 32, seed=0)
    np.testing.assert_allclose(loadings.numpy(), expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(tokens.numpy(), [model.vocab[g] for g in adata.var["gene_id"]])
    assert adata.X.nnz == 0  # adata untouched
    model.train(max_steps=1, **FAST)  # trained now: the weights stay
    assert len(calls) == 1


def test_loaded_queried_or_random_models_keep_their_weights(trained, tmp_path, monkeypatch):
    adata, model = trained
    model.save(tmp_path / "m", save_anndata=False)
    loaded = SCMamba2.load(tmp_path / "m", adata=adata)
    q = SCMamba2.load_query_data(query(adata, list(adata.var_names)), model)
    fresh = synthetic()
    SCMamba2.setup_anndata(fresh)
    random = SCMamba2(fresh, gene_init="random", **TINY)
    for m in (loaded, q, random):
        calls = _spy_gene_init(m, monkeypatch)
        m.train(max_steps=1, **FAST)
        assert calls == []
    with pytest.raises(ValueError, match="gene_init must be 'pca' or 'random'"):
        SCMamba2(fresh, gene_init="gene2vec", **TINY)
