"""scIB scores against constructed embeddings whose answers are known or computed independently."""

import numpy as np
import pytest
from sklearn.linear_model import LinearRegression

from scmamba2_scvi import metrics
from scmamba2_scvi.metrics import Neighbors


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
    X, batch, labels = blobs(mixed=True)
    nmi, ari = metrics.nmi_ari(X, labels)
    assert nmi > 0.95 and ari > 0.95
    assert metrics.silhouette_label(X, labels) > 0.85
    assert metrics.isolated_labels(X, labels, batch) > 0.85
    assert metrics.clisi(X, labels) > 0.99
    # strong components: an outlier that no other cell lists as a neighbour is cut off alone
    assert 0.95 < metrics.graph_connectivity(X, labels) < 1.0


def test_random_embedding_scores_low_on_bio():
    rng = np.random.default_rng(0)
    labels = np.repeat(["a", "b", "c"], 60)
    X = rng.normal(size=(180, 5))
    nmi, ari = metrics.nmi_ari(X, labels)
    assert nmi < 0.1 and abs(ari) < 0.1
    assert 0.4 < metrics.silhouette_label(X, labels) < 0.55
    assert metrics.clisi(X, labels) < 0.3


def test_batch_scores_separate_mixed_from_split():
    Xm, b, y = blobs(mixed=True)
    Xs, _, _ = blobs(mixed=False)
    assert metrics.bras(Xm, y, b) > metrics.bras(Xs, y, b) + 0.3
    assert metrics.ilisi(Xm, b) > 0.8 and metrics.ilisi(Xs, b) < 0.2
    assert metrics.kbet_per_label(Xm, b, y) > 0.8 and metrics.kbet_per_label(Xs, b, y) < 0.2
    assert metrics.pcr_comparison(Xs, Xm, b) > 0.9  # batch explained variance removed
    assert metrics.pcr_comparison(Xs, Xs, b) == 0.0


def test_ilisi_and_clisi_by_hand():
    # 4 cells, each one's neighbours all at distance 1: weights are uniform over the other cells
    indices = np.array([[0, 1, 2, 3], [1, 0, 2, 3], [2, 0, 1, 3], [3, 0, 1, 2]])
    distances = np.array([[0, 1, 1, 1]] * 4, dtype=np.float32)
    nn = Neighbors(indices, distances)
    batch = np.array(["x", "x", "y", "y"])
    # each cell sees 1 of its own batch and 2 of the other: Simpson (1/3)^2 + (2/3)^2
    lisi = 1 / ((1 / 3) ** 2 + (2 / 3) ** 2)
    assert metrics.ilisi(nn, batch, perplexity=2) == pytest.approx(lisi - 1, rel=1e-6)
    assert metrics.clisi(nn, batch, perplexity=2) == pytest.approx(2 - lisi, rel=1e-6)


def test_graph_connectivity_uses_strong_components():
    # a -> b -> c -> a is one strong component; d points into it but nothing points back to d
    indices = np.array([[0, 1], [1, 2], [2, 0], [3, 0]])
    nn = Neighbors(indices, np.ones((4, 2), dtype=np.float32))
    assert metrics.graph_connectivity(nn, ["t"] * 4) == 0.75


def test_pcr_comparison_matches_linear_regression():
    rng = np.random.default_rng(0)
    batch = np.repeat(["x", "y", "z"], 50)
    shift = (batch == "y") * 3.0 + (batch == "z") * -2.0
    X_pre = np.c_[shift + rng.normal(size=150), rng.normal(size=(150, 3))]
    X = X_pre * [0.2, 1, 1, 1]  # the batch axis shrunk

    def pcr(Z):  # independent oracle: R^2 of batch dummies on each PC, weighted by PC variance
        Z = Z - Z.mean(0)
        u, s, _ = np.linalg.svd(Z, full_matrices=False)
        onehot = (batch[:, None] == np.unique(batch)).astype(float)
        r2 = [LinearRegression().fit(onehot, pc).score(onehot, pc) for pc in (u * s).T]
        return np.dot(r2, s**2) / np.sum(s**2)

    expected = (pcr(X_pre) - pcr(X)) / pcr(X_pre)
    assert metrics.pcr_comparison(X_pre, X, batch) == pytest.approx(expected, rel=1e-6)


def test_pcr_matches_linear_regression_on_principal_components():
    rng = np.random.default_rng(0)
    depth = rng.normal(size=200)
    X = np.c_[2 * depth + rng.normal(size=200), rng.normal(size=(200, 3))] @ rng.normal(size=(4, 4))

    # independent oracle: scikit-learn's PCA and R^2 of each component on the covariate
    from sklearn.decomposition import PCA

    pca = PCA().fit(X)
    cov = depth[:, None]
    r2 = [LinearRegression().fit(cov, pc).score(cov, pc) for pc in pca.transform(X).T]
    expected = np.dot(r2, pca.explained_variance_) / pca.explained_variance_.sum()
    assert 0.2 < expected < 0.9
    assert metrics.pcr(X, depth) == pytest.approx(expected, rel=1e-6)
    assert metrics.pcr(X, depth + 100.0) == pytest.approx(expected, rel=1e-6)  # offset-free
    assert metrics.pcr(X, rng.normal(size=200)) < 0.05
    with pytest.raises(ValueError, match="3 values for 200 cells"):
        metrics.pcr(X, depth[:3])


def test_integration_scores_aggregates():
    X, b, y = blobs(mixed=True)
    s = metrics.integration_scores(X, b, y)
    assert np.isnan(s["pcr_comparison"])  # no unintegrated embedding given: left out
    bio = ["isolated_labels", "nmi", "ari", "silhouette_label", "clisi"]
    assert s["bio"] == pytest.approx(np.mean([s[k] for k in bio]))
    batch = ["bras", "ilisi", "kbet", "graph_connectivity"]
    assert s["batch"] == pytest.approx(np.mean([s[k] for k in batch]))
    assert s["total"] == pytest.approx(0.6 * s["bio"] + 0.4 * s["batch"])
    Xs, _, _ = blobs(mixed=False)
    with_pre = metrics.integration_scores(X, b, y, X_pre=Xs)
    assert with_pre["batch"] == pytest.approx(
        np.mean([with_pre[k] for k in [*batch, "pcr_comparison"]])
    )


def test_bad_input_errors():
    X, _, _ = blobs(mixed=True)
    with pytest.raises(ValueError, match="two batches"):
        metrics.ilisi(X, np.zeros(len(X)))
    with pytest.raises(ValueError, match="two cell types"):
        metrics.clisi(X, np.zeros(len(X)))
    with pytest.raises(ValueError, match="neighbors\\(X, n_neighbors=20\\)"):
        metrics.neighbors(X, 10).subset(20)
