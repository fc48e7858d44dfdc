#!/usr/bin/env bash
# Install apet-bench into a virtual environment from the lock, check it, and print what was done.
#   bash scripts/install.sh [VENV_DIR]        (default .venv; `make install` calls this)
# Every package comes at the exact version of one lock file (scripts/lock.sh writes them):
#   requirements/lock-cpu.txt   CPU machines: torch 2.13.0+cpu, no torchvision
#   requirements/lock-cuda.txt  CUDA machines: PyPI's CUDA torch build, torchvision, nvidia-* pinned
# The lock is chosen by APET_BENCH_LOCK=cpu|cuda, else cuda where `nvidia-smi -L` lists a GPU.
# The CPU lock's torch wheel comes from pip's find-links when it holds it, else PyTorch's CPU index.
# With APET_BENCH_FLASH_ATTN=1 on a CUDA machine, flash-attn (FLASH_ATTN_VERSION) is built against
# the installed torch. Then the environment is compared with the lock and a 2-sample demo
# evaluation runs; any difference or failure stops the install (exit 1).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-.venv}"
PYTHON="${PYTHON:-python3}"
FLASH_ATTN_VERSION="${FLASH_ATTN_VERSION:-2.8.3}"
say() { printf '[install] %s\n' "$*"; }

variant="${APET_BENCH_LOCK:-}"
if [ -z "$variant" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q GPU; then variant=cuda; else variant=cpu; fi
fi
case "$variant" in cpu|cuda) ;; *) echo "[install] error: APET_BENCH_LOCK=$variant (expected cpu or cuda)" >&2; exit 2;; esac
LOCK="requirements/lock-$variant.txt"

if [ ! -x "$VENV/bin/python" ]; then
  say "creating virtual environment $VENV with $($PYTHON --version 2>&1)"
  "$PYTHON" -m venv "$VENV"
else
  say "using existing virtual environment $VENV"
fi
VPY="$VENV/bin/python"

uv_version="$(sed -n 's/^uv==\([^ ]*\).*/\1/p' "$LOCK")"
say "bootstrapping uv==$uv_version (the lock's version) into $VENV"
"$VPY" -m pip install -q --disable-pip-version-check "uv==$uv_version" 2>&1 | grep -v "^WARNING: Location" || true
UV=("$VENV/bin/uv" pip)

src=()
if [ "$variant" = cpu ]; then
  torch_pin="$(sed -n 's/^torch==\([^ ]*\).*/\1/p' "$LOCK")"
  links="$("$VPY" -m pip config get global.find-links 2>/dev/null || true)"
  if [ -n "$links" ] && ls "$links"/torch-"$torch_pin"-*.whl >/dev/null 2>&1; then
    src=(--find-links "$links")
  else
    src=(--extra-index-url https://download.pytorch.org/whl/cpu --index-strategy unsafe-best-match)
  fi
fi
say "installing exactly $LOCK ($(grep -c '^[A-Za-z0-9]' "$LOCK") packages)"
"${UV[@]}" sync --python "$VPY" --quiet "${src[@]}" "$LOCK"
say "installing apet-bench itself (editable, no dependencies: they came from the lock)"
"${UV[@]}" install --python "$VPY" --quiet --no-deps -e .

if [ "${APET_BENCH_FLASH_ATTN:-0}" = "1" ]; then
  if [ "$variant" = cuda ] && "$VPY" -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    say "building flash-attn==$FLASH_ATTN_VERSION against the installed torch (extra 'flash')"
    "${UV[@]}" install --python "$VPY" --no-build-isolation "flash-attn==$FLASH_ATTN_VERSION"
  else
    say "APET_BENCH_FLASH_ATTN=1 ignored: no CUDA device (flash_attention_2 needs one)"
  fi
fi
echo "$LOCK" > "$VENV/.apet-bench-lock"

say "checking the environment against $LOCK"
"$VPY" -m apet_bench.envcheck "$LOCK"
say "pip check (known, explained complaints are listed in the README):"
"$VPY" -m apet_bench.envcheck --pip-check || true

say "running a 2-sample demo evaluation (tiny random-weight LLaVA-1.5, method none)"
tmp="$(mktemp -d)"
if ! HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 "$VPY" run.py method=none benchmark=demo \
      limit=2 results_dir="$tmp" cache_dir="$tmp/cache" hydra.run.dir="$tmp/hydra" >"$tmp/log" 2>&1; then
  cat "$tmp/log" >&2
  say "ERROR: the demo evaluation failed (log above)"
  rm -rf "$tmp"; exit 1
fi
grep -q "\"status\": \"complete\"" "$tmp"/runs/*/run.json || { cat "$tmp/log" >&2; say "ERROR: the demo evaluation wrote no finished run"; rm -rf "$tmp"; exit 1; }
rm -rf "$tmp"
"$VPY" - <<'PY'
import torch
dev = f"cuda ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else "cpu only"
print(f"[install] demo evaluation ok; torch {torch.__version__}, device: {dev}")
PY
touch "$VENV/.apet-bench-installed"
say "done: $VENV is ready"
