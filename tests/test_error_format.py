"""Every command ends bad input the same way: one line ``apet-bench: error: ...`` on stderr, exit code 2,
nothing written under the results directory (no ``runs/`` entry, no ``hydra/<date>/<time>/``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _call(args, tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               APET_BENCH_CACHE_DIR=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run([sys.executable, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


RUN = str(REPO / "run.py")
CASES = {
    "run.py hydra override typo": [RUN, "methd=apet"],
    "run.py bad budget": [RUN, "method=random", "budget=0"],
    "run.py bad override syntax": [RUN, "budget=[1,"],
    "sweep hydra override typo": ["-m", "apet_bench.sweep", "model=tiny_llava15", "methd=apet"],
    "sweep nothing chosen": ["-m", "apet_bench.sweep", "limit=2"],
    "score": ["-m", "apet_bench.score", "benchmark=nosuch", "answers=/nonexistent.jsonl"],
    "flops": ["-m", "apet_bench.flops", "model=nosuch"],
    "latency": ["-m", "apet_bench.latency", "model=tiny_llava15", "backends=bogus"],
    "viz": ["-m", "apet_bench.viz", "image=/nonexistent.png"],
    "bias": ["-m", "apet_bench.bias", "colour=red"],
    "tables": ["-m", "apet_bench.tables", "table99"],
    "tables without a name": ["-m", "apet_bench.tables"],
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, tmp_path):
    args = list(CASES[case])
    if args[0] == RUN or args[1] == "apet_bench.sweep":
        args.append(f"results_dir={tmp_path / 'results'}")
    proc = _call(args, tmp_path)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("apet-bench: error: "), proc.stderr[-2000:]
    written = [p for p in (tmp_path / "results").rglob("*")] if (tmp_path / "results").exists() else []
    assert written == [], written


def test_unwritable_results_dir_is_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where a directory is expected")
    proc = _call([RUN, "method=random", f"results_dir={blocker / 'results'}"], tmp_path)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("apet-bench: error: "), proc.stderr[-2000:]
    assert str(blocker) in lines[0]
