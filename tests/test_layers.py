"""The import layers hold: no module imports a module above it or beside it.

Bottom to top (``apet_bench.core``'s docstring):

0. ``core``: value types, stages, the ``VisualModel`` / ``Compressor`` Protocols (imports torch only);
1. leaves with no project imports besides ``core``: ``budget``, ``data.video``;
2. three independent groups: ``models`` (the adapters), ``methods`` (``methods/``, ``apet`` and
   ``baselines/``), and the surgeries (``surgery``, ``llm_surgery``, ``attention``);
3. ``pipeline``: the generate loop, the only place a model and a method meet;
4. everything user-facing: evaluation, runner, FLOPs, latency, figures, tables, data, scripts, ``run.py``.

Every ``import`` statement counts, wherever it is: at module level, inside a function, or under
``if TYPE_CHECKING:``.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "apet_bench"

#: (layer, group) per module prefix; the longest matching prefix wins.
LAYERS: dict[str, tuple[int, str]] = {
    "apet_bench.core": (0, "core"),
    "apet_bench.budget": (1, "budget"),
    "apet_bench.data.video": (1, "video"),
    "apet_bench.models": (2, "models"),
    "apet_bench.methods": (2, "methods"),
    "apet_bench.apet": (2, "methods"),
    "apet_bench.baselines": (2, "methods"),
    "apet_bench.surgery": (2, "surgeries"),
    "apet_bench.llm_surgery": (2, "surgeries"),
    "apet_bench.attention": (2, "surgeries"),
    "apet_bench.pipeline": (3, "pipeline"),
    "apet_bench": (4, "app"),
}


def layer_of(module: str) -> tuple[int, str]:
    best = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len)
    return LAYERS[best]


def project_modules() -> dict[str, Path]:
    """Module name -> file, for src/apet_bench, baselines/ (installed as apet_bench.baselines), scripts/, run.py."""
    mods: dict[str, Path] = {}
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts.pop()
        mods[".".join(parts)] = path
    for path in (ROOT / "baselines").glob("*.py"):
        name = "apet_bench.baselines" if path.stem == "__init__" else f"apet_bench.baselines.{path.stem}"
        mods[name] = path
    for path in [*(ROOT / "scripts").glob("*.py"), ROOT / "run.py"]:
        mods[f"apet_bench.__app__.{path.stem}"] = path  # top layer
    return mods


def imports_of(module: str, path: Path) -> list[tuple[int, str]]:
    """(line, imported project module) for every import statement in ``path``, relative ones resolved."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.startswith("apet_bench")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("apet_bench"):
                continue
            for alias in node.names:  # `from pkg import submodule` imports the submodule
                sub = f"{target}.{alias.name}"
                out.append((node.lineno, sub if _is_module(sub) else target))
    return out


def _is_module(name: str) -> bool:
    return name in _MODULES


_MODULES = project_modules()


def violations() -> list[str]:
    bad = []
    for module, path in sorted(_MODULES.items()):
        src_layer, src_group = layer_of(module)
        for line, target in imports_of(module, path):
            if target == module or module.startswith(target + ".") and path.name == "__init__.py":
                continue
            dst_layer, dst_group = layer_of(target)
            if dst_layer > src_layer or (dst_layer == src_layer and dst_group != src_group):
                where = path.relative_to(ROOT)
                kind = "up" if dst_layer > src_layer else "sideways"
                bad.append(f"{where}:{line}: {module} ({src_group}) imports {target} ({dst_group}): {kind}")
    return bad


def test_no_import_points_up_or_sideways():
    assert violations() == []


def test_the_walker_sees_function_level_and_type_checking_imports(tmp_path):
    path = tmp_path / "mod.py"
    path.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from apet_bench.models.base import ModelAdapter\n"
        "def f():\n    from apet_bench.pipeline import generate\n"
        "from . import surgery\n"
    )
    found = [t for _, t in imports_of("apet_bench.methods.mod", path)]
    assert found == ["apet_bench.models.base", "apet_bench.pipeline", "apet_bench.methods.surgery"] or sorted(
        found
    ) == sorted(["apet_bench.models.base", "apet_bench.pipeline", "apet_bench.methods"])
    assert layer_of("apet_bench.models.base") == (2, "models")
    assert layer_of("apet_bench.pipeline") == (3, "pipeline")
    assert layer_of("apet_bench.baselines.fastv") == (2, "methods")
    assert layer_of("apet_bench.runner") == (4, "app")


@pytest.mark.parametrize(
    ("module", "must_not_load"),
    [
        ("apet_bench.core", ("apet_bench.models", "apet_bench.methods", "apet_bench.surgery", "transformers")),
        ("apet_bench.surgery", ("apet_bench.methods", "apet_bench.models", "apet_bench.apet")),
        ("apet_bench.llm_surgery", ("apet_bench.methods", "apet_bench.models")),
        ("apet_bench.models.base", ("apet_bench.methods", "apet_bench.data.prepare", "apet_bench.surgery")),
        ("apet_bench.methods.base", ("apet_bench.models", "apet_bench.attention", "apet_bench.data")),
    ],
)
def test_importing_a_layer_loads_nothing_above_it(module, must_not_load):
    code = (
        f"import sys, {module}\n"
        f"bad = [m for m in sys.modules if m.split('.')[0] == 'transformers' or m.startswith('apet_bench')]\n"
        "print('\\n'.join(bad))\n"
    )
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    hits = sorted({m for m in loaded for p in must_not_load if m == p or m.startswith(p + ".")})
    assert hits == [], f"importing {module} loads {hits}"
