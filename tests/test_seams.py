"""Seams between the harness and lmms-eval / Hydra: generation kwargs from the config, Hydra's own flags
with the default experiment, lmms-eval's output path, token counts in lmms-eval's logs, samples whose
visual span is within an absolute budget."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from apet_bench.pipeline import generate

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


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """The demo benchmark, 2 samples, method none, run in-process from an empty working directory; a task
    aggregation's submission file is written through lmms-eval's ``generate_submission_file`` with the
    ``cli_args`` the harness passed (as VQAv2/VizWiz/MMBench test aggregations do)."""
    import lmms_eval.evaluator as ev
    from lmms_eval.tasks._task_utils.file_utils import generate_submission_file

    from apet_bench.runner import execute

    tmp = tmp_path_factory.mktemp("demo")
    real = ev.simple_evaluate
    seen = {}

    def simple_evaluate(*args, **kwargs):
        results = real(*args, **kwargs)
        seen["cli_args"] = kwargs.get("cli_args")
        Path(generate_submission_file("probe_submission.json", kwargs.get("cli_args"))).write_text("{}")
        return results

    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp)
        mp.setattr(ev, "simple_evaluate", simple_evaluate)
        out = execute(_compose(tmp, "method=none", "benchmark=demo", "limit=2"))
    return out, tmp, seen


def test_gen_kwargs_reach_the_model_and_are_recorded(tmp_path, demo_run):
    from apet_bench.runner import execute

    default = demo_run[0]
    used = default.summary["generation_kwargs"]
    (task,) = used
    assert used[task]["max_new_tokens"] > 2  # the demo task's own setting
    assert max(s["output_tokens"] for s in _samples(default.run_dir)) > 2
    out = execute(_compose(tmp_path, "method=none", "benchmark=demo", "limit=2", "+gen_kwargs.max_new_tokens=2"))
    run = json.loads((Path(out.run_dir) / "run.json").read_text())
    assert run["generation_kwargs"][task]["max_new_tokens"] == 2
    # the task's other settings are kept (merged, not replaced)
    assert {k: v for k, v in run["generation_kwargs"][task].items() if k != "max_new_tokens"} == \
        {k: v for k, v in used[task].items() if k != "max_new_tokens"}
    tokens = [s["output_tokens"] for s in _samples(out.run_dir)]
    assert tokens and max(tokens) <= 2


def test_lmms_eval_writes_into_the_run_not_the_working_directory(demo_run):
    out, cwd, seen = demo_run
    run_dir = Path(out.run_dir).resolve()
    assert not (cwd / "submissions").exists()
    sub = run_dir / "lmms_eval" / "submissions" / "probe_submission.json"
    assert sub.is_file()  # moved into place with the run
    results = json.loads((run_dir / "lmms_eval" / "results.json").read_text())
    assert results["submission_files"] == [str(sub)]
    assert Path(seen["cli_args"].output_path).name == "lmms_eval"
    assert Path(seen["cli_args"].output_path).parent.name.startswith(".tmp-")  # the run's staging directory


def test_lmms_eval_logs_the_measured_token_counts(demo_run):
    run_dir = Path(demo_run[0].run_dir)
    samples = _samples(run_dir)
    for s in samples:
        assert s["token_counts"] == [{"input_tokens": s["prompt_tokens"], "output_tokens": s["output_tokens"]}]
    eff = json.loads((run_dir / "lmms_eval" / "results.json").read_text())["efficiency"]["overall"]
    assert eff["docs_with_token_counts"] == len(samples) == 2
    assert eff["total_output_tokens"] == sum(s["output_tokens"] for s in samples)
    assert eff["total_input_tokens"] == sum(s["prompt_tokens"] for s in samples)


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


# ------------------------------------------------------------------ a visual span within an absolute budget
def test_sample_within_the_budget_keeps_all_tokens_and_the_next_one_is_compressed():
    from conftest import make_image
    from test_llava_next import TINY_LLAVA_NEXT_CFG

    from apet_bench.methods import build_method
    from apet_bench.models import load_model

    adapter = load_model(dict(TINY_LLAVA_NEXT_CFG))
    small, large = make_image(10, (200, 150)), make_image(11, (224, 224))  # spans 268 and 336 on the tiny NeXT
    method = build_method("random", budget=300, seed=0)
    calls = []
    method.attach = lambda a: method.register_hook(a.vision_tower, lambda *args: calls.append(1))
    gen = {"max_new_tokens": 2}
    with method(adapter):  # attached for the whole run, as the lmms-eval model class does
        hooks = len(method._hook_handles)
        first = generate(adapter, [small], "Is there a dog?", gen, method)
        assert calls == [] and len(method._hook_handles) == hooks  # hooks off for that sample, back after it
        second = generate(adapter, [large], "Is there a dog?", gen, method)
        assert calls  # the method ran again on the next sample
    assert first.uncompressed and first.visual_tokens_in == 268 and first.visual_tokens_llm == 268
    assert first.kept_indices is None and first.planned_layer_visual_tokens == [268] * adapter.num_layers
    assert not second.uncompressed and second.visual_tokens_in == 336 and second.visual_tokens_llm == 300
    # the budget is per visual input: two images of 268 and 280 tokens both fit 300
    two = generate(adapter, [small, make_image(12, (100, 300))], "Same?", gen, build_method("random", budget=300))
    assert two.uncompressed and two.visual_tokens_in == two.visual_tokens_llm == 268 + 280
    ratio = generate(adapter, [small], "Is there a dog?", gen, build_method("random", budget=0.5, seed=0))
    assert not ratio.uncompressed and ratio.visual_tokens_llm == 134  # a ratio always compresses


def test_uncompressed_samples_are_recorded_and_counted(tmp_path):
    from apet_bench.runner import execute

    # LLaVA-1.5's span is 576 per image: budget 576 is accepted up front and leaves every sample whole
    out = execute(_compose(tmp_path, "method=random", "budget=576", "benchmark=demo", "limit=2",
                           "+gen_kwargs.max_new_tokens=2"))
    samples = _samples(out.run_dir)
    assert [s["uncompressed"] for s in samples] == [True, True]
    assert all(s["visual_tokens_llm"] == s["visual_tokens_in"] == 576 for s in samples)
    run = json.loads((Path(out.run_dir) / "run.json").read_text())
    metrics = json.loads((Path(out.run_dir) / "metrics.json").read_text())
    assert run["uncompressed_samples"] == metrics["tokens"]["uncompressed_samples"] == 2


# ------------------------------------------------------------------ sweep summary from what the jobs wrote
def _job(tmp_path, num, outcome):
    """Run one job's callback the way a submitit job process does (its own callback instance)."""
    from omegaconf import OmegaConf

    from apet_bench.hydra_callbacks import ResultsTableCallback

    cfg = OmegaConf.create({"hydra": {"mode": "MULTIRUN", "job": {"num": num},
                                      "runtime": {"output_dir": str(tmp_path / "sweep" / str(num))},
                                      "overrides": {"task": []}}})
    cb = ResultsTableCallback()
    cb.on_job_start(cfg)
    cb.on_job_end(cfg, type("JobReturn", (), {"return_value": outcome})())


def _driver_end(tmp_path):
    from omegaconf import OmegaConf

    from apet_bench.hydra_callbacks import ResultsTableCallback

    cfg = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path / "sweep")}, "sweeper": {"params": {}},
                                      "overrides": {"task": ["method=none,random"]}}})
    driver = ResultsTableCallback()  # no job ran in this process
    driver.on_multirun_start(cfg)
    driver.on_multirun_end(cfg)


def test_sweep_summary_reads_the_outcomes_jobs_wrote(tmp_path, capsys):
    from apet_bench.runner import RunOutcome

    summary = {"method": "none", "metrics": {"mme_perception_score": 12.5}, "num_samples": 2, "weights": "w"}
    _job(tmp_path, 0, RunOutcome("tiny__none__full__mme", "finished", "/r/a", summary))
    _job(tmp_path, 1, RunOutcome("tiny__random__64__mme", "failed", "", {}, error="lmms-eval raised OOM"))
    (tmp_path / "sweep" / "2").mkdir()  # a job that died before returning (e.g. killed by the scheduler)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        _driver_end(tmp_path)
    assert exc.value.code == 1
    out = capsys.readouterr()
    assert "tiny__none__full__mme" in out.out and "12.5" in out.out  # the results table
    assert "lmms-eval raised OOM" in out.out and "job 2" in out.out and "without an outcome" in out.out
    assert "tiny__random__64__mme" in out.err


def test_sweep_summary_exit_code_2_when_no_cell_could_run(tmp_path, capsys):
    from apet_bench.runner import RunOutcome

    for num, method in enumerate(("none", "random")):
        _job(tmp_path, num, RunOutcome(f"tiny__{method}__mme", "missing", "", {}, error="data_root absent"))
    with pytest.raises(SystemExit) as exc:
        _driver_end(tmp_path)
    assert exc.value.code == 2 and "data_root absent" in capsys.readouterr().err


def test_submitit_local_sweep_reports_and_exits_from_the_driver(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    proc = run_cli(["-m", "hydra/launcher=submitit_local", "model=tiny_llava15", "benchmark=mme",
                    f"data_root={tmp_path / 'absent'}", "method=none", f"results_dir={tmp_path / 'results'}"],
                   tmp_path, timeout=600)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "could not run (1 missing, 0 failed)" in proc.stdout
    assert "none of the 1 cell(s) of the sweep could run" in proc.stderr
