"""Positional-bias metric on synthetic selectors with known answers, and from run directories."""

import json

import numpy as np
import pytest

from apet_bench.bias import bias_table, index_trend, main, plot_bias, position_determinism, positional_bias

N, K, S = 576, 64, 200


def test_keep_last_tokens_is_maximal_bias():
    b = positional_bias([range(N - K, N)] * S, N)
    assert b.index_trend == pytest.approx(1.0)
    assert b.position_determinism == pytest.approx(1.0)
    assert b.row_trend == pytest.approx(1.0)  # the last rows of the 24 x 24 grid
    assert b.keep_ratio == pytest.approx(K / N)
    first = positional_bias([range(K)] * S, N)
    assert first.index_trend == pytest.approx(-1.0) and first.position_determinism == pytest.approx(1.0)


def test_attention_like_selector_is_biased_towards_late_positions():
    """Scores = content + a growing position term (the LLM attention bias of the paper's Figure 2)."""
    rng = np.random.default_rng(0)
    kept = [np.argsort(-(rng.normal(size=N) + np.linspace(0, 3, N)))[:K] for _ in range(S)]
    b = positional_bias(kept, N)
    assert b.index_trend > 0.8 and b.row_trend > 0.8
    assert 0.1 < b.position_determinism < 1.0


def test_content_only_selector_on_shuffled_positions_scores_none():
    """Top-K by a content score (feature norm) on features whose positions are shuffled per image."""
    rng = np.random.default_rng(1)
    content = rng.normal(size=(N, 16)) * np.linspace(0.5, 2.0, N)[:, None]  # content differs per token
    kept = []
    for _ in range(S):
        shuffled = content[rng.permutation(N)]  # the same content at random positions
        kept.append(np.argsort(-np.linalg.norm(shuffled, axis=1))[:K])
    b = positional_bias(kept, N)
    assert abs(b.index_trend) < 0.15
    assert b.position_determinism < 0.02
    assert abs(b.row_trend) < 0.5  # 24 row means of ~S*K/24 draws each: noisier than the index trend
    # the same selector without shuffling is fully position-determined
    fixed = positional_bias([np.argsort(-np.linalg.norm(content, axis=1))[:K]] * S, N)
    assert fixed.position_determinism == pytest.approx(1.0) and fixed.index_trend > 0.5


def test_edge_cases():
    assert index_trend(np.ones(10)) == 0.0
    assert position_determinism(np.ones(10), 5) == 0.0  # nothing dropped
    with pytest.raises(ValueError, match="outside 0..9"):
        positional_bias([[3, 10]], 10)
    with pytest.raises(ValueError, match="no samples"):
        positional_bias([], 10)
    assert positional_bias([[0, 1]], 10).row_trend is None  # 10 tokens are not a square grid


def _fake_run(root, name, kept_sets, n=N, budget=K):
    d = root / "runs" / name
    d.mkdir(parents=True)
    model, method, _, bench = name.split("__")
    (d / "run.json").write_text(json.dumps({"status": "complete", "name": name, "model": model, "method": method,
                                            "budget": budget, "benchmark": bench, "random_weights": True}))
    rows = [{"doc_id": i, "visual_tokens_in": n, "kept_indices": [list(map(int, k))]} for i, k in enumerate(kept_sets)]
    rows.append({"doc_id": len(rows), "visual_tokens_in": n, "kept_indices": None})  # e.g. a pooled method
    (d / "samples.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def test_from_run_dirs_table_and_figure(tmp_path):
    rng = np.random.default_rng(2)
    _fake_run(tmp_path, "m__last__64__demo", [range(N - K, N)] * 20)
    _fake_run(tmp_path, "m__random__64__demo", [rng.choice(N, K, replace=False) for _ in range(20)])
    table, biases = bias_table(tmp_path)
    by = table.set_index("method")
    assert by.loc["last", "index_trend"] == pytest.approx(1.0) and by.loc["last", "samples"] == 20
    assert by.loc["last", "left_out"] == 1
    assert abs(by.loc["random", "index_trend"]) < 0.3
    paths = plot_bias(biases, tmp_path / "fig" / "bias")
    assert all(p.stat().st_size > 1000 for p in paths) and {p.suffix for p in paths} == {".png", ".svg"}
    assert main([f"results_dir={tmp_path}", f"out={tmp_path / 'out'}"]) == 0
    assert (tmp_path / "out" / "kept_by_position__m__demo__64.png").is_file()
    assert main(["bogus=1"]) == 2


def test_trend_p_values_separate_signal_from_noise():
    from apet_bench.bias import trend_p_value

    rng = np.random.default_rng(3)
    assert trend_p_value(np.linspace(0, 1, 100)) < 0.001
    assert trend_p_value(rng.random(100)) > 0.01
    assert trend_p_value(np.ones(5)) == 1.0
    b = positional_bias([range(N - K, N)] * 3, N)
    assert b.index_trend_p < 0.001 and b.row_trend_p < 0.01
