"""The official LLaVA-family evaluation protocol as lmms-eval task functions (``benchmark.protocol: llava``).

The ApET paper's Tables 1-4 come from the LLaVA-family evaluation scripts (haotian-liu/LLaVA
``llava/eval/*.py`` and ``scripts/v1_5/eval/*.sh``, forked unchanged by MaQianKun0/ApET), not from
lmms-eval's task defaults. This module reproduces, per benchmark, the question text those scripts
fed (after removing the chat template) and the way they parsed and scored the answers:

============ ======================================================================================
benchmark    question text (``doc_to_text``) and scoring, as the official code
============ ======================================================================================
POPE         ``{question}\\nAnswer the question using a single word or phrase.`` with the question
             as in ``llava_pope_test.jsonl`` (POPE's early "imange" typo in "Is there an <obj> in the
             image?" questions included, see :func:`pope_question`); answers parsed by
             ``llava/eval/eval_pope.py`` (:func:`parse_pope_llava`), mean F1 over the categories.
MME          ``llava_mme.jsonl``: the eval_tool question without "Please answer yes or no." (and the
             whitespace before it) + the short-answer instruction (:func:`mme_question`).
MMBench      ``llava/eval/model_vqa_mmbench.py``: ``{hint}\\n{question}\\nA. ...\\nB. ...`` + ``\\n`` +
             "Answer with the option's letter from the given choices directly." (EN) or
             "请直接回答选项字母。" (CN); options A-D up to the first empty one; CircularEval over
             the dev split with MMBench's official option extraction (:mod:`apet_bench.data.mmbench`).
ScienceQA    ``llava_test_CQM-A.json`` + ``--single-pred-prompt``: ``Context: {hint}\\n{question}\\nA. ...``
             + ``\\nAnswer with the option's letter from the given choices directly.`` (lmms-eval's
             ``sqa_doc_to_text`` renders the same text).
TextVQA      ``llava_textvqa_val_v051_ocr.jsonl``: the question **as written** + ``\\nReference OCR token:
             ...`` + the short-answer instruction (lmms-eval ``capitalize()``-s the question).
VizWiz       ``llava_vizwiz_test`` questions as written + "When the provided information is insufficient,
             respond with 'Unanswerable'." + the short-answer instruction (lmms-eval capitalizes).
============ ======================================================================================

Sources (file @ commit): haotian-liu/LLaVA ``llava/eval/eval_pope.py`` @ 4241f08,
``llava/eval/model_vqa_mmbench.py`` @ 064abb3, ``llava/eval/model_vqa_science.py``,
``scripts/v1_5/eval/{pope,mme,mmbench,mmbench_cn,sqa,textvqa,vizwiz,vqav2}.sh``; the question files
of ``playground/data/eval`` (refs/pull/1199/head @ 32cebc3). Every function here is checked against
LLaVA-1.5-13B's released question/answer files in ``tests/test_protocol.py``.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

SHORT_ANSWER = "\nAnswer the question using a single word or phrase."
MC_POST_PROMPT_EN = "Answer with the option's letter from the given choices directly."
MC_POST_PROMPT_CN = "请直接回答选项字母。"
VIZWIZ_POST_PROMPT = "\nWhen the provided information is insufficient, respond with 'Unanswerable'." + SHORT_ANSWER
#: LLaVA's model_vqa_mmbench.py reads options A-D only (``all_options``).
MMBENCH_OPTIONS = ("A", "B", "C", "D")

_MME_SUFFIX = re.compile(r"\s*Please answer yes or no\.?\s*$")
_POPE_AN = re.compile(r"^(Is there an .+ in the) image\?$")


# ----------------------------------------------------------------------------------------- text


def pope_question(question: str) -> str:
    """POPE question text as LLaVA fed it: ``llava_pope_test.jsonl``'s ``text``.

    LLaVA's question file was built from an early POPE release in which every "Is there an <obj> in
    the image?" read "... in the imange?"; POPE fixed the typo later (AoiDragon/POPE, the current
    ``coco_pope_{adversarial,popular}.json``). The LLaVA protocol re-applies it so the model reads the
    same tokens as in the published runs (102 of LLaVA's 8,910 questions; the 2,910-line random file
    still has it).

    Raises
    ------
    TypeError
        ``question`` is not a string.
    """
    if not isinstance(question, str):
        raise TypeError(f"POPE question must be a string, got {type(question).__name__}")
    q = question.strip()
    q = _POPE_AN.sub(r"\1 imange?", q)
    return q + SHORT_ANSWER


def mme_question(question: str) -> str:
    """MME question text as ``llava_mme.jsonl``: the eval_tool question without "Please answer yes or
    no." and the whitespace before it (7 ground-truth questions have two spaces there, which
    lmms-eval's ``replace(" Please answer yes or no.", "")`` leaves as a trailing space), + the
    short-answer instruction."""
    if not isinstance(question, str):
        raise TypeError(f"MME question must be a string, got {type(question).__name__}")
    return _MME_SUFFIX.sub("", question.strip()) + SHORT_ANSWER


def is_none(value: Any) -> bool:
    """LLaVA's ``is_none`` (model_vqa_mmbench.py): None, NaN, or the strings 'nan' / 'none' (any case)."""
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and value.lower() in ("nan", "none")


def mmbench_options(doc: Mapping[str, Any]) -> list[str]:
    """The options LLaVA reads from an MMBench row: columns A-D up to the first empty one."""
    out = []
    for c in MMBENCH_OPTIONS:
        v = doc.get(c)
        if is_none(v):
            break
        out.append(str(v))
    return out


def mmbench_body(question: str, options: Sequence[str], hint: Any = None) -> str:
    """``cur_prompt`` of model_vqa_mmbench.py (the answer file's ``prompt``): ``{hint}\\n{question}`` then
    one ``\\n{letter}. {option}`` per option. A hint that :func:`is_none` is left out."""
    text = str(question) if is_none(hint) else f"{hint}\n{question}"
    for c, o in zip(MMBENCH_OPTIONS, options):
        text += f"\n{c}. {o}"
    return text


def mmbench_question(question: str, options: Sequence[str], hint: Any = None, lang: str = "en") -> str:
    """The full MMBench question text LLaVA fed (``--single-pred-prompt``), EN or CN post-prompt.

    Raises
    ------
    ValueError
        ``lang`` not ``en`` / ``cn``, or more than 4 options.
    """
    if lang not in ("en", "cn"):
        raise ValueError(f"MMBench lang {lang!r} is invalid (en or cn)")
    if len(options) > len(MMBENCH_OPTIONS):
        raise ValueError(f"MMBench row has {len(options)} options; LLaVA reads at most 4 (A-D)")
    post = MC_POST_PROMPT_CN if lang == "cn" else MC_POST_PROMPT_EN
    return mmbench_body(question, options, hint) + "\n" + post


def sqa_question(hint: str | None, question: str, choices: Sequence[str]) -> str:
    """ScienceQA-IMG text of ``llava_test_CQM-A.json`` + the single-prediction prompt:
    ``Context: {hint}\\n{question}\\nA. ...`` (no context line for an empty hint) + ``\\n`` + the EN
    multiple-choice instruction."""
    ctx = f"Context: {hint}\n" if hint else ""
    opts = "\n".join(f"{chr(65 + i)}. {c}" for i, c in enumerate(choices))
    return f"{ctx}{question}\n{opts}\n{MC_POST_PROMPT_EN}"


def textvqa_question(question: str, ocr_tokens: Sequence[str] | None) -> str:
    """TextVQA text of ``llava_textvqa_val_v051_ocr.jsonl``: the question as written (no
    ``capitalize()``), ``\\nReference OCR token: a, b, ...`` when there are tokens, then the short-answer
    instruction."""
    ocr = f"\nReference OCR token: {', '.join(ocr_tokens)}" if ocr_tokens else ""
    return f"{question}{ocr}{SHORT_ANSWER}"


def vizwiz_question(question: str) -> str:
    """VizWiz text of LLaVA's ``llava_test.jsonl`` (scripts/v1_5/eval/vizwiz.sh): the question as written +
    the "Unanswerable" instruction + the short-answer instruction."""
    return f"{question}{VIZWIZ_POST_PROMPT}"


# ------------------------------------------------------------------- lmms-eval doc_to_text hooks


def pope_doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return pope_question(doc["question"])


def mme_doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return mme_question(doc["question"])


def mmbench_en_doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return mmbench_question(doc["question"], mmbench_options(doc), doc.get("hint"), "en")


def mmbench_cn_doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return mmbench_question(doc["question"], mmbench_options(doc), doc.get("hint"), "cn")


def textvqa_doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return textvqa_question(doc["question"], doc.get("ocr_tokens"))


def vizwiz_doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return vizwiz_question(doc["question"])


def sqa_doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return sqa_question(doc.get("hint"), doc["question"], doc["choices"])


# ------------------------------------------------------------------------------- POPE parsing


def parse_pope_llava(answer: str) -> str:
    """``llava/eval/eval_pope.py``: keep the text before the first '.', drop commas, split on spaces;
    'no' if one of the words is ``No``, ``no`` or ``not``, else 'yes' (so any answer is counted)."""
    text = str(answer)
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "no" in words or "not" in words) else "yes"


def parse_pope_lmms_eval(answer: str) -> str | None:
    """lmms-eval 0.7.3 ``pope_process_results``: 'yes'/'no' only for an exact (lower, stripped) match,
    else None (such an answer is in neither TP/FP nor TN/FN)."""
    a = str(answer).lower().strip()
    return a if a in ("yes", "no") else None


def pope_process_results(doc: Mapping[str, Any], results: Sequence[str]) -> dict[str, dict]:
    """One record per metric, each holding both parsers' verdicts.

    Record: ``sample_id`` (``<category>/<question_id>``), ``question_id``, ``category``, ``target``,
    ``prediction`` (raw answer), ``pred_llava`` (yes/no), ``pred_lmms_eval`` (yes/no/None),
    ``non_binary`` (the answer is not a bare yes/no), ``score`` (LLaVA parser correct, 0/1).
    """
    pred = results[0] if results else ""
    target = str(doc["answer"]).lower().strip()
    cat = doc.get("category", "all")
    qid = str(doc.get("question_id"))
    sid = qid if qid.startswith(f"{cat}/") else f"{cat}/{qid}"
    p_llava = parse_pope_llava(pred)
    p_lmms = parse_pope_lmms_eval(pred)
    rec = {"sample_id": sid, "question_id": qid, "category": cat, "target": target, "prediction": pred,
           "pred_llava": p_llava, "pred_lmms_eval": p_lmms, "non_binary": p_lmms is None,
           "score": float(p_llava == target)}
    keys = ("pope_f1_mean", "pope_accuracy_mean", "pope_f1_mean_llava", "pope_f1_mean_lmms_eval",
            "pope_accuracy_mean_lmms_eval", "pope_non_binary_answers", "pope_f1_parser_diff")
    return {k: dict(rec) for k in keys}


def _confusion(recs: Sequence[Mapping[str, Any]], parser: str) -> dict[str, float]:
    """TP/FP/TN/FN, precision, recall, F1, accuracy, yes ratio of one category's records.

    ``parser="llava"``: eval_pope.py's counts. ``parser="lmms_eval"``: lmms-eval's, where an unparsed
    answer is in no cell of the confusion matrix but is wrong in accuracy.
    """
    key = "pred_llava" if parser == "llava" else "pred_lmms_eval"
    tp = fp = tn = fn = 0
    for r in recs:
        p, t = r[key], r["target"]
        if p == "yes" and t == "yes":
            tp += 1
        elif p == "yes" and t == "no":
            fp += 1
        elif p == "no" and t == "no":
            tn += 1
        elif p == "no" and t == "yes":
            fn += 1
    n = len(recs)
    prec = tp / (tp + fp) if tp + fp else 0.0
    rec = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
    yes = sum(r[key] == "yes" for r in recs)
    return {"tp": tp, "fp": fp, "tn": tn, "fn": fn, "precision": prec, "recall": rec, "f1": f1,
            "accuracy": (tp + tn) / n if n else 0.0, "yes_ratio": yes / n if n else 0.0}


def pope_by_category(results: Sequence[Mapping[str, Any]], parser: str = "llava") -> dict[str, dict[str, float]]:
    """:func:`_confusion` per category (``parser``: ``llava`` or ``lmms_eval``).

    Raises
    ------
    ValueError
        Unknown ``parser``.
    """
    if parser not in ("llava", "lmms_eval"):
        raise ValueError(f"POPE parser {parser!r} is invalid (llava or lmms_eval)")
    by: dict[str, list] = defaultdict(list)
    for r in results:
        by[r.get("category", "all")].append(r)
    return {c: _confusion(v, parser) for c, v in sorted(by.items())}


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 0.0


def pope_aggregate_f1_llava(results) -> float:
    """Mean over categories of eval_pope.py's F1 (fraction)."""
    return _mean(m["f1"] for m in pope_by_category(results, "llava").values())


def pope_aggregate_accuracy_llava(results) -> float:
    return _mean(m["accuracy"] for m in pope_by_category(results, "llava").values())


def pope_aggregate_f1_lmms_eval(results) -> float:
    """Mean over categories of lmms-eval's F1 (exact yes/no only)."""
    return _mean(m["f1"] for m in pope_by_category(results, "lmms_eval").values())


def pope_aggregate_accuracy_lmms_eval(results) -> float:
    return _mean(m["accuracy"] for m in pope_by_category(results, "lmms_eval").values())


def pope_aggregate_non_binary(results) -> int:
    """How many answers were neither a bare yes nor a bare no (after lower/strip)."""
    return int(sum(bool(r["non_binary"]) for r in results))


def pope_aggregate_f1_diff(results) -> float:
    """Mean F1 with LLaVA's parser minus mean F1 with lmms-eval's (fraction; 0 when every answer is bare)."""
    return pope_aggregate_f1_llava(results) - pope_aggregate_f1_lmms_eval(results)
