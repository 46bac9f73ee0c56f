"""The import rule: sgmodel reaches sgdata only through its public surface, the data contract
`sgdata.format` (docs/architecture.md). Checked on the import graph, so a lazy import inside a
function counts as much as one at the top of a file."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PUBLIC = "sgdata.format"


def sgdata_imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import of an sgdata module in a Python file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names if alias.name.split(".")[0] == "sgdata"]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and node.module.split(".")[0] == "sgdata":
            # `from sgdata import x` imports the module sgdata.x when x is one
            found += [(node.lineno, f"{node.module}.{alias.name}" if node.module == "sgdata" else node.module)
                      for alias in node.names]
    return found


def is_public(module: str) -> bool:
    return module == PUBLIC or module.startswith(PUBLIC + ".")


@pytest.mark.parametrize("path", sorted((ROOT / "sgmodel").rglob("*.py")), ids=lambda p: p.name)
def test_sgmodel_imports_only_the_public_surface_of_sgdata(path):
    wrong = [f"{path.relative_to(ROOT)}:{line} imports {module}" for line, module in sgdata_imports(path) if not is_public(module)]
    assert not wrong, "sgmodel may import only sgdata.format: " + "; ".join(wrong)


def test_the_rule_sees_every_form_of_import(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("import sgdata.writer\nfrom sgdata import render\nfrom sgdata.format import UserError\n"
                      "def late():\n    from sgdata.masks import resize_rle\n    import sgdata.format.rle\n")
    assert [(line, module, is_public(module)) for line, module in sorted(sgdata_imports(sample))] == [
        (1, "sgdata.writer", False), (2, "sgdata.render", False), (3, "sgdata.format", True),
        (5, "sgdata.masks", False), (6, "sgdata.format.rle", True)]


def test_the_public_surface_needs_nothing_else_of_sgdata():
    """sgdata.format itself imports no other sgdata module, so the contract stands on its own."""
    for path in sorted((ROOT / "sgdata" / "format").glob("*.py")):
        assert all(is_public(module) for _, module in sgdata_imports(path)), path.name
