"""Seams between the harness and lmms-eval / Hydra: generation kwargs from the config, Hydra's own flags
with the default experiment, lmms-eval's output path, token counts in lmms-eval's logs, samples whose
visual span is within an absolute budget."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_BENCH = Path(os.environ.get("APET_BENCH_TEST_DATA_ROOT", REPO.parent / "shared" / "benchmarks"))
needs_mme = pytest.mark.skipif(not (SHARED_BENCH / "mme").is_dir(), reason=f"no MME data at {SHARED_BENCH}")


def run_cli(args, tmp_path, timeout=300):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               APET_BENCH_CACHE_DIR=str(tmp_path / "cache"))
    env.pop("APET_BENCH_DATA_ROOT", None)
    cmd = [sys.executable, str(REPO / "run.py"), *args]
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)


# ------------------------------------------------------------------ Hydra's flags with the default experiment
@pytest.mark.parametrize("args, needle", [
    (["budget=32", "--cfg", "job"], "budget: 32"),
    (["--cfg", "job", "limit=3"], "limit: 3"),
    (["hydra/launcher=slurm", "--cfg", "hydra"], "SlurmLauncher"),
])
def test_hydra_flags_work_with_the_default_experiment(tmp_path, args, needle):
    proc = run_cli(args, tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert needle in proc.stdout
    assert "experiment=demo" in proc.stdout or "model:" in proc.stdout  # the default experiment was applied
    assert not (tmp_path / "results").exists()  # printing a config runs nothing


def test_default_experiment_goes_before_the_first_override():
    sys.path.insert(0, str(REPO))
    try:
        from run import with_default_experiment
    finally:
        sys.path.remove(str(REPO))
    assert with_default_experiment(["run.py", "budget=32", "--cfg", "job"]) == \
        ["run.py", "experiment=demo", "budget=32", "--cfg", "job"]
    assert with_default_experiment(["run.py", "--cfg", "job"]) == ["run.py", "--cfg", "job", "experiment=demo"]
    assert with_default_experiment(["run.py", "model=tiny_llava15", "--cfg", "job"]) == \
        ["run.py", "model=tiny_llava15", "--cfg", "job"]


def test_cfg_with_multirun_is_one_line(tmp_path):
    proc = run_cli(["limit=2", "-m", "--cfg", "job"], tmp_path, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "--cfg cannot be combined with -m" in lines[0], proc.stderr[-2000:]
