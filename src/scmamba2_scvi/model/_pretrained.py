"""The pretrained-model folder: written by ``pretrain``, read by ``from_pretrained`` and scvi-hub.

Layout of a folder (all files written by :func:`save_pretrained`):

``model.pt``
    The backbone as scvi-tools' own :meth:`~scvi.model.base.BaseModelClass.save` writes it:
    an :class:`~scmamba2_scvi.SCMamba2` without heads, set up on a three-cell AnnData whose
    ``var_names`` are the vocabulary's genes (scvi-tools needs an AnnData to build a model;
    no training cell is stored). Its ``init_params_`` hold the architecture and the vocabulary.
``config.json``
    What the folder is (``format``, ``format_version``), the package versions, the model's
    arguments (``params``), its resolved sizes and how it was trained.
``vocab.json``
    The gene vocabulary (:meth:`~scmamba2_scvi.data.GeneVocab.save`), readable without torch.
``_scvi_required_metadata.json``
    scvi-hub's metadata (``model_parent_module="scmamba2_scvi"``, ``model_cls_name``,
    versions), so that :class:`scvi.hub.HubModel` can open the folder.
``README.md``
    The model card (Hugging Face front matter + description).

Query data with other genes is put onto a pretrained backbone by
:meth:`SCMamba2.load_query_data <scmamba2_scvi.SCMamba2.load_query_data>` (genes mapped onto the
vocabulary, new heads for the query's labels and batches); :func:`from_pretrained` is that call
with the setup arguments a backbone needs, and :meth:`SCMamba2.load
<scmamba2_scvi.SCMamba2.load>` delegates to it for such a folder, which is what
``HubModel(folder).load_model(adata=query)`` calls.
"""

from __future__ import annotations

import json
import logging
from importlib.metadata import version
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import scvi
import torch

from scmamba2_scvi.data import GeneVocab

if TYPE_CHECKING:
    from ._model import SCMamba2

__all__ = ["from_pretrained", "is_pretrained", "save_pretrained"]

logger = logging.getLogger(__name__)

#: ``config.json``'s ``format`` field: marks a pretrained-model folder.
FORMAT = "scmamba2-pretrained"
#: Version of the folder layout; readers refuse newer ones.
FORMAT_VERSION = 1
_HUB_METADATA = "_scvi_required_metadata.json"  # the file name scvi.hub.HubModel reads


def _package_version() -> str:
    from scmamba2_scvi import __version__

    return __version__


def _vocabulary_adata(vocab: GeneVocab) -> ad.AnnData:
    """Cells with one count of every vocabulary gene: what the backbone is set up on.

    Three, because scvi-tools warns about a (batch or label) category of fewer than 3 cells.
    """
    n_cells, n = 3, vocab.n_genes
    X = sp.csr_matrix(
        (
            np.ones(n_cells * n, np.float32),
            np.tile(np.arange(n), n_cells),
            np.arange(n_cells + 1) * n,
        ),
        shape=(n_cells, n),
    )
    return ad.AnnData(X, var=pd.DataFrame(index=pd.Index(vocab.gene_keys, dtype=str)))


def save_pretrained(
    module: torch.nn.Module,
    params: dict[str, Any],
    vocab: GeneVocab,
    path: str | PathLike,
    *,
    training: dict[str, Any] | None = None,
) -> Path:
    """Write a pretrained network as a pretrained-model folder (layout in the module docs).

    Parameters
    ----------
    module
        The trained :class:`~scmamba2_scvi.module.SCMamba2Module` (no classifier or batch heads).
    params
        The :class:`~scmamba2_scvi.SCMamba2` keyword arguments it was built with
        (``preset`` and any sizes or options).
    vocab
        Its gene vocabulary.
    path
        The folder (created if needed; files of an earlier save are replaced).
    training
        How it was trained (steps, epochs, cells...), recorded in ``config.json`` and the card.

    Returns
    -------
    The folder.
    """
    from ._model import SCMamba2

    path = Path(path)
    cells = _vocabulary_adata(vocab)
    SCMamba2.setup_anndata(cells, check_counts=params.get("value_transform", "bin") != "raw")
    quiet = logging.getLogger("scmamba2_scvi").level
    logging.getLogger("scmamba2_scvi").setLevel(logging.WARNING)  # no coverage report of it
    try:
        model = SCMamba2(cells, vocab=vocab, **params)
    finally:
        logging.getLogger("scmamba2_scvi").setLevel(quiet)
    model.module.load_state_dict({k: v.detach().cpu() for k, v in module.state_dict().items()})
    model.is_trained_ = True
    model.save(str(path), overwrite=True, save_anndata=False)
    n_params = sum(p.numel() for p in model.module.parameters())
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "scmamba2_scvi_version": _package_version(),
        "scvi_version": scvi.__version__,
        "model_cls_name": SCMamba2.__name__,
        "params": params,
        "summary": model._model_summary_string,
        "n_parameters": n_params,
        "n_genes": vocab.n_genes,
        "training": training or {},
    }
    (path / "config.json").write_text(json.dumps(config, indent=2, default=str))
    vocab.save(path / "vocab.json")
    hub = {
        "scvi_version": scvi.__version__,
        "anndata_version": version("anndata"),
        "model_cls_name": SCMamba2.__name__,
        "training_data_url": None,
        "model_parent_module": "scmamba2_scvi",
    }
    (path / _HUB_METADATA).write_text(json.dumps(hub, indent=2))
    (path / "README.md").write_text(_model_card(config))
    return path


def _model_card(config: dict[str, Any]) -> str:
    """The model card: Hugging Face front matter (as scvi-hub's cards) and a description."""
    params = ", ".join(f"`{k}={v!r}`" for k, v in config["params"].items())
    training = "\n".join(f"- {k}: {v}" for k, v in config["training"].items()) or "- not recorded"
    # one line per paragraph: scvi-hub prints the card with rich, which keeps line breaks
    about = " ".join(
        [
            "A bidirectional Mamba2 single-cell model pretrained by masked expression modelling",
            "with [scmamba2-scvi](https://github.com/scmamba2/scmamba2-scvi)",
            "(`scmamba2_scvi.model.pretrain`). It has no cell-type classifier or batch heads:",
            "they are added for your data when you load it.",
        ]
    )
    use = " ".join(
        [
            "Your genes are mapped onto the vocabulary (Ensembl IDs, then symbols; any order,",
            "subset or superset); a coverage report is logged. Pass `labels_key=` (or",
            "`batch_key=`) to add new heads and fine-tune with `model.train()`. With scvi-hub,",
            'offline: `scvi.hub.HubModel("path/to/this/folder").load_model(adata=adata)`',
            "(counts in `adata.X`).",
        ]
    )
    files = " ".join(
        [
            "`model.pt` (weights, scvi-tools' save format), `config.json` (arguments and",
            "training), `vocab.json` (gene vocabulary), `_scvi_required_metadata.json`",
            "(scvi-hub), this `README.md`.",
        ]
    )
    return f"""---
library_name: scvi-tools
tags:
- biology
- genomics
- single-cell
- model_cls_name:{config["model_cls_name"]}
- scvi_version:{config["scvi_version"]}
- anndata_version:{version("anndata")}
- scmamba2_scvi_version:{config["scmamba2_scvi_version"]}
---

# SC-MAMBA2 pretrained backbone

{about}

- Architecture: {params}
- {config["n_parameters"] / 1e6:.2f}M parameters; vocabulary of {config["n_genes"]} genes
- Folder format: `{config["format"]}` version {config["format_version"]}

## Training

{training}

## Use

```python
import scmamba2_scvi as sm

model = sm.SCMamba2.from_pretrained("path/to/this/folder", adata, layer="counts")
adata.obsm["X_scmamba2"] = model.get_latent_representation()
```

{use}

## Files

{files}
"""


def is_pretrained(path: str | PathLike) -> bool:
    """Whether ``path`` is a pretrained-model folder (its ``config.json`` says so)."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text()).get("format") == FORMAT
    except (json.JSONDecodeError, AttributeError):
        return False


def from_pretrained(
    cls: type[SCMamba2],
    path: str | PathLike,
    adata: ad.AnnData,
    *,
    layer: str | None = None,
    batch_key: str | None = None,
    labels_key: str | None = None,
    gene_key: str | None = None,
    min_gene_fraction: float | None = None,
    accelerator: str = "auto",
    device: int | str = "auto",
) -> SCMamba2:
    """Put a pretrained backbone onto ``adata`` (see :meth:`SCMamba2.from_pretrained`)."""
    path = Path(path)
    if not is_pretrained(path):
        raise ValueError(
            f"{path} is not a pretrained-model folder (no config.json with format={FORMAT!r}); "
            "pass the model/ folder that pretrain() wrote, or use SCMamba2.load for a model "
            "saved with SCMamba2.save."
        )
    version = json.loads((path / "config.json").read_text())["format_version"]
    if version > FORMAT_VERSION:
        raise ValueError(
            f"{path} has folder format version {version}; this scmamba2-scvi reads up to "
            f"{FORMAT_VERSION}. Upgrade scmamba2-scvi."
        )
    return cls.load_query_data(
        adata,
        path,
        layer=layer,
        batch_key=batch_key,
        labels_key=labels_key,
        gene_key=gene_key,
        min_gene_fraction=min_gene_fraction,
        accelerator=accelerator,
        device=device,
    )
