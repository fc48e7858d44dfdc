"""The installed environment against the dependency lock.

    python -m apet_bench.envcheck requirements/lock-cpu.txt    # exit 1 listing every difference
    python -m apet_bench.envcheck                             # the lock this venv was installed from
    python -m apet_bench.envcheck --pip-check                 # pip check, known complaints explained

``scripts/install.sh`` installs exactly one lock file (``requirements/lock-cpu.txt`` or
``requirements/lock-cuda.txt``, written by ``scripts/lock.sh`` with uv) and records which in
``<venv>/.apet-bench-lock``; this module compares every installed distribution with it.
"""

from __future__ import annotations

import importlib.metadata as md
import re
import subprocess
import sys
from pathlib import Path

# Installed on top of the lock on purpose: the project itself, the venv's own installer, and the
# CUDA-only extra built against the installed torch.
ALLOWED_EXTRA = frozenset({"apet-bench", "pip", "setuptools", "wheel", "flash-attn"})

# `pip check` complaints that the CPU install produces by design (README "Install").
KNOWN_PIP_CHECK = {
    "torchvision": "removed on CPU: PyPI's torchvision is CUDA-linked and cannot import with CPU torch; "
    "transformers then uses its PIL image processors",
}

_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._\-]*)==([^\s;]+)")


def normalize(name: str) -> str:
    """PEP 503 name: lower case, runs of ``-_.`` as one ``-``."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(path: str | Path) -> dict[str, str]:
    """``{normalized name: version}`` of every ``name==version`` line of a pip-style lock file.

    Raises FileNotFoundError naming the path when it does not exist, ValueError when it pins nothing.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"lock file {path} does not exist")
    pins = {}
    for line in path.read_text().splitlines():
        m = _PIN.match(line.strip())
        if m:
            pins[normalize(m.group(1))] = m.group(2)
    if not pins:
        raise ValueError(f"lock file {path} pins no package")
    return pins


def installed() -> dict[str, str]:
    """``{normalized name: version}`` of every distribution importable by this interpreter."""
    out = {}
    for dist in md.distributions():
        name = dist.metadata.get("Name")
        if name:
            out.setdefault(normalize(name), dist.version)
    return out


def compare(lock: dict[str, str], env: dict[str, str]) -> list[str]:
    """Differences between a lock and an environment, one readable line each (empty = identical).

    A locked package missing or at another version, and an installed package that is neither locked
    nor in ``ALLOWED_EXTRA``, are differences.
    """
    problems = []
    for name, want in sorted(lock.items()):
        have = env.get(name)
        if have is None:
            problems.append(f"{name}: locked {want}, not installed")
        elif have != want:
            problems.append(f"{name}: locked {want}, installed {have}")
    for name in sorted(env.keys() - lock.keys() - ALLOWED_EXTRA):
        problems.append(f"{name}: installed {env[name]}, not in the lock")
    return problems


def installed_lock_path(prefix: str | None = None) -> Path | None:
    """The lock ``scripts/install.sh`` installed into this venv (``<prefix>/.apet-bench-lock``), or None."""
    marker = Path(prefix or sys.prefix) / ".apet-bench-lock"
    if not marker.is_file():
        return None
    path = Path(marker.read_text().strip())
    if not path.is_absolute():
        path = Path(__file__).resolve().parents[2] / path
    return path


def pip_check() -> tuple[list[str], list[str]]:
    """``pip check`` lines split into (explained, unexplained) by ``KNOWN_PIP_CHECK``."""
    proc = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True)
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip() and "No broken requirements" not in ln]
    explained, unexplained = [], []
    for line in lines:
        (explained if any(k in line for k in KNOWN_PIP_CHECK) else unexplained).append(line)
    return explained, unexplained


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv == ["--pip-check"]:
        explained, unexplained = pip_check()
        for line in explained:
            key = next(k for k in KNOWN_PIP_CHECK if k in line)
            print(f"  {line}  [expected: {KNOWN_PIP_CHECK[key]}]")
        for line in unexplained:
            print(f"  {line}  [UNEXPLAINED]")
        if not explained and not unexplained:
            print("  no broken requirements")
        return 1 if unexplained else 0
    if len(argv) > 1:
        print("apet-bench envcheck: error: usage: python -m apet_bench.envcheck [LOCK_FILE | --pip-check]", file=sys.stderr)
        return 2
    path = Path(argv[0]) if argv else installed_lock_path()
    if path is None:
        print(f"apet-bench envcheck: error: {sys.prefix} was not installed by scripts/install.sh; name the lock file", file=sys.stderr)
        return 2
    try:
        lock = read_lock(path)
    except (FileNotFoundError, ValueError) as exc:
        print(f"apet-bench envcheck: error: {exc}", file=sys.stderr)
        return 2
    problems = compare(lock, installed())
    if problems:
        print(f"[envcheck] {len(problems)} difference(s) from {path}:")
        for p in problems:
            print(f"  {p}")
        return 1
    print(f"[envcheck] every one of the {len(lock)} locked packages is installed at its locked version ({path})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
