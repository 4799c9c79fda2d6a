"""scanpy-style tools write exactly their documented keys; plots; the CLI end to end."""

import json

import matplotlib
import numpy as np
import pytest
import torch

matplotlib.use("Agg")

from scmamba2_scvi import SCMamba2, cli, pl, tl
from scmamba2_scvi.datasets import pbmc68k_counts

TINY = {
    "preset": "cpu-small",
    "d_model": 32,
    "n_layers": 1,
    "d_state": 8,
    "head_dim": 16,
    "max_len": 64,
}


pytestmark = pytest.mark.usefixtures("quiet")  # warnings off (conftest)


@pytest.fixture(scope="module")
def fitted():
    torch.manual_seed(0)
    adata = pbmc68k_counts()[:150].copy()
    SCMamba2.setup_anndata(adata, layer="counts", labels_key="bulk_labels")
    model = SCMamba2(adata, **TINY)
    model.train(max_epochs=2, batch_size=50, accelerator="cpu", enable_progress_bar=False)
    return adata, model


def keys(adata):
    return {
        "obs": set(adata.obs.columns),
        "obsm": set(adata.obsm),
        "layers": set(adata.layers),
        "uns": set(adata.uns),
        "obsp": set(adata.obsp),
        "varm": set(adata.varm),
        "X": adata.X.copy(),
    }


def added(before, after):
    out = {k: after[k] - before[k] for k in before if k != "X"}
    assert (after["X"] != before["X"]).nnz == 0, "X was modified"
    return {k: v for k, v in out.items() if v}


def fresh(adata):
    a = adata.copy()
    a.obs = a.obs.drop(columns=["_scvi_labels", "_scvi_batch"], errors="ignore")
    a.uns.pop("_scvi_uuid", None)
    a.uns.pop("_scvi_manager_uuid", None)
    return a


def test_embed_writes_only_its_key_and_honours_copy(fitted):
    adata, model = fitted
    a = fresh(adata)
    before = keys(a)
    assert tl.embed(a, model, key_added="Z") is None
    assert added(before, keys(a)) == {"obsm": {"Z"}}
    assert a.obsm["Z"].shape == (a.n_obs, 32)
    b = fresh(adata)
    before = keys(b)
    out = tl.embed(b, model, copy=True)
    assert "X_scmamba2" in out.obsm and added(before, keys(b)) == {}


def test_annotate_writes_label_confidence_probabilities(fitted):
    adata, model = fitted
    a = fresh(adata)
    before = keys(a)
    tl.annotate(a, model)
    assert added(before, keys(a)) == {
        "obs": {"scmamba2_label", "scmamba2_label_confidence"},
        "obsm": {"scmamba2_label_probabilities"},
    }
    probs = a.obsm["scmamba2_label_probabilities"]
    np.testing.assert_allclose(probs.sum(1), 1, rtol=1e-5)
    np.testing.assert_allclose(a.obs["scmamba2_label_confidence"], probs.max(1), rtol=1e-6)
    assert list(a.obs["scmamba2_label"].cat.categories) == model.label_categories
    out = tl.annotate(fresh(adata), model, key_added="lab", copy=True)
    assert "lab" in out.obs and "lab_probabilities" in out.obsm


def test_reconstruct_writes_layer(fitted):
    adata, model = fitted
    a = fresh(adata)
    before = keys(a)
    tl.reconstruct(a, model)
    assert added(before, keys(a)) == {"layers": {"scmamba2_reconstructed"}}
    rec = a.layers["scmamba2_reconstructed"]
    assert rec.shape == a.shape and np.isfinite(rec).all()  # every gene is in the vocabulary


def test_pseudotime_keys_and_root_forms(fitted):
    adata, model = fitted
    a = fresh(adata)
    tl.embed(a, model)
    before = keys(a)
    tl.pseudotime(a, root=0)
    assert added(before, keys(a)) == {
        "obs": {"scmamba2_pseudotime"},
        "uns": {"scmamba2_pseudotime"},
    }
    pt = a.obs["scmamba2_pseudotime"].to_numpy()
    assert pt[0] == 0 and np.nanmax(pt[np.isfinite(pt)]) <= 1
    # the root as a cell name, and as a category with PAGA
    b = tl.pseudotime(a, root=a.obs_names[3], copy=True)
    assert b.obs["scmamba2_pseudotime"].iloc[3] == 0
    before = keys(a)
    tl.pseudotime(a, root="CD14+ Monocyte", groups="bulk_labels", key_added="pt")
    assert added(before, keys(a)) == {"obs": {"pt"}, "uns": {"pt", "paga", "bulk_labels_sizes"}}
    root = a.uns["pt"]["root"]
    assert a.obs["bulk_labels"].iloc[root] == "CD14+ Monocyte"
    with pytest.raises(KeyError, match="X_nothing"):
        tl.pseudotime(a, use_rep="X_nothing", root=0)


def test_plots_save_files(fitted, tmp_path):
    adata, model = fitted
    a = fresh(adata)
    tl.embed(a, model)
    tl.annotate(a, model)
    before = keys(a)
    pl.history(model, save=tmp_path / "h.png")
    pl.confusion(a, "bulk_labels", "scmamba2_label", save=tmp_path / "c.png")
    pl.umap(a, color="bulk_labels", save=tmp_path / "u.png")
    for name in ("h.png", "c.png", "u.png"):
        assert (tmp_path / name).stat().st_size > 5000
    assert added(before, keys(a)) == {}  # plotting writes nothing into adata


def test_plots_honour_ax_show_save(fitted, tmp_path, monkeypatch):
    import matplotlib.pyplot as plt
    import scanpy as sc

    adata, model = fitted
    a = fresh(adata)
    tl.embed(a, model)
    tl.annotate(a, model)
    fig, (left, right) = plt.subplots(1, 2)
    assert pl.confusion(a, "bulk_labels", "scmamba2_label", ax=left, show=False) is left
    assert left.images  # drawn into the given axes
    assert pl.umap(a, color="bulk_labels", ax=right, show=False) is right
    assert right.collections and right.figure is fig
    panels = plt.subplots(1, 2)[1]
    assert pl.history(model, ["loss", "gep"], ax=panels, show=False) == list(panels)
    with pytest.raises(ValueError, match="2 axes for 1 metrics"):
        pl.history(model, ["loss"], ax=panels)
    shown = []
    monkeypatch.setattr(plt, "show", lambda: shown.append(1))
    assert pl.confusion(a, "bulk_labels", "scmamba2_label", show=True) is None
    assert shown == [1]
    assert isinstance(
        pl.confusion(a, "bulk_labels", "scmamba2_label", save=tmp_path / "c.png"),
        matplotlib.axes.Axes,
    )  # a saved figure is not shown by default
    assert shown == [1]
    figdir = sc.settings.figdir
    sc.settings.figdir = tmp_path / "figures"
    try:
        pl.history(model, save=True, show=False)  # scanpy's convention: a file in figdir
    finally:
        sc.settings.figdir = figdir
    assert (tmp_path / "figures" / f"scmamba2_history.{sc.settings.file_format_figs}").exists()
    plt.close("all")


def test_umap_reuses_the_graph_and_umap_already_in_adata(fitted, monkeypatch):
    import matplotlib.pyplot as plt
    import scanpy as sc

    adata, model = fitted
    a = fresh(adata)
    tl.embed(a, model)
    calls = {"neighbors": 0, "umap": 0}
    real = {"neighbors": sc.pp.neighbors, "umap": sc.tl.umap}

    def counting(name):
        def run(*args, **kwargs):
            calls[name] += 1
            return real[name](*args, **kwargs)

        return run

    monkeypatch.setattr(sc.pp, "neighbors", counting("neighbors"))
    monkeypatch.setattr(sc.tl, "umap", counting("umap"))
    start = keys(a)  # pbmc68k's own X_umap is there, but no graph on X_scmamba2
    pl.umap(a, color="bulk_labels", show=False)  # nothing to reuse: computed for the plot
    assert calls == {"neighbors": 1, "umap": 1}
    assert added(start, keys(a)) == {}

    real["neighbors"](a, use_rep="X_scmamba2", key_added="scm")  # a graph, under any key
    pl.umap(a, color="bulk_labels", show=False)
    assert calls == {"neighbors": 1, "umap": 2}  # the graph is reused, the UMAP is not there
    pl.umap(a, color="bulk_labels", n_neighbors=5, show=False)  # another graph: recomputed
    assert calls == {"neighbors": 2, "umap": 3}

    real["neighbors"](a, use_rep="X_scmamba2")
    real["umap"](a, random_state=3)
    before = keys(a)
    ax = pl.umap(a, color="bulk_labels", show=False)
    assert calls == {"neighbors": 2, "umap": 3}  # nothing recomputed
    points = np.concatenate([c.get_offsets() for c in ax.collections])
    np.testing.assert_allclose(
        np.sort(points, axis=0), np.sort(np.asarray(a.obsm["X_umap"]), axis=0), rtol=1e-6
    )  # the plot shows adata's UMAP
    assert added(before, keys(a)) == {}
    plt.close("all")


def test_cli_help_for_every_subcommand(capsys):
    for sub in ("demo", "pretrain", "finetune", "embed", "annotate"):
        with pytest.raises(SystemExit) as e:
            cli.main([sub, "--help"])
        assert e.value.code == 0
        assert "usage: scmamba2" in capsys.readouterr().out


def test_cli_demo_end_to_end_reduced(tmp_path, capsys):
    out = tmp_path / "demo"
    code = cli.main(
        [
            "demo",
            "--out",
            str(out),
            "--epochs",
            "1",
            "--max-len",
            "64",
            "--preset",
            "cpu-small",
            "--accelerator",
            "cpu",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "SCMamba2" in printed and "LogReg on PCA" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    for method in ("SCMamba2", "LogReg on PCA"):
        assert 0 <= metrics["metrics"][method]["accuracy"] <= 1
    assert metrics["n_train"] == 560 and metrics["n_test"] == 140
    for name in ("umap.png", "confusion.png", "training.png", "pbmc68k_scmamba2.h5ad"):
        assert (out / name).exists(), name
    import anndata as ad

    res = ad.read_h5ad(out / "pbmc68k_scmamba2.h5ad")
    assert "X_scmamba2" in res.obsm and "scmamba2_label" in res.obs
    assert (res.obs["split"] == "test").sum() == 140


def test_cli_pretrain_embed_annotate_finetune(tmp_path, capsys):
    adata = pbmc68k_counts()[:120].copy()
    path = tmp_path / "cells.h5ad"
    adata.write_h5ad(path)
    model_dir = tmp_path / "pre"
    code = cli.main(
        [
            "pretrain",
            str(path),
            "--out",
            str(model_dir),
            "--epochs",
            "1",
            "--max-len",
            "32",
            "--layer",
            "counts",
            "--accelerator",
            "cpu",
        ]
    )
    assert code == 0
    assert (model_dir / "model" / "model.pt").exists()
    assert (model_dir / "checkpoints" / "step=00000002.ckpt").exists()  # 120 cells / 64
    ft_dir = tmp_path / "ft"
    finetune = ["finetune", str(path), "--model", str(model_dir), "--out", str(ft_dir)]
    assert cli.main([*finetune, "--labels-key", "cell_type", "--epochs", "1"]) == 1
    assert "--labels-key 'cell_type' is not in obs" in capsys.readouterr().err
    # the pretrained backbone gets a new classifier head for the query's labels
    assert cli.main([*finetune, "--labels-key", "bulk_labels", "--epochs", "1"]) == 0
    labelled = tmp_path / "labelled.h5ad"
    annotate = ["annotate", str(path), "--model", str(ft_dir), "--output", str(labelled)]
    assert cli.main(annotate) == 0
    import anndata as ad

    predicted = ad.read_h5ad(labelled).obs["scmamba2_label"]
    assert set(predicted) <= set(adata.obs["bulk_labels"].astype(str))
    emb = tmp_path / "emb.h5ad"
    assert cli.main(["embed", str(path), "--model", str(model_dir), "--output", str(emb)]) == 0
    assert ad.read_h5ad(emb).obsm["X_scmamba2"].shape == (120, 128)
    missing = ["embed", str(tmp_path / "missing.h5ad"), "--model", str(model_dir)]
    capsys.readouterr()
    assert cli.main([*missing, "--output", str(emb)]) == 1
    assert "does not exist" in capsys.readouterr().err
