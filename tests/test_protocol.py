"""The LLaVA protocol (apet_bench.data.llava_protocol, apet_bench.data.mmbench) against LLaVA-1.5-13B's
released question and answer files: the question text our tasks build equals, for every row, the text LLaVA
recorded (chat template removed); answers parse and score as LLaVA's scripts do."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from apet_bench.data import llava_protocol as lp

SHARED = Path(os.environ.get("APET_BENCH_TEST_DATA_ROOT", Path(__file__).resolve().parents[2] / "shared" / "benchmarks"))
ANSWERS = SHARED / "llava_eval_answers"
needs_shared = pytest.mark.skipif(not ANSWERS.is_dir(), reason=f"LLaVA's released eval files not found under {ANSWERS}")


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# ------------------------------------------------------------------------- question text parity


@needs_shared
def test_pope_question_text_equals_llava_for_every_row():
    """All 8,910 POPE rows: our text from POPE's question files == LLaVA's ``prompt``."""
    answers = _jsonl(ANSWERS / "pope" / "llava-v1.5-13b.jsonl")
    questions = _jsonl(ANSWERS / "pope" / "llava_pope_test.jsonl")
    assert len(answers) == len(questions) == 8910
    files = {"adversarial": "coco_pope_adversarial.json", "popular": "coco_pope_popular.json",
             "random": "coco_pope_random_2910_llava.json"}
    by_id = {a["question_id"]: a for a in answers}
    mismatches, typo_fixed = [], 0
    for cat, f in files.items():
        gt = _jsonl(SHARED / "pope" / f)
        rows = [q for q in questions if q["category"] == cat]
        assert len(rows) == len(gt)
        for q, g in zip(rows, gt):
            assert q["image"] == g["image"]
            ours = lp.pope_question(g["text"])
            typo_fixed += "imange" in ours and "imange" not in g["text"]
            if ours != by_id[q["question_id"]]["prompt"]:
                mismatches.append((q["question_id"], ours))
    assert mismatches == []
    assert typo_fixed == 102  # the adversarial/popular questions POPE corrected after LLaVA's copy


def _mme_ground_truth() -> dict[tuple[str, str], list[str]]:
    gt: dict[tuple[str, str], list[str]] = {}
    for f in sorted((SHARED / "mme_ground_truth").glob("*.txt")):
        for line in f.read_text(encoding="utf-8-sig").splitlines():
            if line.strip():
                img, q, _ = line.split("\t")
                gt.setdefault((f.stem, img.strip()), []).append(q)
    return gt


@needs_shared
def test_mme_question_text_equals_llava_for_every_row():
    """All 2,374 MME rows (14 subtasks): our text from the eval_tool question == LLaVA's ``prompt``;
    lmms-eval's own rendering differs on the double-space questions."""
    from lmms_eval.tasks.mme.utils import mme_doc_to_text

    answers = _jsonl(ANSWERS / "mme" / "llava-v1.5-13b.jsonl")
    assert len(answers) == 2374
    gt = _mme_ground_truth()
    mismatches, stock_differs = [], 0
    kwargs = {"pre_prompt": "", "post_prompt": lp.SHORT_ANSWER}
    for a in answers:
        sub, img = a["question_id"].split("/", 1)
        candidates = gt[(sub, os.path.basename(img))]
        ours = [lp.mme_question(q) for q in candidates]
        if a["prompt"] not in ours:
            mismatches.append(a["question_id"])
            continue
        q = candidates[ours.index(a["prompt"])]
        stock_differs += mme_doc_to_text({"question": q}, kwargs) != a["prompt"]
    assert mismatches == []
    assert stock_differs == 7  # "...?  Please answer yes or no.": lmms-eval keeps a trailing space


def _mmbench_rows() -> tuple[list[dict], dict[str, dict]]:
    answers = _jsonl(ANSWERS / "mmbench" / "llava-v1.5-13b.jsonl")
    gt = {g["index"]: g for g in json.loads((ANSWERS / "mmbench" / "mmbench_dev_20230712_qa_from_xlsx.json").read_text())}
    return answers, gt


def gt_options(g: dict) -> list[str]:
    """Options of a row of the xlsx-derived ground truth. The export skipped empty cells, so in a row with
    fewer than 4 options the next column's value (a predicted letter) landed in the first empty option column
    and the row has no ``prediction`` key: drop that last value there."""
    opts = [g[c] for c in "ABCD" if c in g]
    return opts if "prediction" in g else opts[:-1]


@needs_shared
def test_mmbench_question_text_equals_llava_for_every_row():
    """All 4,377 MMBench-dev rows. The local ground truth (an xlsx export of mmbench_dev_20230712) holds the
    question, the options and the answer but not the hint, so the hint is taken as the part of LLaVA's prompt
    before ``\\n{question}\\n``; the question, options, their count, order and layout are checked on every row."""
    answers, gt = _mmbench_rows()
    assert len(answers) == 4377 and len(gt) == 4377
    mismatches, with_hint = [], 0
    for a in answers:
        g = gt[str(a["question_id"])]
        opts = gt_options(g)
        assert opts == a["options"], a["question_id"]
        body = lp.mmbench_body(g["question"], opts)
        hint = None
        if a["prompt"] != body:
            head = a["prompt"][: len(a["prompt"]) - len(body)]
            assert head.endswith("\n") and a["prompt"].endswith(body), a["question_id"]
            hint = head[:-1]
            with_hint += 1
        if lp.mmbench_body(g["question"], opts, hint) != a["prompt"]:
            mismatches.append(a["question_id"])
        full = lp.mmbench_question(g["question"], opts, hint, "en")
        assert full == a["prompt"] + "\n" + lp.MC_POST_PROMPT_EN
    assert mismatches == []
    assert 0 < with_hint < 4377


@needs_shared
def test_scienceqa_question_text_equals_llava():
    """ScienceQA-IMG: the released answer file holds one row (checked against its ``prompt``); the 2,017 image
    questions of LLaVA's ``llava_test_CQM-A.json`` are split into (hint, question, choices), the fields of the
    hub dataset, and re-rendered by our ``doc_to_text`` and by lmms-eval's (identical)."""
    from lmms_eval.tasks.scienceqa.utils import sqa_doc_to_text

    kwargs = {"format": "default", "pre_prompt": "", "post_prompt": "\n" + lp.MC_POST_PROMPT_EN}
    probs = json.loads((ANSWERS / "scienceqa" / "llava_test_CQM-A.json").read_text())
    answer = _jsonl(ANSWERS / "scienceqa" / "llava-v1.5-13b.jsonl")[0]
    prob = next(p for p in probs if p["id"] == answer["question_id"])
    assert prob["conversations"][0]["value"] + "\n" + lp.MC_POST_PROMPT_EN == answer["prompt"]
    option = re.compile(r"^[A-E]\. ")
    n = 0
    for p in probs:
        if "image" not in p:
            continue
        text = p["conversations"][0]["value"].removeprefix("<image>\n")
        lines = text.split("\n")
        first_opt = next(i for i, line in enumerate(lines) if option.match(line) and i > 0 and lines[i - 1]
                         and not option.match(lines[i - 1]))
        choices = [line[3:] for line in lines[first_opt:]]
        assert all(option.match(line) for line in lines[first_opt:]), p["id"]
        question = lines[first_opt - 1]
        head = "\n".join(lines[: first_opt - 1])
        hint = head.removeprefix("Context: ") if head else ""
        doc = {"hint": hint, "question": question, "choices": choices}
        want = text + "\n" + lp.MC_POST_PROMPT_EN
        assert lp.sqa_doc_to_text(doc) == want, p["id"]
        assert sqa_doc_to_text(doc, kwargs) == want, p["id"]
        n += 1
    assert n == 2017


def test_textvqa_and_vizwiz_keep_the_question_as_written():
    """lmms-eval's capitalize() lower-cases the rest of the question; LLaVA feeds it as written."""
    from lmms_eval.tasks.textvqa.utils import textvqa_doc_to_text
    from lmms_eval.tasks.vizwiz_vqa.utils import vizwiz_vqa_doc_to_text

    doc = {"question": "is it a NIKON camera?", "ocr_tokens": ["NIKON", "D90"]}
    ours = lp.textvqa_doc_to_text(doc)
    assert ours == "is it a NIKON camera?\nReference OCR token: NIKON, D90\nAnswer the question using a single word or phrase."
    stock = textvqa_doc_to_text(doc, {"pre_prompt": "", "post_prompt": lp.SHORT_ANSWER, "ocr": True})
    assert stock != ours and "nikon camera" in stock
    assert lp.textvqa_doc_to_text({"question": "what is it?", "ocr_tokens": []}) == "what is it?" + lp.SHORT_ANSWER
    viz = lp.vizwiz_doc_to_text({"question": "What does this say on the LABEL?"})
    assert viz.startswith("What does this say on the LABEL?\nWhen the provided information is insufficient, respond with 'Unanswerable'.")
    assert viz.endswith(lp.SHORT_ANSWER)
    assert "label" in vizwiz_vqa_doc_to_text({"question": "What does this say on the LABEL?"}, {"pre_prompt": "", "post_prompt": ""})


def test_mmbench_layout_and_cn_post_prompt():
    doc = {"question": "What is shown?", "hint": "nan", "A": "a cat", "B": "a dog", "C": float("nan"), "D": "a bird"}
    assert lp.mmbench_en_doc_to_text(doc) == ("What is shown?\nA. a cat\nB. a dog\n"
                                              "Answer with the option's letter from the given choices directly.")
    doc["hint"] = "A photo."
    assert lp.mmbench_cn_doc_to_text(doc) == "A photo.\nWhat is shown?\nA. a cat\nB. a dog\n请直接回答选项字母。"
    with pytest.raises(ValueError, match="lang 'fr'"):
        lp.mmbench_question("q", ["a"], None, "fr")


# ------------------------------------------------------------------------------------ POPE parsing


@pytest.mark.parametrize("answer,llava,stock", [
    ("Yes", "yes", "yes"), ("no", "no", "no"), (" NO ", "yes", "no"),
    ("Yes, there is a dog in the image.", "yes", None), ("No, there is not.", "no", None),
    ("There is not a dog.", "no", None), ("Yes. No doubt.", "yes", None), ("I cannot tell", "yes", None),
])
def test_pope_parsers(answer, llava, stock):
    # eval_pope.py matches the words "No"/"no"/"not" before the first '.', case-sensitively (" NO " -> yes).
    assert lp.parse_pope_llava(answer) == llava
    assert lp.parse_pope_lmms_eval(answer) == stock


def test_pope_aggregates_report_both_parsers():
    docs = [("yes", "Yes"), ("yes", "Yes, there is."), ("no", "No"), ("no", "There is not a cat."),
            ("yes", "No"), ("no", "Yes")]
    recs = [lp.pope_process_results({"question_id": i, "answer": t, "category": "random"}, [p])["pope_f1_mean"]
            for i, (t, p) in enumerate(docs)]
    assert recs[0]["sample_id"] == "random/0"
    # LLaVA: TP 2, FN 1, TN 2, FP 1 -> P = R = 2/3.  lmms-eval: TP 1, FN 1, TN 1, FP 1 -> P = R = 1/2.
    assert lp.pope_aggregate_f1_llava(recs) == pytest.approx(2 / 3)
    assert lp.pope_aggregate_f1_lmms_eval(recs) == pytest.approx(1 / 2)
    assert lp.pope_aggregate_f1_diff(recs) == pytest.approx(2 / 3 - 1 / 2)
    assert lp.pope_aggregate_non_binary(recs) == 2
    assert lp.pope_aggregate_accuracy_llava(recs) == pytest.approx(4 / 6)
    assert lp.pope_aggregate_accuracy_lmms_eval(recs) == pytest.approx(2 / 6)


# ------------------------------------------------------------------------------------ MMBench scoring


@needs_shared
def test_mmbench_dev_llava15_13b_circular_eval_is_published_67_7():
    """Rescoring LLaVA-1.5-13B's released MMBench-dev answers: CircularEval with the official extraction."""
    from apet_bench.data.mmbench import circular_eval

    answers, gt = _mmbench_rows()
    by = {str(a["question_id"]): a for a in answers}
    rows = []
    for idx, g in gt.items():
        row = {"index": int(idx), "question": g["question"], "answer": g["answer"], "prediction": by[idx]["text"]}
        row.update(dict(zip("ABCD", gt_options(g))))
        rows.append(row)
    res = circular_eval(rows)
    assert round(res.score, 1) == 67.7  # LLaVA-1.5 paper, Table 4: MMBench 67.7 (13B)
    assert res.num_groups == sum(int(i) < 1_000_000 for i in gt)
    assert res.unparsable == 0 and res.judged == 0
    # The group rule: one wrong copy fails its question.
    first = rows[0]
    gid = int(first["index"]) % 1_000_000
    group = [r for r in rows if int(r["index"]) % 1_000_000 == gid]
    good = circular_eval([{**r, "prediction": r["answer"]} for r in group])
    bad = circular_eval([{**r, "prediction": r["answer"]} for r in group[:-1]]
                        + [{**group[-1], "prediction": "A" if group[-1]["answer"] != "A" else "B"}])
    assert (good.score, bad.score) == (100.0, 0.0)


class _FakeJudge:
    """An OpenAI-client stand-in: replies ``reply`` (or raises) and records the prompts."""

    def __init__(self, reply):
        self.reply, self.prompts = reply, []
        self.chat = self
        self.completions = self

    def create(self, model, temperature, messages):
        self.prompts.append(messages[-1]["content"])
        if isinstance(self.reply, Exception):
            raise self.reply
        msg = type("M", (), {"content": self.reply})
        return type("R", (), {"choices": [type("C", (), {"message": msg})]})


def test_mmbench_judge_fallback_only_for_unparsable_answers():
    from apet_bench.data.mmbench import circular_eval
    from apet_bench.judge import JudgeConfig

    rows = [{"index": 5, "question": "Colour?", "A": "red", "B": "blue", "answer": "B", "prediction": "It looks bluish"},
            {"index": 1000005, "question": "Colour?", "A": "blue", "B": "red", "answer": "A", "prediction": "A"}]
    assert circular_eval(rows).score == 0.0 and circular_eval(rows).unparsable == 1
    judge = _FakeJudge("B")
    res = circular_eval(rows, judge_cfg=JudgeConfig(model="m"), client=judge)
    assert res.score == 100.0 and res.judged == 1 and res.unparsable == 0
    assert len(judge.prompts) == 1 and "It looks bluish" in judge.prompts[0]
    failing = circular_eval(rows, judge_cfg=JudgeConfig(model="m"), client=_FakeJudge(TimeoutError("slow")))
    assert failing.score == 0.0 and failing.judge_failures == 1 and failing.unparsable == 1
    with pytest.raises(ValueError, match="circular copies of question 7"):
        circular_eval([{"index": 1000007, "answer": "A", "prediction": "A"}])


def test_pope_run_reports_both_parsers_and_sample_ids(tmp_path):
    """A tiny-model POPE run (crafted 3 x 4 questions, the first 6): metrics.json holds both parsers' mean F1, the count of
    answers that are not a bare yes/no and the F1 difference; samples.jsonl rows carry per-sample records keyed
    by a stable sample id (<category>/<question_id>) with the category."""
    import math

    from test_benchmarks import _mini_pope

    from apet_bench.config import compose
    from apet_bench.runner import execute

    root = tmp_path / "root"
    _mini_pope(root)
    cfg = compose(["model=tiny_llava15", "method=none", "benchmark=pope", f"data_root={root}",
                   f"results_dir={tmp_path / 'results'}", f"cache_dir={tmp_path / 'cache'}", "limit=6"])
    out = execute(cfg)
    assert out.name == "tiny_llava15__none__full__pope" and out.summary["protocol"] == "llava"
    metrics = json.loads((Path(out.run_dir) / "metrics.json").read_text())
    m = metrics["metrics"]
    rows = [json.loads(line) for line in (Path(out.run_dir) / "samples.jsonl").read_text().splitlines()]
    recs = [r["pope_f1_mean"] for r in rows]
    assert m["pope_non_binary_answers"] == sum(r["non_binary"] for r in recs)
    assert m["pope_f1_mean"] == pytest.approx(lp.pope_aggregate_f1_llava(recs))
    assert m["pope_f1_mean_lmms_eval"] == pytest.approx(lp.pope_aggregate_f1_lmms_eval(recs))
    assert math.isclose(m["pope_f1_parser_diff"], m["pope_f1_mean"] - m["pope_f1_mean_lmms_eval"], abs_tol=1e-12)
    assert [r["sample_id"] for r in rows] == [f"adversarial/{i}" for i in range(1, 5)] + ["popular/1", "popular/2"]
    assert [r["pope_f1_mean"]["category"] for r in rows] == ["adversarial"] * 4 + ["popular"] * 2
    assert metrics["protocol"]["name"] == "llava" and "2,910" in metrics["protocol"]["data"]
