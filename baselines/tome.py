"""``tome``: Token Merging (ToMe, Bolya et al., ICLR 2023) inside the vision encoder, as an LLaVA baseline.

Source: docs/methods/tome.md and the official code (facebookresearch/ToMe @ af95e4b, read, not copied):
``tome/merge.py`` (``bipartite_soft_matching``, ``merge_wavg``, ``merge_source``), ``tome/patch/timm.py``
(``ToMeBlock``: merge **between attention and MLP**; ``ToMeAttention``: proportional attention and the
metric = keys averaged over heads). No official VLM integration exists (docs/methods/tome.md): the per-model
recipes below are the [derived] ones of docs/methods/tome.md

The pure functions (ToMe style, batched ``[B, T, C]``) come first; :class:`ToMeCompressor` places them:

* **CLIP towers** (LLaVA-1.5 per image, LLaVA-NeXT per crop, Video-LLaVA per image / per frame): every
  encoder layer up to the layer LLaVA reads (``vision_feature_layer``, ``hidden_states[-2]`` -> layers
  0..22 of 24) runs attention -> residual -> bipartite merge of ``r_l`` tokens -> MLP, [CLS] protected,
  token sizes carried across layers, proportional attention (``+ log size`` on the logits) through the
  backend's additive float mask (sdpa ``attn_mask``; eager adds it too; refused under flash_attention_2).
  The ``r_l`` schedule (:func:`r_schedule`) lands exactly on the budget at the feature layer.
* **Qwen2.5-VL** (window-attention ViT + 2x2 merger: merging inside the ViT conflicts with both,
  docs/methods/tome.md): bipartite soft matching on the post-merger tokens, several passes of at most 50 %
  each (:func:`pass_schedule`), size-weighted, each group keeping the (t, h, w) mRoPE position of its
  representative (destination) token.

Integration with the stage-1 path (no change to ``surgery.py`` / the adapters): the merged tower output
is **unmerged** after the projector (each original token takes its group's projected merged value, a
forward hook on the projector; the projector runs on the merged tokens only), so the adapter's
``encode_images`` / LLaVA-NeXT packing see the original layout; :meth:`ToMeCompressor.compress_visual`
then keeps one row per merged group, at its representative token, and reports those indices
(``kept_indices``) and the group of every original token (:attr:`ToMeCompressor.last_groups`).
"""

from __future__ import annotations

import math
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from apet_bench.budget import BudgetError, budget_to_tokens
from apet_bench.methods.base import TokenCompressor, VisualSelection, register_method
from apet_bench.methods.records import OverheadContext, TokenMap

__all__ = [
    "BipartiteMatch",
    "NEXT_SUB_IMAGES",
    "REMAINDERS",
    "ORDERS",
    "ToMeCompressor",
    "TowerGeometry",
    "bipartite_soft_matching",
    "kept_slots",
    "merge_tokens",
    "merge_wavg",
    "pass_schedule",
    "r_schedule",
    "slot_map",
]

#: Sub-images per LLaVA-NeXT image in the budget convention (docs/methods/index.md: 2880 = 5 x 576), so an int
#: budget ``B`` is ``B / 5`` patch tokens per crop (640/320/160 -> 128/64/32, docs/methods/tome.md "NeXT").
NEXT_SUB_IMAGES = 5
#: Where the remainder of ``R = removed tokens`` over ``L`` merging layers goes (one extra token per layer).
REMAINDERS: tuple[str, ...] = ("first", "last")
#: Output order of the kept tokens: ``merged`` = the tower's order after merging (official ToMe:
#: unmerged A tokens, then B tokens, per layer), ``spatial`` = sorted by representative index.
ORDERS: tuple[str, ...] = ("merged", "spatial")


# ====================================================================== pure functions (merge.py style)
@dataclass(frozen=True)
class BipartiteMatch:
    """One bipartite soft matching of ``t`` tokens (what ``tome/merge.py`` keeps in its closures).

    Tokens are split alternately: A = even indices ``0, 2, 4, ...`` (``ta = ceil(t / 2)``), B = odd indices
    (``tb = floor(t / 2)``). Each of the ``r`` merged A tokens goes into its most similar B token.

    Attributes
    ----------
    unm_idx : torch.Tensor
        ``(B, ta - r)`` long: indices into A of the unmerged A tokens (ascending when the first token is
        protected, so [CLS] stays first: official ``unm_idx.sort``), else in ascending-similarity order.
    src_idx : torch.Tensor
        ``(B, r)`` long: indices into A of the merged A tokens, most similar first.
    dst_idx : torch.Tensor
        ``(B, r)`` long: indices into B of their destinations.
    num_tokens : int
        ``t``.
    """

    unm_idx: torch.Tensor
    src_idx: torch.Tensor
    dst_idx: torch.Tensor
    num_tokens: int

    @property
    def r(self) -> int:
        """Tokens removed (``src_idx.shape[1]``)."""
        return int(self.src_idx.shape[1])

    @property
    def num_out(self) -> int:
        """Tokens after the merge: ``t - r``."""
        return self.num_tokens - self.r


def bipartite_soft_matching(
    metric: torch.Tensor, r: int, protect_first: bool = False, *, numerics: str = "fp32"
) -> BipartiteMatch:
    """ToMe's balanced bipartite soft matching (``tome/merge.py`` ``bipartite_soft_matching``).

    Cosine similarity of ``metric`` between A (even tokens) and B (odd tokens); each A token's best B
    edge; the ``r`` A tokens with the most similar best edge are merged into it. ``r`` is capped at
    ``(t - protected) // 2`` (at most 50 % per call), as the official code does.

    Parameters
    ----------
    metric : torch.Tensor
        ``(B, t, c)``: the matching metric (head-mean keys inside CLIP; post-merger features on Qwen).
    r : int
        Tokens to remove (``>= 0``).
    protect_first : bool
        Token 0 is [CLS]: its A row gets ``-inf`` similarity, so it is never merged, and the unmerged A
        tokens are sorted so it stays first (official ``class_token=True``).
    numerics : {"fp32", "official"}
        ``"fp32"``: normalisation and similarity in fp32 whatever the metric's dtype. ``"official"``: in
        the metric's dtype, as ``tome/merge.py`` runs inside an fp16 model.

    Returns
    -------
    BipartiteMatch

    Notes
    -----
    Ties in the edge ranking are broken by the lower A
    index (``argsort(stable=True)``; the official ``argsort`` leaves ties unspecified).
    """
    b, t, _ = metric.shape
    protected = 1 if protect_first else 0
    r = max(0, min(int(r), (t - protected) // 2))
    dev = metric.device
    ta = (t + 1) // 2
    if r == 0:
        empty = torch.zeros((b, 0), dtype=torch.long, device=dev)
        unm = torch.arange(ta, device=dev).expand(b, ta)
        return BipartiteMatch(unm, empty, empty, t)
    m = metric if numerics == "official" else metric.float()
    m = m / m.norm(dim=-1, keepdim=True)
    a, bb = m[:, ::2], m[:, 1::2]
    scores = a @ bb.transpose(-1, -2)  # (B, ta, tb)
    if protect_first:
        scores[:, 0, :] = -math.inf
    node_max, node_idx = scores.max(dim=-1)  # (B, ta)
    edge_idx = node_max.argsort(dim=-1, descending=True, stable=True)  # (B, ta)
    unm_idx = edge_idx[:, r:]
    src_idx = edge_idx[:, :r]
    dst_idx = node_idx.gather(1, src_idx)
    if protect_first:
        unm_idx = unm_idx.sort(dim=1).values
    return BipartiteMatch(unm_idx, src_idx, dst_idx, t)


def merge_tokens(match: BipartiteMatch, x: torch.Tensor, mode: str = "sum") -> torch.Tensor:
    """Apply a matching to ``x``: ``[unmerged A tokens, B tokens with their merged A tokens reduced in]``.

    Parameters
    ----------
    match : BipartiteMatch
    x : torch.Tensor
        ``(B, t, c)``.
    mode : str
        ``scatter_reduce`` reduction (``"sum"``, ``"mean"``, ``"amax"``).

    Returns
    -------
    torch.Tensor
        ``(B, t - r, c)``.
    """
    if match.r == 0:
        return x
    src, dst = x[:, ::2], x[:, 1::2]
    n, _, c = src.shape
    unm = src.gather(1, match.unm_idx.unsqueeze(-1).expand(n, -1, c))
    moved = src.gather(1, match.src_idx.unsqueeze(-1).expand(n, -1, c))
    dst = dst.scatter_reduce(1, match.dst_idx.unsqueeze(-1).expand(n, -1, c), moved, reduce=mode)
    return torch.cat([unm, dst], dim=1)


def merge_wavg(
    match: BipartiteMatch, x: torch.Tensor, size: torch.Tensor | None = None, *, numerics: str = "fp32"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted merge (``tome/merge.py`` ``merge_wavg``): ``x <- Σ x·s / Σ s``, ``s <- Σ s``.

    Parameters
    ----------
    match : BipartiteMatch
    x : torch.Tensor
        ``(B, t, c)`` tokens.
    size : torch.Tensor, optional
        ``(B, t, 1)`` float: how many original tokens each token stands for (``None`` = all 1).
    numerics : {"fp32", "official"}
        ``"fp32"``: computed in fp32. ``"official"``: ``x * size``, the sums and the division in ``x``'s
        dtype, sizes in ``x``'s dtype (official ``size = ones_like(x[..., 0, None])``).

    Returns
    -------
    x : torch.Tensor
        ``(B, t - r, c)`` in ``x``'s dtype.
    size : torch.Tensor
        ``(B, t - r, 1)`` fp32 (``"official"``: ``x``'s dtype; sizes are small integers, exact).
    """
    if numerics == "official":
        size = torch.ones_like(x[..., :1]) if size is None else size.to(x.dtype)
        xs = merge_tokens(match, x * size, mode="sum")
        size = merge_tokens(match, size, mode="sum")
        return xs / size, size
    if size is None:
        size = torch.ones_like(x[..., :1], dtype=torch.float32)
    size = size.float()
    xs = merge_tokens(match, x.float() * size, mode="sum")
    size = merge_tokens(match, size, mode="sum")
    return (xs / size).to(x.dtype), size


def kept_slots(match: BipartiteMatch) -> torch.Tensor:
    """Old index of every token after the merge: ``[2·unm_idx, 1, 3, 5, ...]``.

    Returns
    -------
    torch.Tensor
        ``(B, t - r)`` long; gather a per-token attribute with it (e.g. the representative index).
    """
    b = match.unm_idx.shape[0]
    tb = match.num_tokens // 2
    odd = (2 * torch.arange(tb, device=match.unm_idx.device) + 1).expand(b, tb)
    return torch.cat([2 * match.unm_idx, odd], dim=1)


def slot_map(match: BipartiteMatch) -> torch.Tensor:
    """New index of every old token (``merge_source`` as an index instead of a one-hot matrix).

    Unmerged A token ``2·unm_idx[j]`` -> ``j``; B token ``2·k + 1`` -> ``ta - r + k``; merged A token
    ``2·src_idx[j]`` -> its destination's new index.

    Returns
    -------
    torch.Tensor
        ``(B, t)`` long in ``[0, t - r)``.
    """
    b = match.unm_idx.shape[0]
    t = match.num_tokens
    dev = match.unm_idx.device
    n_unm = int(match.unm_idx.shape[1])
    out = torch.empty((b, t), dtype=torch.long, device=dev)
    out.scatter_(1, 2 * match.unm_idx, torch.arange(n_unm, device=dev).expand(b, n_unm))
    tb = t // 2
    out[:, 1::2] = n_unm + torch.arange(tb, device=dev)
    if match.r:
        out.scatter_(1, 2 * match.src_idx, n_unm + match.dst_idx)
    return out


def r_schedule(
    num_tokens: int, target: int, num_layers: int, *, protected: int = 1, remainder: str = "first"
) -> list[int]:
    """Per-layer ``r`` that takes ``num_tokens`` to exactly ``target`` over ``num_layers`` merging layers.

    Constant ``r = R // L`` (``R = num_tokens - target``), the remainder ``R % L`` as one extra token on
    the first (``remainder="first"``) or last layers; docs/methods/tome.md [derived] (576 -> 64 over CLIP
    layers 0..22: 23 x 6 then 22 x 17). Exact by construction (``sum(r) == R``).

    Parameters
    ----------
    num_tokens : int
        Tokens entering the first merging layer ([CLS] included, e.g. 577).
    target : int
        Tokens wanted after the last merging layer ([CLS] included, e.g. 65).
    num_layers : int
        Merging layers ``L`` (23 for LLaVA's ``hidden_states[-2]`` of 24).
    protected : int
        Never-merged tokens ([CLS]: 1); each layer removes at most ``(t - protected) // 2``.
    remainder : {"first", "last"}

    Returns
    -------
    list of int
        ``(L,)``.

    Raises
    ------
    BudgetError
        One line, when the schedule cannot reach ``target`` (a layer would need more than 50 % of its
        tokens, no merging layer, or ``target`` below the protected tokens + 1).
    ValueError
        For an unknown ``remainder``.
    """
    if remainder not in REMAINDERS:
        raise ValueError(f"tome: remainder {remainder!r} is not one of {list(REMAINDERS)}")
    removed = int(num_tokens) - int(target)
    if removed <= 0:
        return [0] * int(num_layers)
    if target < protected + 1:
        raise BudgetError(f"tome: target {target} tokens is below the {protected} protected token(s) + 1")
    if num_layers < 1:
        raise BudgetError(f"tome: no merging layer to remove {removed} of {num_tokens} tokens")
    r, extra = divmod(removed, int(num_layers))
    sched = [r + 1] * extra + [r] * (num_layers - extra) if remainder == "first" else [r] * (num_layers - extra) + [r + 1] * extra
    t = int(num_tokens)
    for layer, rl in enumerate(sched):
        cap = (t - protected) // 2
        if rl > cap:
            raise BudgetError(
                f"tome: r schedule cannot reach {target} of {num_tokens} tokens over {num_layers} merging layer(s): "
                f"layer {layer} would remove {rl} of {t} (at most 50 %, {cap}); use a deeper tower or a larger budget"
            )
        t -= rl
    return sched


def pass_schedule(num_tokens: int, target: int) -> list[int]:
    """Tokens removed by each post-merger bipartite pass (Qwen2.5-VL, docs/methods/tome.md [derived]).

    Each pass removes ``min(t // 2, t - target)`` (at most 50 %), the largest first: 20 % = 50 %, 50 %,
    then 20 % of the rest; 10 % = 50 %, 50 %, 50 %, then 20 %. Exact: the passes sum to
    ``num_tokens - target``.

    Raises
    ------
    BudgetError
        For ``target < 1``.
    """
    if target < 1:
        raise BudgetError(f"tome: target {target} tokens is below 1")
    out, t = [], int(num_tokens)
    while t > target:
        r = min(t // 2, t - int(target))
        out.append(r)
        t -= r
    return out


# ====================================================================== tower geometry
@dataclass(frozen=True)
class TowerGeometry:
    """What the r schedule needs to know about a CLIP tower, before or after loading.

    Attributes
    ----------
    num_layers : int
        Encoder layers (24 for ViT-L/14).
    feature_layer : int
        ``vision_feature_layer`` (``-2``: LLaVA reads ``hidden_states[-2]``).
    patches : int
        Patch tokens per image / crop / frame (576 at 336 px, 256 at 224 px); [CLS] comes on top.
    """

    num_layers: int
    feature_layer: int
    patches: int

    @property
    def merge_layers(self) -> int:
        """Layers whose output reaches the feature layer: ``hidden_states[h]`` is the output of layer
        ``h - 1``, so layers ``0 .. h - 1`` merge (23 for ``-2`` of 24)."""
        h = self.feature_layer if self.feature_layer >= 0 else self.num_layers + 1 + self.feature_layer
        return max(0, int(h))


def _geometry_from_config(model_cfg: Mapping[str, Any]) -> TowerGeometry | None:
    """The tower geometry a model config declares (``vision_tower``, added by
    ``apet_bench.models.config_facts`` from the model's own description), or ``None``."""
    vt = model_cfg.get("vision_tower")
    if not vt:
        return None
    return TowerGeometry(int(vt["num_layers"]), int(vt["feature_layer"]), int(vt["patches"]))


# ====================================================================== the method
@dataclass
class _TowerState:
    """Per-forward state of one patched CLIP tower (``_tome_info`` of the official patch)."""

    name: str  # "image" / "video" (Video-LLaVA's two towers) or "image"
    schedule: list[int] | None = None
    size: torch.Tensor | None = None  # (B, t, 1) fp32
    group: torch.Tensor | None = None  # (B, t0) long: current slot of every original token
    rep: torch.Tensor | None = None  # (B, t) long: original index each current token stands for
    keys: torch.Tensor | None = None  # (B, t, D) k_proj output of the layer being run
    num_in: int = 0
    unit_llm: int = 0  # planned tokens per unit entering the LLM (the budget's share)
    pending: bool = False  # tower finished, projector not yet unmerged


@register_method("tome")
@dataclass
class ToMeCompressor(TokenCompressor):
    """ToMe in the vision encoder (CLIP towers) / on the post-merger tokens (Qwen2.5-VL); stage 1.

    Parameters
    ----------
    budget : int or float
        Visual tokens entering the LLM per unit: LLaVA-1.5 image ``B`` (of 576); LLaVA-NeXT crop
        ``round(B / 5)`` patches (the 2880 convention, docs/methods/index.md; 640/320/160 -> 128/64/32,
        at most the crop's patches; ``image_newline`` tokens kept as ApET / VisionZip do); Video-LLaVA
        video ``B / num_frames`` per frame **[CLS] included** (256 -> 31 patches + [CLS] = 32 per frame,
        so the LLM receives exactly ``B``; Video-LLaVA images as LLaVA-1.5, of 256); Qwen2.5-VL ``B`` tokens
        or a retention ratio of the post-merger tokens (0.2 / 0.1). A float is a ratio of the unit's
        patch tokens (:func:`apet_bench.budget.budget_to_tokens`).
    prop_attn : bool
        Proportional attention (official ``apply_patch(prop_attn=True)``, recommended for off-the-shelf
        models): ``log(size)`` of each key added to the attention logits of every CLIP layer, as the
        backend's float ``attention_mask`` (sdpa ``attn_mask``; every layer stays on sdpa). ``False`` =
        ``ModelTC/llmc``'s LLaVA usage (no bias; also allowed with flash_attention_2).
    remainder : {"first", "last"}
        Layers that remove one extra token when ``R`` is not a multiple of the merging layers.
    order : {"merged", "spatial"} or None
        Order of the kept tokens in the LLM sequence. ``None`` (default): ``merged`` in CLIP towers
        (what a ToMe-patched tower hands LLaVA, docs/methods/tome.md: "token order scrambled, contiguous
        positions"), ``spatial`` on LLaVA-NeXT (the packing's unpad / newline layout needs the grid) and
        Qwen2.5-VL (kept tokens keep their 3-D positions).
    seed : int
        Unused (ToMe is deterministic); kept for the common interface.

    Notes
    -----
    CLIP towers [code tome/patch/timm.py + derived docs/methods/tome.md]: layers ``0 .. h-1`` where LLaVA reads
    ``hidden_states[h]`` (``h = num_layers + 1 + vision_feature_layer``: 23 of 24) run
    ``x = x + attn(ln1(x), +log size); x, size = merge_wavg(bipartite(k.mean(heads), r_l, [CLS] protected));
    x = x + mlp(ln2(x))``; later layers run unpatched on the merged tokens. The metric is the layer's
    ``k_proj`` output averaged over heads (official ``k.mean(1)``: keys before the 1/sqrt(d) scale). Sizes
    are carried across layers (official; llmc does not). Per-layer ``r`` from :func:`r_schedule`
    (constant, remainder on the first layers, exact; refused in one line before loading when a layer
    would need more than 50 %). The patched layers are the instances' ``forward`` (the official code
    swaps the class); restored on exit, with the ``k_proj`` / tower / projector hooks removed.

    Deviations from the official code, all numerically minor: merge arithmetic and cosine similarity in
    fp32 (official: the model dtype), ties broken by the lower index (``stable`` argsort).

    Upstream bugs (docs/methods/index.md): none known for ToMe; the comparison tables' settings are unknown, so
    every schedule here is [derived] (configs/method/tome.yaml).
    """

    prop_attn: bool = True
    remainder: str = "first"
    order: str | None = None

    stage: ClassVar[str] = "vision"

    _states: dict[int, _TowerState] = field(default_factory=dict, init=False, repr=False, compare=False)
    _patched: list[nn.Module] = field(default_factory=list, init=False, repr=False, compare=False)
    _planned: int | None = field(default=None, init=False, repr=False, compare=False)
    #: Group assignment, per visual of the last sample: ``(num_units, tokens_per_unit)`` long, for every
    #: original token of each unit (image: 1 x 576 patches; NeXT: crops x patches; video: frames x 257),
    #: the row of the visual's kept tokens (``VisualSelection.features`` / ``kept_indices`` order) it was
    #: merged into; ``-1``: dropped (a NeXT group lying wholly in the unpadded region). ``kept_indices[j]``
    #: is the representative of row ``j`` (the ToMe destination token that survived every layer).
    last_groups: list[torch.Tensor] = field(default_factory=list, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.budget is None:
            raise BudgetError(f"method {self.name!r} needs a budget (an int token count or a float in (0, 1])")
        if not isinstance(self.prop_attn, bool):
            raise ValueError(f"method {self.name!r}: prop_attn {self.prop_attn!r} is not true/false")
        if self.remainder not in REMAINDERS:
            raise ValueError(f"method {self.name!r}: remainder {self.remainder!r} is not one of {list(REMAINDERS)}")
        if self.order is not None and self.order not in ORDERS:
            raise ValueError(f"method {self.name!r}: order {self.order!r} is not one of {list(ORDERS)} (or null)")

    # ------------------------------------------------------------------ budget per unit
    def unit_target(self, packs_crops: bool, patches: int, kind: str = "image", num_frames: int = 8) -> int:
        """Tokens of one unit entering the LLM (patches; a Video-LLaVA frame counts its [CLS]).

        Parameters
        ----------
        packs_crops : bool
            The model packs crops (LLaVA-NeXT: the budget is shared by its 5 sub-images).
        patches : int
            Patch tokens of the unit (576 image / crop, 256 Video-LLaVA image / frame).
        kind : {"image", "video"}
        num_frames : int
            Frames per video (Video-LLaVA).

        Raises
        ------
        BudgetError
            A Video-LLaVA int budget that is not a multiple of the frames, or one that leaves fewer
            than 2 tokens per frame ([CLS] + 1).
        """
        b = self.budget
        if packs_crops:
            k = int(math.floor(float(b) / NEXT_SUB_IMAGES + 0.5)) if isinstance(b, int) else budget_to_tokens(b, patches)
            return max(1, min(patches, k))
        if kind == "video":
            if isinstance(b, int):
                if b % num_frames:
                    raise BudgetError(f"tome: Video-LLaVA budget {b} is not a multiple of its {num_frames} frames")
                k = b // num_frames
            else:
                k = budget_to_tokens(b, patches + 1)
            if k < 2:
                raise BudgetError(f"tome: budget {b} leaves {k} token(s) per frame; [CLS] + at least 1 needed")
            return min(patches + 1, k)
        return max(1, min(patches, budget_to_tokens(b, patches) if isinstance(b, float) else int(b)))

    def tower_schedule(self, geometry: TowerGeometry, target: int, *, cls_in_target: bool = False) -> list[int]:
        """Per-layer ``r`` for one tower pass: ``patches + 1`` tokens -> ``target (+ 1 [CLS])``, over
        :attr:`TowerGeometry.merge_layers` (see :func:`r_schedule`).

        Raises
        ------
        BudgetError
            When the budget cannot be reached (one line).
        """
        final = target if cls_in_target else target + 1
        return r_schedule(geometry.patches + 1, final, geometry.merge_layers, protected=1, remainder=self.remainder)

    def check_model_config(self, model_cfg: dict[str, Any]) -> None:
        """Refuse, before loading: an r schedule that cannot reach the budget on the model's tower,
        proportional attention under flash_attention_2 (it needs an additive bias), a Video-LLaVA budget
        that is not a multiple of the frames.

        Raises
        ------
        ValueError
            (``BudgetError`` for the schedule) one line naming the bad value.
        """
        super().check_model_config(model_cfg)
        geo = _geometry_from_config(model_cfg)
        if geo is None:  # no patched tower (post-merger recipe): nothing to check
            return
        if self.prop_attn and model_cfg.get("attn_implementation") == "flash_attention_2":
            raise ValueError(
                "tome: prop_attn needs an additive attention bias, which flash_attention_2 cannot take; "
                "use attn_implementation=sdpa or method.params.prop_attn=false"
            )
        for kind in model_cfg.get("visual_kinds") or ["image"]:
            frames = int(model_cfg.get("num_frames") or 8)
            target = self.unit_target(bool(model_cfg.get("packs_crops")), geo.patches, kind, frames)
            try:
                self.tower_schedule(geo, target, cls_in_target=kind == "video")
            except BudgetError as e:
                raise BudgetError(f"{e} (model {model_cfg.get('name')!r}, budget {self.budget})") from None

    # ------------------------------------------------------------------ lifecycle
    def reset(self) -> None:
        """Forget the last sample's record."""
        self._planned = None
        self.last_groups = []

    def _towers(self, adapter: Any) -> list[tuple[str, nn.Module]]:
        return list(adapter.vision_towers)

    def _geometry(self, adapter: Any, tower: nn.Module) -> TowerGeometry:
        vc = tower.config
        fl = adapter.vision_feature_layer
        if not isinstance(fl, int):
            raise ValueError(f"tome: vision_feature_layer {fl!r} is not one layer (multi-layer features unsupported)")
        return TowerGeometry(int(vc.num_hidden_layers), int(fl), int((vc.image_size // vc.patch_size) ** 2))

    def attach(self, adapter: Any) -> None:
        """Patch the CLIP tower(s): layer forwards (merge between attention and MLP), ``k_proj`` hooks
        (metric), a tower pre-hook (reset sizes / groups) and post-hook (check the count), and a
        projector hook that unmerges the projected tokens to the original layout. Qwen2.5-VL: nothing
        (post-merger recipe in :meth:`compress_visual`).

        Raises
        ------
        ValueError
            prop_attn under flash_attention_2; a multi-layer ``vision_feature_layer``.
        """
        self._states = {}
        self._patched = []
        if adapter.features_per_token > 1:  # merged tokens: the post-merger recipe, no tower patch
            return
        for kind, tower in self._towers(adapter):
            attn_impl = getattr(tower.config, "_attn_implementation", None)
            if self.prop_attn and attn_impl == "flash_attention_2":
                raise ValueError(
                    "tome: prop_attn needs an additive attention bias, which flash_attention_2 cannot take; "
                    "use attn_implementation=sdpa or method.params.prop_attn=false"
                )
            geo = self._geometry(adapter, tower)
            state = _TowerState(kind)
            self._states[id(tower)] = state
            layers = _encoder_layers(tower)
            for i in range(min(geo.merge_layers, len(layers))):
                layer = layers[i]
                layer.forward = types.MethodType(_make_forward(self, state, i), layer)
                self._patched.append(layer)
                self.register_hook(layer.self_attn.k_proj, _keys_hook(state))
            self.register_hook(tower, _tower_pre_hook(self, adapter, state, geo, kind), pre=True, with_kwargs=True)
            self.register_hook(tower, _tower_post_hook(state))
        self.register_hook(adapter.vision_projector, _projector_hook(self))

    def detach(self, adapter: Any) -> None:
        """Restore the patched layers' class ``forward``; forget tower states."""
        while self._patched:
            layer = self._patched.pop()
            layer.__dict__.pop("forward", None)
        self._states = {}

    # ------------------------------------------------------------------ stage 1
    def _order(self, packs_crops: bool, merged_tokens: bool) -> str:
        if self.order is not None and not packs_crops:
            return self.order
        return "spatial" if packs_crops or merged_tokens else "merged"

    def flops_overhead(self, ctx: OverheadContext) -> dict[str, int]:
        """Bipartite soft matching at every vision layer that merges (``facebookresearch/ToMe``
        ``tome/merge.py`` ``bipartite_soft_matching``): similarity ``A·Bᵀ`` of the two halves of the
        ``a`` tokens on head-mean keys, ``2·⌊a/2⌋·⌈a/2⌉·dk`` with ``dk`` the head width; argmax, gathers
        and the size-weighted means are not counted. ``{"bipartite_matching": ...}`` (0 where the plan
        records no vision-layer merge, e.g. the passes on Qwen2.5-VL's post-merger tokens)."""
        lens = list(ctx.vision_layer_tokens or [])
        dk = ctx.vision_hidden_size // ctx.vision_heads
        total = 0
        for a, b in zip(lens, lens[1:]):
            if b < a:
                total += 2 * (a // 2) * (a - a // 2) * dk
        return {"bipartite_matching": total}

    def token_map(self, num_visual_tokens: int, kept_indices: list[int] | None) -> TokenMap | None:
        """Roots from :attr:`last_groups`: original token ``i`` was merged into kept row
        ``last_groups[0][0, i]``, whose original index is ``kept_indices[row]``.

        Returns
        -------
        TokenMap or None
            ``None`` without kept indices, or when the last sample is not one unit of
            ``num_visual_tokens`` tokens (groups of shape ``(1, N)``).
        """
        groups = self.last_groups
        if kept_indices is None or len(groups) != 1 or tuple(groups[0].shape) != (1, int(num_visual_tokens)):
            return None
        return TokenMap.from_groups(kept_indices, groups[0][0].tolist())

    def compress_visual(self, features: torch.Tensor, *, image_index: int) -> VisualSelection:
        """Keep one token per merged group at its representative index (CLIP towers), or run the
        post-merger passes (Qwen2.5-VL).

        Parameters
        ----------
        features : torch.Tensor
            ``(num_visual_tokens, hidden_size)``: the projector output, already unmerged to the original
            layout by the projector hook (each token holds its group's merged value).
        image_index : int

        Returns
        -------
        VisualSelection
            ``features`` ``(k, hidden_size)`` (one per group), ``kept_indices`` ``(k,)``: the group's
            representative (the ToMe destination token that survived every layer).

        Raises
        ------
        RuntimeError
            Outside a context, or when the tower did not run merged for this visual.
        """
        adapter = self._adapter
        ctx = self.visual_context
        if adapter is None or ctx is None:
            raise RuntimeError("tome: compress_visual needs an open context on a model adapter (with method(adapter))")
        if image_index == 0:
            self._planned = 0
            self.last_groups = []
        if adapter.features_per_token > 1:
            return self._qwen(features)
        kind = adapter.visual_kind
        state = self._state_for(adapter, kind)
        if state.rep is None or state.group is None:
            raise RuntimeError("tome: the vision tower did not run with ToMe for this sample")
        order = self._order(adapter.packs_crops, False)
        if adapter.packs_crops:
            return self._next(features, image_index, state)
        spatial = order == "spatial"
        if kind == "video":
            segs = ctx.segments[image_index]
            frames = len(segs.segments)
            rows = slice(image_index * frames, (image_index + 1) * frames)
            rep, rows_of_slot = _order_rows(state.rep[rows], spatial)  # (F, k): CLS kept in the LLM
            k = int(rep.shape[1])
            per = int(segs.segments[0].num_tokens)
            offsets = torch.arange(frames, device=rep.device).unsqueeze(1)
            idx = (rep + offsets * per).reshape(-1)
            self.last_groups.append((rows_of_slot.gather(1, state.group[rows]) + offsets * k).cpu())
            planned = frames * state.unit_llm  # the schedule's target, not the selection's size
        else:
            rep, rows_of_slot = _order_rows(state.rep[image_index : image_index + 1, 1:] - 1, spatial)
            group = state.group[image_index : image_index + 1, 1:] - 1  # CLS dropped by the feature select
            idx = rep[0]
            self.last_groups.append(rows_of_slot.gather(1, group).cpu())
            planned = state.unit_llm
        idx = idx.to(features.device)
        self._planned = (self._planned or 0) + int(planned)
        return VisualSelection(features.index_select(0, idx), idx)

    def _state_for(self, adapter: Any, kind: str) -> _TowerState:
        for _, tower in self._towers(adapter):
            st = self._states.get(id(tower))
            if st is not None and st.name == kind:
                return st
        raise RuntimeError(f"tome: no patched {kind} tower")

    def _next(self, features: torch.Tensor, image_index: int, state: _TowerState) -> VisualSelection:
        """LLaVA-NeXT: per crop, each group at its representative if ``unpad_image`` kept it, else at its
        lowest-index member that survived; a group lying wholly in the removed padding is dropped (as
        unpadding drops those patches). ``image_newline`` tokens are kept. Packed (spatial) order."""
        ctx = self.visual_context
        fmap = ctx.feature_token_map[image_index]  # (C, P) packed position or -1
        crops = [int(f.shape[0]) for f in ctx.feature_token_map]
        c0 = sum(crops[:image_index])
        C, P = fmap.shape
        rep = (state.rep[c0 : c0 + C, 1:] - 1).cpu()  # (C, k) patch index of each group's representative
        group = (state.group[c0 : c0 + C, 1:] - 1).cpu()  # (C, P) group of each patch
        k = int(rep.shape[1])
        valid = fmap >= 0
        big = P + 1
        cand = torch.where(valid, torch.arange(P).expand(C, P), torch.full((C, P), big))
        first = torch.full((C, k), big, dtype=torch.long).scatter_reduce(1, group, cand, reduce="amin")
        rep_ok = valid.gather(1, rep)
        chosen = torch.where(rep_ok, rep, first)  # (C, k); == big: no member survived unpadding
        keep = chosen < big
        pos = fmap.gather(1, chosen.clamp(max=P - 1))
        out_groups = torch.full((C, P), -1, dtype=torch.long)
        kept_pos = []
        for c in range(C):
            kept_pos.append(pos[c][keep[c]])
        newlines = ctx.segments[image_index].newline_positions
        idx = torch.cat([*kept_pos, newlines]).sort().values
        # group map: original patch -> index of its kept token in idx (or -1)
        where = torch.full((int(features.shape[0]),), -1, dtype=torch.long)
        where[idx] = torch.arange(idx.numel())
        for c in range(C):
            slot_pos = torch.where(keep[c], pos[c], torch.full_like(pos[c], -1))
            g = slot_pos[group[c]]
            out_groups[c] = torch.where(g >= 0, where[g.clamp(min=0)], g)
        self.last_groups.append(out_groups)
        self._planned = (self._planned or 0) + int(idx.numel())
        idx = idx.to(features.device)
        return VisualSelection(features.index_select(0, idx), idx)

    def _qwen(self, features: torch.Tensor) -> VisualSelection:
        """Qwen2.5-VL: bipartite passes (:func:`pass_schedule`) on the post-merger tokens, cosine of the
        tokens themselves, size-weighted; each group at its representative's index (mRoPE position)."""
        n = int(features.shape[0])
        target = max(1, min(n, budget_to_tokens(self.budget, n) if isinstance(self.budget, float) else int(self.budget)))
        x = features.unsqueeze(0)
        size = None
        rep = torch.arange(n, device=features.device).unsqueeze(0)
        group = rep.clone()
        for r in pass_schedule(n, target):
            match = bipartite_soft_matching(x, r, protect_first=False, numerics=self.numerics)
            x, size = merge_wavg(match, x, size, numerics=self.numerics)
            group = slot_map(match).gather(1, group)
            rep = rep.gather(1, kept_slots(match))
        out, idx = x[0], rep[0]
        if self._order(False, True) == "spatial":
            idx, perm = idx.sort()
            out = out.index_select(0, perm)
            inv = torch.empty_like(perm)
            inv[perm] = torch.arange(perm.numel(), device=perm.device)
            group = inv[group]
        self.last_groups.append(group.cpu())
        self._planned = (self._planned or 0) + int(target)
        return VisualSelection(out, idx)

    def plan(self, adapter: Any, num_visual_tokens: int) -> list[int]:
        """Visual tokens in every decoder layer (stage 1 only: the same in every layer) for the last sample.

        LLaVA-1.5 / Video-LLaVA / Qwen2.5-VL: the sum of the units' budget shares (the schedule's targets,
        computed apart from the selection; the tower's merged count is checked against the schedule).
        LLaVA-NeXT: the groups that survived unpadding plus the newline tokens (data-dependent).
        """
        n = int(num_visual_tokens) if self._planned is None else int(self._planned)
        return [n] * adapter.num_layers


def _encoder_layers(tower: nn.Module) -> nn.ModuleList:
    """The CLIP tower's encoder layers (``tower.encoder.layers`` in transformers 5, ``tower.vision_model.encoder.layers`` before)."""
    inner = getattr(tower, "vision_model", tower)
    return inner.encoder.layers


def _order_rows(rep: torch.Tensor, spatial: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Output order of each unit's kept tokens.

    Parameters
    ----------
    rep : torch.Tensor
        ``(U, k)`` long: representative (original index) of each merged slot, in the tower's order.
    spatial : bool
        Sort by representative index (else keep the tower's merged order).

    Returns
    -------
    rep : torch.Tensor
        ``(U, k)`` representatives in output order.
    row_of_slot : torch.Tensor
        ``(U, k)`` long: output row of each slot.
    """
    u, k = rep.shape
    ar = torch.arange(k, device=rep.device).expand(u, k)
    if not spatial:
        return rep, ar.clone()
    out, perm = rep.sort(dim=1)
    return out, torch.empty_like(perm).scatter_(1, perm, ar)


# ---------------------------------------------------------------------- hooks and the patched forward
def _keys_hook(state: _TowerState):
    def hook(module, args, output):
        state.keys = output

    return hook


def _make_forward(method: ToMeCompressor, state: _TowerState, layer_idx: int):
    """``CLIPEncoderLayer.forward`` with ToMe between attention and MLP (``ToMeBlock.forward``)."""

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any):
        sched = state.schedule or []
        r = sched[layer_idx] if layer_idx < len(sched) else 0
        residual = hidden_states
        h = self.layer_norm1(hidden_states)
        bias = attention_mask
        if method.prop_attn and state.size is not None:
            log_size = state.size.log()[:, None, None, :, 0].to(h.dtype)  # (B, 1, 1, t): + log s_j on logit (i, j)
            bias = log_size if attention_mask is None else attention_mask + log_size
            method.note_attention(
                "vision", layer_idx, "all",
                "proportional attention: + log(token size) as a float attention_mask on the tower's backend",
            )
        h, _ = self.self_attn(hidden_states=h, attention_mask=bias, **kwargs)
        x = residual + h
        if r > 0:
            keys = state.keys  # (B, t, D) this layer's k_proj output
            heads = int(self.self_attn.num_heads)
            metric = keys.view(keys.shape[0], keys.shape[1], heads, -1).mean(dim=2)  # (B, t, D / H)
            match = bipartite_soft_matching(metric, r, protect_first=True, numerics=method.numerics)
            if match.r != r:
                raise RuntimeError(f"tome: layer {layer_idx} could merge {match.r} of the {r} scheduled tokens")
            x, state.size = merge_wavg(match, x, state.size, numerics=method.numerics)
            state.group = slot_map(match).gather(1, state.group)
            state.rep = state.rep.gather(1, kept_slots(match))
        state.keys = None
        residual = x
        x = self.mlp(self.layer_norm2(x))
        return residual + x

    return forward


def _tower_pre_hook(method: ToMeCompressor, adapter: Any, state: _TowerState, geo: TowerGeometry, kind: str):
    def hook(module, args, kwargs):
        pv = args[0] if args else kwargs.get("pixel_values")
        batch = int(pv.shape[0])
        frames = 8
        if kind == "video":
            frames = int(getattr(adapter, "num_frames", 8))
        target = method.unit_target(adapter.packs_crops, geo.patches, kind, frames)
        state.schedule = method.tower_schedule(geo, target, cls_in_target=kind == "video")
        state.unit_llm = int(target)
        t0 = geo.patches + 1
        dev = pv.device
        state.size = None
        state.keys = None
        state.num_in = t0
        state.group = torch.arange(t0, device=dev).expand(batch, t0).clone()
        state.rep = state.group.clone()
        state.pending = False

    return hook


def _tower_post_hook(state: _TowerState):
    def hook(module, args, output):
        expected = state.num_in - sum(state.schedule or [])
        got = int(state.rep.shape[1]) if state.rep is not None else -1
        if got != expected:
            raise RuntimeError(f"tome: {got} tokens after merging, the schedule planned {expected}")
        state.pending = True

    return hook


def _projector_hook(method: ToMeCompressor):
    """Unmerge the projector output: ``(B, k, D)`` -> ``(B, N, D)``, each original token its group's row."""

    def hook(module, args, output):
        for state in method._states.values():
            if not state.pending or state.group is None:
                continue
            k = int(state.rep.shape[1])
            if output.dim() != 3 or output.shape[0] != state.group.shape[0]:
                continue
            if int(output.shape[1]) == k - 1:  # CLS dropped (select strategy "default")
                group = state.group[:, 1:] - 1
            elif int(output.shape[1]) == k:  # CLS kept (Video-LLaVA videos, "full")
                group = state.group
            else:
                continue
            state.pending = False
            return output.gather(1, group.to(output.device).unsqueeze(-1).expand(-1, -1, output.shape[-1]))
        return None

    return hook
