"""Shared pieces of the data layer: errors, the result type, hashing, the task YAML and the cache.

The generated task follows lmms-eval 0.7.3's own ``lmms_eval/tasks/mme/mme.yaml`` and reuses its
functions through absolute ``!function lmms_eval.tasks.mme.utils.<fn>`` imports (lmms-eval
``utils.import_function`` falls back to an absolute import when no ``<yaml_dir>/lmms_eval/...py``
exists). The dataset is a ``datasets.DatasetDict({"test": ...})`` saved with ``save_to_disk`` and
loaded by lmms-eval through ``dataset_kwargs: {load_from_disk: true}`` (``api/task.py::download``),
so neither the Hugging Face hub nor the ``datasets`` cache is touched.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("apet_bench.data")

#: Bump whenever the generated files (rows, columns, YAML) change for the same input files.
CONVERTER_VERSION = "2"

#: Name of the file written last into a cache entry; an entry without it is incomplete.
MANIFEST_NAME = "manifest.json"
DATA_DIRNAME = "data"
SPLIT = "test"

#: ``eval_type_dict`` of lmms-eval 0.7.3 ``lmms_eval/tasks/mme/utils.py``, copied (importing that
#: module costs ~5 s because it pulls in ``lmms_eval.tasks``); tests/test_data.py checks it is equal.
MME_EVAL_TYPES: dict[str, list[str]] = {
    "Perception": [
        "existence",
        "count",
        "position",
        "color",
        "posters",
        "celebrity",
        "scene",
        "landmark",
        "artwork",
        "OCR",
    ],
    "Cognition": [
        "commonsense_reasoning",
        "numerical_calculation",
        "text_translation",
        "code_reasoning",
    ],
}
MME_PERCEPTION: tuple[str, ...] = tuple(MME_EVAL_TYPES["Perception"])
MME_COGNITION: tuple[str, ...] = tuple(MME_EVAL_TYPES["Cognition"])
MME_SUBTASKS: tuple[str, ...] = MME_PERCEPTION + MME_COGNITION

_TASK_NAME_RE = re.compile(r"^apet_[A-Za-z0-9_]+$")
# Stale temporary build directories (from a killed run) older than this are removed.
_STALE_TMP_SECONDS = 6 * 3600


class DataError(ValueError):
    """A benchmark's data can't be prepared. The message is one line and names the bad value (a path)."""

    def __init__(self, message: str) -> None:
        super().__init__(one_line(message))


def one_line(text: Any) -> str:
    """Collapse ``text`` to a single line (error messages and ``skipped`` reasons)."""
    return " ".join(str(text).split())


def resolve_data_root(data_root: Any, benchmark: str, needs: str) -> Path:
    """The benchmark's data root as an absolute directory (``~`` expanded, symlinks resolved).

    Parameters
    ----------
    data_root : str or os.PathLike or None
        The configured ``data_root``.
    benchmark : str
        Benchmark name for the message (``"MME"``, ``"POPE"``, ...).
    needs : str
        What the benchmark reads under it, for the message when ``data_root`` is None.

    Raises
    ------
    DataError
        ``data_root`` is None, or not an existing directory (one line naming the path).
    """
    if data_root is None:
        raise DataError(f"data_root is not set: {benchmark} needs a data root holding {needs} "
                        f"(export APET_BENCH_DATA_ROOT=/path/to/benchmarks or pass data_root=...)")
    root = Path(os.path.expanduser(str(data_root))).resolve()
    if not root.is_dir():
        raise DataError(f"{benchmark} data_root {root} does not exist or is not a directory")
    return root


@dataclass
class PreparedTask:
    """A local lmms-eval task built from a benchmark's files.

    Attributes
    ----------
    benchmark : str
        ``"mme"`` or ``"demo"``.
    task_name : str
        lmms-eval task name (``apet_mme_local``, ``apet_demo``); never a built-in task's name.
    include_path : str
        Absolute directory holding ``<task_name>.yaml``; pass it to
        ``lmms_eval.tasks.TaskManager(include_path=...)`` or ``--include_path``.
    num_samples : int
        Questions (dataset rows) in the task.
    skipped : list of dict
        Corrupt/unreadable images left out: ``{"path": str, "reason": str, "questions": int}``.
    subtasks : list of str
        MME subtasks (lmms-eval ``category`` values) with at least one question in the task.
    missing_subtasks : list of str
        MME subtasks without any question in the task (no images on disk, or all skipped).
    source : str
        Where the data came from (absolute paths, or the package for the demo set).
    fingerprint : str
        sha256 (hex) of the converter version, task name and the content of every source file.
    """

    benchmark: str
    task_name: str
    include_path: str
    num_samples: int
    skipped: list[dict]
    subtasks: list[str]
    missing_subtasks: list[str]
    source: str
    fingerprint: str

    @property
    def yaml_path(self) -> str:
        """Path of the generated lmms-eval task YAML."""
        return os.path.join(self.include_path, f"{self.task_name}.yaml")

    @property
    def dataset_path(self) -> str:
        """Path of the saved ``DatasetDict`` (split ``test``) the YAML loads with ``load_from_disk``."""
        return os.path.join(self.include_path, DATA_DIRNAME)


def check_task_name(name: Any, where: str) -> str:
    if not isinstance(name, str) or not _TASK_NAME_RE.match(name):
        raise DataError(
            f"bad task_name {name!r} in {where}: must match {_TASK_NAME_RE.pattern} "
            "(the apet_ prefix keeps it apart from lmms-eval's built-in task names)"
        )
    return name


# --------------------------------------------------------------------------------------- hashing


class FileHasher:
    """sha256 of files, memoised in ``<cache_dir>/file_hashes.json`` by (path, size, mtime_ns).

    The fingerprint is content-based (portable across machines and copies), while a warm call only
    ``stat``s the files.
    """

    def __init__(self, cache_dir: Path) -> None:
        self._path = cache_dir / "file_hashes.json"
        self._memo: dict[str, list] = {}
        self._dirty = False
        try:
            with open(self._path, encoding="utf-8") as fh:
                memo = json.load(fh)
            if isinstance(memo, dict):
                self._memo = memo
        except (OSError, ValueError):
            pass

    def sha256(self, path: Path) -> str:
        st = path.stat()
        key = str(path)
        hit = self._memo.get(key)
        if isinstance(hit, list) and len(hit) == 3 and hit[0] == st.st_size and hit[1] == st.st_mtime_ns:
            return hit[2]
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        digest = h.hexdigest()
        self._memo[key] = [st.st_size, st.st_mtime_ns, digest]
        self._dirty = True
        return digest

    def save(self) -> None:
        if not self._dirty:
            return
        try:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self._path.with_name(f".{self._path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}")
            with open(tmp, "w", encoding="utf-8") as fh:
                json.dump(self._memo, fh)
            os.replace(tmp, self._path)
            self._dirty = False
        except OSError as exc:  # a memo is only a speed-up
            log.warning("could not write %s: %s", self._path, exc)


def fingerprint_of(benchmark: str, task_name: str, items: Iterable[tuple[str, str]]) -> str:
    """sha256 over the converter version, benchmark, task name and ``(name, digest)`` items (sorted)."""
    h = hashlib.sha256()
    h.update(f"apet_bench.data converter v{CONVERTER_VERSION}\n{benchmark}\n{task_name}\n".encode())
    for name, digest in sorted(items):
        h.update(f"{name}\t{digest}\n".encode())
    return h.hexdigest()


# ------------------------------------------------------------------------------------ task YAML

# Same as lmms-eval 0.7.3 lmms_eval/tasks/mme/mme.yaml (tests/test_data.py compares them).
MME_GENERATION_KWARGS: dict[str, Any] = {
    "max_new_tokens": 16,
    "temperature": 0,
    "top_p": 1.0,
    "num_beams": 1,
    "do_sample": False,
}
MME_SPECIFIC_KWARGS: dict[str, dict[str, str]] = {
    "default": {"pre_prompt": "", "post_prompt": "\nAnswer the question using a single word or phrase."},
    "gpt4v": {"pre_prompt": "", "post_prompt": "\nAnswer the question with Yes or No."},
    "qwen_vl": {"pre_prompt": "", "post_prompt": " Answer:"},
    "otterhd": {"pre_prompt": "", "post_prompt": " Answer:"},
    "xcomposer2_4khd": {
        "pre_prompt": "[UNUSED_TOKEN_146]user\n",
        "post_prompt": " Answer this question briefly[UNUSED_TOKEN_145]\n[UNUSED_TOKEN_146]assistant\n",
    },
    "plm": {"pre_prompt": "", "post_prompt": ""},
}
_MME_UTILS = "lmms_eval.tasks.mme.utils"


def _q(value: Any) -> str:
    """A YAML scalar: JSON is a subset of YAML for strings, numbers and booleans."""
    return json.dumps(value)


def render_mme_task_yaml(task_name: str, dataset_path: str, header: Sequence[str], *,
                         doc_to_text: str = f"{_MME_UTILS}.mme_doc_to_text") -> str:
    """Text of a task YAML equivalent to lmms-eval's ``mme.yaml`` but reading a local saved dataset.

    ``doc_to_text``: the question-text function (lmms-eval's, or
    ``apet_bench.data.llava_protocol.mme_doc_to_text`` for LLaVA's ``llava_mme.jsonl`` text)."""
    lines = [f"# {one_line(h)}" for h in header]
    lines += [
        f"task: {_q(task_name)}",
        f"dataset_path: {_q(dataset_path)}",
        "dataset_kwargs:",
        "  load_from_disk: true",
        f"test_split: {SPLIT}",
        "output_type: generate_until",
        f"doc_to_visual: !function {_MME_UTILS}.mme_doc_to_visual",
        f"doc_to_text: !function {doc_to_text}",
        'doc_to_target: "answer"',
        "generation_kwargs:",
        *(f"  {k}: {_q(v)}" for k, v in MME_GENERATION_KWARGS.items()),
        f"process_results: !function {_MME_UTILS}.mme_process_results",
        "metric_list:",
        "  - metric: mme_perception_score",
        f"    aggregation: !function {_MME_UTILS}.mme_aggregate_results",
        "    higher_is_better: true",
        "  - metric: mme_cognition_score",
        f"    aggregation: !function {_MME_UTILS}.mme_aggregate_results",
        "    higher_is_better: true",
        "lmms_eval_specific_kwargs:",
    ]
    for model, kw in MME_SPECIFIC_KWARGS.items():
        lines.append(f"  {model}:")
        lines += [f"    {k}: {_q(v)}" for k, v in kw.items()]
    lines += ["metadata:", "  - version: 0.0", ""]
    return "\n".join(lines)


def mme_features():
    """``datasets.Features`` of the rows lmms-eval's MME functions read."""
    import datasets

    return datasets.Features(
        {
            "question_id": datasets.Value("string"),
            "question": datasets.Value("string"),
            "answer": datasets.Value("string"),
            "category": datasets.Value("string"),
            "image": datasets.Image(),
        }
    )


# ---------------------------------------------------------------------------------------- cache


@dataclass
class BuildResult:
    """What a converter's ``build`` returns: row chunks plus bookkeeping for the manifest."""

    chunks: list  # list of datasets.Dataset, concatenated in order
    skipped: list[dict] = field(default_factory=list)
    subtasks: list[str] = field(default_factory=list)
    missing_subtasks: list[str] = field(default_factory=list)


def entry_dir(cache_dir: Path, task_name: str, fingerprint: str) -> Path:
    return cache_dir / "tasks" / f"{task_name}-{fingerprint[:12]}"


def _read_complete(entry: Path, fingerprint: str, task_name: str) -> dict | None:
    """The manifest of a complete, matching cache entry, else None."""
    try:
        with open(entry / MANIFEST_NAME, encoding="utf-8") as fh:
            man = json.load(fh)
    except (OSError, ValueError):
        return None
    if not isinstance(man, dict):
        return None
    if (
        man.get("fingerprint") != fingerprint
        or man.get("converter_version") != CONVERTER_VERSION
        or man.get("task_name") != task_name
        or man.get("dataset_path") != str(entry / DATA_DIRNAME)
    ):
        return None
    data = entry / DATA_DIRNAME
    if not (entry / f"{task_name}.yaml").is_file() or not (data / "dataset_dict.json").is_file():
        return None
    try:
        with open(data / SPLIT / "state.json", encoding="utf-8") as fh:
            state = json.load(fh)
        files = [f["filename"] for f in state["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not files or not all((data / SPLIT / f).is_file() for f in files):
        return None
    return man


def _cleanup_stale_tmp(tasks_dir: Path) -> None:
    now = time.time()
    try:
        entries = list(tasks_dir.iterdir())
    except OSError:
        return
    for p in entries:
        if p.name.startswith((".tmp-", ".stale-")) and p.is_dir():
            try:
                if now - p.stat().st_mtime > _STALE_TMP_SECONDS:
                    shutil.rmtree(p, ignore_errors=True)
            except OSError:
                pass


def materialize(
    *,
    cache_dir: Path,
    benchmark: str,
    task_name: str,
    fingerprint: str,
    source: str,
    build: Callable[[], BuildResult],
    render_yaml: Callable[[str, str, Sequence[str]], str] | None = None,
) -> tuple[Path, dict]:
    """Return ``(entry_dir, manifest)`` of a complete cache entry, building it if needed.

    A hit needs a manifest with the same fingerprint/converter version/paths and all data files
    present. ``render_yaml(task_name, dataset_path, header)`` writes the task YAML (default
    :func:`render_mme_task_yaml`). A miss builds everything in ``tasks/.tmp-*`` and moves it in place with one
    ``os.replace``, so a reader never sees a half-written entry. An incomplete entry at the final
    path (damaged by hand) is moved aside and rebuilt.
    """
    entry = entry_dir(cache_dir, task_name, fingerprint)
    man = _read_complete(entry, fingerprint, task_name)
    if man is not None:
        log.info("reusing %s", entry)
        return entry, man

    import datasets

    tasks_dir = entry.parent
    tasks_dir.mkdir(parents=True, exist_ok=True)
    _cleanup_stale_tmp(tasks_dir)
    tmp = tasks_dir / f".tmp-{entry.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        res = build()
        if not res.chunks:
            raise DataError(f"no usable questions for {task_name} under {source}")
        ds = datasets.concatenate_datasets(res.chunks) if len(res.chunks) > 1 else res.chunks[0]
        if len(ds) == 0:
            raise DataError(f"no usable questions for {task_name} under {source}")
        bars_were_on = not datasets.are_progress_bars_disabled()
        datasets.disable_progress_bars()
        try:
            datasets.DatasetDict({SPLIT: ds}).save_to_disk(str(tmp / DATA_DIRNAME))
        finally:
            if bars_were_on:
                datasets.enable_progress_bars()
        header = [
            f"Generated by apet_bench.data (converter v{CONVERTER_VERSION}); do not edit, it is rebuilt when the source changes.",
            f"benchmark: {benchmark}; source: {source}",
            f"fingerprint: {fingerprint}",
        ]
        (tmp / f"{task_name}.yaml").write_text(
            (render_yaml or render_mme_task_yaml)(task_name, str(entry / DATA_DIRNAME), header), encoding="utf-8"
        )
        man = {
            "benchmark": benchmark,
            "task_name": task_name,
            "fingerprint": fingerprint,
            "converter_version": CONVERTER_VERSION,
            "dataset_path": str(entry / DATA_DIRNAME),
            "num_samples": len(ds),
            "skipped": res.skipped,
            "subtasks": res.subtasks,
            "missing_subtasks": res.missing_subtasks,
            "source": source,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        del ds, res
        with open(tmp / MANIFEST_NAME, "w", encoding="utf-8") as fh:  # written last
            json.dump(man, fh, indent=2)
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.replace(tmp, entry)
        except OSError:
            # Another process finished first, or a damaged entry sits there.
            other = _read_complete(entry, fingerprint, task_name)
            if other is not None:
                shutil.rmtree(tmp, ignore_errors=True)
                return entry, other
            stale = tasks_dir / f".stale-{entry.name}-{uuid.uuid4().hex[:8]}"
            os.replace(entry, stale)
            shutil.rmtree(stale, ignore_errors=True)
            os.replace(tmp, entry)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("wrote %s (%d questions)", entry, man["num_samples"])
    return entry, man
