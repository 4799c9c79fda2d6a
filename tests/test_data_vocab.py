"""GeneVocab: construction, ID/symbol mapping, reports, positions and serialisation."""

import json
import logging

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from scmamba2_scvi.data import GeneVocab, MappingReport, strip_ensembl_version


def make_adata(names, **columns):
    var = pd.DataFrame(columns, index=pd.Index(names))
    return ad.AnnData(np.zeros((2, len(names)), dtype=np.float32), var=var)


@pytest.fixture
def ensembl_vocab():
    table = pd.DataFrame(
        {
            "gene_id": [
                "ENSG00000000003.15",
                "ENSG00000000005.6",
                "ENSG00000000419.13",
                "ENSG00000000457.14",
                "ENSG00000141510.18",
            ],
            "gene_name": ["TSPAN6", "TNMD", "DPM1", "SCYL3", "TP53"],
            "chromosome": ["chrX", "chrX", "chr20", "chr1", "chr17"],
            "start": [100627108, 100584936, 50934867, 169849631, 7661779],
        }
    )
    return GeneVocab.from_gene_table(table)


def test_special_tokens_and_properties(ensembl_vocab):
    v = ensembl_vocab
    assert (v.pad_id, v.cls_id, v.mask_id) == (0, 1, 2)
    assert len(v) == 8 and v.n_genes == 5
    assert v.gene_keys[:2] == ["ENSG00000000003", "ENSG00000000005"]
    assert v.symbols[-1] == "TP53" and v.has_positions
    batch_tok = v.add_special("<batch:A>")
    assert batch_tok == 8 and v.add_special("<batch:A>") == 8 and v.n_genes == 5
    assert v.special_tokens == ["<pad>", "<cls>", "<mask>", "<batch:A>"]
    assert v.special_tokens == [v.tokens[i] for i in np.flatnonzero(v.is_special)]
    with pytest.raises(ValueError, match="gene key"):
        v.add_special("ENSG00000141510")
    assert v["ENSG00000141510.99"] == v.gene_token_ids[-1]
    assert "ENSG00000141510" in v


def test_strip_version():
    assert strip_ensembl_version("ENSG00000141510.18") == "ENSG00000141510"
    assert strip_ensembl_version("ENSMUSG00000059552") == "ENSMUSG00000059552"
    assert strip_ensembl_version("ENSG00000182378.15_PAR_Y") == "ENSG00000182378_PAR_Y"
    assert strip_ensembl_version("TP53") is None


def test_genomic_order(ensembl_vocab):
    v = ensembl_vocab
    v.add_gene("NOPOS1")
    keys = [v.tokens[i] for i in v.genomic_order()]
    assert keys == [
        "ENSG00000000457",  # chr1
        "ENSG00000141510",  # chr17
        "ENSG00000000419",  # chr20 (numeric, not lexicographic)
        "ENSG00000000005",  # chrX, smaller start first
        "ENSG00000000003",
        "NOPOS1",  # no position: last
    ]


def test_map_mixed_ids_symbols_versions_duplicates(ensembl_vocab, caplog):
    names = [
        "ENSG00000000003.9",  # versioned ID -> by id
        "tp53",  # symbol, other case -> by symbol
        "ENSG00000000419",  # plain ID
        "DPM1",  # duplicate of the previous column -> same token (summed by the Tokenizer)
        "NOTAGENE",
        "ENSG00000999999",  # unknown ID
        "SCYL3",
    ]
    adata = make_adata(names)
    before = adata.var.copy()
    with caplog.at_level(logging.INFO, logger="scmamba2_scvi.data._vocab"):
        ids, report = ensembl_vocab.map(
            adata, min_fraction=0.5, warn_fraction=0.0, return_report=True
        )
    v = ensembl_vocab
    expected = [
        v["ENSG00000000003"],
        v["ENSG00000141510"],
        v["ENSG00000000419"],
        v["ENSG00000000419"],
        -1,
        -1,
        v["ENSG00000000457"],
    ]
    np.testing.assert_array_equal(ids, expected)
    assert ids.dtype == np.int64
    assert isinstance(report, MappingReport) and v.last_report is report
    assert (report.n_genes, report.n_matched, report.n_by_id, report.n_by_symbol) == (7, 5, 2, 3)
    assert report.duplicates == ["DPM1"]
    assert (report.n_vocab_genes, report.n_vocab_present) == (5, 4)
    assert report.coverage == pytest.approx(4 / 5) and not report.coverage_weighted
    assert report.n_unmatched == 2 and report.unmatched == ["NOTAGENE", "ENSG00000999999"]
    assert report.matched_fraction == pytest.approx(5 / 7)
    text = str(report)
    assert (
        "5/7" in text and "4/5 vocabulary genes" in text and "DPM1" in text and "NOTAGENE" in text
    )
    assert "5/7" in caplog.text
    pd.testing.assert_frame_equal(adata.var, before)


def test_map_uses_symbol_column_and_gene_key(ensembl_vocab):
    adata = make_adata(
        ["a", "b", "c"],
        ensembl=["ENSG00000000005.1", "ENSG00000999999", "x"],
        feature_name=["TNMD", "TP53", "SCYL3"],
    )
    ids = ensembl_vocab.map(adata, gene_key="ensembl", warn_fraction=0)
    v = ensembl_vocab
    # "b": unknown ID, matched through its symbol; "c": not an ID, symbol column used.
    np.testing.assert_array_equal(
        ids, [v["ENSG00000000005"], v["ENSG00000141510"], v["ENSG00000000457"]]
    )
    with pytest.raises(KeyError, match="gene_key"):
        v.map(adata, gene_key="missing")


def test_thresholds(ensembl_vocab):
    adata = make_adata(["TP53", "DPM1", "X1", "X2"])
    with pytest.warns(UserWarning, match="50.0%"):
        ensembl_vocab.map(adata)
    with pytest.raises(ValueError, match=r"Only 50\.0%.*min_fraction"):
        ensembl_vocab.map(adata, min_fraction=0.6)


def test_from_anndata_union_and_detection():
    a1 = make_adata(
        ["ENSG00000000003.2", "ENSG00000000005"],
        gene_symbol=["TSPAN6", "TNMD"],
        chromosome=["chrX", "chrX"],
        start=[10, 5],
    )
    a2 = make_adata(["ENSG00000000005.3", "ENSG00000141510"], gene_symbol=["TNMD", "TP53"])
    a3 = make_adata(["GAPDH", "ACTB"], gene_ids=["ENSG00000111640", "ENSG00000075624"])
    v = GeneVocab.from_anndata([a1, a2, a3])
    assert v.gene_keys == [
        "ENSG00000000003",
        "ENSG00000000005",
        "ENSG00000141510",
        "ENSG00000111640",
        "ENSG00000075624",
    ]
    assert v.symbols == ["TSPAN6", "TNMD", "TP53", "GAPDH", "ACTB"]
    assert v.has_positions
    sym = GeneVocab.from_anndata(make_adata(["CD3E", "MS4A1"]))
    assert sym.gene_keys == ["CD3E", "MS4A1"] and sym.symbols == ["CD3E", "MS4A1"]
    np.testing.assert_array_equal(sym.map(make_adata(["ms4a1", "CD3E"])), [4, 3])


def test_roundtrip(tmp_path, ensembl_vocab):
    v = ensembl_vocab
    v.add_special("<cond:stim>")
    v.add_gene("MYSYMBOL")
    path = tmp_path / "vocab.json"
    v.save(path)
    w = GeneVocab.load(path)
    assert w == v and w.tokens == v.tokens and w.symbols == v.symbols
    np.testing.assert_array_equal(w.genomic_order(), v.genomic_order())
    assert GeneVocab.from_dict(json.loads(json.dumps(v.to_dict()))) == v
    np.testing.assert_array_equal(
        w.map(make_adata(["tp53", "mysymbol"])), v.map(make_adata(["tp53", "mysymbol"]))
    )
    with pytest.raises(ValueError, match="format_version"):
        GeneVocab.from_dict({**v.to_dict(), "format_version": 99})


def test_annotate_from_gene_table(shared_data):
    table = pd.read_csv(shared_data / "genes" / "human_ensembl_latest.csv.gz")
    cellbench = ad.read_h5ad(shared_data / "cellbench_5cellline_celseq2_3plates.h5ad", backed="r")
    v = GeneVocab.from_anndata(cellbench.var)
    assert not v.has_positions
    n = v.annotate(table)
    assert n > 0.9 * v.n_genes and v.has_positions
    order = v.genomic_order()
    assert sorted(order.tolist()) == v.gene_token_ids.tolist()
    first = order[0]
    assert v._chroms[first] == "chr1"
    # Symbol-keyed data (pbmc3k) mapped onto an Ensembl-keyed GENCODE vocabulary.
    full = GeneVocab.from_gene_table(table)
    pbmc = ad.read_h5ad(shared_data / "pbmc3k_10x_labeled.h5ad", backed="r")
    ids, report = full.map(pbmc.var, min_fraction=0.5, warn_fraction=0.0, return_report=True)
    assert report.n_by_symbol == report.n_matched and report.matched_fraction > 0.7
    tp53 = int(np.flatnonzero(pbmc.var_names == "TP53")[0])
    assert full.gene_keys[ids[tp53] - 3] == "ENSG00000141510"
