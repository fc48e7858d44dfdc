"""``prepare_benchmark``: benchmark config -> cached local lmms-eval task."""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from . import demo as _demo
from . import mmbench as _mmbench
from . import mme as _mme
from . import pope as _pope
from . import tgif as _tgif
from . import videoqa as _videoqa
from ._core import (
    DataError,
    FileHasher,
    PreparedTask,
    check_task_name,
    fingerprint_of,
    materialize,
    render_mme_task_yaml,
)

CONVERTERS = ("mme", "demo", "tgif", "pope", "videoqa", "mmbench")
SCORINGS = ("exact_match", "judge")
SOURCES = ("local", "hub")
ON_CORRUPT = ("skip", "error")


def _default_task_name(converter: str, name: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9_]+", "_", name).strip("_") or converter
    return f"apet_{slug}_local" if converter in ("mme", "tgif", "pope", "videoqa", "mmbench") else f"apet_{slug}"


def prepare_benchmark(
    bench_cfg: Mapping[str, Any],
    *,
    data_root: str | os.PathLike | None,
    cache_dir: str | os.PathLike,
    on_corrupt_image: str = "skip",
) -> PreparedTask:
    """Turn a benchmark's files into a local lmms-eval task (cached, built atomically).

    Parameters
    ----------
    bench_cfg : Mapping
        Plain dict (or OmegaConf ``DictConfig``) from the benchmark config. Keys read:

        * ``converter`` (falls back to ``name``): ``"mme"`` or ``"demo"``.
        * ``name``: the benchmark name, reported as ``PreparedTask.benchmark`` (default: converter).
        * ``task_name`` (optional): lmms-eval task name; must match ``apet_[A-Za-z0-9_]+`` so it never
          clashes with a built-in task. Default ``apet_<name>_local`` (mme) / ``apet_<name>`` (demo),
          i.e. ``apet_mme_local`` and ``apet_demo``.
        * tgif only: ``subdir`` (default ``"tgif_qa"``), see :mod:`apet_bench.data.tgif`.
        * mme only: ``subdir`` (default ``"mme"``) and ``ground_truth_subdir`` (default
          ``"mme_ground_truth"``), both relative to ``data_root``.

        Other keys are ignored.
    data_root : str or PathLike or None
        MME: the directory holding ``<subdir>/<subtask>/`` (the official MME release layout:
        ``<image>.jpg|png`` + ``<image>.txt`` with ``question<TAB>Yes|No`` lines, or ``images/`` +
        ``questions_answers_YN/``) and ``<ground_truth_subdir>/<subtask>.txt`` (the MME eval_tool
        ``Your_Results`` files, ``image<TAB>question<TAB>Yes|No``). Read in place, never copied.
        demo: ignored (the images ship with scikit-image, the questions with this package).
    cache_dir : str or PathLike
        Root of the generated files: ``<cache_dir>/tasks/<task_name>-<fingerprint[:12]>/`` holds
        ``<task_name>.yaml``, ``data/`` (a ``datasets.DatasetDict`` with split ``test`` saved by
        ``save_to_disk``; columns ``question_id, question, answer, category`` (strings) and ``image``
        (``datasets.Image()``, the original file bytes)) and ``manifest.json``. Also
        ``<cache_dir>/file_hashes.json`` (sha256 memo keyed by path, size and mtime).
    on_corrupt_image : {"skip", "error"}
        What to do with an image PIL can't fully decode: ``"skip"`` drops that image's questions
        (both of its pair, since MME scores pairs) and lists it in ``PreparedTask.skipped``;
        ``"error"`` raises DataError naming it.

    Returns
    -------
    PreparedTask
        ``include_path`` is the entry directory, to pass to ``lmms_eval.tasks.TaskManager``. The task
        YAML mirrors lmms-eval 0.7.3 ``tasks/mme/mme.yaml`` (same ``generation_kwargs``,
        ``lmms_eval_specific_kwargs``, metrics ``mme_perception_score`` / ``mme_cognition_score``) and
        calls ``lmms_eval.tasks.mme.utils`` through ``!function`` absolute imports; the data is read
        with ``dataset_kwargs: {load_from_disk: true}``, so nothing needs the Hugging Face hub.

    Raises
    ------
    DataError
        One line naming the bad value: unknown converter / ``on_corrupt_image`` / ``task_name``;
        ``data_root`` None or not a directory; no MME layout under it (the message says what was
        expected); a ground-truth file missing for a present subtask; an image the ground truth names
        missing; release ``.txt`` and ground truth disagreeing, or a release image absent from the
        ground truth; a malformed ground-truth line or an image without exactly one Yes and one No
        question; a corrupt image with ``on_corrupt_image="error"``; no usable question left.

    Notes
    -----
    The fingerprint is the sha256 of the converter version, the task name and the content (sha256)
    of every file read, with paths relative to ``data_root`` (so it is the same on any machine holding
    the same files). A call whose fingerprint matches a complete entry returns it without writing
    anything. A miss builds in ``tasks/.tmp-*`` and moves the directory in place with a single
    ``os.replace``; ``manifest.json`` is written last, and an entry without a valid manifest and all
    its data files is never reused.
    """
    if not isinstance(bench_cfg, Mapping):
        raise DataError(f"bench_cfg must be a mapping, got {type(bench_cfg).__name__}")
    from apet_bench.protocol import ProtocolError, resolve

    try:
        bench_cfg = resolve(bench_cfg)  # the protocol's settings (apet_bench.protocol)
    except ProtocolError as exc:
        raise DataError(str(exc)) from None
    protocol = bench_cfg["protocol"]
    if on_corrupt_image not in ON_CORRUPT:
        raise DataError(f"on_corrupt_image must be 'skip' or 'error', got {on_corrupt_image!r}")
    source = bench_cfg.get("source") or "local"
    if source not in SOURCES:
        raise DataError(f"benchmark source {source!r} is invalid (local = converter from data_root, hub = lmms-eval's task)")
    converter = bench_cfg.get("converter") or (None if source == "hub" else bench_cfg.get("name"))
    if source == "local" and not converter:
        raise DataError(f"benchmark {bench_cfg.get('name')!r} has no local converter; use benchmark.source=hub")
    if source == "hub":
        if cache_dir is None:
            raise DataError("cache_dir is None: a directory for the generated tasks is required")
        from .hub import prepare_hub

        return prepare_hub(bench_cfg, Path(os.path.expanduser(str(cache_dir))).resolve())
    if converter not in CONVERTERS:
        raise DataError(f"unknown data converter {converter!r} in bench_cfg (known: {', '.join(CONVERTERS)})")
    name = str(bench_cfg.get("name") or converter)
    task_name = bench_cfg.get("task_name") or _default_task_name(converter, name)
    check_task_name(task_name, "bench_cfg")
    if cache_dir is None:
        raise DataError("cache_dir is None: a directory for the generated tasks is required")
    cache = Path(os.path.expanduser(str(cache_dir))).resolve()
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"cannot create cache_dir {cache}: {exc.strerror or exc}") from None

    hasher = FileHasher(cache)
    render_yaml = None  # the MME-style task YAML
    variant = protocol  # part of the fingerprint: the same files under another protocol are another task
    if converter == "mme":
        scan = _mme.scan_mme(bench_cfg, data_root)
        items = _mme.fingerprint_items(scan, hasher)
        if protocol == "llava":
            render_yaml = functools.partial(render_mme_task_yaml,
                                            doc_to_text="apet_bench.data.llava_protocol.mme_doc_to_text")

        def build():
            return _mme.build_mme(scan, on_corrupt_image)

    elif converter == "pope":
        scan = _pope.scan_pope(bench_cfg, data_root)
        items = _pope.fingerprint_items(scan, hasher)
        render_yaml = functools.partial(_pope.render_pope_yaml, protocol=protocol)

        def build():
            return _pope.build_pope(scan, on_corrupt_image)

    elif converter == "videoqa":
        scan = _videoqa.scan_videoqa(bench_cfg, data_root)
        items = _videoqa.fingerprint_items(scan, hasher)
        render_yaml = _videoqa.render_judge_yaml

        def build():
            return _videoqa.build_videoqa(scan, on_corrupt_image)

    elif converter == "mmbench":
        scan = _mmbench.scan_mmbench(bench_cfg, data_root)
        items = _mmbench.fingerprint_items(scan, hasher)
        lang = str(bench_cfg.get("lang", "en"))
        if lang not in ("en", "cn"):
            raise DataError(f"benchmark lang {lang!r} is invalid (en or cn)")
        render_yaml = functools.partial(_mmbench.render_mmbench_yaml, lang=lang)
        variant = f"{protocol}:{lang}"

        def build():
            return _mmbench.build_mmbench(scan, on_corrupt_image)

    elif converter == "tgif":
        scan = _tgif.scan_tgif(bench_cfg, data_root)
        items = _tgif.fingerprint_items(scan, hasher)
        scoring = bench_cfg.get("scoring") or "exact_match"
        if scoring not in SCORINGS:
            raise DataError(f"benchmark scoring {scoring!r} is invalid (exact_match or judge)")
        render_yaml = _videoqa.render_judge_yaml if scoring == "judge" else _tgif.render_tgif_task_yaml
        variant = f"{protocol}:{','.join(scan.categories)}"

        def build():
            return _tgif.build_tgif(scan, on_corrupt_image)

    else:
        scan = _demo.scan_demo()
        items = _demo.fingerprint_items(scan, hasher)

        def build():
            return _demo.build_demo(scan, on_corrupt_image)

    hasher.save()
    fingerprint = fingerprint_of(f"{converter}:{variant}", task_name, items)
    entry, man = materialize(
        cache_dir=cache,
        benchmark=name,
        task_name=task_name,
        fingerprint=fingerprint,
        source=scan.source,
        build=build,
        render_yaml=render_yaml,
    )
    skipped = list(man["skipped"])
    if skipped and on_corrupt_image == "error":  # a cache entry built earlier in "skip" mode
        first = skipped[0]
        raise DataError(f"corrupt {converter.upper()} image {first['path']}: {first['reason']}")
    return PreparedTask(
        benchmark=name,
        task_name=task_name,
        include_path=str(entry),
        num_samples=int(man["num_samples"]),
        skipped=skipped,
        subtasks=list(man["subtasks"]),
        missing_subtasks=list(man["missing_subtasks"]),
        source=scan.source,
        fingerprint=fingerprint,
    )
