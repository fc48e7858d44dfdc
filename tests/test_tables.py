"""Table aggregators on synthetic run directories: hand-computed Avg., missing cells with reasons,
corrupt / half-written directories reported and left out, the paper's own Avg. reproduced."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from apet_bench.tables import build_table, load_runs, load_runs_report
from apet_bench.tables.__main__ import main as tables_main
from apet_bench.tables.build import load_paper_numbers, paper_avg, relative_average


def _run(root: Path, model: str, method: str, budget, benchmark: str, metrics: dict, *, status="complete",
         error=None, limit=None, random_weights=True) -> Path:
    label = "full" if method == "none" else str(budget)
    name = f"{model}__{method}__{label}__{benchmark}"
    d = root / "runs" / name
    d.mkdir(parents=True)
    summary = {"status": status, "name": name, "model": model, "method": method.split("-")[0],
               "budget": None if method == "none" else budget, "benchmark": benchmark, "metrics": metrics,
               "num_samples": 10, "random_weights": random_weights, "device": "cpu", "attn_implementation": "sdpa"}
    if error:
        summary["error"] = error
    (d / "run.json").write_text(json.dumps(summary))
    (d / "config.yaml").write_text(f"limit: {'null' if limit is None else limit}\n")
    return d


def _table3_runs(root: Path) -> None:
    # Table 3 columns: GQA (exact_match x100), POPE (pope_f1_mean x100), SQA, MME (P + C), MMB.
    _run(root, "m", "none", None, "gqa", {"exact_match": 0.60})
    _run(root, "m", "none", None, "pope", {"pope_f1_mean": 0.80})
    _run(root, "m", "none", None, "mme", {"mme_perception_score": 1500.0, "mme_cognition_score": 500.0})
    _run(root, "m", "apet", 0.1, "gqa", {"exact_match": 0.45})
    _run(root, "m", "apet", 0.1, "pope", {"pope_f1_mean": 0.80})
    _run(root, "m", "apet", 0.1, "mme", {"mme_perception_score": 1200.0, "mme_cognition_score": 400.0}, limit=20)
    _run(root, "m", "apet", 0.1, "scienceqa_img", {"exact_match": 0.5})  # vanilla has no SQA: left out of Avg.


def test_avg_hand_computed(tmp_path):
    _table3_runs(tmp_path)
    t = build_table("table3", load_runs(tmp_path), model="m")
    # Hand-computed: GQA 45/60 = 75 %, POPE 80/80 = 100 %, MME 1600/2000 = 80 % -> mean 85.0 % over 3 of 5.
    ours = t.display[(t.display["Method"] == "apet") & (t.display["Budget"] == "0.1") & (t.display[""] == "ours")].iloc[0]
    assert ours["Avg."].startswith("85.0% (3/5)[")  # flagged: its MME run is limited, the vanilla one is not
    assert ours["MME"].startswith("1600")
    assert ours["GQA"].startswith("45.0")
    van = t.display[(t.display["Method"] == "none") & (t.display[""] == "ours")].iloc[0]
    assert van["Avg."] == "100.0% (3/5)"
    delta = t.display[(t.display["Method"] == "apet") & (t.display["Budget"] == "0.1") & (t.display[""] == "Δ")].iloc[0]
    assert delta["GQA"] == f"{45.0 - 56.1:+.1f}"  # paper Table 3, ApET 10 %: GQA 56.1
    cells = t.cells[(t.cells["method"] == "apet") & (t.cells["budget"] == "0.1")]
    mme = cells[cells["column"] == "MME"].iloc[0]
    assert mme["ours"] == pytest.approx(1600.0) and mme["paper"] == 2055 and mme["delta"] == pytest.approx(1600 - 2055)
    assert "limit=20" in mme["notes"]
    assert any("limited runs" in h for h in t.header)
    mmb = cells[cells["column"] == "MMB"].iloc[0]
    assert mmb["status"] == "missing" and (mmb["reason"] == "not run" or "mmbench_en" in mmb["reason"])
    assert mmb["ours"] is None or mmb["ours"] != mmb["ours"]  # None / NaN


def test_relative_average_matches_definition():
    assert relative_average([50.0, None, 900.0], [100.0, 80.0, 1000.0]) == (70.0, 2)
    assert relative_average([None], [1.0]) == (None, 0)


@pytest.mark.parametrize("name", ["table1", "table2", "table3", "table4"])
def test_paper_avg_reproduced(name):
    """Our Avg. definition applied to the transcribed numbers gives every printed Avg. (to 0.1)."""
    spec = load_paper_numbers()[name]
    for row in spec["rows"]:
        for ours, printed in zip(paper_avg(spec, row), row["avg"]):
            assert ours == pytest.approx(printed, abs=0.051), (name, row["method"], row["budget"])
        assert len(row["values"]) == len(spec["columns"])


def test_corrupt_and_half_written_runs_are_reported_and_left_out(tmp_path, capsys):
    _table3_runs(tmp_path)
    runs = tmp_path / "runs"
    (runs / ".tmp-m__apet__0.2__gqa-123-abc").mkdir()
    (runs / ".tmp-m__apet__0.2__gqa-123-abc" / "config.yaml").write_text("x: 1\n")
    (runs / "m__apet__0.2__pope").mkdir()  # no run.json
    bad = runs / "m__apet__0.2__mme"
    bad.mkdir()
    (bad / "run.json").write_text('{"status": "complete", "name": ')  # truncated
    odd = _run(tmp_path, "m", "pdrop", 0.2, "gqa", {"exact_match": 0.5}, status="running")
    df, problems = load_runs_report(tmp_path)
    assert len(df) == 7
    left_out = {Path(p.path).name: p.reason for p in problems}
    assert set(left_out) == {".tmp-m__apet__0.2__gqa-123-abc", "m__apet__0.2__pope", "m__apet__0.2__mme", odd.name}
    assert "half-written" in left_out[".tmp-m__apet__0.2__gqa-123-abc"]
    assert "unreadable" in left_out["m__apet__0.2__mme"]
    # The CLI still builds the table and lists what it left out.
    assert tables_main(["table3", "model=m", f"results_dir={tmp_path}", "data_root=/ignored"]) == 0
    out = capsys.readouterr().out
    assert "left out 4 run directories" in out and "85.0% (3/5)" in out
    for f in ("table3.md", "table3.csv", "table3_cells.csv", "table3.tex"):
        assert (tmp_path / "tables" / f).is_file()


def test_recorded_failure_reason_in_missing_cell(tmp_path):
    _table3_runs(tmp_path)
    reason = "POPE needs the COCO val2014 images: /data/coco/val2014 not found"
    _run(tmp_path, "m", "visionzip", 0.1, "pope", {}, status="missing", error=reason)
    df = load_runs(tmp_path, include_failed=True)
    t = build_table("table3", df[df["status"] == "complete"], failures=df[df["status"] != "complete"], model="m")
    cell = t.cells[(t.cells["method"] == "visionzip") & (t.cells["budget"] == "0.1") & (t.cells["column"] == "POPE")].iloc[0]
    assert cell["status"] == "missing" and cell["reason"] == reason
    assert any(reason in f for f in t.footnotes)
    assert len(load_runs(tmp_path)) == 7  # failures are not runs


def test_extra_rows_and_empty_results(tmp_path):
    t = build_table("table1", load_runs(tmp_path / "nothing"), model="m")
    assert (t.cells["status"] == "missing").all() and len(t.cells) == 19 * 9
    _run(tmp_path, "m", "random", 64, "mme", {"mme_perception_score": 100.0, "mme_cognition_score": 50.0})
    t = build_table("table1", load_runs(tmp_path), model="m")
    extra = t.display[t.display["Method"] == "random"]
    assert len(extra) == 1 and extra.iloc[0]["MME"].startswith("150")
    with pytest.raises(ValueError, match="unknown table"):
        build_table("table9", load_runs(tmp_path))


def test_submission_split_cell_says_where_the_file_is(tmp_path):
    d = _run(tmp_path, "m", "none", None, "vqav2", {"exact_match": None})
    (d / "lmms_eval").mkdir()
    (d / "lmms_eval" / "results.json").write_text(json.dumps({"submission_files": ["/x/submissions/vqav2-test.json"]}))
    t = build_table("table1", load_runs(tmp_path), model="m")
    cell = t.cells[(t.cells["method"] == "none") & (t.cells["column"] == "VQAv2")].iloc[0]
    assert cell["status"] == "missing" and "evaluation server" in cell["reason"] and "vqav2-test.json" in cell["reason"]


def test_avg_flags_different_limits(tmp_path):
    _run(tmp_path, "m", "none", None, "mme", {"mme_perception_score": 100.0, "mme_cognition_score": 0.0}, limit=40)
    _run(tmp_path, "m", "apet", 64, "mme", {"mme_perception_score": 50.0, "mme_cognition_score": 0.0})
    _run(tmp_path, "m", "apet", 128, "mme", {"mme_perception_score": 80.0, "mme_cognition_score": 0.0}, limit=40)
    t = build_table("table1", load_runs(tmp_path), model="m")
    ours = t.display[t.display[""] == "ours"].set_index(["Method", "Budget"])
    assert ours.loc[("apet", "64"), "Avg."].startswith("50.0% (1/9)[")  # unlimited vs limited vanilla: flagged
    assert ours.loc[("apet", "128"), "Avg."] == "80.0% (1/9)"  # same limit: not flagged
    assert any("limit differs" in f for f in t.footnotes)
