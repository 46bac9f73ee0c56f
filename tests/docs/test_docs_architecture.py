"""docs/architecture.md names every module of sgdata and sgmodel, and names no module that is gone.

A new file under sgdata/ or sgmodel/ needs its line in the page's "Every module" tables; a renamed
or removed one needs its line changed. The failure message names the files to add or drop.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "architecture.md"
PACKAGES = ("sgdata", "sgmodel")
# a module path anywhere on the page: sgdata/…/name.py or sgmodel/…/name.py
MODULE_PATH = re.compile(r"(?<![\w/.])((?:sgdata|sgmodel)/(?:[A-Za-z0-9_]+/)*[A-Za-z0-9_]+\.py)\b")
# a row of the module tables: | `sgdata/x.py` | what it does |
TABLE_ROW = re.compile(r"^\| `((?:sgdata|sgmodel)/[^`]+\.py)` \| (.*\S) \|$", re.M)


def module_files() -> set[str]:
    return {path.relative_to(ROOT).as_posix() for package in PACKAGES for path in (ROOT / package).rglob("*.py")}


def listed_modules(text: str) -> list[tuple[str, str]]:
    """(module, its line) of every row of the page's "Every module" tables."""
    return TABLE_ROW.findall(text.split("## Every module", 1)[1])


def test_every_module_file_has_a_line_in_the_architecture_page():
    listed = {module for module, _ in listed_modules(PAGE.read_text())}
    missing = sorted(module_files() - listed)
    assert not missing, (
        "docs/architecture.md has no line for "
        + ", ".join(missing)
        + ': add a row "| `<module>` | what it does |" to its "Every module" table'
    )


def test_every_module_the_architecture_page_names_exists():
    text = PAGE.read_text()
    named = {m.group(1) for m in MODULE_PATH.finditer(text)} | {module for module, _ in listed_modules(text)}
    gone = sorted(named - module_files())
    assert not gone, "docs/architecture.md names modules that do not exist: " + ", ".join(gone)


def test_each_module_is_listed_once_with_a_description():
    rows = listed_modules(PAGE.read_text())
    modules = [module for module, _ in rows]
    repeated = sorted({module for module in modules if modules.count(module) > 1})
    assert not repeated, "docs/architecture.md lists these modules more than once: " + ", ".join(repeated)
    assert all(len(line.split()) >= 3 for _, line in rows), "every module's line says what it does"


def test_the_page_states_the_import_rule():
    text = PAGE.read_text()
    assert "## The import rule" in text
    rule = text.split("## The import rule", 1)[1].split("\n## ", 1)[0]
    assert "`sgdata.format`" in rule and "tests/sgmodel/test_import_rule.py" in rule
