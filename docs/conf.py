"""Sphinx configuration (scverse template layout)."""

project = "scmamba2-scvi"
author = "scmamba2-scvi developers"
copyright = "2026, scmamba2-scvi developers"
extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.intersphinx",
    "sphinx.ext.mathjax",
    "numpydoc",
]
autosummary_generate = True
numpydoc_show_class_members = False
nb_execution_mode = "off"
html_theme = "sphinx_book_theme"
html_title = "scmamba2-scvi"
intersphinx_mapping = {
    "anndata": ("https://anndata.readthedocs.io/en/stable/", None),
    "scanpy": ("https://scanpy.readthedocs.io/en/stable/", None),
    "scvi": ("https://docs.scvi-tools.org/en/stable/", None),
    "torch": ("https://pytorch.org/docs/stable/", None),
    "lightning": ("https://lightning.ai/docs/pytorch/stable/", None),
}
exclude_patterns = ["_build"]
