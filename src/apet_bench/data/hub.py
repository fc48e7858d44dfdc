"""lmms-eval's own tasks on Hugging Face hub datasets (``benchmark.source: hub``), for a user's machine.

The benchmark config names the lmms-eval 0.7.3 task (``lmms_eval_task``) and its hub dataset
(``hub_dataset``, only for the check below). Two paper protocols need a task YAML of our own on the
same hub data, written under ``<cache_dir>/tasks/<task_name>/``:

* ``custom: pope_mean_f1``: POPE's three categories scored by mean F1 (:mod:`apet_bench.data.pope`);
* ``custom: textvqa_ocr``: ``textvqa_val`` with ``ocr: true`` (LLaVA-1.5's "Reference OCR token:"
  prompt, lmms-eval issues #6/#51), by ``include:`` of lmms-eval's own ``textvqa_val.yaml``.

Server-scored splits (``submission: true``: VQAv2 test-dev, MMBench test, VizWiz test) run lmms-eval's
``*_test`` tasks, which write the submission file under ``<output>/submissions/``; the run records
its path and no score (the cell says "submission file written, score on the evaluation server").

Before anything runs, the hub dataset must be reachable: offline (``HF_HUB_OFFLINE`` /
``HF_DATASETS_OFFLINE``) it must already be in the ``datasets`` cache; online a 10 s
``dataset_info`` call must succeed. Otherwise :class:`DataError` names the dataset (one line, exit 2).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ._core import DataError, PreparedTask, check_task_name, one_line

__all__ = ["prepare_hub", "check_hub_dataset"]


def _offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def _datasets_cache() -> Path:
    if os.environ.get("HF_DATASETS_CACHE"):
        return Path(os.environ["HF_DATASETS_CACHE"])
    return Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")) / "datasets"


def check_hub_dataset(repo: str, benchmark: str) -> None:
    """Raise DataError (one line) when hub dataset ``repo`` cannot be used here."""
    if _offline():
        cached = _datasets_cache() / repo.replace("/", "___")
        if not cached.is_dir():
            raise DataError(
                f"benchmark {benchmark}: hub dataset {repo} is not in the datasets cache ({cached}) and the hub is "
                "offline (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE); no local copy under data_root either"
            )
        return
    try:
        from huggingface_hub import HfApi

        HfApi().dataset_info(repo, timeout=10)
    except Exception as exc:  # network, auth, not found: all mean "cannot run here"
        raise DataError(f"benchmark {benchmark}: hub dataset {repo} unreachable ({type(exc).__name__}: "
                        f"{one_line(exc)[:160]}); no local copy under data_root either") from None


def _find_task_yaml(tasks_dir: Path, task: str) -> Path:
    """The lmms-eval task YAML whose ``task:`` is ``task`` (DataError when none)."""
    import re

    pat = re.compile(rf"^task:\s*[\"']?{re.escape(task)}[\"']?\s*$", re.M)
    for p in sorted(tasks_dir.rglob("*.yaml")):
        if p.stem == task or p.stem.startswith(task.split("_")[0]):
            try:
                if pat.search(p.read_text(encoding="utf-8")):
                    return p
            except (OSError, UnicodeDecodeError):
                continue
    raise DataError(f"lmms-eval 0.7.3 has no task {task!r} under {tasks_dir}")


def _write_yaml(cache_dir: Path, task_name: str, text: str) -> Path:
    d = cache_dir / "tasks" / task_name
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / f".{task_name}.{secrets.token_hex(4)}.part"
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, d / f"{task_name}.yaml")
    return d


def prepare_hub(bench_cfg: Mapping[str, Any], cache_dir: Path) -> PreparedTask:
    """A PreparedTask for lmms-eval's hub task (``num_samples`` None: lmms-eval counts them).

    Raises
    ------
    DataError
        No ``lmms_eval_task`` in the config; the hub dataset unreachable (see the module docstring).
    """
    name = str(bench_cfg.get("name"))
    submission = bool(bench_cfg.get("submission"))
    task = bench_cfg.get("lmms_eval_submission_task") if submission else bench_cfg.get("lmms_eval_task")
    repo = bench_cfg.get("hub_dataset")
    if not task:
        raise DataError(f"benchmark {name} has no lmms-eval task for source=hub"
                        + (" with submission=true" if submission else ""))
    if repo:
        check_hub_dataset(str(repo), name)
    custom = bench_cfg.get("custom")
    doc_to_text = bench_cfg.get("doc_to_text")
    if custom == "mmbench_llava" and submission:  # the test split has no answers: LLaVA's text, lmms-eval's submission file
        custom, doc_to_text = "llava_text", f"mmbench_{bench_cfg.get('lang', 'en')}_doc_to_text"
    include_path = None
    if custom == "pope_mean_f1":
        from .pope import render_pope_yaml

        task = check_task_name(bench_cfg.get("task_name") or "apet_pope_hub", "bench_cfg")
        include_path = str(_write_yaml(cache_dir, task, render_pope_yaml(
            task, str(repo), ["POPE on the hub (3 x 3000), mean F1 over categories (apet_bench.data.pope)"], hub=True,
            protocol=str(bench_cfg.get("protocol") or "llava"))))
    elif custom == "textvqa_ocr":
        import lmms_eval

        base = Path(lmms_eval.__file__).parent / "tasks" / "textvqa" / "textvqa_val.yaml"
        task = check_task_name(bench_cfg.get("task_name") or "apet_textvqa_val_ocr", "bench_cfg")
        text = "\n".join([
            "# lmms-eval's textvqa_val with LLaVA-1.5's OCR-token prompt (ocr: true); generated by apet_bench.data.hub",
            f"include: {base}",
            f"task: {task}",
            "lmms_eval_specific_kwargs:",
            "  default:",
            '    pre_prompt: ""',
            '    post_prompt: "\\nAnswer the question using a single word or phrase."',
            "    ocr: true",
            "",
        ])
        include_path = str(_write_yaml(cache_dir, task, text))
    elif custom in ("llava_text", "mmbench_llava"):
        import lmms_eval

        base_name = str(task)
        base = _find_task_yaml(Path(lmms_eval.__file__).parent / "tasks", base_name)
        task = check_task_name(bench_cfg.get("task_name") or f"apet_{base_name}_llava", "bench_cfg")
        if custom == "mmbench_llava":
            from .mmbench import render_mmbench_yaml

            text = render_mmbench_yaml(task, "", [f"lmms-eval's {base_name} with LLaVA's MMBench protocol (apet_bench.data.mmbench)"],
                                       lang=str(bench_cfg.get("lang", "en")), hub_include=str(base))
        else:
            fn = doc_to_text
            if not fn:
                raise DataError(f"benchmark {name}: custom llava_text needs doc_to_text (a function of apet_bench.data.llava_protocol)")
            text = "\n".join([
                f"# lmms-eval's {base_name} with the question text LLaVA fed; generated by apet_bench.data.hub",
                f"include: {base}",
                f"task: {task}",
                f"doc_to_text: !function apet_bench.data.llava_protocol.{fn}",
                "",
            ])
        include_path = str(_write_yaml(cache_dir, task, text))
    elif custom:
        raise DataError(f"benchmark {name}: unknown custom task {custom!r} (pope_mean_f1, textvqa_ocr, llava_text, mmbench_llava)")
    return PreparedTask(
        benchmark=name, task_name=str(task), include_path=include_path, num_samples=None,  # type: ignore[arg-type]
        skipped=[], subtasks=[], missing_subtasks=[],
        source=f"hub dataset {repo} via lmms-eval task {task}" + (" (server submission split)" if submission else ""),
        fingerprint=f"hub:{repo}:{task}",
    )
