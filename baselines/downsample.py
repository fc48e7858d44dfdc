"""``downsample``: the "resize so the visual-token count matches the budget" reference row (stage 1).

VTC-Bench and UniPruneBench find plain downsampling a strong baseline for visual-token compression
(docs/methods/index.md, anchors), so a fair table carries it beside ``random``. Implementation chosen
here, the same on all four models: **area (average) pooling of each unit's visual-token grid after the
projector**, ``H × W -> h × w`` (``torch.nn.functional.adaptive_avg_pool2d``: each output token is the
mean of the tokens of its cell), i.e. a box-filter resize of the token map. A unit is an image
(LLaVA-1.5, Video-LLaVA image: 24×24 / 16×16), a LLaVA-NeXT crop (base view and every grid crop, before
unpadding), a Video-LLaVA frame (16×16 patches; its [CLS] dropped) or a Qwen2.5-VL image / temporal slice
(the post-merger ``grid_h/2 × grid_w/2`` grid).

Not done (documented alternative): resizing the *image* itself (interpolated CLIP position embeddings
for LLaVA; smaller ``max_pixels`` for Qwen2.5-VL). It needs processor / position-embedding changes
inside the adapters (models/, not this file) and changes the vision encoder's cost as well.

Grid rounding (:func:`pool_shape`): the largest ``h · w <= b`` with ``h <= H``, ``w <= W`` and an aspect
distortion ``max((h/w)/(H/W), (H/W)/(h/w)) <= max_distortion`` (2 by default), ties to the least
distorted. Every paper budget is met exactly on square grids: 64 -> 8×8, 128 -> 16×8, 192 -> 16×12 (h × w),
32 -> 8×4 (NeXT 640/320/160 -> 128/64/32 per crop, Video-LLaVA 256 -> 32 per frame); other budgets land
on the nearest count below (e.g. 100 on 24×24 -> 10×10).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from apet_bench.budget import BudgetError
from apet_bench.methods.base import TokenCompressor, VisualSelection, register_method
from apet_bench.methods.records import OverheadContext
from apet_bench.methods.schedules import check_video_budget

__all__ = ["DownsampleCompressor", "cell_centres", "pool_grid", "pool_shape"]

#: LLaVA-NeXT sub-images in the budget convention (docs/methods/index.md: 640 = 5 × 128).
NEXT_SUB_IMAGES = 5


def pool_shape(b: int, H: int, W: int, max_distortion: float = 2.0) -> tuple[int, int]:
    """Output grid ``(h, w)`` for a budget of ``b`` tokens on an ``H × W`` token grid.

    The largest ``h · w <= b`` with ``1 <= h <= H``, ``1 <= w <= W`` and aspect distortion at most
    ``max_distortion``, ties broken by the least distortion then the larger ``h``; if no shape meets
    the distortion bound (``b`` tiny on an elongated grid), the bound is dropped.

    >>> pool_shape(64, 24, 24), pool_shape(128, 24, 24), pool_shape(192, 24, 24), pool_shape(32, 16, 16)
    ((8, 8), (16, 8), (16, 12), (8, 4))

    Raises
    ------
    ValueError
        For ``b < 1`` or an empty grid.
    """
    if b < 1 or H < 1 or W < 1:
        raise ValueError(f"downsample: cannot pool a {H}x{W} grid to {b} tokens")
    target = math.log(H / W)
    best: tuple[Any, ...] | None = None
    fallback: tuple[Any, ...] | None = None
    for h in range(1, H + 1):
        w = min(W, b // h)
        if w < 1:
            break
        for ww in range(w, 0, -1):
            dist = abs(math.log(h / ww) - target)
            key = (h * ww, -dist, h)
            if fallback is None or key > fallback[0]:
                fallback = (key, h, ww)
            if dist <= math.log(max_distortion) + 1e-12:
                if best is None or key > best[0]:
                    best = (key, h, ww)
                break
    chosen = best or fallback
    assert chosen is not None
    return int(chosen[1]), int(chosen[2])


def cell_centres(H: int, W: int, h: int, w: int) -> torch.Tensor:
    """``(h · w,)`` long raster index (in the ``H × W`` grid) of the centre token of each pooling cell.

    Cells as ``adaptive_avg_pool2d`` cuts them: rows ``[floor(i·H/h), ceil((i+1)·H/h))``.
    """
    def centres(n: int, m: int) -> list[int]:
        return [(math.floor(i * n / m) + math.ceil((i + 1) * n / m) - 1) // 2 for i in range(m)]

    ys, xs = centres(H, h), centres(W, w)
    return torch.tensor([y * W + x for y in ys for x in xs], dtype=torch.long)


def pool_grid(tokens: torch.Tensor, H: int, W: int, h: int, w: int) -> torch.Tensor:
    """Area-pool ``(H·W, D)`` raster tokens to ``(h·w, D)`` (mean over each cell; computed in fp32)."""
    x = tokens.float().T.reshape(1, -1, H, W)
    return F.adaptive_avg_pool2d(x, (h, w)).reshape(-1, h * w).T.to(tokens.dtype)


@register_method("downsample")
@dataclass
class DownsampleCompressor(TokenCompressor):
    """Pool each unit's visual-token grid to the budget (reference row; see the module docstring).

    Parameters
    ----------
    budget : int or float
        Visual tokens entering the LLM (every decoder layer carries the same count). Per unit ``b``:
        ``budget`` per image (LLaVA-1.5, Qwen2.5-VL, Video-LLaVA images), ``round(budget / 5)`` per
        LLaVA-NeXT crop, ``budget / num_frames`` per Video-LLaVA frame (must divide; per Qwen temporal
        slice ``budget / grid_t``); a float ``r``: ``round(r · H · W)`` per unit. ``b`` is clamped to
        ``H · W`` (no upsampling).
    max_distortion : float
        Aspect-distortion bound of :func:`pool_shape` (>= 1).
    seed : int
        Unused (deterministic).

    Raises
    ------
    BudgetError
        Without a budget.
    ValueError
        For ``max_distortion < 1``.

    Notes
    -----
    ``kept_indices``: the centre token of each pooling cell (:func:`cell_centres`; the pooled token
    stands in its place), indices into the visual's tokens, reported on LLaVA-1.5, Qwen2.5-VL (where they
    also give each pooled token its (t, h, w) mRoPE position) and Video-LLaVA. LLaVA-NeXT: ``None``
    (the pooled crops are laid out base view then grid crops, without unpadding or ``image_newline``
    tokens, as VisionZip's NeXT path; a crop's centre may be a patch that unpadding removed).
    """

    max_distortion: float = 2.0

    stage: ClassVar[str] = "vision"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.budget is None:
            raise BudgetError(f"method {self.name!r} needs a budget (an int token count or a float in (0, 1])")
        if isinstance(self.max_distortion, bool) or not isinstance(self.max_distortion, (int, float)) or self.max_distortion < 1:
            raise ValueError(f"method {self.name!r}: max_distortion {self.max_distortion!r} is not a number >= 1")

    def check_model_config(self, model_cfg: dict[str, Any]) -> None:
        """Refuse a Video-LLaVA video budget that is not a multiple of the frames, before loading.

        Raises
        ------
        BudgetError
            One line (:func:`check_video_budget`).
        """
        super().check_model_config(model_cfg)
        check_video_budget(self.name, self.budget, model_cfg)

    @property  # type: ignore[override]
    def needs_vision_features(self) -> bool:  # type: ignore[override]
        """Models with packed crops (LLaVA-NeXT) only: the per-crop grids come from the pre-projector crop features."""
        return self._adapter is not None and self._adapter.packs_crops

    def unit_budget(self, n_cells: int, share: float) -> int:
        """Tokens for a unit of ``n_cells`` grid tokens that gets ``share`` of an int budget."""
        if isinstance(self.budget, int):
            b = int(round(self.budget * share))
        else:
            b = int(round(float(self.budget) * n_cells))
        return max(1, min(n_cells, b))

    def _pool(self, tokens: torch.Tensor, H: int, W: int, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        h, w = pool_shape(b, H, W, float(self.max_distortion))
        return pool_grid(tokens, H, W, h, w), cell_centres(H, W, h, w)

    def flops_overhead(self, ctx: OverheadContext) -> dict[str, int]:
        """Area pooling of the projector output (``adaptive_avg_pool2d``, element-wise): every input
        element added once and every output element divided once, ``(n_in + n_out) · d`` with ``d`` the
        LLM width (``{"pooling": ...}``)."""
        return {"pooling": (ctx.visual_tokens_in + ctx.visual_tokens_llm) * ctx.hidden_size}

    def compress_visual(self, features: torch.Tensor, *, image_index: int) -> VisualSelection:
        """Pool the visual's grid(s) to the budget.

        Parameters
        ----------
        features : torch.Tensor
            ``(num_visual_tokens, hidden_size)`` projector output of the visual.
        image_index : int
            Its index in the sample.

        Returns
        -------
        VisualSelection
            ``(k, hidden_size)`` pooled tokens in raster order per unit; ``kept_indices`` as in the notes.
        """
        adapter = self._adapter
        ctx = self.visual_context
        if adapter is None or ctx is None:
            raise RuntimeError("downsample: compress_visual needs an open context (with method(adapter))")
        dev = features.device
        if adapter.packs_crops:
            vf = ctx.vision_features[image_index]  # (C, P, D_v): base view, then grid crops
            proj = adapter.project_visual(vf)  # (C, P, D)
            side = int(adapter.patches_per_side)
            if int(proj.shape[1]) != side * side:
                raise RuntimeError(f"downsample: NeXT crops of {proj.shape[1]} tokens are not a {side}x{side} grid")
            b = self.unit_budget(side * side, 1.0 / NEXT_SUB_IMAGES)
            out = [self._pool(proj[c], side, side, b)[0] for c in range(int(proj.shape[0]))]
            return VisualSelection(torch.cat(out).to(features.dtype), None)
        segs = ctx.segments[image_index]
        units = list(segs.segments)
        rows, idx = [], []
        if segs.kind == "video":
            nf = len(units)
            if isinstance(self.budget, int) and self.budget % nf:
                raise BudgetError(f"downsample: Video-LLaVA budget {self.budget} is not a multiple of its {nf} frames")
        for seg in units:
            t, H, W = seg.grid
            pos = seg.patch_positions  # drops a frame's [CLS]
            if int(pos.numel()) != t * H * W:
                raise RuntimeError(f"downsample: segment {seg.name!r} holds {pos.numel()} patches, not {t}x{H}x{W}")
            share = 1.0 / (t * len(units))
            for s in range(t):
                p = pos[s * H * W : (s + 1) * H * W]
                pooled, centres = self._pool(features.index_select(0, p.to(dev)), H, W, self.unit_budget(H * W, share))
                rows.append(pooled)
                idx.append(p[centres])
        return VisualSelection(torch.cat(rows).to(features.dtype), torch.cat(idx).to(dev))
