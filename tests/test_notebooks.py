"""The tutorials refer only to names the package has (checked statically: nothing is run).

The notebooks are committed with their outputs and executed by hand, so a renamed or removed
public name would otherwise surface only when a user runs them.
"""

from __future__ import annotations

import ast
import importlib
import json
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
PACKAGE = "scmamba2_scvi"


def _source(path: Path) -> str:
    """The code cells of a notebook, without IPython magics and shell escapes."""
    cells = json.loads(path.read_text())["cells"]
    lines = [
        line
        for cell in cells
        if cell["cell_type"] == "code"
        for line in "".join(cell["source"]).splitlines()
        if not line.lstrip().startswith(("%", "!"))
    ]
    return "\n".join(lines)


def _chain(node: ast.Attribute) -> list[str] | None:
    """``["sm", "tl", "annotate"]`` for ``sm.tl.annotate``; ``None`` unless rooted at a name."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    return [node.id, *reversed(parts)] if isinstance(node, ast.Name) else None


def _resolves(dotted: list[str]) -> bool:
    obj = importlib.import_module(dotted[0])
    for i, name in enumerate(dotted[1:], 1):
        if hasattr(obj, name):
            obj = getattr(obj, name)
            continue
        try:  # a submodule that the package does not import itself
            obj = importlib.import_module(".".join(dotted[: i + 1]))
        except ImportError:
            return False
    return True


def unresolved_names(source: str) -> tuple[list[str], int]:
    """Package names in ``source`` that do not exist, and how many references were checked."""
    tree = ast.parse(source)
    aliases, refs = {}, []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == PACKAGE:
                    aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else PACKAGE
                    refs.append(a.name.split("."))
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == PACKAGE:
            refs += [[*node.module.split("."), a.name] for a in node.names]
    for node in ast.walk(tree):
        chain = _chain(node) if isinstance(node, ast.Attribute) else None
        if chain and chain[0] in aliases:
            refs.append([*aliases[chain[0]].split("."), *chain[1:]])
    missing = sorted({".".join(r) for r in refs if not _resolves(r)})
    return missing, len(refs)


def test_checker_reports_a_missing_name():
    source = "import scmamba2_scvi as sm\nfrom scmamba2_scvi.data import Tokenizer, NoSuch\n"
    source += "sm.SCMamba2.setup_anndata\nsm.tl.annotate\nsm.tl.no_such_tool(1)\n"
    missing, n = unresolved_names(source)
    assert missing == ["scmamba2_scvi.data.NoSuch", "scmamba2_scvi.tl.no_such_tool"]
    assert n == 9  # the import, two imported names, three chains of two names and their roots


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_names_exist(path):
    missing, n = unresolved_names(_source(path))
    assert n > 0, f"{path.name} does not use the package"
    assert not missing, f"{path.name} refers to names the package does not have: {missing}"
