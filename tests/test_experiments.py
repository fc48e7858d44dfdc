"""Experiment configs table1..table6 (the paper's grids), command-line overrides over sweep params, the
fault-tolerant sweep cell (missing / failed cells recorded with their reason), progress and the SLURM
launcher config. No model is run here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from apet_bench.config import compose, config_dir
from apet_bench.hydra_callbacks import count_sweep_jobs
from apet_bench.report import print_failure_summary
from apet_bench.tables.build import load_paper_numbers

EXP = config_dir() / "experiment"


def _grid(name: str) -> set[tuple]:
    """(model, method label, budget, benchmark) cells an experiment config sweeps (no override)."""
    spec = yaml.safe_load((EXP / f"{name}.yaml").read_text())
    params = spec["hydra"]["sweeper"]["params"]
    model = next(d["override /model"] for d in spec["defaults"] if "override /model" in d)
    methods = str(params.get("method", "")).split(",") if "method" in params else [None]
    budgets = [b.strip() for b in str(params.get("budget", spec["budget"])).split(",")]
    benches = str(params["benchmark"]).split(",")
    variants: list[str] = []
    if "method.params.basis" in params:
        variants = [("apet" if v == "fps" else f"apet-basis={v}") for v in str(params["method.params.basis"]).split(",")]
    elif "method.params.num_basis" in params:
        variants = [("apet" if v == "10" else f"apet-num_basis={v}") for v in str(params["method.params.num_basis"]).split(",")]
    labels = variants or methods
    cells = set()
    for m in labels:
        for b in budgets:
            for bench in benches:
                cells.add((model, m, "full" if m == "none" else b, bench))
    return cells


@pytest.mark.parametrize("table", ["table1", "table2", "table3", "table4", "table5", "table6"])
def test_experiment_grid_matches_paper_table(table):
    """Every (model, method, budget, benchmark) cell of the paper's table is swept, and nothing else."""
    spec = load_paper_numbers()[table]
    want = set()
    for row in spec["rows"]:
        budget = "full" if row["budget"] == "full" else str(row["budget"])
        for col in spec["columns"]:
            want.add((row.get("model", spec["models"][0]), row["method"], budget, col["benchmark"]))
    got = _grid(table)
    if (EXP / f"{table}_qwen.yaml").is_file():
        got |= _grid(f"{table}_qwen")
    assert got == want


@pytest.mark.parametrize("table", ["table1", "table2", "table3", "table4", "table5", "table5_qwen", "table6", "table6_qwen"])
def test_experiment_composes(table):
    cfg = compose([f"experiment={table}", "model=tiny_llava15"])
    assert cfg.model.name == "tiny_llava15"  # command-line group override wins over the experiment default
    assert cfg.tiny_limit == 40 and cfg.benchmark.name in ("mme", "tgif_qa_judged")
    raw = OmegaConf.load(EXP / f"{table}.yaml")
    assert raw.hydra.mode == "MULTIRUN" and raw.tiny_limit == 40


def test_command_line_wins_over_sweeper_params():
    cfg = OmegaConf.create({"hydra": {"sweeper": {"params": {"method": "none,fastv,apet", "budget": "192,128,64",
                                                             "benchmark": "gqa,mme,pope"}},
                                      "overrides": {"task": ["experiment=table1", "benchmark=mme", "method=none,apet"]}}})
    assert count_sweep_jobs(cfg) == 2 * 3 * 1
    cfg.hydra.overrides.task = ["experiment=table1"]
    assert count_sweep_jobs(cfg) == 3 * 3 * 3


def _cell_cfg(tmp_path: Path, **over) -> dict:
    cfg = OmegaConf.to_container(compose(["model=tiny_llava15", "method=none", "benchmark=mme"]), resolve=True)
    cfg.update(results_dir=str(tmp_path / "results"), data_root=str(tmp_path), tiny_limit=40, **over)
    return cfg


def test_run_cell_records_missing_with_reason(tmp_path):
    from apet_bench.sweep import run_cell
    from apet_bench.tables import load_runs

    # data_root without the MME layout: DataError -> a "missing" record, the sweep goes on.
    out = run_cell(_cell_cfg(tmp_path))
    assert out.status == "missing" and "no MME release layout" in out.error
    rec = json.loads((tmp_path / "results" / "runs" / "tiny_llava15__none__full__mme" / "run.json").read_text())
    assert rec["status"] == "missing" and rec["error"] == out.error
    df = load_runs(tmp_path / "results", include_failed=True)
    assert set(df["status"]) == {"missing"} and len(df) == 1
    assert load_runs(tmp_path / "results").empty


def test_run_cell_failure_and_tiny_limit(tmp_path, monkeypatch):
    import apet_bench.runner as runner
    from apet_bench.runner import EvaluationError
    from apet_bench.sweep import run_cell

    seen = {}

    def fake_execute(cfg, choices=None):
        seen["limit"] = cfg["limit"]
        raise EvaluationError("lmms-eval raised RuntimeError: boom")

    monkeypatch.setattr(runner, "execute", fake_execute)
    out = run_cell(_cell_cfg(tmp_path))
    assert out.status == "failed" and "boom" in out.error
    assert seen["limit"] == 40  # tiny model, no limit given -> tiny_limit
    rec = json.loads((tmp_path / "results" / "runs" / "tiny_llava15__none__full__mme" / "run.json").read_text())
    assert rec["status"] == "failed"
    run_cell(_cell_cfg(tmp_path, limit=6))
    assert seen["limit"] == 6  # an explicit limit wins
    text = print_failure_summary([out, out])
    assert "2 run(s) could not run (0 missing, 2 failed)" in text and "boom" in text


def test_slurm_launcher_config():
    raw = yaml.safe_load((config_dir() / "hydra" / "launcher" / "slurm.yaml").read_text())
    assert raw["defaults"] == ["submitit_slurm"] and raw["gpus_per_node"] == 1
    from hydra_plugins.hydra_submitit_launcher.config import SlurmQueueConf

    fields = set(SlurmQueueConf.__dataclass_fields__)
    assert set(raw) - {"defaults"} <= fields  # every key is a real submitit-launcher option


def test_progress_line_counts_and_eta():
    from apet_bench.hydra_callbacks import ResultsTableCallback
    from apet_bench.runner import RunOutcome

    cb = ResultsTableCallback()
    cb.multirun, cb.total, cb.t0 = True, 10, 0.0
    cb.outcomes = [RunOutcome("a", "finished", "", {"num_samples": 40, "eval_s": 20.0}),
                   RunOutcome("b", "missing", "", {}, error="x"), RunOutcome("c", "missing", "", {}, error="x"),
                   RunOutcome("d", "skipped", "", {})]
    cb.durations = [("finished", 120.0), ("missing", 2.0), ("missing", 2.0), ("skipped", 2.0)]
    line = cb._progress_line(cb.outcomes[0])
    assert "4/10 done, 6 left" in line and "finished 1, missing 2, skipped 1" in line
    assert "40 samples in 20.0 s (2.00 samples/s)" in line
    # 6 left x (1/4 x 120 s + 3/4 x 2 s) = 189 s = 3.15 min
    assert "ETA ~3.1 min" in line or "ETA ~3.2 min" in line
