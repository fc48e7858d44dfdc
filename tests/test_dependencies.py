"""Every imported third-party module is a declared dependency, and the environment equals the lock."""

from __future__ import annotations

import ast
import importlib.metadata as md
import re
import sys
from pathlib import Path

import pytest
import tomllib

from apet_bench import envcheck

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [ROOT / "src", ROOT / "baselines", ROOT / "scripts", ROOT / "run.py"]


def _imported_top_level(paths) -> dict[str, str]:
    """{top-level module: first file importing it}, in-function and TYPE_CHECKING imports included."""
    found: dict[str, str] = {}
    for base in paths:
        files = [base] if base.is_file() else sorted(base.rglob("*.py"))
        for f in files:
            for node in ast.walk(ast.parse(f.read_text(), str(f))):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for n in names:
                    found.setdefault(n.split(".")[0], f.name)
    return found


def _declared() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        reqs += extra
    return {envcheck.normalize(re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0]) for r in reqs}


def undeclared_imports(paths, declared: set[str]) -> list[str]:
    dists = md.packages_distributions()
    problems = []
    for mod, where in sorted(_imported_top_level(paths).items()):
        if mod in sys.stdlib_module_names or mod in ("apet_bench", "__future__"):
            continue
        owners = {envcheck.normalize(d) for d in dists.get(mod, [])}
        if not owners:
            problems.append(f"{mod} (imported by {where}) belongs to no installed distribution")
        elif not owners & declared:
            problems.append(f"{mod} (imported by {where}) comes from {sorted(owners)}, not declared in pyproject.toml")
    return problems


def test_every_imported_module_is_declared():
    assert undeclared_imports(SOURCES, _declared()) == []


def test_undeclared_import_is_reported(tmp_path):
    f = tmp_path / "mod.py"
    f.write_text("def f():\n    import yaml\n    import numpy.linalg\n")
    problems = undeclared_imports([f], _declared() - {"pyyaml"})
    assert len(problems) == 1 and problems[0].startswith("yaml (imported by")


def test_installed_environment_equals_the_lock():
    lock = envcheck.installed_lock_path()
    if lock is None:
        pytest.skip(f"{sys.prefix} was not installed by scripts/install.sh (no .apet-bench-lock)")
    assert envcheck.compare(envcheck.read_lock(lock), envcheck.installed()) == []


def test_compare_names_each_difference():
    lock = {"filelock": "4.2.12", "torch": "2.13.0+cpu"}
    env = {"filelock": "4.3.1", "pip": "24.0", "left-pad": "1.0"}
    assert envcheck.compare(lock, env) == [
        "filelock: locked 4.2.12, installed 4.3.1",
        "torch: locked 2.13.0+cpu, not installed",
        "left-pad: installed 1.0, not in the lock",
    ]


@pytest.mark.parametrize("variant", ["cpu", "cuda"])
def test_locks_pin_what_pyproject_declares(variant):
    lock = envcheck.read_lock(ROOT / "requirements" / f"lock-{variant}.txt")
    declared = _declared() - {"flash-attn"}
    assert sorted(declared - lock.keys()) == []
    assert lock["torch"] == ("2.13.0+cpu" if variant == "cpu" else "2.13.0")
    assert ("torchvision" in lock) == (variant == "cuda")


def test_read_lock_rejects_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        envcheck.read_lock(tmp_path / "nope.txt")


def test_sentencepiece_model_proto_imports_with_the_locked_protobuf():
    """transformers converts a ``tokenizer.model`` through sentencepiece's generated protobuf module; with
    sentencepiece 0.2.3 it raised ``VersionError`` (gencode 7.x, runtime 6.x pinned by wandb / lmms-eval)."""
    from sentencepiece import sentencepiece_model_pb2

    model = sentencepiece_model_pb2.ModelProto()
    model.ParseFromString(b"")
    assert model.trainer_spec.model_type == sentencepiece_model_pb2.TrainerSpec.UNIGRAM  # the proto's default
