"""Re-score imported predictions (LLaVA's eval answer format) against local ground truth.

    python -m apet_bench.score benchmark=pope answers=llava-v1.5-13b.jsonl data_root=../shared/benchmarks
    python -m apet_bench.score benchmark=mme answers=... data_root=... write_run=true model=llava-v1.5-13b

An answer file is JSON lines with at least ``question_id`` and ``text`` (the model's answer), as written
by LLaVA's ``model_vqa_loader.py`` / ``model_vqa_science.py`` / ``model_vqa_mmbench.py``. The metrics
are computed with lmms-eval 0.7.3's own scoring functions, so an imported row and a row produced by
``run.py`` are scored the same way:

========== ======================================================== =====================================
benchmark  ground truth (under ``data_root``)                       scoring (lmms-eval 0.7.3)
========== ======================================================== =====================================
pope       ``pope/coco_pope_{adversarial,popular}.json`` +           ``tasks/pope/utils.py``
           ``pope/coco_pope_random_2910_llava.json`` (the 2,910-line  ``pope_process_results`` + the
           random split LLaVA-1.5 used; ``pope_random=3000`` takes    ``pope_aggregate_*`` per category;
           the 3,000-line one), matched by order within each          headline ``pope_f1_mean`` = mean F1
           category to LLaVA's ``llava_pope_test.jsonl``               over the three categories (fraction)
mme        ``mme_ground_truth/<subtask>.txt`` (eval_tool)            ``tasks/mme/utils.py``
                                                                     ``mme_process_results`` /
                                                                     ``mme_aggregate_results``: sums
sqa        ``llava_eval_answers/scienceqa/llava_test_CQM-A.json``    ``tasks/scienceqa/utils.py``
           (LLaVA's test questions; questions with an image =        ``sqa_process_results`` (exact
           ScienceQA-IMG, 2,017)                                     letter or ``"X."``); mean (fraction)
mmbench    ``llava_eval_answers/mmbench/                             CircularEval with MMBench's
           mmbench_dev_20230712_qa_from_xlsx.json`` (MMBench-dev)    ``can_infer`` extraction
                                                                     (apet_bench.data.mmbench), ×100
========== ======================================================== =====================================

Deviations from LLaVA's own scripts (named, and why they do not change the published figures):

* POPE: the headline uses LLaVA's ``eval_pope.py`` parser (first sentence; "no" when a word is
  No/no/not); lmms-eval's exact yes/no parser is reported alongside (``*_lmms_eval``,
  ``pope_non_binary_answers``, ``pope_f1_parser_diff``). LLaVA-1.5's answers are all ``Yes``/``No``, so
  both give 85.9. Rows are matched by order within each category as ``eval_pope.py`` does, checking
  the image names; ``question_text_mismatches`` counts LLaVA questions that differ from our LLaVA-protocol
  text (``apet_bench.data.llava_protocol.pope_question``).
* MME: LLaVA's prompts drop " Please answer yes or no." and add the short-answer instruction; a
  question is matched to the ground truth on (subtask, image file name, question without either).
* SQA: lmms-eval's parser (LLaVA's rule without the random guess for unparsable answers: those score 0).
* MMBench-dev: no judge fallback (an answer MMBench's rules cannot place counts wrong and is counted in
  ``mmbench_unparsable``); LLaVA-1.5's single-letter answers all parse.

The last stdout line is one JSON object: ``{"benchmark", "metrics", "paper_units", "num_samples",
"answers", "answers_sha256", "ground_truth", ..., "run_dir"}``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import sys
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["ScoreError", "score_answers", "main", "BENCHMARKS"]

#: Accepted ``benchmark=`` values -> the benchmark config name the run directory uses.
BENCHMARKS = {"pope": "pope", "mme": "mme", "sqa": "scienceqa_img", "scienceqa_img": "scienceqa_img",
              "mmbench": "mmbench_en", "mmbench_en": "mmbench_en"}
POPE_CATEGORIES = ("adversarial", "popular", "random")
_SHORT_ANSWER = "\nAnswer the question using a single word or phrase."


class ScoreError(ValueError):
    """Bad input to the scorer; the message is one line naming the bad value (a path, an id)."""


def _read_jsonl(path: Path, what: str) -> list[dict]:
    if not path.is_file():
        raise ScoreError(f"{what} file not found: {path}")
    rows = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as exc:
                raise ScoreError(f"{path}:{lineno}: not JSON ({exc})") from None
            if not isinstance(row, dict):
                raise ScoreError(f"{path}:{lineno}: expected a JSON object")
            rows.append(row)
    return rows


def _read_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise ScoreError(f"{what} file not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ScoreError(f"{path}: not JSON ({exc})") from None


def _answers_by_id(rows: list[dict], path: Path) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = defaultdict(list)
    for i, r in enumerate(rows, 1):
        if "question_id" not in r or "text" not in r:
            raise ScoreError(f"{path}: answer {i} lacks question_id or text (LLaVA eval format needs both)")
        out[str(r["question_id"])].append(r)
    return out


def _quiet_loguru() -> None:
    try:
        from loguru import logger

        logger.remove()
        logger.add(sys.stderr, level="WARNING")
    except Exception:  # cosmetic
        pass


# ------------------------------------------------------------------------------------------ POPE


def score_pope(answers: Path, data_root: Path, *, questions: Path | None = None, pope_random: int = 2910) -> dict:
    """Mean F1 over adversarial/popular/random (LLaVA-1.5 protocol, LLaVA issue #626).

    Raises
    ------
    ScoreError
        A missing file, an answer for an unknown question, a category whose question count differs
        from its ground truth, an image mismatch, or a question without an answer.
    """

    questions = questions or data_root / "llava_eval_answers" / "pope" / "llava_pope_test.jsonl"
    qrows = _read_jsonl(questions, "POPE question")
    ans = _answers_by_id(_read_jsonl(answers, "answer"), answers)
    if pope_random not in (2910, 3000):
        raise ScoreError(f"pope_random {pope_random!r} is invalid (2910 = LLaVA-1.5's file, 3000 = POPE's current one)")
    gt_files = {
        "adversarial": data_root / "pope" / "coco_pope_adversarial.json",
        "popular": data_root / "pope" / "coco_pope_popular.json",
        "random": data_root / "pope" / ("coco_pope_random_2910_llava.json" if pope_random == 2910 else "coco_pope_random.json"),
    }
    known = {str(q["question_id"]) for q in qrows}
    unknown = sorted(set(ans) - known)
    if unknown:
        raise ScoreError(f"{answers}: {len(unknown)} answer(s) for question ids not in {questions}, e.g. {unknown[0]}")
    from apet_bench.data import llava_protocol as lp

    metrics: dict[str, float] = {}
    samples = []
    recs = []
    mismatches = 0
    for cat in POPE_CATEGORIES:
        gt = _read_jsonl(gt_files[cat], f"POPE {cat} ground-truth")
        cq = [q for q in qrows if q.get("category") == cat]
        if len(cq) != len(gt):
            raise ScoreError(
                f"POPE {cat}: {len(cq)} questions in {questions} but {len(gt)} ground-truth lines in {gt_files[cat]} "
                "(pope_random=3000 selects the 3000-line random file)"
            )
        for q, g in zip(cq, gt):
            if q.get("image") != g.get("image"):
                raise ScoreError(f"POPE {cat}: question {q['question_id']} is about {q.get('image')} "
                                 f"but ground truth {gt_files[cat].name} line {g.get('question_id')} is about {g.get('image')}")
            if q.get("text", "") != lp.pope_question(g.get("text", "")):
                mismatches += 1
            got = ans.get(str(q["question_id"]))
            if not got:
                raise ScoreError(f"{answers}: no answer for POPE question {q['question_id']} ({cat})")
            doc = {"question_id": g.get("question_id"), "answer": g["label"], "category": cat}
            r = lp.pope_process_results(doc, [str(got[0]["text"])])["pope_f1_mean"]
            recs.append(r)
            samples.append({**r, "llava_question_id": q["question_id"]})
    for parser, suffix in (("llava", ""), ("lmms_eval", "_lmms_eval")):
        for cat, m in lp.pope_by_category(recs, parser).items():
            for k in ("accuracy", "precision", "recall", "f1", "yes_ratio"):
                metrics[f"pope_{k}_{cat}{suffix}"] = m[k]
    metrics["pope_f1_mean"] = lp.pope_aggregate_f1_llava(recs)
    metrics["pope_accuracy_mean"] = lp.pope_aggregate_accuracy_llava(recs)
    metrics["pope_f1_mean_lmms_eval"] = lp.pope_aggregate_f1_lmms_eval(recs)
    metrics["pope_accuracy_mean_lmms_eval"] = lp.pope_aggregate_accuracy_lmms_eval(recs)
    metrics["pope_non_binary_answers"] = lp.pope_aggregate_non_binary(recs)
    metrics["pope_f1_parser_diff"] = lp.pope_aggregate_f1_diff(recs)
    return {
        "metrics": metrics,
        "paper_units": {"POPE F1 (%)": round(100 * metrics["pope_f1_mean"], 1)},
        "samples": samples,
        "ground_truth": [str(p) for p in gt_files.values()] + [str(questions)],
        "question_text_mismatches": mismatches,
        "scoring": "llava/eval/eval_pope.py parser (apet_bench.data.llava_protocol), mean F1 over 3 categories; "
                   "lmms-eval's exact yes/no parser reported as *_lmms_eval",
    }


# ------------------------------------------------------------------------------------------- MME


def _mme_norm(question: str) -> str:
    q = question.split("\n")[0].strip()
    return re.sub(r"\s*Please answer yes or no\.?\s*$", "", q).strip()


def score_mme(answers: Path, data_root: Path, *, ground_truth_subdir: str = "mme_ground_truth") -> dict:
    """MME perception and cognition sums (acc + acc+ per subtask, summed), lmms-eval's aggregation.

    Raises
    ------
    ScoreError
        A missing ground-truth folder, an answer that matches no ground-truth question, a
        question_id not ``<subtask>/<image>``, or an image without both of its answers.
    """
    from lmms_eval.tasks.mme import utils as mme_utils

    from apet_bench.data import MME_PERCEPTION, MME_SUBTASKS

    gt_dir = data_root / ground_truth_subdir
    if not gt_dir.is_dir():
        raise ScoreError(f"MME ground truth not found: {gt_dir} (expected the eval_tool <subtask>.txt files)")
    gt: dict[tuple[str, str, str], str] = {}
    per_image: dict[tuple[str, str], int] = defaultdict(int)
    for sub in MME_SUBTASKS:
        f = gt_dir / f"{sub}.txt"
        if not f.is_file():
            continue
        for lineno, line in enumerate(f.read_text(encoding="utf-8-sig").splitlines(), 1):
            if not line.strip():
                continue
            parts = line.split("\t")
            if len(parts) != 3:
                raise ScoreError(f"{f}:{lineno}: expected image<TAB>question<TAB>Yes|No")
            gt[(sub, parts[0].strip(), _mme_norm(parts[1]))] = parts[2].strip()
            per_image[(sub, parts[0].strip())] += 1
    if not gt:
        raise ScoreError(f"no MME ground-truth files (<subtask>.txt) in {gt_dir}")
    rows = _read_jsonl(answers, "answer")
    _answers_by_id(rows, answers)  # format check
    res: dict[str, list] = defaultdict(list)
    samples = []
    for r in rows:
        qid = str(r["question_id"])
        if "/" not in qid:
            raise ScoreError(f"{answers}: MME question_id {qid!r} is not '<subtask>/<image>'")
        sub, img = qid.split("/", 1)
        prompt = r.get("prompt") or r.get("question")
        if prompt is None:
            raise ScoreError(f"{answers}: MME answer {qid!r} has no prompt (needed to tell its two questions apart)")
        key = (sub, os.path.basename(img), _mme_norm(str(prompt)))
        if key not in gt:
            raise ScoreError(f"{answers}: MME answer {qid!r} {key[2]!r} matches no question in {gt_dir}/{sub}.txt")
        doc = {"question_id": qid, "answer": gt[key], "category": sub}
        for metric, value in mme_utils.mme_process_results(doc, [str(r["text"])]).items():
            res[metric].append(value)
            samples.append({"question_id": qid, "question": key[2], "category": sub, "answer": r["text"],
                            "target": gt[key], "score": value["score"]})
    counts: dict[str, int] = defaultdict(int)
    for s in samples:
        counts[s["question_id"]] += 1
    odd = [q for q, n in counts.items() if n != 2]
    if odd:
        raise ScoreError(f"{answers}: MME image {odd[0]} has {counts[odd[0]]} answer(s); MME scores pairs (2 per image)")
    metrics: dict[str, float] = {}
    for metric in ("mme_perception_score", "mme_cognition_score"):
        if res.get(metric):
            metrics[metric] = mme_utils.mme_aggregate_results(res[metric])
    by_sub: dict[str, list] = defaultdict(list)
    for v in res.get("mme_perception_score", []) + res.get("mme_cognition_score", []):
        by_sub[v["category"]].append(v)
    for sub, vals in sorted(by_sub.items()):
        metrics[f"mme_{sub}"] = mme_utils.mme_aggregate_results(vals)
    answered = sorted(by_sub)
    missing = [s for s in MME_SUBTASKS if s not in by_sub]
    units = {}
    if "mme_perception_score" in metrics:
        units["MME perception"] = round(metrics["mme_perception_score"], 1)
        if "mme_cognition_score" in metrics:
            units["MME (perception + cognition)"] = round(metrics["mme_perception_score"] + metrics["mme_cognition_score"], 1)
    return {
        "metrics": metrics,
        "paper_units": units,
        "samples": samples,
        "ground_truth": [str(gt_dir)],
        "subtasks": answered,
        "missing_subtasks": missing,
        "perception_subtasks_answered": [s for s in answered if s in MME_PERCEPTION],
        "scoring": "lmms_eval.tasks.mme.utils (mme_process_results, mme_aggregate_results)",
    }


# ----------------------------------------------------------------------------------- ScienceQA-IMG


_OPTION_LINE = re.compile(r"^([A-Z])\. (.*)$")


def score_sqa(answers: Path, data_root: Path, *, questions: Path | None = None, subset: str = "img") -> dict:
    """ScienceQA-IMG accuracy: lmms-eval's ``sqa_process_results`` on LLaVA's test questions with an image.

    ``subset="all"`` scores every test question instead (LLaVA's overall accuracy).
    """
    from lmms_eval.tasks.scienceqa import utils as sqa_utils

    questions = questions or data_root / "llava_eval_answers" / "scienceqa" / "llava_test_CQM-A.json"
    probs = _read_json(questions, "ScienceQA question")
    if subset not in ("img", "all"):
        raise ScoreError(f"subset {subset!r} is invalid (img or all)")
    ans = _answers_by_id(_read_jsonl(answers, "answer"), answers)
    hits = []
    samples = []
    missing = 0
    for p in probs:
        if subset == "img" and not p.get("image"):
            continue
        human = p["conversations"][0]["value"]
        target = p["conversations"][1]["value"].strip()
        choices = [m.group(2) for line in human.splitlines() if (m := _OPTION_LINE.match(line.strip()))]
        if target not in [chr(65 + i) for i in range(len(choices))]:
            raise ScoreError(f"{questions}: question {p['id']} target {target!r} is not one of its options")
        got = ans.get(str(p["id"]))
        if not got:
            missing += 1
            continue
        doc = {"choices": choices, "answer": ord(target) - 65}
        s = sqa_utils.sqa_process_results(doc, [str(got[0]["text"])])["exact_match"]
        hits.append(s)
        samples.append({"question_id": p["id"], "answer": got[0]["text"], "target": target, "score": s})
    if not hits:
        raise ScoreError(f"{answers}: no answer matches a ScienceQA-{subset.upper()} question of {questions}")
    acc = sum(hits) / len(hits)
    return {
        "metrics": {"exact_match": acc},
        "paper_units": {f"SQA-{subset.upper()} accuracy (%)": round(100 * acc, 1)},
        "samples": samples,
        "ground_truth": [str(questions)],
        "unanswered_questions": missing,
        "note": (f"{missing} question(s) of the subset have no answer and are left out" if missing else None),
        "scoring": "lmms_eval.tasks.scienceqa.utils.sqa_process_results, mean",
    }


# ------------------------------------------------------------------------------------- MMBench-dev


def score_mmbench(answers: Path, data_root: Path, *, questions: Path | None = None) -> dict:
    """MMBench-dev CircularEval accuracy (x100) with MMBench's official option extraction
    (:func:`apet_bench.data.mmbench.circular_eval`; no judge: an unparsable answer counts wrong).

    The ground truth is ``mmbench_dev_20230712_qa_from_xlsx.json`` (an xlsx export in which a row with fewer
    than 4 options has no ``prediction`` key and a shifted letter in its first empty option column, dropped here).
    """
    from apet_bench.data.mmbench import circular_eval

    questions = questions or data_root / "llava_eval_answers" / "mmbench" / "mmbench_dev_20230712_qa_from_xlsx.json"
    gt = _read_json(questions, "MMBench-dev ground-truth")
    ans = _answers_by_id(_read_jsonl(answers, "answer"), answers)
    rows = []
    for g in gt:
        got = ans.get(str(g["index"]))
        if not got:
            raise ScoreError(f"{answers}: no answer for MMBench-dev index {g['index']} (CircularEval needs every variant)")
        opts = [g[c] for c in "ABCD" if c in g]
        if "prediction" not in g:
            opts = opts[:-1]
        row = {"index": int(g["index"]), "question": g["question"], "answer": g["answer"],
               "prediction": str(got[0]["text"]), "category": g.get("category", "uncategorized")}
        row.update(dict(zip("ABCD", opts)))
        rows.append(row)
    res = circular_eval(rows)
    return {
        "metrics": {"gpt_eval_score": res.score, "mmbench_unparsable": res.unparsable, "mmbench_groups": res.num_groups},
        "paper_units": {"MMBench-dev CircularEval (%)": round(res.score, 1)},
        "samples": [{"sample_id": f"group{g['group_id']}", "group_id": g["group_id"], "hit": g["hit"],
                     "members": g["members"]} for g in res.groups],
        "ground_truth": [str(questions)],
        "scoring": "CircularEval with MMBench's can_infer extraction (apet_bench.data.mmbench.circular_eval)",
    }


# ------------------------------------------------------------------------------------------ entry


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def score_answers(benchmark: str, answers: str | os.PathLike, data_root: str | os.PathLike | None,
                  **options: Any) -> dict:
    """Score one answer file; returns the result dict (``metrics``, ``paper_units``, ``samples``, ...).

    Parameters
    ----------
    benchmark : {"pope", "mme", "sqa", "mmbench"}
        Also the config names ``scienceqa_img``, ``mmbench_en``.
    answers : path
        JSON lines with ``question_id`` and ``text`` (MME also ``prompt``).
    data_root : path
        Holds the ground truth (see the module docstring).
    **options
        ``questions`` (pope/sqa/mmbench: another question/ground-truth file), ``pope_random`` (2910|3000),
        ``subset`` (sqa: img|all), ``ground_truth_subdir`` (mme).

    Raises
    ------
    ScoreError
        Unknown benchmark, missing files, answers that do not match the ground truth.
    """
    if benchmark not in BENCHMARKS:
        raise ScoreError(f"unknown benchmark {benchmark!r} (available: pope, mme, sqa, mmbench)")
    if data_root in (None, "", "null"):
        raise ScoreError("data_root is not set (give data_root=<dir> or set APET_BENCH_DATA_ROOT)")
    root = Path(os.path.expanduser(str(data_root))).resolve()
    if not root.is_dir():
        raise ScoreError(f"data_root {root} does not exist or is not a directory")
    ans = Path(os.path.expanduser(str(answers))).resolve()
    if not ans.is_file():
        raise ScoreError(f"answer file not found: {ans}")
    _quiet_loguru()
    kw = dict(options)
    if kw.get("questions"):
        kw["questions"] = Path(os.path.expanduser(str(kw["questions"]))).resolve()
    name = BENCHMARKS[benchmark]
    if name == "pope":
        if "pope_random" in kw:
            kw["pope_random"] = int(kw["pope_random"])
        out = score_pope(ans, root, **kw)
    elif name == "mme":
        out = score_mme(ans, root, **kw)
    elif name == "scienceqa_img":
        out = score_sqa(ans, root, **kw)
    else:
        out = score_mmbench(ans, root, **kw)
    out["benchmark"] = name
    out["answers"] = str(ans)
    out["answers_sha256"] = _sha256(ans)
    out["num_samples"] = len(out["samples"])
    return out


def write_run(result: Mapping[str, Any], *, results_dir: str | os.PathLike, model: str, method: str = "none",
              budget: int | float | None = None, force: bool = False) -> Path:
    """Write a scored answer file as a run directory (atomic, :class:`apet_bench.results.RunStore`).

    The run is named ``<model>__<method>__<budget>__<benchmark>`` and its ``run.json`` says
    ``"source": "imported"``; the table aggregators treat it like any other run.

    Raises
    ------
    FileExistsError
        The run is finished and ``force`` is false.
    """
    from apet_bench.results import RUN_MARKER, RunStore, collect_provenance, run_name

    name = run_name(model, method, budget, result["benchmark"])
    store = RunStore(results_dir)
    summary = {
        "status": "complete",
        "name": name,
        "source": "imported",
        "groups": {"model": model, "method": method, "benchmark": result["benchmark"]},
        "model": model,
        "method": method,
        "method_params": {},
        "budget": None if method == "none" else budget,
        "benchmark": result["benchmark"],
        "protocol": "llava",  # LLaVA's own answers, scored with the LLaVA protocol's parsers
        "task": f"imported:{result['benchmark']}",
        "metrics": dict(result["metrics"]),
        "num_samples": result["num_samples"],
        "skipped_samples": 0,
        "weights": f"imported predictions {result['answers']} (sha256 {result['answers_sha256'][:12]})",
        "random_weights": False,
        "device": None,
        "attn_implementation": None,
        "note": f"imported predictions re-scored by apet_bench.score ({result['scoring']})",
    }
    with store.open_run(name, force=force) as w:
        w.write_json("metrics.json", {k: v for k, v in result.items() if k != "samples"})
        w.write_jsonl("samples.jsonl", result["samples"])
        w.write_json("provenance.json", collect_provenance())
        w.write_json(RUN_MARKER, summary)
    return store.run_dir(name)


def _command() -> Any:
    from apet_bench.cli import REQUIRED, Command, Key

    return Command(
        "python -m apet_bench.score",
        "Score an answer file (JSON lines) against the ground truth with the official scorers; prints a "
        "summary, then the result as one JSON line; write_run=true also stores it as a results run.",
        (
            Key("benchmark", REQUIRED, help="pope, mme, sqa or mmbench (also scienceqa_img, mmbench_en)", metavar="name"),
            Key("answers", REQUIRED, help="the answer file (question_id, text; MME also prompt)", metavar="file"),
            Key("data_root", None, help="benchmark data root (default $APET_BENCH_DATA_ROOT)"),
            Key("questions", None, help="another question / ground-truth file (pope, sqa, mmbench)"),
            Key("pope_random", None, help="POPE random split size: 2910 or 3000"),
            Key("subset", None, help="sqa: img or all"),
            Key("ground_truth_subdir", None, help="mme: ground-truth directory under data_root"),
            Key("write_run", False, "bool", help="also write a run directory under results_dir"),
            Key("model", None, help="run's model name (write_run; default imported)"),
            Key("method", "none", help="run's method name (write_run)"),
            Key("budget", None, "any", help="run's budget (write_run; null or full: none)"),
            Key("results_dir", "results", help="results directory (write_run)"),
            Key("force", False, "bool", help="replace an existing run (write_run)"),
        ),
    )


def main(argv: Sequence[str] | None = None) -> int:
    """CLI; prints a summary, then the result as one JSON object on the last line. Exit 2 on bad input."""
    logging.basicConfig(level=logging.WARNING)

    def body(args: dict[str, Any]) -> int:
        t0 = time.perf_counter()
        options = {k: args[k] for k in ("questions", "pope_random", "subset", "ground_truth_subdir")
                   if args[k] is not None}
        data_root = args["data_root"] or os.environ.get("APET_BENCH_DATA_ROOT")
        budget = args["budget"]
        if budget in ("", "full"):
            budget = None
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, float))):
            raise ScoreError(f"budget {budget!r} is not an integer, a ratio, null or full")
        result = score_answers(args["benchmark"], args["answers"], data_root, **options)
        run_dir = None
        if args["write_run"]:
            run_dir = str(write_run(result, results_dir=args["results_dir"], model=args["model"] or "imported",
                                    method=args["method"], budget=budget, force=args["force"]))
        out = {k: v for k, v in result.items() if k != "samples"}
        out["run_dir"] = run_dir
        out["seconds"] = round(time.perf_counter() - t0, 2)
        for k, v in out["paper_units"].items():
            print(f"{k}: {v}   ({out['benchmark']}, {out['num_samples']} answers from {out['answers']}, "
                  f"scored by {out['scoring']})")
        if run_dir:
            print(f"run directory: {run_dir}")
        print(json.dumps(out, default=str), flush=True)
        return 0

    return _command().run(argv, body, (ScoreError, FileExistsError, ValueError))


if __name__ == "__main__":
    sys.exit(main())
