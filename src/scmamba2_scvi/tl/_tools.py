"""scanpy-style tools: embed, annotate, reconstruct, pseudotime."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from anndata import AnnData

if TYPE_CHECKING:
    from scmamba2_scvi.model import SCMamba2


def embed(
    adata: AnnData,
    model: SCMamba2,
    *,
    key_added: str = "X_scmamba2",
    batch_size: int | None = None,
    min_gene_fraction: float | None = None,
    copy: bool = False,
) -> AnnData | None:
    """Cell embeddings of ``model`` for ``adata``.

    ``adata`` may have other genes than the training data (another order, a subset, symbols vs
    Ensembl IDs): they are mapped onto the model's vocabulary.

    Parameters
    ----------
    adata
        Cells x genes with counts where the model expects them (its ``layer``).
    model
        A trained :class:`~scmamba2_scvi.SCMamba2`.
    key_added
        ``obsm`` key of the embedding.
    batch_size
        Cells per minibatch.
    min_gene_fraction
        Least share of the model's vocabulary ``adata`` must hold (see
        :class:`~scmamba2_scvi.SCMamba2`); default: the model's.
    copy
        Return a modified copy instead of writing into ``adata``.

    Returns
    -------
    ``None``, or the copy when ``copy=True``. Writes

    ``adata.obsm[key_added]``
        ``(n_obs, d_model)`` embeddings.
    """
    adata = adata.copy() if copy else adata
    adata.obsm[key_added] = model.get_latent_representation(
        adata, batch_size=batch_size, min_gene_fraction=min_gene_fraction
    )
    return adata if copy else None


def annotate(
    adata: AnnData,
    model: SCMamba2,
    *,
    key_added: str = "scmamba2_label",
    batch_size: int | None = None,
    min_gene_fraction: float | None = None,
    copy: bool = False,
) -> AnnData | None:
    """Predict cell types with the model's classifier.

    Parameters
    ----------
    adata
        Cells x genes (any genes that map onto the model's vocabulary).
    model
        A trained :class:`~scmamba2_scvi.SCMamba2` with a classifier (``labels_key`` set).
    key_added
        Prefix of the keys written.
    batch_size
        Cells per minibatch.
    min_gene_fraction
        Least share of the model's vocabulary ``adata`` must hold (see
        :class:`~scmamba2_scvi.SCMamba2`); default: the model's.
    copy
        Return a modified copy instead of writing into ``adata``.

    Returns
    -------
    ``None``, or the copy when ``copy=True``. Writes

    ``adata.obs[key_added]``
        Predicted label (categorical, with the model's label categories).
    ``adata.obs[key_added + "_confidence"]``
        Probability of the predicted label.
    ``adata.obsm[key_added + "_probabilities"]``
        DataFrame of probabilities, cells x label categories.
    """
    adata = adata.copy() if copy else adata
    probs = model.predict(
        adata, soft=True, batch_size=batch_size, min_gene_fraction=min_gene_fraction
    )
    probs.index = adata.obs_names
    categories = list(probs.columns)
    best = probs.to_numpy().argmax(1)
    adata.obs[key_added] = pd.Categorical.from_codes(best, categories=categories)
    adata.obs[f"{key_added}_confidence"] = probs.to_numpy().max(1)
    adata.obsm[f"{key_added}_probabilities"] = probs
    return adata if copy else None


def reconstruct(
    adata: AnnData,
    model: SCMamba2,
    *,
    layer_added: str = "scmamba2_reconstructed",
    batch_size: int | None = None,
    min_gene_fraction: float | None = None,
    copy: bool = False,
) -> AnnData | None:
    """Expression of every gene predicted from each cell's embedding (denoised / imputed).

    Values are in the model's value space (per-cell quantile bins by default, ``log1p`` for a
    model with ``value_transform="log1p"``).

    Parameters
    ----------
    adata
        Cells x genes (any genes that map onto the model's vocabulary).
    model
        A trained :class:`~scmamba2_scvi.SCMamba2`.
    layer_added
        Layer written.
    batch_size
        Cells per minibatch.
    min_gene_fraction
        Least share of the model's vocabulary ``adata`` must hold (see
        :class:`~scmamba2_scvi.SCMamba2`); default: the model's.
    copy
        Return a modified copy instead of writing into ``adata``.

    Returns
    -------
    ``None``, or the copy when ``copy=True``. Writes

    ``adata.layers[layer_added]``
        Dense float32 ``(n_obs, n_vars)``; NaN for genes absent from the model's vocabulary.
    """
    adata = adata.copy() if copy else adata
    pred = model.get_reconstructed_expression(
        adata, batch_size=batch_size, min_gene_fraction=min_gene_fraction
    )
    out = np.full(adata.shape, np.nan, dtype=np.float32)
    out[:, adata.var_names.get_indexer(pred.columns)] = pred.to_numpy(dtype=np.float32)
    adata.layers[layer_added] = out
    return adata if copy else None


def _root_index(adata: AnnData, root, groups: str | None, rep: np.ndarray) -> int:
    """Resolve ``root`` (index, cell name, category, or ``(obs_key, category)``) to a cell index."""
    if isinstance(root, int | np.integer):
        if not 0 <= root < adata.n_obs:
            raise IndexError(f"root={root} is not a cell index (0..{adata.n_obs - 1}).")
        return int(root)
    if isinstance(root, str) and root in adata.obs_names:
        return int(adata.obs_names.get_loc(root))
    if isinstance(root, tuple) and len(root) == 2:
        key, category = root
    elif isinstance(root, str) and groups is not None:
        key, category = groups, root
    else:
        raise ValueError(
            f"root={root!r} is neither a cell index, a cell name, nor a category: pass an int, a "
            "name in obs_names, (obs_key, category), or a category of `groups`."
        )
    if key not in adata.obs.columns:
        raise KeyError(f"{key!r} is not a column of adata.obs.")
    members = np.flatnonzero(adata.obs[key].astype(str).to_numpy() == str(category))
    if len(members) == 0:
        raise ValueError(f"No cell has {key} == {category!r}.")
    # the member nearest to the group's centroid in the embedding: a stable, central root
    sub = rep[members]
    return int(members[((sub - sub.mean(0)) ** 2).sum(1).argmin()])


def pseudotime(
    adata: AnnData,
    *,
    use_rep: str = "X_scmamba2",
    root: int | str | tuple[str, str],
    groups: str | None = None,
    n_neighbors: int = 15,
    n_dcs: int = 10,
    key_added: str = "scmamba2_pseudotime",
    copy: bool = False,
) -> AnnData | None:
    """Diffusion pseudotime (DPT) from an embedding, and PAGA when ``groups`` is given.

    Neighbours are computed on ``adata.obsm[use_rep]``, then a diffusion map and DPT from
    ``root``, on a scratch AnnData: the user's neighbours graph, diffusion map and ``iroot`` are
    left as they are.

    Parameters
    ----------
    adata
        AnnData with ``obsm[use_rep]`` (e.g. after :func:`embed`).
    use_rep
        ``obsm`` key of the embedding.
    root
        Start cell: an index, a name in ``obs_names``, ``(obs_key, category)``, or a category of
        ``groups``. For a category, the member nearest to its centroid in the embedding.
    groups
        ``obs`` column of clusters for PAGA (and to name a root category).
    n_neighbors
        Neighbours of the graph.
    n_dcs
        Diffusion components used by DPT.
    key_added
        ``obs`` key of the pseudotime.
    copy
        Return a modified copy instead of writing into ``adata``.

    Returns
    -------
    ``None``, or the copy when ``copy=True``. Writes

    ``adata.obs[key_added]``
        Pseudotime in [0, 1] (``inf`` for cells unreachable from the root).
    ``adata.uns[key_added]``
        ``{"root": index, "use_rep", "n_neighbors", "n_dcs"}``.
    ``adata.uns["paga"]``, ``adata.uns[groups + "_sizes"]``
        PAGA graph of ``groups`` (as :func:`scanpy.tl.paga`), only when ``groups`` is given.
    """
    import scanpy as sc

    if use_rep not in adata.obsm:
        raise KeyError(
            f"adata.obsm has no {use_rep!r}; run scmamba2_scvi.tl.embed(adata, model) first."
        )
    if groups is not None and groups not in adata.obs.columns:
        raise KeyError(f"groups={groups!r} is not a column of adata.obs.")
    adata = adata.copy() if copy else adata
    rep = np.asarray(adata.obsm[use_rep], dtype=np.float32)
    iroot = _root_index(adata, root, groups, rep)
    scratch = AnnData(
        np.zeros((adata.n_obs, 1), dtype=np.float32),
        obs=adata.obs[[groups]].copy()
        if groups is not None
        else pd.DataFrame(index=adata.obs_names),
        obsm={"rep": rep},
    )
    sc.pp.neighbors(scratch, use_rep="rep", n_neighbors=n_neighbors)
    sc.tl.diffmap(scratch, n_comps=max(n_dcs, 2) + 1)
    scratch.uns["iroot"] = iroot
    sc.tl.dpt(scratch, n_dcs=n_dcs)
    adata.obs[key_added] = scratch.obs["dpt_pseudotime"].to_numpy()
    adata.uns[key_added] = {
        "root": iroot,
        "use_rep": use_rep,
        "n_neighbors": n_neighbors,
        "n_dcs": n_dcs,
    }
    if groups is not None:
        scratch.obs[groups] = scratch.obs[groups].astype("category")
        sc.tl.paga(scratch, groups=groups)
        adata.uns["paga"] = scratch.uns["paga"]
        adata.uns[f"{groups}_sizes"] = scratch.uns[f"{groups}_sizes"]
    return adata if copy else None
