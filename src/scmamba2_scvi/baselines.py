"""Baselines: reference methods that the demo and the benchmarks compare SC-MAMBA2 with."""

from __future__ import annotations

import numpy as np
from anndata import AnnData

__all__ = ["lr_pca_baseline"]


def lr_pca_baseline(
    train: AnnData, test: AnnData, labels_key: str, n_pcs: int = 50, seed: int = 0
) -> np.ndarray:
    """Logistic regression on PCA of log-normalised counts, fit on ``train``, predicts ``test``.

    Counts are scaled to 10,000 per cell and ``log1p``-transformed; the PCA and the classifier
    are fit on ``train`` only.

    Parameters
    ----------
    train, test
        AnnData with counts in ``X`` and the same genes.
    labels_key
        ``obs`` column of labels in ``train``.
    n_pcs
        Principal components (fit on ``train`` only).
    seed
        Random state.

    Returns
    -------
    Predicted labels of ``test``.
    """
    from scipy import sparse
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression

    def lognorm(a: AnnData) -> np.ndarray:
        X = a.X.toarray() if sparse.issparse(a.X) else np.asarray(a.X)
        return np.log1p(X / np.maximum(X.sum(1, keepdims=True), 1) * 1e4)

    pca = PCA(n_components=min(n_pcs, train.n_obs - 1, train.n_vars), random_state=seed)
    z_train = pca.fit_transform(lognorm(train))
    clf = LogisticRegression(max_iter=2000, random_state=seed)
    clf.fit(z_train, train.obs[labels_key].astype(str).to_numpy())
    return clf.predict(pca.transform(lognorm(test)))
