"""Repository conventions the architecture test does not cover: product module docstrings stay
short (measurements belong in docs/results.md or docs/performance.md, not in code), and no test
module imports another test module (shared helpers live in tests/helpers.py and conftest.py)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PRODUCT = ("fedpeft", "server", "client", "strategies")
MAX_DOCSTRING_LINES = 25


def _modules(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (ROOT / folder).rglob("*.py"))


def test_product_module_docstrings_are_at_most_25_lines() -> None:
    long = {}
    for path in _modules(*PRODUCT):
        doc = ast.get_docstring(ast.parse(path.read_text()), clean=False) or ""
        if len(doc.splitlines()) > MAX_DOCSTRING_LINES:
            long[str(path.relative_to(ROOT))] = len(doc.splitlines())
    assert len(_modules(*PRODUCT)) > 50  # the walk found the product
    assert not long, (f"module docstrings over {MAX_DOCSTRING_LINES} lines: {long}; keep the why "
                      "in code, the mechanism in docs/*.md, measurements in docs/results.md")


def _test_imports(tree: ast.Module) -> set[str]:
    """The test modules (``tests.test_x`` or ``test_x``) a module imports, at any depth."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return {n for n in names if n.split(".")[-1].startswith("test_")
            and n.split(".")[0] in ("tests", n.split(".")[-1])}


def test_no_test_module_imports_another() -> None:
    tests = _modules("tests")
    found = {p.name: sorted(bad) for p in tests if (bad := _test_imports(ast.parse(p.read_text())))}
    assert any(p.name == "helpers.py" for p in tests)
    assert not found, f"test modules importing test modules (use tests/helpers.py): {found}"


def test_the_import_check_sees_test_modules() -> None:
    tree = ast.parse("from tests.test_x import a\nimport test_y\nfrom tests.helpers import b\n"
                     "import pytest_cov\ndef f():\n    from tests.test_z import c\n")
    assert _test_imports(tree) == {"tests.test_x", "test_y", "tests.test_z"}
