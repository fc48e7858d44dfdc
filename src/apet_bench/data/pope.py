"""POPE (COCO, adversarial / popular / random) as one task scored by mean F1 over the three categories.

LLaVA-1.5 and the ApET paper report POPE as the **mean F1 over the three categories** (LLaVA issue
#626), with LLaVA-1.5's 2,910-line random split; lmms-eval's pooled ``pope`` task pools 9,000
questions instead. This module gives

* ``pope_process_results`` = lmms-eval's ``pope_process_results`` plus the doc's ``category``, and
* ``pope_aggregate_mean_f1`` / ``pope_aggregate_mean_accuracy``: lmms-eval's
  ``pope_aggregate_f1_score`` / ``pope_aggregate_accuracy`` per category, then the mean (fractions),

used by the local task (``converter: pope``: the official question files under
``<data_root>/pope/`` + the COCO val2014 images under ``<data_root>/<images_subdir>/``) and by the
hub variant (``source: hub``: ``lmms-lab-encoder/POPE`` split ``test``, 3 x 3,000 questions, whose
random split is POPE's current 3,000-line one, not LLaVA's 2,910).

Local layout::

    <data_root>/pope/coco_pope_adversarial.json, coco_pope_popular.json,
                     coco_pope_random_2910_llava.json (random_file)       # one JSON object per line
    <data_root>/<images_subdir>/COCO_val2014_<id>.jpg                   # default coco/val2014
"""

from __future__ import annotations

import json
import logging
import os
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._core import SPLIT, BuildResult, DataError, FileHasher, _q, one_line, resolve_data_root

log = logging.getLogger("apet_bench.data")

CATEGORIES = ("adversarial", "popular", "random")
POST_PROMPT = "\nAnswer the question using a single word or phrase."
_POPE = "lmms_eval.tasks.pope.utils"
_MOD = "apet_bench.data.pope"


# ------------------------------------------------------------------ lmms-eval task functions


def pope_process_results(doc: Mapping[str, Any], results: Sequence[str]) -> dict[str, dict]:
    """lmms-eval's POPE per-sample record for the two mean metrics, with ``category`` added."""
    from lmms_eval.tasks.pope import utils as pope_utils

    rec = pope_utils.pope_process_results(doc, results)["pope_f1_score"]
    rec = {**rec, "category": doc.get("category", "all")}
    return {"pope_f1_mean": dict(rec), "pope_accuracy_mean": dict(rec)}


def _per_category(results: Sequence[Mapping[str, Any]]) -> dict[str, list]:
    by: dict[str, list] = defaultdict(list)
    for r in results:
        by[r.get("category", "all")].append(r)
    return by


def pope_aggregate_mean_f1(results: Sequence[Mapping[str, Any]]) -> float:
    """Mean over categories of lmms-eval's ``pope_aggregate_f1_score`` (a fraction in [0, 1])."""
    from lmms_eval.tasks.pope import utils as pope_utils

    by = _per_category(results)
    f1 = {c: pope_utils.pope_aggregate_f1_score(v) for c, v in sorted(by.items())}
    log.info("POPE F1 per category: %s", {c: round(v, 4) for c, v in f1.items()})
    return sum(f1.values()) / len(f1) if f1 else 0.0


def pope_aggregate_mean_accuracy(results: Sequence[Mapping[str, Any]]) -> float:
    """Mean over categories of lmms-eval's ``pope_aggregate_accuracy``."""
    from lmms_eval.tasks.pope import utils as pope_utils

    by = _per_category(results)
    acc = [pope_utils.pope_aggregate_accuracy(v) for v in by.values()]
    return sum(acc) / len(acc) if acc else 0.0


_PROTO = "apet_bench.data.llava_protocol"


def render_pope_yaml(task_name: str, dataset_path: str, header: Sequence[str], *, hub: bool = False,
                     protocol: str = "llava") -> str:
    """The task YAML: POPE's question text, both answer parsers on every run, per-category mean metrics.

    ``protocol="llava"``: LLaVA's question text (:func:`apet_bench.data.llava_protocol.pope_question`) and
    ``pope_f1_mean`` / ``pope_accuracy_mean`` from ``eval_pope.py``'s parser; ``"lmms_eval"``: lmms-eval's
    ``pope_doc_to_text`` and its exact yes/no parser for the headline. Either way the metrics also hold
    ``pope_f1_mean_llava``, ``pope_f1_mean_lmms_eval``, ``pope_accuracy_mean_lmms_eval``,
    ``pope_non_binary_answers`` (answers that are not a bare yes/no) and ``pope_f1_parser_diff``
    (LLaVA's minus lmms-eval's mean F1).

    Raises
    ------
    ValueError
        Unknown ``protocol``.
    """
    if protocol not in ("llava", "lmms_eval"):
        raise ValueError(f"POPE protocol {protocol!r} is invalid (llava or lmms_eval)")
    head = "llava" if protocol == "llava" else "lmms_eval"
    metrics = [("pope_f1_mean", f"pope_aggregate_f1_{head}", True),
               ("pope_accuracy_mean", f"pope_aggregate_accuracy_{head}", True),
               ("pope_f1_mean_llava", "pope_aggregate_f1_llava", True),
               ("pope_f1_mean_lmms_eval", "pope_aggregate_f1_lmms_eval", True),
               ("pope_accuracy_mean_lmms_eval", "pope_aggregate_accuracy_lmms_eval", True),
               ("pope_non_binary_answers", "pope_aggregate_non_binary", False),
               ("pope_f1_parser_diff", "pope_aggregate_f1_diff", False)]
    text_fn = f"{_PROTO}.pope_doc_to_text" if protocol == "llava" else f"{_POPE}.pope_doc_to_text"
    lines = [f"# {one_line(h)}" for h in header]
    lines += [f"task: {_q(task_name)}", f"dataset_path: {_q(dataset_path)}"]
    if hub:
        lines += ["dataset_kwargs:", "  token: true", "test_split: test"]
    else:
        lines += ["dataset_kwargs:", "  load_from_disk: true", f"test_split: {SPLIT}"]
    lines += [
        "output_type: generate_until",
        f"doc_to_visual: !function {_POPE}.pope_doc_to_visual",
        f"doc_to_text: !function {text_fn}",
        'doc_to_target: "answer"',
        "generation_kwargs:",
        "  max_new_tokens: 128",
        "  temperature: 0",
        "  top_p: 1.0",
        "  num_beams: 1",
        "  do_sample: false",
        f"process_results: !function {_PROTO}.pope_process_results",
        "metric_list:",
        *[line for m, fn, hib in metrics for line in (
            f"  - metric: {m}", f"    aggregation: !function {_PROTO}.{fn}", f"    higher_is_better: {'true' if hib else 'false'}")],
        "lmms_eval_specific_kwargs:",
        "  default:",
        '    pre_prompt: ""',
        f"    post_prompt: {_q(POST_PROMPT)}",
        "metadata:",
        "  - version: 0.0",
        "",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------- local converter


@dataclass
class POPEScan:
    root: Path
    folder: Path
    images: Path
    rows: list[dict] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)

    @property
    def source(self) -> str:
        return f"POPE question files {self.folder} + COCO val2014 images {self.images}"


def scan_pope(cfg: Mapping[str, Any], data_root: str | os.PathLike | None) -> POPEScan:
    """Locate the question files and the images they name.

    Raises
    ------
    DataError
        ``data_root`` None / absent; a question file missing; the image folder missing or an image
        it should hold missing (the message names the folder and how many of the images are absent).
    """
    subdir = str(cfg.get("subdir", "pope"))
    images_subdir = str(cfg.get("images_subdir", "coco/val2014"))
    random_file = str(cfg.get("random_file", "coco_pope_random_2910_llava.json"))
    root = resolve_data_root(data_root, f"POPE (benchmark {str(cfg.get('name', 'pope'))!r})",
                             f"{subdir}/coco_pope_*.json and the COCO val2014 images in {images_subdir}/")
    folder = root / subdir
    images = root / images_subdir
    files = {"adversarial": folder / "coco_pope_adversarial.json", "popular": folder / "coco_pope_popular.json",
             "random": folder / random_file}
    scan = POPEScan(root=root, folder=folder, images=images)
    for cat, f in files.items():
        if not f.is_file():
            raise DataError(f"POPE question file missing: {f}")
        scan.files.append(f)
        for lineno, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                q = json.loads(line)
                scan.rows.append({"question_id": f"{cat}/{q['question_id']}", "question": q["text"],
                                  "answer": q["label"], "image_source": q["image"], "category": cat})
            except (ValueError, KeyError) as exc:
                raise DataError(f"{f}:{lineno}: not a POPE question line ({one_line(exc)})") from None
    needed = sorted({r["image_source"] for r in scan.rows})
    if not images.is_dir():
        raise DataError(
            f"POPE needs the {len(needed)} COCO val2014 images its questions name (listed in {folder}/images.txt) "
            f"under {images}, which does not exist (set benchmark.images_subdir or use benchmark.source=hub)"
        )
    absent = [n for n in needed if not (images / n).is_file()]
    if absent:
        raise DataError(f"POPE: {len(absent)} of {len(needed)} COCO val2014 images missing under {images}, e.g. {absent[0]}")
    scan.files += [images / n for n in needed]
    return scan


def fingerprint_items(scan: POPEScan, hasher: FileHasher) -> list[tuple[str, str]]:
    return [(Path(os.path.relpath(p, scan.root)).as_posix(), hasher.sha256(p)) for p in scan.files]


def build_pope(scan: POPEScan, on_corrupt_image: str) -> BuildResult:
    import datasets

    from .mme import image_problem

    feats = datasets.Features({"question_id": datasets.Value("string"), "question": datasets.Value("string"),
                               "answer": datasets.Value("string"), "category": datasets.Value("string"),
                               "image_source": datasets.Value("string"), "image": datasets.Image()})
    cache: dict[str, bytes | None] = {}
    res = BuildResult(chunks=[])
    for cat in CATEGORIES:
        rows = []
        for r in (x for x in scan.rows if x["category"] == cat):
            name = r["image_source"]
            if name not in cache:
                data = (scan.images / name).read_bytes()
                problem = image_problem(data)
                if problem is not None:
                    if on_corrupt_image == "error":
                        raise DataError(f"corrupt POPE image {scan.images / name}: {problem}")
                    n = sum(x["image_source"] == name for x in scan.rows)
                    res.skipped.append({"path": str(scan.images / name), "reason": problem, "questions": n})
                    data = None
                cache[name] = data
            if cache[name] is not None:
                rows.append({**r, "image": {"bytes": cache[name], "path": name}})
        if rows:
            res.chunks.append(datasets.Dataset.from_list(rows, features=feats))
            res.subtasks.append(cat)
    res.missing_subtasks = [c for c in CATEGORIES if c not in res.subtasks]
    return res
