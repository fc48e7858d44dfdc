import json
import subprocess
import sys
import textwrap

import pytest

from apet_bench.results import RUN_MARKER, RunStore, collect_provenance, run_name


def _finish(w, name, **extra):
    w.write_json("metrics.json", {"x": 1})
    w.write_json(RUN_MARKER, {"status": "complete", "name": name, **extra})


def test_run_name():
    assert run_name("tiny_llava15", "random", 64, "mme") == "tiny_llava15__random__64__mme"
    assert run_name("qwen25vl", "apet", 0.1, "pope") == "qwen25vl__apet__0.1__pope"
    assert run_name("llava15", "none", 64, "mme") == "llava15__none__full__mme"
    with pytest.raises(ValueError):
        run_name("a/b", "none", None, "mme")


def test_commit_is_atomic_and_skip(tmp_path):
    store = RunStore(tmp_path)
    name = "m__random__64__demo"
    assert not store.is_finished(name)
    with store.open_run(name) as w:
        _finish(w, name)
        # nothing is visible under its final name before the block ends
        assert not store.run_dir(name).exists()
        assert [p.name for p in store.runs_dir.iterdir()][0].startswith(".tmp-")
    assert store.is_finished(name)
    assert json.loads((store.run_dir(name) / "metrics.json").read_text()) == {"x": 1}
    with pytest.raises(FileExistsError):
        with store.open_run(name):
            pass
    assert [r["name"] for r in store.finished_runs()] == [name]


def test_exception_leaves_nothing(tmp_path):
    store = RunStore(tmp_path)
    with pytest.raises(RuntimeError, match="boom"):
        with store.open_run("a__b__1__c") as w:
            w.write_json("metrics.json", {"partial": True})
            raise RuntimeError("boom")
    assert list(store.runs_dir.iterdir()) == []
    assert store.finished_runs() == []


def test_block_without_marker_is_not_committed(tmp_path):
    store = RunStore(tmp_path)
    with pytest.raises(RuntimeError, match="run.json"):
        with store.open_run("a__b__1__c") as w:
            w.write_json("metrics.json", {})
    assert not store.run_dir("a__b__1__c").exists()


def test_force_replaces_finished_run(tmp_path):
    store = RunStore(tmp_path)
    with store.open_run("r__m__1__b") as w:
        _finish(w, "r__m__1__b", v=1)
    with store.open_run("r__m__1__b", force=True) as w:
        _finish(w, "r__m__1__b", v=2)
    assert store.load("r__m__1__b")["v"] == 2
    assert sorted(p.name for p in store.runs_dir.iterdir()) == ["r__m__1__b"]


def test_killed_run_leaves_no_finished_dir_and_resume_cleans_up(tmp_path):
    """A process killed mid-run (SIGKILL: no cleanup) leaves only a hidden staging dir; the next run
    removes it and the run can be done again."""
    code = textwrap.dedent(f"""
        import os, signal
        from apet_bench.results import RunStore
        store = RunStore({str(tmp_path)!r})
        with store.open_run("k__m__1__b") as w:
            w.write_json("metrics.json", {{"half": True}})
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True)
    assert proc.returncode != 0
    store = RunStore(tmp_path)
    leftovers = list(store.runs_dir.iterdir())
    assert len(leftovers) == 1 and leftovers[0].name.startswith(".tmp-k__m__1__b")
    assert not store.is_finished("k__m__1__b") and store.finished_runs() == []
    assert store.clean_stale() == leftovers
    with store.open_run("k__m__1__b") as w:
        _finish(w, "k__m__1__b")
    assert store.is_finished("k__m__1__b")


def test_marker_must_say_complete(tmp_path):
    store = RunStore(tmp_path)
    d = store.run_dir("x__y__1__z")
    d.mkdir(parents=True)
    (d / RUN_MARKER).write_text(json.dumps({"status": "running"}))
    assert not store.is_finished("x__y__1__z")


def test_provenance_fields():
    prov = collect_provenance()
    assert prov["packages"]["torch"].startswith("2.13.0")
    assert prov["packages"]["transformers"] == "5.23.0"
    assert prov["packages"]["lmms-eval"] == "0.7.3"
    assert prov["python"].count(".") == 2
