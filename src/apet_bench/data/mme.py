"""MME converter: official MME release folders + eval_tool ground truth -> lmms-eval rows.

Layout followed (the official ``MME_Benchmark_release_version`` and the ``eval_tool.zip`` of
BradyFU/Awesome-Multimodal-Large-Language-Models, branch Evaluation)::

    <data_root>/<subdir>/<subtask>/<image>.jpg|.png + <image>.txt          (flat layout), or
    <data_root>/<subdir>/<subtask>/images/<image> + questions_answers_YN/<image stem>.txt
    <data_root>/<ground_truth_subdir>/<subtask>.txt    # eval_tool Your_Results: image<TAB>question<TAB>Yes|No

Release ``.txt`` files hold one ``question<TAB>answer`` line per question (two per image).

Decisions
---------
* Questions, answers and their order come from the ground-truth file (what the eval_tool scores);
  images come from the release folder. Where a release ``.txt`` exists its (question, answer)
  pairs must equal the ground truth's for that image, else DataError naming the ``.txt``. A
  missing release ``.txt`` is allowed (the ground truth already holds the questions).
* Every image in the ground truth must exist in the release folder, and every image file in a
  present subtask folder must appear in the ground truth (DataError naming the path otherwise).
* Every image has exactly two questions, one ``Yes`` and one ``No`` (lmms-eval's
  ``mme_aggregate_results`` asserts two scores per ``question_id``; MME pairs are Yes/No).
* A subtask is present when its folder holds at least one image file; the others (no folder, or
  an empty one) are reported in ``missing_subtasks``. At least one must be present.
* ``question_id`` = ``"<subtask>/<image file>"`` (as in lmms-lab's MME dataset), ``category`` =
  the subtask folder name, spelt as in lmms-eval's ``eval_type_dict``. The image bytes are stored
  as they are in the release (no re-encoding).
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._core import MME_SUBTASKS, BuildResult, DataError, FileHasher, mme_features, one_line, resolve_data_root

log = logging.getLogger("apet_bench.data")

IMAGE_EXTS = (".jpg", ".jpeg", ".png")
_YES_NO = {"yes": "Yes", "no": "No"}


@dataclass
class _Image:
    subtask: str
    name: str
    path: Path
    questions: list[tuple[str, str]]  # (question, "Yes"|"No"), ground-truth order


@dataclass
class MMEScan:
    """Validated file list of an MME copy (no image decoded yet)."""

    root: Path
    release: Path
    gt_dir: Path
    present: list[str]
    missing: list[str]
    images: dict[str, list[_Image]] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)  # everything the conversion reads

    @property
    def source(self) -> str:
        return f"MME release {self.release} + eval_tool ground truth {self.gt_dir}"


def _no_layout(root: Path, release: Path) -> DataError:
    return DataError(
        f"no MME release layout under {root}: expected {release}/<subtask>/ folders (one of "
        f"{', '.join(MME_SUBTASKS)}) holding images with same-name .txt files, or images/ + "
        "questions_answers_YN/"
    )


def _norm_answer(ans: str) -> str | None:
    return _YES_NO.get(ans.strip().lower())


def _read_lines(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text: {exc}") from None
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from None
    return text.splitlines()


def _parse_ground_truth(path: Path) -> dict[str, list[tuple[str, str]]]:
    """``image -> [(question, Yes|No), ...]`` in file order; DataError on a malformed line."""
    out: dict[str, list[tuple[str, str]]] = {}
    for lineno, line in enumerate(_read_lines(path), 1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) != 3:
            raise DataError(
                f"{path}:{lineno}: expected 'image<TAB>question<TAB>Yes|No', got {len(parts)} tab-separated fields"
            )
        image, question, answer = parts[0].strip(), parts[1].strip(), _norm_answer(parts[2])
        if answer is None or not image or not question:
            raise DataError(
                f"{path}:{lineno}: bad ground-truth line (answer must be Yes or No): {line.strip()!r}"
            )
        out.setdefault(image, []).append((question, answer))
    if not out:
        raise DataError(f"ground-truth file {path} holds no questions")
    for image, qs in out.items():
        if len(qs) != 2 or sorted(a for _, a in qs) != ["No", "Yes"]:
            raise DataError(
                f"{path}: image {image} has {len(qs)} questions with answers "
                f"{[a for _, a in qs]}; MME needs exactly one Yes and one No question per image"
            )
    return out


def _parse_release_txt(path: Path) -> list[tuple[str, str]]:
    pairs = []
    for lineno, line in enumerate(_read_lines(path), 1):
        if not line.strip():
            continue
        parts = line.split("\t")
        answer = _norm_answer(parts[-1]) if len(parts) == 2 else None
        if answer is None:
            raise DataError(f"{path}:{lineno}: expected 'question<TAB>Yes|No', got {line.strip()!r}")
        pairs.append((parts[0].strip(), answer))
    return pairs


def scan_mme(cfg: Mapping[str, Any], data_root: str | os.PathLike | None) -> MMEScan:
    """Locate and validate an MME copy; see the module docstring for the rules."""
    subdir = str(cfg.get("subdir", "mme"))
    gt_subdir = str(cfg.get("ground_truth_subdir", "mme_ground_truth"))
    root = resolve_data_root(data_root, "MME", f"{subdir}/<subtask>/ and {gt_subdir}/<subtask>.txt")
    release = root / subdir
    gt_dir = root / gt_subdir
    if not release.is_dir():
        raise _no_layout(root, release)

    present: list[str] = []
    missing: list[str] = []
    layout: dict[str, tuple[Path, Path, list[Path]]] = {}
    for sub in MME_SUBTASKS:
        d = release / sub
        if not d.is_dir():
            missing.append(sub)
            continue
        if (d / "images").is_dir():
            img_dir, qa_dir = d / "images", d / "questions_answers_YN"
        else:
            img_dir = qa_dir = d
        imgs = sorted(p for p in img_dir.iterdir() if p.suffix.lower() in IMAGE_EXTS and p.is_file())
        if not imgs:
            log.warning("MME subtask folder %s holds no images; counted as missing", d)
            missing.append(sub)
            continue
        present.append(sub)
        layout[sub] = (img_dir, qa_dir, imgs)
    if not present:
        raise _no_layout(root, release)

    scan = MMEScan(root=root, release=release, gt_dir=gt_dir, present=present, missing=missing)
    for sub in present:
        img_dir, qa_dir, imgs = layout[sub]
        gt_file = gt_dir / f"{sub}.txt"
        if not gt_file.is_file():
            raise DataError(
                f"ground-truth file missing for MME subtask {sub}: {gt_file} "
                "(expected the eval_tool Your_Results file image<TAB>question<TAB>Yes|No)"
            )
        gt = _parse_ground_truth(gt_file)
        scan.files.append(gt_file)
        on_disk = {p.name: p for p in imgs}
        for name in gt:
            if name not in on_disk:
                raise DataError(f"image referenced by ground truth {gt_file} is missing: {img_dir / name}")
        extra = sorted(set(on_disk) - set(gt))
        if extra:
            raise DataError(
                f"MME release image {on_disk[extra[0]]} has no questions in ground truth {gt_file} "
                f"({len(extra)} such image(s)); release and ground truth don't match"
            )
        entries = []
        for name, qs in gt.items():
            path = on_disk[name]
            txt = qa_dir / f"{path.stem}.txt"
            if txt.is_file():
                rel = _parse_release_txt(txt)
                if sorted(rel) != sorted(qs):
                    raise DataError(
                        f"MME release questions in {txt} differ from ground truth {gt_file} for {name}: "
                        f"release {rel!r} vs ground truth {qs!r}"
                    )
                scan.files.append(txt)
            scan.files.append(path)
            entries.append(_Image(subtask=sub, name=name, path=path, questions=qs))
        scan.images[sub] = entries
    return scan


def fingerprint_items(scan: MMEScan, hasher: FileHasher) -> list[tuple[str, str]]:
    """``(path relative to data_root, sha256)`` for every file the conversion reads."""
    return [(Path(os.path.relpath(p, scan.root)).as_posix(), hasher.sha256(p)) for p in scan.files]


def image_problem(data: bytes) -> str | None:
    """None if PIL fully decodes ``data``, else a one-line reason.

    ``ImageFile.LOAD_TRUNCATED_IMAGES`` is forced off during the check so a truncated file counts as
    corrupt even when another library switched it on.
    """
    from PIL import Image, ImageFile

    prev = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        return one_line(f"{type(exc).__name__}: {exc}") or type(exc).__name__
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = prev
    return None


def build_mme(scan: MMEScan, on_corrupt_image: str) -> BuildResult:
    """Read and check every image, one ``datasets.Dataset`` chunk per subtask."""
    import datasets

    features = mme_features()
    res = BuildResult(chunks=[])
    for sub in scan.present:
        rows = []
        for img in scan.images[sub]:
            try:
                data = img.path.read_bytes()
            except OSError as exc:
                problem = one_line(f"{type(exc).__name__}: {exc.strerror or exc}")
            else:
                problem = image_problem(data)
            if problem is not None:
                if on_corrupt_image == "error":
                    raise DataError(f"corrupt MME image {img.path}: {problem}")
                log.warning(
                    "skipping corrupt MME image %s (%s) and its %d questions",
                    img.path,
                    problem,
                    len(img.questions),
                )
                res.skipped.append(
                    {"path": str(img.path), "reason": problem, "questions": len(img.questions)}
                )
                continue
            qid = f"{sub}/{img.name}"
            for question, answer in img.questions:
                rows.append(
                    {
                        "question_id": qid,
                        "question": question,
                        "answer": answer,
                        "category": sub,
                        "image": {"bytes": data, "path": qid},
                    }
                )
        if rows:
            res.chunks.append(datasets.Dataset.from_list(rows, features=features))
            res.subtasks.append(sub)
    res.missing_subtasks = [s for s in MME_SUBTASKS if s not in res.subtasks]
    return res
