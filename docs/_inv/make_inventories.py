"""Write the small intersphinx inventories in this folder (Sphinx inventory format v2).

The documentation must build offline, so ``conf.py`` points intersphinx at these files instead of
each project's ``objects.inv`` on the web. They list only the objects this project's docstrings,
signatures and pages refer to, each with its real URL (relative to the base URL given for the
project in ``conf.py``'s ``intersphinx_mapping``).

Objects whose ``__module__`` is a private module (``anndata._core.anndata.AnnData``,
``pandas.core.frame.DataFrame``, ...) are also listed under that name, pointing to the public
page, because autodoc writes type hints in signatures with the defining module's name.

Run ``python docs/_inv/make_inventories.py`` after adding an entry; commit the ``.inv`` files.
"""

from __future__ import annotations

import zlib
from pathlib import Path

HERE = Path(__file__).parent

# project -> (version label, {name: (role, uri, aliases)}); uri "$" stands for the name (as in
# Sphinx inventories); role is the py domain role (class, function, method, attribute, data).
_C, _F, _M, _A, _D = "py:class", "py:function", "py:method", "py:attribute", "py:data"

INVENTORIES: dict[str, tuple[str, dict[str, tuple[str, str, tuple[str, ...]]]]] = {
    "python": (
        "3",
        {
            "object": (_C, "library/functions.html#$", ()),
            "int": (_C, "library/functions.html#$", ()),
            "float": (_C, "library/functions.html#$", ()),
            "str": (_C, "library/stdtypes.html#$", ()),
            "bool": (_C, "library/functions.html#$", ()),
            "dict": (_C, "library/stdtypes.html#$", ()),
            "list": (_C, "library/stdtypes.html#$", ()),
            "tuple": (_C, "library/stdtypes.html#$", ()),
            "None": (_D, "library/constants.html#$", ()),
            "os.PathLike": (_C, "library/os.html#$", ()),
            "pathlib.Path": (_C, "library/pathlib.html#$", ()),
            "typing.Any": (_D, "library/typing.html#$", ()),
            "typing.Literal": (_D, "library/typing.html#$", ()),
            "collections.abc.Iterator": (_C, "library/collections.abc.html#$", ()),
            "collections.abc.Iterable": (_C, "library/collections.abc.html#$", ()),
            "collections.abc.Sequence": (_C, "library/collections.abc.html#$", ()),
            "collections.abc.Mapping": (_C, "library/collections.abc.html#$", ()),
            "collections.abc.Callable": (_C, "library/collections.abc.html#$", ()),
        },
    ),
    "anndata": (
        "stable",
        {
            "anndata.AnnData": (
                _C,
                "generated/anndata.AnnData.html#$",
                ("anndata._core.anndata.AnnData",),
            ),
            "anndata.io.read_h5ad": (_F, "generated/anndata.io.read_h5ad.html#$", ()),
        },
    ),
    "scanpy": (
        "stable",
        {
            "scanpy.pp.neighbors": (_F, "generated/scanpy.pp.neighbors.html#$", ()),
            "scanpy.tl.umap": (_F, "generated/scanpy.tl.umap.html#$", ()),
            "scanpy.tl.paga": (_F, "generated/scanpy.tl.paga.html#$", ()),
            "scanpy.tl.diffmap": (_F, "generated/scanpy.tl.diffmap.html#$", ()),
            "scanpy.tl.dpt": (_F, "generated/scanpy.tl.dpt.html#$", ()),
            "scanpy.tl.leiden": (_F, "generated/scanpy.tl.leiden.html#$", ()),
            "scanpy.pl.umap": (_F, "generated/scanpy.pl.umap.html#$", ()),
            "scanpy.pl.embedding": (_F, "generated/scanpy.pl.embedding.html#$", ()),
            "scanpy.datasets.pbmc68k_reduced": (
                _F,
                "generated/scanpy.datasets.pbmc68k_reduced.html#$",
                (),
            ),
            "scanpy.datasets.pbmc3k": (_F, "generated/scanpy.datasets.pbmc3k.html#$", ()),
        },
    ),
    "scvi": (
        "stable",
        {
            "scvi.model.SCVI": (_C, "api/reference/scvi.model.SCVI.html#$", ()),
            "scvi.model.SCANVI": (_C, "api/reference/scvi.model.SCANVI.html#$", ()),
            "scvi.model.base.BaseModelClass": (
                _C,
                "api/reference/scvi.model.base.BaseModelClass.html#$",
                ("scvi.model.base._base_model.BaseModelClass",),
            ),
            "scvi.model.base.BaseModelClass.save": (
                _M,
                "api/reference/scvi.model.base.BaseModelClass.html#$",
                (),
            ),
            "scvi.model.base.BaseModelClass.load": (
                _M,
                "api/reference/scvi.model.base.BaseModelClass.html#$",
                (),
            ),
            "scvi.model.base.BaseModelClass.to_device": (
                _M,
                "api/reference/scvi.model.base.BaseModelClass.html#$",
                (),
            ),
            "scvi.model.base.BaseModelClass.view_anndata_setup": (
                _M,
                "api/reference/scvi.model.base.BaseModelClass.html#$",
                (),
            ),
            "scvi.model.base.BaseModelClass.history": (
                _A,
                "api/reference/scvi.model.base.BaseModelClass.html#$",
                (),
            ),
            "scvi.model.base.UnsupervisedTrainingMixin": (
                _C,
                "api/reference/scvi.model.base.UnsupervisedTrainingMixin.html#$",
                ("scvi.model.base._training_mixin.UnsupervisedTrainingMixin",),
            ),
            "scvi.module.base.BaseModuleClass": (
                _C,
                "api/reference/scvi.module.base.BaseModuleClass.html#$",
                ("scvi.module.base._base_module.BaseModuleClass",),
            ),
            "scvi.module.base.LossOutput": (
                _C,
                "api/reference/scvi.module.base.LossOutput.html#$",
                ("scvi.module.base._base_module.LossOutput",),
            ),
            "scvi.train.TrainingPlan": (
                _C,
                "api/reference/scvi.train.TrainingPlan.html#$",
                ("scvi.train._trainingplans.TrainingPlan",),
            ),
            "scvi.data.AnnDataManager": (
                _C,
                "api/reference/scvi.data.AnnDataManager.html#$",
                ("scvi.data._manager.AnnDataManager",),
            ),
            "scvi.data.AnnDataManager.register_fields": (
                _M,
                "api/reference/scvi.data.AnnDataManager.html#$",
                (),
            ),
        },
    ),
    "torch": (
        "stable",
        {
            "torch.Tensor": (_C, "tensors.html#$", ()),
            "torch.Generator": (_C, "generated/torch.Generator.html#$", ("torch._C.Generator",)),
            "torch.device": (_C, "tensor_attributes.html#$", ()),
            "torch.dtype": (_C, "tensor_attributes.html#$", ()),
            "torch.compile": (_F, "generated/torch.compile.html#$", ()),
            "torch.nn.Module": (
                _C,
                "generated/torch.nn.Module.html#$",
                ("torch.nn.modules.module.Module",),
            ),
            "torch.nn.BatchNorm1d": (_C, "generated/torch.nn.BatchNorm1d.html#$", ()),
            "torch.nn.LayerNorm": (_C, "generated/torch.nn.LayerNorm.html#$", ()),
            "torch.nn.Embedding": (_C, "generated/torch.nn.Embedding.html#$", ()),
            "torch.nn.functional.conv1d": (_F, "generated/torch.nn.functional.conv1d.html#$", ()),
            "torch.utils.data.DataLoader": (
                _C,
                "data.html#$",
                ("torch.utils.data.dataloader.DataLoader",),
            ),
            "torch.utils.data.IterableDataset": (
                _C,
                "data.html#$",
                ("torch.utils.data.dataset.IterableDataset",),
            ),
            "torch.utils.data.Dataset": (_C, "data.html#$", ("torch.utils.data.dataset.Dataset",)),
            "torch.utils.checkpoint.checkpoint": (_F, "checkpoint.html#$", ()),
            "torch.autograd.Function": (_C, "autograd.html#$", ()),
        },
    ),
    "lightning": (
        "stable",
        {
            "lightning.pytorch.trainer.trainer.Trainer": (
                _C,
                "api/lightning.pytorch.trainer.trainer.Trainer.html#$",
                ("lightning.pytorch.Trainer",),
            ),
            "lightning.pytorch.core.LightningModule": (
                _C,
                "api/lightning.pytorch.core.LightningModule.html#$",
                (
                    "lightning.pytorch.LightningModule",
                    "lightning.pytorch.core.module.LightningModule",
                ),
            ),
        },
    ),
    "numpy": (
        "stable",
        {
            "numpy.ndarray": (_C, "reference/generated/numpy.ndarray.html#$", ()),
            "numpy.random.Generator": (
                _C,
                "reference/random/generator.html#$",
                ("numpy.random._generator.Generator",),
            ),
        },
    ),
    "scipy": (
        "stable",
        {
            "scipy.sparse.csr_matrix": (
                _C,
                "reference/generated/scipy.sparse.csr_matrix.html#$",
                ("scipy.sparse._csr.csr_matrix",),
            ),
            "scipy.sparse.sparray": (
                _C,
                "reference/generated/scipy.sparse.sparray.html#$",
                ("scipy.sparse._base.sparray",),
            ),
            "scipy.sparse.spmatrix": (
                _C,
                "reference/generated/scipy.sparse.spmatrix.html#$",
                ("scipy.sparse._matrix.spmatrix",),
            ),
        },
    ),
    "pandas": (
        "stable",
        {
            "pandas.DataFrame": (
                _C,
                "reference/api/pandas.DataFrame.html#$",
                ("pandas.core.frame.DataFrame",),
            ),
            "pandas.Series": (
                _C,
                "reference/api/pandas.Series.html#$",
                ("pandas.core.series.Series",),
            ),
            "pandas.Categorical": (
                _C,
                "reference/api/pandas.Categorical.html#$",
                ("pandas.core.arrays.categorical.Categorical",),
            ),
        },
    ),
    "matplotlib": (
        "stable",
        {
            "matplotlib.figure.Figure": (_C, "api/_as_gen/matplotlib.figure.Figure.html#$", ()),
            "matplotlib.axes.Axes": (
                _C,
                "api/axes_api.html#$",
                ("matplotlib.axes._axes.Axes",),
            ),
        },
    ),
}


def _lines(objects: dict[str, tuple[str, str, tuple[str, ...]]]) -> list[str]:
    out = []
    for name, (role, uri, aliases) in objects.items():
        # "$" expands to the entry's own name, so an alias needs the canonical anchor spelled out;
        # display name "-": a link keeps the text the page gave it
        out.append(f"{name} {role} 1 {uri} -")
        target = uri.replace("$", name)
        out.extend(f"{alias} {role} 1 {target} -" for alias in aliases)
    return sorted(out)


def write(project: str, version: str, objects: dict) -> Path:
    """Write ``<project>.inv`` in this folder and return its path."""
    header = (
        "# Sphinx inventory version 2\n"
        f"# Project: {project}\n"
        f"# Version: {version}\n"
        "# The remainder of this file is compressed using zlib.\n"
    ).encode()
    body = ("\n".join(_lines(objects)) + "\n").encode()
    path = HERE / f"{project}.inv"
    path.write_bytes(header + zlib.compress(body, 9))
    return path


def check(path: Path, base: str) -> int:
    """Read ``path`` back with Sphinx's own reader; return the number of objects."""
    from sphinx.util.inventory import InventoryFile

    with path.open("rb") as f:
        inv = InventoryFile.load(f, base, lambda base, uri: base + uri)
    data = inv.data if hasattr(inv, "data") else inv  # Sphinx >= 8.2 returns an _Inventory
    return sum(len(v) for v in data.values())


if __name__ == "__main__":
    for project, (version, objects) in INVENTORIES.items():
        p = write(project, version, objects)
        print(f"{p.name}: {check(p, 'https://example.invalid/')} objects")
