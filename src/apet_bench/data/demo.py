"""Embedded demo set: scikit-image's bundled photographs + MME-style yes/no pairs (demo_questions.yaml).

Every image comes from a ``skimage.data.<loader>()`` call that reads a file shipped inside the
scikit-image wheel (no pooch download). The pixels are stored as lossless PNG, so the rows are the
same wherever the same scikit-image data files are installed; the fingerprint hashes the decoded
pixel arrays and the questions file.
"""

from __future__ import annotations

import hashlib
import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._core import MME_SUBTASKS, BuildResult, DataError, FileHasher, mme_features

log = logging.getLogger("apet_bench.data")

QUESTIONS_FILE = Path(__file__).with_name("demo_questions.yaml")


@dataclass
class _DemoImage:
    name: str
    loader: str
    category: str
    array: Any  # numpy.ndarray (uint8, HxW or HxWx3)
    questions: list[tuple[str, str]]


@dataclass
class DemoScan:
    questions_file: Path
    images: list[_DemoImage]
    skimage_version: str
    skimage_dir: str

    @property
    def source(self) -> str:
        return (
            f"package scikit-image {self.skimage_version} (skimage.data photographs in {self.skimage_dir}) "
            f"+ questions {self.questions_file}"
        )


def _load_array(loader: str, index: Any, where: str):
    import numpy as np
    import skimage.data

    fn = getattr(skimage.data, loader, None)
    if not callable(fn):
        raise DataError(f"{where}: skimage.data has no loader {loader!r}")
    try:
        out = fn()
    except Exception as exc:  # e.g. a pooch download the offline machine can't do
        raise DataError(
            f"{where}: skimage.data.{loader}() failed offline: {type(exc).__name__}: {exc}"
        ) from None
    if isinstance(out, tuple):
        if not isinstance(index, int) or not 0 <= index < len(out):
            raise DataError(
                f"{where}: skimage.data.{loader}() returns a tuple; give a valid 'index' (got {index!r})"
            )
        out = out[index]
    arr = np.asarray(out)
    if arr.dtype != np.uint8 or arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)):
        raise DataError(
            f"{where}: skimage.data.{loader}() gave {arr.dtype} {arr.shape}, not a uint8 photograph"
        )
    return np.ascontiguousarray(arr)


def scan_demo(questions_file: Path = QUESTIONS_FILE) -> DemoScan:
    """Load and validate ``demo_questions.yaml`` and the skimage arrays it names."""
    import skimage
    import skimage.data
    import yaml

    try:
        spec = yaml.safe_load(questions_file.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise DataError(f"cannot read demo questions {questions_file}: {exc}") from None
    items = spec.get("images") if isinstance(spec, dict) else None
    if not isinstance(items, list) or not items:
        raise DataError(f"demo questions {questions_file} has no 'images' list")
    images: list[_DemoImage] = []
    seen: set[str] = set()
    for i, item in enumerate(items):
        where = f"{questions_file} images[{i}]"
        if not isinstance(item, dict):
            raise DataError(f"{where}: expected a mapping")
        name, loader, category = item.get("name"), item.get("loader", item.get("name")), item.get("category")
        if not isinstance(name, str) or not name or name in seen:
            raise DataError(f"{where}: missing or duplicate name {name!r}")
        seen.add(name)
        if category not in MME_SUBTASKS:
            raise DataError(
                f"{where}: category {category!r} is not an MME subtask ({', '.join(MME_SUBTASKS)})"
            )
        qs = []
        for q in item.get("questions") or []:
            question = q.get("question") if isinstance(q, dict) else None
            answer = q.get("answer") if isinstance(q, dict) else None
            if not isinstance(question, str) or not question.strip() or answer not in ("Yes", "No"):
                raise DataError(
                    f"{where}: each question needs 'question' text and answer Yes or No, got {q!r}"
                )
            qs.append((question.strip(), answer))
        if len(qs) != 2 or sorted(a for _, a in qs) != ["No", "Yes"]:
            raise DataError(f"{where} ({name}): needs exactly one Yes and one No question")
        arr = _load_array(str(loader), item.get("index"), where)
        images.append(_DemoImage(name=name, loader=str(loader), category=category, array=arr, questions=qs))
    return DemoScan(
        questions_file=questions_file,
        images=images,
        skimage_version=skimage.__version__,
        skimage_dir=str(Path(skimage.data.__file__).parent),
    )


def fingerprint_items(scan: DemoScan, hasher: FileHasher) -> list[tuple[str, str]]:
    items = [("demo_questions.yaml", hasher.sha256(scan.questions_file))]
    for img in scan.images:
        h = hashlib.sha256(f"{img.array.dtype}|{img.array.shape}|".encode())
        h.update(img.array.tobytes())
        items.append((f"skimage.data.{img.loader}:{img.name}", h.hexdigest()))
    return items


def build_demo(scan: DemoScan, on_corrupt_image: str) -> BuildResult:
    """Encode each array as PNG and emit one row per question (MME columns)."""
    import datasets
    from PIL import Image

    rows = []
    for img in scan.images:
        buf = io.BytesIO()
        Image.fromarray(img.array).save(buf, format="PNG")
        qid = f"{img.category}/{img.name}.png"
        for question, answer in img.questions:
            rows.append(
                {
                    "question_id": qid,
                    "question": question,
                    "answer": answer,
                    "category": img.category,
                    "image": {"bytes": buf.getvalue(), "path": qid},
                }
            )
    present = [c for c in MME_SUBTASKS if any(i.category == c for i in scan.images)]
    return BuildResult(
        chunks=[datasets.Dataset.from_list(rows, features=mme_features())],
        subtasks=present,
        missing_subtasks=[c for c in MME_SUBTASKS if c not in present],
    )
