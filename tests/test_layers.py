"""The house keeps its shape: imports point one way, no module imports itself round a
circle, and no module patches another's objects at run time.

The layer order is DESIGN.md's ("Inside splitinfer/: layers, imports point one way"):

    errors -> util -> core -> models -> wire | discovery -> adapt | train
           -> cloud | edge -> simulations -> bench | demo -> cli

A module may import from its own package and from packages of a lower rank; packages
that share a rank (wire and discovery, cloud and edge, ...) do not import each other.
``simulations`` sits above ``cloud`` and ``edge`` because the emulation runs a real
worker and a real agent. Every import counts: module level, inside functions, and under
``TYPE_CHECKING``. The files are read as source (``ast``), so nothing is imported.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parents[1]

# Folder on disk -> import name, as pyproject.toml's [tool.setuptools.package-dir] maps them.
PACKAGE_DIRS = {
    "splitinfer": "splitinfer",
    "cloud": "splitinfer.cloud",
    "edge": "splitinfer.edge",
    "simulations": "splitinfer.simulations",
    "partitions": "splitinfer.partitions",
}

# Rank of each layer; a module imports only from its own package or from a lower rank.
RANKS = {
    "splitinfer.errors": 0,
    "splitinfer.partitions": 0,  # data only
    "splitinfer.util": 1,
    "splitinfer.core": 2,
    "splitinfer.models": 3,
    "splitinfer.wire": 4,
    "splitinfer.discovery": 4,
    "splitinfer.adapt": 5,
    "splitinfer.train": 5,
    "splitinfer.cloud": 6,
    "splitinfer.edge": 6,
    "splitinfer.simulations": 7,
    "splitinfer.bench": 8,
    "splitinfer.demo": 8,
    "splitinfer.cli": 9,
}

MAX_LINES = 500


@dataclass(frozen=True)
class Source:
    module: str  # import name
    path: Path
    tree: ast.Module
    is_package: bool


def _sources() -> dict[str, Source]:
    found: dict[str, Source] = {}
    for folder, import_name in PACKAGE_DIRS.items():
        base = ROOT / folder
        for path in sorted(base.rglob("*.py")):
            rel = path.relative_to(base).with_suffix("")
            parts = list(rel.parts)
            if any(p in {"__pycache__"} for p in parts) or (folder == "splitinfer" and parts[0] in PACKAGE_DIRS):
                continue
            is_package = parts[-1] == "__init__"
            if is_package:
                parts = parts[:-1]
            module = ".".join([import_name, *parts])
            found[module] = Source(module, path, ast.parse(path.read_text(encoding="utf-8"), str(path)), is_package)
    return found


SOURCES = _sources()


def _layer(module: str) -> str | None:
    """The layer a module belongs to: the longest RANKS key that prefixes it."""
    best = None
    for layer in RANKS:
        if (module == layer or module.startswith(layer + ".")) and (best is None or len(layer) > len(best)):
            best = layer
    return best


def _resolve(name: str) -> str | None:
    """The tree module an imported name refers to (a module, or the module defining it)."""
    while name:
        if name in SOURCES:
            return name
        name = name.rpartition(".")[0]
    return None


def _imports(src: Source) -> list[tuple[int, str]]:
    """(line, imported tree module) for every import in a module, at any depth."""
    out: list[tuple[int, str]] = []
    for node in ast.walk(src.tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                target = _resolve(alias.name)
                if target:
                    out.append((node.lineno, target))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                pkg_parts = src.module.split(".")
                if not src.is_package:
                    pkg_parts = pkg_parts[:-1]
                pkg_parts = pkg_parts[: len(pkg_parts) - (node.level - 1)]
                base = ".".join(pkg_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for alias in node.names:
                # `from a.b import c` imports module a.b.c when it exists, else a name in a.b.
                target = _resolve(f"{base}.{alias.name}") if f"{base}.{alias.name}" in SOURCES else _resolve(base)
                if target:
                    out.append((node.lineno, target))
    return [(line, t) for line, t in out if t != src.module and t != "splitinfer"]


def _package(module: str) -> str:
    layer = _layer(module)
    return layer if layer is not None else module


def test_every_module_has_a_layer() -> None:
    homeless = sorted(m for m in SOURCES if m != "splitinfer" and _layer(m) is None)
    assert not homeless, f"modules outside every layer of DESIGN.md: {homeless}"


def test_imports_point_down_the_layers() -> None:
    upward: list[str] = []
    for src in SOURCES.values():
        here = _layer(src.module)
        if here is None:
            continue
        for line, target in _imports(src):
            there = _layer(target)
            if there is None or there == here:
                continue
            if RANKS[there] >= RANKS[here]:
                upward.append(f"{src.path.relative_to(ROOT)}:{line} {src.module} ({here}) imports {target} ({there})")
    assert not upward, "imports that point up (or across) the layers:\n" + "\n".join(upward)


def test_no_import_cycles_between_modules() -> None:
    graph = nx.DiGraph()
    for src in SOURCES.values():
        graph.add_node(src.module)
        for _, target in _imports(src):
            # A package's __init__ importing its own submodules is how packages re-export.
            if SOURCES[target].is_package and src.module.startswith(target + "."):
                continue
            graph.add_edge(src.module, target)
    cycles = [sorted(c) for c in nx.strongly_connected_components(graph) if len(c) > 1]
    assert not cycles, f"modules that import each other round a circle: {cycles}"


def test_no_module_is_over_the_size_limit() -> None:
    big = {
        str(src.path.relative_to(ROOT)): n
        for src in SOURCES.values()
        if (n := len(src.path.read_text(encoding="utf-8").splitlines())) > MAX_LINES
    }
    assert not big, f"modules over {MAX_LINES} lines (split them by concern): {big}"


def _class_attributes(src: Source) -> set[str]:
    """Names a module's classes define: methods, class-level fields, and `self.x = ...`."""
    names: set[str] = set()
    for cls in (n for n in ast.walk(src.tree) if isinstance(n, ast.ClassDef)):
        for item in cls.body:
            if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                names.add(item.name)
            elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                names.add(item.target.id)
        for node in ast.walk(cls):
            if isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for t in targets:
                    if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self":
                        names.add(t.attr)
    return names


def _names_imported_from_the_tree(src: Source) -> set[str]:
    """Local names bound to our own modules or to what they define (third-party
    libraries' settings, like torch.backends.quantized.engine, are theirs to offer)."""
    names: set[str] = set()
    for node in ast.walk(src.tree):
        if isinstance(node, ast.Import):
            names.update((a.asname or a.name).split(".")[0] for a in node.names if a.name.startswith("splitinfer"))
        elif isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("splitinfer")):
            names.update(a.asname or a.name for a in node.names)
    return names


def test_nothing_patches_another_modules_objects_at_run_time() -> None:
    """Behaviour is changed through hooks and settings, never by assigning into an
    object (or module, or class) that another module owns."""
    own = {m: _class_attributes(s) for m, s in SOURCES.items()}
    foreign_attrs: dict[str, set[str]] = {}
    for m in SOURCES:
        foreign_attrs[m] = set().union(*(a for other, a in own.items() if other != m)) - own[m]
    patches: list[str] = []
    for src in SOURCES.values():
        imported = _names_imported_from_the_tree(src)
        for node in ast.walk(src.tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "setattr":
                patches.append(f"{src.path.relative_to(ROOT)}:{node.lineno} setattr(...)")
            if not isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
                continue
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for t in targets:
                if not isinstance(t, ast.Attribute):
                    continue
                base = t.value
                while isinstance(base, ast.Attribute):
                    base = base.value
                if not isinstance(base, ast.Name):
                    continue  # an item of a container (fx nodes' meta, ...), not a named object
                if base.id in {"self", "cls"} and isinstance(t.value, ast.Name):
                    continue  # an object's own state
                on_import = base.id in imported
                if on_import or t.attr in foreign_attrs[src.module]:
                    patches.append(f"{src.path.relative_to(ROOT)}:{node.lineno} assigns {ast.unparse(t)}")
    assert not patches, "assignments into another module's objects:\n" + "\n".join(patches)


@pytest.mark.parametrize("layer", sorted(RANKS))
def test_every_layer_package_is_documented(layer: str) -> None:
    src = SOURCES.get(layer)
    if src is None:
        pytest.skip(f"{layer} is a module, not a package")
    assert ast.get_docstring(src.tree), f"{layer}/__init__.py needs a docstring that says what lives there"


def test_every_module_says_what_it_is() -> None:
    bare = sorted(str(s.path.relative_to(ROOT)) for s in SOURCES.values() if not ast.get_docstring(s.tree))
    assert not bare, f"modules without a docstring: {bare}"
