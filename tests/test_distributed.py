"""Data-parallel evaluation: ``torchrun --standalone --nproc_per_node 2 run.py ...`` on CPU (gloo) gives the
same merged metrics and answers as one process on the same samples; device and rank from the launcher."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def _samples(run_dir):
    return {s["doc_id"]: s for s in map(json.loads, (Path(run_dir) / "samples.jsonl").read_text().splitlines())}


def test_two_processes_match_one_process(tmp_path):
    from apet_bench.config import compose
    from apet_bench.runner import execute

    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.is_file():
        torchrun = shutil.which("torchrun")
    assert torchrun, "torchrun (part of torch) not found"
    common = ["model=tiny_llava15", "method=none", "benchmark=demo", "limit=4", "+gen_kwargs.max_new_tokens=4",
              f"cache_dir={tmp_path / 'cache'}"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.run(
        [str(torchrun), "--standalone", "--nproc_per_node", "2", str(REPO / "run.py"), *common,
         f"results_dir={tmp_path / 'two'}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("finished ->") == 1  # rank 0 reports and writes the run; rank 1 only evaluates
    two_runs = list((tmp_path / "two" / "runs").glob("tiny_llava15__none__full__demo*"))  # + the gen_kwargs hash
    assert len(two_runs) == 1, two_runs
    two = two_runs[0]
    one = Path(execute(compose([*common, f"results_dir={tmp_path / 'one'}"])).run_dir)

    run_two, run_one = (json.loads((d / "run.json").read_text()) for d in (two, one))
    assert run_two["processes"] == 2 and run_one["processes"] == 1
    assert run_two["num_samples"] == run_one["num_samples"] == 4
    m_two, m_one = (json.loads((d / "metrics.json").read_text()) for d in (two, one))
    assert m_two["metrics"] == m_one["metrics"]
    assert m_two["n_samples"] == m_one["n_samples"]
    s_two, s_one = _samples(two), _samples(one)
    assert sorted(s_two) == sorted(s_one) == [0, 1, 2, 3]
    for doc_id, s in s_one.items():
        for key in ("resps", "filtered_resps", "target", "output_tokens", "prompt_tokens", "visual_tokens_llm"):
            assert s_two[doc_id][key] == s[key], (doc_id, key)
    assert not list((tmp_path / "two" / "runs").glob(".tmp-*"))


@pytest.mark.parametrize("local_rank, count, expected", [
    ("1", 4, "cuda:1"), ("0", 2, "cuda:0"), (None, 4, "cuda"), ("3", 1, "cuda"), ("5", 2, "cuda")])
def test_resolve_device_auto_honours_local_rank(monkeypatch, local_rank, count, expected):
    from apet_bench.models.base import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    if local_rank is None:
        monkeypatch.delenv("LOCAL_RANK", raising=False)
    else:
        monkeypatch.setenv("LOCAL_RANK", local_rank)
    assert resolve_device("auto") == torch.device(expected)


def test_resolve_device_auto_without_cuda_is_cpu(monkeypatch):
    from apet_bench.models.base import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_device("auto") == torch.device("cpu")


def test_world_from_the_launcher_environment(monkeypatch):
    from apet_bench.distributed import init_process_group, world

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    assert world().size == 1 and world().main and not world().distributed
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    w = world()
    assert (w.rank, w.size, w.local_rank, w.main, w.distributed) == (1, 2, 1, False, True)
    with pytest.raises(ValueError, match="MASTER_ADDR"):
        init_process_group("cpu")
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ValueError, match="RANK=2"):
        world()
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(ValueError, match="RANK='x'"):
        world()
