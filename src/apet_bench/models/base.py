"""Model adapters: one loaded HF vision-language model behind :class:`~apet_bench.core.VisualModel`.

An adapter knows one model family: where the visual tokens are, how positions work, where the decoder
layers, vision towers and projector are, and how stage one's kept tokens re-enter ``generate``. It knows
nothing about methods: the generate loop that joins a model and a method is
:func:`apet_bench.pipeline.generate`, and per-sample state lives on the call's
:class:`~apet_bench.core.SampleContext`. Configuration checks are in :mod:`apet_bench.models.spec`,
checkpoint loading in :mod:`apet_bench.models.loading`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from apet_bench.core import (
    POSITION_ENCODINGS,
    SEGMENT_KINDS,
    Compressor,
    GenerationOutput,
    SampleContext,
    ShrunkSequence,
    VisualContext,
    VisualSegment,
    VisualSegments,
    VisualSelection,
)
from apet_bench.models.spec import (
    ATTN_IMPLEMENTATIONS,
    DTYPES,
    ModelConfigError,
    ModelSpec,
    check_attn_implementation,
    check_image_size,
    hub_offline,
    placeholder_prompt_body,
    resolve_device,
)

if TYPE_CHECKING:  # pragma: no cover - typing only
    from PIL import Image

__all__ = [
    "ATTN_IMPLEMENTATIONS",
    "DTYPES",
    "GenerationOutput",
    "ModelAdapter",
    "ModelConfigError",
    "ModelSpec",
    "POSITION_ENCODINGS",
    "SEGMENT_KINDS",
    "SampleContext",
    "VisualContext",
    "VisualSegment",
    "VisualSegments",
    "capture_module_input",
    "check_attn_implementation",
    "check_image_size",
    "get_adapter_class",
    "hub_offline",
    "placeholder_prompt_body",
    "register_adapter",
    "resolve_device",
]


@contextlib.contextmanager
def capture_module_input(module: nn.Module):
    """Context manager recording the first positional input of every forward of ``module``.

    Used to read pre-projector features (the input of ``multi_modal_projector`` / Qwen's ``merger``)
    in the same pass that computes the visual tokens; nothing about the forward changes.

    Yields
    ------
    list of torch.Tensor
        Appended to on each forward call.
    """
    captured: list[torch.Tensor] = []

    def hook(mod, args, kwargs):
        captured.append(args[0] if args else next(iter(kwargs.values())))

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield captured
    finally:
        handle.remove()


class ModelAdapter:
    """Base class of the model adapters (one per model family).

    Subclasses implement :meth:`from_spec`, :meth:`build_prompt`, :meth:`encode_images`,
    :attr:`decoder_layers`, :attr:`num_visual_tokens` and :attr:`visual_token_id`, and override the
    family hooks of the generate loop where they differ (:meth:`prepare_visuals`,
    :meth:`stage_one_placeholder_id`, :meth:`stage_one_inputs`).

    What methods read (the :class:`~apet_bench.core.VisualModel` Protocol, one interface for all four
    families):

    * :attr:`position_encoding`: ``"rope-1d"`` (LLaVA family) or ``"mrope-3d"`` (Qwen2.5-VL);
    * :meth:`visual_segments`: per visual, its tokens grouped per image / NeXT sub-image (+ newline
      positions) / video frame (CLS included), as indices into the stage-1 token order, with the
      run's ``start`` column;
    * :attr:`decoder_layers` / :attr:`num_layers` and :meth:`visual_positions` (stage 2);
    * :attr:`vision_tower`, :meth:`vision_features` (pre-projector), :meth:`feature_token_map` and
      :meth:`project_visual` (LLaVA-NeXT adds ``pack_visual``);
    * :attr:`visual_context` (a :class:`VisualContext`, also ``method.visual_context``): all of the
      above for the sample being generated, computed lazily once; a stage-1 method that sets
      ``needs_vision_features`` gets its vision features from the same tower pass as its tokens;
    * :attr:`vision_towers`, :attr:`vision_projector`, :attr:`language_model`: the modules a method may
      hook.

    Attributes
    ----------
    name, family : str
        Config name and family.
    model : transformers.PreTrainedModel
        The HF model, in eval mode.
    processor : transformers.ProcessorMixin
        Its processor (tokenizer + image processor).
    device : torch.device
        Where the model's parameters are.
    weights : str
        Provenance of the weights (``hf_id@revision``, ``local:/path``, or a random-init notice).
    is_random_weights : bool
        True for tiny random-init models: their outputs check the pipeline, never accuracy.
    spec : ModelSpec
        The validated config it was loaded from.
    """

    family: ClassVar[str] = ""
    #: How the LLM encodes positions: ``"rope-1d"`` (LLaVA-1.5 / NeXT / Video-LLaVA: Llama RoPE on
    #: 1-D ``position_ids``, the cumsum of the attention mask; a stage-1 shrink simply renumbers the
    #: kept tokens contiguously) or ``"mrope-3d"`` (Qwen2.5-VL: 3-D (t, h, w) mRoPE from
    #: ``get_rope_index``; the adapter keeps each kept visual token's original (t, h, w) position,
    #: docs/models.md). One of :data:`~apet_bench.core.POSITION_ENCODINGS`.
    position_encoding: ClassVar[str] = "rope-1d"
    #: The :class:`~apet_bench.core.SampleContext` of the sample being generated (bound by
    #: :func:`apet_bench.pipeline.generate` for the call and left readable after it; ``None`` before the
    #: first call).
    visual_context: SampleContext | None = None

    def __init__(
        self,
        *,
        spec: ModelSpec,
        model: nn.Module,
        processor: Any,
        weights: str,
        is_random_weights: bool,
    ) -> None:
        self.spec = spec
        self.name = spec.name
        self.model = model.eval()
        self.processor = processor
        self.weights = weights
        self.is_random_weights = is_random_weights
        self.device = next(model.parameters()).device
        if spec.visual_tokens is not None and spec.visual_tokens != self.num_visual_tokens:
            raise ModelConfigError(
                f"visual_tokens {spec.visual_tokens} does not match the model's {self.num_visual_tokens} visual tokens per image"
            )
        if spec.num_layers is not None and spec.num_layers != self.num_layers:
            raise ModelConfigError(
                f"num_layers {spec.num_layers} does not match the model's {self.num_layers} decoder layers"
            )

    # ------------------------------------------------------------------ to implement per family
    @classmethod
    def from_spec(cls, spec: ModelSpec) -> ModelAdapter:  # pragma: no cover - abstract
        """Load (or build, for ``tiny``) the model and processor described by ``spec``."""
        raise NotImplementedError

    @classmethod
    def _from_tiny(cls, spec: ModelSpec, model: nn.Module, processor: Any) -> ModelAdapter:
        """The adapter of a tiny random-weight ``model`` (the ``spec.tiny`` branch of :meth:`from_spec`).

        Moves ``model`` to ``spec.torch_device`` in ``spec.torch_dtype`` (fp32 when unset) and labels
        its weights ``"random-init tiny <ModelClass> (seed <seed>): a random-weight pipeline check, not
        an accuracy number"``, with ``is_random_weights=True``.

        Raises
        ------
        ModelConfigError
            When ``visual_tokens`` / ``num_layers`` of ``spec`` do not match the model.
        """
        dtype = spec.torch_dtype if spec.torch_dtype is not None else torch.float32
        model.to(device=spec.torch_device, dtype=dtype)
        weights = (
            f"random-init tiny {type(model).__name__} (seed {spec.seed}): "
            "a random-weight pipeline check, not an accuracy number"
        )
        return cls(spec=spec, model=model, processor=processor, weights=weights, is_random_weights=True)

    #: The full-size checkpoint's vision tower: ``{"num_layers", "feature_layer", "patches"}`` (encoder
    #: layers, the hidden state the projector reads, patch tokens per image / crop / frame, CLS excluded);
    #: ``None`` for a tower without that layout (Qwen2.5-VL's windowed ViT).
    reference_vision_tower: ClassVar[dict[str, int] | None] = None

    @classmethod
    def tiny_vision_geometry(cls, tiny_config: Mapping[str, Any]) -> tuple[int, int, int]:  # pragma: no cover
        """``(vision_layers, image_size, patch_size)`` of a tiny model built from ``tiny_config``.

        Raises
        ------
        NotImplementedError
            For a family without :attr:`reference_vision_tower`.
        """
        raise NotImplementedError(f"{cls.family}: no vision tower geometry")

    @classmethod
    def vision_tower_config(cls, model_cfg: Mapping[str, Any]) -> dict[str, int] | None:
        """The vision tower's geometry from a model config, without loading anything.

        For methods' checks before loading (``TokenCompressor.check_model_config``); added to the config
        as ``vision_tower`` by :func:`apet_bench.models.config_facts`. A real checkpoint's is
        :attr:`reference_vision_tower` (from its published config); a tiny model's comes from its
        ``tiny_config`` (:meth:`tiny_vision_geometry`).

        Returns
        -------
        dict or None
            ``{"num_layers": L, "feature_layer": h, "patches": P}``, or ``None`` without
            :attr:`reference_vision_tower`.
        """
        ref = cls.reference_vision_tower
        if ref is None:
            return None
        if not model_cfg.get("tiny"):
            return dict(ref)
        layers, size, patch = cls.tiny_vision_geometry(dict(model_cfg.get("tiny_config") or {}))
        return {"num_layers": layers, "feature_layer": ref["feature_layer"], "patches": (size // patch) ** 2}

    def build_prompt(self, question: str, num_images: int = 1) -> str:  # pragma: no cover - abstract
        """The model's prompt for ``question`` with ``num_images`` image placeholders."""
        raise NotImplementedError

    def encode_images(self, inputs: Mapping[str, Any]) -> list[torch.Tensor]:  # pragma: no cover - abstract
        """Visual tokens of each image after the vision encoder and projector.

        Returns
        -------
        list of torch.Tensor
            One ``(num_visual_tokens_i, hidden_size)`` tensor per image.
        """
        raise NotImplementedError

    @property
    def decoder_layers(self) -> nn.ModuleList:
        """The LLM's decoder layers (where stage-2 hooks go).

        Default: ``language_model.layers``, where every HF ``*ForConditionalGeneration``
        here keeps them (Llama decoder layers for the LLaVA families, Qwen2 ones for Qwen2.5-VL);
        override for another layout.
        """
        return self.language_model.layers

    @property
    def num_visual_tokens(self) -> int:  # pragma: no cover - abstract
        """Visual tokens per image entering the LLM without compression (576 for LLaVA-1.5)."""
        raise NotImplementedError

    @property
    def visual_token_id(self) -> int:  # pragma: no cover - abstract
        """Id of the visual placeholder token in ``input_ids``."""
        raise NotImplementedError

    def visual_positions(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> list[torch.Tensor]:
        """Positions of the visual tokens in each row of ``input_ids`` (where stage 2 may drop tokens).

        Families with several placeholder ids (Video-LLaVA's ``<image>`` and ``<video>``) or visual
        tokens that are not placeholders (e.g. ones the model inserts itself) override this; LLaVA-NeXT's
        ``image_newline`` tokens sit inside the ``<image>`` run, so the default covers them. The result
        must list, per row, every column stage 2 may drop, increasing, padding excluded.

        Parameters
        ----------
        input_ids : torch.Tensor
            ``(batch_size, seq_len)`` as the LLM receives them (after stage 1, if any).
        attention_mask : torch.Tensor, optional
            ``(batch_size, seq_len)``, 0 on padding.

        Returns
        -------
        list of torch.Tensor
            Per row, ``(num_visual_b,)`` long column indices on ``input_ids.device``. Default: the
            columns equal to :attr:`visual_token_id`.
        """
        hits = input_ids == self.visual_token_id
        if attention_mask is not None:
            hits = hits & attention_mask.bool()
        return [row.nonzero().flatten() for row in hits]

    # ------------------------------------------------------------------ visual-token structure for methods
    def visual_segments(self, inputs: Mapping[str, Any]) -> list[VisualSegments]:  # pragma: no cover - abstract
        """Per image (or video) of processed ``inputs``, where its visual tokens are and how they group.

        The interface ApET (docs/methods/apet.md), VisionZip (docs/methods/visionzip.md) and ToMe (docs/methods/tome.md) use to budget
        per image, per NeXT sub-image or per video frame. Positions index the visual's tokens in
        stage-1 order (rows of :meth:`encode_images`); :meth:`VisualSegments.sequence_positions`
        converts them to ``input_ids`` columns.

        Parameters
        ----------
        inputs : mapping
            :meth:`prepare_inputs` outputs (``input_ids`` optional; gives ``start``).

        Returns
        -------
        list of VisualSegments
            One per visual, in placeholder-run order; ``num_tokens`` equals the rows of
            ``encode_images(inputs)[i]``, and the segments plus ``newline_positions`` partition them.
        """
        raise NotImplementedError

    @property
    def vision_tower(self) -> nn.Module:  # pragma: no cover - abstract
        """The vision encoder whose hidden states :meth:`vision_features` returns (CLIP / ViT module)."""
        raise NotImplementedError

    @property
    def vision_towers(self) -> list[tuple[str, nn.Module]]:
        """Every vision encoder with the visual kind it serves: ``[("image", vision_tower)]`` by default
        (Video-LLaVA: its image and video towers)."""
        return [("image", self.vision_tower)]

    @property
    def vision_projector(self) -> nn.Module:  # pragma: no cover - abstract
        """The module mapping pre-projector features to the LLM width (``multi_modal_projector``;
        Qwen2.5-VL's ``merger``); its input are the :meth:`vision_features`."""
        raise NotImplementedError

    @property
    def visual_kind(self) -> str:
        """``"image"`` or ``"video"``: the kind of the sample being generated (its
        :class:`~apet_bench.core.SampleContext`), ``"image"`` outside a generate call."""
        ctx = self.visual_context
        return ctx.kind if ctx is not None and ctx.active else "image"

    @property
    def vision_feature_layer(self) -> int | list[int]:
        """The vision tower's hidden state the projector reads (``config.vision_feature_layer``; negative
        from the end: -2 is the output of the second-to-last layer)."""
        return self.model.config.vision_feature_layer

    # Capabilities methods branch on instead of a model family.
    #: The vision tower emits a [CLS] token (CLIP / LanguageBind towers); Qwen2.5-VL's ViT does not.
    has_cls_token: ClassVar[bool] = True
    #: Pre-projector feature rows merged into one visual token (1; Qwen2.5-VL's 2×2 merger: 4).
    features_per_token: ClassVar[int] = 1
    #: Visual tokens are crops packed by the model (LLaVA-NeXT anyres: base view + grid crops, unpadded,
    #: with newline tokens); methods that work per crop read :meth:`num_crops` / :meth:`crop_grids` and
    #: rebuild the span with :meth:`pack_visual`.
    packs_crops: ClassVar[bool] = False
    #: Kinds of visual the model takes (Video-LLaVA: images and videos).
    visual_kinds: ClassVar[tuple[str, ...]] = ("image",)

    @classmethod
    def config_num_frames(cls, model_cfg: Mapping[str, Any]) -> int | None:
        """Frames per video a model config declares (``None`` for a model without videos)."""
        return None

    @property
    def patches_per_side(self) -> int:
        """``image_size // patch_size`` of the vision tower: the side of one image's / crop's / frame's
        patch grid (24 for CLIP-336/14, 16 for LanguageBind-224/14)."""
        vc = self.model.config.vision_config
        return int(vc.image_size // vc.patch_size)

    def num_crops(self, inputs: Mapping[str, Any]) -> list[int]:
        """Per image, its crops (base view first) when :attr:`packs_crops`; else one per image.

        Raises
        ------
        NotImplementedError
            Never for the default (one crop per visual); families that pack crops override.
        """
        return [1 for _ in self.visual_segments(inputs)]

    def crop_grids(self, inputs: Mapping[str, Any]) -> list[tuple[int, int]]:
        """Per image, ``(rows, cols)`` of its grid crops (the base view excluded); ``(1, 1)`` by default."""
        return [(1, 1) for _ in self.visual_segments(inputs)]

    def pack_visual(self, crop_tokens: Sequence[torch.Tensor], inputs: Mapping[str, Any]) -> list[torch.Tensor]:
        """Pack per-crop tokens into each image's span as the model does (families with :attr:`packs_crops`).

        Raises
        ------
        NotImplementedError
            For a model that does not pack crops.
        """
        raise NotImplementedError(f"{self.family}: visual tokens are not packed crops")

    @property
    def language_model(self) -> nn.Module:
        """The LLM's decoder stack (``model.model.language_model``): its forward receives ``input_ids`` or
        ``inputs_embeds``, ``position_ids`` and ``attention_mask`` for every prefill and decode step."""
        return self.model.model.language_model

    def _split_vision_features(
        self, captured: list[torch.Tensor], inputs: Mapping[str, Any]
    ) -> list[torch.Tensor]:  # pragma: no cover - abstract
        """Per-visual pre-projector features from the captured projector input(s)."""
        raise NotImplementedError

    def encode_with_vision_features(
        self, inputs: Mapping[str, Any]
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """:meth:`encode_images` and :meth:`vision_features` from one vision-tower pass.

        The projector's (Qwen: the merger's) input is recorded with a forward pre-hook
        (:func:`capture_module_input`) while :meth:`encode_images` runs, so the visual tokens are
        bit-identical to :meth:`encode_images`'s and the tower runs once.

        Returns
        -------
        visual_tokens : list of torch.Tensor
            As :meth:`encode_images`.
        vision_features : list of torch.Tensor
            As :meth:`vision_features`.

        Raises
        ------
        RuntimeError
            If the projector did not run (no visuals in ``inputs``).
        """
        with capture_module_input(self.vision_projector) as captured:
            tokens = self.encode_images(inputs)
        if not captured:
            raise RuntimeError(f"{self.family}: the projector did not run; inputs hold no visuals")
        return tokens, self._split_vision_features(captured, inputs)

    def vision_features(self, inputs: Mapping[str, Any]) -> list[torch.Tensor]:
        """The vision tower's features per visual, **before** the projector (what ApET / VisionZip /
        ToMe compress on the vision side, docs/methods/apet.md).

        Exactly the projector's input in the HF forward (``vision_feature_layer`` /
        ``vision_feature_select_strategy`` of the config), split per visual:

        * LLaVA-1.5: CLIP ``hidden_states[-2]`` without CLS, ``(576, D_v)`` (D_v = 1024 for 7B);
        * LLaVA-NeXT: per crop, ``(num_crops, 576, D_v)`` (base view first, then the grid crops);
        * Video-LLaVA: image ``(256, D_v)`` without CLS; video ``(num_frames, 257, D_v)`` CLS first;
        * Qwen2.5-VL: ViT output before the merger, ``(grid_t·grid_h·grid_w, D_v)`` (D_v = 1280), in
          merge-unit order: rows ``4j .. 4j+3`` are the 2×2 patches of visual token ``j``.

        :meth:`feature_token_map` maps rows to visual tokens; :meth:`project_visual` maps them to the
        LLM width.

        Returns
        -------
        list of torch.Tensor
            One per visual, model dtype and device.
        """
        return self.encode_with_vision_features(inputs)[1]

    def feature_token_map(self, inputs: Mapping[str, Any]) -> list[torch.Tensor]:  # pragma: no cover - abstract
        """Per visual, which visual token each row of :meth:`vision_features` becomes.

        Returns
        -------
        list of torch.Tensor
            Long, CPU, shaped ``vision_features(inputs)[i].shape[:-1]``: index into the visual's
            tokens (stage-1 order), or ``-1`` for a feature with no token (NeXT patches removed by
            ``unpad_image``). Qwen2.5-VL: ``row // 4`` (four patches per token).
        """
        raise NotImplementedError

    def project_visual(self, features: torch.Tensor) -> torch.Tensor:
        """Map pre-projector features (as :meth:`vision_features` returns, possibly modified or
        subset) to LLM-width visual tokens: ``multi_modal_projector`` on the last dimension.

        LLaVA-1.5: ``(576, D_v) -> (576, D)``, equal to :meth:`encode_images`'s rows; NeXT:
        ``(num_crops, 576, D_v) -> (num_crops, 576, D)`` per crop before packing (see
        ``LlavaNextAdapter.pack_visual``); Video-LLaVA: ``(8, 257, D_v) -> (8, 257, D)`` (flatten the
        frames for :meth:`encode_images`'s order). Qwen2.5-VL overrides (the 2×2 merger).

        Parameters
        ----------
        features : torch.Tensor
            ``(..., D_v)`` in the model's dtype and device.

        Returns
        -------
        torch.Tensor
            ``(..., hidden_size)``.
        """
        return self.vision_projector(features)

    def _visual_context_for(self, inputs: Mapping[str, Any]) -> SampleContext:
        ctx = self.visual_context
        if ctx is not None and ctx.inputs is None:
            ctx.inputs = inputs
        elif ctx is None or ctx.inputs is not inputs:
            ctx = SampleContext(self, inputs)
            self.visual_context = ctx
        return ctx

    def stage_one_features(self, inputs: Mapping[str, Any], method: Compressor) -> list[torch.Tensor]:
        """The visual tokens a stage-1 method compresses, recorded on :attr:`visual_context`.

        :meth:`encode_images`, or, when ``method.needs_vision_features``, :meth:`encode_with_vision_features`
        (same tokens, one tower pass) with the vision features stored on the context so
        ``method.visual_context.vision_features`` costs nothing. Called by
        :func:`apet_bench.pipeline.apply_visual_stage`.

        Returns
        -------
        list of torch.Tensor
            One ``(num_visual_tokens_i, hidden_size)`` tensor per visual.
        """
        ctx = self._visual_context_for(inputs)
        if getattr(method, "needs_vision_features", False):
            tokens, ctx.vision_features = self.encode_with_vision_features(inputs)
        else:
            tokens = self.encode_images(inputs)
        ctx.visual_tokens = tokens
        return tokens

    def _placeholder_starts(self, inputs: Mapping[str, Any], counts: Sequence[int]) -> list[int]:
        """Column of each visual's first placeholder in ``input_ids[0]`` (visual ``i`` owns the next
        ``counts[i]`` visual positions); ``-1`` without ``input_ids``."""
        ids = inputs.get("input_ids") if hasattr(inputs, "get") else None
        if ids is None:
            return [-1] * len(counts)
        row = ids[:1] if ids.dim() == 2 else ids.view(1, -1)
        vis = self.visual_positions(row)[0].to("cpu")
        starts, consumed = [], 0
        for n in counts:
            starts.append(int(vis[consumed]) if consumed < vis.numel() else -1)
            consumed += int(n)
        return starts

    # ------------------------------------------------------------------ shared properties
    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the model's parameters."""
        return next(self.model.parameters()).dtype

    @property
    def attn_implementation(self) -> str:
        """Attention backend really in use (read back from ``model.config._attn_implementation``)."""
        return str(self.model.config._attn_implementation)

    @property
    def num_layers(self) -> int:
        """Number of LLM decoder layers."""
        return len(self.decoder_layers)

    @property
    def tokenizer(self) -> Any:
        """The processor's tokenizer."""
        return self.processor.tokenizer

    @property
    def pad_token_id(self) -> int:
        """Padding id (tokenizer pad, else eos)."""
        tok = self.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        return int(pad)

    def describe(self) -> dict[str, Any]:
        """Provenance of the loaded model, for results files."""
        return {
            "name": self.name,
            "family": self.family,
            "weights": self.weights,
            "is_random_weights": self.is_random_weights,
            "dtype": str(self.dtype).replace("torch.", ""),
            "attn_implementation": self.attn_implementation,
            "device": str(self.device),
            "num_visual_tokens": self.num_visual_tokens,
            "num_layers": self.num_layers,
        }

    # ------------------------------------------------------------------ pipeline pieces
    def clock(self) -> float:
        """``time.perf_counter()`` (s) after a device synchronisation (CUDA), for wall times."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    # ------------------------------------------------------------------ family hooks of the generate loop
    def prepare_visuals(self, images: Any) -> tuple[list[Any], str]:
        """The sample's visuals as the processor takes them, and their kind.

        Called first by :func:`apet_bench.pipeline.generate`. Default: a single PIL image becomes a
        one-element list, kind ``"image"``. Video-LLaVA decodes video paths to frames.

        Returns
        -------
        visuals : list
        kind : str
            ``"image"`` or ``"video"``; stored on the call's :class:`~apet_bench.core.SampleContext`.
        """
        if images is None:
            return [], "image"
        if not isinstance(images, Sequence) or isinstance(images, str):
            return [images], "image"
        return list(images), "image"

    def prepare_inputs(self, images: Sequence[Image.Image], prompt: str) -> Any:
        """Run the processor and move its outputs to the model (floating tensors cast to its dtype).

        Returns
        -------
        transformers.BatchFeature
            ``input_ids`` ``(1, seq_len)``, ``attention_mask`` ``(1, seq_len)``, ``pixel_values``
            ``(num_images, 3, H, W)`` (family-specific extras possible).
        """
        if images:
            inputs = self.processor(images=list(images), text=prompt, return_tensors="pt")
        else:
            inputs = self.processor(text=prompt, return_tensors="pt")
        return inputs.to(self.device, dtype=self.dtype)

    def stage_one_placeholder_id(self, inputs: Mapping[str, Any]) -> int:
        """The placeholder id whose runs stage one shrinks in ``inputs`` (default :attr:`visual_token_id`)."""
        return self.visual_token_id

    def stage_one_inputs(
        self, inputs: Mapping[str, Any], selections: Sequence[VisualSelection], shrunk: ShrunkSequence
    ) -> dict[str, Any]:
        """Stage one's ``generate`` inputs from the kept visual tokens and the shrunk sequence.

        Called by :func:`apet_bench.pipeline.apply_visual_stage` after the method chose the tokens and the
        placeholder runs were shrunk. Default: the processor outputs without pixels, ``input_ids`` /
        ``attention_mask`` of ``shrunk`` and ``mm_encoder_outputs`` in place of ``pixel_values``. Families
        whose position ids are tied to the layout (Qwen2.5-VL) or whose forward wants one tensor
        (Video-LLaVA) override this.

        Parameters
        ----------
        inputs : mapping
            Processor outputs before stage one.
        selections : sequence of VisualSelection
            Per visual, ``features`` ``(k_i, hidden_size)``.
        shrunk : ShrunkSequence
            ``(1, new_seq_len)`` ``input_ids`` / ``attention_mask`` / ``source_positions``.

        Returns
        -------
        dict
            ``input_ids`` / ``attention_mask`` ``(1, new_seq_len)`` and
            ``mm_encoder_outputs={"image": BaseModelOutputWithPooling(pooler_output=[(k_i, D), ...])}``.
        """
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        gen_inputs: dict[str, Any] = {
            k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask", "pixel_values", "image_sizes")
        }
        gen_inputs["input_ids"] = shrunk.input_ids
        gen_inputs["attention_mask"] = shrunk.attention_mask
        gen_inputs["mm_encoder_outputs"] = {
            "image": BaseModelOutputWithPooling(pooler_output=[s.features for s in selections])
        }
        return gen_inputs


# ---------------------------------------------------------------------- adapter registry
_ADAPTERS: dict[str, type[ModelAdapter]] = {}


def register_adapter(family: str) -> Callable[[type[ModelAdapter]], type[ModelAdapter]]:
    """Class decorator registering a :class:`ModelAdapter` subclass for ``family`` (sets ``cls.family``)."""

    def decorator(cls: type[ModelAdapter]) -> type[ModelAdapter]:
        cls.family = family
        _ADAPTERS[family] = cls
        return cls

    return decorator


def get_adapter_class(family: str) -> type[ModelAdapter]:
    """The adapter class for ``family``.

    Raises
    ------
    ModelConfigError
        For an unknown family, listing the known ones.
    """
    try:
        return _ADAPTERS[family]
    except KeyError:
        raise ModelConfigError(f"unknown model family {family!r}; available: {', '.join(sorted(_ADAPTERS))}") from None



