"""Sphinx configuration (layout of scverse's cookiecutter template).

Builds offline: notebooks are rendered from their committed outputs (never executed) and
intersphinx reads the small hand-written inventories in ``_inv/`` (see
``_inv/make_inventories.py``) instead of fetching ``objects.inv`` from the web.
"""

from __future__ import annotations

import importlib
import re
from datetime import datetime
from importlib.metadata import metadata
from pathlib import Path

from sphinx.util import logging

HERE = Path(__file__).parent
_info = metadata("scmamba2-scvi")

# -- Project -----------------------------------------------------------------------------------
project = "scmamba2-scvi"
author = "scmamba2-scvi developers"
copyright = f"{datetime.now():%Y}, {author}"
version = _info["Version"]
release = version
repository_url = "https://github.com/scmamba2/scmamba2-scvi"

# -- General -----------------------------------------------------------------------------------
extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.intersphinx",
    "sphinx.ext.mathjax",
    "numpydoc",
    "sphinx_copybutton",
]
templates_path = ["_templates"]
exclude_patterns = [
    "_build",
    "_inv",
    "Thumbs.db",
    ".DS_Store",
    "**.ipynb_checkpoints",
    "notebooks/README.md",
]
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
master_doc = "index"
default_role = "literal"
pygments_style = "default"

# -- Autodoc / autosummary / numpydoc ----------------------------------------------------------
autosummary_generate = True
autodoc_member_order = "groupwise"
autodoc_typehints = "signature"
numpydoc_show_class_members = False  # the class template lists members (own ones only)
# Not nitpicky by default; `sphinx-build -n` lists every reference that does not resolve.

# -- MyST / MyST-NB ----------------------------------------------------------------------------
myst_enable_extensions = ["colon_fence", "deflist", "dollarmath", "amsmath", "html_image"]
myst_heading_anchors = 3
nb_execution_mode = "off"  # notebooks are committed with their outputs; never run here
nb_merge_streams = True

# -- Intersphinx: offline, from the inventories in _inv/ ---------------------------------------
# Each entry maps a project to its real documentation URL (where the links point) and to a local
# inventory (what is read), so the build never touches the network.
_INV = "_inv/{}.inv"
intersphinx_mapping = {
    name: (url, _INV.format(name))
    for name, url in {
        "python": "https://docs.python.org/3/",
        "anndata": "https://anndata.readthedocs.io/en/stable/",
        "scanpy": "https://scanpy.readthedocs.io/en/stable/",
        "scvi": "https://docs.scvi-tools.org/en/stable/",
        "torch": "https://docs.pytorch.org/docs/stable/",
        "lightning": "https://lightning.ai/docs/pytorch/stable/",
        "numpy": "https://numpy.org/doc/stable/",
        "scipy": "https://docs.scipy.org/doc/scipy/",
        "pandas": "https://pandas.pydata.org/docs/",
        "matplotlib": "https://matplotlib.org/stable/",
    }.items()
}
intersphinx_timeout = 1

# -- HTML --------------------------------------------------------------------------------------
html_theme = "sphinx_book_theme"
html_title = "scmamba2-scvi"
html_show_sphinx = False
html_theme_options = {
    "repository_url": repository_url,
    "use_repository_button": True,
    "path_to_docs": "docs/",
    "navigation_with_keys": False,
}

# -- Every public name is documented -----------------------------------------------------------
# Every name in a subpackage's ``__all__`` must be listed in api.md, or the build warns (and so
# fails under -W).
_SUBPACKAGES = [
    "model",
    "module",
    "nn",
    "ops",
    "data",
    "tl",
    "pl",
    "metrics",
    "datasets",
    "baselines",
]


def _public_names(sub: str) -> list[str]:
    module = importlib.import_module(f"scmamba2_scvi.{sub}")
    if hasattr(module, "__all__"):
        return list(module.__all__)
    # a module without __all__ (datasets): the public functions and classes it defines
    return [
        name
        for name, obj in vars(module).items()
        if not name.startswith("_") and getattr(obj, "__module__", None) == module.__name__
    ]


def _check_api_complete(app) -> None:
    logger = logging.getLogger(__name__)
    text = (HERE / "api.md").read_text()
    listed = set(re.findall(r"^ {3}([\w.]+)\s*$", text, re.MULTILINE))
    top = importlib.import_module("scmamba2_scvi")
    for sub in _SUBPACKAGES:
        for name in _public_names(sub):
            qual = f"{sub}.{name}"
            alias = name in top.__all__ and name in listed  # e.g. model.SCMamba2 is sm.SCMamba2
            if qual not in listed and not alias:
                logger.warning("public name scmamba2_scvi.%s is not listed in docs/api.md", qual)


# -- Short names in signatures --------------------------------------------------------------------
# With ``from __future__ import annotations``, a signature whose hints cannot all be evaluated
# (names imported only for type checking) keeps them as written: ``AnnData``, ``np.ndarray``.
# Point those at their full names so the links resolve (here or through the inventories).
_SHORT_NAMES = {
    "AnnData": "anndata.AnnData",
    "np.ndarray": "numpy.ndarray",
    "pd.DataFrame": "pandas.DataFrame",
    "pd.Series": "pandas.Series",
    "sp.spmatrix": "scipy.sparse.spmatrix",
    "sp.sparray": "scipy.sparse.sparray",
    "Path": "pathlib.Path",
    "PathLike": "os.PathLike",
    "Sequence": "collections.abc.Sequence",
    "SCMamba2": "scmamba2_scvi.SCMamba2",
}


def _resolve_short_name(app, env, node, contnode):
    if node.get("refdomain") != "py" or node.get("reftarget") not in _SHORT_NAMES:
        return None
    node["reftarget"] = _SHORT_NAMES[node["reftarget"]]
    # an object documented here resolves now; an external one goes on to intersphinx
    return env.get_domain("py").resolve_xref(
        env, node["refdoc"], app.builder, node["reftype"], node["reftarget"], node, contnode
    )


# -- Module-level constants ----------------------------------------------------------------------
# A constant re-exported by a package (``data.MASK_VALUE``, defined in ``nn._heads``) has no
# ``#:`` comment in the package's own source, so autodoc would show the docstring of its type
# (``float``, ``tuple``). Use the ``#:`` comment where it is defined instead.
def _attr_comment(fullname: str, obj) -> list[str]:
    import sys

    from sphinx.pycode import ModuleAnalyzer

    name = fullname.rpartition(".")[2]
    for modname, module in sorted(sys.modules.items()):
        if not modname.startswith("scmamba2_scvi") or getattr(module, name, None) is not obj:
            continue
        try:
            docs = ModuleAnalyzer.for_module(modname).find_attr_docs()
        except Exception:  # no source (compiled or namespace module)
            continue
        if ("", name) in docs:
            return [line for line in docs[("", name)] if line is not None]
    return []


def _constant_docstring(app, what, name, obj, options, lines) -> None:
    if what != "data" or not isinstance(obj, int | float | str | tuple | list | dict):
        return
    own = [line.strip() for line in lines if line.strip()]
    of_type = [line.strip() for line in (type(obj).__doc__ or "").splitlines() if line.strip()]
    if own and own != of_type:
        return  # documented where autodoc looked: keep it
    lines[:] = _attr_comment(name, obj)


def _public_bases(app, name, obj, options, bases) -> None:
    # a private base class (``nn._mixer._MixerBase``) is shown as the classes it derives from
    public = []
    for base in bases:
        public.extend(base.__bases__ if base.__name__.startswith("_") else [base])
    bases[:] = public


def setup(app) -> None:
    """Connect the API check and the autodoc helpers above."""
    app.connect("builder-inited", _check_api_complete)
    app.connect("missing-reference", _resolve_short_name, priority=100)
    app.connect("autodoc-process-docstring", _constant_docstring, priority=400)  # before numpydoc
    app.connect("autodoc-process-bases", _public_bases)
