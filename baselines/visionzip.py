"""``visionzip``: VisionZip (CVPR 2025; dvlab-research/VisionZip @ 3151f6d, docs/methods/visionzip.md) on all four models.

Stage 1 (before the LLM). Per unit (an image, a LLaVA-NeXT crop, a Video-LLaVA frame), on the vision
encoder's layer ``-2`` (index ``L-2``; official: hard-wired ``hidden_states[-2]``, docs/methods/visionzip.md):

* **dominant tokens**: the [CLS] token plus the ``dominant - 1`` patches with the highest [CLS]-row
  attention of that layer, summed over heads (the official ``attn[:, :, 0, 1:].sum(1)``; the top-k is
  the same as for the head mean), in ascending index order, [CLS] first (docs/methods/visionzip.md);
* **contextual tokens**: of the remaining tokens (ascending index), every ``step = max(1, R // contextual)``-th
  is a target (the first ``contextual`` of them); each other remaining token joins the target of highest
  cosine similarity on the layer's **keys averaged over heads**; contextual token = ``target +
  mean(cluster)`` (the official formula, *not* the group mean; an empty cluster adds 0) (docs/methods/visionzip.md);
* output ``[dominant, contextual]`` on the layer-``-2`` hidden states (with [CLS]), then the projector.

The [CLS] attention row is recomputed from the layer's input (its ``layer_norm1`` + ``q_proj`` /
``k_proj``: one query row, :func:`cls_attention_row`) in a forward hook on that encoder layer, so the
vision tower stays on sdpa (the official code runs the whole tower eager with ``output_attentions``).
Recorded with :meth:`~apet_bench.methods.TokenCompressor.note_attention`.

Per model: LLaVA-1.5 per image; LLaVA-NeXT per crop with the official layout (docs/methods/visionzip.md: base ``[CLS, dominant,
contextual]``, then the grid crops' dominant patches in raster order of the full grid, their CLS tokens,
their contextual tokens; no unpadding, no ``image_newline``); Video-LLaVA per frame of the video tower
(257 tokens, [CLS] a visual token there) and images as LLaVA-1.5; Qwen2.5-VL (no [CLS]) the port in docs/methods/visionzip.md
(``qwen_fallback``): mean attention received in the last ViT block (over queries and heads), pooled over
each 2×2 merge unit, dominant = top-k merged tokens, contextual on the pooled head-mean keys, on the
post-merger tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from apet_bench.budget import BudgetError
from apet_bench.methods.base import TokenCompressor, VisualSelection, register_method
from apet_bench.methods.records import OverheadContext, TokenMap
from apet_bench.methods.schedules import check_video_budget

__all__ = [
    "CONTEXTUAL_SHARE_INT",
    "CONTEXTUAL_SHARE_RATIO",
    "VISION_LAYER",
    "VisionZipCompressor",
    "VisionZipResult",
    "check_video_budget",
    "cls_attention_row",
    "qwen_attention_received",
    "split_budget",
    "visionzip_tokens",
]

#: Encoder layer whose [CLS] attention, keys and output VisionZip reads: ``-2`` (output = ``hidden_states[-2]``,
#: layer index 22 of CLIP-L's 24) [code ``clip_encoder.py``, hard-wired].
VISION_LAYER = -2
#: Contextual share of an int per-unit budget: ``10 / 64`` (official README 54 + 10 for 64 [code]; gives
#: 108 + 20, 162 + 30 and 27 + 5 for 128, 192, 32: the splits of docs/methods/visionzip.md).
CONTEXTUAL_SHARE_INT = 10 / 64
#: Contextual share of a retention-ratio budget: ``0.25`` (15 % + 5 % for 20 %, 7.5 % + 2.5 % for 10 %;
#: [derived] docs/methods/visionzip.md from the Qwen3-VL port's 0.15 + 0.05).
CONTEXTUAL_SHARE_RATIO = 0.25
#: LLaVA-NeXT sub-images in the budget convention (docs/methods/index.md: 640 = 5 × 128).
NEXT_SUB_IMAGES = 5


def split_budget(b: int, share: float) -> tuple[int, int]:
    """``(dominant, contextual)`` of a per-unit budget ``b`` (tokens): ``contextual = round(b · share)``.

    >>> [split_budget(b, 10 / 64) for b in (64, 128, 192, 32)]
    [(54, 10), (108, 20), (162, 30), (27, 5)]
    """
    c = int(round(b * share))
    c = min(c, max(0, b - 1))  # at least one dominant token
    return b - c, c


@dataclass
class VisionZipResult:
    """What :func:`visionzip_tokens` built for one unit.

    Attributes
    ----------
    tokens : torch.Tensor
        ``(num_dominant + num_contextual, D)``: dominant rows then contextual rows.
    dominant : torch.Tensor
        ``(num_dominant,)`` long, ascending ([CLS] first when there is one): the dominant tokens' indices.
    targets : torch.Tensor
        ``(num_contextual,)`` long: each contextual token's target index.
    members : list of torch.Tensor
        Per contextual token, the indices merged into its target (possibly empty).
    """

    tokens: torch.Tensor
    dominant: torch.Tensor
    targets: torch.Tensor
    members: list[torch.Tensor]


def visionzip_tokens(
    features: torch.Tensor,
    scores: torch.Tensor,
    metric: torch.Tensor,
    num_dominant: int,
    num_contextual: int,
    cls_index: int | None = 0,
) -> VisionZipResult:
    """VisionZip's dominant + contextual tokens of one unit (docs/methods/visionzip.md [code]).

    Parameters
    ----------
    features : torch.Tensor
        ``(N, D)`` tokens the output is built from (CLIP layer ``-2`` hidden states with [CLS]).
    scores : torch.Tensor
        ``(N,)`` importance ([CLS]-row attention summed over heads; the [CLS] entry is ignored).
    metric : torch.Tensor
        ``(N, d)`` similarity features (keys averaged over heads), cosine-normalised here.
    num_dominant : int
        Dominant tokens **including** [CLS] when ``cls_index`` is set (official: ``D_patch = dominant - 1``).
    num_contextual : int
        Contextual tokens (``0`` allowed); at most the remaining tokens.
    cls_index : int or None
        Row of [CLS], always kept first; ``None`` for towers without [CLS] (Qwen2.5-VL).

    Returns
    -------
    VisionZipResult

    Raises
    ------
    ValueError
        If the counts do not fit ``N``.
    """
    n = int(features.shape[0])
    dev = features.device
    has_cls = cls_index is not None
    if num_dominant < (1 if has_cls else 0) or num_contextual < 0 or num_dominant + num_contextual > n:
        raise ValueError(f"visionzip: {num_dominant} dominant + {num_contextual} contextual do not fit {n} tokens")
    s = scores.float().clone()
    if has_cls:
        s[cls_index] = float("-inf")
    k = num_dominant - (1 if has_cls else 0)
    top = torch.topk(s, k).indices if k > 0 else torch.zeros(0, dtype=torch.long, device=s.device)
    keep = torch.zeros(n, dtype=torch.bool, device=dev)
    keep[top.to(dev)] = True
    if has_cls:
        keep[cls_index] = True
    dominant = keep.nonzero().flatten()  # ascending: [CLS] (index 0) first
    if has_cls and cls_index != 0:  # [CLS] first as the official output
        dominant = torch.cat([dominant.new_tensor([cls_index]), dominant[dominant != cls_index]])
    rest = (~keep).nonzero().flatten()
    out = [features.index_select(0, dominant)]
    targets = torch.zeros(0, dtype=torch.long, device=dev)
    members: list[torch.Tensor] = []
    if num_contextual > 0:
        r = int(rest.numel())
        step = max(1, r // num_contextual)
        tpos = torch.arange(0, r, step, device=dev)[:num_contextual]
        is_t = torch.zeros(r, dtype=torch.bool, device=dev)
        is_t[tpos] = True
        targets = rest[tpos]
        others = rest[~is_t]
        m = metric.float()
        m = m / m.norm(dim=-1, keepdim=True)
        feats = features.float()
        ctx = feats.index_select(0, targets).clone()
        if others.numel():
            assign = (m.index_select(0, others) @ m.index_select(0, targets).T).argmax(dim=1)  # (R - C,)
            sums = torch.zeros_like(ctx).index_add_(0, assign, feats.index_select(0, others))
            counts = torch.bincount(assign, minlength=targets.numel()).clamp(min=1).unsqueeze(1)
            ctx = ctx + sums / counts  # target + mean(cluster) [code]; empty cluster adds 0
            members = [others[assign == j] for j in range(targets.numel())]
        else:
            members = [others[:0] for _ in range(targets.numel())]
        out.append(ctx.to(features.dtype))
    return VisionZipResult(torch.cat(out), dominant, targets, members)


def cls_attention_row(
    layer: nn.Module, hidden_in: torch.Tensor, cls_index: int = 0, *, numerics: str = "fp32"
) -> tuple[torch.Tensor, torch.Tensor]:
    """[CLS]-row attention and head-mean keys of one CLIP encoder layer, from the layer's input.

    Recomputes only what VisionZip reads: ``x = layer_norm1(h)``, ``q = q_proj(x[CLS])``, ``K = k_proj(x)``
    per head, ``softmax(q Kᵀ · scale)`` in fp32 (CLIP vision attention has no mask). Equal to
    ``output_attentions`` of the eager layer (``attentions[L][:, :, CLS]``) within 1e-5 (tested).

    Parameters
    ----------
    layer : torch.nn.Module
        A ``CLIPEncoderLayer`` (``layer_norm1``, ``self_attn.{q,k}_proj``, ``num_heads``, ``scale``).
    hidden_in : torch.Tensor
        ``(B, N, D)``: the layer's input hidden states.
    cls_index : int
        Query row (0).
    numerics : {"fp32", "official"}
        ``"fp32"``: as above, in float32. ``"official"``: as the eager ``CLIPAttention`` of the
        transformers 4.37 era that the official code runs with ``output_attentions=True``, in the
        model's dtype: ``q = q_proj(x) * scale``, ``q Kᵀ`` and ``softmax`` in that dtype; keys averaged
        over heads in that dtype.

    Returns
    -------
    attn : torch.Tensor
        ``(B, heads, N)`` probabilities of the [CLS] query over all ``N`` tokens (float32, or the
        model's dtype under ``"official"``).
    keys : torch.Tensor
        ``(B, N, head_dim)`` keys averaged over heads (VisionZip's ``metric``), same dtype as ``attn``.
    """
    att = layer.self_attn
    x = layer.layer_norm1(hidden_in)
    b, n, _ = x.shape
    h = int(att.num_heads)
    if numerics == "official":
        q = (att.q_proj(x[:, cls_index : cls_index + 1]) * att.scale).view(b, 1, h, -1).transpose(1, 2)
        k = att.k_proj(x).view(b, n, h, -1).transpose(1, 2)  # (B, H, N, d), model dtype
        attn = torch.softmax(q @ k.transpose(-1, -2), dim=-1)[:, :, 0]  # (B, H, N), model dtype
        return attn, k.mean(dim=1)
    q = att.q_proj(x[:, cls_index : cls_index + 1]).view(b, 1, h, -1).transpose(1, 2).float()  # (B, H, 1, d)
    k = att.k_proj(x).view(b, n, h, -1).transpose(1, 2).float()  # (B, H, N, d)
    attn = torch.softmax((q @ k.transpose(-1, -2)) * float(att.scale), dim=-1)[:, :, 0]  # (B, H, N)
    return attn, k.mean(dim=1)


def qwen_attention_received(
    attn_module: nn.Module,
    hidden_in: torch.Tensor,
    cu_seqlens: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    chunk: int = 256,
    with_output: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Mean attention each patch receives in one Qwen2.5-VL ViT block (over heads and queries), per sequence.

    The recipe of the VisionZip Qwen2.5-VL port (docs/methods/visionzip.md): every query row is needed, so the
    block's ``softmax(q Kᵀ · scale)`` is recomputed (fp32, rotary applied as the block does, within the
    ``cu_seqlens`` chunks the block attends in), query chunk by query chunk (``chunk`` rows at a time).
    A third-party Qwen2.5-VL port in ModelTC/llmc (its token-reduction code; reference only) scores the
    same way: last block, softmax probabilities averaged over heads and summed over queries (the same
    ranking within an image), ``view(N // 4, -1).mean(-1)``, window order undone.

    Parameters
    ----------
    attn_module : torch.nn.Module
        ``Qwen2_5_VLVisionAttention`` (``qkv``, ``num_heads``, ``scaling``, ``proj``).
    hidden_in : torch.Tensor
        ``(S, D_v)``: its input (``norm1`` already applied), window order.
    cu_seqlens : torch.Tensor
        ``(num_seqs + 1,)`` cumulative lengths the block attends within.
    position_embeddings : tuple of torch.Tensor
        ``(cos, sin)`` as the block receives them.
    with_output : bool
        Also return the block's attention output ``proj(P V)`` ``(S, D_v)`` (to check the recomputation).

    Returns
    -------
    received : torch.Tensor
        ``(S,)`` float32.
    keys : torch.Tensor
        ``(S, head_dim)`` float32 keys averaged over heads, before the rotary embedding.
    output : torch.Tensor or None
    """
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision

    s = int(hidden_in.shape[0])
    h = int(attn_module.num_heads)
    q, k, v = attn_module.qkv(hidden_in).reshape(s, 3, h, -1).permute(1, 0, 2, 3).unbind(0)  # (S, H, d)
    keys = k.float().mean(dim=1)
    cos, sin = position_embeddings
    q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
    q, k, v = (t.transpose(0, 1).float() for t in (q, k, v))  # (H, S, d)
    received = torch.zeros(s, dtype=torch.float32, device=hidden_in.device)
    out = torch.zeros_like(q) if with_output else None
    bounds = [int(x) for x in cu_seqlens.tolist()]
    for a, e in zip(bounds[:-1], bounds[1:]):
        kk = k[:, a:e]
        for c in range(a, e, chunk):
            p = torch.softmax((q[:, c : min(e, c + chunk)] @ kk.transpose(-1, -2)) * float(attn_module.scaling), dim=-1)
            received[a:e] += p.sum(dim=(0, 1))
            if out is not None:
                out[:, c : min(e, c + chunk)] = p @ v[:, a:e]
        received[a:e] /= float(h * (e - a))
    output = None
    if out is not None:
        output = attn_module.proj(out.transpose(0, 1).reshape(s, -1).to(hidden_in.dtype))
    return received, keys, output


def _encoder_layers(tower: nn.Module) -> nn.ModuleList:
    vm = getattr(tower, "vision_model", tower)
    return vm.encoder.layers


@register_method("visionzip")
@dataclass
class VisionZipCompressor(TokenCompressor):
    """VisionZip: dominant tokens by [CLS] attention + contextual tokens by key-similarity merging (stage 1).

    Parameters
    ----------
    budget : int or float
        Visual tokens entering the LLM, the paper's convention (every decoder layer carries the same
        count). Per unit: LLaVA-1.5 / Qwen2.5-VL / Video-LLaVA image ``b = budget``; LLaVA-NeXT
        ``b = round(budget / 5)`` per crop (docs/methods/visionzip.md; 640 -> 128 = 108 + 20); Video-LLaVA video
        ``b = budget / num_frames`` per frame (256 -> 32 = 27 + 5). A float ``r``: ``b = round(r · N)`` of
        the unit's ``N`` patch tokens ([CLS] not counted). ``b`` is split by :func:`split_budget` unless
        ``dominant`` / ``contextual`` are given; the counts are clamped to the unit's tokens (tiny models).
    dominant, contextual : int or None
        Explicit per-unit counts (dominant includes [CLS] on CLIP towers), e.g. the library default
        ``191`` / ``30`` (not a paper setting). ``None`` (default): from ``budget``.
    contextual_share : float or None
        Contextual share of ``b``; ``None``: :data:`CONTEXTUAL_SHARE_INT` for int budgets,
        :data:`CONTEXTUAL_SHARE_RATIO` for ratios.
    qwen_fallback : bool
        Towers without [CLS] (Qwen2.5-VL): ``True`` (default) runs the Qwen port's recipe (docs/methods/visionzip.md); ``False`` refuses such a model in :meth:`check_model_config`, before it is loaded.
    seed : int
        Unused (VisionZip is deterministic); kept for the interface.

    Raises
    ------
    BudgetError
        Without a budget (and without explicit ``dominant`` + ``contextual``).
    ValueError
        For negative / non-int counts or a share outside [0, 1).

    Notes
    -----
    ``kept_indices``: reported where every output row has an index among the unit's visual tokens:
    Qwen2.5-VL (dominant indices, then each contextual token's **target** index) and Video-LLaVA videos
    ([CLS] is a visual token there). LLaVA-1.5 / Video-LLaVA images carry the [CLS] row, which is no
    visual token of the HF model, and LLaVA-NeXT uses the official re-layout: ``kept_indices`` is
    ``None`` there. Every unit's selection (dominant indices, targets, cluster members; indices into
    the layer's tokens, [CLS] = 0) is in :attr:`records` after each sample.

    Deviations from the official code: the [CLS] row is recomputed from the layer input instead of
    running the tower eager (same probabilities; softmax in fp32, upstream in the model dtype); the
    broken list-input branch (docs/methods/index.md) is not reproduced (images are always batched);
    ``contextual = 0`` is allowed (upstream divides by zero); counts clamp on small units instead of
    failing. Qwen2.5-VL [derived]: contextual similarity on head-mean keys *before* the rotary embedding,
    output ``[dominant, contextual]`` with original mRoPE positions (the port is not in the snapshot read).
    """

    dominant: int | None = None
    contextual: int | None = None
    contextual_share: float | None = None
    qwen_fallback: bool = True

    stage: ClassVar[str] = "vision"

    records: list[dict[str, Any]] = field(default_factory=list, init=False, repr=False, compare=False)
    _captured: list[dict[str, torch.Tensor]] = field(default_factory=list, init=False, repr=False, compare=False)
    _batch: dict[str, torch.Tensor] | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("dominant", "contextual"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
                raise ValueError(f"method {self.name!r}: {name} {v!r} is not an int >= 0 (or null)")
        if self.budget is None and (self.dominant is None or self.contextual is None):
            raise BudgetError(f"method {self.name!r} needs a budget (an int token count or a float in (0, 1])")
        if self.contextual_share is not None and not 0.0 <= float(self.contextual_share) < 1.0:
            raise ValueError(f"method {self.name!r}: contextual_share {self.contextual_share!r} is not in [0, 1)")
        if not isinstance(self.qwen_fallback, bool):
            raise ValueError(f"method {self.name!r}: qwen_fallback {self.qwen_fallback!r} is not a bool")

    def check_model_config(self, model_cfg: dict[str, Any]) -> None:
        """Refuse a vision tower without [CLS] (Qwen2.5-VL) when ``qwen_fallback`` is off, before loading.

        Raises
        ------
        ValueError
            One line naming the model; ``BudgetError`` for a Video-LLaVA video budget that is not a
            multiple of the frames (:func:`check_video_budget`).
        """
        super().check_model_config(model_cfg)
        check_video_budget(self.name, self.budget, model_cfg)
        if model_cfg.get("has_cls_token") is False and not self.qwen_fallback:
            raise ValueError(
                f"method 'visionzip': model {model_cfg.get('name')!r} has a vision tower without [CLS] and "
                "qwen_fallback is false (set method.params.qwen_fallback=true for the Qwen port, docs/methods/visionzip.md)"
            )

    # ------------------------------------------------------------------ hooks
    def reset(self) -> None:
        """Forget captures and records."""
        self.records = []
        self._captured = []
        self._batch = None

    def attach(self, adapter: Any) -> None:
        """Hook the encoder layer VisionZip reads (CLIP layer ``-2``; Qwen: the last ViT block's attention)."""
        if not adapter.has_cls_token:
            if not self.qwen_fallback:
                raise ValueError("method 'visionzip': Qwen2.5-VL has no [CLS] and qwen_fallback is false")
            blocks = adapter.vision_tower.blocks
            self.register_hook(blocks[len(blocks) - 1].attn, self._qwen_hook, pre=True, with_kwargs=True)
            self.note_attention(
                "vision", -1, "all (mean received)",
                "q.k^T softmax recomputed in fp32 for that block (query chunks); tower stays on its backend",
            )
            return
        for _, tower in adapter.vision_towers:
            layers = _encoder_layers(tower)
            self.register_hook(layers[len(layers) + VISION_LAYER], self._clip_hook, with_kwargs=True)
        self.note_attention(
            "vision", VISION_LAYER, "[CLS]",
            f"q.k^T softmax of the [CLS] row only, recomputed from the layer input "
            f"({'model dtype, as eager CLIP' if self.numerics == 'official' else 'fp32'}); layer output on its backend",
        )

    def _clip_hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        out = output[0] if isinstance(output, tuple) else output
        attn, keys = cls_attention_row(module, hidden, numerics=self.numerics)
        # head sum: official cls_attention.sum(dim=1) on the model-dtype weights; exact cast to fp32 after
        self._captured.append({"scores": attn.sum(dim=1).float(), "keys": keys.float(), "hidden": out})

    def _qwen_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        received, keys, _ = qwen_attention_received(module, hidden, kwargs["cu_seqlens"], kwargs["position_embeddings"])
        self._captured.append({"scores": received, "keys": keys})

    # ------------------------------------------------------------------ budget
    def unit_counts(self, n_tokens: int, share_of_budget: float, has_cls: bool) -> tuple[int, int]:
        """``(dominant, contextual)`` for a unit of ``n_tokens`` tokens ([CLS] included when ``has_cls``).

        ``share_of_budget``: the unit's share of an int budget (1, 1/5 for NeXT crops, 1/F for frames).
        """
        if self.dominant is not None and self.contextual is not None:
            d, c = int(self.dominant), int(self.contextual)
        else:
            if isinstance(self.budget, int):
                b = int(round(self.budget * share_of_budget))
                share = CONTEXTUAL_SHARE_INT
            else:  # a ratio of the unit's patch tokens ([CLS] not counted)
                b = int(round(float(self.budget) * (n_tokens - (1 if has_cls else 0))))
                share = CONTEXTUAL_SHARE_RATIO
            if self.contextual_share is not None:
                share = float(self.contextual_share)
            d, c = split_budget(max(1, b), share)
        d = max(1 if has_cls else 0, min(d, n_tokens))
        c = min(c, n_tokens - d)
        return d, c

    # ------------------------------------------------------------------ stage 1
    def _take_batch(self) -> dict[str, torch.Tensor]:
        if not self._captured:
            raise RuntimeError("visionzip: the vision encoder layer was not captured (is the context open?)")
        self._batch = self._captured[-1]
        self._captured = []
        return self._batch

    def flops_overhead(self, ctx: OverheadContext) -> dict[str, int]:
        """What this class recomputes besides the forward pass (``dvlab-research/VisionZip`` computes the
        same quantities from the tower's outputs).

        Towers with [CLS] (:func:`cls_attention_row` at layer -2): ``q_proj`` of the [CLS] row ``2·dv²``,
        ``k_proj`` of all ``n + 1`` tokens ``2(n+1)dv²``, the [CLS] scores ``2(n+1)dv``; contextual
        matching on head-mean keys ``2·rest·ctx·dk`` (``ctx`` = contextual tokens, 10 of 64, i.e.
        ``k // 6``; ``rest`` the tokens matched). Towers without [CLS] (:func:`qwen_attention_received`):
        the last block's ``qkv`` over all ``S`` patches ``2·S·dv·3dv`` and its full ``QKᵀ`` ``2·S²·dv``
        (every query row is needed), then the same matching on the tokens' head width.
        Terms ``cls_row_recompute`` / ``vit_qkv_recompute`` + ``vit_attention_recompute``, and
        ``contextual_matching``."""
        n, k = ctx.visual_tokens_in, ctx.visual_tokens_llm
        dv, heads = ctx.vision_hidden_size, ctx.vision_heads
        contextual = max(1, k // 6)
        rest = max(0, n - (k - contextual))
        matching = 2 * rest * contextual * (dv // heads)
        if not ctx.vision_has_cls:
            S = ctx.patches_per_token * n
            return {"vit_qkv_recompute": 2 * S * dv * 3 * dv, "vit_attention_recompute": 2 * S * S * dv,
                    "contextual_matching": matching}
        return {"cls_row_recompute": 2 * dv * dv + 2 * (n + 1) * dv * dv + 2 * (n + 1) * dv,
                "contextual_matching": matching}

    def token_map(self, num_visual_tokens: int, kept_indices: list[int] | None) -> TokenMap | None:
        """Kept tokens and merges from the last sample's :attr:`records` (one image, one unit whose encoder
        tokens are ``[CLS] + num_visual_tokens`` patches): kept = dominant patches + contextual targets,
        each contextual member -> its target. Record indices count [CLS] as 0, so patch ``t`` is visual
        token ``t - 1``; the [CLS] row enters the LLM too but has no patch, so it is not drawn.

        Returns
        -------
        TokenMap or None
            With ``kept_indices`` (``GenerationOutput.kept_indices`` has none on towers whose [CLS] row
            is kept); ``None`` when the last sample is not that single-unit pattern.
        """
        records = self.records
        if not isinstance(records, list) or len(records) != 1:
            return None
        rec = records[0]
        dominant, targets = list(rec.get("dominant", [])), list(rec.get("targets", []))
        members = list(rec.get("members", []))
        idx = [*dominant, *targets] + [m for ms in members for m in ms]
        n = int(num_visual_tokens)
        if not idx or max(idx) > n:
            return None
        roots = [-1] * n
        kept = []
        for t in [*dominant, *targets]:
            if t > 0:  # 0 = [CLS]
                roots[t - 1] = t - 1
                kept.append(t - 1)
        for t, ms in zip(targets, members):
            for m in ms:
                if m > 0 and t > 0:
                    roots[m - 1] = t - 1
        return TokenMap(roots, kept_indices=sorted(kept),
                        kept_source=f"{self.name}.records (dominant + contextual targets; [CLS] row not drawn)")

    def compress_visual(self, features: torch.Tensor, *, image_index: int) -> VisualSelection:
        """VisionZip on one image / video (see the module docstring for the per-model layout).

        Parameters
        ----------
        features : torch.Tensor
            ``(num_visual_tokens, hidden_size)`` projector output of the visual.
        image_index : int
            Its index in the sample.

        Returns
        -------
        VisualSelection
            ``(k, hidden_size)`` tokens; ``kept_indices`` as in the class notes.
        """
        adapter = self._adapter
        ctx = self.visual_context
        if adapter is None or ctx is None:
            raise RuntimeError("visionzip: compress_visual needs an open context (with method(adapter))")
        if image_index == 0 or self._batch is None:
            if image_index == 0:
                self.records = []
            batch = self._take_batch()
        else:
            batch = self._batch
        if not adapter.has_cls_token:
            return self._qwen(features, image_index, batch)
        if adapter.packs_crops:
            return self._next(features, image_index, batch)
        seg = ctx.segments[image_index]
        if seg.kind == "video":
            return self._video(features, seg, batch)
        return self._image(features, image_index, batch)

    def _unit(self, batch: dict[str, torch.Tensor], row: int, share: float) -> VisionZipResult:
        hidden = batch["hidden"][row]
        d, c = self.unit_counts(int(hidden.shape[0]) , share, True)
        res = visionzip_tokens(hidden, batch["scores"][row], batch["keys"][row], d, c, cls_index=0)
        self.records.append(
            {"dominant": res.dominant.tolist(), "targets": res.targets.tolist(),
             "members": [m.tolist() for m in res.members]}
        )
        return res

    def _image(self, features: torch.Tensor, image_index: int, batch: dict[str, torch.Tensor]) -> VisualSelection:
        """LLaVA-1.5 / Video-LLaVA image: ``[CLS, dominant patches, contextual]`` projected."""
        res = self._unit(batch, image_index, 1.0)
        out = self._adapter.project_visual(res.tokens.to(features.dtype))
        # rows: [CLS] (none of the 576 visual tokens: -1), dominant patches, contextual targets (stand-ins
        # for their clusters); layer tokens are [CLS] + patches, so patch p is visual token p - 1
        reported = torch.cat([res.dominant, res.targets]).to(torch.long) - 1
        return VisualSelection(out.to(features.dtype), None, reported_indices=reported.to(features.device))

    def _video(self, features: torch.Tensor, seg: Any, batch: dict[str, torch.Tensor]) -> VisualSelection:
        """Video-LLaVA video: per frame (257 tokens, [CLS] = token 0 of the frame), kept indices reported."""
        frames = list(seg.segments)
        nf = len(frames)
        t = frames[0].num_tokens
        if int(batch["hidden"].shape[0]) != nf or int(batch["hidden"].shape[1]) != t:
            raise RuntimeError(f"visionzip: captured {tuple(batch['hidden'].shape[:2])} for {nf} frames of {t} tokens")
        if isinstance(self.budget, int) and self.dominant is None and self.budget % nf:
            raise BudgetError(f"visionzip: Video-LLaVA budget {self.budget} is not a multiple of its {nf} frames")
        rows, idx = [], []
        for f in range(nf):
            res = self._unit(batch, f, 1.0 / nf)
            rows.append(res.tokens)
            idx.append(torch.cat([res.dominant, res.targets]) + f * t)
        out = self._adapter.project_visual(torch.cat(rows).to(features.dtype))
        return VisualSelection(out.to(features.dtype), torch.cat(idx).to(features.device))

    def _next(self, features: torch.Tensor, image_index: int, batch: dict[str, torch.Tensor]) -> VisualSelection:
        """LLaVA-NeXT: per crop, then the official layout (docs/methods/visionzip.md)."""
        adapter = self._adapter
        ctx = self.visual_context
        crops = adapter.num_crops(ctx.inputs)
        start = sum(crops[:image_index])
        nc = crops[image_index]
        rows_, cols_ = adapter.crop_grids(ctx.inputs)[image_index]
        side = int(adapter.patches_per_side)
        res = [self._unit(batch, start + c, 1.0 / NEXT_SUB_IMAGES) for c in range(nc)]
        hidden = batch["hidden"]
        parts = [res[0].tokens]  # base: [CLS, dominant patches, contextual]
        if nc > 1:
            keys, toks = [], []
            for c in range(1, nc):
                r = res[c]
                patches = r.dominant[r.dominant != 0] - 1
                cr, cc = divmod(c - 1, int(cols_))
                gy, gx = cr * side + patches // side, cc * side + patches % side
                keys.append(gy * (int(cols_) * side) + gx)
                toks.append(hidden[start + c].index_select(0, patches + 1))
            order = torch.cat(keys).argsort()
            parts.append(torch.cat(toks).index_select(0, order))  # dominant patches, raster over the full grid
            parts.append(torch.stack([hidden[start + c][0] for c in range(1, nc)]))  # the crops' CLS tokens
            parts.extend(r.tokens[r.dominant.numel():] for r in res[1:])  # the crops' contextual tokens
        out = adapter.project_visual(torch.cat(parts).to(features.dtype))
        return VisualSelection(out.to(features.dtype), None)

    def _qwen(self, features: torch.Tensor, image_index: int, batch: dict[str, torch.Tensor]) -> VisualSelection:
        """Qwen2.5-VL port (docs/methods/visionzip.md): scores / keys pooled per 2×2 merge unit, on the post-merger tokens."""
        from transformers.vision_utils import get_vision_window_index

        adapter = self._adapter
        ctx = self.visual_context
        if "unit_scores" not in batch:
            visual = adapter.vision_tower
            grid = ctx.inputs["image_grid_thw"]
            unit = int(visual.spatial_merge_size) ** 2
            window_index, _ = get_vision_window_index(
                grid, spatial_merge_size=visual.spatial_merge_size, window_size=visual.window_size,
                patch_size=visual.patch_size,
            )
            inv = torch.argsort(window_index.to(batch["scores"].device))
            sc = batch["scores"].view(-1, unit).mean(-1)[inv]  # attn_mean.view(N//4, -1).mean(-1) [issue #31]
            ks = batch["keys"].view(-1, unit, batch["keys"].shape[-1]).mean(1)[inv]
            counts = (grid.prod(-1) // unit).tolist()
            batch["unit_scores"] = list(torch.split(sc, counts))  # type: ignore[assignment]
            batch["unit_keys"] = list(torch.split(ks, counts))  # type: ignore[assignment]
        scores = batch["unit_scores"][image_index]
        keys = batch["unit_keys"][image_index]
        n = int(features.shape[0])
        if int(scores.shape[0]) != n:
            raise RuntimeError(f"visionzip: {scores.shape[0]} pooled scores for {n} Qwen2.5-VL visual tokens")
        d, c = self.unit_counts(n, 1.0, False)
        res = visionzip_tokens(features, scores, keys, d, c, cls_index=None)
        self.records.append(
            {"dominant": res.dominant.tolist(), "targets": res.targets.tolist(),
             "members": [m.tolist() for m in res.members]}
        )
        idx = torch.cat([res.dominant, res.targets])
        return VisualSelection(res.tokens.to(features.dtype), idx.to(features.device))
