"""The house rules that span packages, read from the source (ARCHITECTURE.md, "Layers" and "The flow").

- No upward imports: ``pipelines`` never imports ``deploy``; ``deploy`` uses only ``pipelines.registry`` of the
  pipelines (the core's own rule, no Ray/MLflow in ``ddpm``, is tested in ``tests/ddpm/test_layering.py``).
- One generation path: outside ``ddpm``, no module builds noise from seeds or calls a sampler for generation
  (``noise_from_seeds``, ``sample``, ``inpaint``); they call ``ddpm.generate_images`` / ``ddpm.inpaint_images``.
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
