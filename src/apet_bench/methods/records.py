"""Typed records exchanged through the method hooks that serve the efficiency and figure tools.

* :class:`OverheadContext` is what :meth:`TokenCompressor.flops_overhead` reads: the full-size model's
  dimensions and the token counts of one prefill (``apet_bench.flops`` fills it; the method's formula
  lives next to its code).
* :class:`TokenScores` is what :meth:`TokenCompressor.token_scores` returns: the per-token score a
  method ranks one image's visual tokens by (``apet_bench.viz`` draws it beside the attention maps).
* :class:`TokenMap` is what :meth:`TokenCompressor.token_map` returns after one ``generate`` on a single
  image: which original visual tokens were kept, and which kept token each one was merged into
  (``apet_bench.viz`` draws it).

Both carry plain Python numbers and lists, so a method needs no knowledge of the tools that read them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

__all__ = ["LayerDrop", "OverheadContext", "TokenMap", "TokenScores"]


@dataclass(frozen=True)
class LayerDrop:
    """Visual tokens removed at the input of one decoder layer during prefill.

    Attributes
    ----------
    layer : int
        Decoder layer ``ℓ`` (0-based) whose input carries fewer visual tokens than layer ``ℓ - 1``'s.
    before : int
        Visual tokens at the input of layer ``ℓ - 1``.
    after : int
        Visual tokens at the input of layer ``ℓ``.
    """

    layer: int
    before: int
    after: int


@dataclass(frozen=True)
class OverheadContext:
    """Dimensions of a full-size model and the token counts of one prefill, for a FLOPs overhead formula.

    Units: widths are channels, counts are tokens. Built by ``apet_bench.flops`` from the published
    configuration of the checkpoint (no weights) and the per-layer plan of the method.

    Attributes
    ----------
    hidden_size : int
        LLM width ``d`` (4096 for Vicuna-7B, 3584 for Qwen2.5-7B).
    kv_hidden_size : int
        Width of the LLM's key / value projections ``d_kv = num_key_value_heads · head_dim``.
    num_layers : int
        Decoder layers ``D``.
    vision_hidden_size : int
        Width of the vision encoder's layers (1024 CLIP ViT-L/14, 1280 Qwen2.5-VL's ViT).
    vision_heads : int
        Attention heads of the vision encoder's layers.
    vision_has_cls : bool
        Whether the vision encoder carries a [CLS] token (CLIP towers; not Qwen2.5-VL's ViT).
    patches_per_token : int
        Vision-encoder patches per visual token (1 for CLIP towers; 4 for Qwen2.5-VL's 2 × 2 merger).
    vision_feature_size : int
        Width of the features a vision-stage method reads before the LLM: the vision encoder's output
        where a separate projector follows (LLaVA family), else the visual tokens' width (Qwen2.5-VL).
    projector_flops_per_token : int or None
        FLOPs of projecting one vision feature to the LLM width (``2(dv·d + d·d)`` for LLaVA's 2-layer
        MLP); ``None`` where the projector is fused into the encoder's merger (Qwen2.5-VL).
    text_tokens : int
        Text tokens of the prompt.
    text_tokens_before_image : int
        Of which before the visual span (system prompt and ``USER:``).
    visual_tokens_in : int
        Visual tokens from the vision encoder + projector, before compression.
    visual_tokens_llm : int
        Visual tokens entering the LLM (after any vision stage).
    layer_visual_tokens : tuple of int
        ``(D,)`` visual tokens at the input of every decoder layer.
    vision_layer_tokens : tuple of int or None
        Tokens ([CLS] included) at the input of every vision-encoder layer, when a method changes them
        inside the encoder; ``None`` otherwise.
    """

    hidden_size: int
    kv_hidden_size: int
    num_layers: int
    vision_hidden_size: int
    vision_heads: int
    vision_has_cls: bool
    patches_per_token: int
    vision_feature_size: int
    projector_flops_per_token: int | None
    text_tokens: int
    text_tokens_before_image: int
    visual_tokens_in: int
    visual_tokens_llm: int
    layer_visual_tokens: tuple[int, ...]
    vision_layer_tokens: tuple[int, ...] | None = None

    @property
    def drops(self) -> list[LayerDrop]:
        """Every decoder layer whose input holds fewer (or more) visual tokens than the layer before."""
        L = self.layer_visual_tokens
        return [LayerDrop(i, int(L[i - 1]), int(L[i])) for i in range(1, len(L)) if L[i] != L[i - 1]]

    @property
    def text_tokens_after_image(self) -> int:
        """Text tokens after the visual span (at least 1): the question and the assistant prefix."""
        return max(1, self.text_tokens - self.text_tokens_before_image)


@dataclass
class TokenMap:
    """Where every original visual token of one image ended up, as the method itself recorded it.

    Attributes
    ----------
    merge_roots : list of int
        ``(N,)`` for the image's ``N`` original visual tokens: the original index of the kept token whose
        features token ``i`` ended in (``i`` itself when kept; ``-1`` when discarded without merging).
    kept_indices : list of int or None
        Original indices of the tokens the method kept, when ``GenerationOutput.kept_indices`` has none
        (rows without a single original token, e.g. a cluster mean written as a new row); else ``None``.
    kept_source : str
        Where ``kept_indices`` came from (shown in the figure's JSON), when given.
    stage1_kept : list of int or None
        Two-stage methods: original indices kept by the vision stage (some dropped later in the LLM).
    """

    merge_roots: list[int]
    kept_indices: list[int] | None = None
    kept_source: str = ""
    stage1_kept: list[int] | None = field(default=None)

    @classmethod
    def from_groups(cls, kept: Sequence[int], rows: Sequence[int]) -> TokenMap:
        """Roots from a per-token row assignment: token ``i`` went into kept row ``rows[i]`` whose original
        index is ``kept[rows[i]]`` (``-1`` or out of range = discarded)."""
        return cls([int(kept[j]) if 0 <= j < len(kept) else -1 for j in rows])


@dataclass
class TokenScores:
    """The per-token score a method ranks one image's visual tokens by, on the uncompressed features.

    Attributes
    ----------
    method : str
        Registry name of the method that computed it.
    title : str
        Panel title (what the score is, on which features).
    values : list of float
        ``(N,)`` one score per original visual token of the image (first crop / frame where there are
        several), in the order of the features the method reads.
    """

    method: str
    title: str
    values: list[float]
