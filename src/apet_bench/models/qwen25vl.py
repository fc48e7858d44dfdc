"""Qwen2.5-VL adapter (``Qwen/Qwen2.5-VL-7B-Instruct`` and the tiny random-weight variant).

Sequence layout (docs/methods/index.md): Qwen chat template as lmms-eval's ``qwen2_5_vl_chat`` model renders
it with ``apply_chat_template(add_generation_prompt=True)`` and no system message of its own (so the
template's default system prompt ``"You are a helpful assistant."``), image before the question::

    <|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n<|im_start|>user\\n
    <|vision_start|><|image_pad|><|vision_end|>{question}<|im_end|>\\n<|im_start|>assistant\\n

The processor expands ``<|image_pad|>`` into ``grid_t·grid_h·grid_w / merge_size²`` placeholders: the
image is resized (``smart_resize``) to sides that are multiples of 28 px with a pixel count in
``[min_pixels, max_pixels]``, cut into 14 px patches, encoded by the window-attention ViT and merged
2×2 by ``merger`` into tokens of the LLM width, in raster order. The number of visual tokens therefore
depends on the image: ``min_pixels / 28²`` to ``max_pixels / 28²`` (256 to 2048 with the paper's
setting).

Positions are 3-D mRoPE (t, h, w), computed by ``get_rope_index`` on the full ``input_ids``
(docs/models.md). Stage 1 (:meth:`Qwen25VLAdapter.stage_one_inputs`) therefore passes
explicit 4-row ``position_ids`` that keep every kept token's original (t, h, w) position (docs/models.md),
and a guard on the LLM refuses any forward of a shrunk sequence without them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from apet_bench.core import ShrunkSequence, VisualSelection
from apet_bench.models.base import (
    ModelAdapter,
    ModelConfigError,
    ModelSpec,
    VisualSegment,
    VisualSegments,
    placeholder_prompt_body,
    register_adapter,
)
from apet_bench.models.loading import config_processor_loader, load_pretrained
from apet_bench.models.tiny import build_tiny_tokenizer, checked_config, instantiate_tiny_model

if TYPE_CHECKING:  # pragma: no cover - typing only
    from PIL import Image

__all__ = [
    "PAPER_MAX_PIXELS",
    "PAPER_MIN_PIXELS",
    "QWEN_SPECIAL_TOKENS",
    "QWEN_SYSTEM",
    "Qwen25VLAdapter",
    "TinyQwen25VLConfig",
    "build_tiny_qwen25vl",
    "mrope_positions_for_kept",
    "qwen_prompt",
]

#: Default system prompt of the Qwen2.5-VL chat template (used when the messages carry none).
QWEN_SYSTEM = "You are a helpful assistant."
#: ApET's evaluation setting (docs/methods/index.md): 256 to 2048 visual tokens of 28 × 28 px.
PAPER_MIN_PIXELS = 256 * 28 * 28
PAPER_MAX_PIXELS = 2048 * 28 * 28
#: Qwen special tokens the tiny tokenizer needs (placeholders and chat markers).
QWEN_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<|im_start|>",
    "<|im_end|>",
)
_TEMPLATE_WORDS: tuple[str, ...] = ("system", "user", "assistant", "You", "helpful")


def qwen_prompt(question: str, num_images: int = 1) -> str:
    """The Qwen2.5-VL chat-template prompt (default system prompt, images before the question), without a model.

    ``apply_chat_template(messages, add_generation_prompt=True)`` of ``[image..., text]`` as ApET's
    ``qwen/eval/model_vqa_loader.py`` builds it (MaQianKun0/ApET @ 70cc01b).

    Raises
    ------
    ValueError
        If ``question`` holds ``<|image_pad|>`` placeholders, but not ``num_images`` of them.
    """
    body = placeholder_prompt_body(question, num_images, "<|image_pad|>", "<|vision_start|><|image_pad|><|vision_end|>")
    return f"<|im_start|>system\n{QWEN_SYSTEM}<|im_end|>\n<|im_start|>user\n{body}<|im_end|>\n<|im_start|>assistant\n"


def _processor_class() -> type:
    """``Qwen2_5_VLProcessor`` that accepts ``video_processor=None`` without torchvision.

    ``ProcessorMixin.check_argument_for_proper_class`` looks ``None`` up in ``VIDEO_PROCESSOR_MAPPING``,
    which fails without torchvision (``AttributeError: ... '_extra_content'``); the subclass skips the
    check for ``None`` (docs/models.md, "Processor workaround").
    """
    from transformers import Qwen2_5_VLProcessor

    class _Qwen25VLProcessor(Qwen2_5_VLProcessor):
        def check_argument_for_proper_class(self, argument_name, argument):  # noqa: D401
            if argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    return _Qwen25VLProcessor


def _check_pixels(min_pixels: Any, max_pixels: Any, factor: int = 28) -> tuple[int, int]:
    """Validate ``min_pixels`` / ``max_pixels`` (ints, ``factor² <= min_pixels <= max_pixels``).

    Raises
    ------
    ModelConfigError
        One line naming the bad value.
    """
    for key, value in (("min_pixels", min_pixels), ("max_pixels", max_pixels)):
        if isinstance(value, bool) or not isinstance(value, int) or value < factor * factor:
            raise ModelConfigError(f"{key} {value!r} must be an integer >= {factor * factor} ({factor}x{factor} px)")
    if min_pixels > max_pixels:
        raise ModelConfigError(f"min_pixels {min_pixels} is above max_pixels {max_pixels}")
    return int(min_pixels), int(max_pixels)


@dataclass
class TinyQwen25VLConfig:
    """Sizes of the tiny Qwen2.5-VL (real classes, random weights; docs/models.md).

    ``min_pixels`` / ``max_pixels`` default to 64 to 256 visual tokens (of 28 × 28 px) so tests stay
    fast; ``mrope_section`` is derived from the head size in the 7B model's proportions
    (``[16, 24, 24]`` of 64).
    """

    vision_hidden_size: int = 64
    vision_intermediate_size: int = 128
    vision_depth: int = 4
    vision_heads: int = 4
    text_hidden_size: int = 128
    text_intermediate_size: int = 256
    text_layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    min_pixels: int = 64 * 28 * 28
    max_pixels: int = 256 * 28 * 28
    init_std: float = 0.2

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any] | None) -> TinyQwen25VLConfig:
        """Validate a mapping (unknown keys, non-positive sizes, inconsistent heads rejected).

        Raises
        ------
        ValueError
            One line naming the bad key or value.
        """
        out = checked_config(cls, cfg)
        if out.text_hidden_size % out.heads or out.heads % out.kv_heads or (out.text_hidden_size // out.heads) % 8:
            raise ValueError(
                f"tiny_config text_hidden_size {out.text_hidden_size}, heads {out.heads}, kv_heads {out.kv_heads} "
                "are inconsistent (head size must be a multiple of 8)"
            )
        if out.vision_hidden_size % out.vision_heads:
            raise ValueError(
                f"tiny_config vision_hidden_size {out.vision_hidden_size} is not a multiple of vision_heads {out.vision_heads}"
            )
        _check_pixels(out.min_pixels, out.max_pixels)
        return out

    @property
    def mrope_section(self) -> list[int]:
        """``[t, h, w]`` summing to head_dim / 2, in the 7B proportions 1/4, 3/8, 3/8."""
        half = self.text_hidden_size // self.heads // 2
        t = half // 4
        h = (half - t) // 2
        return [t, h, half - t - h]

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of the fields."""
        return asdict(self)


def build_tiny_qwen25vl(
    tiny_config: TinyQwen25VLConfig | Mapping[str, Any] | None = None,
    *,
    seed: int = 0,
    attn_implementation: str = "sdpa",
) -> tuple[Any, Any]:
    """A random-weight ``Qwen2_5_VLForConditionalGeneration`` and its processor, built offline.

    Config: ``Qwen2_5_VLConfig(text_config=..., vision_config=dict(depth, hidden_size, ..., patch_size=14,
    spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[1, 3]))`` with
    the placeholder ids of the tiny tokenizer (word-level, Qwen special tokens added); processor:
    ``Qwen2_5_VLProcessor(Qwen2VLImageProcessorPil(size={"shortest_edge": min_pixels, "longest_edge":
    max_pixels}), tokenizer, video_processor=None)`` (docs/models.md). Construction runs
    under ``torch.random.fork_rng``, then :func:`apet_bench.models.tiny.reinit_weights`.

    Parameters
    ----------
    tiny_config : TinyQwen25VLConfig or mapping, optional
    seed : int
        Same seed -> identical ``state_dict``.
    attn_implementation : str

    Returns
    -------
    model : transformers.Qwen2_5_VLForConditionalGeneration
        fp32, CPU, eval mode.
    processor : transformers.Qwen2_5_VLProcessor
    """
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tc = tiny_config if isinstance(tiny_config, TinyQwen25VLConfig) else TinyQwen25VLConfig.from_mapping(tiny_config)
    tokenizer = build_tiny_tokenizer(extra_words=_TEMPLATE_WORDS, extra_special_tokens=QWEN_SPECIAL_TOKENS)
    image_processor = Qwen2VLImageProcessorPil(
        size={"shortest_edge": tc.min_pixels, "longest_edge": tc.max_pixels},
        patch_size=14,
        merge_size=2,
        temporal_patch_size=2,
    )
    processor = _processor_class()(image_processor=image_processor, tokenizer=tokenizer, video_processor=None)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    depth = tc.vision_depth
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=tc.text_hidden_size,
            intermediate_size=tc.text_intermediate_size,
            num_hidden_layers=tc.text_layers,
            num_attention_heads=tc.heads,
            num_key_value_heads=tc.kv_heads,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": tc.mrope_section},
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            tie_word_embeddings=False,
        ),
        vision_config=dict(
            depth=depth,
            hidden_size=tc.vision_hidden_size,
            intermediate_size=tc.vision_intermediate_size,
            num_heads=tc.vision_heads,
            out_hidden_size=tc.text_hidden_size,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=112,
            fullatt_block_indexes=sorted({depth // 2 - 1, depth - 1} - {-1}),
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    model = instantiate_tiny_model(
        Qwen2_5_VLForConditionalGeneration,
        config,
        tokenizer,
        init_std=tc.init_std,
        seed=seed,
        attn_implementation=attn_implementation,
    )
    return model, processor


def mrope_positions_for_kept(
    full_positions: torch.Tensor,
    source_positions: torch.Tensor,
    attention_mask: torch.Tensor,
    visual_mask: torch.Tensor,
) -> torch.Tensor:
    """Position ids of a shrunk Qwen2.5-VL sequence: original (t, h, w) of every kept column.

    docs/models.md: the mRoPE rows are gathered from the full-length positions at
    each new column's source column; the text row (used by the mask builder only) is the cumsum of
    the new mask − 1, as ``GenerationMixin._prepare_position_ids_for_generation`` builds it.

    Parameters
    ----------
    full_positions : torch.Tensor
        ``(3, batch_size, seq_len)`` long, ``get_rope_index`` on the original inputs.
    source_positions : torch.Tensor
        ``(batch_size, new_seq_len)`` long, from :func:`apet_bench.surgery.shrink_placeholder_runs`;
        ``-1`` on padding and on visual tokens without an original index.
    attention_mask : torch.Tensor
        ``(batch_size, new_seq_len)``, the shrunk mask.
    visual_mask : torch.Tensor
        ``(batch_size, new_seq_len)`` bool, placeholder columns of the shrunk sequence.

    Returns
    -------
    torch.Tensor
        ``(4, batch_size, new_seq_len)`` long: ``[text; t; h; w]``; padding columns are 0.

    Raises
    ------
    ValueError
        If a non-padding, non-visual column has no source column (a bug in the surgery).

    Notes
    -----
    Visual tokens without an original index (``kept_indices is None``: pooled or new tokens) get the
    positions of evenly spaced original tokens of their image's run (``linspace`` over the raster
    order), so they stay inside the image's (h, w) box; methods that keep or merge original tokens
    should report ``kept_indices`` to place them exactly.
    """
    src = source_positions.clone()
    mask = attention_mask.bool()
    for b in range(src.shape[0]):
        missing = (src[b] < 0) & mask[b]
        if not bool(missing.any()):
            continue
        if bool((missing & ~visual_mask[b]).any()):
            raise ValueError(f"row {b}: a text column of the shrunk sequence has no source column")
        # Runs of consecutive missing visual columns; each gets evenly spaced source columns of the
        # original run bounded by the nearest known source columns on either side.
        cols = missing.nonzero().flatten().tolist()
        runs: list[list[int]] = []
        for c in cols:
            if runs and c == runs[-1][-1] + 1:
                runs[-1].append(c)
            else:
                runs.append([c])
        for run in runs:
            lo = int(src[b, run[0] - 1]) + 1 if run[0] > 0 and src[b, run[0] - 1] >= 0 else 0
            hi_col = run[-1] + 1
            hi = int(src[b, hi_col]) - 1 if hi_col < src.shape[1] and src[b, hi_col] >= 0 else full_positions.shape[-1] - 1
            picks = torch.linspace(lo, max(lo, hi), len(run)).round().long()
            src[b, run] = picks.to(src.device)
    gather = src.clamp(min=0).unsqueeze(0).expand(3, -1, -1)
    pos3 = torch.gather(full_positions, 2, gather.to(full_positions.device))
    pos3 = pos3.masked_fill(~mask.unsqueeze(0).to(pos3.device), 0)
    text = attention_mask.long().cumsum(-1) - 1
    text = text.masked_fill(~mask, 0).to(pos3.device)
    return torch.cat([text.unsqueeze(0), pos3], dim=0)


@register_adapter("qwen25vl")
class Qwen25VLAdapter(ModelAdapter):
    """Qwen2.5-VL (window-attention ViT + 2×2 PatchMerger + Qwen2 LLM with mRoPE).

    Visual tokens per image depend on the image size: ``min_pixels / 28²`` to ``max_pixels / 28²``
    (:meth:`visual_tokens_for`, :meth:`visual_token_counts`); :attr:`num_visual_tokens` is the
    maximum (:attr:`max_visual_tokens`, 2048 with the paper's setting), which budgets are validated
    against. 28 decoder layers for the 7B model.

    Config keys besides :class:`~apet_bench.models.base.ModelSpec`'s: ``min_pixels`` and ``max_pixels``
    (ints; for the tiny model they go in ``tiny_config``, and top-level values override them).

    Examples
    --------
    >>> from apet_bench.models import load_model
    >>> adapter = load_model({"name": "tiny_qwen25vl", "family": "qwen25vl", "tiny": True})
    >>> adapter.max_visual_tokens, adapter.num_layers
    (256, 4)
    """

    #: 3-D mRoPE (t, h, w) from ``get_rope_index``; stage 1 keeps each kept token's original position.
    position_encoding = "mrope-3d"
    #: Qwen2.5-VL's ViT has no [CLS] token.
    has_cls_token = False

    @property
    def features_per_token(self) -> int:  # type: ignore[override]
        """``spatial_merge_size²`` (4): the merger turns 2×2 pre-merger patches into one visual token."""
        return int(self.model.config.vision_config.spatial_merge_size) ** 2

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._guard = self.language_model.register_forward_pre_hook(self._check_positions, with_kwargs=True)

    @classmethod
    def from_spec(cls, spec: ModelSpec) -> Qwen25VLAdapter:
        """Build the tiny model (``spec.tiny``) or load the checkpoint (``local_path`` or ``hf_id@revision``).

        Raises
        ------
        ModelConfigError
            When the checkpoint cannot be loaded, ``min_pixels`` / ``max_pixels`` are invalid or
            ``visual_tokens`` is not ``max_pixels / 28²``.
        ValueError
            For a bad ``tiny_config``.
        """
        pixels = {k: spec.options[k] for k in ("min_pixels", "max_pixels") if spec.options.get(k) is not None}
        if spec.tiny:
            tiny_cfg = {**spec.tiny_config, **pixels}
            model, processor = build_tiny_qwen25vl(tiny_cfg, seed=spec.seed, attn_implementation=spec.attn_implementation)
            return cls._from_tiny(spec, model, processor)
        min_pixels, max_pixels = _check_pixels(
            pixels.get("min_pixels", PAPER_MIN_PIXELS), pixels.get("max_pixels", PAPER_MAX_PIXELS)
        )
        if spec.options.get("processor") is not None:
            loader = config_processor_loader(spec)
            model, processor, weights = load_pretrained(spec, _model_class(), loader)
        else:
            model, processor, weights = _load_pretrained(spec, min_pixels, max_pixels)
        return cls(spec=spec, model=model, processor=processor, weights=weights, is_random_weights=False)

    @property
    def fetch_image_resize(self) -> bool:
        """Whether images are first resized as ``qwen_vl_utils.fetch_image`` does (config
        ``processor.fetch_image_resize``; false when the config has no ``processor`` block)."""
        return bool((self.spec.options.get("processor") or {}).get("fetch_image_resize", False))

    # ------------------------------------------------------------------ family specifics
    @property
    def _factor(self) -> int:
        ip = self.processor.image_processor
        return int(ip.patch_size) * int(ip.merge_size)

    @property
    def min_pixels(self) -> int:
        """Smallest resized image area (px), ``image_processor.size["shortest_edge"]``."""
        return int(self.processor.image_processor.size["shortest_edge"])

    @property
    def max_pixels(self) -> int:
        """Largest resized image area (px), ``image_processor.size["longest_edge"]``."""
        return int(self.processor.image_processor.size["longest_edge"])

    @property
    def max_visual_tokens(self) -> int:
        """Most visual tokens one image can give: ``max_pixels // 28²`` (2048 for the paper setting)."""
        return self.max_pixels // (self._factor**2)

    @property
    def num_visual_tokens(self) -> int:
        """:attr:`max_visual_tokens` (the count is per image: see :meth:`visual_tokens_for`)."""
        return self.max_visual_tokens

    def describe(self) -> dict[str, Any]:
        """Base provenance plus ``min_pixels`` / ``max_pixels`` (``num_visual_tokens`` is the maximum)."""
        return {**super().describe(), "min_pixels": self.min_pixels, "max_pixels": self.max_pixels}

    def visual_tokens_for(self, image: Image.Image) -> int:
        """Visual tokens ``image`` gives: ``smart_resize`` grid ``(h/14)·(w/14) / 2²``.

        Raises
        ------
        ValueError
            As :meth:`check_image`.
        """
        self.check_image(image)
        w, h = image.size
        patches = self.processor.image_processor.get_number_of_image_patches(h, w)
        return int(patches) // int(self.processor.image_processor.merge_size) ** 2

    def visual_token_counts(self, inputs: Mapping[str, Any]) -> list[int]:
        """Visual tokens of each image of processed ``inputs``: ``grid_t·grid_h·grid_w / merge_size²``.

        Parameters
        ----------
        inputs : mapping
            Processor outputs with ``image_grid_thw`` ``(num_images, 3)``.

        Returns
        -------
        list of int
            One count per image (what :meth:`encode_images` returns rows for).
        """
        merge = int(self.model.config.vision_config.spatial_merge_size) ** 2
        return [int(t * h * w) // merge for t, h, w in inputs["image_grid_thw"].tolist()]

    @property
    def visual_token_id(self) -> int:
        """``config.image_token_id`` (``<|image_pad|>``)."""
        return int(self.model.config.image_token_id)

    def check_image(self, image: Image.Image, index: int = 0) -> None:
        """Refuse images Qwen2.5-VL cannot encode as they are, with a one-line message.

        Raises
        ------
        ValueError
            A side below 28 px (one 2×2 merge of 14 px patches; ``smart_resize`` would blow the image
            up from almost nothing), or an aspect ratio above 200 (``smart_resize`` refuses it).
        """
        size = getattr(image, "size", None)
        if not (isinstance(size, tuple) and len(size) == 2):
            return  # not a PIL image: the processor validates it
        w, h = size
        f = self._factor
        if min(w, h) < f:
            raise ValueError(
                f"image {index} is {w}x{h} px, smaller than one {f}x{f} px merged patch "
                f"(Qwen2.5-VL needs both sides >= {f} px)"
            )
        if max(w, h) / min(w, h) > 200:
            raise ValueError(f"image {index} is {w}x{h} px: aspect ratio above 200, which Qwen2.5-VL refuses")

    def build_prompt(self, question: str, num_images: int = 1) -> str:
        """Qwen chat template with its default system prompt, images before the question.

        ``"<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n<|im_start|>user\\n"`` +
        ``"<|vision_start|><|image_pad|><|vision_end|>"`` per image + question +
        ``"<|im_end|>\\n<|im_start|>assistant\\n"`` (lmms-eval ``qwen2_5_vl_chat``: messages
        ``[image..., text]``, ``apply_chat_template(add_generation_prompt=True)``). A question that
        already holds ``<|image_pad|>`` placeholders is used as it is.

        Raises
        ------
        ValueError
            If ``question`` holds placeholders, but not ``num_images`` of them.
        """
        return qwen_prompt(question, num_images)

    def prepare_inputs(self, images: Sequence[Image.Image], prompt: str) -> Any:
        """Check the images (:meth:`check_image`), resize them as ``qwen_vl_utils.fetch_image`` when
        :attr:`fetch_image_resize` (:func:`apet_bench.models.inputs.qwen_fetch_image`), then the shared
        processor call (which resizes again under ``min_pixels`` / ``max_pixels``).

        Returns
        -------
        transformers.BatchFeature
            ``input_ids`` / ``attention_mask`` / ``mm_token_type_ids`` ``(1, seq_len)``,
            ``pixel_values`` ``(sum_i grid_t·grid_h·grid_w, 3·2·14·14)``, ``image_grid_thw``
            ``(num_images, 3)``.

        Raises
        ------
        ValueError
            For an image that is too small or too elongated (one line, naming its size).
        """
        for i, image in enumerate(images):
            self.check_image(image, i)
        if self.fetch_image_resize:
            from apet_bench.models.inputs import qwen_fetch_image

            images = [qwen_fetch_image(im, factor=self._factor) if hasattr(im, "resize") else im for im in images]
        return super().prepare_inputs(images, prompt)

    def encode_images(self, inputs: Mapping[str, Any]) -> list[torch.Tensor]:
        """Merger outputs per image: ``model.model.get_image_features(pixel_values, image_grid_thw)``.

        Returns
        -------
        list of torch.Tensor
            One ``(grid_t·grid_h·grid_w / 4, hidden_size)`` tensor per image, raster order.
        """
        out = self.model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"], return_dict=True)
        return list(out.pooler_output)

    # ------------------------------------------------------------------ structure for methods
    @property
    def vision_tower(self) -> nn.Module:
        """``model.model.visual`` (window-attention ViT; its ``merger`` is the 2×2 PatchMerger)."""
        return self.model.model.visual

    @property
    def vision_projector(self) -> nn.Module:
        return self.model.model.visual.merger

    def _split_vision_features(self, captured: list[torch.Tensor], inputs: Mapping[str, Any]) -> list[torch.Tensor]:
        """Undo the ViT's window permutation (per merge unit of 4 patches), then split per image."""
        from transformers.vision_utils import get_vision_window_index

        visual = self.model.model.visual
        grid = inputs["image_grid_thw"]
        feats = captured[0]  # (N, D_v), merge units in window order
        unit = int(visual.spatial_merge_size) ** 2
        window_index, _ = get_vision_window_index(
            grid, spatial_merge_size=visual.spatial_merge_size, window_size=visual.window_size, patch_size=visual.patch_size
        )
        units = feats.reshape(feats.shape[0] // unit, unit, feats.shape[-1])
        units = units[torch.argsort(window_index.to(feats.device))]
        return list(torch.split(units.reshape(feats.shape), grid.prod(-1).tolist()))

    def project_visual(self, features: torch.Tensor) -> torch.Tensor:
        """The 2×2 PatchMerger (``ln_q`` + MLP over 4 consecutive patches): ``(N, D_v) -> (N / 4, hidden_size)``.

        ``project_visual(vision_features(inputs)[i])`` equals ``encode_images(inputs)[i]``
        (``Qwen2_5_VisionTransformerPretrainedModel.forward``, ``models/qwen2_5_vl/modeling_qwen2_5_vl.py``).

        Parameters
        ----------
        features : torch.Tensor
            ``(N, D_v)`` pre-merger features in merge-unit order (rows ``4j .. 4j+3`` -> token ``j``).

        Raises
        ------
        ValueError
            If ``features`` is not 2-D or ``N`` is not a multiple of 4.
        """
        unit = int(self.model.model.visual.spatial_merge_size) ** 2
        if features.ndim != 2 or features.shape[0] % unit:
            raise ValueError(f"Qwen2.5-VL project_visual needs (N, D_v) with N a multiple of {unit}, got {tuple(features.shape)}")
        return self.model.model.visual.merger(features)

    def visual_segments(self, inputs: Mapping[str, Any]) -> list[VisualSegments]:
        """One ``"image"`` segment per image: all its tokens, ``grid=(grid_t, grid_h / 2, grid_w / 2)`` in raster order.

        ``grid_t·grid_h·grid_w / 4`` equals :meth:`visual_token_counts`. Positions are 3-D mRoPE
        (:attr:`position_encoding`): token ``j`` of the grid sits at (t, h, w) = its grid cell, offset
        by the text before it (``get_rope_index``). See :meth:`ModelAdapter.visual_segments`.

        Parameters
        ----------
        inputs : mapping
            Processor outputs with ``image_grid_thw`` ``(num_images, 3)``; ``input_ids`` optional.

        Returns
        -------
        list of VisualSegments
        """
        m = int(self.model.config.vision_config.spatial_merge_size)
        grids = [(int(t), int(h) // m, int(w) // m) for t, h, w in inputs["image_grid_thw"].tolist()]
        counts = [t * h * w for t, h, w in grids]
        starts = self._placeholder_starts(inputs, counts)
        return [
            VisualSegments(
                kind="image",
                index=i,
                num_tokens=n,
                segments=(VisualSegment("image", "image", 0, torch.arange(n), g, None, None),),
                start=starts[i],
            )
            for i, (g, n) in enumerate(zip(grids, counts))
        ]

    def feature_token_map(self, inputs: Mapping[str, Any]) -> list[torch.Tensor]:
        """``arange(N) // 4`` per image: each visual token merges 4 consecutive pre-merger patches
        (a 2×2 block: row ``4j + 2·dy + dx``). See :meth:`ModelAdapter.feature_token_map`."""
        unit = int(self.model.config.vision_config.spatial_merge_size) ** 2
        return [torch.arange(int(t * h * w)) // unit for t, h, w in inputs["image_grid_thw"].tolist()]

    def stage_one_inputs(
        self, inputs: Mapping[str, Any], selections: Sequence[VisualSelection], shrunk: ShrunkSequence
    ) -> dict[str, Any]:
        """Stage one's ``generate`` inputs with each kept token's mRoPE position kept (``docs/models.md``).

        ``get_rope_index`` on the original inputs gives the full-length (t, h, w) positions, and the
        kept columns are gathered (:func:`mrope_positions_for_kept`) into 4-row ``position_ids``.
        ``image_grid_thw`` and ``pixel_values`` are left out (the model would recompute positions
        from them), ``mm_token_type_ids`` is shrunk with the sequence, and ``model.model.rope_deltas``
        is set so decode positions continue at ``last position + 1`` on any path.

        The positions are also stored on the call's :class:`~apet_bench.core.SampleContext`
        (``stage_one_positions``), where the position guard on the LLM reads them.

        Returns
        -------
        dict
            ``input_ids`` / ``attention_mask`` / ``mm_token_type_ids`` ``(1, L')``, ``position_ids``
            ``(4, 1, L')`` and ``mm_encoder_outputs``.
        """
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        full_mask = inputs.get("attention_mask")
        full_pos, _ = self.model.model.get_rope_index(
            inputs["input_ids"],
            mm_token_type_ids=inputs["mm_token_type_ids"],
            image_grid_thw=inputs["image_grid_thw"],
            attention_mask=full_mask,
        )
        visual = shrunk.input_ids == self.visual_token_id
        position_ids = mrope_positions_for_kept(full_pos, shrunk.source_positions, shrunk.attention_mask, visual)
        mm_types = visual.to(inputs["mm_token_type_ids"].dtype)
        new_len = shrunk.attention_mask.long().sum(-1, keepdim=True)
        # Decode continues at max position + 1, i.e. at cache position + rope_deltas.
        self.model.model.rope_deltas = position_ids[1:].amax(dim=(0, 2)).unsqueeze(1) + 1 - new_len
        if position_ids.shape[0] != 4 or position_ids.shape[-1] != shrunk.input_ids.shape[1]:
            raise RuntimeError(f"Qwen2.5-VL stage 1 built position_ids {tuple(position_ids.shape)}, not (4, B, L')")
        gen_inputs: dict[str, Any] = {
            k: v
            for k, v in inputs.items()
            if k not in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids")
        }
        gen_inputs["input_ids"] = shrunk.input_ids
        gen_inputs["attention_mask"] = shrunk.attention_mask
        gen_inputs["mm_token_type_ids"] = mm_types
        gen_inputs["position_ids"] = position_ids
        gen_inputs["mm_encoder_outputs"] = {
            "image": BaseModelOutputWithPooling(pooler_output=[s.features for s in selections])
        }
        ctx = self.visual_context
        if ctx is not None:
            ctx.stage_one_positions = position_ids
        return gen_inputs

    def _check_positions(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Forward pre-hook on the LLM: after stage 1, every forward must get the 3-D mRoPE positions.

        A shrunk Qwen sequence without explicit ``position_ids`` runs silently with 1-D positions (``generate`` then builds 4 rows that all hold the 1-D text
        positions). The hook compares the prompt columns of ``position_ids`` with the ones stage 1
        built, and checks decode steps get 3 or 4 rows that continue past the prompt's last position.

        Raises
        ------
        RuntimeError
            For missing, 1-D or 2-D ``position_ids``, or prompt positions that are not the gathered
            (t, h, w) ones.
        """
        ctx = self.visual_context
        if ctx is None or not ctx.active or ctx.stage_one_positions is None:
            return
        pos = kwargs.get("position_ids")
        expected = ctx.stage_one_positions
        if pos is None or pos.ndim != 3 or pos.shape[0] not in (3, 4) or expected is None:
            shape = None if pos is None else tuple(pos.shape)
            raise RuntimeError(
                f"Qwen2.5-VL got position_ids {shape} after visual tokens were removed: "
                "3-D mRoPE positions (4, B, L) are required (1-D fallback refused)"
            )
        mrope = pos[-3:]
        length = expected.shape[-1]
        if pos.shape[-1] >= length:
            ok = torch.equal(mrope[..., :length].to(expected.device), expected[-3:])
        else:
            ok = bool((mrope.to(expected.device) > expected[-3:].amax(dim=(0, 2)).view(1, -1, 1)).all())
        if not ok:
            raise RuntimeError(
                "Qwen2.5-VL got position_ids that are not the kept tokens' original (t, h, w) positions "
                "after visual tokens were removed (1-D fallback refused)"
            )


def _model_class() -> type:
    from transformers import Qwen2_5_VLForConditionalGeneration

    return Qwen2_5_VLForConditionalGeneration


def _load_pretrained(spec: ModelSpec, min_pixels: int, max_pixels: int) -> tuple[nn.Module, Any, str]:
    """Load ``Qwen2_5_VLForConditionalGeneration`` and build its processor without torchvision.

    :func:`apet_bench.models.base.load_pretrained` with a ``processor_loader`` that assembles the
    processor from the checkpoint's tokenizer and ``Qwen2VLImageProcessorPil`` (``size={"shortest_edge":
    min_pixels, "longest_edge": max_pixels}``) with ``video_processor=None``, because ``AutoProcessor``
    would build the torchvision video processor.

    Raises
    ------
    ModelConfigError
        When the checkpoint cannot be found (one line).
    """
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    def processor_loader(source: str, common: Mapping[str, Any], model: nn.Module) -> Any:
        tokenizer = AutoTokenizer.from_pretrained(source, **common)
        # min_pixels / max_pixels kwargs too: the checkpoint's preprocessor_config.json holds its own
        # min_pixels / max_pixels (3136 / 12845056), which would override ``size`` otherwise.
        image_processor = Qwen2VLImageProcessorPil.from_pretrained(
            source,
            size={"shortest_edge": min_pixels, "longest_edge": max_pixels},
            min_pixels=min_pixels,
            max_pixels=max_pixels,
            **common,
        )
        return _processor_class()(
            image_processor=image_processor,
            tokenizer=tokenizer,
            video_processor=None,
            chat_template=getattr(tokenizer, "chat_template", None),
        )

    return load_pretrained(spec, Qwen2_5_VLForConditionalGeneration, processor_loader)
