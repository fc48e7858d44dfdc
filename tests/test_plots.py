"""Accuracy-efficiency plots from synthetic run directories."""

import json

import pytest

from apet_bench import plots


def _run(root, model, method, budget, bench="demo", *, score, layer_avg, ms, params=None):
    label = "full" if budget is None else str(budget)
    name = f"{model}__{method}__{label}__{bench}"
    d = root / "runs" / name
    d.mkdir(parents=True)
    (d / "run.json").write_text(json.dumps({
        "status": "complete", "name": name, "groups": {}, "model": model, "method": method,
        "method_params": params or {}, "budget": budget, "benchmark": bench, "task": "t",
        "metrics": {"mme_perception_score": score, "mme_cognition_score": score / 2},
        "num_samples": 4, "visual_tokens_llm_mean": layer_avg, "layer_average_visual_tokens": layer_avg,
        "random_weights": True, "device": "cpu", "attn_implementation": "sdpa", "eval_s": 1.0, "wall_s": 1.0}))
    (d / "metrics.json").write_text(json.dumps({"tokens": {"prefill_ms_mean": ms}, "missing_subtasks": []}))
    (d / "config.yaml").write_text("limit: 4\n")
    return d


def test_fallback_axis_when_flops_cannot_count(tmp_path):
    """Model 'm' is unknown to apet_bench.flops: x = layer-average visual tokens, labelled so."""
    _run(tmp_path, "m", "none", None, score=100.0, layer_avg=576, ms=40.0)
    for b, s, ms in [(64, 60.0, 10.0), (128, 80.0, 15.0), (192, 90.0, 20.0)]:
        _run(tmp_path, "m", "random", b, score=s, layer_avg=b, ms=ms)
    _run(tmp_path, "m", "apet", 64, score=70.0, layer_avg=64, ms=11.0)
    out = tmp_path / "plots"
    assert plots.main([f"results_dir={tmp_path}", f"out_dir={out}", "format=md"]) == 0  # format: a table-only option
    png, svg = out / "acc_eff__m__demo.png", out / "acc_eff__m__demo.svg"
    assert png.stat().st_size > 10_000
    text = svg.read_text()
    assert "layer-average visual tokens (TFLOPs not countable" in text and "prefill TFLOPs of the" not in text
    assert "mme_perception_score" in text and "mme_cognition_score" in text  # one row per metric
    assert "random" in text and "apet" in text and "prefill ms" in text
    assert "not accuracy numbers" in text
    assert "acc_eff__m__demo.png" in (out / "index.md").read_text()
    df = plots.add_efficiency(plots._load_runs(tmp_path))
    assert df["tflops"].isna().all()
    assert sorted(df[df["method"] == "random"]["prefill_ms"]) == [10.0, 15.0, 20.0]


def test_tflops_axis_from_apet_bench_flops(tmp_path, monkeypatch):
    pytest.importorskip("apet_bench.flops")
    _run(tmp_path, "tiny_llava15", "none", None, score=100.0, layer_avg=576, ms=40.0)
    _run(tmp_path, "tiny_llava15", "random", 64, score=60.0, layer_avg=64, ms=10.0)
    out = tmp_path / "plots"
    assert plots.main([f"results_dir={tmp_path}", f"out_dir={out}"]) == 0
    svg = (out / "acc_eff__tiny_llava15__demo.svg").read_text()
    assert "prefill TFLOPs of the full-size model" in svg
    cache = json.loads((out / ".flops_cache.json").read_text())
    values = {json.loads(k)[1]: v for k, v in cache.items()}
    assert all(len(json.loads(k)[4]) == 12 for k in cache)  # keyed by the counter's source hash
    assert values["none"] > 3 * values["random"] > 0  # 576 vs 64 visual tokens on LLaVA-1.5-7B
    # a second call reads the cache: no FLOPs counting at all
    import apet_bench.flops

    monkeypatch.setattr(apet_bench.flops, "count_flops", lambda *a, **k: pytest.fail("count_flops called"))
    assert plots.main([f"results_dir={tmp_path}", f"out_dir={out}"]) == 0


def test_no_runs_is_not_an_error(tmp_path, capsys):
    assert plots.main([f"results_dir={tmp_path}"]) == 0
    assert "nothing to plot" in capsys.readouterr().out
    with pytest.raises(ValueError, match="no run of model 'x'"):
        plots.plot_accuracy_efficiency(plots.add_efficiency(plots._load_runs(tmp_path)), "x", "demo", tmp_path)


def test_stats_error_bars_are_paired_intervals_vs_vanilla(tmp_path):
    """stats=true: each compressed run's bar = vanilla score + the paired bootstrap interval of Δ."""
    from apet_bench import stats

    def samples(d, wrong):
        rows = []
        for j in range(12):  # 12 image pairs of one subtask, two questions each
            for q in range(2):
                rows.append({"doc_id": 2 * j + q, "sample_id": f"s{j}-{q}", "mme_perception_score": {
                    "question_id": f"existence/{j}.jpg", "category": "existence", "score": float(j >= wrong)}})
        (d / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        run = json.loads((d / "run.json").read_text())
        run["metrics"] = {"mme_perception_score": stats.load_units(d, "mme_perception_score").point}
        (d / "run.json").write_text(json.dumps(run))

    samples(_run(tmp_path, "m", "none", None, score=0.0, layer_avg=576, ms=40.0), wrong=0)
    samples(_run(tmp_path, "m", "random", 64, score=0.0, layer_avg=64, ms=10.0), wrong=6)
    df = plots.add_intervals(plots._load_runs(tmp_path), n_resamples=499)
    van = df[df["method"] == "none"].iloc[0]
    rnd = df[df["method"] == "random"].iloc[0]
    assert van["metric.mme_perception_score"] == 200.0 and rnd["metric.mme_perception_score"] == 100.0
    lo, hi = rnd["ci_low.mme_perception_score"], rnd["ci_high.mme_perception_score"]
    assert lo < 100.0 < hi < 200.0  # 6 of 12 pairs lost: the interval excludes the vanilla score
    out = tmp_path / "plots"
    assert plots.main([f"results_dir={tmp_path}", f"out_dir={out}", "stats=true", "n_resamples=199"]) == 0
    assert "error bars: vanilla score + 95% paired bootstrap interval" in (out / "acc_eff__m__demo.svg").read_text()
