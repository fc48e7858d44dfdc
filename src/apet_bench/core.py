"""The contract every other layer builds on: value types, the compression stages and two Protocols.

``apet_bench.core`` imports only torch and the standard library. Model adapters (``apet_bench.models``),
methods (``apet_bench.methods``, ``apet_bench.baselines``) and the sequence surgeries
(``apet_bench.surgery``, ``apet_bench.llm_surgery``, ``apet_bench.attention``) import it and never
each other; the generate loop (``apet_bench.pipeline``) joins them, and everything user-facing
(evaluation, runner, FLOPs, latency, figures, scripts) sits above the pipeline. ``tests/test_layers.py``
walks the import graph and fails on an import that points up or sideways.

What lives here
---------------
* :class:`Stage` and the stage sets :data:`STAGES`, :data:`STAGE_ONE`, :data:`STAGE_TWO`;
* what a method returns: :class:`VisualSelection` (stage one), :class:`LLMSelection` (stage two),
  :class:`AttentionRequest` (attention rows a stage-two method asks for);
* what the surgeries and the pipeline pass around: :class:`ShrunkSequence`, :class:`GenerationOutput`;
* the visual-token structure a model exposes: :class:`VisualSegment`, :class:`VisualSegments`,
  :class:`SampleContext` (per generate call);
* :class:`VisualModel`, the only view of a model that methods get, and :class:`Compressor`, the view of a
  method that models, surgeries and the pipeline get. Both are ``typing.Protocol`` classes: the
  adapters (``apet_bench.models.base.ModelAdapter``) and methods (``apet_bench.methods.base.TokenCompressor``)
  satisfy them structurally.

The two compression stages are described in ``docs/models.md``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

__all__ = [
    "NUMERICS",
    "POSITION_ENCODINGS",
    "SEGMENT_KINDS",
    "STAGES",
    "STAGE_ONE",
    "STAGE_TWO",
    "AttentionRequest",
    "Compressor",
    "GenerationOutput",
    "LLMSelection",
    "RowSpec",
    "SampleContext",
    "ShrunkSequence",
    "Stage",
    "VisualContext",
    "VisualModel",
    "VisualSegment",
    "VisualSegments",
    "VisualSelection",
]


class Stage(StrEnum):
    """Where a method compresses. A ``str``: ``Stage.VISION == "vision"``.

    ``VISION`` is stage one (on the projector's output, before the LLM), ``LLM`` is stage two (inside the
    LLM's decoder layers during prefill), ``BOTH`` is the two together, ``NONE`` is no compression.
    """

    NONE = "none"
    VISION = "vision"
    LLM = "llm"
    BOTH = "both"


#: Stages a method may declare, as strings: ``("none", "vision", "llm", "both")``.
STAGES: tuple[str, ...] = tuple(s.value for s in Stage)
#: Stages for which the pipeline runs the stage-one surgery on the projector's output.
STAGE_ONE: frozenset[str] = frozenset({Stage.VISION, Stage.BOTH})
#: Stages for which the pipeline runs the stage-two surgery inside the LLM.
STAGE_TWO: frozenset[str] = frozenset({Stage.LLM, Stage.BOTH})
#: Values of every method's ``numerics`` parameter: ``"official"`` computes the method's dtype-sensitive
#: steps in the dtype and order of its official code (e.g. ApET's FPS in fp16, FastV's head mean of fp16
#: attention probabilities), ``"fp32"`` computes them in fp32. ``docs/numerics.md`` lists every method.
NUMERICS: tuple[str, ...] = ("official", "fp32")

@dataclass
class VisualSelection:
    """What a stage-1 method returns for one image.

    Attributes
    ----------
    features : torch.Tensor
        ``(num_kept, hidden_size)``: the visual tokens that enter the LLM for this image, in the order
        they take in the sequence. Kept tokens, merged tokens or new tokens are all allowed.
    kept_indices : torch.Tensor or None
        ``(num_kept,)`` long: for each row of ``features``, its index in the image's original visual
        tokens (``0 <= i < num_visual_tokens``), when the method keeps (or writes over) original tokens;
        ``None`` when the rows have no single original token (e.g. pooled tokens).
    reported_indices : torch.Tensor or None
        ``(num_kept,)`` long, only when ``kept_indices`` is ``None``: each row's original token index for
        accounting and figures (``samples.jsonl`` ``kept_indices``, token maps, positional bias), or
        ``-1`` for a row that is none of the model's visual tokens (VisionZip's [CLS] row on LLaVA-1.5);
        ``-1`` rows are left out of the recorded indices. Never used for positions.
    """

    features: torch.Tensor
    kept_indices: torch.Tensor | None = None
    reported_indices: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        """Number of visual tokens kept for this image (``features.shape[0]``)."""
        return int(self.features.shape[0])


@dataclass
class LLMSelection:
    """What a stage-2 method returns at a drop layer: the visual tokens kept from there on, per row.

    Attributes
    ----------
    keep_positions : torch.Tensor
        ``(batch_size, num_kept)`` long: per row, positions (columns of the drop layer's input
        sequence) of the visual tokens to keep; each must be one of that row's visual positions, none
        repeated. Every non-visual position (text, padding) is always kept. Rows keep the same count.
    hidden_states : torch.Tensor or None
        ``(batch_size, num_kept, hidden_size)``: new hidden states written over the kept visual tokens,
        row ``j`` over ``keep_positions[:, j]`` (merging methods: a kept token absorbs dropped ones);
        ``None`` keeps the layer's input hidden states.
    """

    keep_positions: torch.Tensor
    hidden_states: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        """Visual tokens kept per row (``keep_positions.shape[1]``)."""
        return int(self.keep_positions.shape[-1])

#: Query rows of an :class:`AttentionRequest`: ``"last"``, ``"all"``, an int or ints.
RowSpec = str | int | Sequence[int]


@dataclass(frozen=True)
class AttentionRequest:
    """Which attention probabilities a stage-2 method wants before a drop.

    Attributes
    ----------
    layer : int
        Decoder layer whose self-attention is read (FastV: ``K - 1``); must be below the drop layer.
    rows : str or int or sequence of int
        Query rows: ``"last"`` (the last token of the sequence, i.e. the last prompt token during
        prefill: left padding keeps it in the last column for every row), ``"all"``, an int or a
        sequence of ints (negative counts from the end), indices into that layer's prefill sequence.
    pre_drop : bool
        ``False`` (default, FastV): the rows are recorded while layer ``layer`` runs its prefill, so
        ``layer`` must lie before the drop layer. ``True`` (PyramidDrop, ``Cooperx521/PyramidDrop``
        ``llava/model/modeling_llama_pdrop.py`` ``pdrop_rank_drop``): ``layer`` is the drop layer K
        itself, and the rows are computed from layer K's ``input_layernorm``, q/k projections and RoPE
        applied to K's input **before** the drop (:meth:`AttentionRowCapture.probe`); layer K then
        runs on the reduced sequence as usual.
    numerics : {"fp32", "official"}
        How the rows are computed (:func:`attention_rows`): ``"fp32"`` (default) in float32,
        ``"official"`` as eager attention in the model's dtype (probabilities returned in that dtype).
    """

    layer: int
    rows: RowSpec = "last"
    pre_drop: bool = False
    numerics: str = "fp32"


@dataclass
class ShrunkSequence:
    """Token sequence after the placeholder runs were resized.

    Attributes
    ----------
    input_ids : torch.Tensor
        ``(batch_size, new_seq_len)`` long, left-padded.
    attention_mask : torch.Tensor
        ``(batch_size, new_seq_len)`` long, 0 on the left padding.
    source_positions : torch.Tensor
        ``(batch_size, new_seq_len)`` long: for each new column, the column of the original
        ``input_ids`` it comes from. A kept visual token maps to ``run_start + kept_index``; ``-1`` marks
        padding and visual tokens without an original index (``kept_indices is None``). Models with
        position ids tied to the original layout (Qwen2.5-VL mRoPE, docs/models.md) gather with it.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    source_positions: torch.Tensor


@dataclass
class GenerationOutput:
    """One sample's answer with its token accounting and wall times.

    Attributes
    ----------
    text : str
        Decoded new tokens only, special tokens skipped.
    output_ids : list of int
        The new token ids (prompt excluded).
    prompt_tokens : int
        Tokens entering the LLM at prefill (text + visual tokens, after stage 1).
    visual_tokens_in : int
        Visual tokens produced by the vision encoder + projector, summed over the sample's images,
        before compression.
    visual_tokens_llm : int
        Visual tokens entering the LLM, counted from the placeholder ids of the final ``input_ids``.
    layer_visual_tokens : list of int
        ``(num_layers,)``: visual tokens at the input of each decoder layer during prefill, measured
        with pre-hooks as ``visual_tokens_llm - (prompt_tokens - layer_seq_len)`` (stage-2 methods drop
        only visual tokens). For stage-1-only methods every entry equals ``visual_tokens_llm``.
    kept_indices : list of list of int or None
        Per image, indices into its original visual tokens of the kept tokens, when the method
        reports them.
    prefill_ms : float
        Wall time (ms) from the processed inputs on the device to the end of the prefill forward:
        vision encoder, projector, stage-1 compression and LLM prefill.
    total_ms : float
        Wall time (ms) from the same start to the end of decoding.
    preprocess_ms : float
        Wall time (ms) of prompt building, the processor and the host-to-device copy.
    kv_cache_tokens : list of int or None
        ``(num_layers,)``: tokens held in each layer's KV cache at the end of generation (they differ
        per layer under stage 2: ``[591, 591, 159, 159]``).
    planned_layer_visual_tokens : list of int or None
        ``(num_layers,)``: the method's plan (:meth:`~apet_bench.methods.TokenCompressor.plan`) for the
        visual tokens entering the LLM; equals ``layer_visual_tokens`` when the method keeps its plan.
    num_images : int
        Images in the sample.
    attention_backends : dict or None
        Which attention backend every decoder layer and vision-tower attention module used, and the
        attention the method computed itself (:func:`apet_bench.attention.attention_backends`).
    uncompressed : bool
        True when the sample's visual span was at or below the method's absolute (int) budget, so it
        kept all its visual tokens and the method was not applied (:func:`apet_bench.pipeline.within_budget`).
    logits : tuple of torch.Tensor or None
        Per generated token, ``(batch_size, vocab_size)`` logits, when ``output_logits=True`` was in
        ``generate_kwargs``; left out of :meth:`to_dict`.
    """

    text: str
    output_ids: list[int]
    prompt_tokens: int
    visual_tokens_in: int
    visual_tokens_llm: int
    layer_visual_tokens: list[int]
    kept_indices: list[list[int]] | None
    prefill_ms: float
    total_ms: float
    preprocess_ms: float = 0.0
    kv_cache_tokens: list[int] | None = None
    planned_layer_visual_tokens: list[int] | None = None
    num_images: int = 1
    attention_backends: dict[str, Any] | None = None
    logits: tuple[torch.Tensor, ...] | None = field(default=None, repr=False)
    uncompressed: bool = False

    @property
    def mean_layer_visual_tokens(self) -> float:
        """Average visual tokens per decoder layer during prefill (the paper's budget convention)."""
        if not self.layer_visual_tokens:
            return float(self.visual_tokens_llm)
        return sum(self.layer_visual_tokens) / len(self.layer_visual_tokens)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable fields (``logits`` dropped, ``mean_layer_visual_tokens`` added)."""
        out = asdict(self)
        out.pop("logits", None)
        out["mean_layer_visual_tokens"] = self.mean_layer_visual_tokens
        return out


# ---------------------------------------------------------------------- visual-token structure
#: Values of :attr:`VisualModel.position_encoding`.
POSITION_ENCODINGS: tuple[str, ...] = ("rope-1d", "mrope-3d")
#: Values of :attr:`VisualSegment.kind`.
SEGMENT_KINDS: tuple[str, ...] = ("image", "base", "sub_image", "frame")


@dataclass(frozen=True, eq=False)
class VisualSegment:
    """One unit a method budgets separately: a whole image, a NeXT sub-image, or a video frame.

    Positions index the visual's tokens in stage-1 order (the rows of
    ``ModelAdapter.encode_images(inputs)[i]``, i.e. the order of its placeholder run), not columns of
    ``input_ids``: use :meth:`VisualSegments.sequence_positions` for those.

    Attributes
    ----------
    name : str
        ``"image"`` (LLaVA-1.5, Qwen2.5-VL, Video-LLaVA images), ``"base"`` / ``"sub_image {i}"``
        (LLaVA-NeXT anyres, ``i`` = 1 .. rows·cols in raster order of the crop grid) or ``"frame {f}"``
        (Video-LLaVA, ``f`` = 0 .. num_frames-1).
    kind : str
        One of :data:`SEGMENT_KINDS`: ``"image"``, ``"base"``, ``"sub_image"``, ``"frame"``.
    index : int
        0 for ``image`` / ``base``, ``i`` for ``sub_image``, ``f`` for ``frame``.
    positions : torch.Tensor
        ``(n,)`` long, CPU, increasing: the segment's tokens among the visual's tokens.
    grid : tuple of int or None
        ``(t, h, w)``: the segment's patch tokens (CLS excluded) form a full ``t x h x w`` grid in
        raster order (LLaVA-1.5 ``(1, 24, 24)``; NeXT base view ``(1, 24, 24)``; Video-LLaVA frame
        ``(1, 16, 16)``; Qwen2.5-VL ``(grid_t, grid_h / 2, grid_w / 2)`` after the 2×2 merge).
        ``None`` when they do not (NeXT grid crops after ``unpad_image``).
    patches : torch.Tensor or None
        ``(n,)`` long, CPU: for each position, its patch index in raster order within the source
        crop's / frame's ``n_side x n_side`` patch grid, ``-1`` for a CLS token. ``None`` for Qwen2.5-VL
        (one token covers 4 patches: see :meth:`ModelAdapter.feature_token_map`).
    cls_position : int or None
        Position of the segment's CLS token (Video-LLaVA frames: ``f · 257``), else ``None``.
    """

    name: str
    kind: str
    index: int
    positions: torch.Tensor
    grid: tuple[int, int, int] | None = None
    patches: torch.Tensor | None = None
    cls_position: int | None = None

    @property
    def num_tokens(self) -> int:
        """Tokens in the segment (``positions.numel()``)."""
        return int(self.positions.numel())

    @property
    def patch_positions(self) -> torch.Tensor:
        """``(n - has_cls,)`` long: :attr:`positions` without the CLS token."""
        if self.cls_position is None:
            return self.positions
        return self.positions[self.positions != self.cls_position]


@dataclass(frozen=True, eq=False)
class VisualSegments:
    """Structure of one image's (or video's) visual tokens: its segments and where its run starts.

    Returned per visual by :meth:`ModelAdapter.visual_segments`. The segments' positions plus
    :attr:`newline_positions` partition ``range(num_tokens)`` (tested for every adapter).

    Attributes
    ----------
    kind : str
        ``"image"`` or ``"video"``.
    index : int
        Index of the visual in the sample (the ``image_index`` ``compress_visual`` receives).
    num_tokens : int
        Visual tokens of the visual entering the LLM uncompressed (rows of ``encode_images(inputs)[index]``).
    segments : tuple of VisualSegment
        LLaVA-1.5 / Qwen2.5-VL / Video-LLaVA image: one ``"image"`` segment. LLaVA-NeXT: ``"base"`` then
        ``"sub_image 1"`` .. ``"sub_image {rows·cols}"`` (a crop fully removed by unpadding has 0
        tokens). Video-LLaVA video: ``"frame 0"`` .. ``"frame 7"`` of 257 tokens, CLS first.
    newline_positions : torch.Tensor
        ``(num_newlines,)`` long, CPU: LLaVA-NeXT ``image_newline`` tokens (one per feature-grid row,
        in no segment; ApET and VisionZip keep them, docs/methods/apet.md); empty for other families.
    start : int
        Column of the visual's first placeholder in ``input_ids[0]`` of the processed inputs (before
        stage 1); ``-1`` when the inputs had no ``input_ids``.
    """

    kind: str
    index: int
    num_tokens: int
    segments: tuple[VisualSegment, ...]
    newline_positions: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    start: int = -1

    def __len__(self) -> int:
        return len(self.segments)

    def __iter__(self):
        return iter(self.segments)

    def __getitem__(self, i: int) -> VisualSegment:
        return self.segments[i]

    def sequence_positions(self, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Columns of ``input_ids[0]`` (processed inputs, before stage 1) of visual-token ``positions``.

        Parameters
        ----------
        positions : torch.Tensor, optional
            ``(n,)`` long indices into this visual's tokens (e.g. ``segment.positions``); default all
            ``num_tokens``.

        Returns
        -------
        torch.Tensor
            ``(n,)`` long, ``start + positions``. For stage 2 (after a stage-1 shrink, or with padding)
            use ``ModelAdapter.visual_positions`` on the sequence the LLM really receives.

        Raises
        ------
        ValueError
            If :attr:`start` is unknown (``-1``).
        """
        if self.start < 0:
            raise ValueError(f"visual {self.index}: start column unknown (inputs had no input_ids)")
        if positions is None:
            positions = torch.arange(self.num_tokens)
        return positions.to(torch.long) + self.start
class SampleContext:
    """The sample being generated, as methods and family hooks see it (one per generate call).

    Created by :func:`apet_bench.pipeline.generate` before the prompt is built, bound to the model as
    ``model.visual_context`` for the call, and read by methods as ``self.visual_context``
    (``TokenCompressor.visual_context``) in ``compress_visual`` or their stage-two hooks. Per-sample state
    of a model family (Video-LLaVA's visual kind, Qwen2.5-VL's stage-one positions) lives here, never on
    the long-lived model. Derived structure is computed lazily and at most once.

    Attributes
    ----------
    model : VisualModel
        The model answering (``adapter`` is the same object, kept for readability in family code).
    inputs : mapping or None
        The processed inputs (``VisualModel.prepare_inputs``), before stage one; ``None`` until the
        processor ran.
    kind : str
        ``"image"`` or ``"video"``: what the sample's visuals are (default: ``"video"`` when ``inputs``
        hold ``pixel_values_videos``).
    active : bool
        True while the generate call runs; family hooks that guard a call (Qwen2.5-VL's position check)
        do nothing once it is False.
    visual_tokens : list of torch.Tensor or None
        Stage one only: the projector outputs the method is compressing, one ``(n_i, hidden_size)``
        tensor per visual, set before the first ``compress_visual`` call and released after generation.
    stage_one_positions : torch.Tensor or None
        Position ids a family built for the shrunk sequence (Qwen2.5-VL: ``(4, 1, L')`` mRoPE rows), for
        its own checks during the call.
    """

    def __init__(self, model: VisualModel, inputs: Mapping[str, Any] | None = None, kind: str | None = None) -> None:
        self.model = model
        self.inputs = inputs
        if kind is None:  # transformers processors put video pixels under ``pixel_values_videos``
            kind = "video" if inputs is not None and inputs.get("pixel_values_videos") is not None else "image"
        self.kind = kind
        self.active = True
        self.visual_tokens: list[torch.Tensor] | None = None
        self.stage_one_positions: torch.Tensor | None = None
        self._segments: list[VisualSegments] | None = None
        self._vision_features: list[torch.Tensor] | None = None
        self._feature_token_map: list[torch.Tensor] | None = None

    @property
    def adapter(self) -> VisualModel:
        """The model answering (same as :attr:`model`)."""
        return self.model

    def _need_inputs(self) -> Mapping[str, Any]:
        if self.inputs is None:
            raise RuntimeError("the sample context has no processed inputs yet (the processor has not run)")
        return self.inputs

    @property
    def segments(self) -> list[VisualSegments]:
        """``model.visual_segments(inputs)`` (cached): one :class:`VisualSegments` per visual."""
        if self._segments is None:
            self._segments = self.model.visual_segments(self._need_inputs())
        return self._segments

    @property
    def vision_features(self) -> list[torch.Tensor]:
        """``model.vision_features(inputs)`` (cached): per visual, the pre-projector features. Already
        computed in the same vision-tower pass as the visual tokens when the method sets
        ``needs_vision_features``; otherwise the first access runs the vision tower a second time."""
        if self._vision_features is None:
            self._vision_features = self.model.vision_features(self._need_inputs())
        return self._vision_features

    @vision_features.setter
    def vision_features(self, value: list[torch.Tensor] | None) -> None:
        self._vision_features = value

    @property
    def feature_token_map(self) -> list[torch.Tensor]:
        """``model.feature_token_map(inputs)`` (cached): per visual, the token each feature row becomes."""
        if self._feature_token_map is None:
            self._feature_token_map = self.model.feature_token_map(self._need_inputs())
        return self._feature_token_map

    def release(self) -> None:
        """End of the call: drop the per-sample tensors (segments and inputs stay readable) and mark the
        context inactive."""
        self.visual_tokens = None
        self._vision_features = None
        self.stage_one_positions = None
        self.active = False


#: The earlier name of :class:`SampleContext`.
VisualContext = SampleContext


# ---------------------------------------------------------------------- the two Protocols
@runtime_checkable
class VisualModel(Protocol):
    """A loaded vision-language model as methods see it: every member a method may use.

    Implemented by ``apet_bench.models.base.ModelAdapter`` for LLaVA-1.5, LLaVA-NeXT, Qwen2.5-VL and
    Video-LLaVA (``docs/models.md``). Methods read capabilities (towers, projector, crop layout, whether
    tokens carry a [CLS] row) rather than a model family; family differences live in the adapters.

    Attributes
    ----------
    name : str
        Config name (``llava15``, ``tiny_qwen25vl``).
    family : str
        Model family, for records and per-model budget tables read from configuration only.
    position_encoding : str
        One of :data:`POSITION_ENCODINGS`.
    num_layers : int
        LLM decoder layers.
    decoder_layers : torch.nn.ModuleList
        The LLM's decoder layers (where stage-two hooks go).
    language_model : torch.nn.Module
        The LLM's decoder stack (its forward receives ``input_ids`` / ``inputs_embeds``,
        ``position_ids``, ``attention_mask``).
    vision_tower : torch.nn.Module
        The vision encoder of the sample's kind (Video-LLaVA: the image or the video tower).
    vision_towers : list of (str, torch.nn.Module)
        Every vision encoder with the visual kind it serves (``[("image", m)]``, Video-LLaVA
        ``[("image", m), ("video", m)]``).
    vision_projector : torch.nn.Module
        The module mapping pre-projector features to the LLM width (``multi_modal_projector``,
        Qwen2.5-VL's ``merger``).
    model : torch.nn.Module
        The HF ``*ForConditionalGeneration`` module (a stage-two method may hook its forward to read the
        prefill's ``input_ids``).
    num_visual_tokens : int
        Visual tokens per image without compression (576 for LLaVA-1.5).
    visual_context : SampleContext or None
        The sample being generated.
    dtype, device, attn_implementation
        Of the loaded model.
    """

    name: str
    family: str
    position_encoding: str
    visual_context: SampleContext | None
    model: nn.Module

    @property
    def num_layers(self) -> int: ...

    @property
    def decoder_layers(self) -> nn.ModuleList: ...

    @property
    def language_model(self) -> nn.Module: ...

    @property
    def vision_tower(self) -> nn.Module: ...

    @property
    def vision_towers(self) -> list[tuple[str, nn.Module]]: ...

    @property
    def vision_projector(self) -> nn.Module: ...

    @property
    def num_visual_tokens(self) -> int: ...

    @property
    def dtype(self) -> torch.dtype: ...

    @property
    def device(self) -> torch.device: ...

    @property
    def attn_implementation(self) -> str: ...

    @property
    def visual_kind(self) -> str:
        """``"image"`` or ``"video"``: the kind of the sample being generated."""
        ...

    @property
    def vision_feature_layer(self) -> int | list[int]:
        """The vision tower's hidden state the projector reads (negative: from the end)."""
        ...

    @property
    def has_cls_token(self) -> bool:
        """The vision tower emits a [CLS] token (False on Qwen2.5-VL)."""
        ...

    @property
    def features_per_token(self) -> int:
        """Pre-projector feature rows merged into one visual token (4 on Qwen2.5-VL, else 1)."""
        ...

    @property
    def packs_crops(self) -> bool:
        """Visual tokens are packed crops (LLaVA-NeXT anyres)."""
        ...

    @property
    def patches_per_side(self) -> int:
        """Side of one image's / crop's / frame's patch grid (24 for CLIP-336/14)."""
        ...

    def num_crops(self, inputs: Mapping[str, Any]) -> list[int]:
        """Per image, its crops (base view first) when :attr:`packs_crops`, else 1."""
        ...

    def crop_grids(self, inputs: Mapping[str, Any]) -> list[tuple[int, int]]:
        """Per image, ``(rows, cols)`` of its grid crops."""
        ...

    def pack_visual(self, crop_tokens: Sequence[torch.Tensor], inputs: Mapping[str, Any]) -> list[torch.Tensor]:
        """Per image, ``(num_crops, P, D)`` crop tokens packed into its span as the model does."""
        ...

    def encode_images(self, inputs: Mapping[str, Any]) -> list[torch.Tensor]:
        """Per visual, the ``(n_i, hidden_size)`` visual tokens after the vision encoder and projector."""
        ...

    def visual_positions(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> list[torch.Tensor]:
        """Per row of ``(batch, seq_len)`` ``input_ids``, the ``(n_b,)`` columns holding visual tokens."""
        ...

    def visual_segments(self, inputs: Mapping[str, Any]) -> list[VisualSegments]:
        """Per visual of processed ``inputs``, its :class:`VisualSegments`."""
        ...

    def vision_features(self, inputs: Mapping[str, Any]) -> list[torch.Tensor]:
        """Per visual, the vision tower's features before the projector (``(..., D_v)``)."""
        ...

    def feature_token_map(self, inputs: Mapping[str, Any]) -> list[torch.Tensor]:
        """Per visual, the visual token each row of :meth:`vision_features` becomes (``-1``: none)."""
        ...

    def project_visual(self, features: torch.Tensor) -> torch.Tensor:
        """``(..., D_v)`` pre-projector features to ``(..., hidden_size)`` visual tokens."""
        ...


@runtime_checkable
class Compressor(Protocol):
    """A compression method as models, surgeries and the pipeline see it.

    Implemented by ``apet_bench.methods.base.TokenCompressor`` (every registered method). ``with
    method(model):`` attaches its hooks to a :class:`VisualModel` and removes them on exit.

    Attributes
    ----------
    name : str
        Registry name.
    stage : str
        One of :data:`STAGES`.
    budget : int or float or None
        Visual tokens kept (int) or retention ratio in (0, 1] (float).
    needs_vision_features : bool
        Stage one reads ``visual_context.vision_features`` (computed in the same tower pass).
    """

    name: str
    stage: str
    budget: Any
    needs_vision_features: bool

    def __call__(self, model: VisualModel) -> contextlib.AbstractContextManager[Any]: ...

    def suspended(self, model: VisualModel) -> contextlib.AbstractContextManager[None]: ...

    def compress_visual(self, features: torch.Tensor, *, image_index: int) -> VisualSelection:
        """Stage one: ``(n, hidden_size)`` visual tokens of one visual to what enters the LLM."""
        ...

    def llm_layers(self) -> tuple[int, ...]:
        """Stage two: decoder layers at whose input visual tokens are dropped."""
        ...

    def llm_keep_count(self, num_visual_tokens: int, *, layer_idx: int) -> int: ...

    def select_llm_tokens(self, *args: Any, **kwargs: Any) -> LLMSelection: ...

    def attention_request(self, layer_idx: int) -> AttentionRequest | None: ...

    def plan(self, model: VisualModel, num_visual_tokens: int) -> list[int]:
        """``(num_layers,)``: visual tokens planned at the input of each decoder layer."""
        ...

