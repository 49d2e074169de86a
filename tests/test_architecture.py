"""The layering of the product code, read from its source with ``ast``: arrows point down
(core <- strategies <- server/client <- run/deploy <- cli), no import circle, no private name
imported from another module, and nothing outside ``strategies/`` names a method."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from fedpeft.strategies import METHODS

ROOT = Path(__file__).resolve().parents[1]
# installed module prefix -> source folder (pyproject maps server/, client/, strategies/)
FOLDERS = {"fedpeft.server": "server", "fedpeft.client": "client",
           "fedpeft.strategies": "strategies", "fedpeft": "fedpeft"}
LAYER = {"fedpeft.core": 0, "fedpeft.strategies": 1, "fedpeft.server": 2, "fedpeft.client": 2,
         "fedpeft.run": 3, "fedpeft.deploy": 3, "fedpeft.cli": 4, "fedpeft": 0}


def _modules() -> dict[str, Path]:
    out = {}
    for prefix, folder in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([prefix, *parts])
            if prefix == "fedpeft" and parts and parts[0] in ("server", "client", "strategies"):
                continue
            out[name] = path
    return out


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _imports(name: str) -> list[tuple[str, list[str]]]:
    """(imported module, imported names) for every import in ``name``, at any depth."""
    tree = ast.parse(MODULES[name].read_text())
    package = name if _is_package(name) else name.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            out.append((base, [a.name for a in node.names]))
    return out


def _resolve(target: str, names: list[str]) -> list[str]:
    """The product modules an import refers to (``from pkg import mod`` names a module)."""
    found = [f"{target}.{n}" for n in names if f"{target}.{n}" in MODULES]
    if target in MODULES and len(found) < len(names):
        found.append(target)
    return found


def _layer(name: str) -> int:
    best = max((p for p in LAYER if name == p or name.startswith(p + ".")), key=len)
    return LAYER[best]


def _graph() -> dict[str, set[str]]:
    return {m: {d for target, names in _imports(m) for d in _resolve(target, names) if d != m}
            for m in MODULES}


def test_the_walk_sees_the_whole_product() -> None:
    assert {"fedpeft.cli", "fedpeft.core.config", "fedpeft.server.rounds",
            "fedpeft.client.app", "fedpeft.strategies.base", "fedpeft.run.session",
            "fedpeft.deploy.commands"} <= set(MODULES)


def test_arrows_point_down() -> None:
    upward = [f"{m} -> {d}" for m, deps in _graph().items() for d in deps
              if _layer(d) > _layer(m)]
    assert upward == []


def test_no_import_circle() -> None:
    graph = _graph()
    # a package's __init__ importing its own modules is not a circle between layers
    edges = {m: {d for d in deps if not (_is_package(m) and d.startswith(m + "."))
                 and not (_is_package(d) and m.startswith(d + "."))}
             for m, deps in graph.items()}
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(edges[node]):
            if state.get(dep) == 1:
                cycles.append([*path[path.index(dep):], dep] if dep in path else [node, dep])
            elif dep not in state:
                visit(dep, [*path, dep])
        state[node] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    assert cycles == []


def test_no_private_name_crosses_a_module() -> None:
    private = [f"{m}: from {t} import {n}" for m in MODULES for t, names in _imports(m)
               for n in names if n.startswith("_") and not n.startswith("__")]
    assert private == []


def test_strategies_know_nothing_of_flower_server_or_client() -> None:
    bad = [f"{m} -> {t}" for m in MODULES if m.startswith("fedpeft.strategies")
           for t, _ in _imports(m)
           if t.split(".")[0] == "flwr" or t.startswith(("fedpeft.server", "fedpeft.client"))]
    assert bad == []


def _string_constants(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text())
    docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                  if isinstance(n, ast.Module | ast.ClassDef | ast.FunctionDef)
                  and n.body and isinstance(n.body[0], ast.Expr)
                  and isinstance(n.body[0].value, ast.Constant)}
    return [(n.lineno, n.value) for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str)
            and id(n) not in docstrings]


@pytest.mark.parametrize("module", sorted(m for m in MODULES
                                          if not m.startswith("fedpeft.strategies")))
def test_nothing_outside_strategies_names_a_method(module: str) -> None:
    from fedpeft.core.config import DEFAULT_METHOD

    named = [f"line {line}: {text!r}" for line, text in _string_constants(MODULES[module])
             if text in METHODS]
    if module == "fedpeft.core.config":  # the default experiment's method: one constant
        lines = MODULES[module].read_text().splitlines()
        line = next(i for i, t in enumerate(lines, 1) if t.startswith("DEFAULT_METHOD = "))
        named.remove(f"line {line}: {DEFAULT_METHOD!r}")
    assert named == []


def _wire_keys() -> dict[str, str]:
    """value -> constant name of every string constant ``fedpeft/core/keys.py`` defines."""
    tree = ast.parse(MODULES["fedpeft.core.keys"].read_text())
    return {node.value.value: node.targets[0].id for node in tree.body
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant)
            and isinstance(node.value.value, str) and isinstance(node.targets[0], ast.Name)}


# Modules whose strings share a wire key's spelling in another namespace: the ledger file's own
# "epsilon" field; the sweep table's "epsilon" column (a summary.json field).
KEY_SPELLING_ELSEWHERE = {("fedpeft.core.ledger", "epsilon"),
                          ("fedpeft.run.sweepreport", "epsilon")}


def test_the_wire_keys_table_is_read() -> None:
    keys = _wire_keys()
    assert keys["num-examples"] == "NUM_EXAMPLES" and keys["fedpeft.round"] == "ROUND"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m != "fedpeft.core.keys"))
def test_no_wire_key_is_typed_outside_keys_py(module: str) -> None:
    """Every downlink scalar, reply metric and reply string is named by its constant in
    ``fedpeft.core.keys``, so the two ends of the wire cannot drift apart."""
    keys = _wire_keys()
    typed = [f"line {line}: {text!r} (use keys.{keys[text]})"
             for line, text in _string_constants(MODULES[module])
             if text in keys and (module, text) not in KEY_SPELLING_ELSEWHERE]
    assert typed == []


def test_the_method_base_has_no_side_channel_and_knows_no_aggregator() -> None:
    """``strategies/base.py``: a method instance holds its options and context only (whatever
    ``aggregate`` finds out travels in the returned ``Aggregate``), and no aggregator is named
    there (robust rules live in ``strategies/aggregators.py``)."""
    from fedpeft.core.config import AGGREGATORS

    path = MODULES["fedpeft.strategies.base"]
    tree = ast.parse(path.read_text())
    method = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Method")
    assigned = {t.attr for n in ast.walk(method) if isinstance(n, ast.Assign | ast.AnnAssign)
                for t in (n.targets if isinstance(n, ast.Assign) else [n.target])
                if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name)
                and t.value.id == "self"}
    assert assigned == {"options", "ctx"}
    named = [text for _, text in _string_constants(path) if text in AGGREGATORS and text != "mean"]
    assert named == []
    assert "round_metrics" not in {n.name for n in method.body if isinstance(n, ast.FunctionDef)}
