"""``python -m apet_bench.tables tableN stats=true``: paired Δ sections from synthetic runs."""

from __future__ import annotations

import json

from apet_bench import stats
from apet_bench.tables.__main__ import main


def _mme_run(root, method, budget, wrong_pairs, *, pairs=30, limit=None, seed=0, name_extra=""):
    label = "full" if budget is None else str(budget)
    name = f"m__{method}{name_extra}__{label}__mme"
    d = root / "runs" / name
    d.mkdir(parents=True)
    rows = []
    for j in range(pairs):
        for q in range(2):
            rows.append({"doc_id": 2 * j + q, "sample_id": f"s{j}-{q}", "mme_perception_score": {
                "question_id": f"existence/{j}.jpg", "category": "existence", "score": float(j not in wrong_pairs)}})
    (d / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "run.json").write_text(json.dumps({
        "status": "complete", "name": name, "model": "m", "method": method, "budget": budget, "benchmark": "mme",
        "metrics": {"mme_perception_score": 0.0}, "num_samples": len(rows), "random_weights": False,
        "device": "cpu", "attn_implementation": "sdpa", "seed": seed}))
    run = json.loads((d / "run.json").read_text())
    run["metrics"]["mme_perception_score"] = stats.load_units(d, "mme_perception_score").point
    (d / "run.json").write_text(json.dumps(run))
    (d / "config.yaml").write_text(f"limit: {'null' if limit is None else limit}\nseed: {seed}\n")
    return d


def test_stats_section_marks_real_differences_and_explains_unpaired_cells(tmp_path, capsys):
    _mme_run(tmp_path, "none", None, set())
    _mme_run(tmp_path, "fastv", 64, set())                      # identical to vanilla
    _mme_run(tmp_path, "pdrop", 64, set(range(20)))             # 20 of 30 pairs lost
    _mme_run(tmp_path, "apet", 64, {3})                         # one pair lost
    _mme_run(tmp_path, "visionzip", 64, set(), pairs=20, limit=40)  # other samples: cannot be paired
    assert main(["table1", "model=m", f"results_dir={tmp_path}", "stats=true", "ref=apet", "n_resamples=499"]) == 0
    out = capsys.readouterr().out
    section = out.split("#### Paired Δ", 1)[1]
    assert "Holm-adjusted across the cells of the row" in section  # the rule is stated
    lines = {ln.split("|")[2].strip(): ln for ln in section.splitlines() if ln.startswith("|") and "64" in ln}
    vs_vanilla = section.split("Δ vs apet")[0]
    row = {ln.split("|")[2].strip(): ln.split("|")[3].strip() for ln in vs_vanilla.splitlines()
           if ln.startswith("|") and ln.split("|")[1].strip() == "64"}
    assert row["fastv"] == "+0.0 [+0.0, +0.0]"
    assert row["pdrop"].startswith("-133.3 [") and row["pdrop"].endswith("*")
    assert not row["apet"].endswith("*")  # one pair in 30: not distinguishable
    assert row["visionzip"].startswith("n/a[")
    assert "do not share the same samples" in section
    assert lines  # a vs-apet table exists as well
    assert "Δ vs apet at the same budget" in section
    summary = section.split("indistinguishable at each budget", 1)[1]
    assert "best fastv" in summary and "≈ apet" in summary and "< pdrop" in summary
    assert (tmp_path / "tables" / "table1_ci.md").read_text().startswith("#### Paired Δ")


def test_seed_spread_reported_for_runs_differing_by_seed(tmp_path, capsys):
    _mme_run(tmp_path, "none", None, set())
    for seed, wrong in ((0, {1, 2}), (1, {1, 2, 3, 4}), (2, set())):
        _mme_run(tmp_path, "random", 64, wrong, seed=seed, name_extra=f"-seed={seed}" if seed else "")
    assert main(["table1", "model=m", f"results_dir={tmp_path}", "stats=true", "n_resamples=199"]) == 0
    out = capsys.readouterr().out
    seeds = out.split("#### Seeds", 1)[1]
    # pair scores 200 each; seeds lose 2, 4, 0 of 30 pairs: 186.67, 173.33, 200.0
    values = [200 * (30 - k) / 30 for k in (2, 4, 0)]
    mean, sd, rng = stats.seed_spread(values)
    assert f"{mean:.1f} ± {sd:.1f} over 3 seeds (0, 1, 2)" in seeds and f"range {rng:.1f}" in seeds


def test_bad_stats_option_is_one_line(tmp_path, capsys):
    assert main(["table1", f"results_dir={tmp_path}", "stats=true", "confidence=2"]) == 2
    assert "confidence 2.0 must be in (0, 1)" in capsys.readouterr().err
