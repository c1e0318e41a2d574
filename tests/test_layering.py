"""The package's modules import each other one way: no cycles, and models/ below client/ and server/."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

import swarm

PACKAGE = Path(swarm.__file__).parent
MODULES = sorted(
    ".".join(("swarm", *path.relative_to(PACKAGE).with_suffix("").parts)).removesuffix(".__init__")
    for path in PACKAGE.rglob("*.py")
)
# which packages a package may import from: errors/wire/spans -> transport/records -> models -> distribution ->
# server and client
FORBIDDEN = {
    "swarm.models": ("swarm.client", "swarm.server", "swarm.distribution", "swarm.launch", "swarm.demo", "swarm.status"),
    "swarm.distribution": ("swarm.client", "swarm.server", "swarm.launch", "swarm.demo", "swarm.status"),
    "swarm.client": ("swarm.server", "swarm.launch", "swarm.demo", "swarm.status"),
    "swarm.server": ("swarm.client", "swarm.launch", "swarm.demo", "swarm.status"),
}


def module_path(module: str) -> Path:
    relative = Path(*module.split(".")[1:])
    package = PACKAGE / relative / "__init__.py"
    return package if package.is_file() else (PACKAGE / relative).with_suffix(".py")


def imports_of(module: str) -> set[str]:
    """Every module of the package that `module` imports anywhere in its code (in functions too)."""
    path = module_path(module)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    return imports_in(path.read_text(), package) - {module}


def imports_in(source: str, package: str) -> set[str]:
    """The package's modules that `source`, a module of `package`, imports."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}".rstrip(".")
            found |= {f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names}
    return {name for name in found if name in MODULES}


GRAPH = {module: imports_of(module) for module in MODULES}


@pytest.mark.parametrize("module", MODULES)
def test_every_module_imports(module):
    importlib.import_module(module)


def test_the_module_graph_has_no_cycle():
    state: dict[str, str] = {}  # module -> "open" while on the current path, "done" once explored
    cycles = []

    def visit(module: str, path: list[str]):
        state[module] = "open"
        for imported in sorted(GRAPH[module]):
            if state.get(imported) == "open":
                cycles.append(" -> ".join(path[path.index(imported) :] + [imported]))
            elif imported not in state:
                visit(imported, path + [imported])
        state[module] = "done"

    for module in MODULES:
        if module not in state:
            visit(module, [module])
    assert cycles == []


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_layers_point_one_way(package):
    wrong = {
        f"{module} imports {imported}"
        for module, imported_modules in GRAPH.items()
        if module == package or module.startswith(f"{package}.")
        for imported in imported_modules
        if imported.startswith(FORBIDDEN[package])
    }
    assert not wrong


def test_the_checker_sees_every_kind_of_import():
    source = "import swarm.spans\nfrom . import remote\ndef f():\n    from ..models import base, FAMILIES\n"
    assert imports_in(source, "swarm.client") == {"swarm.spans", "swarm.client.remote", "swarm.models.base", "swarm.models"}
    assert {"swarm.client.session", "swarm.client.remote"} <= GRAPH["swarm.client.base"]
