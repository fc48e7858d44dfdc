"""Method discovery: package scan plus the ``apet_bench.methods`` entry-point group (an external
distribution adds a method without editing this project); a broken method module is an error naming it."""

from __future__ import annotations

import sys
import textwrap

import pytest

from apet_bench.methods import base


@pytest.fixture
def fresh_registry(monkeypatch):
    """A registry copy that discovery fills again, restored after the test."""
    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))
    monkeypatch.setattr(base, "_plugins_loaded", False)
    yield
    for mod in [m for m in sys.modules if m.startswith("extmethod_")]:
        del sys.modules[mod]


def _distribution(root, module: str, body: str, ep_name: str) -> None:
    """A minimal installed distribution on ``root``: the module and a dist-info with one entry point."""
    (root / f"{module}.py").write_text(textwrap.dedent(body))
    info = root / f"{module}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[apet_bench.methods]\n{ep_name} = {module}\n")


def test_entry_point_distribution_adds_a_method(tmp_path, monkeypatch, fresh_registry):
    _distribution(tmp_path, "extmethod_keepfirst", """
        from dataclasses import dataclass
        from typing import ClassVar

        import torch

        from apet_bench.methods import TokenCompressor, VisualSelection, register_method


        @register_method("keepfirst_ext")
        @dataclass
        class KeepFirst(TokenCompressor):
            stage: ClassVar[str] = "vision"

            def compress_visual(self, features, *, image_index):
                k = self.num_tokens_to_keep(int(features.shape[0]))
                return VisualSelection(features[:k], torch.arange(k))

            def flops_overhead(self, ctx):
                return {}
        """, "keepfirst_ext")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "keepfirst_ext" not in base._REGISTRY
    method = base.build_method("keepfirst_ext", budget=8)
    assert type(method).__module__ == "extmethod_keepfirst"
    assert "keepfirst_ext" in base.available_methods()
    import torch

    sel = method.compress_visual(torch.randn(20, 4), image_index=0)
    assert sel.kept_indices.tolist() == list(range(8))
    # the built-ins are still discovered by the package scan
    assert {"none", "random"} <= set(base.available_methods())


def test_broken_entry_point_module_raises_naming_it(tmp_path, monkeypatch, fresh_registry):
    _distribution(tmp_path, "extmethod_broken", "import nonexistent_dependency_xyz\n", "broken_ext")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(base.MethodImportError, match="extmethod_broken.*nonexistent_dependency_xyz") as ei:
        base.available_methods()
    assert len(str(ei.value).splitlines()) == 1


def test_broken_module_in_a_scanned_package_raises_naming_it(tmp_path, monkeypatch, fresh_registry):
    pkg = tmp_path / "extmethod_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "good.py").write_text("X = 1\n")
    (pkg / "bad.py").write_text("raise RuntimeError('boom in a method file')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(base, "PLUGIN_PACKAGES", [*base.PLUGIN_PACKAGES, "extmethod_pkg"])
    with pytest.raises(ImportError, match=r"'extmethod_pkg\.bad'.*boom in a method file"):
        base.get_method_class("none")


def test_baselines_package_lists_no_modules():
    """Adding a baseline needs no import line: the package's ``__init__`` imports nothing."""
    import ast
    from pathlib import Path

    import apet_bench.baselines as pkg

    tree = ast.parse(Path(pkg.__file__).read_text())
    assert not [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
