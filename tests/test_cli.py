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


# ---------------------------------------------------------------------- the module commands' key=value convention
def _module_main(name):
    import importlib

    module = importlib.import_module("apet_bench.tables.__main__" if name == "tables" else f"apet_bench.{name}")
    return module._main if name == "stats" else module.main


def _one_error_line(capsys):
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("apet-bench: error: ") and "Traceback" not in err, err
    return err


#: Per command: the arguments every call needs (positional table name, required keys).
MODULE_BASE = {
    "flops": ["model=llava15"],
    "latency": ["model=tiny_llava15"],
    "viz": ["image=x.png"],
    "score": ["benchmark=pope", "answers=x.jsonl"],
    "bias": [],
    "tables": ["table1"],
    "inspect": ["model=llava15", "benchmark=mme"],
    "stats": ["mdd"],
    "wandb_logger": [],
}


@pytest.mark.parametrize("name", sorted(MODULE_BASE))
def test_module_cli_rejects_an_unknown_key_in_one_line(name, capsys):
    rc = _module_main(name)([*MODULE_BASE[name], "colour=red"])
    assert rc == 2
    err = _one_error_line(capsys)
    assert "unknown key 'colour'" in err and "keys: " in err, err


@pytest.mark.parametrize("name", sorted([*MODULE_BASE, "plots"]))
@pytest.mark.parametrize("bad", ["results_dir=[1,", "results_dir", "results_dir=it's"])
def test_module_cli_rejects_a_malformed_argument_in_one_line(name, bad, capsys):
    base = MODULE_BASE.get(name, [])
    rc = _module_main(name)([*base, bad])
    assert rc == 2
    err = _one_error_line(capsys)
    assert repr(bad) in err, err


def test_plots_notes_the_table_options_it_ignores(capsys, tmp_path):
    """`make tables TABLE_ARGS=...` hands the tables' options to plots too: they are ignored with a note."""
    assert _module_main("plots")([f"results_dir={tmp_path}", "ref=apet", "colour=red"]) == 0
    err = capsys.readouterr().err
    assert "ignoring option(s) it does not use: ref=apet colour=red" in err


@pytest.mark.parametrize("quoted", [True, False])
@pytest.mark.parametrize("name, args, needle", [
    ("flops", ["model={v}"], "'llava 15'"),
    ("latency", ["model={v}"], "unknown model 'llava 15'"),
    ("viz", ["image={d}/llava 15.png"], "llava 15.png"),
    ("score", ["benchmark=pope", "answers={d}/llava 15.jsonl", "data_root={d}"], "llava 15.jsonl"),
    ("inspect", ["model=llava15", "benchmark=mme", "data_root={d}/llava 15"], "llava 15"),
])
def test_module_cli_takes_a_value_with_spaces(name, args, needle, quoted, capsys, tmp_path):
    """A value with spaces (as the shell hands over `key='a b'` or `"key=a b"`) reaches the command intact:
    the command's own error names it whole."""
    def fill(a):
        key, value = a.split("=", 1)
        value = value.format(v="llava 15", d=tmp_path)
        return f"{key}='{value}'" if quoted and " " in value else f"{key}={value}"

    assert _module_main(name)([fill(a) for a in args]) == 2
    assert needle in _one_error_line(capsys)


@pytest.mark.parametrize("name", ["bias", "plots", "tables"])
def test_module_cli_runs_with_a_quoted_directory_with_spaces(name, capsys, tmp_path):
    where = tmp_path / "a results dir"
    args = (["table3"] if name == "tables" else []) + [f"results_dir='{where}'"]
    assert _module_main(name)(args) == 0
    out = capsys.readouterr().out
    if name == "tables":
        assert (where / "tables" / "table3.md").is_file()
    else:
        assert str(where / "runs") in out, out


@pytest.mark.parametrize("name", sorted([*MODULE_BASE, "plots"]))
def test_module_cli_help_lists_the_declared_keys(name, capsys):
    import importlib

    module = importlib.import_module("apet_bench.tables.__main__" if name == "tables" else f"apet_bench.{name}")
    with pytest.raises(SystemExit) as exc:
        _module_main(name)(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m apet_bench.")
    for key in module._command().keys:
        assert f"  {key.name}" in out, (key.name, out)


def test_module_cli_types_and_required_keys(capsys):
    from apet_bench import latency, score

    assert latency.main(["model=tiny_llava15", "repeats=many"]) == 2
    assert "repeats=many: 'many' is not an integer" in _one_error_line(capsys)
    assert score.main(["answers=x.jsonl"]) == 2
    assert "benchmark=<name> is required" in _one_error_line(capsys)
    args = latency._command().parse(["model=tiny_llava15", "backends=sdpa,eager", "method.params.layer=null",
                                     "method.params.stage=llm", "warmup=0"])
    assert args["backends"] == "sdpa,eager" and args["warmup"] == 0 and args["repeats"] == 10
    assert args["method.params"] == {"layer": None, "stage": "llm"}


@pytest.mark.parametrize("name", sorted([*MODULE_BASE, "plots"]))
def test_docs_page_lists_every_declared_key(name):
    """docs/cli.md has a section per command with one table row per declared key."""
    import importlib

    module = importlib.import_module("apet_bench.tables.__main__" if name == "tables" else f"apet_bench.{name}")
    page = (REPO / "docs" / "cli.md").read_text(encoding="utf-8")
    section = page.split(f"\n### {name}\n", 1)[1].split("\n### ", 1)[0].split("\n## ", 1)[0]
    rows = {line.split("`")[1] for line in section.splitlines() if line.startswith("| `")}
    declared = {k.name + "<p>" if k.is_prefix else k.name for k in module._command().keys}
    assert rows == declared


def test_module_cli_delete_goes_back_to_the_default():
    from apet_bench import latency

    args = latency._command().parse(["model=m", "method.params.a=1", "method.params.b=2", "~method.params.a",
                                     "warmup=5", "~warmup"])
    assert args["method.params"] == {"b": 2} and args["warmup"] == 3
