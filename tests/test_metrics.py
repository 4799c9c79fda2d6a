"""scIB-style scores against constructed embeddings whose answers are known."""

import numpy as np
import pytest

from scmamba2_scvi import metrics


def blobs(mixed: bool, seed=0, n=60):
    """Three well separated cell types; batches either mixed within types or split apart."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(["a", "b", "c"], n)
    batch = np.tile(["x", "y"], 3 * n // 2)
    centres = {"a": [0, 0], "b": [20, 0], "c": [0, 20]}
    X = np.array([centres[t] for t in labels], dtype=float) + rng.normal(size=(3 * n, 2))
    if not mixed:
        X[batch == "y"] += [0, 8]  # batch effect: "y" cells shifted away within each type
    return X, batch, labels


def test_separated_types_score_high_on_bio():
    X, _, labels = blobs(mixed=True)
    nmi, ari = metrics.nmi_ari(X, labels)
    assert nmi > 0.95 and ari > 0.95
    assert metrics.label_asw(X, labels) > 0.85
    assert metrics.graph_connectivity(X, labels) == 1.0


def test_random_embedding_scores_low_on_bio():
    rng = np.random.default_rng(0)
    labels = np.repeat(["a", "b", "c"], 60)
    X = rng.normal(size=(180, 5))
    nmi, ari = metrics.nmi_ari(X, labels)
    assert nmi < 0.1 and abs(ari) < 0.1
    assert 0.4 < metrics.label_asw(X, labels) < 0.55


def test_batch_scores_separate_mixed_from_split():
    Xm, b, y = blobs(mixed=True)
    Xs, _, _ = blobs(mixed=False)
    assert metrics.batch_asw(Xm, b, y) > metrics.batch_asw(Xs, b, y) + 0.3
    # neighbourhoods smaller than a batch group (30 cells), so a split is visible
    assert metrics.ilisi(Xm, b, n_neighbors=15) > 0.8
    assert metrics.ilisi(Xs, b, n_neighbors=15) < 0.2


def test_ilisi_matches_inverse_simpson_by_hand():
    # 4 cells on a line, batches x x y y; with 1 neighbour each cell sees one cell
    X = np.array([[0.0], [1.0], [10.0], [11.0]])
    assert metrics.ilisi(X, ["x", "x", "y", "y"], n_neighbors=1) == 0.0
    assert metrics.ilisi(X, ["x", "y", "x", "y"], n_neighbors=3) == pytest.approx(
        (1 / ((1 / 3) ** 2 + (2 / 3) ** 2) - 1) / 1
    )


def test_integration_scores_aggregates():
    X, b, y = blobs(mixed=True)
    s = metrics.integration_scores(X, b, y)
    assert s["bio"] == pytest.approx(np.mean([s["nmi"], s["ari"], s["label_asw"]]))
    assert s["batch"] == pytest.approx(
        np.mean([s["batch_asw"], s["graph_connectivity"], s["ilisi"]])
    )
    with pytest.raises(ValueError, match="two batches"):
        metrics.ilisi(X, np.zeros(len(X)))
