"""TGIF-QA (FrameQA + Count) converter and scoring: official test CSVs + local GIFs -> lmms-eval task.

Layout (``<data_root>/<subdir>/``, default ``tgif_qa/``; YunseokJANG/tgif-qa ``dataset/`` files)::

    Test_frameqa_question.csv   # gif_name<TAB>question<TAB>answer<TAB>type<TAB>vid_id<TAB>key<TAB>description
    Test_count_question.csv     # gif_name<TAB>question<TAB>answer<TAB>vid_id<TAB>key
    local_gifs.tsv              # gif<TAB>gif_name<TAB>question<TAB>answer<TAB>type<TAB>vid_id<TAB>key
    <gif>                       # the GIF files named in local_gifs.tsv

Decisions
---------
* Rows are every official FrameQA / Count test question whose ``gif_name`` has a local GIF listed in
  ``local_gifs.tsv`` (4 GIFs -> 6 FrameQA + 3 Count questions here). Each ``local_gifs.tsv`` row must
  be an official test row (same ``vid_id``, question and answer), else DataError naming it.
* ``question_id`` = the official ``vid_id`` (``FRAMEQA14461``, ``COUNT7999``), ``category`` =
  ``frameqa`` / ``count``, ``video`` = the GIF's absolute path (read in place, never copied);
  ``doc_to_visual`` returns ``[video]``, which the Video-LLaVA adapter decodes to 8 frames.
* A GIF that PyAV cannot decode is skipped with its questions (``on_corrupt_image="skip"``) or raises
  (``"error"``).
* Scoring: exact match of the normalised open-ended answer (:func:`normalize_answer`), reported as
  ``exact_match_accuracy`` in percent. The GPT-judged accuracy that Video-LLaVA reports for
  TGIF-QA is a later issue.
"""

from __future__ import annotations

import csv
import logging
import os
import re
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._core import SPLIT, BuildResult, DataError, FileHasher, _q, one_line, resolve_data_root

log = logging.getLogger("apet_bench.data")

__all__ = [
    "CATEGORIES",
    "POST_PROMPT",
    "TGIFScan",
    "build_tgif",
    "fingerprint_items",
    "normalize_answer",
    "render_tgif_task_yaml",
    "scan_tgif",
    "tgif_aggregate_accuracy",
    "tgif_doc_to_text",
    "tgif_doc_to_visual",
    "tgif_process_results",
]

#: Official test files per category.
QUESTION_FILES: dict[str, str] = {"frameqa": "Test_frameqa_question.csv", "count": "Test_count_question.csv"}
CATEGORIES: tuple[str, ...] = tuple(QUESTION_FILES)
LOCAL_INDEX = "local_gifs.tsv"
#: lmms-eval's short-answer instruction (as in its MME / VQA tasks).
POST_PROMPT = "\nAnswer the question using a single word or phrase."
GENERATION_KWARGS: dict[str, Any] = {
    "max_new_tokens": 16,
    "temperature": 0,
    "top_p": 1.0,
    "num_beams": 1,
    "do_sample": False,
}
METRIC = "exact_match_accuracy"
_MODULE = "apet_bench.data.tgif"


@dataclass
class _Question:
    category: str
    vid_id: str
    gif_name: str
    question: str
    answer: str
    key: str


@dataclass
class TGIFScan:
    """Validated TGIF-QA files (no GIF decoded yet)."""

    root: Path
    folder: Path
    gifs: dict[str, Path]  # gif_name -> local file
    questions: list[_Question] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)
    categories: list[str] = field(default_factory=lambda: list(CATEGORIES))  # cfg ``categories``

    @property
    def source(self) -> str:
        return f"TGIF-QA test CSVs ({'+'.join(self.categories)}) + {len(self.gifs)} local GIFs in {self.folder}"


def _read_tsv(path: Path, required: Sequence[str]) -> list[dict[str, str]]:
    try:
        with open(path, encoding="utf-8-sig", newline="") as fh:
            reader = csv.DictReader(fh, delimiter="\t")
            missing = [c for c in required if c not in (reader.fieldnames or [])]
            if missing:
                raise DataError(f"{path}: missing column(s) {', '.join(missing)} (header {reader.fieldnames})")
            return [{k: (v or "").strip() for k, v in row.items() if k is not None} for row in reader]
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from None
    except (csv.Error, UnicodeDecodeError) as exc:
        raise DataError(f"{path} is not a tab-separated UTF-8 file: {exc}") from None


def scan_tgif(cfg: Mapping[str, Any], data_root: str | os.PathLike | None) -> TGIFScan:
    """Locate and validate the TGIF-QA files; see the module docstring for the rules.

    Raises
    ------
    DataError
        ``data_root`` None / not a directory; a missing CSV, ``local_gifs.tsv`` or listed GIF; a
        ``local_gifs.tsv`` row that is not an official test row; no question left.
    """
    subdir = str(cfg.get("subdir", "tgif_qa"))
    root = resolve_data_root(data_root, "TGIF-QA", f"{subdir}/{LOCAL_INDEX}")
    folder = root / subdir
    index = folder / LOCAL_INDEX
    if not index.is_file():
        raise DataError(
            f"no TGIF-QA layout under {root}: expected {index} (gif<TAB>gif_name<TAB>question<TAB>answer<TAB>...) "
            f"next to {' and '.join(QUESTION_FILES.values())}"
        )
    local = _read_tsv(index, ("gif", "gif_name", "question", "answer", "vid_id"))
    gifs: dict[str, Path] = {}
    for row in local:
        path = folder / row["gif"]
        if not path.is_file():
            raise DataError(f"GIF listed in {index} is missing: {path}")
        gifs.setdefault(row["gif_name"], path)
    cats = list(cfg.get("categories") or CATEGORIES)
    bad = [c for c in cats if c not in CATEGORIES]
    if bad or not cats:
        raise DataError(f"TGIF-QA categories {cats!r} are invalid (choose from {', '.join(CATEGORIES)})")
    scan = TGIFScan(root=root, folder=folder, gifs=gifs, files=[index], categories=[c for c in CATEGORIES if c in cats])
    official: dict[str, _Question] = {}
    for category, fname in QUESTION_FILES.items():
        path = folder / fname
        if not path.is_file():
            raise DataError(f"official TGIF-QA question file missing: {path}")
        scan.files.append(path)
        for row in _read_tsv(path, ("gif_name", "question", "answer", "vid_id", "key")):
            q = _Question(category, row["vid_id"], row["gif_name"], row["question"], row["answer"], row["key"])
            official[q.vid_id] = q
            if q.gif_name in gifs and category in scan.categories:
                scan.questions.append(q)
    for row in local:
        ref = official.get(row["vid_id"])
        if ref is None or (ref.question, ref.answer, ref.gif_name) != (row["question"], row["answer"], row["gif_name"]):
            raise DataError(f"{index}: row {row['vid_id']} ({row['gif']}) is not an official TGIF-QA test row")
    if not scan.questions:
        raise DataError(f"no TGIF-QA test question has a local GIF in {folder}")
    scan.files += sorted(set(gifs.values()))
    return scan


def fingerprint_items(scan: TGIFScan, hasher: FileHasher) -> list[tuple[str, str]]:
    """``(path relative to data_root, sha256)`` of every file the conversion reads."""
    return [(Path(os.path.relpath(p, scan.root)).as_posix(), hasher.sha256(p)) for p in scan.files]


def tgif_features():
    """``datasets.Features`` of the generated rows (all strings)."""
    import datasets

    cols = ("question_id", "question", "answer", "category", "video", "gif_name", "key")
    return datasets.Features({c: datasets.Value("string") for c in cols})


def build_tgif(scan: TGIFScan, on_corrupt_image: str) -> BuildResult:
    """Check every GIF decodes (PyAV, 8 frames) and emit one row per question, per category chunk."""
    import datasets

    from .video import VideoDecodeError, load_video

    bad: dict[str, str] = {}
    res = BuildResult(chunks=[])
    for gif_name, path in scan.gifs.items():
        try:
            load_video(path)
        except VideoDecodeError as exc:
            if on_corrupt_image == "error":
                raise DataError(f"corrupt TGIF-QA GIF {path}: {exc}") from None
            bad[gif_name] = one_line(exc)
            n = sum(q.gif_name == gif_name for q in scan.questions)
            log.warning("skipping undecodable TGIF-QA GIF %s (%s) and its %d questions", path, exc, n)
            res.skipped.append({"path": str(path), "reason": bad[gif_name], "questions": n})
    for category in CATEGORIES:
        rows = [
            {
                "question_id": q.vid_id,
                "question": q.question,
                "answer": q.answer,
                "category": category,
                "video": str(scan.gifs[q.gif_name]),
                "gif_name": q.gif_name,
                "key": q.key,
            }
            for q in scan.questions
            if q.category == category and q.gif_name not in bad
        ]
        if rows:
            res.chunks.append(datasets.Dataset.from_list(rows, features=tgif_features()))
            res.subtasks.append(category)
    res.missing_subtasks = [c for c in scan.categories if c not in res.subtasks]
    return res


def render_tgif_task_yaml(task_name: str, dataset_path: str, header: Sequence[str]) -> str:
    """Text of the local TGIF-QA task YAML (functions of this module via ``!function`` absolute imports)."""
    lines = [f"# {one_line(h)}" for h in header]
    lines += [
        "# Scored by exact match of the normalised open-ended answer (apet_bench.data.tgif.normalize_answer);",
        "# the GPT-judged accuracy Video-LLaVA reports for TGIF-QA is a later issue.",
        f"task: {_q(task_name)}",
        f"dataset_path: {_q(dataset_path)}",
        "dataset_kwargs:",
        "  load_from_disk: true",
        f"test_split: {SPLIT}",
        "output_type: generate_until",
        f"doc_to_visual: !function {_MODULE}.tgif_doc_to_visual",
        f"doc_to_text: !function {_MODULE}.tgif_doc_to_text",
        'doc_to_target: "answer"',
        "generation_kwargs:",
        *(f"  {k}: {_q(v)}" for k, v in GENERATION_KWARGS.items()),
        f"process_results: !function {_MODULE}.tgif_process_results",
        "metric_list:",
        f"  - metric: {METRIC}",
        f"    aggregation: !function {_MODULE}.tgif_aggregate_accuracy",
        "    higher_is_better: true",
        "lmms_eval_specific_kwargs:",
        "  default:",
        '    pre_prompt: ""',
        f"    post_prompt: {_q(POST_PROMPT)}",
        "metadata:",
        "  - version: 0.0",
        "",
    ]
    return "\n".join(lines)


# ------------------------------------------------------------------------- lmms-eval task functions


def tgif_doc_to_visual(doc: Mapping[str, Any]) -> list[str]:
    """``[absolute GIF path]`` (the adapter decodes it)."""
    return [doc["video"]]


def tgif_doc_to_text(doc: Mapping[str, Any], lmms_eval_specific_kwargs: Mapping[str, Any] | None = None) -> str:
    """``pre_prompt + question + post_prompt`` (default post prompt :data:`POST_PROMPT`)."""
    kw = lmms_eval_specific_kwargs or {}
    pre = kw.get("pre_prompt", "")
    post = kw.get("post_prompt", POST_PROMPT)
    return f"{pre}{doc['question'].strip()}{post}"


_NUMBER_WORDS = {
    w: str(i)
    for i, w in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
        "sixteen seventeen eighteen nineteen twenty".split()
    )
}
_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")
_ARTICLES = {"a", "an", "the"}


def normalize_answer(text: str) -> str:
    """Lower case, punctuation -> space, articles dropped, number words -> digits, whitespace collapsed.

    ``"The Dog."`` -> ``"dog"``; ``"Two"`` -> ``"2"`` (Count answers are integers); ``"  brown "`` ->
    ``"brown"``.
    """
    words = _PUNCT.sub(" ", str(text).lower()).split()
    return " ".join(_NUMBER_WORDS.get(w, w) for w in words if w not in _ARTICLES)


def tgif_process_results(doc: Mapping[str, Any], results: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``{exact_match_accuracy: {question_id, category, prediction, answer, correct}}`` for one doc.

    ``correct`` is 1 when :func:`normalize_answer` of the first line of the prediction equals that
    of the ground-truth answer, else 0.
    """
    pred = str(results[0]) if results else ""
    first = pred.strip().splitlines()[0] if pred.strip() else ""
    correct = int(normalize_answer(first) == normalize_answer(doc["answer"]))
    return {
        METRIC: {
            "question_id": doc["question_id"],
            "category": doc["category"],
            "prediction": pred,
            "answer": doc["answer"],
            "correct": correct,
        }
    }


def tgif_aggregate_accuracy(results: Sequence[Mapping[str, Any]]) -> float:
    """Exact-match accuracy in percent over all questions (per-category accuracies are logged)."""
    if not results:
        return 0.0
    for category in CATEGORIES:
        sub = [r["correct"] for r in results if r.get("category") == category]
        if sub:
            log.info("TGIF-QA %s exact-match accuracy: %.2f%% (%d questions)", category, 100 * sum(sub) / len(sub), len(sub))
    return 100.0 * sum(int(r["correct"]) for r in results) / len(results)
