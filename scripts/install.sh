#!/usr/bin/env bash
# Install apet-bench into a virtual environment and print what was done.
#   bash scripts/install.sh [VENV_DIR]        (default .venv; `make install` calls this)
# Works on a CPU-only machine and on a CUDA machine:
#   * torch==2.13.0 is installed first and pinned for everything after it (scripts/constraints.txt),
#     so no dependency can pull a different (CUDA) torch build;
#   * torchvision (pulled in by lmms-eval) is removed when it cannot import with this torch build
#     (the PyPI wheel is CUDA-linked; with CPU torch it fails with `operator torchvision::nms does
#     not exist`); transformers then uses its PIL image processors;
#   * on a machine with an NVIDIA GPU, APET_BENCH_FLASH_ATTN=1 also builds flash-attn (the `flash` extra).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-.venv}"
PYTHON="${PYTHON:-python3}"
say() { printf '[install] %s\n' "$*"; }

if [ ! -x "$VENV/bin/python" ]; then
  say "creating virtual environment $VENV with $($PYTHON --version 2>&1)"
  "$PYTHON" -m venv "$VENV"
else
  say "using existing virtual environment $VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
QUIET=(-q)

say "installing torch==2.13.0 (the CPU wheel where that is what pip finds, the CUDA build on a CUDA index)"
"${PIP[@]}" install "${QUIET[@]}" "torch==2.13.0" 2>&1 | grep -v "^WARNING: Location" || true
"$VENV/bin/python" -c "import torch,sys; sys.exit(0 if torch.__version__.startswith('2.13.0') else 1)" \
  || { say "ERROR: torch 2.13.0 did not install"; exit 1; }

say "installing apet-bench (editable) with lmms-eval 0.7.3, transformers 5.23.0, hydra, pandas, wandb, accelerate, pytest"
"${PIP[@]}" install "${QUIET[@]}" -c scripts/constraints.txt -e ".[dev]" 2>&1 | grep -v "^WARNING: Location" || true

if "$VENV/bin/python" -c "import torchvision" >/dev/null 2>&1; then
  say "torchvision imports with this torch build: kept"
elif "$VENV/bin/python" -m pip show torchvision >/dev/null 2>&1; then
  say "removing torchvision: it cannot import with this torch build (CPU torch vs CUDA-built torchvision); transformers falls back to PIL image processors"
  "${PIP[@]}" uninstall -y -q torchvision
fi

if [ "${APET_BENCH_FLASH_ATTN:-0}" = "1" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && "$VENV/bin/python" -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    say "building flash-attn against the installed torch (extra 'flash')"
    "${PIP[@]}" install "${QUIET[@]}" -c scripts/constraints.txt --no-build-isolation "flash-attn>=2.6"
  else
    say "APET_BENCH_FLASH_ATTN=1 ignored: no CUDA device (flash_attention_2 needs one)"
  fi
fi

"$VENV/bin/python" - <<'PY'
import importlib.metadata as md

def version(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None

names = ["torch", "transformers", "lmms-eval", "hydra-core", "pandas", "wandb", "accelerate", "datasets", "flash-attn", "torchvision"]
print("[install] installed: " + ", ".join(f"{n} {version(n)}" for n in names if version(n)))
import torch
dev = f"cuda ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else "cpu only"
print(f"[install] device: {dev}; checking that lmms_eval.evaluator and apet_bench import ...", end=" ", flush=True)
import lmms_eval.evaluator  # noqa: F401  (fails here if torchvision and torch are mismatched)
import apet_bench.eval.lmms_model  # noqa: F401
print("ok")
PY
touch "$VENV/.apet-bench-installed"
say "done: $VENV is ready"
