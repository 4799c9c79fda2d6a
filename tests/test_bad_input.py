"""Every bad input gets a clear error: a table of cases for the API and the CLI.

Plus the behaviours behind them: coverage measured on both sides, IDs used whatever
``gene_key`` names, embeddings independent of column order and batch composition, duplicated
genes summed, checksummed saves.
"""

import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
from scipy import sparse

import helpers
from helpers import FAST
from scmamba2_scvi import SCMamba2, tl
from scmamba2_scvi.data import GeneVocab

SRC = Path(__file__).resolve().parents[1] / "src"
N_GENES = 200
TINY = {**helpers.TINY, "max_len": 32}


def make_data(n_cells=90, n_genes=N_GENES, seed=0):
    """Counts of three cell types with Ensembl IDs as var_names and a symbol column.

    About 80 genes are expressed per cell, more than the model's ``max_len - 1 = 31``.
    """
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(3), n_cells // 3)
    rate = np.full((n_cells, n_genes), 0.5)
    for t in range(3):
        rate[labels == t, t * 10 : (t + 1) * 10] = 6.0
    counts = rng.poisson(rate).astype(np.float32)
    var = pd.DataFrame(
        {"gene_symbol": [f"GENE{i}" for i in range(n_genes)]},
        index=[f"ENSG{i:011d}" for i in range(n_genes)],
    )
    obs = pd.DataFrame(
        {
            "cell_type": pd.Categorical([f"type{t}" for t in labels]),
            "batch": pd.Categorical(rng.choice(["a", "b"], n_cells)),
        },
        index=[f"cell{i}" for i in range(n_cells)],
    )
    return ad.AnnData(sparse.csr_matrix(counts), obs=obs, var=var)


pytestmark = pytest.mark.usefixtures("quiet")  # warnings off (conftest)


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    torch.manual_seed(0)
    adata = make_data()
    SCMamba2.setup_anndata(adata, batch_key="batch", labels_key="cell_type")
    model = SCMamba2(adata, **TINY)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.train(max_epochs=1, batch_size=45, **FAST)
    root = tmp_path_factory.mktemp("bad_input")
    saved = root / "saved"
    model.save(saved, save_anndata=False)

    def saved_copy():
        dest = Path(tmp_path_factory.mktemp("copy")) / "model"
        shutil.copytree(saved, dest)
        return dest

    return SimpleNamespace(
        adata=adata, model=model, saved=saved, saved_copy=saved_copy, root=root, data=make_data
    )


def query_60(c):
    """A query holding 60 of the model's 200 genes (and nothing else)."""
    return make_data(seed=1)[:, 100:160].copy()


def damaged(c, how):
    folder = c.saved_copy()
    path = folder / "model.pt"
    data = bytearray(path.read_bytes())
    if how == "empty":
        data = b""
    elif how == "truncated":
        data = data[: len(data) // 2]
    elif how == "random":
        data = np.random.default_rng(0).integers(0, 256, len(data), dtype=np.uint8).tobytes()
    else:  # 64 flipped bytes in the middle: still a valid archive
        mid = len(data) // 2
        data[mid : mid + 64] = bytes(b ^ 0xFF for b in data[mid : mid + 64])
    path.write_bytes(bytes(data))
    return SCMamba2.load(folder, c.adata, accelerator="cpu")


def with_obs(c, column, values):
    a = c.data()
    a.obs[column] = values
    return a


def _nan_labels(c):
    a = c.data()
    a.obs["cell_type"] = a.obs["cell_type"].astype(object)
    a.obs.iloc[:3, a.obs.columns.get_loc("cell_type")] = np.nan
    return a


def _nan_batch(c):
    a = c.data()
    a.obs["batch"] = a.obs["batch"].astype(object)
    a.obs.iloc[5, a.obs.columns.get_loc("batch")] = np.nan
    return a


def _dense_with(c, value, row=0):
    a = c.data()
    X = a.X.toarray()
    if row is None:
        X[0, 0] = value
    else:
        X[row] = value
    a.X = sparse.csr_matrix(X)
    return a


def setup(a, **kwargs):
    SCMamba2.setup_anndata(a, **kwargs)
    return a


def model_on(a):
    return SCMamba2(a, **TINY)


# (id, action, exception, words that must be in the message, status: "worked" / "fixed")
API_CASES = [
    # setup_anndata: these already gave clear errors
    ("non-counts", lambda c: setup(_dense_with(c, 0.5, None)), ValueError, ["integer"], "worked"),
    ("nan-counts", lambda c: setup(_dense_with(c, np.nan, None)), ValueError, ["NaN"], "worked"),
    ("negative", lambda c: setup(_dense_with(c, -1.0, None)), ValueError, ["negative"], "worked"),
    ("empty-cell", lambda c: setup(_dense_with(c, 0.0)), ValueError, ["no counts"], "worked"),
    ("missing-layer", lambda c: setup(c.data(), layer="nope"), KeyError, ["nope", "layers"],
     "worked"),
    ("missing-batch-key", lambda c: setup(c.data(), batch_key="nope"), KeyError,
     ["nope", "obs"], "worked"),
    ("missing-labels-key", lambda c: setup(c.data(), labels_key="nope"), KeyError,
     ["nope", "obs"], "worked"),
    ("missing-gene-key", lambda c: setup(c.data(), gene_key="nope"), KeyError, ["nope", "var"],
     "worked"),
    # labels and batches
    ("nan-labels", lambda c: setup(_nan_labels(c), labels_key="cell_type"), ValueError,
     ["NaN", "labels_key", "Fill", "Unknown"], "fixed"),
    ("nan-batch", lambda c: setup(_nan_batch(c), batch_key="batch"), ValueError,
     ["NaN", "batch_key", "Fill"], "fixed"),
    ("all-unlabeled",
     lambda c: model_on(setup(with_obs(c, "lab", "Unknown"), labels_key="lab")),
     ValueError, ["unlabeled category", "Unknown"], "fixed"),
    ("one-label-class",
     lambda c: model_on(setup(with_obs(c, "lab", "T"), labels_key="lab")),
     UserWarning, ["one label class"], "fixed"),
    # train / inference arguments
    ("train-max-epochs-0", lambda c: c.model.train(max_epochs=0, **FAST), ValueError,
     ["max_epochs"], "fixed"),
    ("train-max-epochs-neg", lambda c: c.model.train(max_epochs=-1, **FAST), ValueError,
     ["max_epochs"], "fixed"),
    ("train-max-steps-0", lambda c: c.model.train(max_steps=0, **FAST), ValueError,
     ["max_steps"], "fixed"),
    ("train-batch-size-0", lambda c: c.model.train(batch_size=0, **FAST), ValueError,
     ["batch_size"], "fixed"),
    ("train-lr-neg", lambda c: c.model.train(plan_kwargs={"lr": -1.0}, **FAST), ValueError,
     ["lr"], "fixed"),
    ("latent-batch-size-neg", lambda c: c.model.get_latent_representation(batch_size=-3),
     ValueError, ["batch_size"], "fixed"),
    ("predict-batch-size-0", lambda c: c.model.predict(batch_size=0), ValueError,
     ["batch_size"], "fixed"),
    # coverage: 60 of 200 vocabulary genes
    ("latent-60-of-200", lambda c: c.model.get_latent_representation(query_60(c)), ValueError,
     ["60 of the vocabulary's 200", "min_gene_fraction"], "fixed"),
    ("predict-60-of-200", lambda c: c.model.predict(query_60(c)), ValueError,
     ["60 of the vocabulary's 200", "min_gene_fraction"], "fixed"),
    ("reconstruct-60-of-200", lambda c: c.model.get_reconstructed_expression(query_60(c)),
     ValueError, ["60 of the vocabulary's 200"], "fixed"),
    ("tl-embed-60-of-200", lambda c: tl.embed(query_60(c), c.model), ValueError,
     ["60 of the vocabulary's 200"], "fixed"),
    ("tl-embed-threshold", lambda c: tl.embed(c.adata.copy(), c.model, min_gene_fraction=1.01),
     ValueError, ["min_gene_fraction=1.01"], "fixed"),
    ("query-60-of-200", lambda c: SCMamba2.load_query_data(query_60(c), c.model), ValueError,
     ["60 of the vocabulary's 200"], "fixed"),
    # save / load
    ("load-missing-folder", lambda c: SCMamba2.load(c.root / "nope", c.adata), FileNotFoundError,
     ["folder", "nope", "does not exist"], "fixed"),
    ("query-missing-folder", lambda c: SCMamba2.load_query_data(c.data(), c.root / "nope"),
     FileNotFoundError, ["folder", "does not exist"], "fixed"),
    ("load-empty", lambda c: damaged(c, "empty"), ValueError, ["model.pt", "empty"], "fixed"),
    ("load-truncated", lambda c: damaged(c, "truncated"), ValueError,
     ["model.pt", "truncated"], "fixed"),
    ("load-random-bytes", lambda c: damaged(c, "random"), ValueError,
     ["model.pt", "corrupt"], "fixed"),
    ("load-flipped-bytes", lambda c: damaged(c, "flipped"), ValueError,
     ["model.pt", "checksum"], "fixed"),
    ("load-other-genes", lambda c: SCMamba2.load(c.saved, query_60(c), accelerator="cpu"),
     ValueError, ["load_query_data", "from_pretrained"], "fixed"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("action", "exc", "words"), [pytest.param(*case[1:4], id=case[0]) for case in API_CASES]
)
def test_bad_input_api(ctx, action, exc, words):
    if issubclass(exc, Warning):
        with pytest.warns(exc) as record:
            action(ctx)
        message = " ".join(str(w.message) for w in record if issubclass(w.category, exc))
    else:
        with pytest.raises(exc) as info:
            action(ctx)
        message = str(info.value.args[0]) if info.value.args else ""
    for word in words:
        assert word in message, (word, message)


def test_failed_setup_leaves_no_registry_columns(ctx, monkeypatch):
    from scvi.data.fields import LabelsWithUnlabeledObsField

    a = ctx.data()
    before_obs, before_uns = list(a.obs.columns), set(a.uns)
    with pytest.raises(ValueError, match="NaN"):
        SCMamba2.setup_anndata(_nan_labels(ctx), batch_key="batch", labels_key="cell_type")

    def boom(self, adata):
        raise RuntimeError("registration failed")

    monkeypatch.setattr(LabelsWithUnlabeledObsField, "register_field", boom)
    with pytest.raises(RuntimeError, match="registration failed"):
        SCMamba2.setup_anndata(a, batch_key="batch", labels_key="cell_type")
    assert list(a.obs.columns) == before_obs and set(a.uns) == before_uns  # _scvi_batch gone


def test_is_trained_only_after_a_step(ctx):
    a = setup(ctx.data(), labels_key="cell_type")
    model = SCMamba2(a, **TINY)
    model.train(max_epochs=1, limit_train_batches=0, **FAST)
    assert not model.is_trained_
    with pytest.raises(ValueError, match="max_steps"):
        model.train(max_steps=-3, **FAST)
    assert not model.is_trained_


# ---------------------------------------------------------------- coverage, both sides
def test_superset_query_is_accepted_and_embeds_identically(ctx):
    extra = make_data(seed=2, n_genes=565)
    extra.var = pd.DataFrame(index=[f"OTHER{i}" for i in range(565)])
    sup = ad.concat([ctx.adata, extra], axis=1, merge="first")
    sup.obs = ctx.adata.obs.copy()
    z = ctx.model.get_latent_representation(sup)
    np.testing.assert_allclose(z, ctx.model.get_latent_representation(), atol=1e-5)
    report = ctx.model.vocab.map(sup, min_fraction=0.0, warn_fraction=0.0, return_report=True)[1]
    assert report.n_matched == 200 and report.n_genes == 765 and report.coverage == 1.0
    assert "200/200 vocabulary genes present" in str(report)


def test_threshold_can_be_lowered_where_the_check_happens(ctx):
    q = query_60(ctx)
    report = ctx.model.vocab.map(q, min_fraction=0.0, warn_fraction=0.0, return_report=True)[1]
    assert report.matched_fraction == 1.0 and report.n_vocab_present == 60
    assert report.coverage_weighted  # the vocabulary records training expression
    freq = ctx.model.vocab.expression_frequency
    expected = freq[100:160].sum() / freq.sum()  # weighted by how often each gene is expressed
    assert report.coverage == pytest.approx(expected)
    assert ctx.model.get_latent_representation(q, min_gene_fraction=0.1).shape == (90, 32)
    assert tl.embed(q, ctx.model, min_gene_fraction=0.1, copy=True).obsm["X_scmamba2"].shape
    assert ctx.model.predict(q, min_gene_fraction=0.1).shape == (90,)


def test_vocab_round_trip_keeps_frequencies_and_reads_old_dicts(ctx):
    vocab = ctx.model.vocab
    again = GeneVocab.from_dict(vocab.to_dict())
    np.testing.assert_array_equal(again.expression_frequency, vocab.expression_frequency)
    old = {k: v for k, v in vocab.to_dict().items() if k != "expression_frequency"}
    legacy = GeneVocab.from_dict(old)
    assert legacy.expression_frequency is None and legacy.gene_keys == vocab.gene_keys
    report = legacy.map(query_60(ctx), min_fraction=0.0, warn_fraction=0.0, return_report=True)[1]
    assert report.coverage == pytest.approx(60 / 200) and not report.coverage_weighted


# ---------------------------------------------------------------- IDs whatever gene_key says
@pytest.mark.parametrize("version", ["", ".7"])
def test_ids_kept_when_gene_key_names_symbols(ctx, version):
    vocab = GeneVocab.from_anndata(ctx.adata, gene_key="gene_symbol")
    assert vocab.gene_keys[:2] == ["ENSG00000000000", "ENSG00000000001"]
    assert vocab.symbols[:2] == ["GENE0", "GENE1"]
    query = [f"ENSG{i:011d}{version}" for i in range(N_GENES)][::-1]
    np.testing.assert_array_equal(
        vocab.map(query), [vocab[f"ENSG{i:011d}"] for i in range(N_GENES)][::-1]
    )
    np.testing.assert_array_equal(vocab.map([f"gene{i}" for i in range(3)]), [3, 4, 5])


def test_model_set_up_on_symbols_embeds_an_id_query(ctx):
    a = setup(ctx.data(), gene_key="gene_symbol")
    model = SCMamba2(a, **TINY)
    q = ctx.data()
    q.var = pd.DataFrame(index=[f"{g}.3" for g in q.var_names])  # versioned IDs, no symbols
    np.testing.assert_allclose(
        model.get_latent_representation(q), model.get_latent_representation(), atol=1e-5
    )


# ---------------------------------------------------------------- order and duplicates
def test_embeddings_independent_of_column_order_and_batch(ctx):
    model, a = ctx.model, ctx.adata
    assert (np.diff(a.X.indptr) > TINY["max_len"] - 1).all()  # every cell is subsampled
    z = model.get_latent_representation()
    perm = np.random.default_rng(3).permutation(a.n_vars)
    permuted = a[:, perm].copy()
    np.testing.assert_allclose(model.get_latent_representation(permuted), z, atol=1e-5)
    subset = [17, 3, 60]
    np.testing.assert_allclose(
        model.get_latent_representation(indices=subset, batch_size=2), z[subset], atol=1e-5
    )


def test_duplicated_genes_are_summed_with_a_warning(ctx):
    model, a = ctx.model, ctx.adata
    X = a.X.toarray()
    z = model.get_latent_representation()
    # gene 5 split over two columns of the same name, and an all-zero copy of gene 0 first
    half = np.floor(X[:, 5] / 2)
    cols = np.column_stack([np.zeros(a.n_obs), X[:, :5], half, X[:, 5] - half, X[:, 6:]])
    names = ["ENSG00000000000", *a.var_names[:6], *a.var_names[5:]]
    dup = ad.AnnData(sparse.csr_matrix(cols.astype(np.float32)), obs=a.obs.copy())
    dup.var_names = names
    with pytest.warns(UserWarning, match="summed into one token"):
        zd = model.get_latent_representation(dup)
    np.testing.assert_allclose(zd, z, atol=1e-5)


# ---------------------------------------------------------------- checksums
def test_save_writes_a_checksum_that_load_verifies(ctx):
    from scmamba2_scvi.model import verify_weights

    folder = ctx.saved_copy()
    text = (folder / "model.pt.sha256").read_text()
    assert text.endswith("  model.pt\n") and len(text.split()[0]) == 64
    assert verify_weights(folder / "model.pt") is True
    loaded = SCMamba2.load(folder, ctx.adata, accelerator="cpu")
    np.testing.assert_array_equal(
        loaded.get_latent_representation(), ctx.model.get_latent_representation()
    )
    (folder / "model.pt.sha256").unlink()  # a model saved by an older version still loads
    assert verify_weights(folder / "model.pt") is False
    SCMamba2.load(folder, ctx.adata, accelerator="cpu")


# ---------------------------------------------------------------- the CLI, in subprocesses
def cli_cases(c):
    h5ad, saved, root = str(c.root / "cells.h5ad"), str(c.saved), c.root
    out = str(root / "out.h5ad")
    embed = ["embed", h5ad, "--model", saved, "--output", out]
    finetune = ["finetune", h5ad, "--model", saved, "--out", str(root / "ft")]
    return [
        ("not-h5ad", ["embed", str(root / "notes.txt"), "--model", saved, "--output", out], 1,
         ["notes.txt", "not a readable h5ad"]),
        ("missing-input", ["embed", str(root / "none.h5ad"), "--model", saved, "--output", out],
         1, ["none.h5ad", "does not exist"]),
        ("missing-model", ["embed", h5ad, "--model", str(root / "nomodel"), "--output", out], 1,
         ["--model folder", "nomodel", "does not exist"]),
        ("missing-output-folder", [*embed[:-1], str(root / "nodir" / "o.h5ad")], 1,
         ["--output", "nodir", "create it"]),
        ("wrong-layer", [*finetune, "--layer", "nope"], 1, ["--layer 'nope'", "layers"]),
        ("wrong-gene-key", [*embed, "--gene-key", "nope"], 1, ["--gene-key 'nope'", "var"]),
        ("wrong-labels-key", [*finetune, "--labels-key", "nope"], 1,
         ["--labels-key 'nope'", "obs", "cell_type"]),
        ("wrong-batch-key", [*finetune, "--batch-key", "nope"], 1, ["--batch-key 'nope'"]),
        ("lr-negative", [*finetune, "--lr", "-1"], 2, ["--lr", "positive number"]),
        ("batch-size-0", [*finetune, "--batch-size", "0"], 2, ["--batch-size", "positive"]),
        ("batch-size-neg", [*finetune, "--batch-size", "-5"], 2, ["--batch-size", "positive"]),
        ("epochs-neg", [*finetune, "--epochs", "-1"], 2, ["--epochs", "positive"]),
        ("max-steps-neg", ["pretrain", h5ad, "--out", str(root / "p"), "--max-steps", "-3"], 2,
         ["--max-steps", "positive"]),
        ("preset-huge", ["demo", "--preset", "huge"], 2, ["preset 'huge'", "cpu-small"]),
        ("max-len-1", ["demo", "--max-len", "1"], 2, ["--max-len", ">= 2"]),
        ("accelerator-tpuu", ["demo", "--accelerator", "tpuu"], 2, ["tpuu", "cpu"]),
        ("min-gene-fraction", [*embed, "--min-gene-fraction", "2"], 2, ["fraction"]),
    ]  # fmt: skip


CLI_IDS = [case[0] for case in cli_cases(SimpleNamespace(root=Path("."), saved="."))]
# the console script in its own process; the whole table runs in-process (each process imports
# torch and scvi-tools: seconds per case on a small machine)
IN_SUBPROCESS = ["missing-model"]


@pytest.fixture(scope="module")
def cli_files(ctx):
    ctx.adata.write_h5ad(ctx.root / "cells.h5ad")
    (ctx.root / "notes.txt").write_text("not an h5ad\n")
    return ctx


def _one_line_error(stderr, words):
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("scmamba2")
    for word in words:
        assert word in lines[0], (word, lines[0])


@pytest.mark.parametrize("name", CLI_IDS)
def test_bad_input_cli(cli_files, capsys, name):
    from scmamba2_scvi import cli

    _, argv, code, words = next(case for case in cli_cases(cli_files) if case[0] == name)
    capsys.readouterr()
    try:
        returncode = cli.main(argv)
    except SystemExit as e:  # argparse's usage errors
        returncode = e.code
    assert returncode == code
    _one_line_error(capsys.readouterr().err, words)


def _env(**extra):
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env.pop("SCMAMBA2_DEBUG", None)
    return {**env, **extra}


@pytest.fixture(scope="module")
def cli_runs(cli_files):
    """The console script in subprocesses (run in parallel), plus the traceback switches."""
    ctx = cli_files
    command = [sys.executable, "-m", "scmamba2_scvi.cli"]
    missing = ["embed", "x.h5ad", "--model", str(ctx.root / "nomodel"), "--output", "o.h5ad"]
    runs = {name: (argv, _env()) for name, argv, *_ in cli_cases(ctx) if name in IN_SUBPROCESS}
    runs["--verbose"] = (["--verbose", *missing], _env())
    procs = {
        name: subprocess.Popen(
            [*command, *argv], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for name, (argv, env) in runs.items()
    }
    return {name: (p.communicate(timeout=600)[1], p.returncode) for name, p in procs.items()}


@pytest.mark.parametrize("name", IN_SUBPROCESS)
def test_bad_input_console_script(cli_files, cli_runs, name):
    _, _, code, words = next(case for case in cli_cases(cli_files) if case[0] == name)
    stderr, returncode = cli_runs[name]
    assert returncode == code, stderr
    _one_line_error(stderr, words)


def test_cli_verbose_shows_the_traceback(cli_runs):
    stderr, returncode = cli_runs["--verbose"]
    assert returncode == 1
    assert "Traceback" in stderr and "FileNotFoundError" in stderr and "nomodel" in stderr


@pytest.mark.parametrize("debug", ["--verbose", "SCMAMBA2_DEBUG", "embed --verbose"])
def test_cli_debug_switches_raise_the_error(cli_files, monkeypatch, debug):
    from scmamba2_scvi import cli

    argv = ["embed", "x.h5ad", "--model", str(cli_files.root / "nomodel"), "--output", "o.h5ad"]
    if debug == "SCMAMBA2_DEBUG":
        monkeypatch.setenv("SCMAMBA2_DEBUG", "1")
    elif debug == "--verbose":
        argv = ["--verbose", *argv]
    else:
        argv = [*argv, "--verbose"]
    with pytest.raises(FileNotFoundError, match="nomodel"):
        cli.main(argv)
