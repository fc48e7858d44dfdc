"""Imported-prediction scoring (apet_bench.score): the published LLaVA-1.5-13B figures from its released
answers, synthetic answer files with hand-computed scores, the run directory and the error lines."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from apet_bench.score import ScoreError, main, score_answers, write_run

SHARED = Path(os.environ.get("APET_BENCH_TEST_DATA_ROOT", Path(__file__).resolve().parents[2] / "shared" / "benchmarks"))
ANSWERS = SHARED / "llava_eval_answers"
needs_shared = pytest.mark.skipif(
    not (ANSWERS / "pope").is_dir() or not (SHARED / "pope").is_dir() or not (SHARED / "mme_ground_truth").is_dir(),
    reason=f"shared benchmark data not found at {SHARED} (expected ../shared/benchmarks next to the repo)",
)


@needs_shared
def test_pope_llava15_13b_published_mean_f1(capsys):
    rc = main(["benchmark=pope", f"answers={ANSWERS / 'pope' / 'llava-v1.5-13b.jsonl'}", f"data_root={SHARED}"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    m = out["metrics"]
    # LLaVA-1.5 paper, Table 4: POPE 85.9 (mean F1 over adversarial / popular / 2910-line random).
    assert round(100 * m["pope_f1_mean"], 1) == 85.9
    assert m["pope_f1_mean"] == pytest.approx(sum(m[f"pope_f1_{c}"] for c in ("adversarial", "popular", "random")) / 3)
    assert out["num_samples"] == 8910
    # Both parsers agree on LLaVA-1.5-13B's answers (all bare Yes/No), and our question text is LLaVA's.
    assert m["pope_non_binary_answers"] == 0 and m["pope_f1_parser_diff"] == 0.0
    assert m["pope_f1_mean_lmms_eval"] == m["pope_f1_mean"]
    assert out["question_text_mismatches"] == 0
    # The 3000-line random file is a different question set: it must not line up with LLaVA's 2910.
    with pytest.raises(ScoreError, match="2910 questions"):
        score_answers("pope", ANSWERS / "pope" / "llava-v1.5-13b.jsonl", SHARED, pope_random=3000)


@needs_shared
def test_mme_llava15_13b_published_perception(capsys):
    rc = main(["benchmark=mme", f"answers={ANSWERS / 'mme' / 'llava-v1.5-13b.jsonl'}", f"data_root={SHARED}"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert round(out["metrics"]["mme_perception_score"], 1) == 1531.3  # LLaVA-1.5 paper, 13B
    assert out["missing_subtasks"] == []
    assert out["num_samples"] == 2374


@needs_shared
def test_mmbench_llava15_13b_published_circular_eval(capsys):
    rc = main(["benchmark=mmbench", f"answers={ANSWERS / 'mmbench' / 'llava-v1.5-13b.jsonl'}", f"data_root={SHARED}"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert round(out["metrics"]["gpt_eval_score"], 1) == 67.7  # LLaVA-1.5 paper, 13B, MMBench (dev)
    assert out["metrics"]["mmbench_unparsable"] == 0 and out["num_samples"] == out["metrics"]["mmbench_groups"]


def _pope_root(tmp_path: Path, answers: dict[str, list[tuple[str, str]]]) -> tuple[Path, Path]:
    """A tiny POPE layout: 4 questions per category, with given (label, prediction) pairs."""
    root = tmp_path / "root"
    (root / "pope").mkdir(parents=True)
    (root / "llava_eval_answers" / "pope").mkdir(parents=True)
    qlines, alines, qid = [], [], 0
    for cat, fname in (("adversarial", "coco_pope_adversarial.json"), ("popular", "coco_pope_popular.json"),
                       ("random", "coco_pope_random_2910_llava.json")):
        gt = []
        for i, (label, pred) in enumerate(answers[cat]):
            qid += 1
            img = f"img{i}.jpg"
            gt.append({"question_id": i + 1, "image": img, "text": f"Is there a cat {i}?", "label": label})
            qlines.append({"question_id": qid, "image": img, "category": cat,
                           "text": f"Is there a cat {i}?\nAnswer the question using a single word or phrase."})
            alines.append({"question_id": qid, "text": pred})
        (root / "pope" / fname).write_text("\n".join(json.dumps(g) for g in gt) + "\n")
    (root / "llava_eval_answers" / "pope" / "llava_pope_test.jsonl").write_text("\n".join(json.dumps(q) for q in qlines))
    ans = tmp_path / "answers.jsonl"
    ans.write_text("\n".join(json.dumps(a) for a in alines))
    return root, ans


def test_pope_synthetic_hand_computed(tmp_path):
    perfect = [("yes", "Yes"), ("no", "No"), ("yes", "Yes"), ("no", "No")]
    # adversarial: TP=1, FN=1, FP=1, TN=1 -> P=R=F1=0.5; popular: TP=2 FP=0 FN=0 -> 1.0;
    # random: a verbose "Yes, there is." is "yes" for eval_pope.py (all right: F1 = 1, accuracy 1); for
    # lmms-eval's exact match it is neither yes nor no: wrong in accuracy (3/4) but in no TP/FN cell (F1 = 1).
    ans = {
        "adversarial": [("yes", "Yes"), ("yes", "No"), ("no", "yes"), ("no", "no")],
        "popular": perfect,
        "random": [("yes", "Yes"), ("yes", "Yes, there is."), ("no", "No"), ("no", "No")],
    }
    root, answers = _pope_root(tmp_path, ans)
    out = score_answers("pope", answers, root)
    m = out["metrics"]
    assert m["pope_f1_adversarial"] == pytest.approx(0.5)
    assert m["pope_f1_popular"] == pytest.approx(1.0)
    assert m["pope_f1_random"] == pytest.approx(1.0)
    assert m["pope_accuracy_random"] == pytest.approx(1.0)
    assert m["pope_accuracy_random_lmms_eval"] == pytest.approx(0.75)
    assert m["pope_f1_mean"] == pytest.approx((0.5 + 1.0 + 1.0) / 3)
    assert m["pope_non_binary_answers"] == 1 and m["pope_f1_parser_diff"] == pytest.approx(0.0)
    assert out["question_text_mismatches"] == 0


def test_pope_errors(tmp_path):
    root, answers = _pope_root(tmp_path, {c: [("yes", "Yes")] * 2 for c in ("adversarial", "popular", "random")})
    extra = tmp_path / "extra.jsonl"
    extra.write_text(answers.read_text() + "\n" + json.dumps({"question_id": 999, "text": "Yes"}))
    with pytest.raises(ScoreError, match="999"):
        score_answers("pope", extra, root)
    short = tmp_path / "short.jsonl"
    short.write_text("\n".join(answers.read_text().splitlines()[:-1]))
    with pytest.raises(ScoreError, match="no answer for POPE question 6"):
        score_answers("pope", short, root)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question_id": 1}\n')
    with pytest.raises(ScoreError, match="lacks question_id or text"):
        score_answers("pope", bad, root)
    with pytest.raises(ScoreError, match="unknown benchmark 'gqa'"):
        score_answers("gqa", answers, root)
    assert main(["benchmark=pope", f"answers={tmp_path / 'nope.jsonl'}", f"data_root={root}"]) == 2


def test_sqa_synthetic(tmp_path):
    probs = [
        {"id": "1", "image": "1/image.png", "conversations": [{"from": "human", "value": "<image>\nQ?\nA. x\nB. y"}, {"from": "gpt", "value": "A"}]},
        {"id": "2", "image": "2/image.png", "conversations": [{"from": "human", "value": "<image>\nQ?\nA. x\nB. y\nC. z"}, {"from": "gpt", "value": "C"}]},
        {"id": "3", "image": "3/image.png", "conversations": [{"from": "human", "value": "<image>\nQ?\nA. x\nB. y"}, {"from": "gpt", "value": "B"}]},
        {"id": "4", "conversations": [{"from": "human", "value": "Q?\nA. x\nB. y"}, {"from": "gpt", "value": "B"}]},
    ]
    q = tmp_path / "q.json"
    q.write_text(json.dumps(probs))
    ans = tmp_path / "a.jsonl"
    # id 1 exact letter (right), id 2 "C. z" prefix form (right), id 3 wrong, id 4 no image (IMG subset leaves it out).
    ans.write_text("\n".join(json.dumps(a) for a in [
        {"question_id": "1", "text": "A"}, {"question_id": "2", "text": "C. z"},
        {"question_id": "3", "text": "A"}, {"question_id": "4", "text": "B"}]))
    out = score_answers("sqa", ans, tmp_path, questions=q)
    assert out["metrics"]["exact_match"] == pytest.approx(2 / 3)
    assert out["num_samples"] == 3
    assert score_answers("sqa", ans, tmp_path, questions=q, subset="all")["metrics"]["exact_match"] == pytest.approx(3 / 4)


def test_mmbench_circular_synthetic(tmp_path):
    # Question 1 has two circular variants (index 1 and 1000001); question 2 one. Variant 1000001 is
    # answered wrong, so CircularEval fails question 1: accuracy 1/2 = 50.
    gt = [
        {"index": "1", "question": "q1", "A": "cat", "B": "dog", "answer": "A", "split": "dev"},
        {"index": "1000001", "question": "q1", "A": "dog", "B": "cat", "answer": "B", "split": "dev"},
        {"index": "2", "question": "q2", "A": "red", "B": "blue", "answer": "B", "split": "dev"},
    ]
    q = tmp_path / "gt.json"
    q.write_text(json.dumps(gt))
    ans = tmp_path / "a.jsonl"
    ans.write_text("\n".join(json.dumps(a) for a in [
        {"question_id": 1, "text": "A"}, {"question_id": 1000001, "text": "A"}, {"question_id": 2, "text": "B"}]))
    assert score_answers("mmbench", ans, tmp_path, questions=q)["metrics"]["gpt_eval_score"] == pytest.approx(50.0)
    ans.write_text("\n".join(json.dumps(a) for a in [
        {"question_id": 1, "text": "A"}, {"question_id": 1000001, "text": "B"}, {"question_id": 2, "text": "B"}]))
    assert score_answers("mmbench", ans, tmp_path, questions=q)["metrics"]["gpt_eval_score"] == pytest.approx(100.0)


def test_write_run_directory(tmp_path, capsys):
    root, answers = _pope_root(tmp_path, {c: [("yes", "Yes"), ("no", "Yes")] for c in ("adversarial", "popular", "random")})
    res = tmp_path / "results"
    rc = main(["benchmark=pope", f"answers={answers}", f"data_root={root}", "write_run=true",
               "model=llava-v1.5-13b", f"results_dir={res}"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    run = Path(out["run_dir"])
    assert run == res / "runs" / "llava-v1.5-13b__none__full__pope"
    summary = json.loads((run / "run.json").read_text())
    assert summary["status"] == "complete" and summary["source"] == "imported"
    assert summary["metrics"]["pope_f1_mean"] == pytest.approx(2 / 3)  # P=0.5, R=1 in every category
    assert len((run / "samples.jsonl").read_text().splitlines()) == 6
    assert not [p for p in (res / "runs").iterdir() if p.name.startswith(".")]
    # A second write without force is refused with one line (exit 2); force replaces it.
    assert main(["benchmark=pope", f"answers={answers}", f"data_root={root}", "write_run=true",
                 "model=llava-v1.5-13b", f"results_dir={res}"]) == 2
    assert write_run(score_answers("pope", answers, root), results_dir=res, model="llava-v1.5-13b", force=True) == run
