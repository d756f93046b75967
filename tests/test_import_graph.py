"""The package's import graph runs one way: no module imports a package above it (its
own ``pyfastpo`` or a parent subpackage, whose ``__init__`` re-exports from below), and
there are no cycles. Built from the source with ``ast``; ``kernels/`` is installed as
``pyfastpo.kernels`` (pyproject.toml's package-dir)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def package_modules() -> dict:
    """``{dotted module name: source path}`` for every module of the installed package."""
    found = {}
    for path in (ROOT / "pyfastpo").rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    for path in (ROOT / "kernels").glob("*.py"):
        found["pyfastpo.kernels" + ("" if path.stem == "__init__" else f".{path.stem}")] = path
    return found


def imports_of(name: str, path: Path, modules: dict) -> set:
    """The package modules ``name`` imports (``from a import b``: ``a.b`` when that is a
    module, else ``a``)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "pyfastpo"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source.split(".")[0] != "pyfastpo":
                continue
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                found.add(sub if sub in modules else source)
    return found


def graph() -> dict:
    modules = package_modules()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def test_no_module_imports_a_package_above_it():
    upward = [f"{name} -> {dep}" for name, deps in graph().items() for dep in deps if name.startswith(dep + ".")]
    assert not upward, "imports of an enclosing package (import from the defining module instead):\n" + "\n".join(
        upward
    )


def test_no_import_cycles():
    edges = graph()
    state, cycles = {}, []

    def visit(node, stack):
        state[node] = "open"
        for dep in sorted(edges.get(node, ())):
            if state.get(dep) == "open":
                cycles.append(" -> ".join(stack[stack.index(dep) :] + [dep]))
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert not cycles, "\n".join(cycles)


def test_the_graph_is_read():
    """The builder itself, on edges known to exist (absolute and relative imports)."""
    edges = graph()
    assert "pyfastpo.sequence_logps" in edges["pyfastpo"]
    assert "pyfastpo.backends.native" in edges["pyfastpo.backends.cpp_backend"]
