"""Corpus pretraining: rank sharding, resumable streams, DDP, kill-and-resume, SOMA, transfer."""

import os
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from scmamba2_scvi.data import GeneVocab, H5adShardCorpus, SomaCorpus, Tokenizer, TokenStream
from scmamba2_scvi.datasets import pbmc68k_counts
from scmamba2_scvi.model import SCMamba2, corpus_vocab, latest_checkpoint, pretrain
from scmamba2_scvi.module import SCMamba2Module

TINY_MODULE = {"d_model": 32, "n_layers": 1, "d_state": 16, "head_dim": 16}
TINY = {**TINY_MODULE, "max_len": 48}


@pytest.fixture(scope="module")
def cells():
    """160 real PBMC cells (counts), a sparse AnnData."""
    a = pbmc68k_counts()[:160].copy()
    a.X = sp.csr_matrix(a.layers["counts"])
    del a.layers["counts"]
    return a


def write_shards(adata, folder, sizes, drop_genes=True):
    """Cut ``adata`` into h5ad shards of ``sizes`` cells; each shard lacks a few genes."""
    folder.mkdir(parents=True, exist_ok=True)
    start = 0
    for i, size in enumerate(sizes):
        shard = adata[start : start + size]
        if drop_genes:
            keep = np.ones(adata.n_vars, dtype=bool)
            keep[i::7] = False
            shard = shard[:, keep]
        shard.copy().write_h5ad(folder / f"shard{i:02d}.h5ad")
        start += size
    return folder


@pytest.fixture(scope="module")
def shards(cells, tmp_path_factory):
    # 4 shards x 32 cells: with blocks of 16 and batches of 8, two ranks get equal shares
    return write_shards(cells[:128], tmp_path_factory.mktemp("shards"), [32, 32, 32, 32])


def make_stream(shards, vocab, *, rank=0, world=1, workers=0, batch=8, block=16):
    corpus = H5adShardCorpus(shards, vocab, cells_per_block=block, shuffle=True, seed=5)
    tok = Tokenizer.from_vocab(vocab, max_len=32, mask_ratio=0.25)
    return TokenStream(corpus, tok, batch, num_workers=workers, rank=rank, world_size=world)


def as_lists(batches):
    return [(b["obs_index"].tolist(), b["input_values"].tolist()) for b in batches]


@pytest.mark.parametrize(("world", "workers"), [(1, 0), (2, 0), (2, 2), (3, 1)])
def test_stream_ranks_are_disjoint_balanced_and_cover(shards, world, workers):
    vocab = corpus_vocab(shards)
    seen, lengths = [], []
    for rank in range(world):
        stream = make_stream(shards, vocab, rank=rank, world=world, workers=workers)
        batches = list(stream)
        lengths.append(len(batches))
        assert len(batches) == len(stream)
        assert [b["step"] for b in batches] == list(range(len(batches)))
        seen.append(np.concatenate([b["obs_index"].numpy() for b in batches]))
    assert len(set(lengths)) == 1  # every rank runs the same number of steps
    everything = np.concatenate(seen)
    assert len(everything) == len(np.unique(everything))  # disjoint
    if world in (1, 2):  # shares divide evenly: the whole corpus, once
        np.testing.assert_array_equal(np.sort(everything), np.arange(128))
    else:  # uneven shares: only the largest ranks' surplus batches are left out
        assert 128 - len(everything) < world * 16


@pytest.mark.parametrize("workers", [0, 2])
def test_stream_resumes_at_any_position_with_same_batches(shards, workers):
    vocab = corpus_vocab(shards)
    full = as_lists(make_stream(shards, vocab, workers=workers))
    for cut in (1, 3, len(full) - 1):
        stream = make_stream(shards, vocab, workers=workers)
        stream.load_state_dict({"epoch": 0, "consumed": cut})
        assert as_lists(stream) == full[cut:]  # same cells, same masks


@pytest.mark.parametrize("packed", [False, True])
def test_token_budget_batches_fit_the_budget_and_resume(shards, packed):
    vocab = corpus_vocab(shards)
    corpus = H5adShardCorpus(shards, vocab, cells_per_block=16, shuffle=True, seed=5)
    tok = Tokenizer.from_vocab(vocab, max_len=512, mask_ratio=0.25)  # cells: 180-410 genes
    budget = 1500
    stream = TokenStream(corpus, tok, 64, token_budget=budget, packed=packed, num_workers=2)
    batches = list(stream)
    assert len(batches) == len(stream)
    cells = np.concatenate([b["obs_index"].numpy() for b in batches])
    np.testing.assert_array_equal(np.sort(cells), np.arange(128))
    sizes = {len(b["obs_index"]) for b in batches}
    assert len(sizes) > 2  # the number of cells follows the cells' lengths
    for b in batches:
        real = ~b["key_padding_mask"]
        cost = real.sum() if packed else real.shape[0] * real.sum(1).max()
        assert cost <= budget
    assert max(b["genes"].numel() for b in batches) > budget // 2  # and the budget is used
    again = TokenStream(corpus, tok, 64, token_budget=budget, packed=packed, num_workers=2)
    again.load_state_dict({"epoch": 0, "consumed": 3})
    assert as_lists(again) == as_lists(batches[3:])
    with pytest.raises(ValueError, match="cannot hold one cell"):
        TokenStream(corpus, tok, token_budget=100)


def test_stream_moves_to_a_reshuffled_epoch_only_when_consumed(shards):
    vocab = corpus_vocab(shards)
    stream = make_stream(shards, vocab)
    first = [b["obs_index"].tolist() for b in stream]
    assert stream.state_dict() == {"epoch": 0, "consumed": 0}  # nothing reported consumed
    assert [b["obs_index"].tolist() for b in stream] == first  # so epoch 0 again
    stream.mark_consumed(len(first) - 1)
    second = [b["obs_index"].tolist() for b in stream]
    assert stream.epoch == 1 and second != first
    assert sorted(np.concatenate(second)) == sorted(np.concatenate(first))


def test_stream_rejects_tokenizer_of_other_columns(shards, cells):
    vocab = corpus_vocab(shards)
    corpus = H5adShardCorpus(shards, vocab)
    tok = Tokenizer(vocab.map(cells), vocab)
    with pytest.raises(ValueError, match="from_vocab"):
        TokenStream(corpus, tok)


def test_packed_batches_give_the_padded_loss_and_gradients(cells):
    vocab = GeneVocab.from_anndata(cells)
    tok = Tokenizer(vocab.map(cells), vocab, max_len=None, mask_ratio=0.3)
    X = cells.X[:12]
    for embedding in ("mean", "cls", "weighted"):
        torch.manual_seed(0)
        module = SCMamba2Module(
            len(vocab), dropout=0.0, cell_embedding=embedding, value_scale=50.0, **TINY_MODULE
        )
        padded = tok(X, generator=torch.Generator().manual_seed(3))
        packed = tok.pack(X, generator=torch.Generator().manual_seed(3))
        assert packed["genes"].shape[0] == 1 and not packed["key_padding_mask"].any()
        assert padded["key_padding_mask"].any()  # the padded batch does carry padding
        grads = []
        for batch in (padded, packed):
            module.zero_grad()
            loss = module.token_loss(batch).loss
            loss.backward()
            grads.append(module.encoder.layers[0].mixer.in_proj.weight.grad.clone())
            batch["loss"] = loss.detach()
        torch.testing.assert_close(packed["loss"], padded["loss"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)


def read_log(folder):
    """Data log records ``step -> (epoch, cells)``, later runs overriding earlier ones."""
    records = defaultdict(dict)
    for path in sorted(Path(folder).glob("rank*.tsv")):
        rank = int(path.stem[4:])
        for line in path.read_text().splitlines():
            step, epoch, cells = line.split("\t")
            records[rank][int(step)] = (int(epoch), [int(c) for c in cells.split()])
    return records


def test_pretrain_streams_checkpoints_and_loads_into_scmamba2(shards, cells, tmp_path):
    out = tmp_path / "run"
    model_dir = pretrain(
        shards,
        out,
        preset="cpu-small",
        model_kwargs=TINY,
        batch_size=8,
        max_epochs=2,
        checkpoint_every=5,
        data_log=True,
        progress_bar=False,
        accelerator="cpu",
    )
    assert latest_checkpoint(out).name == "step=00000032.ckpt"  # 2 epochs x 16 steps
    log = read_log(out / "data_log")[0]
    assert sorted(log) == list(range(1, 33))
    for epoch in (0, 1):
        seen = sorted(c for e, cs in log.values() if e == epoch for c in cs)
        assert seen == list(range(128))  # each epoch: every cell exactly once
    # the union of the shards' genes, read from var only
    assert GeneVocab.load(out / "vocab.json").n_genes == cells.n_vars

    # transfer: another gene order and subset, with labels -> a new classifier head
    query = cells[128:, ::-1].copy()
    query = query[:, : query.n_vars - 20].copy()
    model = SCMamba2.load_query_data(query, model_dir, labels_key="bulk_labels", layer=None)
    assert model.module.classifier is not None
    reference = torch.load(model_dir / "model.pt", weights_only=False)["model_state_dict"]
    reference.pop("pyro_param_store")  # scvi-tools' save adds it
    loaded = model.module.state_dict()
    for key, value in reference.items():
        torch.testing.assert_close(loaded[key], value)  # the backbone is the pretrained one
    model.train(max_epochs=2, batch_size=16, accelerator="cpu", enable_progress_bar=False)
    assert len(model.history["train_loss"]) == 2  # fine-tuning keeps a history (per epoch)
    assert model.predict().shape == (32,)
    assert model.get_latent_representation().shape == (32, 32)


def test_pretrain_refuses_resuming_another_model_or_vocabulary(shards, tmp_path):
    out = tmp_path / "run"
    kwargs = {"preset": "cpu-small", "model_kwargs": TINY, "batch_size": 8, "max_steps": 2}
    pretrain(shards, out, progress_bar=False, accelerator="cpu", **kwargs)
    other = GeneVocab.from_anndata([f"GENE{i}" for i in range(50)])
    with pytest.raises(ValueError, match="vocabulary differs"):
        pretrain(shards, out, vocab=other, resume=True, accelerator="cpu", **kwargs)
    wider = {**kwargs, "model_kwargs": {**TINY, "d_model": 64}}
    with pytest.raises(ValueError, match="same preset and model_kwargs"):
        pretrain(shards, out, resume=True, accelerator="cpu", **wider)
    with pytest.raises(ValueError, match="batch_size must be a positive"):
        pretrain(shards, out, **{**kwargs, "batch_size": 0})


def cli(*args):
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "MPLBACKEND": "Agg"}
    command = [sys.executable, "-m", "scmamba2_scvi.cli", "pretrain", *map(str, args)]
    return command, env


TINY_CLI = ["--preset", "cpu-small", "--max-len", "32", "--batch-size", "8", "--no-progress"]


def test_cli_ddp_two_processes_share_the_corpus(shards, tmp_path):
    out = tmp_path / "ddp"
    command, env = cli(
        shards, "--out", out, "--devices", "2", "--accelerator", "cpu", "--strategy", "ddp",
        "--epochs", "1", "--cells-per-block", "16", "--data-log", *TINY_CLI,
    )  # fmt: skip
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, "\n".join(
        line for line in run.stderr.splitlines() if "Error" in line or "rank1" in line
    )[-6000:]
    log = read_log(out / "data_log")
    assert sorted(log) == [0, 1]  # both ranks trained
    assert sorted(log[0]) == sorted(log[1]) == list(range(1, 9))  # in lockstep: 8 steps each
    rank_cells = [{c for _, cs in log[r].values() for c in cs} for r in (0, 1)]
    assert not rank_cells[0] & rank_cells[1]  # disjoint
    assert rank_cells[0] | rank_cells[1] == set(range(128))  # together: the corpus
    assert (out / "model" / "model.pt").exists()


def test_cli_killed_mid_run_resumes_without_gap_or_repeat(shards, tmp_path):
    out = tmp_path / "kill"
    args = [
        shards, "--out", out, "--accelerator", "cpu", "--max-steps", "40",
        "--cells-per-block", "16", "--checkpoint-every", "3", "--data-log", *TINY_CLI,
    ]  # fmt: skip
    command, env = cli(*args)
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while latest_checkpoint(out) is None and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    killed_at = int(latest_checkpoint(out).stem.split("=")[1])
    assert 3 <= killed_at < 40
    run = subprocess.run([*command, "--resume"], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    assert latest_checkpoint(out).name == "step=00000040.ckpt"
    assert torch.load(out / "model" / "model.pt", weights_only=False)["attr_dict"]["is_trained_"]
    log = read_log(out / "data_log")[0]
    assert sorted(log) == list(range(1, 41))  # every step once, none skipped
    by_epoch = defaultdict(list)
    for epoch, cs in log.values():
        by_epoch[epoch] += cs
    assert sorted(by_epoch) == [0, 1, 2]  # 16 steps per epoch: 2.5 epochs
    for epoch in (0, 1):  # complete epochs: every cell exactly once, across the restart
        assert sorted(by_epoch[epoch]) == list(range(128))
    assert len(by_epoch[2]) == len(set(by_epoch[2])) == 64


def test_soma_experiment_reads_like_the_shards(shards, cells, tmp_path):
    soma_io = pytest.importorskip("tiledbsoma.io")
    uri = str(tmp_path / "soma")
    soma_io.from_anndata(uri, cells[:128].copy(), measurement_name="RNA")
    vocab = corpus_vocab(shards)

    def rows(corpus):
        out = {}
        for block in corpus:
            for name, row in zip(block["obs_names"], block["X"].toarray(), strict=True):
                out[str(name)] = row
        return out

    from_shards = rows(H5adShardCorpus(shards, vocab, cells_per_block=16))
    from_soma = rows(SomaCorpus(uri, vocab, layer="data", cells_per_block=24, shuffle=True))
    assert sorted(from_soma) == sorted(from_shards)
    for name, row in from_shards.items():  # shards lack some genes: compare where they have them
        has = row > 0
        np.testing.assert_array_equal(from_soma[name][has], row[has])
    assert corpus_vocab(uri).n_genes == cells.n_vars

    model_dir = pretrain(
        uri,  # detected as a SOMA experiment
        tmp_path / "run",
        layer="data",
        preset="cpu-small",
        model_kwargs=TINY,
        batch_size=16,
        max_steps=3,
        progress_bar=False,
        accelerator="cpu",
    )
    assert (model_dir / "model.pt").exists()


def test_pretrain_on_a_single_h5ad_file_packed_with_a_token_budget(cells, tmp_path):
    path = tmp_path / "one.h5ad"
    a = cells[:40].copy()
    a.obs = pd.DataFrame(index=a.obs_names)
    a.write_h5ad(path)
    model_dir = pretrain(
        path,
        tmp_path / "run",
        preset="cpu-small",
        model_kwargs=TINY,
        batch_size=16,
        token_budget=200,  # 4 cells of max_len 48 (+ <cls>) per step
        packed=True,
        data_log=True,
        progress_bar=False,
        accelerator="cpu",
    )
    log = read_log(tmp_path / "run" / "data_log")[0]
    assert {len(cells) for _, cells in log.values()} == {4}
    assert sorted(c for _, cs in log.values() for c in cs) == list(range(40))
    back = ad.read_h5ad(path)
    assert SCMamba2.load_query_data(back, model_dir).get_latent_representation().shape == (40, 32)


# room for every expressed gene: embeddings then do not depend on which genes are subsampled
WHOLE = {**TINY_MODULE, "max_len": 1024}


@pytest.fixture(scope="module")
def pretrained(shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("pretrained")
    kwargs = {"preset": "cpu-small", "model_kwargs": WHOLE, "batch_size": 8, "max_steps": 3}
    return pretrain(shards, out, progress_bar=False, accelerator="cpu", **kwargs)


def test_pretrained_folder_holds_the_documented_files(pretrained, shards):
    import json
    from importlib.metadata import version

    import scvi

    files = {p.name for p in pretrained.iterdir()}
    expected = {"model.pt", "config.json", "vocab.json", "_scvi_required_metadata.json"}
    assert expected | {"README.md"} <= files
    config = json.loads((pretrained / "config.json").read_text())
    assert config["format"] == "scmamba2-pretrained" and config["format_version"] == 1
    assert config["params"] == {"preset": "cpu-small", **WHOLE}
    assert config["training"]["steps"] == 3 and config["training"]["corpus_cells"] == 128
    assert GeneVocab.load(pretrained / "vocab.json").tokens == corpus_vocab(shards).tokens
    hub = json.loads((pretrained / "_scvi_required_metadata.json").read_text())
    assert hub == {
        "scvi_version": scvi.__version__,
        "anndata_version": version("anndata"),
        "model_cls_name": "SCMamba2",
        "training_data_url": None,
        "model_parent_module": "scmamba2_scvi",
    }
    card = (pretrained / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: scvi-tools") and "model_cls_name:SCMamba2" in card
    saved = torch.load(pretrained / "model.pt", weights_only=False)  # scvi-tools' save layout
    assert saved["attr_dict"]["registry_"]["model_name"] == "SCMamba2"
    assert list(saved["var_names"]) == corpus_vocab(shards).gene_ids


def embed(model, adata):
    return model.get_latent_representation(adata)


def test_from_pretrained_embeds_a_query_with_other_genes(pretrained, cells):
    query = cells[128:].copy()
    subset = query[:, : query.n_vars - 30].copy()  # fewer genes, in vocabulary order
    extra = ad.AnnData(
        sp.csr_matrix(np.ones((query.n_obs, 3), np.float32)),
        obs=pd.DataFrame(index=query.obs_names),
        var=pd.DataFrame(index=["NOTAGENE1", "NOTAGENE2", "NOTAGENE3"]),
    )
    # the same genes, reversed, plus genes the vocabulary does not have
    shuffled = ad.concat([subset[:, ::-1], extra], axis=1, merge="first")
    model = SCMamba2.from_pretrained(pretrained, shuffled, accelerator="cpu")
    assert model.module.classifier is None  # a backbone: no head without labels_key
    z = embed(model, shuffled)
    assert z.shape == (32, 32) and np.isfinite(z).all()
    np.testing.assert_allclose(z, embed(model, subset), rtol=1e-5, atol=1e-6)
    assert not np.allclose(z, embed(model, query), atol=1e-3)  # the missing genes matter
    with_labels = SCMamba2.from_pretrained(pretrained, query.copy(), labels_key="bulk_labels")
    assert with_labels.module.classifier is not None


def test_hub_model_loads_the_folder_offline(pretrained, cells, monkeypatch):
    pytest.importorskip("huggingface_hub")
    from scvi.hub import HubModel

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    query = cells[128:, ::-1].copy()
    hub = HubModel(str(pretrained))
    assert hub.metadata.model_parent_module == "scmamba2_scvi"
    hub.load_model(adata=query, accelerator="cpu")
    assert isinstance(hub.model, SCMamba2)
    direct = SCMamba2.from_pretrained(pretrained, cells[128:, ::-1].copy(), accelerator="cpu")
    np.testing.assert_allclose(embed(hub.model, query), embed(direct, query), rtol=1e-6)


def test_from_pretrained_refuses_a_folder_that_is_not_one(tmp_path, cells):
    with pytest.raises(ValueError, match="not a pretrained-model folder"):
        SCMamba2.from_pretrained(tmp_path, cells[:10].copy())


def test_pretrain_refuses_an_unknown_model_kwarg_before_reading(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(TypeError, match=r"\['d_modle'\].*d_model"):
        pretrain(tmp_path / "no_such_corpus", out, model_kwargs={"d_modle": 64})
    assert not out.exists()  # refused at once: nothing read or written


def test_pretraining_and_fine_tuning_share_one_optimizer_definition():
    from types import SimpleNamespace

    from scmamba2_scvi.model import (
        PretrainPlan,
        SCMamba2TrainingPlan,
        build_module,
        warmup_cosine,
    )

    module, _ = build_module(60, 0, 0, {"preset": "cpu-small", **TINY_MODULE})
    runs = []
    for plan in (
        PretrainPlan(module, None, lr=2e-3, weight_decay=0.1),
        SCMamba2TrainingPlan(module, lr=2e-3, weight_decay=0.1),
    ):
        plan._trainer = SimpleNamespace(estimated_stepping_batches=40)
        config = plan.configure_optimizers()
        optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
        assert config["lr_scheduler"]["interval"] == "step"
        lrs = []
        for _ in range(40):
            lrs.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
        groups = [(len(g["params"]), g["weight_decay"]) for g in optimizer.param_groups]
        runs.append((lrs, groups, optimizer.defaults["betas"]))
    assert runs[0] == runs[1]
    expected = [2e-3 * warmup_cosine(step, 2, 40, 0.05) for step in range(40)]  # 5% warm-up
    np.testing.assert_allclose(runs[0][0], expected)


def test_pretraining_runs_the_memory_guard(shards, tmp_path, monkeypatch):
    """A step that fits nowhere stops with the guard's message, not with the OS killing it."""
    from scmamba2_scvi.module import _memory

    monkeypatch.setattr(_memory, "available_bytes", lambda device: 1e3)
    with pytest.raises(MemoryError, match="max_len"):
        pretrain(
            shards,
            tmp_path / "run",
            preset="cpu-small",
            model_kwargs=TINY,
            batch_size=8,
            max_epochs=1,
            progress_bar=False,
            accelerator="cpu",
        )
