"""run.py end to end (subprocess): bad input gives one line and writes nothing; the default runs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_BENCH = Path(os.environ.get("APET_BENCH_TEST_DATA_ROOT", REPO.parent / "shared" / "benchmarks"))


def run_cli(args, tmp_path, timeout=300):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               APET_BENCH_CACHE_DIR=str(tmp_path / "cache"))
    env.pop("APET_BENCH_DATA_ROOT", None)
    cmd = [sys.executable, str(REPO / "run.py"), f"results_dir={tmp_path / 'results'}", *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def error_line(proc):
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.startswith("apet-bench:")]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return lines[0]


def assert_nothing_written(tmp_path):
    runs = tmp_path / "results" / "runs"
    assert not runs.exists() or not [p for p in runs.iterdir()], list(runs.iterdir())


@pytest.mark.parametrize(
    "args,needle",
    [
        (["model=nosuchmodel"], "unknown model 'nosuchmodel'"),
        (["method=nosuchmethod"], "unknown method 'nosuchmethod'"),
        (["benchmark=nosuchbench"], "unknown benchmark 'nosuchbench'"),
        (["method=random", "budget=0"], "budget 0"),
        (["method=random", "budget=-3"], "budget -3"),
        (["method=random", "budget=577"], "budget 577"),
        (["method=random", "budget=1.5"], "1.5"),
        (["method=random", "benchmark=mme", "data_root=/nonexistent/benchmarks"], "/nonexistent/benchmarks"),
        (["method=random", "benchmark=mme", f"data_root={REPO / 'configs'}"], str(REPO / "configs")),
        (["method=random", "on_corrupt_image=maybe"], "maybe"),
        (["method=random", "logger=tensorboard"], "logger 'tensorboard' is invalid"),
        (["method=random", "logger=wandb", "wandb.mode=sometimes"], "wandb.mode 'sometimes' is invalid"),
        (["model=qwen25vl", "method=none"], "Qwen/Qwen2.5-VL-7B-Instruct"),  # real weights absent offline
        (["method=random", "method.params.stage=sideways"], "sideways"),
    ],
)
def test_bad_input_one_line_error_and_nothing_written(tmp_path, args, needle):
    proc = run_cli(args, tmp_path, timeout=120)
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    line = error_line(proc)
    assert needle in line, line
    assert_nothing_written(tmp_path)


def test_default_main_job_runs_none_and_random_then_skips(tmp_path):
    proc = run_cli([], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = tmp_path / "results" / "runs"
    names = sorted(p.name for p in runs.iterdir())
    assert names == ["tiny_llava15__none__full__demo", "tiny_llava15__random__64__demo"], names
    for name in names:
        run = json.loads((runs / name / "run.json").read_text())
        assert run["status"] == "complete" and run["groups"]["experiment"] == "demo"
        assert run["random_weights"] is True and "pipeline check" in run["note"]
        samples = [json.loads(x) for x in (runs / name / "samples.jsonl").read_text().splitlines()]
        assert len(samples) == run["num_samples"] > 0
        expected = 576 if run["method"] == "none" else 64
        assert {s["visual_tokens_llm"] for s in samples} == {expected}
    assert "not accuracy numbers" in proc.stdout and "mme_perception_score" in proc.stdout
    again = run_cli([], tmp_path)
    assert again.returncode == 0
    assert again.stdout.count("skipped (already finished") == 2, again.stdout[-2000:]


def test_sweep_goes_on_past_a_cell_that_cannot_run(tmp_path):
    """In a multirun a refused cell (budget above the visual tokens) is recorded as missing with its
    reason and the other cells still run (missing cells alone keep exit code 0: a table sweep with absent
    data is a success; a failed evaluation makes it 1)."""
    proc = run_cli(["hydra.mode=MULTIRUN", "method=random", "budget=9999,64", "benchmark=demo", "limit=2"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "tiny_llava15__random__9999__demo: missing (budget 9999" in proc.stderr
    # a sweep in which no cell can run is bad input: exit code 2 with the first reason
    bad = run_cli(["hydra.mode=MULTIRUN", "method=random", "budget=9999,8888", "benchmark=demo"], tmp_path)
    assert bad.returncode == 2 and "none of the 2 cell(s) of the sweep could run" in bad.stderr, bad.stderr[-2000:]
    runs = tmp_path / "results" / "runs"
    done = json.loads((runs / "tiny_llava15__random__64__demo" / "run.json").read_text())
    assert done["status"] == "complete" and done["num_samples"] == 2
    missing = json.loads((runs / "tiny_llava15__random__9999__demo" / "run.json").read_text())
    assert missing["status"] == "missing" and "9999" in missing["error"]
