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


# ------------------------------------------------------------------ generation kwargs from the config
def _compose(tmp_path, *overrides):
    from apet_bench.config import compose

    return compose([f"results_dir={tmp_path / 'results'}", f"cache_dir={tmp_path / 'cache'}", *overrides])


def _samples(run_dir):
    return [json.loads(x) for x in (Path(run_dir) / "samples.jsonl").read_text().splitlines()]


def test_gen_kwargs_reach_the_model_and_are_recorded(tmp_path):
    from apet_bench.runner import execute

    default = execute(_compose(tmp_path / "a", "method=none", "benchmark=demo", "limit=2"))
    used = default.summary["generation_kwargs"]
    (task,) = used
    assert used[task]["max_new_tokens"] > 2  # the demo task's own setting
    assert max(s["output_tokens"] for s in _samples(default.run_dir)) > 2
    out = execute(_compose(tmp_path / "b", "method=none", "benchmark=demo", "limit=2", "+gen_kwargs.max_new_tokens=2"))
    run = json.loads((Path(out.run_dir) / "run.json").read_text())
    assert run["generation_kwargs"][task]["max_new_tokens"] == 2
    # the task's other settings are kept (merged, not replaced)
    assert {k: v for k, v in run["generation_kwargs"][task].items() if k != "max_new_tokens"} == \
        {k: v for k, v in used[task].items() if k != "max_new_tokens"}
    tokens = [s["output_tokens"] for s in _samples(out.run_dir)]
    assert tokens and max(tokens) <= 2


@pytest.mark.parametrize("value, ok", [({"max_new_tokens": 8, "temperature": 0.0, "do_sample": False}, True),
                                       ({"until": "ASSISTANT:"}, True), ({"until": ["a", "b"]}, False), ({"until": "\n"}, False),
                                       ({"until": "a,b"}, False), ({"max_new_tokens": None}, False)])
def test_gen_kwargs_arg(value, ok):
    from apet_bench.config import ConfigError
    from apet_bench.runner import gen_kwargs_arg

    if ok:
        from lmms_eval.utils import simple_parse_args_string

        assert simple_parse_args_string(gen_kwargs_arg(value)) == value  # lmms-eval reads back what was given
    else:
        with pytest.raises(ConfigError, match="gen_kwargs"):
            gen_kwargs_arg(value)
    assert gen_kwargs_arg({}) is None
