"""The layering rule: the core (ddpm/) runs with PyTorch alone, loads no platform module, and its modules import one
another without a circle.

Both checks enumerate the modules from the package folder, so a module added later is covered without editing this
file.
"""

import ast
import subprocess
import sys
from pathlib import Path

import ddpm

PACKAGE = Path(ddpm.__file__).parent
FORBIDDEN = ("ray", "mlflow", "boto3", "botocore", "pyarrow", "fastapi", "starlette", "transformers")


def core_modules() -> list[str]:
    """Every module of the ddpm package, by dotted name: ``ddpm`` (its __init__) and ``ddpm.<file stem>``."""
    return ["ddpm"] + sorted(f"ddpm.{p.stem}" for p in PACKAGE.glob("*.py") if p.stem != "__init__")


def test_every_core_module_is_found():
    modules = core_modules()
    # the ones the old hand-written list left out are among them, and nothing is listed twice
    assert {"ddpm.graphs", "ddpm.settings", "ddpm.checkpoint", "ddpm.autoencoder"} <= set(modules)
    assert len(modules) == len(set(modules)) == len(list(PACKAGE.glob("*.py")))


def test_core_imports_no_platform_modules():
    modules = core_modules()
    code = (f"import importlib, sys\nfor m in {modules!r}:\n    importlib.import_module(m)\n"
            f"bad = [m for m in {FORBIDDEN!r} if m in sys.modules]\n"
            f"missing = [m for m in {modules!r} if m not in sys.modules]\n"
            "print(','.join(bad) + '|' + ','.join(missing))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    bad, missing = out.split("|")
    assert missing == "", f"not imported: {missing}"
    assert bad == "", f"ddpm imported {bad}"


def imported_core_modules(module: str) -> set[str]:
    """The ddpm modules that ``module``'s source imports, anywhere in the file (a function-level import is still a
    dependency, and was how the autoencoder <-> checkpoint circle hid).

    ``from . import x`` names the submodule ``ddpm.x`` when ``x.py`` exists, else the package (``ddpm``);
    ``from .x import y`` and ``import ddpm.x`` name ``ddpm.x``; ``from ddpm import y`` names ``ddpm``."""
    path = PACKAGE / ("__init__.py" if module == "ddpm" else f"{module.split('.')[-1]}.py")
    package_parts = ["ddpm"]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package_parts[:len(package_parts) - node.level + 1] + ([node.module] if node.module
                                                                                         else []))
            else:
                base = node.module or ""
            names = [base]
            if base == "ddpm":  # from ddpm import x / from . import x: x may be a submodule
                names = [f"ddpm.{a.name}" if (PACKAGE / f"{a.name}.py").exists() else "ddpm" for a in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "ddpm":
                found.add(".".join(parts[:2]))
    found.discard(module)
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as [a, b, ..., a], or None when it is acyclic (depth-first search, three colours)."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_finds_a_circle_and_only_a_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_core_has_no_import_cycles():
    graph = {m: imported_core_modules(m) for m in core_modules()}
    assert graph["ddpm"] >= {"ddpm.checkpoint", "ddpm.generation"}  # the parser sees the imports at all
    assert "ddpm.checkpoint" in graph["ddpm.generation"]
    # the package's __init__ imports every public module; a submodule that imported the package back would close a
    # circle through it, so __init__ stays in the graph
    cycle = find_cycle(graph)
    assert cycle is None, "import circle in ddpm: " + " -> ".join(cycle)
