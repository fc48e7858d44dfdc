"""Open-ended video QA (MSVD-QA, MSRVTT-QA; TGIF-QA with ``scoring: judge``) as local lmms-eval tasks
scored by an LLM judge (Video-ChatGPT protocol, :mod:`apet_bench.judge`). lmms-eval 0.7.3 ships no task
for these three datasets (docs/data.md).

Layout (``<data_root>/<subdir>/``), the QA files of the official releases as Video-LLaVA's evaluation
uses them::

    <qa_file>                        # JSON list of {question, answer, id | question_id, <video field>}
                                     #   MSRVTT-QA test_qa.json: {"answer", "category_id", "id", "question", "video_id"}
                                     #   MSVD-QA test_qa.json: {"answer", "id", "question", "video_id"} (+ "video" = the
                                     #   clip name from youtube_mapping.txt, which the user adds)
    <videos_subdir>/<video_pattern>  # e.g. video{video_id}.mp4 (MSRVTT), {video}.avi (MSVD)

Rules: every QA row must name an existing video file (``video_pattern`` formatted with the row's
fields), else DataError naming the first missing one and the count; an undecodable video is skipped
with its questions (``on_corrupt_image=skip``) or raises (``error``). ``question_id`` = the row's
``question_id`` or ``id``. The prompt is the question alone and answers are free-form, up to 1024 new
tokens, as Video-LLaVA's official video QA (``videollava/eval/video/run_inference_video_qa.py``,
MaQianKun0/ApET @ 70cc01b: no answer-format instruction, ``max_new_tokens=1024``). Metrics:
``gpt_eval_accuracy`` (%), ``gpt_eval_score`` (0-5), ``judge_failures`` (calls that failed, left out).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._core import SPLIT, BuildResult, DataError, FileHasher, _q, one_line, resolve_data_root

log = logging.getLogger("apet_bench.data")

#: No answer-format instruction after the question (Video-LLaVA's official video QA prompt).
POST_PROMPT = ""
#: Greedy, 1 beam, up to 1024 new tokens (``run_inference_video_qa.py``: ``do_sample=False, max_new_tokens=1024``).
GENERATION_KWARGS = {"max_new_tokens": 1024, "temperature": 0, "top_p": 1.0, "num_beams": 1, "do_sample": False}
_JUDGE = "apet_bench.judge"
_TGIF = "apet_bench.data.tgif"


def render_judge_yaml(task_name: str, dataset_path: str, header: Sequence[str]) -> str:
    """Task YAML: TGIF's doc functions (absolute video path, question + post prompt), judge metrics."""
    lines = [f"# {one_line(h)}" for h in header]
    lines += [
        "# Scored by an OpenAI-compatible judge (Video-ChatGPT protocol, apet_bench.judge; config from benchmark.judge).",
        f"task: {_q(task_name)}",
        f"dataset_path: {_q(dataset_path)}",
        "dataset_kwargs:",
        "  load_from_disk: true",
        f"test_split: {SPLIT}",
        "output_type: generate_until",
        f"doc_to_visual: !function {_TGIF}.tgif_doc_to_visual",
        f"doc_to_text: !function {_TGIF}.tgif_doc_to_text",
        'doc_to_target: "answer"',
        "generation_kwargs:",
        *(f"  {k}: {_q(v)}" for k, v in GENERATION_KWARGS.items()),
        f"process_results: !function {_JUDGE}.videoqa_process_results",
        "metric_list:",
        "  - metric: gpt_eval_accuracy",
        f"    aggregation: !function {_JUDGE}.videoqa_aggregate_accuracy",
        "    higher_is_better: true",
        "  - metric: gpt_eval_score",
        f"    aggregation: !function {_JUDGE}.videoqa_aggregate_score",
        "    higher_is_better: true",
        "  - metric: judge_failures",
        f"    aggregation: !function {_JUDGE}.videoqa_aggregate_failures",
        "    higher_is_better: false",
        "lmms_eval_specific_kwargs:",
        "  default:",
        '    pre_prompt: ""',
        f"    post_prompt: {_q(POST_PROMPT)}",
        "metadata:",
        "  - version: 0.0",
        "",
    ]
    return "\n".join(lines)


@dataclass
class VideoQAScan:
    root: Path
    folder: Path
    rows: list[dict] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)

    @property
    def source(self) -> str:
        return f"open-ended video QA files in {self.folder}"


def scan_videoqa(cfg: Mapping[str, Any], data_root: str | os.PathLike | None) -> VideoQAScan:
    """Read the QA file and check every video exists; see the module docstring.

    Raises
    ------
    DataError
        ``data_root`` None / absent, the QA file missing or malformed, videos missing.
    """
    name = str(cfg.get("name", "videoqa"))
    subdir = str(cfg.get("subdir", name))
    qa_file = str(cfg.get("qa_file", "test_qa.json"))
    videos_subdir = str(cfg.get("videos_subdir", "videos"))
    pattern = str(cfg.get("video_pattern", "{video}"))
    root = resolve_data_root(data_root, name, f"{subdir}/{qa_file} and {subdir}/{videos_subdir}/")
    folder = root / subdir
    qa = folder / qa_file
    if not qa.is_file():
        raise DataError(f"{name}: QA file {qa} not found (official test QA file, see configs/benchmark/{name}.yaml)")
    try:
        data = json.loads(qa.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(f"{qa} is not a JSON file: {one_line(exc)}") from None
    if not isinstance(data, list) or not data:
        raise DataError(f"{qa} must hold a non-empty JSON list of QA objects")
    scan = VideoQAScan(root=root, folder=folder, files=[qa])
    missing: list[Path] = []
    for i, r in enumerate(data):
        if not isinstance(r, dict) or "question" not in r or "answer" not in r:
            raise DataError(f"{qa}: entry {i} lacks question/answer")
        try:
            video = folder / videos_subdir / pattern.format(**r)
        except (KeyError, IndexError) as exc:
            raise DataError(f"{qa}: entry {i} lacks field {exc} used by video_pattern {pattern!r}") from None
        if not video.is_file():
            missing.append(video)
            continue
        qid = r.get("question_id", r.get("id", i))
        scan.rows.append({"question_id": str(qid), "question": str(r["question"]), "answer": str(r["answer"]),
                          "category": str(r.get("category_id", r.get("type", name))), "video": str(video),
                          "gif_name": video.name, "key": str(qid)})
    if missing:
        raise DataError(f"{name}: {len(missing)} of {len(data)} videos missing under {folder / videos_subdir}, e.g. {missing[0]}")
    scan.files += sorted({Path(r["video"]) for r in scan.rows})
    return scan


def fingerprint_items(scan: VideoQAScan, hasher: FileHasher) -> list[tuple[str, str]]:
    return [(Path(os.path.relpath(p, scan.root)).as_posix(), hasher.sha256(p)) for p in scan.files]


def build_videoqa(scan: VideoQAScan, on_corrupt_image: str) -> BuildResult:
    import datasets

    from .tgif import tgif_features
    from .video import VideoDecodeError, load_video

    bad: set[str] = set()
    res = BuildResult(chunks=[])
    for video in sorted({r["video"] for r in scan.rows}):
        try:
            load_video(video)
        except VideoDecodeError as exc:
            if on_corrupt_image == "error":
                raise DataError(f"corrupt video {video}: {exc}") from None
            n = sum(r["video"] == video for r in scan.rows)
            res.skipped.append({"path": video, "reason": one_line(exc), "questions": n})
            bad.add(video)
    rows = [r for r in scan.rows if r["video"] not in bad]
    if rows:
        res.chunks.append(datasets.Dataset.from_list(rows, features=tgif_features()))
        res.subtasks = sorted({r["category"] for r in rows})
    return res
