"""``sparsevlm``: SparseVLM (Zhang et al., ICML 2025), v1.5 behaviour of the official main branch.

Source: ``Gumpest/SparseVLMs`` @ 26a5f48 (main, ``USE_VERSION`` unset = v1.5 algorithm), read for
docs/methods/sparsevlm.md; own code, nothing copied. Files followed:

* ``llava/model/language_model/modelling_sparse_llama.py``, ``LlamaDynamicvitModel.forward``: text
  raters before layer 0, pruning of the *output* of layers {2, 6, 15} during prefill, recycling;
* ``llava/model/language_model/score.py``: ``sparse_token_dict`` (per-budget schedules),
  ``attn_postprocess_topk`` (head mean, rater rows x visual columns, mean over raters, top-k);
* ``llava/model/language_model/utils.py``: ``cluster_and_merge`` (DPC-KNN clustering + plain mean).

What the method does on one sample (batch size 1, as the official code), docs/methods/sparsevlm.md:

1. **Text raters** (once, on the input of decoder layer 0, i.e. the input embeddings with the
   projected visual tokens in place): ``V`` = the visual tokens, ``T`` = every token after the last
   visual token (question + assistant prefix); ``M = softmax_text(V Tᵀ)`` (raw dot products), ``r`` =
   mean of ``M`` over the visual tokens; raters = text tokens with ``r > mean(r)``
   (:func:`select_text_raters`).
2. **Scores at a pruning layer ℓ**: the raters' attention rows of layer ℓ, averaged over heads,
   restricted to the visual columns, averaged over raters (:func:`rater_scores`). Only the rows of the
   text after the visual tokens are computed, at layer ℓ only, by
   :class:`apet_bench.attention.AttentionRowCapture` (every layer stays on sdpa / flash).
3. **Prune the output of ℓ** = drop at the input of layer ``ℓ + 1`` (the shared stage-2 surgery,
   :mod:`apet_bench.llm_surgery`): keep ``min(schedule[ℓ], n_visual - 1)`` top-scored visual tokens,
   in their sequence order. Layer ℓ's own KV cache stays full, as in the official code.
4. **Recycling** (v1.5): of the pruned tokens, the top ``int(0.3 p) + 1`` by score are clustered
   into ``int(m / 10) + 1`` groups with DPC-KNN on the layer-ℓ output hidden states and each group's
   mean becomes a new visual token (:func:`dpc_knn_merge`). They are written back as replacement hidden
   states (:class:`~apet_bench.methods.LLMSelection`) in slots of pruned tokens, so the visual count
   entering ``ℓ + 1`` is ``kept + clusters`` (:func:`tokens_after_prune`), and later pruning layers
   score them like any visual token, as the official code does.
5. **Positions** (v1.x, LLaVA family): renumbered contiguously at prefill, decode shifted
   (``renumber_positions``, :class:`~apet_bench.llm_surgery.LLMStageSurgery`). With the official
   order (clusters right after the kept visual tokens, before the text) the renumbered sequence is
   exactly the official one. On Qwen2.5-VL (3-D mRoPE) original positions are kept, as SparseVLM+ /
   the docs/methods/sparsevlm.md port do.

Schedules (:data:`V15_SCHEDULES`, :func:`resolve_schedule`; the YAML lists them with sources):
LLaVA-1.5 [code]; LLaVA-NeXT, Qwen2.5-VL and Video-LLaVA [derived] per docs/methods/sparsevlm.md

Upstream bug not reproduced (docs/methods/index.md, SparseVLM issues #29/#33/#35): the official "Equal Tokens"
log counts each layer's *output* tokens, so a "192" run holds 206.5 visual tokens per layer on average
when counted on layer inputs, recycled tokens included. The harness records the true per-layer counts
(``layer_visual_tokens``, = :meth:`SparseVLMCompressor.plan`); :func:`official_equal_tokens` gives the
official, under-counted number for the same plan. The paper's SparseVLM rows ("retain 192/128/64") are
the official schedules, which is what ``budget=192/128/64`` runs here (``accounting="official"``);
``accounting="layer_input"`` [derived] scales them so the true mean is the budget.

Named variants: ``version="2.0"`` (SparseVLM+: gravity correction, head selection, no recycling, original
positions), ``keep_rule="rank"`` (the video branch's ``rank(P)`` keep), ``recycle``, ``positions``,
``placement``, ``layers`` / ``schedule`` overrides. Checked against a naive re-implementation of the official
prefill in ``tests/test_sparsevlm.py`` (same logits within 1e-4).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import torch

from apet_bench.budget import BudgetError
from apet_bench.core import AttentionRequest
from apet_bench.methods.base import LLMSelection, TokenCompressor, register_method
from apet_bench.methods.records import OverheadContext

__all__ = [
    "OFFICIAL_LAYERS",
    "REFERENCE_TOKENS",
    "V15_SCHEDULES",
    "Schedule",
    "TextRows",
    "SparseVLMCompressor",
    "dpc_knn_merge",
    "fit_schedule",
    "official_equal_tokens",
    "plan_table",
    "rater_scores",
    "recycled_clusters",
    "resolve_schedule",
    "scale_layers",
    "rope_gravity",
    "select_heads_by_mass",
    "select_text_raters",
    "tokens_after_prune",
]

#: Visual tokens of LLaVA-1.5 (576): the official schedules are token counts on this span.
REFERENCE_TOKENS = 576
#: Pruning layers of the official code on the 32-layer LLaVA-1.5-7B (outputs pruned) [code]
#: ``LlamaDynamicvitModel(pruning_loc=[2, 6, 15])``.
OFFICIAL_LAYERS: tuple[int, ...] = (2, 6, 15)
#: v1.5 keep counts after each pruning layer, per budget [code] ``score.py`` (``USE_VERSION`` != 2_0).
#: 32 is [derived] (the 64 schedule halved, rounded half up), only used for LLaVA-NeXT's 160 (= 32/576).
V15_SCHEDULES: dict[int, tuple[int, ...]] = {
    192: (300, 200, 110),
    128: (303, 110, 36),
    96: (238, 48, 26),
    64: (66, 30, 17),
    32: (33, 15, 9),
}
#: SparseVLM+ (``USE_VERSION=2_0``) keep counts [code] ``score.py``; 32 [derived] as for v1.5.
V20_SCHEDULES: dict[int, tuple[int, ...]] = {
    192: (300, 200, 118),
    128: (238, 108, 60),
    96: (246, 54, 28),
    64: (66, 34, 20),
    32: (33, 17, 10),
}
#: Heads kept by SparseVLM+'s ``select_attn_head_by_sum`` on the 32-head LLaVA-1.5-7B [code]; other head
#: counts keep the same share, ``max(1, round(14 H / 32))`` [derived].
V20_HEADS = 14
V20_REFERENCE_HEADS = 32
VERSIONS = ("1.5", "2.0")
#: Sources of :data:`V15_SCHEDULES` entries.
V15_SOURCES: dict[int, str] = {192: "code", 128: "code", 96: "code", 64: "code", 32: "derived"}
#: LLaVA-NeXT's reference span (docs/methods/index.md: 5 x 576): its budgets 640/320/160 are the retentions
#: of LLaVA-1.5's 128/64/32.
NEXT_REFERENCE_TOKENS = 2880
#: Qwen2.5-VL-7B (28 layers) [derived] docs/methods/sparsevlm.md: retention -> (pruning layers, fractions of N kept),
#: the 128-schedule shape with the true (layer-input) equivalent average at 20 % / 10 % before recycling.
QWEN_SCHEDULES: dict[float, tuple[tuple[int, ...], tuple[float, ...]]] = {
    0.2: ((2, 5, 13), (0.34, 0.125, 0.041)),
    0.1: ((1, 5, 13), (0.093, 0.034, 0.011)),
}
QWEN_REFERENCE_LAYERS = 28
#: Video-LLaVA (``video`` branch, ``pruning_loc=[1]``) [code]; its rank-adaptive keep is replaced by a
#: fixed top-k of the budget [derived] (docs/methods/sparsevlm.md).
VIDEO_LAYERS: tuple[int, ...] = (1,)
#: Share of the pruned tokens recycled (``int(0.3 p) + 1``) and tokens per cluster (``int(m / 10) + 1``) [code].
RECYCLE_SHARE = 0.3
TOKENS_PER_CLUSTER = 10
#: Official DPC-KNN tie-break noise on the density (``torch.rand * 1e-6``); drawn from the seeded generator here.
DENSITY_NOISE = 1e-6

POSITIONS = ("auto", "renumber", "original")
ACCOUNTINGS = ("official", "layer_input")
KEEP_RULES = ("schedule", "rank")
PLACEMENTS = ("auto", "after_kept", "centre")


# ---------------------------------------------------------------------- schedule arithmetic
def recycled_clusters(num_pruned: int) -> int:
    """Recycled tokens added when ``num_pruned`` visual tokens are pruned (v1.5, [code]).

    ``m = int(0.3 p) + 1`` pruned tokens are clustered into ``int(m / 10) + 1`` clusters; 0 when nothing
    is pruned. E.g. 276 pruned -> 83 recycled -> 9 clusters.
    """
    p = int(num_pruned)
    if p <= 0:
        return 0
    m = int(p * RECYCLE_SHARE) + 1
    return int(m / TOKENS_PER_CLUSTER) + 1


def tokens_after_prune(num_visual: int, keep: int, *, recycle: bool = True) -> int:
    """Visual tokens entering the layer after a pruning layer (kept + recycled clusters).

    Parameters
    ----------
    num_visual : int
        Visual tokens at the pruning layer (tokens).
    keep : int
        Schedule count; the official code keeps ``min(keep, num_visual - 1)`` (``attn_postprocess_topk``).
    recycle : bool
        Add :func:`recycled_clusters` of the pruned tokens (v1.5).
    """
    n = int(num_visual)
    if n <= 0:
        return n
    k = max(0, min(int(keep), n - 1))
    return k + (recycled_clusters(n - k) if recycle else 0)


def official_equal_tokens(layer_inputs: Sequence[int]) -> float:
    """The official "Equal Tokens" log for a plan: the mean of each layer's **output** count.

    ``layer_inputs`` are per-layer input counts (``plan``); layer ``i``'s output count is layer ``i+1``'s
    input (the last layer keeps its input count). Reproduces the under-count of docs/methods/index.md (SparseVLM
    issues #29/#33/#35): 192.0 for the official "192" plan whose true input-counted mean is 206.5.
    """
    counts = [int(c) for c in layer_inputs]
    if not counts:
        return 0.0
    outputs = counts[1:] + counts[-1:]
    return sum(outputs) / len(outputs)


def scale_layers(layers: Sequence[int], num_layers: int, reference_layers: int) -> tuple[int, ...]:
    """Map pruning layers of a ``reference_layers``-deep model onto a ``num_layers``-deep one [derived].

    ``round(l * num_layers / reference_layers)``, then pushed up to stay strictly increasing. Identity for
    ``num_layers == reference_layers``; (2, 6, 15) of 32 -> (2, 5, 13) of 28 (docs/methods/sparsevlm.md) and
    (0, 1, 2) on the 4-layer tiny models.

    Raises
    ------
    ValueError
        When the last layer ends above ``num_layers - 2`` (its output must feed a layer).
    """
    out: list[int] = []
    for layer in layers:
        x = int(layer) if num_layers == reference_layers else int(float(layer) * num_layers / reference_layers + 0.5)
        if out:
            x = max(x, out[-1] + 1)
        out.append(x)
    if out and out[-1] > num_layers - 2:
        raise ValueError(
            f"method 'sparsevlm': pruning layers {list(layers)} (of {reference_layers}) do not fit a model with "
            f"{num_layers} decoder layers (mapped to {out}; the last must be <= {num_layers - 2})"
        )
    return tuple(out)


@dataclass(frozen=True)
class Schedule:
    """Where SparseVLM prunes on one model and how many visual tokens each pruning keeps.

    Attributes
    ----------
    layers : tuple of int
        Pruning layers ℓ on this model (the *output* of ℓ is pruned, i.e. the drop is at the input of
        ``ℓ + 1``), increasing, ``0 <= ℓ <= num_layers - 2``.
    counts : tuple of int or float
        Per pruning layer: ``kind="reference"`` token counts on a 576-token span (scaled to the sample's
        visual tokens ``N`` as ``round(c N / 576)``: exactly ``c`` for LLaVA-1.5); ``"fraction"``:
        fractions of ``N``; ``"absolute"``: token counts used as they are.
    kind : {"reference", "fraction", "absolute"}
    source : str
        ``"code"``, ``"derived"`` or ``"user"`` (with the file or section).
    """

    layers: tuple[int, ...]
    counts: tuple[Any, ...]
    kind: str
    source: str
    scale: float = 1.0

    def keep(self, stage: int, num_visual_tokens: int) -> int:
        """Schedule count at pruning ``stage`` (0-based) for a sample of ``num_visual_tokens`` (tokens, at layer 0).

        ``scale`` = 1 (the table): exact integer rounding half up. Otherwise (``accounting="layer_input"``)
        ``max(1, round(scale x count))``.
        """
        c = self.counts[stage]
        n = int(num_visual_tokens)
        if self.scale != 1.0:
            base = float(c) * n / REFERENCE_TOKENS if self.kind == "reference" else (
                float(c) * n if self.kind == "fraction" else float(c))
            return max(1, int(base * self.scale + 0.5))
        if self.kind == "reference":
            return (2 * int(c) * n + REFERENCE_TOKENS) // (2 * REFERENCE_TOKENS)  # round half up, integer
        if self.kind == "fraction":
            return int(float(c) * n + 0.5)
        return int(c)

    def plan(self, num_layers: int, num_visual_tokens: int, *, recycle: bool) -> list[int]:
        """Visual tokens at the input of each of ``num_layers`` layers for ``num_visual_tokens`` at layer 0."""
        drops = {layer + 1: i for i, layer in enumerate(self.layers)}
        n0 = n = int(num_visual_tokens)
        out = []
        for i in range(int(num_layers)):
            if i in drops and n > 0:
                n = tokens_after_prune(n, self.keep(drops[i], n0), recycle=recycle)
            out.append(n)
        return out


def fit_schedule(schedule: Schedule, num_layers: int, num_visual_tokens: int, target: float, *,
                 recycle: bool, family: str = "?") -> Schedule:
    """``accounting="layer_input"`` [derived]: the schedule's shape scaled so that the true mean of visual
    tokens at the layer inputs, recycled tokens included, is the largest one ``<= target``.

    Binary search on the scale (the mean does not decrease with it), 40 halvings of [0, 64].

    Raises
    ------
    BudgetError
        When even the smallest schedule (1 token kept per pruning) stays above ``target``: the layers
        before the first pruning carry every visual token (docs/methods/index.md feasibility limit).
    """
    def mean(scale: float) -> float:
        return sum(replace(schedule, scale=scale).plan(num_layers, num_visual_tokens, recycle=recycle)) / num_layers

    floor = mean(1e-12)
    if floor > target:
        full = schedule.layers[0] + 1
        raise BudgetError(
            f"{_name(family)}: accounting=layer_input cannot reach {target:g} visual tokens per layer: the first "
            f"{full} of {num_layers} layers carry all {num_visual_tokens} tokens (smallest schedule averages {floor:.1f})"
        )
    lo, hi = 1e-12, 64.0
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if mean(mid) <= target else (lo, mid)
    return replace(schedule, scale=lo, source=f"{schedule.source}; scaled x{lo:.4f} to a true mean <= {target:g} [derived]")


def _name(family: str) -> str:
    return f"method 'sparsevlm' on {family}"


def _reference_key(budget: int | float, family: str, visual_tokens: int | None) -> int:
    """Budget -> its LLaVA-1.5 equivalent on 576 tokens (same retention), for the reference tables."""
    if isinstance(budget, float):
        key = budget * REFERENCE_TOKENS
    else:
        span = NEXT_REFERENCE_TOKENS if family == "llava_next" else REFERENCE_TOKENS
        key = budget * REFERENCE_TOKENS / span
    rounded = int(round(key))
    if abs(key - rounded) > 1e-6 or rounded not in V15_SCHEDULES:
        labels = {
            "llava_next": ", ".join(str(k * NEXT_REFERENCE_TOKENS // REFERENCE_TOKENS) for k in V15_SCHEDULES),
        }.get(family, ", ".join(str(k) for k in V15_SCHEDULES))
        raise BudgetError(
            f"{_name(family)}: no schedule for budget {budget!r} (schedules exist for {labels} tokens, or pass "
            "schedule=[...] with layers=[...])"
        )
    return rounded


def resolve_schedule(
    family: str,
    num_layers: int,
    budget: int | float,
    *,
    layers: Sequence[int] | None = None,
    schedule: Sequence[int] | None = None,
    visual_tokens: int | None = None,
    version: str = "1.5",
) -> Schedule:
    """The pruning layers and keep counts SparseVLM uses for ``budget`` on a model.

    Parameters
    ----------
    family : str
        Adapter family: ``llava15``, ``llava_next``, ``qwen25vl``, ``video_llava``.
    num_layers : int
        Decoder layers of the model (32 for the 7B LLaVAs, 28 for Qwen2.5-VL-7B, 4 for the tiny ones).
    budget : int or float
        The paper's budget: tokens (LLaVA-1.5 192/128/96/64, LLaVA-NeXT 640/320/160, Video-LLaVA 256) or a
        retention ratio (Qwen2.5-VL 0.2/0.1; LLaVA ratios equal to those token budgets also work).
    layers : sequence of int, optional
        Pruning layers on this model overriding the table (outputs pruned; ``0 <= l <= num_layers - 2``).
    schedule : sequence of int, optional
        Absolute keep counts after each pruning layer overriding the table (non-increasing, >= 1).
    visual_tokens : int, optional
        Unused by the tables; kept for messages.
    version : {"1.5", "2.0"}
        ``"2.0"``: the SparseVLM+ table (:data:`V20_SCHEDULES`) for the LLaVA families; refused on
        Qwen2.5-VL (its gravity correction is defined for 1-D RoPE only).

    Returns
    -------
    Schedule

    Raises
    ------
    BudgetError
        A budget without a schedule for the family (one line listing the budgets that have one).
    ValueError
        Bad ``layers`` / ``schedule`` (lengths, order, range) or a model too shallow for the layers.
    """
    n_layers = int(num_layers)
    if version not in VERSIONS:
        raise ValueError(f"method 'sparsevlm': version {version!r} is not one of {list(VERSIONS)}")
    if version == "2.0" and family == "qwen25vl":
        raise ValueError(
            "method 'sparsevlm' on qwen25vl: version 2.0 (SparseVLM+) corrects attention by a 1-D RoPE pattern; "
            "no mRoPE port exists (use version 1.5)"
        )
    if schedule is not None:
        counts = tuple(int(c) for c in schedule)
        if layers is None:
            ref = QWEN_SCHEDULES[0.2][0] if family == "qwen25vl" else (VIDEO_LAYERS if family == "video_llava" else OFFICIAL_LAYERS)
            ref_layers = QWEN_REFERENCE_LAYERS if family == "qwen25vl" else 32
            lay = scale_layers(ref, n_layers, ref_layers) if len(ref) == len(counts) else None
            if lay is None:
                raise ValueError(
                    f"{_name(family)}: schedule {list(counts)} has {len(counts)} counts but the default layers "
                    f"{list(ref)} are {len(ref)}; pass layers=[...] too"
                )
        else:
            lay = _check_layers(layers, n_layers, family)
        if len(lay) != len(counts):
            raise ValueError(f"{_name(family)}: schedule {list(counts)} and layers {list(lay)} differ in length")
        if any(c < 1 for c in counts) or any(b > a for a, b in zip(counts, counts[1:])):
            raise ValueError(f"{_name(family)}: schedule {list(counts)} must be >= 1 and non-increasing")
        return Schedule(lay, counts, "absolute", "user")
    if family == "qwen25vl":
        if not isinstance(budget, float) or not any(abs(budget - r) < 1e-9 for r in QWEN_SCHEDULES):
            raise BudgetError(
                f"{_name(family)}: no schedule for budget {budget!r} (schedules exist for retention ratios "
                f"{', '.join(str(r) for r in QWEN_SCHEDULES)}, or pass schedule=[...] with layers=[...])"
            )
        key = min(QWEN_SCHEDULES, key=lambda r: abs(r - float(budget)))
        ref_layers, fracs = QWEN_SCHEDULES[key]
        lay = _check_layers(layers, n_layers, family) if layers is not None else scale_layers(
            ref_layers, n_layers, QWEN_REFERENCE_LAYERS)
        if len(lay) != len(fracs):
            raise ValueError(f"{_name(family)}: layers {list(lay)} must be {len(fracs)} pruning layers")
        return Schedule(lay, fracs, "fraction", "derived (docs/methods/sparsevlm.md)")
    if family == "video_llava":
        lay = _check_layers(layers, n_layers, family) if layers is not None else scale_layers(VIDEO_LAYERS, n_layers, 32)
        if len(lay) != 1:
            raise ValueError(f"{_name(family)}: layers {list(lay)} must be 1 pruning layer (video branch: [1])")
        if isinstance(budget, float):
            return Schedule(lay, (budget,), "fraction", "derived (docs/methods/sparsevlm.md: top-k instead of rank)")
        return Schedule(lay, (int(budget),), "absolute", "derived (docs/methods/sparsevlm.md: top-k instead of rank)")
    if family not in ("llava15", "llava_next"):
        raise ValueError(f"method 'sparsevlm': no schedules for model family {family!r}; pass schedule=[...]")
    key = _reference_key(budget, family, visual_tokens)
    counts = (V20_SCHEDULES if version == "2.0" else V15_SCHEDULES)[key]
    lay = _check_layers(layers, n_layers, family) if layers is not None else scale_layers(OFFICIAL_LAYERS, n_layers, 32)
    if len(lay) != len(counts):
        raise ValueError(f"{_name(family)}: layers {list(lay)} must be {len(counts)} pruning layers")
    src = V15_SOURCES[key] if family == "llava15" else "derived (docs/methods/sparsevlm.md: LLaVA-1.5 schedule x N/576)"
    return Schedule(lay, counts, "reference", src)


def _check_layers(layers: Sequence[int], num_layers: int, family: str) -> tuple[int, ...]:
    lay = tuple(int(x) for x in layers)
    if not lay or list(lay) != sorted(set(lay)) or lay[0] < 0 or lay[-1] > num_layers - 2:
        raise ValueError(
            f"{_name(family)}: layers {list(layers)} must be increasing pruning layers in [0, {num_layers - 2}] "
            f"for a model with {num_layers} decoder layers"
        )
    return lay


# ---------------------------------------------------------------------- tensor primitives
def select_text_raters(visual: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """SparseVLM's text raters (paper §3.2; ``modelling_sparse_llama.py``, before the layer loop).

    Parameters
    ----------
    visual : torch.Tensor
        ``(num_visual, hidden)`` input embeddings of the visual tokens.
    text : torch.Tensor
        ``(num_text, hidden)`` input embeddings of the tokens after the visual span.

    Returns
    -------
    torch.Tensor
        ``(num_raters,)`` long, increasing indices into ``text``: ``r_t > mean(r)`` with
        ``r = mean_visual(softmax_text(V Tᵀ))`` (raw dot products, no scaling; float32 here). Empty when
        every ``r_t`` is equal (e.g. a single text token).
    """
    m = torch.softmax(visual.float() @ text.float().T, dim=1).mean(0)  # (num_text,)
    return torch.nonzero(m > m.mean()).flatten()


def rater_scores(
    attention: torch.Tensor, rater_rows: torch.Tensor, visual_columns: torch.Tensor, *, numerics: str = "fp32"
) -> torch.Tensor:
    """Visual-token scores from the raters' attention (``score.py`` ``attn_postprocess_topk``).

    Parameters
    ----------
    attention : torch.Tensor
        ``(num_heads, num_rows, seq_len)`` attention probabilities of some query rows at one layer.
    rater_rows : torch.Tensor
        ``(num_raters,)`` indices into ``num_rows``.
    visual_columns : torch.Tensor
        ``(num_visual,)`` columns of the visual tokens.
    numerics : {"fp32", "official"}
        ``"fp32"``: both means in float32. ``"official"``: both in ``attention``'s dtype (the official
        ``self_attn_weights.mean(1)`` then ``relation_vis_text.mean(1)`` on the fp16 eager weights).

    Returns
    -------
    torch.Tensor
        ``(num_visual,)``: mean over heads, then over raters, of the attention on each visual token
        (float32, or ``attention``'s dtype under ``"official"``).
    """
    a = (attention if numerics == "official" else attention.float()).mean(0)  # (rows, seq)
    a = a.index_select(0, rater_rows.to(a.device)).index_select(1, visual_columns.to(a.device))
    return a.mean(0)


def rope_gravity(query_positions: torch.Tensor, key_positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """SparseVLM+'s RoPE-only attention pattern ("gravity", ``modelling_sparse_llama.py`` under ``V2_0``).

    The official code rotates all-ones queries and keys with the layer's RoPE and takes
    ``q kᵀ / √d``; for 1-D RoPE that equals ``Σ_i 2 cos((m - n) θ_i) / √d`` (``d = 2 len(θ)``), computed
    here in closed form.

    Parameters
    ----------
    query_positions, key_positions : torch.Tensor
        ``(R,)`` and ``(L,)`` RoPE positions.
    inv_freq : torch.Tensor
        ``(d / 2,)`` RoPE frequencies θ of the layer.

    Returns
    -------
    torch.Tensor
        ``(R, L)`` float32.
    """
    theta = inv_freq.float().to(query_positions.device)
    delta = (query_positions.float()[:, None] - key_positions.float()[None, :].to(query_positions.device))
    d = 2 * theta.numel()
    return (2.0 * torch.cos(delta[..., None] * theta)).sum(-1) / (d**0.5)


def select_heads_by_mass(attention: torch.Tensor, rater_rows: torch.Tensor, visual_columns: torch.Tensor,
                         num_heads: int) -> torch.Tensor:
    """SparseVLM+'s ``select_attn_head_by_sum``: the heads with the largest rater->visual attention sum.

    Parameters
    ----------
    attention : torch.Tensor
        ``(heads, rows, seq_len)``.
    rater_rows, visual_columns : torch.Tensor
        Indices into rows / columns.
    num_heads : int
        Heads to keep.

    Returns
    -------
    torch.Tensor
        ``(num_heads,)`` long head indices, by decreasing mass (``topk`` order).
    """
    mass = attention.float().index_select(1, rater_rows).index_select(2, visual_columns).sum((1, 2))
    return torch.topk(mass, min(int(num_heads), mass.numel())).indices


def dpc_knn_merge(
    x: torch.Tensor, cluster_num: int, *, generator: torch.Generator | None = None, noise: float = DENSITY_NOISE
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPC-KNN clustering and plain mean per cluster (``utils.py`` ``cluster_and_merge``, one row).

    Distances ``‖x_i - x_j‖ / √C``; density ``exp(-mean(d²))`` over the ``cluster_num`` nearest tokens
    (itself included) plus ``noise · U[0, 1)`` (drawn from ``generator``: the official draw is unseeded);
    each token's distance to the nearest denser token (the largest distance for the densest); centres =
    top ``cluster_num`` of ``distance × density``; every token joins its nearest centre (a centre its
    own cluster); cluster token = sum / (size + 1e-6), as the official code.

    Parameters
    ----------
    x : torch.Tensor
        ``(m, C)`` tokens to cluster (the recycled pruned tokens, in score order).
    cluster_num : int
        Clusters, ``1 <= cluster_num <= m``.

    Returns
    -------
    merged : torch.Tensor
        ``(cluster_num, C)`` in ``x``'s dtype, in centre order (score descending).
    centres : torch.Tensor
        ``(cluster_num,)`` long indices into ``x``.
    assign : torch.Tensor
        ``(m,)`` long: each token's cluster.

    Raises
    ------
    ValueError
        For ``cluster_num`` outside ``[1, m]``.
    """
    m, c = x.shape
    if not 1 <= int(cluster_num) <= m:
        raise ValueError(f"dpc_knn_merge: cluster_num {cluster_num} is not in [1, {m}]")
    xf = x.float()
    dist = torch.cdist(xf[None], xf[None], compute_mode="donot_use_mm_for_euclid_dist")[0] / (c**0.5)
    nearest = torch.topk(dist, k=int(cluster_num), dim=-1, largest=False).values
    density = (-(nearest**2).mean(dim=-1)).exp()
    density = density + torch.rand(m, generator=generator).to(density.device) * noise
    denser = density[None, :] > density[:, None]  # (i, j): j denser than i
    dist_max = dist.max()
    parent_dist = torch.where(denser, dist, dist_max).min(dim=-1).values
    centres = torch.topk(parent_dist * density, k=int(cluster_num)).indices
    assign = dist.index_select(0, centres).argmin(dim=0)
    assign[centres] = torch.arange(int(cluster_num), device=x.device)
    sums = torch.zeros(int(cluster_num), c, dtype=torch.float32, device=x.device).index_add_(0, assign, xf)
    sizes = torch.bincount(assign, minlength=int(cluster_num)).float()
    merged = sums / (sizes[:, None] + 1e-6)
    return merged.to(x.dtype), centres, assign


# ---------------------------------------------------------------------- the method
class TextRows(tuple):
    """Row spec of :class:`~apet_bench.attention.AttentionRequest`: the ``t`` tokens after the visual span,
    as negative indices ``(-t, ..., -1)`` (pruning never moves them). Its repr does not depend on ``t``, so
    the per-layer backend record (``attention_backends``) reads the same for every sample."""

    def __new__(cls, num_text: int) -> TextRows:
        return super().__new__(cls, range(-int(num_text), 0))

    def __repr__(self) -> str:
        return "'text after the visual span (SparseVLM raters among them)'"


@register_method("sparsevlm")
@dataclass
class SparseVLMCompressor(TokenCompressor):
    """SparseVLM v1.5: text raters, pruning at the official layers with the official schedules, recycling.

    Parameters
    ----------
    budget : int or float
        The paper's budget (required): LLaVA-1.5 192/128/96/64, LLaVA-NeXT 640/320/160, Video-LLaVA 256
        tokens; Qwen2.5-VL 0.2/0.1. Selects the schedule (:func:`resolve_schedule`), see the module and
        ``configs/method/sparsevlm.yaml`` for every number and its source.
    version : {"1.5", "2.0"}
        ``"1.5"`` (default): the main branch's v1.5 algorithm. ``"2.0"``: SparseVLM+ (``USE_VERSION=2_0``,
        docs/methods/sparsevlm.md): its schedules (:data:`V20_SCHEDULES`), attention divided by the RoPE-only pattern
        (:func:`rope_gravity`), the 14 of 32 heads with the largest rater->visual mass
        (:func:`select_heads_by_mass`), no recycling, original positions. LLaVA families / Video-LLaVA only.
    recycle : bool or None
        Token recycling; ``None`` (default) = as the version does (1.5: on, 2.0: off).
    positions : {"auto", "renumber", "original"}
        ``auto``: renumbered for v1.5 on 1-D RoPE models (official v1.x); original positions for v2.0
        (official) and on Qwen2.5-VL's mRoPE (docs/methods/sparsevlm.md port).
    placement : {"auto", "after_kept", "centre"}
        Where recycled tokens go. ``after_kept`` (official): right after the kept visual tokens (in the
        slots of the last pruned tokens; kept tokens re-slotted in order if needed, which renumbered
        positions make identical to the official sequence); ``centre``: each in its DPC centre's slot
        (its original position). ``auto``: ``after_kept`` when positions are renumbered, else ``centre``.
    accounting : {"official", "layer_input"}
        ``official`` (default): the table's schedule for the budget, as the paper's SparseVLM rows ran it;
        its official "Equal Tokens" (each layer's *output*, docs/methods/index.md) is the budget while the true
        layer-input mean, recycled tokens included, is higher (206.5 for 192; recorded as measured).
        ``layer_input`` [derived]: the same shape scaled per sample (:func:`fit_schedule`) so that the true
        layer-input mean is at most the budget; refused when the layers before the first pruning already
        exceed it (e.g. LLaVA-NeXT 160, docs/methods/index.md).
    keep_rule : {"schedule", "rank"}
        ``schedule`` (default): the budget's schedule. ``rank``: the official **video** branch's rule
        (``videollava/.../score.py`` ``attn_postprocess_rank``): keep ``rank(P)`` tokens, ``P`` = the raters'
        head-mean attention on the visual tokens, or every token when ``rank >= n`` (no recycling then); the
        budget is then only a label (docs/methods/sparsevlm.md; Table 4's "256" needs the [derived] top-k instead).
        The plan is the last sample's counts.
    layers : list of int, optional
        Pruning layers on the model (outputs pruned) instead of the table's; ``[2, 6, 15]`` on 32 layers.
    schedule : list of int, optional
        Absolute keep counts after each pruning layer instead of the table's.
    seed : int
        Seeds the DPC-KNN density tie-break noise (official: unseeded ``torch.rand``).

    Raises
    ------
    BudgetError
        No budget, or (in :meth:`check_model_config`) a budget without a schedule for the model.
    ValueError
        A bad option value, or bad ``layers`` / ``schedule`` (one line naming it).

    Notes
    -----
    Batch size 1 (as the official code). Kept indices (``GenerationOutput.kept_indices``) are the visual
    slots alive after the last pruning: kept tokens and the slots holding recycled tokens.
    """

    version: str = "1.5"
    recycle: bool | None = None
    positions: str = "auto"
    placement: str = "auto"
    accounting: str = "official"
    keep_rule: str = "schedule"
    layers: list[int] | None = None  # type: ignore[assignment]
    schedule: list[int] | None = None

    stage: ClassVar[str] = "llm"
    needs_attention_weights: ClassVar[bool] = True
    #: The budget is the official schedule's "Equal Tokens" accounting, whose last stage may end above the
    #: budget (e.g. a video at 256): the plan is the budget (apet_bench.testing's ``budget`` check).
    budget_accounting: ClassVar[str] = "plan"

    _generator: torch.Generator | None = field(default=None, init=False, repr=False, compare=False)
    _raters: torch.Tensor | None = field(default=None, init=False, repr=False, compare=False)
    _num_text: int | None = field(default=None, init=False, repr=False, compare=False)
    _n0: int | None = field(default=None, init=False, repr=False, compare=False)
    _orig: torch.Tensor | None = field(default=None, init=False, repr=False, compare=False)
    _fits: dict = field(default_factory=dict, init=False, repr=False, compare=False)
    _rank_keeps: dict = field(default_factory=dict, init=False, repr=False, compare=False)
    _input_ids: torch.Tensor | None = field(default=None, init=False, repr=False, compare=False)
    _mask: torch.Tensor | None = field(default=None, init=False, repr=False, compare=False)
    #: Per pruning: ``{"layer", "scores", "kept", "recycled", "centres"}`` of the last prefill (tests, figures).
    last_record: list[dict[str, Any]] = field(default_factory=list, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.budget is None:
            raise BudgetError(f"method {self.name!r} needs a budget (an int token count or a float in (0, 1])")
        if isinstance(self.version, float):
            self.version = f"{self.version:.1f}"
        if self.version not in VERSIONS:
            raise ValueError(f"method {self.name!r}: version {self.version!r} is not one of {list(VERSIONS)}")
        if self.recycle is not None and not isinstance(self.recycle, bool):
            raise ValueError(f"method {self.name!r}: recycle {self.recycle!r} is not true/false/null")
        if self.positions not in POSITIONS:
            raise ValueError(f"method {self.name!r}: positions {self.positions!r} is not one of {list(POSITIONS)}")
        if self.accounting not in ACCOUNTINGS:
            raise ValueError(f"method {self.name!r}: accounting {self.accounting!r} is not one of {list(ACCOUNTINGS)}")
        if self.keep_rule not in KEEP_RULES:
            raise ValueError(f"method {self.name!r}: keep_rule {self.keep_rule!r} is not one of {list(KEEP_RULES)}")
        if self.placement not in PLACEMENTS:
            raise ValueError(f"method {self.name!r}: placement {self.placement!r} is not one of {list(PLACEMENTS)}")
        for key in ("layers", "schedule"):
            v = getattr(self, key)
            if v is None:
                continue
            if isinstance(v, (str, bytes)) or not isinstance(v, Sequence) or not v or any(
                isinstance(x, bool) or not isinstance(x, int) for x in v
            ):
                raise ValueError(f"method {self.name!r}: {key} {v!r} is not a non-empty list of ints")
            setattr(self, key, [int(x) for x in v])
        if self.schedule is not None and (
            any(c < 1 for c in self.schedule) or any(b > a for a, b in zip(self.schedule, self.schedule[1:]))
        ):
            raise ValueError(f"method {self.name!r}: schedule {self.schedule} must be >= 1 and non-increasing")
        if self.layers is not None and (self.layers != sorted(set(self.layers)) or self.layers[0] < 0):
            raise ValueError(f"method {self.name!r}: layers {self.layers} must be increasing and >= 0")

    # ------------------------------------------------------------------ configuration
    def schedule_for(self, family: str, num_layers: int) -> Schedule:
        """:func:`resolve_schedule` with this method's budget and overrides."""
        return resolve_schedule(family, num_layers, self.budget, layers=self.layers, schedule=self.schedule,  # type: ignore[arg-type]
                                version=self.version)

    @property
    def recycling(self) -> bool:
        """Whether pruned tokens are recycled: :attr:`recycle`, or the version's choice when ``None``."""
        return self.version == "1.5" if self.recycle is None else bool(self.recycle)

    def check_model_config(self, model_cfg: dict[str, Any]) -> None:
        """Refuse, before loading, a budget without a schedule or layers the model cannot hold (one line)."""
        family, n = model_cfg.get("family"), model_cfg.get("num_layers")
        if family is not None and n is not None:
            self.schedule_for(str(family), int(n))
            tokens = model_cfg.get("visual_tokens")
            if self.accounting == "layer_input" and tokens:
                self.fitted(str(family), int(n), int(tokens))  # the model's nominal visual tokens per input
        super().check_model_config(model_cfg)

    def fitted(self, family: str, num_layers: int, num_visual_tokens: int) -> Schedule:
        """The schedule applied to a sample of ``num_visual_tokens``: the table's (``accounting="official"``)
        or its :func:`fit_schedule` scaling (``"layer_input"``; cached per input size)."""
        sched = self.schedule_for(family, num_layers)
        if self.accounting == "official":
            return sched
        key = (family, int(num_layers), int(num_visual_tokens))
        if key not in self._fits:
            n = int(num_visual_tokens)
            target = float(self.budget) if isinstance(self.budget, int) else float(self.budget) * n  # type: ignore[arg-type]
            self._fits[key] = fit_schedule(sched, int(num_layers), n, target, recycle=self.recycling, family=family)
        return self._fits[key]

    def _schedule(self) -> Schedule:
        adapter = self._adapter
        if adapter is None:
            raise RuntimeError(f"method {self.name!r} is not attached to a model")
        return self.schedule_for(adapter.family, adapter.num_layers)

    @property  # type: ignore[override]
    def renumber_positions(self) -> bool:  # type: ignore[override]
        """Renumber positions after each pruning (official v1.x) unless original positions are chosen."""
        if self.positions == "renumber":
            return True
        if self.positions == "original":
            return False
        if self.version == "2.0":
            return False
        adapter = self._adapter
        return adapter is None or getattr(adapter, "position_encoding", "rope-1d") == "rope-1d"

    def _placement(self) -> str:
        if self.placement != "auto":
            return self.placement
        return "after_kept" if self.renumber_positions else "centre"

    def flops_overhead(self, ctx: OverheadContext) -> dict[str, int]:
        """Raters ``V·Tᵀ`` on the input embeddings (``2·n·t·d``, ``t`` = text tokens after the visual
        span), the raters' attention rows at each pruning layer (``2·t·seq·d``, computed by the shared row
        capture), DPC-KNN recycling of the ``m = int(0.3 p) + 1`` best of the ``p`` pruned tokens
        (pairwise distances ``2m²d``; density and means element-wise, not counted); as
        ``Gumpest/SparseVLMs`` @ 26a5f48 ``modelling_sparse_llama.py`` and ``utils.py`` ``cluster_and_merge`` (v1.5). A drop at the input
        of layer ``ℓ`` is the pruning of layer ``ℓ - 1``'s output, hence the ``L<ℓ-1>`` keys."""
        d = ctx.hidden_size
        t_after = ctx.text_tokens_after_image
        out = {"raters": 2 * ctx.visual_tokens_llm * t_after * d}
        for drop in ctx.drops:
            seq = drop.before + ctx.text_tokens
            out[f"rater_rows_L{drop.layer - 1}"] = 2 * t_after * seq * d
            pruned = max(0, drop.before - drop.after)
            m = int(0.3 * pruned) + 1 if pruned else 0
            out[f"recycling_L{drop.layer - 1}"] = 2 * m * m * d
        return out

    def config_dict(self) -> dict[str, Any]:
        """As the base class, plus the resolved schedule when attached."""
        out = super().config_dict()
        if self._adapter is not None:
            s = self._schedule()
            out["resolved_schedule"] = {"layers": list(s.layers), "counts": list(s.counts), "kind": s.kind,
                                        "source": s.source}
        return out

    # ------------------------------------------------------------------ lifecycle
    def reset(self) -> None:
        """Seed the CPU generator of the DPC-KNN noise; forget the last sample."""
        self._generator = torch.Generator(device="cpu").manual_seed(self.seed)
        self._raters = self._num_text = self._n0 = self._orig = None
        self._rank_keeps = {}
        self.last_record = []

    def attach(self, adapter: Any) -> None:
        """Hooks: the model's prefill inputs (``input_ids``), and layer 0's input (text raters)."""
        self.schedule_for(adapter.family, adapter.num_layers)  # fail early on a model without a schedule
        self.register_hook(adapter.model, self._on_model, pre=True, with_kwargs=True)
        self.register_hook(adapter.decoder_layers[0], self._on_layer0, pre=True, with_kwargs=True)

    def detach(self, adapter: Any) -> None:
        """Drop per-sample tensors."""
        self._input_ids = self._mask = None

    def _on_model(self, module: Any, args: tuple, kwargs: dict) -> None:
        cache = kwargs.get("past_key_values")
        if cache is not None and int(cache.get_seq_length(0)) > 0:
            return
        ids = kwargs.get("input_ids", args[0] if args else None)
        mask = kwargs.get("attention_mask")
        self._input_ids = ids
        self._mask = mask if isinstance(mask, torch.Tensor) and mask.ndim == 2 else None
        self._raters = self._num_text = self._n0 = self._orig = None
        self._rank_keeps = {}
        self.last_record = []

    def _on_layer0(self, module: Any, args: tuple, kwargs: dict) -> None:
        cache = kwargs.get("past_key_values")
        if cache is not None and int(cache.get_seq_length(0)) > 0:
            return
        if self._input_ids is None:
            return
        hidden = args[0] if args else kwargs["hidden_states"]
        if hidden.shape[0] != 1:
            raise ValueError(f"method {self.name!r} supports batch size 1 (as the official code), got {hidden.shape[0]}")
        pos_ids = kwargs.get("position_ids")
        if isinstance(pos_ids, torch.Tensor) and pos_ids.ndim == 2:
            self._orig = pos_ids[0].detach().to(hidden.device)  # RoPE positions of the columns (1-D RoPE)
        else:
            self._orig = torch.arange(hidden.shape[1], device=hidden.device)
        vis = self._adapter.visual_positions(self._input_ids, self._mask)[0].to(hidden.device)
        self._n0 = int(vis.numel())
        if self._n0 == 0:
            return
        last = int(vis[-1])
        text = hidden[0, last + 1:]
        self._num_text = int(text.shape[0])
        self._raters = select_text_raters(hidden[0].index_select(0, vis), text) if self._num_text else None
        self.note_attention("llm", 0, "visual x text-after-visual (rater relevance)",
                            "softmax over text of raw V·Tᵀ on the input embeddings (SparseVLM raters), float32")

    # ------------------------------------------------------------------ stage 2
    def llm_layers(self) -> tuple[int, ...]:
        """Drop layers = pruning layers + 1 on the attached model (``()`` when detached)."""
        if self._adapter is None:
            return ()
        return tuple(layer + 1 for layer in self._schedule().layers)

    def attention_request(self, layer_idx: int) -> Any:
        """Rows of every token after the visual span (negative indices: pruning never moves them) at the
        pruning layer ``layer_idx - 1``; the raters are picked among them in :meth:`select_llm_tokens`."""

        rows: Any = "last"
        ctx = self.visual_context
        if ctx is not None and self._adapter is not None and "input_ids" in ctx.inputs:
            ids = ctx.inputs["input_ids"]
            mask = ctx.inputs.get("attention_mask")
            vis = self._adapter.visual_positions(ids[:1], mask[:1] if isinstance(mask, torch.Tensor) else None)[0]
            if vis.numel():
                t = int(ids.shape[1]) - 1 - int(vis[-1])
                if t > 0:
                    rows = TextRows(t)
        return AttentionRequest(layer=layer_idx - 1, rows=rows, numerics=self.numerics)

    def plan(self, adapter: Any, num_visual_tokens: int) -> list[int]:
        """Visual tokens at the input of every decoder layer: ``N`` up to the first drop, then kept + recycled."""
        n = int(num_visual_tokens)
        if n <= 0:
            return [n] * adapter.num_layers
        s = self.fitted(adapter.family, adapter.num_layers, n)
        if self.keep_rule == "rank":  # the counts of the last sample (plan is read after generate)
            drops = {layer + 1: i for i, layer in enumerate(s.layers)}
            out = []
            for i in range(adapter.num_layers):
                k = self._rank_keeps.get(drops.get(i, -1))
                if k is not None and k < n:
                    n = k + (recycled_clusters(n - k) if self.recycling else 0)
                out.append(n)
            return out
        return s.plan(adapter.num_layers, n, recycle=self.recycling)

    def select_llm_tokens(
        self,
        hidden_states: torch.Tensor,
        visual_positions: list[torch.Tensor],
        *,
        layer_idx: int,
        attention: torch.Tensor | None = None,
    ) -> LLMSelection:
        """Prune the output of layer ``layer_idx - 1`` (docs/methods/sparsevlm.md steps 2-5).

        Parameters
        ----------
        hidden_states : torch.Tensor
            ``(1, seq_len, hidden)``: the output of the pruning layer (input of ``layer_idx``).
        visual_positions : list of torch.Tensor
            One row: ``(n,)`` columns of the visual tokens present (recycled ones included).
        layer_idx : int
            The drop layer (pruning layer + 1).
        attention : torch.Tensor
            ``(1, heads, num_text, seq_len)``: the pruning layer's rows of every token after the visual span.

        Returns
        -------
        LLMSelection
            ``k + c`` visual slots (``k = min(schedule, n - 1)`` kept, ``c`` recycled) and, with recycling,
            their replacement hidden states.

        Raises
        ------
        ValueError
            Batch size above 1, or attention rows that do not match the sample's text after the visual span.
        """
        if len(visual_positions) != 1 or hidden_states.shape[0] != 1:
            raise ValueError(f"method {self.name!r} supports batch size 1 (as the official code)")
        pos = visual_positions[0].to(hidden_states.device)
        n = int(pos.numel())
        n0 = self._n0 if self._n0 is not None else n
        s = self.fitted(self._adapter.family, self._adapter.num_layers, n0)
        stage = [layer + 1 for layer in s.layers].index(int(layer_idx))
        if attention is None:
            raise ValueError(f"method {self.name!r}: no attention rows at drop layer {layer_idx}")
        probs = attention[0]  # (heads, rows, seq)
        if self._raters is None or self._num_text is None or self._num_text != probs.shape[1]:
            raters = torch.arange(probs.shape[1])  # no text after the visual span: the requested rows
        elif self._raters.numel() == 0:
            raters = torch.arange(probs.shape[1])  # every r_t equal (official: NaN scores); all text rows
        else:
            raters = self._raters
        if self._num_text is not None and self._num_text > 0 and probs.shape[1] != self._num_text:
            raise ValueError(
                f"method {self.name!r}: {probs.shape[1]} attention rows for {self._num_text} text tokens after the "
                "visual span (use a KV cache: without one every decode step is a new prefill)"
            )
        heads = None
        if self.version == "2.0":
            probs, heads = self._v20_correct(probs, raters, pos, int(hidden_states.shape[1]), int(layer_idx) - 1)
        scores = rater_scores(probs, raters, pos, numerics=self.numerics)
        if self.keep_rule == "rank":  # video branch attn_postprocess_rank: keep rank(P) tokens, or all
            p_mat = probs.float().mean(0).index_select(0, raters.to(probs.device)).index_select(1, pos.to(probs.device))
            k = int(torch.linalg.matrix_rank(p_mat))
            k = k if n - k > 0 else n
            self._rank_keeps[stage] = k
            if k >= n:  # nothing pruned (official: s_flag False, no merge)
                self.last_record.append({"layer": int(layer_idx) - 1, "scores": scores.cpu(), "kept": pos.cpu()})
                self._track(int(hidden_states.shape[1]), pos, pos)
                return LLMSelection(pos[None])
        else:
            k = max(0, min(s.keep(stage, n0), n - 1))
        top = torch.topk(scores, k).indices if k > 0 else torch.zeros(0, dtype=torch.long, device=scores.device)
        is_kept = torch.zeros(n, dtype=torch.bool, device=scores.device)
        is_kept[top] = True
        kept_local = torch.nonzero(is_kept).flatten()  # sequence order (the official boolean mask)
        pruned_local = torch.nonzero(~is_kept).flatten()
        record: dict[str, Any] = {"layer": int(layer_idx) - 1, "scores": scores.cpu(), "kept": pos[kept_local].cpu()}
        if heads is not None:
            record["heads"] = heads.cpu()
        self.last_record.append(record)
        if not self.recycling or pruned_local.numel() == 0:
            hosts = pos.index_select(0, kept_local.to(pos.device))
            self._track(int(hidden_states.shape[1]), pos, hosts)
            return LLMSelection(hosts[None])
        m = int(pruned_local.numel() * RECYCLE_SHARE) + 1
        order = torch.topk(scores.index_select(0, pruned_local), m).indices
        recycled_local = pruned_local.index_select(0, order)  # score order, as the official topk
        x = hidden_states[0].index_select(0, pos.index_select(0, recycled_local.to(pos.device)))
        c = int(m / TOKENS_PER_CLUSTER) + 1
        merged, centres, _ = dpc_knn_merge(x, c, generator=self._generator)
        kept_cols = pos.index_select(0, kept_local.to(pos.device))
        kept_hidden = hidden_states[0].index_select(0, kept_cols)
        record.update(recycled=pos[recycled_local].cpu(), centres=pos[recycled_local[centres]].cpu(), merged=merged.cpu())
        if self._placement() == "centre":
            hosts = torch.cat([kept_cols, pos.index_select(0, recycled_local[centres].to(pos.device))])
            content = torch.cat([kept_hidden, merged.to(kept_hidden.dtype)])
        else:
            # official order: [kept visual tokens (sequence order), clusters (centre order)] then the text;
            # slots = kept columns + the last c pruned columns, contents laid out in that order.
            extra = pos.index_select(0, pruned_local[-c:].to(pos.device))
            hosts = torch.cat([kept_cols, extra]).sort().values
            content = torch.cat([kept_hidden, merged.to(kept_hidden.dtype)])
        record["slots"] = hosts.cpu()
        self._track(int(hidden_states.shape[1]), pos, hosts)
        return LLMSelection(hosts[None], content[None])

    def _track(self, seq_len: int, pos: torch.Tensor, hosts: torch.Tensor) -> None:
        """Follow the RoPE positions of the surviving columns (needed by v2.0's gravity correction)."""
        if self._orig is None or int(self._orig.numel()) != seq_len:
            return
        keep = torch.ones(seq_len, dtype=torch.bool, device=self._orig.device)
        keep[pos.to(keep.device)] = False
        keep[hosts.to(keep.device)] = True
        self._orig = self._orig[keep]

    def _v20_correct(
        self, probs: torch.Tensor, raters: torch.Tensor, pos: torch.Tensor, seq_len: int, layer: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """SparseVLM+: divide by the RoPE-only pattern, keep the heads with the most rater->visual mass.

        ``probs`` ``(heads, rows, seq_len)`` -> ``(kept_heads, rows, seq_len)`` and the kept head indices.
        Positions: the columns' RoPE positions (original positions, as v2.0 keeps them).
        """
        if self._orig is None or int(self._orig.numel()) != seq_len:
            raise RuntimeError(f"method {self.name!r}: lost track of the RoPE positions of the sequence")
        lm = self._adapter.language_model
        rotary = getattr(lm, "rotary_emb", None)
        if rotary is None or not hasattr(rotary, "inv_freq"):
            raise ValueError(f"method {self.name!r}: version 2.0 cannot find the LLM's RoPE frequencies")
        rows = probs.shape[1]
        self.note_attention("llm", layer, "text after the visual span (v2.0 gravity)",
                            "recomputed rows divided by the closed-form RoPE-only pattern Σ2cos(Δθ)/√d")
        gravity = rope_gravity(self._orig[-rows:], self._orig, rotary.inv_freq)  # (rows, seq)
        corrected = probs.float() / gravity.to(probs.device)[None]
        n_heads = int(probs.shape[0])
        keep = max(1, int(V20_HEADS * n_heads / V20_REFERENCE_HEADS + 0.5))
        heads = select_heads_by_mass(corrected, raters.to(corrected.device), pos.to(corrected.device), keep)
        return corrected.index_select(0, heads), heads


# ---------------------------------------------------------------------- documentation table
#: The paper's budgets per model (family, decoder layers of the 7B model, nominal visual tokens).
PAPER_SETTINGS: tuple[tuple[str, int, int, tuple[Any, ...]], ...] = (
    ("llava15", 32, 576, (192, 128, 64)),
    ("llava_next", 32, 2880, (640, 320, 160)),
    ("qwen25vl", 28, 1024, (0.2, 0.1)),
    ("video_llava", 32, 2048, (256,)),
)


def plan_table() -> Any:
    """Per paper budget and accounting: the layer-input plan, its true mean and the official "Equal Tokens".

    ``python -c "from apet_bench.baselines.sparsevlm import plan_table; print(plan_table().to_markdown(index=False))"``

    Returns
    -------
    pandas.DataFrame
        One row per (model, budget, accounting), from :meth:`SparseVLMCompressor.plan` on a stand-in
        adapter (no model is loaded); ``counts`` reads ``"count (first-last layer)"`` runs.
    """
    from types import SimpleNamespace

    import pandas as pd

    rows = []
    for family, n_layers, n, budgets in PAPER_SETTINGS:
        for budget in budgets:
            for accounting in ACCOUNTINGS:
                m = SparseVLMCompressor(budget=budget, accounting=accounting)
                row = {"model": f"{family} ({n_layers} layers, N={n})", "budget": budget, "accounting": accounting}
                try:
                    p = m.plan(SimpleNamespace(family=family, num_layers=n_layers), n)
                except BudgetError as e:
                    rows.append({**row, "counts": f"refused: {e}", "true mean": None, "official Equal Tokens": None})
                    continue
                runs, start = [], 0
                for i in range(1, n_layers + 1):
                    if i == n_layers or p[i] != p[start]:
                        runs.append(f"{p[start]} ({start}-{i - 1})")
                        start = i
                rows.append({**row, "counts": ", ".join(runs), "true mean": round(sum(p) / n_layers, 2),
                             "official Equal Tokens": round(official_equal_tokens(p), 2)})
    return pd.DataFrame(rows)

