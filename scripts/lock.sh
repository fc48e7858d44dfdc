#!/usr/bin/env bash
# Regenerate the dependency locks from pyproject.toml with uv, then print what changed.
#   bash scripts/lock.sh            (`make lock` calls this)
# Two locks, one per torch build (the rest of each lock is resolved against that build):
#   requirements/lock-cpu.txt   torch==<TORCH_VERSION>+cpu (PyTorch's CPU wheel); no torchvision
#                               (lmms-eval asks for it, but PyPI's wheel is CUDA-linked and cannot
#                               import with CPU torch; transformers uses its PIL image processors)
#   requirements/lock-cuda.txt  torch==<TORCH_VERSION> from PyPI (its CUDA build, nvidia-* and triton
#                               pinned), torchvision included
# Both target CPython 3.11 on x86_64 Linux (manylinux_2_28). flash-attn is not locked: it is built
# against the installed torch by scripts/install.sh (APET_BENCH_FLASH_ATTN=1), at a pinned version.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
PY_VERSION="${LOCK_PYTHON_VERSION:-3.11}"
PLATFORM="${LOCK_PLATFORM:-x86_64-manylinux_2_28}"
UV="${UV:-uv}"
command -v "$UV" >/dev/null 2>&1 || { echo "lock: uv not found (pip install uv, or make install first)" >&2; exit 2; }
say() { printf '[lock] %s\n' "$*"; }
tmp="$(mktemp -d)"; trap 'rm -rf "$tmp"' EXIT

# Where the +cpu torch wheel comes from: pip's find-links if this machine has one holding it,
# otherwise PyTorch's CPU index.
cpu_src=()
links="$(python3 -m pip config get global.find-links 2>/dev/null || true)"
if [ -n "$links" ] && ls "$links"/torch-"$TORCH_VERSION"+cpu-*.whl >/dev/null 2>&1; then
  cpu_src=(--find-links "$links")
else
  cpu_src=(--extra-index-url https://download.pytorch.org/whl/cpu --index-strategy unsafe-best-match)
fi

common=(pyproject.toml --extra dev --extra docs --python-version "$PY_VERSION" --python-platform "$PLATFORM"
        --no-config --custom-compile-command "make lock")
# The torch build each lock is resolved against (checked in, so the lock's header names them).
echo "torch==${TORCH_VERSION}+cpu" > requirements/torch-cpu.txt
echo "torch==${TORCH_VERSION}" > requirements/torch-cuda.txt

for variant in cpu cuda; do
  out="requirements/lock-$variant.txt"
  [ -f "$out" ] && cp "$out" "$tmp/old-$variant.txt" || : > "$tmp/old-$variant.txt"
  extra=()
  if [ "$variant" = cpu ]; then extra=("${cpu_src[@]}" --no-emit-package torchvision); fi
  say "resolving $out (torch ${TORCH_VERSION}, ${variant})"
  "$UV" pip compile "${common[@]}" "${extra[@]}" -c "requirements/torch-$variant.txt" -o "$out" --quiet
  python3 - "$tmp/old-$variant.txt" "$out" <<'PY'
import re, sys
def pins(path):
    out = {}
    for line in open(path):
        m = re.match(r"^([A-Za-z0-9_.\-]+)==(\S+)", line)
        if m:
            out[m.group(1).lower()] = m.group(2)
    return out
old, new = pins(sys.argv[1]), pins(sys.argv[2])
changes = [f"  + {k}=={new[k]}" for k in sorted(new.keys() - old.keys())]
changes += [f"  - {k}=={old[k]}" for k in sorted(old.keys() - new.keys())]
changes += [f"  ~ {k} {old[k]} -> {new[k]}" for k in sorted(old.keys() & new.keys()) if old[k] != new[k]]
print(f"[lock] {sys.argv[2]}: {len(new)} packages; " + (f"{len(changes)} changed:" if changes else "unchanged"))
for c in changes:
    print(c)
PY
done
