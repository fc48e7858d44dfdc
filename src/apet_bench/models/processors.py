"""Processors of the real models built from our model configs, not from a checkpoint's processor files.

A checkpoint revision's ``processor_config.json`` / ``preprocessor_config.json`` decide settings the
harness depends on (the pinned ``llava-hf/llava-1.5-7b-hf`` revision has no ``processor_config.json``,
so ``LlavaProcessor.patch_size`` is ``None`` under transformers 5 and the first image fails). Every such
setting is therefore written in ``configs/model/<name>.yaml`` under ``processor:`` and the processor is
assembled here from it plus the checkpoint's tokenizer (or any tokenizer: ``python -m
apet_bench.inspect`` builds them with no checkpoint at all).

``processor:`` keys (all families): ``image_size`` (CLIP input side / crop), ``patch_size``,
``vision_feature_select_strategy``, ``num_additional_image_tokens`` (CLS), ``image_mean``,
``image_std``; LLaVA-1.5: ``pad_to_square`` (``image_aspect_ratio=pad``); LLaVA-NeXT:
``image_grid_pinpoints`` ((height, width) px); Qwen2.5-VL: ``merge_size``, ``temporal_patch_size``,
``fetch_image_resize`` (the loader's first resize) with the model's top-level ``min_pixels`` /
``max_pixels``; Video-LLaVA: ``num_frames``, ``video_transform`` (``official`` | ``hf``),
``video_flip`` (``false`` or a seed).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from apet_bench.models.spec import ModelConfigError

__all__ = ["PROCESSOR_KEYS", "build_image_processor", "build_processor", "check_against_model", "processor_options"]

#: Accepted ``processor:`` keys per family (others are refused, naming the key).
PROCESSOR_KEYS: dict[str, tuple[str, ...]] = {
    "llava15": ("image_size", "patch_size", "vision_feature_select_strategy", "num_additional_image_tokens",
                "image_mean", "image_std", "pad_to_square"),
    "llava_next": ("image_size", "patch_size", "vision_feature_select_strategy", "num_additional_image_tokens",
                   "image_mean", "image_std", "image_grid_pinpoints"),
    "qwen25vl": ("patch_size", "merge_size", "temporal_patch_size", "image_mean", "image_std", "fetch_image_resize"),
    "video_llava": ("image_size", "patch_size", "vision_feature_select_strategy", "num_additional_image_tokens",
                    "image_mean", "image_std", "num_frames", "video_transform", "video_flip"),
}
_STRATEGIES = ("default", "full")


def processor_options(family: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """The validated ``processor:`` block of a model config (plus Qwen's top-level pixel bounds).

    Parameters
    ----------
    family : str
        ``llava15``, ``llava_next``, ``qwen25vl`` or ``video_llava``.
    options : mapping
        The model config (or :attr:`ModelSpec.options`); ``processor`` is read, and for Qwen2.5-VL
        ``min_pixels`` / ``max_pixels``.

    Returns
    -------
    dict

    Raises
    ------
    ModelConfigError
        A missing ``processor`` block, an unknown key, or a bad value (one line, naming it).
    """
    if family not in PROCESSOR_KEYS:
        raise ModelConfigError(f"no processor recipe for model family {family!r}")
    block = options.get("processor")
    if not isinstance(block, Mapping):
        raise ModelConfigError(f"model config of family {family!r} needs a 'processor' block (got {block!r})")
    opts = dict(block)
    unknown = sorted(set(opts) - set(PROCESSOR_KEYS[family]))
    if unknown:
        raise ModelConfigError(
            f"unknown processor key(s) {', '.join(unknown)} for {family}; accepted: {', '.join(PROCESSOR_KEYS[family])}"
        )
    missing = [k for k in PROCESSOR_KEYS[family] if k not in opts]
    if missing:
        raise ModelConfigError(f"processor block of {family} lacks {', '.join(missing)}")
    for key in ("image_size", "patch_size", "num_additional_image_tokens", "merge_size", "temporal_patch_size",
                "num_frames"):
        if key in opts:
            v = opts[key]
            if isinstance(v, bool) or not isinstance(v, int) or v < (0 if key == "num_additional_image_tokens" else 1):
                raise ModelConfigError(f"processor {key} {v!r} must be a positive integer")
    for key in ("image_mean", "image_std"):
        v = opts[key]
        if not isinstance(v, (list, tuple)) or len(v) != 3 or not all(isinstance(x, (int, float)) for x in v):
            raise ModelConfigError(f"processor {key} {v!r} must be three numbers")
        opts[key] = [float(x) for x in v]
    if "vision_feature_select_strategy" in opts and opts["vision_feature_select_strategy"] not in _STRATEGIES:
        raise ModelConfigError(
            f"processor vision_feature_select_strategy {opts['vision_feature_select_strategy']!r}: use default or full"
        )
    if "video_transform" in opts and opts["video_transform"] not in ("official", "hf"):
        raise ModelConfigError(f"processor video_transform {opts['video_transform']!r}: use official or hf")
    flip = opts.get("video_flip", False)
    if family == "video_llava" and not (flip is False or flip is None or (isinstance(flip, int) and not isinstance(flip, bool))):
        raise ModelConfigError(f"processor video_flip {flip!r}: use false or an integer seed")
    if family == "llava_next":
        pins = opts["image_grid_pinpoints"]
        try:
            opts["image_grid_pinpoints"] = [[int(h), int(w)] for h, w in pins]
        except (TypeError, ValueError):
            raise ModelConfigError(f"processor image_grid_pinpoints {pins!r} must be [height, width] pairs") from None
    if family == "qwen25vl":
        from apet_bench.models.qwen25vl import _check_pixels

        opts["min_pixels"], opts["max_pixels"] = _check_pixels(options.get("min_pixels"), options.get("max_pixels"))
    return opts


def build_image_processor(family: str, opts: Mapping[str, Any]) -> Any:
    """The image processor ``opts`` (:func:`processor_options`) describe, PIL backend, no checkpoint files.

    * ``llava15``: ``LlavaImageProcessorPil(do_pad=pad_to_square, shortest edge / crop image_size)`` —
      ``do_pad`` pads to a square with ``int(255 · image_mean)``, LLaVA's ``expand2square``;
    * ``llava_next``: ``LlavaNextImageProcessorPil(image_grid_pinpoints, do_pad=True)`` (anyres);
    * ``qwen25vl``: ``Qwen2VLImageProcessorPil(min_pixels, max_pixels, patch_size, merge_size, temporal_patch_size)``;
    * ``video_llava``: ``VideoLlavaImageProcessor`` (images; videos go through
      :func:`apet_bench.models.inputs.video_llava_video_transform` when ``video_transform: official``).

    Returns
    -------
    transformers image processor

    Raises
    ------
    ModelConfigError
        For an unknown family.
    """
    common = {"image_mean": list(opts["image_mean"]), "image_std": list(opts["image_std"])}
    if family == "llava15":
        from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

        s = int(opts["image_size"])
        return LlavaImageProcessorPil(
            do_pad=bool(opts["pad_to_square"]), size={"shortest_edge": s}, crop_size={"height": s, "width": s}, **common
        )
    if family == "llava_next":
        from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

        s = int(opts["image_size"])
        return LlavaNextImageProcessorPil(
            size={"shortest_edge": s}, crop_size={"height": s, "width": s},
            image_grid_pinpoints=[list(p) for p in opts["image_grid_pinpoints"]], do_pad=True, **common,
        )
    if family == "qwen25vl":
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        lo, hi = int(opts["min_pixels"]), int(opts["max_pixels"])
        return Qwen2VLImageProcessorPil(
            size={"shortest_edge": lo, "longest_edge": hi}, min_pixels=lo, max_pixels=hi,
            patch_size=int(opts["patch_size"]), merge_size=int(opts["merge_size"]),
            temporal_patch_size=int(opts["temporal_patch_size"]), **common,
        )
    if family == "video_llava":
        from transformers import VideoLlavaImageProcessor

        s = int(opts["image_size"])
        return VideoLlavaImageProcessor(size={"shortest_edge": s}, crop_size={"height": s, "width": s}, **common)
    raise ModelConfigError(f"no processor recipe for model family {family!r}")


def build_processor(family: str, opts: Mapping[str, Any], tokenizer: Any) -> Any:
    """The full processor (image processor of :func:`build_image_processor` + ``tokenizer``).

    ``LlavaProcessor`` / ``LlavaNextProcessor`` / ``VideoLlavaProcessor`` (no video processor) get
    ``patch_size``, ``vision_feature_select_strategy`` and ``num_additional_image_tokens`` from
    ``opts``; Qwen2.5-VL's processor takes the tokenizer's chat template.

    Parameters
    ----------
    family : str
    opts : mapping
        From :func:`processor_options`.
    tokenizer : transformers tokenizer
        The checkpoint's (``AutoTokenizer``), or e.g.
        :func:`apet_bench.models.inputs.llama_tokenizer_from_sentencepiece` for the LLaVA family.

    Returns
    -------
    transformers.ProcessorMixin
    """
    image_processor = build_image_processor(family, opts)
    if family == "qwen25vl":
        from apet_bench.models.qwen25vl import _processor_class

        return _processor_class()(
            image_processor=image_processor, tokenizer=tokenizer, video_processor=None,
            chat_template=getattr(tokenizer, "chat_template", None),
        )
    kwargs = {
        "patch_size": int(opts["patch_size"]),
        "vision_feature_select_strategy": opts["vision_feature_select_strategy"],
        "num_additional_image_tokens": int(opts["num_additional_image_tokens"]),
    }
    if family == "llava15":
        from transformers import LlavaProcessor

        return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, **kwargs)
    if family == "llava_next":
        from transformers import LlavaNextProcessor

        return LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer, **kwargs)
    from apet_bench.models.video_llava import make_video_llava_processor

    return make_video_llava_processor(image_processor, tokenizer, **kwargs)


def check_against_model(family: str, opts: Mapping[str, Any], model_config: Any, weights: str) -> None:
    """Refuse a processor block that disagrees with the loaded model's config.

    Compares ``patch_size`` and ``image_size`` (vision config), ``vision_feature_select_strategy``, for
    LLaVA-NeXT ``image_grid_pinpoints``, for Video-LLaVA ``num_frames`` (``video_seq_length`` / 257),
    for Qwen2.5-VL the patch, merge and temporal patch sizes.

    Raises
    ------
    ModelConfigError
        ``processor patch_size 14 differs from the model's 16 (<weights>)``.
    """
    vc = getattr(model_config, "vision_config", None)
    pairs: list[tuple[str, Any, Any]] = []
    if family != "qwen25vl" and vc is not None:
        pairs += [("patch_size", opts["patch_size"], getattr(vc, "patch_size", None)),
                  ("image_size", opts["image_size"], getattr(vc, "image_size", None)),
                  ("vision_feature_select_strategy", opts["vision_feature_select_strategy"],
                   getattr(model_config, "vision_feature_select_strategy", None))]
    if family == "llava_next":
        pairs.append(("image_grid_pinpoints", [list(p) for p in opts["image_grid_pinpoints"]],
                      [list(p) for p in getattr(model_config, "image_grid_pinpoints", [])]))
    if family == "video_llava" and getattr(model_config, "video_seq_length", None) is not None:
        per_frame = (int(opts["image_size"]) // int(opts["patch_size"])) ** 2 + 1  # CLS kept per frame
        pairs.append(("num_frames", opts["num_frames"], int(model_config.video_seq_length) // per_frame))
    if family == "qwen25vl" and vc is not None:
        pairs += [("patch_size", opts["patch_size"], getattr(vc, "patch_size", None)),
                  ("merge_size", opts["merge_size"], getattr(vc, "spatial_merge_size", None)),
                  ("temporal_patch_size", opts["temporal_patch_size"], getattr(vc, "temporal_patch_size", None))]
    for key, ours, theirs in pairs:
        if theirs is not None and ours != theirs:
            raise ModelConfigError(f"processor {key} {ours!r} differs from the model's {theirs!r} ({weights})")
