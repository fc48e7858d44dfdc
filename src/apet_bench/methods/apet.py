"""``apet``: ApET (Approximation-Error guided Token compression, CVPR 2026) on all four models, both stages.

The pure tensor parts (basis selection, ridge approximation error, top-K, similarity merge) are in
:mod:`apet_bench.apet`; this module places them in the models (docs/methods/apet.md):

* **vision stage** (stage 1, :meth:`ApETCompressor.compress_visual`): keeps ``1.5 × b`` tokens per unit,
  ``b`` the unit's share of the budget (a unit is an image, a LLaVA-NeXT sub-image, a Video-LLaVA frame);
* **LLM stage** (stage 2, :meth:`ApETCompressor.select_llm_tokens`): at the input of decoder layer ``K``
  (16 of 32 for the LLaVA family, 14 of 28 for Qwen2.5-VL: ``K = num_layers // 2``) keeps ``0.5 × b``
  per unit, on the hidden states, merged tokens written back as replacement hidden states.

So the equivalent average over decoder layers (docs/methods/index.md) is ``b``: LLaVA-1.5 budget 64 -> 96
visual tokens in layers 0-15 and 32 in layers 16-31.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from apet_bench.apet import (
    BASIS_METHODS,
    DEFAULT_RIDGE,
    VARIANTS,
    apet_compress,
    approximation_error_from_basis,
    complement_index,
    merge_dropped,
    rank_by_error,
    select_basis,
)
from apet_bench.budget import BudgetError
from apet_bench.methods.base import LLMSelection, TokenCompressor, VisualSelection, register_method
from apet_bench.methods.records import OverheadContext, TokenMap, TokenScores

__all__ = ["NEXT_SUB_IMAGES", "QWEN_LLM_RIDGE", "ApETCompressor", "apet_stage_flops", "default_drop_layer"]

#: Sub-images per LLaVA-NeXT image in the budget convention (docs/methods/index.md: 2880 = 5 × 576, base view
#: + 2×2 grid), so an int budget ``B`` is ``B / 5`` per sub-image (640 -> 128, official scripts).
NEXT_SUB_IMAGES = 5
#: Ridge ε of Qwen2.5-VL's LLM-stage ``layer_prune`` (``qwen/model/qwen2_5_vl_custom.py``, docs/methods/apet.md).
QWEN_LLM_RIDGE = 1e-1


def apet_stage_flops(n: int, d: int, keep: int, m: int) -> dict[str, int]:
    """FLOPs of one ApET compression of ``n`` tokens of width ``d`` to ``keep`` with ``m`` basis tokens.

    Terms (``apet_bench.apet`` and the official ``fps`` / ``linalg.solve`` / ``token_merging``;
    multiply-add = 2): FPS ``3·m·n·d`` (difference, square, accumulate per basis step); Gram ``2m²d``;
    right-hand sides ``S Xᵀ`` ``2mnd``; solve ``(2/3)m³ + 2m²n``; reconstruction ``A S`` ``2nmd``;
    error (residual, square, sum) ``3nd``; merge: cosine similarity of the ``n - keep`` dropped tokens
    against the ``keep - m`` targets ``2(n-keep)(keep-m)d`` + norms ``3nd`` + the means ``(n-keep)d``.
    Top-k, argmax and gathers are not counted.

    Returns
    -------
    dict
        ``{"fps", "solve", "error", "merge"}`` FLOPs.
    """
    if keep >= n or n <= 0:
        return {"fps": 0, "solve": 0, "error": 0, "merge": 0}
    m = min(m, keep)
    dropped, targets = n - keep, max(1, keep - m)
    return {
        "fps": 3 * m * n * d,
        "solve": 2 * m * m * d + 2 * m * n * d + int(2 * m**3 / 3) + 2 * m * m * n + 2 * n * m * d,
        "error": 3 * n * d,
        "merge": 2 * dropped * targets * d + 3 * n * d + dropped * d,
    }


def default_drop_layer(num_layers: int) -> int:
    """The LLM-stage layer ``K`` when ``layer`` is not set: ``num_layers // 2``.

    16 for the 32-layer LLaVA family and 14 for the 28-layer Qwen2.5-VL-7B, the paper's layers
    (§4 "Implementation Details"; official ``layer_list=[16]``); 2 on the 4-layer tiny models (the same
    fraction of depth).
    """
    return max(1, int(num_layers) // 2)


@dataclass
class _Unit:
    """One budget unit of the sample being generated (image, NeXT sub-image or video frame)."""

    n_in: int  # tokens before compression
    vision_keep: int  # vision-stage target (1.5 × b, or b for Video-LLaVA frames)
    llm_keep: int  # LLM-stage target (0.5 × b); 0 when there is no LLM stage
    n_kept: int = 0  # tokens of the unit that entered the LLM


@register_method("apet")
@dataclass
class ApETCompressor(TokenCompressor):
    """ApET, vision stage + LLM stage, with the official budget split and two variants.

    Parameters
    ----------
    budget : int or float
        The paper's budget ``B`` (equivalent average of visual tokens per decoder layer, docs/methods/index.md)
        or a retention ratio (Qwen2.5-VL's 20 % / 10 %). Per unit ``b``: ``B`` per image (LLaVA-1.5,
        Qwen2.5-VL, Video-LLaVA images), ``B / 5`` per sub-image (LLaVA-NeXT, :data:`NEXT_SUB_IMAGES`),
        ``B / num_frames`` per frame (Video-LLaVA videos; ``B`` must be a multiple of the frames); a float ``r``
        gives ``b = r ×`` the unit's tokens. The vision stage keeps ``1.5 b`` per unit, the LLM stage
        ``0.5 b`` per unit (int ``B``: ``round``; float: ``int(·)``, truncation as the official Qwen
        ``int(ratio × N)``), each at least 1 and at most what is there. Video-LLaVA videos have no LLM
        stage: ``b`` per frame at the vision stage.
    variant : {"official", "paper"}
        ``official`` (default) reproduces the released code (MaQianKun0/ApET @ 70cc01b), ``paper`` what the
        paper's text describes. Differences below.
    basis : {"fps", "dpc", "random"}
        Basis selection (Table 5); used at both stages.
    num_basis : int
        ``M`` (default 10; Table 6).
    layer : int or None
        LLM-stage layer ``K`` (at the input of decoder layer ``K``, i.e. after ``K`` layers); ``None``
        (default): :func:`default_drop_layer` = ``num_layers // 2`` (16 on LLaVA-7B, 14 on Qwen2.5-VL-7B,
        2 on the tiny 4-layer models).
    seed : int
        Seed of the CPU ``torch.Generator`` created on context entry (:meth:`reset`): FPS starts, DPC
        noise and random bases come from it, so the same seed gives the same kept tokens.

    Notes
    -----
    Per model (docs/methods/apet.md; ``[code]`` = read in the official code, ``[derived]`` = ours):

    * LLaVA-1.5: vision stage on CLIP ``hidden_states[-2]`` (pre-projector, 1024-d) of each image, then
      ``project_visual`` [code ``encode_images``]; LLM stage on the hidden states of the visual span at
      the input of layer K [code ``layer_prune``].
    * LLaVA-NeXT: vision stage per crop (base view + grid crops batched, pre-projector) [code], kept
      tokens packed by the model's own unpad / newline logic, ``image_newline`` tokens always kept
      [code]; a crop's kept tokens removed by ``unpad_image`` are gone (as in the official
      ``index_mask``), so the vision-stage count is ``≤ 1.5 b`` per sub-image.
    * Qwen2.5-VL: vision stage on the post-merger tokens (3584-d) [code]; kept tokens keep their
      original (t, h, w) mRoPE positions (the adapter) [code].
    * Video-LLaVA: videos per frame on the post-projector tokens (4096-d), no LLM stage [code
      ``encode_videos``]; images as LLaVA-1.5 [derived: the official fork compresses videos only].

    ``variant="official"`` vs ``"paper"`` (every difference, with its source):

    1. Basis placement (docs/methods/apet.md [code]): official writes the ``M`` basis vectors into the ``M``
       lowest-ranked of the ``K`` kept slots (vision stages: slots in ascending position, basis in
       selection order, boolean-mask pairing; LLaVA LLM stage: rank order) and merges dropped tokens
       into the ``K - M`` others only; paper (§3.3) keeps the basis tokens at their own positions and
       every kept token is a merge target.
    2. Qwen2.5-VL vision-stage slots get ``0.5·basis + 0.5·slot token`` (official [code]);
       paper: n/a (basis at own positions).
    3. Qwen2.5-VL LLM stage at layer 14 ([code]): official **off** (the call is commented out in
       the released code, so the scripts keep 30 % in every layer for a "20 %" budget); paper **on**
       (§4 "layer 14 for Qwen2.5-VL"), ridge ε = 1e-1 (:data:`QWEN_LLM_RIDGE`, the disabled code's
       value), kept tokens keep their original mRoPE positions.
    4. LLaVA-NeXT LLM stage ("NeXT bug" [code + VScan GitHub issue 6]): official compresses only the
       first ``1.5 b`` tokens of the visual span (the base view; ``image_token_list = [1.5 b, 0.5 b]``)
       to ``0.5 b``, every other token passes; paper: ApET over the whole visual span (newline tokens
       included as ordinary tokens) keeping ``Σ_units min(0.5 b, tokens of the unit)``. On LLaVA-1.5
       (one image) both give ``1.5 b -> 0.5 b``. Multi-image LLaVA-1.5 samples follow the same rule
       (official: first image's span only).
    5. Video-LLaVA layout ([code]): official per frame ``[CLS, b - M merge targets in descending-
       error order, M basis vectors in FPS order]`` over the 256 patch tokens (``b + 1`` per frame,
       ``B + num_frames`` in all: 264 for ``B = 256``), ``kept_indices`` reported when all rows are
       distinct tokens; paper: ApET over each frame's 257 tokens (CLS an ordinary token), ``b`` kept
       in position order (exactly ``B``: 256, "32 per frame", §4.2).
    6. DPC basis vectors: cluster means (official) vs the centre tokens (paper); random basis: with
       (official ``randint``) vs without replacement (paper). :func:`apet_bench.apet.select_basis`.
    7. ``M`` is clamped to ``K - 1`` (official: one merge target must remain) or ``K`` (paper).

    Positions after the LLM stage (LLaVA family, docs/methods/apet.md [code]): official renumbers the
    compacted sequence contiguously (``0..L'-1``) for layers ≥ K and shifts decode positions down by the
    removed count (:attr:`renumber_positions`, implemented by :mod:`apet_bench.llm_surgery`); paper keeps
    each kept token's original RoPE position (the paper does not say; FastV semantics).

    Basis sampling (``basis``, Table 5): official applies it to the vision stage only, the LLM stage
    hard-wires FPS (docs/methods/apet.md [code]); paper applies it at both stages.

    Same in both variants (official choices the paper leaves open): ridge normal-equation solve in fp32
    with ε = 1e-5, unnormalised features, cosine-similarity merge with a plain mean (docs/methods/apet.md).

    Numerics (``numerics``, both variants): ``"official"`` (default) computes as the official code
    (MaQianKun0/ApET @ 70cc01b): FPS in the dtype of the features it reads (fp16 for the LLaVA family
    and Video-LLaVA, bf16 for Qwen2.5-VL, so fp16 squared distances above 65504 overflow), the ridge
    solve and the error in fp32, and the basis write / blend and the merge in that dtype at the vision
    stages (``encode_images``, ``encode_videos``, Qwen's ``forward``) and in fp32 at the LLaVA LLM stage
    (``layer_prune`` merges after ``.float()``; Qwen's disabled LLM stage merges in bf16). ``"fp32"``
    computes every step in fp32. On fp32 models (the tiny ones) both give the same basis and kept set.

    Not implemented (differences from the official code that remain):

    * Official FPS starts unseeded (global RNG); here the start is drawn from a generator seeded with
      ``seed`` (:func:`apet_bench.apet.fps_start_index`).
    * Batch size 1 (as the official code): rows of a batch must keep the same counts.

    Examples
    --------
    >>> m = ApETCompressor(budget=64)
    >>> m.variant, m.basis, m.num_basis
    ('official', 'fps', 10)
    """

    variant: str = "official"
    basis: str = "fps"
    num_basis: int = 10
    layer: int | None = None  # type: ignore[assignment]  # an instance field here (ClassVar in the base)

    stage: ClassVar[str] = "both"
    #: Vision / LLM-stage shares of the per-unit budget (official split, docs/methods/apet.md).
    VISION_RATIO: ClassVar[float] = 1.5
    LLM_RATIO: ClassVar[float] = 0.5
    #: The budget is split per unit (1.5 b before K, 0.5 b after, per NeXT crop / video frame), so the last
    #: layers may hold more than b in all: the plan is the budget (apet_bench.testing's ``budget`` check).
    budget_accounting: ClassVar[str] = "plan"

    _generator: torch.Generator | None = field(default=None, init=False, repr=False, compare=False)
    _units: list[_Unit] = field(default_factory=list, init=False, repr=False, compare=False)
    _compressions: list[tuple[torch.Tensor, Any]] = field(default_factory=list, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.budget is None:
            raise BudgetError(f"method {self.name!r} needs a budget (an int token count or a float in (0, 1])")
        if self.variant not in VARIANTS:
            raise ValueError(f"method {self.name!r}: variant {self.variant!r} is not one of {list(VARIANTS)}")
        if self.basis not in BASIS_METHODS:
            raise ValueError(f"method {self.name!r}: basis {self.basis!r} is not one of {list(BASIS_METHODS)}")
        if isinstance(self.num_basis, bool) or not isinstance(self.num_basis, int) or self.num_basis < 0:
            raise ValueError(f"method {self.name!r}: num_basis {self.num_basis!r} is not an int >= 0")
        if self.layer is not None and (isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 1):
            raise ValueError(f"method {self.name!r}: layer {self.layer!r} is not an int >= 1 (or null for num_layers // 2)")

    # ------------------------------------------------------------------ lifecycle
    def reset(self) -> None:
        """Create the CPU generator seeded with :attr:`seed`; forget the last sample's units."""
        self._generator = torch.Generator(device="cpu").manual_seed(self.seed)
        self._units = []
        self._compressions = []

    @property
    def official(self) -> bool:
        """Whether :attr:`variant` is ``"official"``."""
        return self.variant == "official"

    @property  # type: ignore[override]
    def renumber_positions(self) -> bool:  # type: ignore[override]
        """Official: positions renumbered after the LLM stage (docs/methods/apet.md); paper: original positions."""
        return self.official

    @property  # type: ignore[override]
    def needs_vision_features(self) -> bool:  # type: ignore[override]
        """Pre-projector features for LLaVA-1.5 / NeXT / Video-LLaVA images; not for Qwen2.5-VL or videos."""
        adapter = self._adapter
        if adapter is None:
            return True
        if adapter.features_per_token > 1:  # merged tokens (Qwen2.5-VL): ApET runs on the tokens themselves
            return False
        return adapter.visual_kind != "video"

    # ------------------------------------------------------------------ budget arithmetic
    def _count(self, ratio: float, n: int, share: float) -> int:
        """Tokens to keep in a unit of ``n`` tokens: ``ratio × b``, at least 1, at most ``n``."""
        if isinstance(self.budget, int):
            k = int(math.floor(ratio * float(self.budget) * share + 0.5))
        else:
            k = int(ratio * float(self.budget) * n + 1e-9)
        return max(1, min(int(n), k))

    def _drop_layer(self, adapter: Any) -> int | None:
        """``K`` for ``adapter``'s current sample, or ``None`` without an LLM stage."""
        if adapter.features_per_token > 1 and self.official:
            return None  # the released code has the layer-14 call commented out (docs/methods/apet.md)
        if adapter.visual_kind == "video":
            return None  # Video-LLaVA: vision stage only (docs/methods/apet.md)
        return int(self.layer) if self.layer is not None else default_drop_layer(adapter.num_layers)

    def llm_layers(self) -> tuple[int, ...]:
        """``(K,)`` for the model this method is attached to (``()`` outside a context or without an LLM stage)."""
        if self._adapter is None:
            return ()
        k = self._drop_layer(self._adapter)
        return () if k is None else (k,)

    def llm_keep_count(self, num_visual_tokens: int, *, layer_idx: int) -> int:
        """Visual tokens kept at the LLM stage out of the ``num_visual_tokens`` present (this sample's units).

        Official (LLaVA family): ``n - span + min(0.5 b₀, span)``, ``span = min(1.5 b₀, n)`` (the first
        unit's numbers; docs/methods/apet.md). Paper: ``min(n, Σ_units min(0.5 b, n_kept))``.
        """
        n = int(num_visual_tokens)
        if n <= 0:
            return 0
        if not self._units:  # no stage-1 record (e.g. a direct call): one unit of n tokens
            ratio = self.LLM_RATIO if isinstance(self.budget, int) else self.LLM_RATIO / self.VISION_RATIO
            return self._count(ratio, n, 1.0)
        if self.official:
            first = self._units[0]
            span = min(first.vision_keep, n)
            return n - span + min(first.llm_keep, span)
        return max(1, min(n, sum(min(u.llm_keep, u.n_kept) for u in self._units)))

    def plan(self, adapter: Any, num_visual_tokens: int) -> list[int]:
        """Per decoder layer: the visual tokens after stage 1 up to ``K``, then :meth:`llm_keep_count`.

        Uses the units recorded while compressing the last sample (call after ``generate``).
        """
        k = self._drop_layer(adapter)
        n = int(num_visual_tokens)
        counts = []
        for i in range(adapter.num_layers):
            if k is not None and i == k and n > 0:
                n = min(n, self.llm_keep_count(n, layer_idx=i))
            counts.append(n)
        return counts

    def _apet(
        self, x: torch.Tensor, keep: int, *, basis: str | None = None, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        tokens, kept, info = apet_compress(
            x, keep, num_basis=self.num_basis, basis=basis or self.basis, variant=self.variant,  # type: ignore[arg-type]
            generator=self._generator, numerics=self.numerics, **kwargs,  # type: ignore[arg-type]
        )
        self._compressions.append((kept, info))
        return tokens, kept

    # ------------------------------------------------------------------ stage 1
    def compress_visual(self, features: torch.Tensor, *, image_index: int) -> VisualSelection:
        """Vision stage of one image / video (docs/methods/apet.md).

        Parameters
        ----------
        features : torch.Tensor
            ``(num_visual_tokens, hidden_size)`` projector output of the visual.
        image_index : int
            Its index in the sample (reads ``visual_context.segments[image_index]``).

        Returns
        -------
        VisualSelection
            Kept (merged) tokens in sequence order and their original indices (``None`` for an official
            Video-LLaVA layout whose rows repeat a token).
        """
        if self._generator is None:
            self.reset()
        if image_index == 0:
            self._units = []
            self._compressions = []
        adapter = self._adapter
        ctx = self.visual_context
        if adapter is None or ctx is None:
            raise RuntimeError("apet: compress_visual needs an open context on a model adapter (with method(adapter))")
        segments = ctx.segments[image_index]
        if adapter.features_per_token > 1:
            return self._vision_qwen(features)
        if segments.kind == "video":
            return self._vision_video(features, segments)
        if adapter.packs_crops:
            return self._vision_next(features, image_index)
        return self._vision_image(features, image_index)

    def _vision_image(self, features: torch.Tensor, image_index: int) -> VisualSelection:
        """LLaVA-1.5 (and Video-LLaVA images): ApET on the pre-projector features, then the projector."""
        adapter = self._adapter
        vf = self.visual_context.vision_features[image_index]  # (N, D_v)
        n = int(vf.shape[0])
        if n != int(features.shape[0]):
            raise RuntimeError(f"apet: {n} vision features for {features.shape[0]} visual tokens")
        unit = _Unit(n, self._count(self.VISION_RATIO, n, 1.0), self._count(self.LLM_RATIO, n, 1.0))
        tokens, kept = self._apet(vf.unsqueeze(0), unit.vision_keep)
        kept = kept[0]
        unit.n_kept = int(kept.numel())
        self._units.append(unit)
        if unit.vision_keep >= n:  # no-op: the projector output as it is
            return VisualSelection(features, torch.arange(n, device=features.device))
        out = adapter.project_visual(tokens[0].to(features.dtype))
        return VisualSelection(out.to(features.dtype), kept.to(features.device))

    def _vision_next(self, features: torch.Tensor, image_index: int) -> VisualSelection:
        """LLaVA-NeXT: ApET per crop (batched) on pre-projector features; pack; keep kept + newline tokens."""
        adapter = self._adapter
        ctx = self.visual_context
        vf = ctx.vision_features[image_index]  # (C, P, D_v)
        fmap = ctx.feature_token_map[image_index].to(vf.device)  # (C, P) packed position or -1
        C, P, _ = vf.shape
        share = 1.0 / NEXT_SUB_IMAGES
        vkeep = self._count(self.VISION_RATIO, P, share)
        lkeep = self._count(self.LLM_RATIO, P, share)
        tokens, kept = self._apet(vf, vkeep)  # (C, k, D_v), (C, k)
        full = vf.clone()
        if vkeep < P:
            full.scatter_(1, kept.unsqueeze(-1).expand(-1, -1, vf.shape[-1]), tokens.to(vf.dtype))
        projected = adapter.project_visual(full)
        sizes = ctx.inputs["image_sizes"][image_index : image_index + 1]
        packed = adapter.pack_visual([projected], {"image_sizes": sizes})[0]
        if int(packed.shape[0]) != int(features.shape[0]):
            raise RuntimeError(f"apet: packed {packed.shape[0]} tokens for an image of {features.shape[0]}")
        keep_mask = torch.zeros(int(features.shape[0]), dtype=torch.bool, device=fmap.device)
        pos = fmap.gather(1, kept.to(fmap.device))  # (C, k)
        for c in range(C):
            p = pos[c][pos[c] >= 0]
            keep_mask[p] = True
            self._units.append(_Unit(int((fmap[c] >= 0).sum()), vkeep, lkeep, int(p.numel())))
        newlines = ctx.segments[image_index].newline_positions.to(fmap.device)
        keep_mask[newlines] = True  # image_newline tokens are always kept (docs/methods/apet.md)
        idx = keep_mask.nonzero().flatten()
        return VisualSelection(packed.index_select(0, idx.to(packed.device)).to(features.dtype), idx.to(features.device))

    def _vision_qwen(self, features: torch.Tensor) -> VisualSelection:
        """Qwen2.5-VL: ApET on the post-merger tokens; official slots blend 0.5/0.5 with the basis."""
        n = int(features.shape[0])
        unit = _Unit(n, self._count(self.VISION_RATIO, n, 1.0), self._count(self.LLM_RATIO, n, 1.0))
        kwargs = {"basis_blend": 0.5} if self.official else {}
        tokens, kept = self._apet(features.unsqueeze(0), unit.vision_keep, **kwargs)
        unit.n_kept = int(kept.shape[1])
        self._units.append(unit)
        return VisualSelection(tokens[0].to(features.dtype), kept[0].to(features.device))

    def _vision_video(self, features: torch.Tensor, segments: Any) -> VisualSelection:
        """Video-LLaVA video: per frame, post-projector (docs/methods/apet.md)."""
        frames = list(segments.segments)
        F = len(frames)
        t = frames[0].num_tokens
        if any(f.num_tokens != t for f in frames) or F * t != int(features.shape[0]):
            raise RuntimeError("apet: Video-LLaVA frames must all hold the same number of tokens")
        x = features.view(F, t, -1)
        if isinstance(self.budget, int):
            per = [self.budget // F + (1 if f < self.budget % F else 0) for f in range(F)]
        else:
            per = [self._count(1.0, t - 1, 1.0)] * F
        if len(set(per)) > 1:
            raise BudgetError(
                f"apet: Video-LLaVA budget {self.budget} is not a multiple of its {F} frames (per-frame budgets differ)"
            )
        b = max(1, min(per[0], t - 1))
        for _ in range(F):
            self._units.append(_Unit(t, b, 0))
        if not self.official:  # paper: ApET over each frame's tokens (CLS included), position order
            tokens, kept = self._apet(x, b)
            for u in self._units[-F:]:
                u.n_kept = b
            offsets = (torch.arange(F, device=kept.device) * t).unsqueeze(1)
            return VisualSelection(tokens.reshape(F * b, -1), (kept + offsets).reshape(-1).to(features.device))
        # official: [CLS, b - M targets (descending error), M basis vectors (selection order)] per frame
        cls_pos = [f.cls_position - f.positions[0].item() if f.cls_position is not None else None for f in frames]
        c = cls_pos[0]
        patch_idx = torch.tensor([j for j in range(t) if j != c], device=features.device)
        patches = x.index_select(1, patch_idx)  # (F, t-1, D)
        n = int(patches.shape[1])
        M = min(self.num_basis, b - 1)
        sel = select_basis(patches, M, self.basis, self._generator, numerics=self.numerics)  # type: ignore[arg-type]
        error, _ = approximation_error_from_basis(patches, sel.vectors, DEFAULT_RIDGE, numerics=self.numerics)
        targets = rank_by_error(error, b - M)  # (F, T), descending error
        dropped = complement_index(targets, n)
        # official: merged in the model dtype (encode_videos casts to .half() before token_merging)
        merged, _, _ = merge_dropped(patches, targets, dropped, numerics=self.numerics)
        rows = [merged.float(), sel.vectors]
        idx_rows = [patch_idx[targets], patch_idx[sel.index]]
        if c is not None:
            rows.insert(0, x[:, c : c + 1].float())
            idx_rows.insert(0, torch.full((F, 1), c, dtype=torch.long, device=features.device))
        out = torch.cat(rows, dim=1).to(features.dtype)  # (F, b (+1), D)
        idx = torch.cat(idx_rows, dim=1) + (torch.arange(F, device=features.device) * t).unsqueeze(1)
        for u in self._units[-F:]:
            u.n_kept = int(out.shape[1])
        idx = idx.reshape(-1)
        kept_indices = idx if idx.unique().numel() == idx.numel() else None
        return VisualSelection(out.reshape(-1, out.shape[-1]), kept_indices)

    # ------------------------------------------------------------------ efficiency and figures
    @property
    def last_compressions(self) -> list[tuple[torch.Tensor, Any]]:
        """Every :func:`apet_bench.apet.apet_compress` call of the last sample, in order (vision stage,
        then the LLM stage at ``K``): ``(kept (B, K) long, ApETInfo)``, as returned (device unchanged)."""
        return list(self._compressions)

    def flops_overhead(self, ctx: OverheadContext) -> dict[str, int]:
        """ApET's own computation: each compression's FPS, ridge solve, error and merge
        (:func:`apet_stage_flops`, ``M`` = :attr:`num_basis`) at the vision stage (``n_in -> n_llm`` on
        the vision features) and at every LLM-stage drop (on the hidden states, width ``d``); plus, where
        a separate projector follows the vision encoder, re-projecting the kept pre-projector tokens
        (``projector_flops_per_token · n_llm``: our adapter projects every token, counted in the vision
        line; the official ``MaQianKun0/ApET`` code projects once). Keys ``vision_stage_<term>``,
        ``vision_stage_reprojection``, ``llm_stage_L<K>_<term>``."""
        m = int(self.num_basis)
        n_in, n_llm = ctx.visual_tokens_in, ctx.visual_tokens_llm
        out = {f"vision_stage_{k}": v for k, v in apet_stage_flops(n_in, ctx.vision_feature_size, n_llm, m).items()}
        if ctx.projector_flops_per_token is not None and n_llm < n_in:
            out["vision_stage_reprojection"] = ctx.projector_flops_per_token * n_llm
        for drop in ctx.drops:
            for k, v in apet_stage_flops(drop.before, ctx.hidden_size, drop.after, m).items():
                out[f"llm_stage_L{drop.layer}_{k}"] = v
        return out

    def token_map(self, num_visual_tokens: int, kept_indices: list[int] | None) -> TokenMap | None:
        """Compose the merges of the last sample's vision stage and LLM stage into per-token roots.

        Reads :attr:`last_compressions`: the vision-stage call on ``(1, N, ·)`` (dropped token ->
        ``ApETInfo.target_index[assignment]``), then, if present, the layer-``K`` call over the stage-1
        tokens in sequence order (a stage-1 token merged there moves to its layer-``K`` target).

        Returns
        -------
        TokenMap or None
            Roots ``(N,)`` and ``stage1_kept`` (sorted original indices kept by the vision stage); ``None``
            when the calls are not one image's single-unit pattern (crops, frames, batched calls).
        """
        calls = [(kept.detach().cpu(), info) for kept, info in self.last_compressions]
        if not calls or calls[0][0].shape[0] != 1:
            return None
        kept1, info1 = calls[0]
        n = int(info1.error.shape[1]) if info1.error is not None else int(kept1.shape[1])
        if n != int(num_visual_tokens):
            return None
        roots = [-1] * n
        k1 = [int(x) for x in kept1[0].tolist()]
        for t in k1:
            roots[t] = t
        t1 = info1.target_index[0].cpu().tolist()
        for d, a in zip(info1.dropped_index[0].cpu().tolist(), info1.assignment[0].cpu().tolist()):
            roots[int(d)] = int(t1[int(a)])
        if len(calls) >= 2:
            kept2, info2 = calls[1]
            span = int(info2.error.shape[1]) if info2.error is not None else int(kept2.shape[1])
            span_tokens = k1[:span]  # layer-K rows are the stage-1 tokens in sequence order
            in_span = set(span_tokens)
            final = {span_tokens[j] for j in kept2[0].tolist()}
            remap = {t: t for t in k1 if t in final or t not in in_span}
            t2 = info2.target_index[0].cpu().tolist()
            for d, a in zip(info2.dropped_index[0].cpu().tolist(), info2.assignment[0].cpu().tolist()):
                remap[span_tokens[int(d)]] = span_tokens[int(t2[int(a)])]
            roots = [remap.get(r, -1) if r >= 0 else -1 for r in roots]
        return TokenMap(roots, stage1_kept=sorted(k1))

    def token_scores(self, adapter: Any, inputs: Any) -> TokenScores:
        """ApET's approximation error (paper §3.3 Eq. 4-5) of every token of the image from its
        :attr:`num_basis` basis tokens (:attr:`basis` selection, a CPU generator seeded with :attr:`seed`,
        as the vision stage's first call draws), on the features the vision stage reads: pre-projector
        vision features (first crop / frame) where a projector follows, else the visual tokens.

        Returns
        -------
        TokenScores
            ``(N,)`` fp32 errors, higher = harder to reconstruct = kept first.
        """
        with torch.inference_mode():
            if adapter.features_per_token == 1:  # pre-projector features map one-to-one to visual tokens
                feats = adapter.vision_features(inputs)[0]
                if feats.dim() == 3:
                    feats = feats[0]  # NeXT base view / first frame
            else:
                feats = adapter.encode_images(inputs)[0]
            x = feats.unsqueeze(0)
            basis = select_basis(x, self.num_basis, self.basis, torch.Generator().manual_seed(self.seed))
            err, _ = approximation_error_from_basis(x, basis.vectors)
        title = f"ApET approximation error\n(M={self.num_basis} {self.basis.upper()} basis, vision-stage features)"
        return TokenScores(self.name, title, [float(v) for v in err[0].float().cpu().tolist()])

    # ------------------------------------------------------------------ stage 2
    def select_llm_tokens(
        self,
        hidden_states: torch.Tensor,
        visual_positions: list[torch.Tensor],
        *,
        layer_idx: int,
        attention: torch.Tensor | None = None,
    ) -> LLMSelection:
        """LLM stage at layer ``K``: ApET on the visual span's hidden states, merged tokens written back.

        Parameters
        ----------
        hidden_states : torch.Tensor
            ``(batch_size, seq_len, hidden_size)`` input of layer ``K``.
        visual_positions : list of torch.Tensor
            Per row, the visual tokens' columns.
        layer_idx : int
            ``K``.
        attention : None
            Unused (ApET needs no attention weights).

        Returns
        -------
        LLMSelection
            ``keep_positions`` ``(batch_size, k)`` sorted, ``hidden_states`` ``(batch_size, k, hidden_size)``
            (merged / basis tokens; untouched tokens keep their input value).
        """
        if self._generator is None:
            self.reset()
        adapter = self._adapter
        qwen = adapter is not None and adapter.features_per_token > 1  # the official code's Qwen2.5-VL path
        ridge = QWEN_LLM_RIDGE if qwen else DEFAULT_RIDGE
        keep_rows, hid_rows = [], []
        for b, pos in enumerate(visual_positions):
            pos = pos.to(hidden_states.device)
            n = int(pos.numel())
            k = self.llm_keep_count(n, layer_idx=layer_idx)
            x = hidden_states[b].index_select(0, pos)  # (n, D)
            if self.official and self._units:
                span = min(self._units[0].vision_keep, n)
            else:
                span = n
            k_span = k - (n - span)
            if k_span >= span:
                keep_rows.append(pos)
                hid_rows.append(x)
                continue
            kwargs: dict[str, Any] = {"ridge": ridge}
            if self.official:
                kwargs["basis_slot_order"] = "rank"  # LLaVA LLM stage: index assignment (docs/methods/apet.md)
                kwargs["basis"] = "fps"  # the official LLM stage hard-wires FPS (docs/methods/apet.md)
            if not qwen:  # LLaVA layer_prune: FPS on the model-dtype hidden states, merge after .float()
                kwargs["merge_dtype"] = torch.float32
            tokens, kept = self._apet(x[:span].unsqueeze(0), k_span, **kwargs)
            keep_rows.append(torch.cat([pos[:span][kept[0]], pos[span:]]))
            hid_rows.append(torch.cat([tokens[0], x[span:]]))
        if len({int(r.numel()) for r in keep_rows}) > 1:
            raise ValueError(f"method {self.name!r}: rows keep different numbers of visual tokens; use batch size 1")
        return LLMSelection(torch.stack(keep_rows), torch.stack(hid_rows))
