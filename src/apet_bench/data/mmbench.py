"""MMBench (EN / CN) under the LLaVA protocol: LLaVA's prompt layout, CircularEval with MMBench's
official option extraction, an optional judge fallback, and a converter for the official dev TSV.

* **Question text**: :func:`apet_bench.data.llava_protocol.mmbench_question` (``model_vqa_mmbench.py``).
* **Data version**: LLaVA-1.5 evaluated ``mmbench_dev_20230712.tsv`` (4,377 rows: every question plus
  its circular copies, whose ``index`` is the question's + k x 1,000,000 with the options rotated).
  ``converter: mmbench`` reads that TSV from ``<data_root>/<subdir>/<tsv_file>`` (columns ``index,
  question, hint, A-D, answer, category, image`` (base64), optional ``l2-category, source, split``).
  The hub route (``source: hub``) reads lmms-lab-encoder/MMBench ``dev`` instead: another release of
  the dev set, recorded as such in ``metrics.json``.
* **Scoring**: CircularEval as MMBench's evaluator (``lmms_eval/tasks/mmbench/mmbench_evals.py``
  ``MMBench_Evaluator.eval_sub_data``, a copy of open-compass's): the rows of a question
  (``index % 1e6``) form a group; the group is correct when every row's extracted option equals its
  answer. Extraction = MMBench's ``can_infer`` (a lone option letter, else the one option whose text
  the answer contains). An answer it cannot place goes to the judge when ``judge_fallback`` is on
  (MMBench's matching prompt through :mod:`apet_bench.judge`'s endpoint); otherwise, or when the judge
  fails, it counts as wrong. MMBench's own evaluator instead draws a random letter after three failed
  GPT calls; we count such answers (``mmbench_unparsable``) rather than guess.
"""

from __future__ import annotations

import base64
import json
import logging
import os
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._core import SPLIT, BuildResult, DataError, FileHasher, _q, one_line, resolve_data_root
from .llava_protocol import MMBENCH_OPTIONS, is_none, mmbench_options

log = logging.getLogger("apet_bench.data")

CIRCULAR_BASE = 1_000_000
JUDGE_ENV_VAR = "APET_BENCH_MMBENCH_JUDGE"
_MOD = "apet_bench.data.mmbench"


def _evaluator():
    from lmms_eval.tasks.mmbench.mmbench_evals import MMBench_Evaluator

    return MMBench_Evaluator(sys_prompt="There are several options:")


def extract_option(prediction: str, choices: Mapping[str, str]) -> str | None:
    """MMBench's official extraction (``can_infer``: option letter, then option text), or None.

    ``choices`` maps letters to option texts (``{"A": "cat", "B": "dog"}``).
    """
    got = _evaluator().can_infer(str(prediction), {k: str(v) for k, v in choices.items()})
    return got if got else None


def judge_option(question: str, choices: Mapping[str, str], prediction: str, cfg: Any, *, client: Any = None) -> str | None:
    """Ask the judge (OpenAI-compatible endpoint, :class:`apet_bench.judge.JudgeConfig`) which option the
    answer matches, with MMBench's matching prompt (``MMBench_Evaluator.build_prompt``); None when the
    call fails or the reply names no single valid option."""
    from apet_bench.judge import _client

    ev = _evaluator()
    opts = [choices[c] for c in MMBENCH_OPTIONS if c in choices]
    prompt = ev.build_prompt(question, ev.build_option_str(opts), prediction)
    client = client or _client(cfg)
    try:
        resp = client.chat.completions.create(model=cfg.model, temperature=0.0 if cfg.temperature is None else cfg.temperature,
                                              messages=[{"role": "user", "content": prompt}])
        text = resp.choices[0].message.content or ""
    except Exception as exc:  # network, HTTP, malformed body: a failed call, counted
        log.warning("MMBench judge call failed: %s", one_line(exc)[:160])
        return None
    got = ev.can_infer(text, {k: str(v) for k, v in choices.items()})
    return got if got and got in choices else None


@dataclass
class CircularResult:
    """CircularEval over a set of MMBench rows.

    ``score`` is the percentage of groups (questions) answered right in every circular copy;
    ``groups`` one dict per question: ``group_id``, ``hit`` (0/1), ``category``, ``members`` (each row's
    ``index``, ``target``, ``extracted``, ``how`` = ``rule`` / ``judge`` / ``unparsable``).
    """

    score: float
    groups: list[dict] = field(default_factory=list)
    unparsable: int = 0
    judged: int = 0
    judge_failures: int = 0

    @property
    def num_groups(self) -> int:
        return len(self.groups)


def circular_eval(rows: Sequence[Mapping[str, Any]], *, judge_cfg: Any = None, client: Any = None) -> CircularResult:
    """CircularEval of MMBench rows (each: ``index``, ``answer``, ``prediction``, ``question``, A-D).

    A group is scored only from its own rows; every copy in the data must be present (a copy without
    its base question raises). With ``judge_cfg`` (a :class:`apet_bench.judge.JudgeConfig`) an answer
    the rules cannot place is sent to the judge; without it, it counts as wrong.

    Raises
    ------
    ValueError
        A row without ``index``/``answer``/``prediction``, or a circular copy whose base row is absent.
    """
    by: dict[int, list[Mapping[str, Any]]] = defaultdict(list)
    for r in rows:
        for k in ("index", "answer", "prediction"):
            if k not in r:
                raise ValueError(f"MMBench row lacks {k!r}: {dict(r).get('index')!r}")
        by[int(r["index"]) % CIRCULAR_BASE].append(r)
    bases = {int(r["index"]) for r in rows if int(r["index"]) < CIRCULAR_BASE}
    orphan = sorted(set(by) - bases)
    if orphan:
        raise ValueError(f"MMBench circular copies of question {orphan[0]} present without the question itself")
    res = CircularResult(score=0.0)
    for gid in sorted(by):
        members = []
        hit = 1
        for r in sorted(by[gid], key=lambda x: int(x["index"])):
            choices = {c: str(r[c]) for c in MMBENCH_OPTIONS if not is_none(r.get(c))}
            got = extract_option(str(r["prediction"]), choices)
            how = "rule"
            if got is None:
                if judge_cfg is not None:
                    got = judge_option(str(r.get("question", "")), choices, str(r["prediction"]), judge_cfg, client=client)
                    res.judged += 1
                    how = "judge"
                    if got is None:
                        res.judge_failures += 1
                        how = "unparsable"
                if got is None:
                    res.unparsable += 1
            if got != str(r["answer"]).strip():
                hit = 0
            members.append({"index": int(r["index"]), "target": str(r["answer"]).strip(), "extracted": got, "how": how})
        res.groups.append({"group_id": gid, "hit": hit, "category": by[gid][0].get("category"), "members": members})
    res.score = 100.0 * sum(g["hit"] for g in res.groups) / len(res.groups) if res.groups else 0.0
    return res


# ------------------------------------------------------------------- lmms-eval task functions


_ROW_KEYS = ("index", "question", "hint", "answer", "category", "l2-category", "L2-category", "source", "split")


def mmbench_process_results(doc: Mapping[str, Any], results: Sequence[str]) -> dict[str, dict]:
    """The row and the answer for the CircularEval aggregations, plus the rule-based extraction.

    Record: ``sample_id`` (``str(index)``), ``group_id`` (``index % 1e6``), the row's fields (A-D
    included), ``prediction``, ``extracted`` (MMBench's ``can_infer``; None = unparsable by rule).
    """
    pred = str(results[0]).strip() if results else ""
    rec = {k: (None if is_none(doc.get(k)) else doc.get(k)) for k in _ROW_KEYS if k in doc}
    for c in MMBENCH_OPTIONS:
        rec[c] = None if is_none(doc.get(c)) else str(doc.get(c))
    idx = int(doc["index"])
    rec.update({"sample_id": str(idx), "group_id": idx % CIRCULAR_BASE, "prediction": pred,
                "options": len(mmbench_options(doc))})
    rec["extracted"] = extract_option(pred, {c: rec[c] for c in MMBENCH_OPTIONS if rec[c] is not None})
    keys = ("gpt_eval_score", "mmbench_unparsable", "mmbench_judged", "mmbench_groups")
    return {k: dict(rec) for k in keys}


_MEMO: dict[tuple, CircularResult] = {}


def _judge_cfg():
    raw = os.environ.get(JUDGE_ENV_VAR)
    if not raw:
        return None
    from apet_bench.judge import JudgeConfig

    return JudgeConfig.from_mapping(json.loads(raw))


def _circular(results: Sequence[Mapping[str, Any]]) -> CircularResult:
    cfg = _judge_cfg()
    key = (repr(cfg), tuple((r["index"], r["prediction"]) for r in results))
    if key not in _MEMO:
        _MEMO.clear()
        _MEMO[key] = circular_eval(results, judge_cfg=cfg)
    return _MEMO[key]


def mmbench_aggregate_circular(results) -> float:
    """CircularEval accuracy in percent."""
    return _circular(results).score


def mmbench_aggregate_unparsable(results) -> int:
    """Answers neither the rules nor the judge could map to an option (counted wrong)."""
    return _circular(results).unparsable


def mmbench_aggregate_judged(results) -> int:
    """Answers sent to the judge (0 without ``judge_fallback``)."""
    return _circular(results).judged


def mmbench_aggregate_groups(results) -> int:
    """Number of CircularEval groups (questions) scored."""
    return _circular(results).num_groups


def render_mmbench_yaml(task_name: str, dataset_path: str, header: Sequence[str], *, lang: str = "en",
                        hub_include: str | None = None) -> str:
    """Task YAML: LLaVA's MMBench prompt (``lang`` en / cn), our CircularEval metrics.

    ``hub_include``: path of lmms-eval's ``mmbench_{en,cn}_dev.yaml`` to ``include:`` (hub data, its
    generation settings); otherwise a local saved dataset at ``dataset_path``.
    """
    from .llava_protocol import __name__ as proto

    lines = [f"# {one_line(h)}" for h in header]
    if hub_include:
        lines += [f"include: {hub_include}", f"task: {_q(task_name)}"]
    else:
        lines += [f"task: {_q(task_name)}", f"dataset_path: {_q(dataset_path)}", "dataset_kwargs:",
                  "  load_from_disk: true", f"test_split: {SPLIT}", "output_type: generate_until",
                  f"doc_to_visual: !function {_MOD}.mmbench_doc_to_visual", 'doc_to_target: "answer"',
                  "generation_kwargs:", "  max_new_tokens: 1024", "  temperature: 0", "  top_p: 1.0",
                  "  num_beams: 1", "  do_sample: false"]
    lines += [f"doc_to_text: !function {proto}.mmbench_{lang}_doc_to_text",
              f"process_results: !function {_MOD}.mmbench_process_results", "metric_list:"]
    for metric, fn in (("gpt_eval_score", "circular"), ("mmbench_unparsable", "unparsable"),
                       ("mmbench_judged", "judged"), ("mmbench_groups", "groups")):
        lines += [f"  - metric: {metric}", f"    aggregation: !function {_MOD}.mmbench_aggregate_{fn}",
                  f"    higher_is_better: {'true' if metric == 'gpt_eval_score' else 'false'}"]
    lines += ["lmms_eval_specific_kwargs:", "  default:", '    pre_prompt: ""', '    post_prompt: ""',
              "metadata:", "  - version: 0.0", ""]
    return "\n".join(lines)


def mmbench_doc_to_visual(doc):
    return [doc["image"].convert("RGB")]


# --------------------------------------------------------------------------- local converter


@dataclass
class MMBenchScan:
    root: Path
    tsv: Path
    files: list[Path] = field(default_factory=list)

    @property
    def source(self) -> str:
        return f"MMBench TSV {self.tsv}"


def scan_mmbench(cfg: Mapping[str, Any], data_root: str | os.PathLike | None) -> MMBenchScan:
    """Locate the official MMBench TSV (``<data_root>/<subdir>/<tsv_file>``).

    Raises
    ------
    DataError
        ``data_root`` None / absent, or the TSV missing (the message names it and the release).
    """
    subdir = str(cfg.get("subdir", "mmbench"))
    tsv_file = str(cfg.get("tsv_file", "mmbench_dev_20230712.tsv"))
    root = resolve_data_root(data_root, f"MMBench (benchmark {str(cfg.get('name', 'mmbench_en'))!r})",
                             f"{subdir}/{tsv_file}")
    tsv = root / subdir / tsv_file
    if not tsv.is_file():
        raise DataError(f"MMBench needs the official TSV {tsv} (the release LLaVA-1.5 evaluated, with base64 images); "
                        "absent here (or use benchmark.source=hub)")
    return MMBenchScan(root=root, tsv=tsv, files=[tsv])


def fingerprint_items(scan: MMBenchScan, hasher: FileHasher) -> list[tuple[str, str]]:
    return [(Path(os.path.relpath(p, scan.root)).as_posix(), hasher.sha256(p)) for p in scan.files]


def build_mmbench(scan: MMBenchScan, on_corrupt_image: str) -> BuildResult:
    """Rows of the TSV with the image decoded from base64 (bytes kept as they are)."""
    import datasets
    import pandas as pd

    from .mme import image_problem

    try:
        # pandas' default NA handling, as LLaVA's ``pd.read_table`` (an option read as NaN ends the options)
        df = pd.read_table(scan.tsv, dtype=str)
    except Exception as exc:
        raise DataError(f"cannot read MMBench TSV {scan.tsv}: {one_line(exc)}") from None
    need = {"index", "question", "A", "B", "answer", "image"}
    missing = sorted(need - set(df.columns))
    if missing:
        raise DataError(f"MMBench TSV {scan.tsv} lacks column(s) {', '.join(missing)}")
    cols = {"index": datasets.Value("int64"), "image": datasets.Image()}
    text_cols = ["question", "hint", *MMBENCH_OPTIONS, "answer", "category", "l2-category", "source", "split"]
    for c in text_cols:
        cols[c] = datasets.Value("string")
    rows = []
    res = BuildResult(chunks=[])
    for _, r in df.iterrows():
        try:
            data = base64.b64decode(r["image"], validate=False)
        except Exception as exc:
            data, problem = b"", one_line(exc)
        else:
            problem = image_problem(data)
        if problem is not None:
            if on_corrupt_image == "error":
                raise DataError(f"corrupt MMBench image in {scan.tsv} row index {r['index']}: {problem}")
            res.skipped.append({"path": f"{scan.tsv}#index={r['index']}", "reason": problem, "questions": 1})
            continue
        row = {"index": int(r["index"]), "image": {"bytes": data, "path": f"{r['index']}.jpg"}}
        for c in text_cols:
            v = r.get(c)
            row[c] = None if is_none(v) else str(v)
        rows.append(row)
    if rows:
        res.chunks.append(datasets.Dataset.from_list(rows, features=datasets.Features(cols)))
        res.subtasks.append("dev")
    return res
