"""Paired statistics (apet_bench.stats) on synthetic runs with known answers."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from apet_bench import stats


def write_run(root: Path, name: str, benchmark: str, rows: list[dict], metrics: dict | None = None) -> Path:
    d = root / name
    d.mkdir(parents=True)
    (d / "run.json").write_text(json.dumps({"status": "complete", "name": name, "benchmark": benchmark,
                                            "metrics": metrics or {}}))
    (d / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def qa_rows(correct: list[int]) -> list[dict]:
    return [{"doc_id": i, "sample_id": f"q{i:04d}", "exact_match": float(c)} for i, c in enumerate(correct)]


def exact_mcnemar(b: int, c: int) -> float:
    """Two-sided exact McNemar p from the binomial formula (independent of scipy)."""
    n = b + c
    if n == 0:
        return 1.0
    k = min(b, c)
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n)


@pytest.fixture
def base_correct():
    rng = np.random.default_rng(1)
    return [int(x) for x in rng.random(200) < 0.6]


def test_identical_runs_give_zero_delta_interval_with_zero_and_p_one(tmp_path, base_correct):
    a = stats.load_units(write_run(tmp_path, "a", "gqa", qa_rows(base_correct)), "exact_match")
    b = stats.load_units(write_run(tmp_path, "b", "gqa", qa_rows(base_correct)), "exact_match")
    c = stats.compare(a, b, n_resamples=999)
    assert c.paired and c.delta == 0.0
    assert c.low <= 0.0 <= c.high
    assert c.p_value == 1.0
    assert c.test == "exact McNemar" and c.discordant == (0, 0)


@pytest.mark.parametrize("k_up,k_down", [(1, 0), (5, 2), (12, 3), (30, 0)])
def test_flipped_answers_give_exact_mcnemar_p(tmp_path, base_correct, k_up, k_down):
    wrong = [i for i, c in enumerate(base_correct) if not c]
    right = [i for i, c in enumerate(base_correct) if c]
    flipped = list(base_correct)
    for i in wrong[:k_up]:
        flipped[i] = 1
    for i in right[:k_down]:
        flipped[i] = 0
    a = stats.load_units(write_run(tmp_path, "a", "gqa", qa_rows(base_correct)), "exact_match")
    b = stats.load_units(write_run(tmp_path, "b", "gqa", qa_rows(flipped)), "exact_match")
    c = stats.compare(a, b, n_resamples=999)
    assert c.discordant == (k_down, k_up)
    assert c.delta == pytest.approx((k_up - k_down) / len(base_correct))
    assert c.p_value == pytest.approx(exact_mcnemar(k_down, k_up), rel=1e-9)
    if k_up - k_down >= 20:
        assert c.low > 0, (c.low, c.high)
    if k_up + k_down <= 1:
        assert c.low <= 0 <= c.high


def test_runs_with_different_samples_are_not_paired(tmp_path, base_correct):
    a = stats.load_units(write_run(tmp_path, "a", "gqa", qa_rows(base_correct)), "exact_match")
    b = stats.load_units(write_run(tmp_path, "b", "gqa", qa_rows(base_correct[:150])), "exact_match")
    c = stats.compare(a, b, n_resamples=99)
    assert not c.paired and c.delta is None
    assert "do not share the same samples" in c.reason and "50 only in a" in c.reason


def mme_rows(answers: dict[str, list[tuple[str, int]]]) -> list[dict]:
    """answers: image -> [(category, score) for its two questions]."""
    rows, i = [], 0
    for img, qs in answers.items():
        for cat, score in qs:
            rows.append({"doc_id": i, "sample_id": f"{img}-{i % 2}", "target": "Yes" if i % 2 == 0 else "No",
                         "mme_perception_score": {"question_id": img, "category": cat, "score": float(score)}})
            i += 1
    return rows


def test_mme_point_matches_lmms_eval_aggregation(tmp_path):
    from lmms_eval.tasks.mme.utils import mme_aggregate_results

    rng = np.random.default_rng(0)
    answers = {f"{cat}/{j}.jpg": [(cat, int(rng.random() < 0.7)), (cat, int(rng.random() < 0.7))]
               for cat in ("existence", "count", "color") for j in range(15)}
    rows = mme_rows(answers)
    ru = stats.load_units(write_run(tmp_path, "a", "mme", rows), "mme_perception_score")
    expected = mme_aggregate_results([r["mme_perception_score"] for r in rows])
    assert ru.point == pytest.approx(expected)
    assert ru.unit.startswith("image pair") and len(ru.units) == 45


def test_mme_bootstrap_resamples_image_pairs_not_questions(tmp_path):
    # A: every question wrong. B: exactly one question of every pair right -> acc 50, acc+ 0 per pair.
    # Resampling whole pairs, every resample gives the same Δ (50 per subtask); resampling questions
    # would pair two right answers and let acc+ (and the interval) move.
    cats = ("existence", "count")
    a_ans = {f"{c}/{j}.jpg": [(c, 0), (c, 0)] for c in cats for j in range(12)}
    b_ans = {f"{c}/{j}.jpg": [(c, 1), (c, 0)] for c in cats for j in range(12)}
    a = stats.load_units(write_run(tmp_path, "a", "mme", mme_rows(a_ans)), "mme_perception_score")
    b = stats.load_units(write_run(tmp_path, "b", "mme", mme_rows(b_ans)), "mme_perception_score")
    c = stats.compare(a, b, n_resamples=999)
    assert c.delta == pytest.approx(100.0)  # 50 points in each of 2 subtasks
    assert c.low == pytest.approx(100.0) and c.high == pytest.approx(100.0)
    # The same right answers moved onto the same images (questions shuffled across pairs) change acc+.
    moved = {f"{c}/{j}.jpg": [(c, int(j < 6)), (c, int(j < 6))] for c in cats for j in range(12)}
    m = stats.load_units(write_run(tmp_path, "m", "mme", mme_rows(moved)), "mme_perception_score")
    assert m.point != pytest.approx(b.point)  # 150 per subtask (half the pairs at 200) vs 50


def test_pope_f1_per_category_matches_lmms_eval(tmp_path):
    from apet_bench.data.pope import pope_aggregate_mean_f1

    rng = np.random.default_rng(3)
    rows = []
    for i in range(90):
        gt = "yes" if rng.random() < 0.5 else "no"
        pred = gt if rng.random() < 0.8 else ("no" if gt == "yes" else "yes")
        rec = {"question_id": i, "score": float(pred == gt), "prediction": pred, "ground_truth": gt,
               "category": ("adversarial", "popular", "random")[i % 3]}
        rows.append({"doc_id": i, "sample_id": f"p{i}", "pope_f1_mean": rec})
    ru = stats.load_units(write_run(tmp_path, "a", "pope", rows), "pope_f1_mean")
    assert ru.point == pytest.approx(pope_aggregate_mean_f1([r["pope_f1_mean"] for r in rows]))
    assert ru.kind == "pope_f1"
    # a paired comparison of F1 uses the permutation test (F1 is not a mean of per-question scores)
    flipped = json.loads(json.dumps(rows))
    for r in flipped[:30]:
        rec = r["pope_f1_mean"]
        rec["prediction"] = rec["ground_truth"]
        rec["score"] = 1.0
    b = stats.load_units(write_run(tmp_path, "b", "pope", flipped), "pope_f1_mean")
    c = stats.compare(ru, b, n_resamples=999)
    assert c.test == "paired permutation" and c.delta > 0
    assert c.low <= c.delta <= c.high


def test_mmbench_units_are_circular_groups(tmp_path):
    def rec(index, answer, pred):
        return {"index": index, "question": "q", "answer": answer, "prediction": pred, "hint": "nan",
                "source": "s", "split": "dev", "category": "c", "L2-category": "l", "A": "cat", "B": "dog",
                "C": "nan", "D": "nan", "E": "nan"}

    rows = [rec(1, "A", "A"), rec(1000001, "B", "B"),  # group 1: both circular variants right
            rec(2, "A", "A"), rec(1000002, "B", "A")]  # group 2: one variant wrong
    rows = [{"doc_id": i, "sample_id": f"m{i}", "gpt_eval_score": r} for i, r in enumerate(rows)]
    ru = stats.load_units(write_run(tmp_path, "a", "mmbench_en", rows), "gpt_eval_score")
    assert sorted(ru.units.index) == ["1", "2"]
    assert ru.point == pytest.approx(50.0)


def test_judged_runs_without_verdicts_say_so(tmp_path):
    rec = {"question_id": "v0", "question": "q", "answer": "a", "pred": "a"}
    rows = [{"doc_id": 0, "sample_id": "v0", "gpt_eval_accuracy": rec, "gpt_eval_score": rec}]
    with pytest.raises(stats.StatsUnavailable, match="judge verdicts"):
        stats.load_units(write_run(tmp_path, "a", "msvd_qa", rows), "gpt_eval_accuracy")
    rows[0]["judge"] = {"pred": "yes", "score": 4}
    assert stats.load_units(write_run(tmp_path, "b", "msvd_qa", rows), "gpt_eval_score").point == 4.0


def test_holm_known_values():
    adj = stats.holm([0.01, 0.04, 0.03, None])
    assert adj[0] == pytest.approx(0.03) and adj[1] == pytest.approx(0.06) and adj[2] == pytest.approx(0.06)
    assert adj[3] is None


def test_minimum_detectable_difference_near_normal_approximation():
    from statistics import NormalDist

    z = NormalDist().inv_cdf
    for n, psi in ((2000, 0.1), (9000, 0.05)):
        mdd = stats.minimum_detectable_difference(n, psi)
        approx = (z(0.975) + z(0.8)) * math.sqrt(psi / n)  # Connor (1987) for small Δ
        assert mdd == pytest.approx(approx, rel=0.1)
    assert stats.minimum_detectable_difference(4000, 0.1) < stats.minimum_detectable_difference(1000, 0.1)
    with pytest.raises(ValueError, match="discordance"):
        stats.minimum_detectable_difference(100, 0.0)


def test_doc_sample_id_is_stable_and_ignores_media():
    d1 = {"question_id": "a/1.jpg", "question": "Is it red?", "answer": "Yes", "image": {"bytes": b"x"}}
    d2 = {"answer": "Yes", "question": "Is it red?", "question_id": "a/1.jpg", "image": object()}
    assert stats.doc_sample_id(d1) == stats.doc_sample_id(d2)
    assert stats.doc_sample_id({**d1, "question": "Is it blue?"}) != stats.doc_sample_id(d1)
    assert stats.unique_ids(["x", "y", "x"]) == ["x", "y", "x#2"]


def test_sweep_seeds_option_becomes_a_seed_sweep():
    from apet_bench.config import ConfigError
    from apet_bench.sweep import expand_seeds

    assert expand_seeds(["experiment=table1", "seeds=3"]) == ["experiment=table1", "seed=0,1,2"]
    assert expand_seeds(["seeds=4,7"]) == ["seed=4,7"]
    assert expand_seeds(["method=random"]) == ["method=random"]
    with pytest.raises(ConfigError, match="seeds 'x'"):
        expand_seeds(["seeds=x"])
    with pytest.raises(ConfigError, match="not both"):
        expand_seeds(["seeds=2", "seed=1"])


def test_sweep_seeds_runs_as_a_multirun_even_without_an_experiment():
    from apet_bench.sweep import sweep_args

    assert sweep_args(["model=tiny_llava15", "method=random", "seeds=2"]) == [
        "model=tiny_llava15", "method=random", "seed=0,1", "--multirun"]
    assert sweep_args(["-m", "method=random", "seeds=2"]) == ["-m", "method=random", "seed=0,1"]
    assert sweep_args(["method=random"]) == ["method=random"]  # no seeds: left as given


def test_mcnemar_also_when_one_run_never_scores(tmp_path):
    a = stats.load_units(write_run(tmp_path, "a", "gqa", qa_rows([0] * 50)), "exact_match")
    b = stats.load_units(write_run(tmp_path, "b", "gqa", qa_rows([1] * 10 + [0] * 40)), "exact_match")
    c = stats.compare(a, b, n_resamples=499)
    assert c.test == "exact McNemar" and c.discordant == (0, 10)
    assert c.p_value == pytest.approx(exact_mcnemar(0, 10))
