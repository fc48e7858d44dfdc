"""logger=wandb: a real run logged offline, read back from W&B's transaction log (no network)."""

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from apet_bench.config import ConfigError, compose
from apet_bench.runner import execute
from apet_bench.wandb_logger import log_finished_run, read_offline_run, run_tags, wandb_group


@pytest.fixture(autouse=True)
def _no_wandb_env(monkeypatch, tmp_path):
    for var in ("WANDB_MODE", "WANDB_DIR", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))  # never the user's settings
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))


def test_run_with_logger_wandb_offline(tmp_path):
    cfg = compose([
        f"results_dir={tmp_path / 'results'}", f"cache_dir={tmp_path / 'cache'}",
        "method=random", "budget=64", "limit=2", "logger=wandb", "wandb.log_samples=true",
    ])
    assert cfg.wandb.mode == "offline"  # the default, without WANDB_MODE
    out = execute(cfg, choices={"model": "tiny_llava15", "method": "random", "benchmark": "demo", "experiment": None})
    run_dir = Path(out.run_dir)
    run = json.loads((run_dir / "run.json").read_text())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    offline = list((tmp_path / "results" / "wandb").glob("offline-run-*"))
    assert len(offline) == 1, offline  # ours only: lmms-eval's WandbLogger attached to it
    rec = read_offline_run(offline[0])
    assert rec["complete"]

    # summary holds the metrics (headline and every lmms-eval metric), token accounting and timing
    for name, value in metrics["metrics"].items():
        if isinstance(value, (int, float)):
            assert rec["summary"][f"metrics/{name}"] == pytest.approx(value)
    assert run["metrics"] and all(rec["summary"][f"metrics/{m}"] == pytest.approx(v) for m, v in run["metrics"].items())
    assert rec["summary"]["tokens/visual_tokens_llm_mean"] == metrics["tokens"]["visual_tokens_llm_mean"] == 64
    assert rec["summary"]["tokens/visual_tokens_in_mean"] == 576
    assert rec["summary"]["timing/prefill_ms_mean"] == pytest.approx(metrics["tokens"]["prefill_ms_mean"])
    assert rec["summary"]["timing/eval_s"] == run["eval_s"]
    # lmms-eval's own logger wrote its sanitized metrics into the same run
    assert f"{run['task']}/mme_perception_score" in rec["summary"]

    # config holds the resolved config, the group choices and provenance
    resolved = OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml"))
    for key in ("model", "method", "benchmark", "budget", "seed", "limit", "results_dir", "wandb"):
        assert rec["config"][key] == resolved[key], key
    assert rec["config"]["groups"] == run["groups"]
    assert rec["config"]["provenance"] == json.loads((run_dir / "provenance.json").read_text())
    assert rec["name"] == run["name"] and rec["group"] == "tiny_llava15__demo" and rec["job_type"] == "eval"
    assert set(rec["tags"]) == {"model:tiny_llava15", "method:random", "budget:64", "benchmark:demo"}
    # the per-sample table was logged
    assert any("samples" in row for row in rec["history"])

    # a finished run logged after the fact (python -m apet_bench.wandb_logger RUN_DIR key=value ...)
    from apet_bench.wandb_logger import main

    assert main([str(run_dir), f"dir={tmp_path / 'later'}", "tags=[x]"]) == 2  # tags: a list, config only
    assert main([str(run_dir), "colour=red"]) == 2
    assert main([str(run_dir), f"dir={tmp_path / 'later'}", "group=later"]) == 0
    (again,) = (tmp_path / "later" / "wandb").glob("offline-run-*")
    rec2 = read_offline_run(again)
    assert rec2["group"] == "later" and rec2["summary"]["metrics/mme_perception_score"] == rec["summary"]["metrics/mme_perception_score"]


def test_logger_none_logs_nothing_and_bad_values_fail(tmp_path):
    assert log_finished_run({"logger": "none", "results_dir": str(tmp_path)}, tmp_path) is None
    assert not (tmp_path / "wandb").exists()
    with pytest.raises(ConfigError, match="logger 'tensorboard'"):
        log_finished_run({"logger": "tensorboard"}, tmp_path)
    with pytest.raises(ConfigError, match="wandb.mode 'cloud'"):
        log_finished_run({"logger": "wandb", "wandb": {"mode": "cloud"}}, tmp_path)


def test_group_and_tags():
    run = {"name": "m__random-stage=llm__144__mme", "model": "m", "method": "random", "budget": 144,
           "benchmark": "mme", "groups": {"experiment": "table1"}}
    assert wandb_group(run) == "table1"
    assert wandb_group({**run, "groups": {}}) == "m__mme"
    assert wandb_group(run, "mine") == "mine"
    assert run_tags({**run, "budget": None}, ["x"]) == [
        "model:m", "method:random-stage=llm", "budget:full", "benchmark:mme", "x"]


def _fake_run(root: Path, method: str = "none", budget=None) -> Path:
    """A finished run directory as the runner writes it (2 samples, 3 decoder layers)."""
    d = root / "runs" / f"m__{method}__{'full' if budget is None else budget}__demo"
    d.mkdir(parents=True)
    (d / "run.json").write_text(json.dumps({
        "status": "complete", "name": d.name, "model": "m", "method": method, "budget": budget, "benchmark": "demo",
        "groups": {"model": "m", "method": method, "benchmark": "demo"}, "metrics": {"acc": 0.5},
        "visual_tokens_llm_mean": 576.0}))
    (d / "metrics.json").write_text(json.dumps({
        "metrics": {"acc": 0.5}, "tokens": {"visual_tokens_in_mean": 576.0, "per_layer": [576, 576, 100]}}))
    (d / "samples.jsonl").write_text("\n".join(json.dumps({"doc_id": i, "layer_visual_tokens": [576, 300 + i, 100]})
                                               for i in range(2)) + "\n")
    return d


def test_dashboard_vanilla_budget_layer_series_and_step_metrics(tmp_path):
    from apet_bench.wandb_logger import log_run_dir

    out = log_run_dir(_fake_run(tmp_path), {"mode": "offline", "dir": str(tmp_path / "w")})
    rec = read_offline_run(out)
    assert rec["config"]["budget"] == 576.0 and rec["config"]["budget_label"] == "full"  # vanilla row plots
    assert not any(isinstance(v, str) and v.startswith("[") for v in rec["summary"].values())  # no JSON lists
    points = [r for r in rec["history"] if "budget" in r]
    assert points and points[0]["metrics/acc"] == 0.5 and points[0]["budget"] == 576.0
    layers = sorted((r["layer"], r["tokens/layer_visual_tokens"]) for r in rec["history"] if "layer" in r)
    assert layers == [(0, 576.0), (1, 300.5), (2, 100.0)]


def test_sweep_is_one_group(monkeypatch):
    from apet_bench import wandb_logger

    monkeypatch.setattr(wandb_logger, "_hydra_sweep_id", lambda: "sweep-2026-01-01-10-00-00")
    a = wandb_group({"model": "m1", "benchmark": "mme", "groups": {}})
    b = wandb_group({"model": "m2", "benchmark": "pope", "groups": {}})
    assert a == b == "sweep-2026-01-01-10-00-00"


def test_online_without_network_ends_within_timeout(tmp_path):
    """A W&B server that cannot be reached (dummy key, a local port nobody listens on) stops the logging
    after wandb.timeout_s; the process exits (a bounded wait here, not a timing assert)."""
    import os
    import subprocess
    import sys

    run_dir = _fake_run(tmp_path)
    code = ("import sys; from apet_bench.wandb_logger import log_finished_run\n"
            f"out = log_finished_run({{'logger': 'wandb', 'wandb': {{'mode': 'online', 'timeout_s': 5, "
            f"'dir': {str(tmp_path / 'w')!r}}}, 'results_dir': {str(tmp_path)!r}}}, {str(run_dir)!r})\n"
            "print('returned', out)\n")
    env = {**os.environ, "WANDB_API_KEY": "x" * 40, "WANDB_BASE_URL": "http://127.0.0.1:9",
           "WANDB_CONFIG_DIR": str(tmp_path / "wc"), "WANDB_CACHE_DIR": str(tmp_path / "wcache")}
    env.pop("WANDB_MODE", None)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0 and "returned None" in proc.stdout, proc.stderr[-2000:]
    assert "the run itself is saved" in proc.stderr
