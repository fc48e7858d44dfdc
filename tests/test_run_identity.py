"""A finished run is reused only for the request that produced it; runs of one identity never race;
checks that would fail after the evaluation come before the model loads; stale staging directories
are judged safely on a file system shared by several hosts."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from apet_bench.config import ConfigError, compose
from apet_bench.results import RunStore
from apet_bench.runner import execute

REPO = Path(__file__).resolve().parents[1]
SHARED_BENCH = Path(os.environ.get("APET_BENCH_TEST_DATA_ROOT", REPO.parent / "shared" / "benchmarks"))
needs_mme = pytest.mark.skipif(not (SHARED_BENCH / "mme").is_dir(), reason=f"no MME data at {SHARED_BENCH}")


def cfg_for(tmp_path, *overrides):
    return compose([f"results_dir={tmp_path / 'results'}", f"cache_dir={tmp_path / 'cache'}", "limit=2", *overrides])


def _no_model_load(monkeypatch):
    from apet_bench import runner

    def refuse(model_cfg):
        raise AssertionError("the model was loaded before the check")

    monkeypatch.setattr(runner, "_load_adapter", refuse)


def test_seeds_and_generation_settings_are_separate_runs(tmp_path):
    a = execute(cfg_for(tmp_path, "method=random", "seed=0"))
    b = execute(cfg_for(tmp_path, "method=random", "seed=1"))
    assert a.status == b.status == "finished" and a.name != b.name and "seed=1" in b.name
    assert json.loads((Path(b.run_dir) / "run.json").read_text())["identity"]["seed"] == 1
    c = execute(cfg_for(tmp_path, "method=random", "seed=1", "+gen_kwargs.max_new_tokens=2"))
    assert c.status == "finished" and c.name not in (a.name, b.name)
    assert execute(cfg_for(tmp_path, "method=random", "seed=1")).status == "skipped"
    names = sorted(d.name for d in (tmp_path / "results" / "runs").iterdir() if not d.name.startswith("."))
    assert names == sorted([a.name, b.name, c.name])


def test_a_run_without_matching_identity_is_rerun_and_says_why(tmp_path, capsys):
    first = execute(cfg_for(tmp_path, "method=random"))
    run_json = Path(first.run_dir) / "run.json"
    rec = json.loads(run_json.read_text())
    rec["identity"]["method"]["params"]["stage"] = "edited"  # as if made by another request
    run_json.write_text(json.dumps(rec))
    again = execute(cfg_for(tmp_path, "method=random"))
    assert again.status == "finished" and again.name == first.name
    assert "method.{params.stage} changed" in capsys.readouterr().err
    assert execute(cfg_for(tmp_path, "method=random")).status == "skipped"


@needs_mme
def test_changed_data_file_reruns_instead_of_reusing(tmp_path, capsys):
    root = tmp_path / "data"
    shutil.copytree(SHARED_BENCH / "mme" / "text_translation", root / "mme" / "text_translation")
    shutil.copytree(SHARED_BENCH / "mme_ground_truth", root / "mme_ground_truth")
    args = ("benchmark=mme", f"data_root={root}", "method=none")
    first = execute(cfg_for(tmp_path, *args))
    assert first.status == "finished" and execute(cfg_for(tmp_path, *args)).status == "skipped"
    image = sorted((root / "mme" / "text_translation").glob("*.png"))[0]
    image.write_bytes(image.read_bytes() + b"\0")  # another file (PNG readers ignore bytes after IEND)
    second = execute(cfg_for(tmp_path, *args))
    assert second.status == "finished" and second.name == first.name
    assert "data_fingerprint changed" in capsys.readouterr().err
    assert second.summary["identity"]["data_fingerprint"] != first.summary["identity"]["data_fingerprint"]


def _run_py(tmp_path, *args, env=None):
    e = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
         "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.Popen(
        [sys.executable, str(REPO / "run.py"), f"results_dir={tmp_path / 'results'}",
         f"cache_dir={tmp_path / 'cache'}", *args],
        cwd=tmp_path, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_two_identical_runs_at_once_both_exit_0_with_one_result(tmp_path):
    args = ("model=tiny_llava15", "method=random", "benchmark=demo", "limit=2")
    procs = [_run_py(tmp_path, *args) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    said = " ".join(o[0] for o in outs)
    assert "finished" in said and "skipped" in said  # one evaluated, the other reused its result
    runs = [d.name for d in (tmp_path / "results" / "runs").iterdir() if not d.name.startswith(".")]
    assert runs == ["tiny_llava15__random__64__demo"]


def test_lock_waits_for_the_holder(tmp_path):
    store = RunStore(tmp_path)
    from apet_bench.results import RunLockTimeout

    waits = []
    with store.lock("a__b__1__c"):
        # filelock locks are per process on flock; a second FileLock object in this process re-enters,
        # so the contention is checked from a child process
        code = ("import sys; from apet_bench.results import RunStore, RunLockTimeout\n"
                f"s = RunStore({str(tmp_path)!r})\n"
                "try:\n"
                "    with s.lock('a__b__1__c', timeout_s=0.5, on_wait=print): pass\n"
                "except RunLockTimeout as e: print('timeout', e); sys.exit(3)\n")
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 3 and "another process" in r.stdout, r.stdout + r.stderr
    with store.lock("a__b__1__c", timeout_s=0.5, on_wait=waits.append):
        pass
    assert waits == [] and RunLockTimeout


def test_unwritable_results_dir_fails_before_loading(tmp_path, monkeypatch):
    _no_model_load(monkeypatch)
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(ConfigError, match="is not writable"):
        execute(compose([f"results_dir={blocker / 'results'}", f"cache_dir={tmp_path / 'cache'}", "method=random"]))


@needs_mme
def test_odd_mme_limit_fails_before_loading(tmp_path, monkeypatch):
    _no_model_load(monkeypatch)
    with pytest.raises(ConfigError, match="limit 3 is odd"):
        execute(cfg_for(tmp_path, "benchmark=mme", f"data_root={SHARED_BENCH}", "limit=3"))


@pytest.mark.skipif(not (SHARED_BENCH / "tgif_qa").is_dir(), reason=f"no TGIF-QA data at {SHARED_BENCH}")
def test_down_judge_fails_before_loading(tmp_path, monkeypatch):
    from apet_bench.judge import JudgeError

    _no_model_load(monkeypatch)
    with pytest.raises(JudgeError, match="127.0.0.1:9/v1 is not reachable"):
        execute(cfg_for(tmp_path, "model=tiny_video_llava", "method=none", "benchmark=tgif_qa_judged",
                        f"data_root={SHARED_BENCH}", "benchmark.judge.base_url=http://127.0.0.1:9/v1"))


def test_stale_staging_is_judged_per_host(tmp_path, monkeypatch):
    from apet_bench import results

    store = RunStore(tmp_path)
    store.runs_dir.mkdir(parents=True)
    dead = 2 ** 22 + 12345  # above pid_max's default: no process has it
    here = results._host_tag()
    mine_dead = store.runs_dir / f".tmp-m__x__1__b-{here}-{dead}-abc123"
    other_host = store.runs_dir / f".tmp-m__x__1__b-othernode-{dead}-abc124"
    other_run = store.runs_dir / f".tmp-m__y__1__b-othernode-{dead}-abc125"
    for d in (mine_dead, other_host, other_run):
        d.mkdir()
    # a PID is meaningful only on its own host: another node's run in progress is kept
    assert store.clean_stale() == [mine_dead]
    assert other_host.is_dir() and other_run.is_dir()
    # whoever holds the run's lock knows nobody else is writing that run, on any host
    with store.lock("m__x__1__b"):
        assert store.clean_stale(locked_name="m__x__1__b") == [other_host]
    assert other_run.is_dir()
    with store.open_run("m__x__1__b") as w:
        assert here in w.staging.name
        w.write_json("run.json", {"status": "complete"})


def test_killed_run_resumes_at_k_and_matches_an_uninterrupted_run(tmp_path):
    """A run killed (SIGKILL) after k=2 answered samples continues at sample 2; the finished run equals
    one made without interruption (answers, kept visual tokens, metrics)."""
    args = ["method=random", "limit=4"]
    killed = tmp_path / "killed"
    code = (
        "import os, signal, sys\n"
        "from apet_bench.config import compose\n"
        "from apet_bench import runner\n"
        f"cfg = compose([{'results_dir=' + str(killed / 'results')!r}, {'cache_dir=' + str(tmp_path / 'cache')!r}, *{args!r}])\n"
        "from omegaconf import OmegaConf\n"
        "adapter = runner._load_adapter(OmegaConf.to_container(cfg.model, resolve=True))\n"
        "import apet_bench.eval.lmms_model as lm\n"
        "orig, n = lm.generate, [0]\n"
        "def gen(*a, **k):\n"
        "    n[0] += 1\n"
        "    if n[0] == 3:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return orig(*a, **k)\n"
        "lm.generate = gen\n"
        "runner.execute(cfg)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode != 0, proc.stderr[-2000:]
    assert not [d for d in (killed / "results" / "runs").iterdir() if not d.name.startswith(".")]
    (partial,) = (killed / "results" / "partial").glob("*.jsonl")
    assert len(partial.read_text().splitlines()) == 2

    from apet_bench import runner

    calls = []
    from omegaconf import OmegaConf

    runner._load_adapter(OmegaConf.to_container(compose(args).model, resolve=True))
    import apet_bench.eval.lmms_model as lm

    orig = lm.generate

    def counting(*a, **k):
        calls.append(1)
        return orig(*a, **k)

    lm.generate = counting
    try:
        resumed = execute(compose([f"results_dir={killed / 'results'}", f"cache_dir={tmp_path / 'cache'}", *args]))
        n_resumed = len(calls)
        plain = execute(compose([f"results_dir={tmp_path / 'plain'}", f"cache_dir={tmp_path / 'cache'}", *args]))
    finally:
        lm.generate = orig
    assert n_resumed == 2 and resumed.summary["resumed_samples"] == 2 and not partial.exists()

    def content(out):
        rows = [json.loads(x) for x in (Path(out.run_dir) / "samples.jsonl").read_text().splitlines()]
        keep = ("doc_id", "resps", "filtered_resps", "kept_indices", "visual_tokens_llm", "layer_visual_tokens")
        return [{k: r.get(k) for k in keep} for r in rows], json.loads((Path(out.run_dir) / "metrics.json").read_text())["metrics"]

    assert content(resumed) == content(plain)
