"""LLaVA-NeXT adapter (``llava-hf/llava-v1.6-vicuna-7b-hf`` and the tiny random-weight variant).

Sequence layout (docs/methods/index.md, docs/models.md, ``models/llava_next/modeling_llava_next.py``):
vicuna_v1 prompt as for LLaVA-1.5 (``USER: <image>\\n{question} ASSISTANT:``). Anyres: the image is
resized to the best of ``image_grid_pinpoints`` and cut into ``rows x cols`` crops of ``image_size``
pixels, plus a down-scaled base view. Every crop goes through CLIP (``hidden_states[-2]``, CLS
dropped) and the projector (``n x n`` tokens each, n = image_size / patch_size = 24, 576 tokens).
``LlavaNextModel.pack_image_features`` then lays the crops out as one ``(rows·n) x (cols·n)`` feature
grid, removes the rows (or columns) that only cover the letterbox padding (``unpad_image``) and appends
one learned ``image_newline`` token after every grid row. The packed span of one image is::

    [base view: n² tokens, raster order] [grid row 0 ... image_newline] [grid row 1 ... image_newline] ...

so its length varies with the image size: 672 x 672 gives 576 + 48·49 = 2928 tokens, a 640 x 480
image 576 + 36·49 = 2340 (the papers' "2880 = 5 x 576" counts a fixed 672 x 672 input without
unpadding or newlines, docs/methods/index.md). Each ``<image>`` placeholder run in ``input_ids`` has
exactly the packed length, and every position of it (newline tokens included) is a visual token.

Stage 1 compresses the **packed** features (:meth:`LlavaNextAdapter.encode_images`): compressing per
crop before packing breaks its reshape (docs/models.md). Methods that budget per
sub-image (ApET, VisionZip, ToMe, docs/methods/) read :meth:`LlavaNextAdapter.visual_segments`
(the uniform interface: base / sub-image segments and newline positions) or the lower-level
:meth:`LlavaNextAdapter.visual_layout`, which maps every packed position back to its crop and patch.
Per-crop pre-projector features: ``vision_features`` -> ``project_visual`` -> ``pack_visual``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from apet_bench.models.base import (
    ModelAdapter,
    ModelConfigError,
    ModelSpec,
    VisualSegment,
    VisualSegments,
    register_adapter,
)
from apet_bench.models.inputs import with_official_ids
from apet_bench.models.llava15 import vicuna_v1_prompt
from apet_bench.models.loading import config_processor_loader, load_pretrained
from apet_bench.models.tiny import (
    TinyLlavaConfig,
    build_tiny_tokenizer,
    instantiate_tiny_model,
    tiny_llava_config_kwargs,
)

if TYPE_CHECKING:  # pragma: no cover - typing only
    from PIL import Image

__all__ = [
    "DEFAULT_GRID_SHAPES",
    "ImageLayout",
    "LlavaNextAdapter",
    "TinyLlavaNextConfig",
    "build_tiny_llava_next",
]

#: Crop grids ``(rows, cols)`` of the LLaVA-1.6 checkpoints: ``image_grid_pinpoints`` are these times
#: ``image_size`` (336 -> [[672, 336], [336, 672], [672, 672], [1008, 336], [336, 1008]] as (height, width)).
DEFAULT_GRID_SHAPES: tuple[tuple[int, int], ...] = ((2, 1), (1, 2), (2, 2), (3, 1), (1, 3))


@dataclass(frozen=True)
class ImageLayout:
    """Where one image's visual tokens are, after anyres packing (one per image of a sample).

    Positions index the image's packed span (0 = its first visual token; add :attr:`start` for a
    column of ``input_ids``). "Sub-image" 0 is the base (down-scaled full) view, 1..rows·cols the grid
    crops in raster order. After unpadding a crop keeps only the patch rows (or columns) that are not
    letterbox padding, so crops hold from 0 to n² tokens and their tokens are *not* contiguous: the
    grid is read row by row across all crops of a crop row, with a newline after each feature row.

    Attributes
    ----------
    start : int
        Column of the image's first placeholder in ``input_ids[0]`` (``-1`` when not known).
    source : torch.Tensor
        ``(num_tokens,)`` long, CPU: for each packed position, ``sub_image * tokens_per_crop + patch``
        (``patch`` in raster order within the crop's ``n x n`` patch grid), or ``-1`` for an
        ``image_newline`` token.
    tokens_per_crop : int
        ``n²`` tokens per crop before unpadding (576 for CLIP-336/14).
    crop_grid : tuple of int
        ``(rows, cols)`` of grid crops (from ``select_best_resolution`` over the pinpoints).
    feature_grid : tuple of int
        ``(height, width)`` of the unpadded feature grid in patches (newline tokens excluded):
        ``num_tokens = tokens_per_crop + height * (width + 1)``.
    """

    start: int
    source: torch.Tensor
    tokens_per_crop: int
    crop_grid: tuple[int, int]
    feature_grid: tuple[int, int]

    @property
    def num_tokens(self) -> int:
        """Visual tokens of the image entering the LLM uncompressed (base + unpadded crops + newlines)."""
        return int(self.source.numel())

    @property
    def num_sub_images(self) -> int:
        """``1 + rows * cols`` (base view + grid crops)."""
        return 1 + self.crop_grid[0] * self.crop_grid[1]

    @property
    def newline_positions(self) -> torch.Tensor:
        """``(feature_grid[0],)`` long: packed positions of the ``image_newline`` tokens."""
        return torch.nonzero(self.source < 0).flatten()

    @property
    def base_positions(self) -> torch.Tensor:
        """``(tokens_per_crop,)`` long: packed positions of the base view (``0 .. n²-1``)."""
        return self.sub_image_positions(0)

    def sub_image_positions(self, index: int) -> torch.Tensor:
        """Packed positions of sub-image ``index`` (0 = base), in packed (raster) order.

        Raises
        ------
        IndexError
            If ``index`` is not in ``[0, num_sub_images)``.
        """
        if not 0 <= index < self.num_sub_images:
            raise IndexError(f"sub-image {index} is out of range: the image has {self.num_sub_images}")
        valid = self.source >= 0
        return torch.nonzero(valid & (self.source // self.tokens_per_crop == index)).flatten()

    @property
    def segments(self) -> list[torch.Tensor]:
        """Packed positions per sub-image: ``[base, crop 0, crop 1, ...]`` (newline tokens in none)."""
        return [self.sub_image_positions(i) for i in range(self.num_sub_images)]


# ---------------------------------------------------------------------- tiny model
@dataclass(frozen=True)
class TinyLlavaNextConfig(TinyLlavaConfig):
    """Sizes of the tiny LLaVA-NeXT (``tiny_config`` in ``configs/model/tiny_llava_next.yaml``).

    The fields of :class:`~apet_bench.models.tiny.TinyLlavaConfig`, with a smaller default
    ``image_size`` (112 px / 14 -> 8 x 8 = 64 tokens per crop, so a sample is ~100-350 visual tokens
    and a generate takes tens of ms), plus the crop grids. ``image_size: 336`` gives the real
    LLaVA-1.6 geometry (576 per crop, up to 2928 packed tokens).

    Attributes
    ----------
    grid_shapes : tuple of (int, int)
        Crop grids ``(rows, cols)``; ``image_grid_pinpoints = [[rows * image_size, cols * image_size]]``
        (height, width), identical in the model config and the image processor.
    """

    image_size: int = 112
    grid_shapes: tuple[tuple[int, int], ...] = DEFAULT_GRID_SHAPES

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any] | None) -> TinyLlavaNextConfig:
        """Build from a (possibly partial) mapping; missing keys take the defaults.

        Raises
        ------
        ValueError
            For an unknown key, a non-positive size, inconsistent sizes or a malformed ``grid_shapes``.
        """
        cfg = dict(cfg or {})
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(cfg) - set(names))
        if unknown:
            raise ValueError(f"unknown tiny_config key(s) {', '.join(unknown)}; accepted: {', '.join(names)}")
        raw_shapes = cfg.pop("grid_shapes", DEFAULT_GRID_SHAPES)
        base = TinyLlavaConfig.from_mapping({"image_size": cls.image_size, **cfg})
        try:
            shapes = tuple((int(r), int(c)) for r, c in raw_shapes)
        except (TypeError, ValueError):
            raise ValueError(f"tiny_config grid_shapes {raw_shapes!r} must be a list of [rows, cols] pairs") from None
        if not shapes or any(r < 1 or c < 1 for r, c in shapes):
            raise ValueError(f"tiny_config grid_shapes {raw_shapes!r} must be a non-empty list of positive [rows, cols]")
        return cls(**base.to_dict(), grid_shapes=shapes)

    @property
    def image_grid_pinpoints(self) -> list[list[int]]:
        """``[[rows * image_size, cols * image_size], ...]`` (height, width) in pixels."""
        return [[r * self.image_size, c * self.image_size] for r, c in self.grid_shapes]


def build_tiny_llava_next(
    tiny_config: TinyLlavaNextConfig | Mapping[str, Any] | None = None,
    *,
    seed: int = 0,
    attn_implementation: str = "sdpa",
) -> tuple[Any, Any]:
    """A random-weight ``LlavaNextForConditionalGeneration`` and its ``LlavaNextProcessor``, built offline.

    Config: ``LlavaNextConfig(CLIPVisionConfig, LlamaConfig, image_grid_pinpoints, vision_feature_layer=-2,
    vision_feature_select_strategy="default")``; processor: ``LlavaNextProcessor(LlavaNextImageProcessorPil(
    shortest edge / crop = image_size, same image_grid_pinpoints, do_pad=True), tokenizer, patch_size,
    "default", num_additional_image_tokens=1)`` (docs/models.md). Weights re-initialised
    with :func:`~apet_bench.models.tiny.reinit_weights` (``image_newline`` included), the global RNG
    left as it was.

    Parameters
    ----------
    tiny_config : TinyLlavaNextConfig or mapping, optional
    seed : int
        Same seed -> identical ``state_dict``.
    attn_implementation : str

    Returns
    -------
    model : transformers.LlavaNextForConditionalGeneration
        fp32, CPU, eval mode.
    processor : transformers.LlavaNextProcessor
    """
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextProcessor
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    tc = tiny_config if isinstance(tiny_config, TinyLlavaNextConfig) else TinyLlavaNextConfig.from_mapping(tiny_config)
    tokenizer = build_tiny_tokenizer()
    pinpoints = tc.image_grid_pinpoints
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": tc.image_size},
        crop_size={"height": tc.image_size, "width": tc.image_size},
        image_grid_pinpoints=[list(p) for p in pinpoints],
        do_pad=True,
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=tc.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    config = LlavaNextConfig(
        **tiny_llava_config_kwargs(tc, tokenizer), image_grid_pinpoints=[list(p) for p in pinpoints]
    )
    model = instantiate_tiny_model(
        LlavaNextForConditionalGeneration,
        config,
        tokenizer,
        init_std=tc.init_std,
        seed=seed,
        attn_implementation=attn_implementation,
    )
    return model, processor


# ---------------------------------------------------------------------- adapter
@register_adapter("llava_next")
class LlavaNextAdapter(ModelAdapter):
    """LLaVA-NeXT / LLaVA-1.6 (CLIP ViT-L/14-336 + MLP projector + Vicuna, anyres) on ``LlavaNextForConditionalGeneration``.

    The number of visual tokens depends on the image size (module docstring):
    :attr:`num_visual_tokens` is the largest packed span any image can produce (2928 for the 7B
    model, the value budgets are validated against), :meth:`visual_layout` gives each input's
    actual spans and their sub-image structure. 32 decoder layers for the 7B model.

    Attributes
    ----------
    current_layouts : list of ImageLayout
        Layouts of the images of the input last prepared (:meth:`prepare_inputs`, called by
        :meth:`generate` before any compression): per-sub-image budgets read them.

    Examples
    --------
    >>> from apet_bench.models import load_model
    >>> adapter = load_model({"name": "tiny_llava_next", "family": "llava_next", "tiny": True})
    >>> adapter.num_visual_tokens, adapter.num_layers
    (336, 4)
    """

    packs_crops = True

    current_layouts: list[ImageLayout] = []  # noqa: RUF012 - replaced per instance by prepare_inputs

    #: CLIP ViT-L/14-336 of llava-v1.6-vicuna-7b-hf (its published config); patches per crop.
    reference_vision_tower = {"num_layers": 24, "feature_layer": -2, "patches": 576}

    @classmethod
    def tiny_vision_geometry(cls, tiny_config: Mapping[str, Any]) -> tuple[int, int, int]:
        """See :meth:`ModelAdapter.tiny_vision_geometry`."""
        tc = TinyLlavaNextConfig.from_mapping(tiny_config)
        return tc.vision_layers, tc.image_size, tc.patch_size

    @classmethod
    def from_spec(cls, spec: ModelSpec) -> LlavaNextAdapter:
        """Build the tiny model (``spec.tiny``) or load the checkpoint (``local_path`` or ``hf_id@revision``).

        Raises
        ------
        ModelConfigError
            When the checkpoint cannot be loaded, its processor's ``image_grid_pinpoints`` differ from
            the model's, or ``visual_tokens`` / ``num_layers`` do not match the model.
        ValueError
            For a bad ``tiny_config``.
        """
        if spec.tiny:
            model, processor = build_tiny_llava_next(
                spec.tiny_config, seed=spec.seed, attn_implementation=spec.attn_implementation
            )
            return cls._from_tiny(spec, model, processor)
        from transformers import LlavaNextForConditionalGeneration

        model, processor, weights = load_pretrained(
            spec, LlavaNextForConditionalGeneration, config_processor_loader(spec)
        )
        proc_pins = [list(p) for p in getattr(processor.image_processor, "image_grid_pinpoints", None) or []]
        model_pins = [list(p) for p in model.config.image_grid_pinpoints]
        if proc_pins != model_pins:
            raise ModelConfigError(
                f"processor image_grid_pinpoints {proc_pins} differ from the model's {model_pins} ({weights})"
            )
        return cls(spec=spec, model=model, processor=processor, weights=weights, is_random_weights=False)

    # ------------------------------------------------------------------ family specifics
    @property
    def tokens_per_crop(self) -> int:
        """Visual tokens of one crop before packing: ``patches_per_side²`` (+1 with the ``full`` strategy)."""
        n = self.patches_per_side**2
        if self.model.config.vision_feature_select_strategy == "full":
            n += 1
        return int(n)

    @property
    def num_visual_tokens(self) -> int:
        """Largest packed span of one image: base + the biggest pinpoint grid without unpadding, plus newlines.

        ``tokens_per_crop + max over pinpoints (h/image_size·n) · (w/image_size·n + 1)``: 2928 for the
        7B model (672 x 672), 336 for the tiny default. The actual count of an input is
        ``visual_layout(inputs)[i].num_tokens`` (never larger).
        """
        vc = self.model.config.vision_config
        n = self.patches_per_side
        best = 0
        for h, w in self.model.config.image_grid_pinpoints:
            rows, cols = (int(h) // vc.image_size) * n, (int(w) // vc.image_size) * n
            best = max(best, rows * (cols + 1))
        return self.tokens_per_crop + best

    @property
    def visual_token_id(self) -> int:
        """``config.image_token_id`` (the ``<image>`` placeholder; newline tokens use it too)."""
        return int(self.model.config.image_token_id)

    def build_prompt(self, question: str, num_images: int = 1) -> str:
        """vicuna_v1 prompt, as for LLaVA-1.5 (LLaVA-1.6-Vicuna evaluates with ``conv_mode=vicuna_v1``).

        ``"{system} USER: <image>\\n{question} ASSISTANT:"``; a question that already holds ``<image>``
        placeholders is used as it is.

        Raises
        ------
        ValueError
            If ``question`` holds placeholders, but not ``num_images`` of them.
        """
        return vicuna_v1_prompt(question, num_images, getattr(self.processor, "image_token", "<image>"))

    def prepare_inputs(self, images: Sequence[Image.Image], prompt: str) -> Any:
        """Check the images and the placeholders, then run the processor (see :meth:`ModelAdapter.prepare_inputs`).

        Returns
        -------
        transformers.BatchFeature
            ``input_ids`` / ``attention_mask`` ``(1, seq_len)``, ``pixel_values``
            ``(num_images, max_crops + 1, 3, image_size, image_size)``, ``image_sizes`` ``(num_images, 2)``
            (height, width).

        Sets :attr:`current_layouts` to ``visual_layout(inputs)``, so methods (which hold the adapter
        from ``attach``) can read the anyres structure of the sample being generated, e.g. in
        ``compress_visual(features, image_index=i)`` via ``adapter.current_layouts[i]``.

        Raises
        ------
        ValueError
            (one line) If the prompt does not hold one ``<image>`` placeholder per image, or an image is
            smaller than one patch (``patch_size`` pixels) on a side.
        """
        image_token = getattr(self.processor, "image_token", "<image>")
        present = prompt.count(image_token)
        if present != len(images):
            raise ValueError(
                f"prompt holds {present} {image_token} placeholder(s) for {len(images)} image(s): {prompt[-80:]!r}"
            )
        patch = int(self.model.config.vision_config.patch_size)
        for i, image in enumerate(images):
            w, h = image.size
            if w < patch or h < patch:
                raise ValueError(f"image {i} is {w}x{h} px, smaller than one {patch}x{patch} px patch")
        inputs = super().prepare_inputs(images, prompt)
        # Official ids (llava/mm_utils.py::tokenizer_image_token): <image> then "▁ \\n" whatever ``legacy`` says.
        inputs = with_official_ids(inputs, prompt, self.tokenizer, self.visual_token_id, image_token, self.processor).to(self.device)
        self.current_layouts = self.visual_layout(inputs) if len(images) else []
        return inputs

    def encode_images(self, inputs: Mapping[str, Any]) -> list[torch.Tensor]:
        """Packed projector outputs per image: ``model.model.get_image_features(...).pooler_output``.

        The vision tower and projector run on every crop, then ``pack_image_features`` unpads and adds
        the ``image_newline`` tokens, so stage-1 methods see (and may drop) newline tokens too.

        Parameters
        ----------
        inputs : mapping
            Processor outputs with ``pixel_values`` ``(num_images, max_crops + 1, 3, S, S)`` and
            ``image_sizes`` ``(num_images, 2)``.

        Returns
        -------
        list of torch.Tensor
            One ``(visual_layout(inputs)[i].num_tokens, hidden_size)`` tensor per image, in the order of
            the placeholder run.
        """
        out = self.model.model.get_image_features(
            pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"], return_dict=True
        )
        return list(out.pooler_output)

    def visual_layout(self, inputs: Mapping[str, Any]) -> list[ImageLayout]:
        """Per image, where its packed visual tokens come from (crop, patch, newline).

        Runs the model's own ``pack_image_features`` on crop/patch indices instead of features (no
        vision tower), so the layout is exactly the model's for every image size and pinpoint set.

        Parameters
        ----------
        inputs : mapping
            Processor outputs with ``image_sizes`` ``(num_images, 2)`` (height, width); ``input_ids``
            optional (gives :attr:`ImageLayout.start`).

        Returns
        -------
        list of ImageLayout
            One per image; ``sum(l.num_tokens)`` equals the placeholders in ``input_ids``.
        """
        from transformers.models.llava_next.modeling_llava_next import (
            get_anyres_image_grid_shape,
            image_size_to_num_patches,
        )

        cfg = self.model.config
        vc = cfg.vision_config
        tpc = self.tokens_per_crop
        sizes = inputs["image_sizes"]
        sizes = sizes.tolist() if isinstance(sizes, torch.Tensor) else [list(s) for s in sizes]
        ids = inputs.get("input_ids")
        placeholders = None
        if ids is not None:  # image i owns the next num_tokens placeholders (runs may touch each other)
            row = ids[0] if ids.dim() == 2 else ids
            placeholders = torch.nonzero(row.to("cpu") == self.visual_token_id).flatten()
        consumed = 0
        layouts = []
        for size in sizes:
            num_patches = image_size_to_num_patches(size, cfg.image_grid_pinpoints, vc.image_size)
            index = torch.arange(num_patches * tpc, dtype=torch.float64).view(num_patches, tpc, 1)
            packed, _ = self.model.model.pack_image_features(
                [index],
                torch.tensor([size]),
                vision_feature_select_strategy=cfg.vision_feature_select_strategy,
                image_newline=torch.tensor([-1.0], dtype=torch.float64),
            )
            source = packed[0][:, 0].round().long()
            rows, cols = get_anyres_image_grid_shape(size, cfg.image_grid_pinpoints, vc.image_size)
            newlines = int((source < 0).sum())
            height = newlines
            width = (int(source.numel()) - tpc - newlines) // max(newlines, 1)
            start = -1
            if placeholders is not None and consumed < placeholders.numel():
                start = int(placeholders[consumed])
            consumed += int(source.numel())
            layouts.append(
                ImageLayout(
                    start=start,
                    source=source,
                    tokens_per_crop=tpc,
                    crop_grid=(int(rows), int(cols)),
                    feature_grid=(height, width),
                )
            )
        return layouts

    # ------------------------------------------------------------------ structure for methods
    @property
    def vision_tower(self) -> nn.Module:
        """``model.model.vision_tower`` (``CLIPVisionModel``, ViT-L/14-336 for 7B), run on every crop."""
        return self.model.model.vision_tower

    @property
    def vision_projector(self) -> nn.Module:
        return self.model.model.multi_modal_projector

    def crop_grids(self, inputs: Mapping[str, Any]) -> list[tuple[int, int]]:
        """Per image, ``(rows, cols)`` of its grid crops (:meth:`visual_layout`)."""
        return [layout.crop_grid for layout in self.visual_layout(inputs)]

    def num_crops(self, inputs: Mapping[str, Any]) -> list[int]:
        """Per image, its crops: the base view plus ``rows × cols`` grid crops."""
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        cfg = self.model.config
        sizes = inputs["image_sizes"]
        sizes = sizes.tolist() if isinstance(sizes, torch.Tensor) else [list(x) for x in sizes]
        return [
            int(image_size_to_num_patches(size, cfg.image_grid_pinpoints, cfg.vision_config.image_size))
            for size in sizes
        ]

    def _split_vision_features(self, captured: list[torch.Tensor], inputs: Mapping[str, Any]) -> list[torch.Tensor]:
        return list(torch.split(captured[0], self.num_crops(inputs), dim=0))  # (sum crops, 576, D_v)

    def visual_segments(self, inputs: Mapping[str, Any]) -> list[VisualSegments]:
        """Per image: ``"base"`` then ``"sub_image 1"`` .. ``"sub_image {rows·cols}"``, plus the newlines.

        Re-expresses :meth:`visual_layout` (same packed positions: ``segments[i].positions ==
        layout.sub_image_positions(i)``); the base view has the full ``(1, n, n)`` grid, grid crops
        have ``grid=None`` (unpadding removes patch rows / columns; ``patches`` gives each kept
        token's patch in its crop). ``newline_positions`` are where ``image_newline`` sits.

        Parameters
        ----------
        inputs : mapping
            Processor outputs with ``image_sizes`` ``(num_images, 2)``; ``input_ids`` optional.

        Returns
        -------
        list of VisualSegments
        """
        n = self.patches_per_side
        default = self.model.config.vision_feature_select_strategy == "default"
        out = []
        for i, layout in enumerate(self.visual_layout(inputs)):
            segs = []
            for j in range(layout.num_sub_images):
                pos = layout.sub_image_positions(j)
                patches = layout.source[pos] % layout.tokens_per_crop
                name, kind = ("base", "base") if j == 0 else (f"sub_image {j}", "sub_image")
                grid = (1, n, n) if (j == 0 and default) else None
                segs.append(VisualSegment(name, kind, j, pos, grid, patches))
            out.append(
                VisualSegments(
                    kind="image",
                    index=i,
                    num_tokens=layout.num_tokens,
                    segments=tuple(segs),
                    newline_positions=layout.newline_positions,
                    start=layout.start,
                )
            )
        return out

    def feature_token_map(self, inputs: Mapping[str, Any]) -> list[torch.Tensor]:
        """Per image ``(num_crops, tokens_per_crop)``: packed position of each crop patch, ``-1`` if unpadded away.

        The inverse of :attr:`ImageLayout.source` (see :meth:`ModelAdapter.feature_token_map`).
        """
        out = []
        for layout, crops in zip(self.visual_layout(inputs), self.num_crops(inputs)):
            m = torch.full((crops * layout.tokens_per_crop,), -1, dtype=torch.long)
            valid = layout.source >= 0
            m[layout.source[valid]] = torch.nonzero(valid).flatten()
            out.append(m.view(crops, layout.tokens_per_crop))
        return out

    def pack_visual(self, crop_tokens: Sequence[torch.Tensor], inputs: Mapping[str, Any]) -> list[torch.Tensor]:
        """Pack projected crops as the model does: ``pack_image_features`` (unpad + ``image_newline``).

        ``pack_visual([project_visual(f) for f in vision_features(inputs)], inputs)`` equals
        :meth:`encode_images` (``models/llava_next/modeling_llava_next.py``).

        Parameters
        ----------
        crop_tokens : sequence of torch.Tensor
            Per image ``(num_crops, tokens_per_crop, hidden_size)`` (all crops, before packing).
        inputs : mapping
            Processor outputs with ``image_sizes``.

        Returns
        -------
        list of torch.Tensor
            Per image ``(visual_layout(inputs)[i].num_tokens, hidden_size)``.
        """
        packed, _ = self.model.model.pack_image_features(
            list(crop_tokens),
            inputs["image_sizes"],
            vision_feature_select_strategy=self.model.config.vision_feature_select_strategy,
            image_newline=self.model.model.image_newline,
        )
        return list(packed)
