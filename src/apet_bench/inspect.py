"""``python -m apet_bench.inspect``: the exact inputs a model would receive for one benchmark sample.

No model weights and no hub are needed: the benchmark sample comes from the same lmms-eval task the
runner evaluates (``doc_to_text`` / ``doc_to_visual``), the processor is built from the model's config
(:mod:`apet_bench.models.processors`), the prompt and token ids from the same functions the adapters
use (:mod:`apet_bench.models.inputs`), the decoding settings from :mod:`apet_bench.generation`::

    python -m apet_bench.inspect model=llava15 benchmark=mme data_root=../shared/benchmarks index=0 \\
        tokenizer=../shared/benchmarks/tokenizers/llama2/tokenizer.model out=/tmp/x

Arguments are ``key=value``: ``model``, ``benchmark``, ``index`` (the sample, 0-based, default 0),
``tokenizer`` (a SentencePiece ``tokenizer.model`` for the LLaVA family, ``<image>`` added as llava-hf
does, or a directory ``AutoTokenizer`` can load), ``out`` (a directory: ``pixel_values.npy`` float32
and ``inputs.json``), ``visual`` (an image or video file replacing the sample's own, e.g. an mp4 for
Video-LLaVA); every other ``key=value`` is a Hydra override of the run config (``data_root=...``,
``model.processor.pad_to_square=false``, ``gen_kwargs.max_new_tokens=8``, ...).

Prints the prompt, the input ids, the image sizes before and after preprocessing, the pixel tensor's
shape and sha256 (of its float32 bytes, C order) and every generation setting with its source; the last
line is one JSON object with keys ``prompt``, ``input_ids``, ``input_ids_collapsed`` (each image's
placeholder run replaced by one ``-200``, and each Video-LLaVA video's by one ``-200`` per frame: the
official ``IMAGE_TOKEN_INDEX`` convention, so it equals LLaVA's ``tokenizer_image_token`` ids),
``pixel_values_shape``, ``pixel_values_sha256``, ``generation_kwargs``, ``question`` (the task's text
before any chat template) and ``images`` (the source file of each image or video), plus
``generation_sources``, ``image_sizes`` and ``input_ids_absent`` (why there are no ids, or null).
Bad input: one line on stderr, exit 2.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["inspect_sample", "main"]

_FAMILIES = ("llava15", "llava_next", "qwen25vl", "video_llava")


class InspectError(ValueError):
    """Bad input to the inspector; one line naming the value."""


def _command() -> Any:
    from apet_bench.cli import Command, Key

    return Command(
        "python -m apet_bench.inspect",
        "The exact inputs a model would receive for one benchmark sample (prompt, token ids, pixels, decoding "
        "settings); needs model=<name> and benchmark=<name>.",
        (
            Key("index", 0, "int", help="the sample, 0-based"),
            Key("tokenizer", None, help="a SentencePiece tokenizer.model (LLaVA family) or a tokenizer directory"),
            Key("out", None, help="directory for pixel_values.npy (float32) and inputs.json"),
            Key("visual", None, help="an image or video file replacing the sample's own"),
        ),
        extra="overrides",  # model=, benchmark=, data_root=, model.processor.*=, gen_kwargs.*=, ...
    )


def _parse(argv: Sequence[str]) -> tuple[dict[str, Any], list[str]]:
    args = _command().parse(argv)
    keys = {o.split("=", 1)[0].lstrip("+~") for o in args.extra}
    for needed in ("model", "benchmark"):
        if needed not in keys:
            raise InspectError(f"{needed}=<name> is required")
    return dict(args), args.extra


def _load_tokenizer(path: str | None, family: str) -> tuple[Any, str | None]:
    """(tokenizer or None, reason when None)."""
    if not path:
        if family == "qwen25vl":
            return None, ("no Qwen2 tokenizer given (tokenizer=<directory with tokenizer.json>); the checkpoint's "
                          "tokenizer is not in this environment, so the ids cannot be shown")
        return None, "no tokenizer given (tokenizer=<tokenizer.model or directory>)"
    p = Path(path).expanduser()
    if p.is_file():
        if family == "qwen25vl":
            raise InspectError(f"tokenizer {path!r}: Qwen2.5-VL needs a tokenizer directory, not a file")
        from apet_bench.models.inputs import llama_tokenizer_from_sentencepiece

        tok = llama_tokenizer_from_sentencepiece(str(p))
    elif p.is_dir():
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
        except Exception as exc:  # noqa: BLE001 - any loader failure is one line
            raise InspectError(f"tokenizer {path!r} cannot be loaded ({type(exc).__name__})") from None
    else:
        raise InspectError(f"tokenizer {path!r} does not exist")
    if family == "video_llava" and tok.convert_tokens_to_ids("<video>") in (None, tok.unk_token_id):
        tok.add_tokens(["<video>"], special_tokens=True)
    return tok, None


def _sources(doc: Mapping[str, Any], visuals: Sequence[Any], data_root: str | None, bench: Mapping[str, Any]) -> list[str]:
    out = []
    for v in visuals:
        if isinstance(v, (str, os.PathLike)):
            out.append(str(v))
            continue
        name = doc.get("image_source") or doc.get("image_path") or doc.get("question_id")
        found = None
        if name and data_root:
            for sub in (bench.get("images_subdir"), bench.get("subdir"), ""):
                if sub is None:
                    continue
                cand = Path(data_root) / sub / str(name)
                if cand.is_file():
                    found = str(cand)
                    break
        out.append(found or f"{bench.get('name')}:{name}" if name else "(embedded in the dataset)")
    return out


def _sha256(arr: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(arr, dtype=np.float32).tobytes()).hexdigest()


def inspect_sample(argv: Sequence[str]) -> dict[str, Any]:
    """Build the inputs of one sample as the model would receive them; see the module docstring.

    Parameters
    ----------
    argv : sequence of str
        ``key=value`` arguments.

    Returns
    -------
    dict
        The JSON record (last line of the CLI), with ``pixel_values`` (``numpy.ndarray`` float32) added.

    Raises
    ------
    InspectError, apet_bench.config.ConfigError, ValueError
        Bad input, one line.
    """
    from omegaconf import OmegaConf

    from apet_bench.config import compose
    from apet_bench.data import prepare_benchmark
    from apet_bench.generation import resolve_generation
    from apet_bench.models.inputs import collapse_placeholder_runs, official_input_ids, with_official_ids
    from apet_bench.models.processors import build_image_processor, build_processor, processor_options

    own, overrides = _parse(argv)
    index = own["index"]
    cfg = OmegaConf.to_container(compose(overrides), resolve=True)
    model_cfg, bench = cfg["model"], cfg["benchmark"]
    family = model_cfg.get("family")
    if family not in _FAMILIES or model_cfg.get("tiny"):
        raise InspectError(f"model {model_cfg.get('name')!r}: inspect covers the real models (llava15, llava_next, "
                           "qwen25vl, video_llava)")
    opts = processor_options(family, model_cfg)
    data_root = cfg.get("data_root")
    data_root = str(Path(data_root).expanduser().resolve()) if data_root else None
    cache_dir = cfg.get("cache_dir") or os.environ.get("APET_BENCH_CACHE_DIR") or str(Path("~/.cache/apet_bench").expanduser())
    prepared = prepare_benchmark(bench, data_root=data_root, cache_dir=cache_dir,
                                 on_corrupt_image=cfg.get("on_corrupt_image", "skip"))
    from lmms_eval.tasks import TaskManager, get_task_dict

    # Our own task directory alone when it defines the task (indexing lmms-eval's ~1,000 tasks takes ~20 s).
    tm = TaskManager("ERROR", include_path=prepared.include_path, include_defaults=False, model_name="apet_bench")
    if prepared.task_name not in tm.all_tasks:
        tm = TaskManager("ERROR", include_path=prepared.include_path, model_name="apet_bench")
    task = get_task_dict([prepared.task_name], tm)[prepared.task_name]
    docs = task.eval_docs
    if not 0 <= index < len(docs):
        raise InspectError(f"index {index} is out of range: {bench['name']} has {len(docs)} samples")
    doc = docs[index]
    question = task.doc_to_text(doc)
    if own.get("visual"):
        vpath = Path(own["visual"]).expanduser()
        if not vpath.is_file():
            raise InspectError(f"visual {own['visual']!r} does not exist")
        visuals: list[Any] = [str(vpath.resolve())]
    else:
        visuals = [v for v in (task.doc_to_visual(doc) or []) if v is not None]
    images_src = _sources(doc, visuals, data_root, bench)
    gen, gen_src = resolve_generation(task.config.generation_kwargs, cfg, prepared.task_name)
    tokenizer, absent = _load_tokenizer(own.get("tokenizer"), family)

    from PIL import Image

    from apet_bench.data.video import is_video_path, load_video

    loaded: list[Any] = []
    for v in visuals:
        if isinstance(v, (str, os.PathLike)) and is_video_path(v):
            loaded.append(("video", load_video(v, int(opts.get("num_frames", 8))), str(v)))
        elif isinstance(v, (str, os.PathLike)):
            with Image.open(v) as im:
                loaded.append(("image", im.convert("RGB"), str(v)))
        else:
            loaded.append(("image", v.convert("RGB"), None))
    kinds = {k for k, _, _ in loaded}
    if len(kinds) > 1:
        raise InspectError("a sample holds either images or videos, not both")
    kind = kinds.pop() if kinds else "image"
    if kind == "video" and family != "video_llava":
        raise InspectError(f"model {model_cfg['name']} takes images; {images_src[0]} is a video")
    sizes: list[dict[str, Any]] = []
    ids = None
    collapsed = None
    images = [x for _, x, _ in loaded]

    if family in ("llava15", "llava_next"):
        from apet_bench.models.llava15 import vicuna_v1_prompt

        prompt = vicuna_v1_prompt(question, len(images))
        if tokenizer is not None:
            proc = build_processor(family, opts, tokenizer)
            inputs = proc(images=images, text=prompt, return_tensors="pt") if images else proc(text=prompt, return_tensors="pt")
            pid = int(tokenizer.convert_tokens_to_ids("<image>"))
            inputs = with_official_ids(inputs, prompt, tokenizer, pid, "<image>", proc)
            ids = inputs["input_ids"][0].tolist()
            collapsed = collapse_placeholder_runs(ids, pid)
        else:
            inputs = build_image_processor(family, opts)(images=images, return_tensors="pt")
        pixels = inputs["pixel_values"].float().numpy() if images else np.zeros((0,), np.float32)
        for im in images:
            after: Any = [int(opts["image_size"])] * 2
            if family == "llava15" and opts["pad_to_square"]:
                after = {"padded_square": max(im.size), "resized": [int(opts["image_size"])] * 2}
            if family == "llava_next":
                after = {"crops_with_base_view": int(pixels.shape[1]), "crop": [int(opts["image_size"])] * 2}
            sizes.append({"before": list(im.size), "after": after})
    elif family == "qwen25vl":
        from apet_bench.models.inputs import qwen_fetch_image
        from apet_bench.models.qwen25vl import qwen_prompt

        prompt = qwen_prompt(question, len(images))
        factor = int(opts["patch_size"]) * int(opts["merge_size"])
        fetched = [qwen_fetch_image(im, factor=factor) for im in images] if opts["fetch_image_resize"] else images
        if tokenizer is not None:
            proc = build_processor(family, opts, tokenizer)
            inputs = proc(images=fetched, text=prompt, return_tensors="pt")
            ids = inputs["input_ids"][0].tolist()
            collapsed = collapse_placeholder_runs(ids, int(tokenizer.convert_tokens_to_ids("<|image_pad|>")))
        else:
            inputs = build_image_processor(family, opts)(images=fetched, return_tensors="pt")
        pixels = inputs["pixel_values"].float().numpy()
        for im, f, thw in zip(images, fetched, inputs["image_grid_thw"].tolist()):
            p = int(opts["patch_size"])
            sizes.append({"before": list(im.size), "fetch_image": list(f.size),
                          "after": [thw[2] * p, thw[1] * p], "grid_thw": thw})
    else:  # video_llava
        from apet_bench.models.video_llava import video_clip_pixels, video_llava_prompt

        n_frames = int(opts["num_frames"])
        prompt = video_llava_prompt(question, len(images), kind, n_frames)
        ip = build_image_processor(family, opts)
        side = int(opts["image_size"])
        if kind == "video":
            clips = [video_clip_pixels(list(fr), ip, opts["video_transform"], opts["video_flip"], src)
                     for _, fr, src in loaded]
            pixels = np.stack([c.float().numpy() for c in clips]) if clips else np.zeros((0,), np.float32)
            for _, fr, _ in loaded:
                sizes.append({"before": [int(fr.shape[2]), int(fr.shape[1])], "frames": int(fr.shape[0]),
                              "after": [side, side]})
            if tokenizer is not None:
                tokens_per_frame = (side // int(opts["patch_size"])) ** 2 + 1  # CLS kept per frame
                vid = int(tokenizer.convert_tokens_to_ids("<video>"))
                ids = official_input_ids(prompt, tokenizer, [tokens_per_frame] * (n_frames * len(images)), vid)[0].tolist()
                collapsed = collapse_placeholder_runs(ids, vid, [n_frames] * len(images))
        else:
            if tokenizer is not None:
                proc = build_processor(family, opts, tokenizer)
                inputs = proc(images=images, text=prompt, return_tensors="pt", return_legacy_image_output=False)
                pid = int(tokenizer.convert_tokens_to_ids("<image>"))
                inputs = with_official_ids(inputs, prompt, tokenizer, pid, "<image>", proc)
                ids = inputs["input_ids"][0].tolist()
                collapsed = collapse_placeholder_runs(ids, pid)
            else:
                inputs = ip(images=images, return_tensors="pt", return_legacy_image_output=False)
            pixels = inputs["pixel_values"].float().numpy()
            sizes = [{"before": list(im.size), "after": [side, side]} for im in images]

    pixels = np.ascontiguousarray(pixels, dtype=np.float32)
    return {
        "prompt": prompt,
        "input_ids": ids,
        "input_ids_collapsed": collapsed,
        "pixel_values_shape": list(pixels.shape),
        "pixel_values_sha256": _sha256(pixels),
        "generation_kwargs": gen,
        "question": question,
        "images": images_src,
        "generation_sources": gen_src,
        "image_sizes": sizes,
        "input_ids_absent": absent if ids is None else None,
        "model": model_cfg["name"],
        "benchmark": bench["name"],
        "index": index,
        "pixel_values": pixels,
    }


def _report(rec: Mapping[str, Any]) -> str:
    lines = [f"model {rec['model']} | benchmark {rec['benchmark']} | sample {rec['index']}",
             f"question (task text, before the template): {rec['question']!r}",
             f"source file(s): {', '.join(rec['images']) or '(none)'}",
             "prompt:", rec["prompt"]]
    if rec["input_ids"] is None:
        lines.append(f"input ids: absent ({rec['input_ids_absent']})")
    else:
        lines.append(f"input ids ({len(rec['input_ids'])} as the HF model gets them; "
                     f"{len(rec['input_ids_collapsed'])} with each placeholder run as -200):")
        lines.append(json.dumps(rec["input_ids_collapsed"]))
    for i, s in enumerate(rec["image_sizes"]):
        lines.append(f"visual {i}: " + ", ".join(f"{k} {v}" for k, v in s.items()))
    lines.append(f"pixel_values: shape {rec['pixel_values_shape']}, float32 sha256 {rec['pixel_values_sha256']}")
    lines.append("generation settings:")
    for k, v in rec["generation_kwargs"].items():
        lines.append(f"  {k} = {v!r}   <- {rec['generation_sources'].get(k, '?')}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry: the report, then one JSON line; bad input -> one line on stderr, exit 2."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    argv = sys.argv[1:] if argv is None else list(argv)
    try:  # lmms-eval logs every task file it indexes at DEBUG
        from loguru import logger

        logger.remove()
        logger.add(sys.stderr, level="WARNING")
    except Exception:  # noqa: BLE001 - logging is cosmetic
        pass
    try:
        own, _ = _parse(argv)
        rec = inspect_sample(argv)
    except (ValueError, KeyError, OSError) as exc:
        from apet_bench.cli import error

        return error(exc)
    pixels = rec.pop("pixel_values")
    out = {k: rec[k] for k in ("prompt", "input_ids", "input_ids_collapsed", "pixel_values_shape",
                               "pixel_values_sha256", "generation_kwargs", "question", "images",
                               "generation_sources", "image_sizes", "input_ids_absent")}
    if own["out"]:
        target = Path(own["out"]).expanduser()
        target.mkdir(parents=True, exist_ok=True)
        np.save(target / "pixel_values.npy", pixels)
        (target / "inputs.json").write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    print(_report(rec))
    print(json.dumps(out))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
