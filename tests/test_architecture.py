"""The house rules that span packages, read from the source (ARCHITECTURE.md, "Layers" and "The flow").

- No upward imports: ``pipelines`` never imports ``deploy``; ``deploy`` uses only ``pipelines.registry`` of the
  pipelines (the core's own rule, no Ray/MLflow in ``ddpm``, is tested in ``tests/ddpm/test_layering.py``).
- One generation path: outside ``ddpm``, no module builds noise from seeds or calls a sampler for generation
  (``noise_from_seeds``, ``sample``, ``inpaint``); they call ``ddpm.generate_images`` / ``ddpm.inpaint_images``.
- No import circles in ``pipelines`` and ``deploy``, lazy imports inside functions included (the core's own check is
  in ``tests/ddpm/test_layering.py``): two modules that need each other hold two halves of one job.
- Every ``ddpm`` subcommand's parser and ``main`` live in ``pipelines/commands/`` (``serve`` in ``deploy/cli.py``, the
  one CLI of the serving layer), so a library module never holds a CLI.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The core's low-level generation API: only ddpm/generation.py composes these into images.
LOW_LEVEL = {"noise_from_seeds", "sample", "inpaint"}
LOW_LEVEL_MODULES = {"ddpm", "ddpm.sampling", "ddpm.inpainting"}


def modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def imports(path: Path) -> list[tuple[str, str | None, int]]:
    """(module, imported name or None, line) for every import statement in ``path``, nested ones included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, None, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found += [(node.module, alias.name, node.lineno) for alias in node.names]
    return found


def low_level_uses(path: Path) -> list[str]:
    """Where ``path`` imports a low-level generation function or calls one as ``ddpm.<name>`` / ``sampling.<name>``."""
    name = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path.name
    uses = [f"{name}:{line} imports {module}.{what}" for module, what, line in imports(path)
            if module in LOW_LEVEL_MODULES and what in LOW_LEVEL]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in LOW_LEVEL
                and isinstance(node.func.value, ast.Name) and node.func.value.id in ("ddpm", "sampling", "inpainting")):
            uses.append(f"{name}:{node.lineno} calls {node.func.value.id}.{node.func.attr}")
    return uses


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _executed_nodes(tree: ast.AST):
    """Every node of ``tree`` except those under ``if TYPE_CHECKING:`` (annotations only, never run)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and isinstance(child.test, ast.Name) and child.test.id == "TYPE_CHECKING":
                stack.extend(child.orelse)
                continue
            stack.append(child)


def import_graph(packages: tuple[str, ...], root: Path = ROOT) -> dict[str, set[str]]:
    """module -> the modules of ``packages`` it imports, at any depth. ``from pkg import sub`` depends on ``pkg.sub``
    when that is a module, else on ``pkg``."""
    paths = {module_name(p, root): p for package in packages for p in sorted((root / package).rglob("*.py"))}
    graph = {}
    for name, path in paths.items():
        deps = set()
        for node in _executed_nodes(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                deps |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                deps |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in paths else node.module
                         for a in node.names}
        graph[name] = {d for d in deps if d in paths and d != name}
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The circles a depth-first walk meets, each as [a, b, ..., a]."""
    cycles, state = [], {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for dep in sorted(graph[module]):
            if state.get(dep) == "open":  # an open module is one of ``path``: the walk came round to it
                cycles.append(path[path.index(dep):] + [module, dep])
            elif dep not in state:
                visit(dep, path + [module])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [])
    return cycles


def test_no_import_circles_in_pipelines_and_deploy():
    assert import_cycles(import_graph(("pipelines", "deploy"))) == []


def test_the_circle_scan_finds_a_lazy_circle(tmp_path):
    """The check above can fail: a circle closed by an import inside a function (how features.py and quality.py
    once needed each other) is found; an import under ``if TYPE_CHECKING:`` is not a circle."""
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from pkg import b\n")
    (package / "b.py").write_text("def f():\n    from pkg.a import g\n")
    (package / "c.py").write_text("from typing import TYPE_CHECKING\nfrom pkg import a\n"
                                  "if TYPE_CHECKING:\n    from pkg.c import x\n")
    graph = import_graph(("pkg",), root=tmp_path)
    assert import_cycles(graph) == [["pkg.a", "pkg.b", "pkg.a"]]


def test_every_subcommand_lives_in_commands():
    from pipelines.cli import SUBCOMMANDS

    elsewhere = {name: module for name, module in SUBCOMMANDS.items()
                 if not module.startswith("pipelines.commands.") and module != "deploy.cli"}
    assert elsewhere == {}


def test_pipelines_never_import_deploy():
    offenders = [f"{p.relative_to(ROOT)}:{line} imports {module}" for p in modules("pipelines")
                 for module, _, line in imports(p) if module == "deploy" or module.startswith("deploy.")]
    assert offenders == []


def test_deploy_uses_only_the_registry_of_the_pipelines():
    offenders = [f"{p.relative_to(ROOT)}:{line} imports {module}" for p in modules("deploy")
                 for module, _, line in imports(p)
                 if (module == "pipelines" or module.startswith("pipelines.")) and module != "pipelines.registry"]
    assert offenders == []


@pytest.mark.parametrize("package", ["pipelines", "deploy"])
def test_only_the_core_turns_seeds_into_images(package):
    assert [use for p in modules(package) for use in low_level_uses(p)] == []


def test_the_scan_finds_a_low_level_call(tmp_path):
    """The rule above can fail: a module written the old way is caught, by import and by attribute call."""
    planted = tmp_path / "old_way.py"
    planted.write_text("import ddpm\nfrom ddpm import noise_from_seeds\n\n\ndef f(m, s, x):\n"
                       "    return ddpm.sample(m, s, x)\n")
    uses = low_level_uses(planted)
    assert [u.split(" ", 1)[1] for u in uses] == ["imports ddpm.noise_from_seeds", "calls ddpm.sample"]
