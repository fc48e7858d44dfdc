"""No module of ``src/apet_bench`` names a registered method, except the method's own files: every tool
(FLOPs, token maps, tables, sweeps, config checks) works from the method's hooks and attributes or from
configuration, so a new method is its file plus its YAML.

Checked in code: string literals (docstrings and comments are prose and are not checked) and
identifiers (names, attributes, arguments, definitions, imported modules), with ``_`` and ``.`` as word
separators, so ``apet_bench.<name>`` or ``_<name>_overhead`` count. Not checked, because a word test
cannot tell them from the method:

* ``none``: the stage name ``"none"`` (``TokenCompressor.stage``) that tools use to spot the
  uncompressed row;
* ``random``: the English word (randomly initialised weights, ``random_weights``), POPE's ``random``
  split and Python's ``random`` module.

The project's own name (``apet_bench``, ``apet-bench``) and its ``apet_`` prefix in string literals
(task names, file names) are not the method.
"""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import apet_bench
from apet_bench.methods import registered_classes

ROOT = Path(apet_bench.__file__).resolve().parent
NOT_CHECKED = {"none", "random"}
#: (file relative to src/apet_bench, method name): why it stays.
KNOWN: dict[tuple[str, str], str] = {
}
PROJECT = re.compile(r"apet[_-]bench")
PREFIX = re.compile(r"(?<![A-Za-z0-9])apet_")


def _own_files(cls: type) -> set[Path]:
    """The method's own files: its class's module and a primitives module named after it, if any."""
    files = {Path(inspect.getfile(cls)).resolve()}
    primitives = ROOT / f"{cls.name}.py"
    if primitives.is_file():
        files.add(primitives.resolve())
    return files


def _words_in_code(path: Path) -> list[tuple[int, str, bool]]:
    """``(line, text, is_string)`` of every string literal (docstrings excluded) and identifier."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    prose = {id(n.value) for n in ast.walk(tree)
             if isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant) and isinstance(n.value.value, str)}
    out: list[tuple[int, str, bool]] = []
    for node in ast.walk(tree):
        line = getattr(node, "lineno", 0)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in prose:
            out.append((line, node.value, True))
        elif isinstance(node, ast.Name):
            out.append((line, node.id, False))
        elif isinstance(node, ast.Attribute):
            out.append((line, node.attr, False))
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out.append((line, node.name, False))
        elif isinstance(node, ast.arg):
            out.append((line, node.arg, False))
        elif isinstance(node, ast.keyword) and node.arg:
            out.append((line, node.arg, False))
        elif isinstance(node, ast.alias):
            out += [(line, node.name, False)] + ([(line, node.asname, False)] if node.asname else [])
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.append((line, node.module, False))
    return out


def _mentions(text: str, name: str, is_string: bool) -> bool:
    text = PROJECT.sub(" ", text)
    if is_string:
        text = PREFIX.sub(" ", text)
    return re.search(rf"(?<![A-Za-z0-9]){re.escape(name)}(?![A-Za-z0-9])", text) is not None


def test_no_module_outside_a_method_names_it():
    methods = [c for c in registered_classes() if c.name not in NOT_CHECKED]
    assert {"apet", "fastv", "pdrop", "sparsevlm", "visionzip", "tome", "downsample"} <= {c.name for c in methods}
    bad = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        words = _words_in_code(path)
        for cls in methods:
            if path.resolve() in _own_files(cls) or (rel, cls.name) in KNOWN:
                continue
            bad += [f"{rel}:{line}: {cls.name!r} in {text[:60]!r}" for line, text, s in words
                    if _mentions(text, cls.name, s)]
    assert not bad, "modules naming a method outside its own files:\n" + "\n".join(bad)


def test_the_check_catches_a_name():
    """The checker itself: a dispatch on a method name and an import of its module are found, prose is not."""
    assert _mentions("apet", "apet", True) and _mentions("apet_bench.apet", "apet", False)
    assert _mentions("_visionzip_selection", "visionzip", False)
    assert not _mentions("apet_bench", "apet", False) and not _mentions("apet_pope_hub", "apet", True)
    assert not _mentions("tomes", "tome", True)
