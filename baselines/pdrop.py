"""``pdrop``: PyramidDrop (Xing et al., CVPR 2025; ``Cooperx521/PyramidDrop`` @ 6444f304) on all four models.

Multi-stage pruning inside the LLM (docs/methods/pdrop.md). The forward is split into ``S + 1`` stages at
``layer_list = [ℓ_1, ..., ℓ_S]``; at the input of decoder layer ``ℓ_s`` during prefill:

    n_cur  = int(N · λ^(s-1))       n_next = int(N · λ^s)          (N = the sample's original visual count)
    h      = input_layernorm_{ℓ_s}(hidden)         # layer ℓ_s's OWN norm, q/k projections and RoPE,
    q, k   = RoPE(q_proj(h)), RoPE(k_proj(h))      # on its input BEFORE the drop
    a      = softmax(q_last · kᵀ / √d + causal)    # one query row: the last instruction (prompt) token
    s      = mean_heads(a)[visual span]            # n_cur scores
    keep   = sort(topk(s, n_next))

Source: ``llava/model/modeling_llama_pdrop.py`` ``pdrop_forward`` (``rank_layer = layer_idx + 1 in
layer_list``: after layer ``ℓ_s - 1``, i.e. at the input of layer ``ℓ_s``) and ``pdrop_rank_drop``
(``self.layers[rank_layer].input_layernorm`` / ``q_proj`` / ``k_proj``, ``prompt_len + n_cur - 1`` as the
query row, ``image_token_ratio_list`` with a leading 1.0, ratios of the original N) [code].

Here the row is computed by :meth:`apet_bench.attention.AttentionRowCapture.probe` through the shared
surgery (``AttentionRequest(layer=ℓ_s, rows="last", pre_drop=True)``): layer ``ℓ_s``'s own attention
module projects the pre-drop input (its RoPE, 1-D or mRoPE, its biases) and only that row's
probabilities are computed; every layer keeps sdpa / flash, as the official code does (PDrop is
FlashAttention-compatible, docs/methods/pdrop.md).

Positions (``positions``): ``renumber`` (default, official): from each stage on the shortened sequence
is renumbered ``0..L'-1`` at prefill and decode positions are shifted down by the tokens removed
(``LLMStageSurgery`` with ``renumber_positions``); ``original``: kept tokens keep their original
positions (FastV style). Qwen2.5-VL always keeps its original 3-D mRoPE positions (the repository has no
Qwen code; docs/methods/pdrop.md recommends gathering ``position_ids`` there), whatever ``positions`` says.

Schedules (``PDROP_TABLE``; docs/methods/pdrop.md): the official default ``[8, 16, 24]`` with λ = 0.5 averages
270 of 576 tokens and cannot reach 192/128/64 (PyramidDrop issue #10); the author's guidance (issue
#29) moves the stages to ``[2, 8, 16]`` and solves λ for the target average
``(ℓ_1 + Σ_s (ℓ_{s+1} − ℓ_s)·λ^s) / D = f`` (``ℓ_{S+1} = D``, ``D`` decoder layers). Budgets without a
table row get ``[2, 8, 16]`` (``[1, 4, 8]`` when layer 2 is too late) and λ solved [derived].
Tiny models run the 7B schedule (``D`` = 32, or 28 for Qwen2.5-VL) with layers scaled proportionally
(:func:`apet_bench.methods.schedules.scale_layers`: [2, 8, 16] of 32 -> [1, 2, 3] of 4) and the same counts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from apet_bench.budget import BudgetError
from apet_bench.core import AttentionRequest
from apet_bench.methods.base import LLMSelection, TokenCompressor, register_method
from apet_bench.methods.records import OverheadContext
from apet_bench.methods.schedules import ModelFacts, model_facts, scale_layers

__all__ = [
    "NEXT_NOMINAL_TOKENS",
    "OFFICIAL_LAMBDA",
    "OFFICIAL_LAYERS",
    "PDROP_BUDGET_TOLERANCE",
    "PDROP_TABLE",
    "POSITIONS",
    "PyramidDrop",
    "schedule_average",
    "solve_lambda",
    "stage_counts",
]

#: The official default schedule [script]: ``scripts/v1_5/pdrop_eval/*.sh`` ``--layer_list [8,16,24]
#: --image_token_ratio_list [0.5,0.25,0.125]`` (≈ 270 of 576 on LLaVA-1.5).
OFFICIAL_LAYERS: tuple[int, ...] = (8, 16, 24)
OFFICIAL_LAMBDA = 0.5
#: Stage layers for budgets without a table row: the author's ``[2, 8, 16]`` (issue #29) [issue], or
#: ``[1, 4, 8]`` when the first stage at layer 2 cannot reach the budget (docs/methods/pdrop.md NeXT 160) [derived].
DEFAULT_LAYERS: tuple[int, ...] = (2, 8, 16)
EARLY_LAYERS: tuple[int, ...] = (1, 4, 8)
#: LLaVA-NeXT's nominal visual tokens (docs/methods/index.md: 2880 = 5 × 576, base view + 2×2 grid): an int
#: budget ``B`` is the ratio ``B / 2880`` of the actual span (PDrop's ratios are of the span, newline
#: tokens included; docs/methods/pdrop.md "global ratio of the whole span"); on the tiny NeXT ``5 ×`` its
#: tokens per crop.
NEXT_NOMINAL_TOKENS = 2880
NEXT_SUB_IMAGES = 5
#: An explicit ``lam`` whose schedule averages more than this relative distance from the budget is refused.
PDROP_BUDGET_TOLERANCE = 0.05
#: ``positions`` values.
POSITIONS: tuple[str, ...] = ("renumber", "original")

#: ``(family, budget) -> (layer_list, λ, reference N or None, source)``; λ gives ratios λ, λ², λ³ of N.
#: Reference N: the table's λ applies to samples with exactly that N (else λ is solved for the sample);
#: None = a ratio for any N (NeXT's nominal 2880 convention, Qwen2.5-VL's retention ratios).
PDROP_TABLE: dict[tuple[str, int | float], tuple[tuple[int, ...], float, int | None, str]] = {
    ("llava15", 192): ((2, 8, 16), 0.56, 576, "[derived] docs/methods/pdrop.md, (2+6λ+8λ²+16λ³)/32 = 1/3"),
    ("llava15", 128): ((2, 8, 16), 0.42, 576, "[derived] docs/methods/pdrop.md, = 2/9"),
    ("llava15", 64): ((2, 8, 16), 0.19, 576, "[issue] PyramidDrop #29, author: [2,8,16], λ = 0.19 for 11.1 %"),
    ("llava_next", 640): ((2, 8, 16), 0.42, None, "[derived] docs/methods/pdrop.md % of the span"),
    ("llava_next", 320): ((2, 8, 16), 0.19, None, "[derived] docs/methods/pdrop.md % of the span"),
    ("llava_next", 160): ((1, 4, 8), 0.175, None, "[derived] docs/methods/pdrop.md %: layer 2 is too late"),
    ("qwen25vl", 0.2): ((2, 8, 16), 0.35, None, "[derived] docs/methods/pdrop.md layers"),
    ("qwen25vl", 0.1): ((2, 8, 16), 0.113, None, "[derived] docs/methods/pdrop.md layers"),
    ("video_llava", 256): ((2, 8, 16), 0.23, 2056, "[derived] docs/methods/pdrop.md % of the video span"),
}


def schedule_average(layers: Sequence[int], lam: float, depth: int) -> float:
    """Average fraction of the visual tokens per decoder layer of a geometric schedule (no truncation).

    ``(ℓ_1 + Σ_s (ℓ_{s+1} − ℓ_s) · λ^s) / D`` with ``ℓ_{S+1} = D`` (docs/methods/index.md).
    """
    bounds = [int(x) for x in layers] + [int(depth)]
    total = float(bounds[0])
    for s in range(1, len(bounds)):
        total += (bounds[s] - bounds[s - 1]) * float(lam) ** s
    return total / depth


def solve_lambda(fraction: float, layers: Sequence[int], depth: int) -> float:
    """λ in (0, 1] whose schedule averages ``fraction`` of the visual tokens (bisection, 1e-12) [derived].

    Raises
    ------
    BudgetError
        When ``fraction <= ℓ_1 / D`` (the layers before the first stage alone exceed it).
    """
    lo_avg = layers[0] / depth
    if fraction <= lo_avg:
        raise BudgetError(
            f"pdrop: layer_list {list(layers)} cannot reach {100 * fraction:.1f} % of the visual tokens: its first "
            f"{layers[0]} of {depth} layers keep every visual token (average >= {100 * lo_avg:.1f} %)"
        )
    if fraction >= 1.0:
        return 1.0
    lo, hi = 0.0, 1.0
    for _ in range(80):
        mid = (lo + hi) / 2
        if schedule_average(layers, mid, depth) < fraction:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def stage_counts(n: int, lam: float, num_stages: int) -> list[int]:
    """Visual tokens after each stage: ``int(N · λ^s)`` for ``s = 1 .. S`` (official truncation)."""
    return [int(n * float(lam) ** s) for s in range(1, num_stages + 1)]


@register_method("pdrop")
@dataclass
class PyramidDrop(TokenCompressor):
    """PyramidDrop: at each stage layer keep the top ``int(N·λ^s)`` visual tokens by the last instruction
    token's attention row in that layer.

    Parameters
    ----------
    budget : int or float
        The paper's budget: average visual tokens per decoder layer (``int``) or a retention ratio
        (``float`` in (0, 1]); target fraction ``f = B / N`` (LLaVA-NeXT: ``B / 2880``, the nominal
        span, :data:`NEXT_NOMINAL_TOKENS`). Required.
    layer_list : list of int or None
        Stage layers ``ℓ_s`` (drop at the input of these decoder layers), numbered on the 7B model's
        depth (scaled on tiny models). ``None``: the per-model/per-budget table :data:`PDROP_TABLE`, else
        ``[2, 8, 16]`` (``[1, 4, 8]`` when layer 2 is too late).
    lam : float or None
        λ in (0, 1]: stage ``s`` keeps ``int(N · λ^s)``. ``None``: the table's λ (when the sample's N is
        the table's), else solved for ``f`` (:func:`solve_lambda`) [derived].
    positions : {"renumber", "original"}
        ``renumber`` (official, 1-D RoPE models) or ``original`` (FastV-style). Qwen2.5-VL: original.
    seed : int
        Unused (PDrop is deterministic).

    Raises
    ------
    BudgetError
        Without a budget.
    ValueError
        ``lam`` outside (0, 1], a ``layer_list`` that is empty, not increasing or has a layer < 1, an
        unknown ``positions``.

    Notes
    -----
    Deviations from the official code, all numerically minor: under ``numerics="fp32"`` the row's
    softmax and head mean are in float32 (``"official"``, the default: probabilities cast back to the
    model dtype and the head mean in it, as the official eager code); the
    scores are those of the last prompt token (the official ``prompt_len + n_cur - 1`` for batch size 1
    without an answer); a padded batch is supported (left padding; official: right padding only).
    """

    stage: ClassVar[str] = "llm"
    needs_attention_weights: ClassVar[bool] = True

    layer_list: list[int] | None = None
    lam: float | None = None
    positions: str = "renumber"

    _n_original: int | None = field(default=None, init=False, repr=False, compare=False)
    _lam_sample: float | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.budget is None:
            raise BudgetError(f"method {self.name!r} needs a budget (an int token count or a float in (0, 1])")
        if self.layer_list is not None:
            ll = list(self.layer_list)
            if (not ll or any(isinstance(x, bool) or not isinstance(x, int) for x in ll)
                    or ll != sorted(set(ll)) or ll[0] < 1):
                raise ValueError(
                    f"method {self.name!r}: layer_list {self.layer_list!r} must be increasing distinct ints >= 1"
                )
            self.layer_list = ll
        if self.lam is not None:
            if isinstance(self.lam, bool) or not isinstance(self.lam, (int, float)) or not 0.0 < float(self.lam) <= 1.0:
                raise ValueError(f"method {self.name!r}: lam {self.lam!r} is outside (0, 1]")
            self.lam = float(self.lam)
        if self.positions not in POSITIONS:
            raise ValueError(f"method {self.name!r}: positions {self.positions!r} is not one of {list(POSITIONS)}")

    def reset(self) -> None:
        """Forget the last sample's N and λ."""
        self._n_original = None
        self._lam_sample = None

    # ------------------------------------------------------------------ positions
    @property  # type: ignore[override]
    def renumber_positions(self) -> bool:  # type: ignore[override]
        """Official renumbering on 1-D RoPE models; original positions on Qwen2.5-VL's mRoPE (or ``original``)."""
        if self.positions != "renumber":
            return False
        adapter = self._adapter
        return adapter is None or getattr(adapter, "position_encoding", "rope-1d") == "rope-1d"

    # ------------------------------------------------------------------ schedule
    def _table_row(self, facts: ModelFacts):
        return PDROP_TABLE.get((facts.family, self.budget))  # type: ignore[arg-type]

    def _nominal(self, facts: ModelFacts, adapter: Any = None) -> int | None:
        """LLaVA-NeXT: the nominal span the int budget is a ratio of (2880; 5 × tokens per crop)."""
        if facts.family != "llava_next":
            return None
        tpc = getattr(adapter, "tokens_per_crop", None) if adapter is not None else None
        if tpc:
            return NEXT_SUB_IMAGES * int(tpc)
        if not facts.tiny:
            return NEXT_NOMINAL_TOKENS
        return None

    def target_fraction(self, facts: ModelFacts, n: int, adapter: Any = None) -> float:
        """``f``: the retention ratio, ``B / nominal`` on LLaVA-NeXT, else ``B / N`` (at most 1)."""
        if isinstance(self.budget, float):
            return float(self.budget)
        nominal = self._nominal(facts, adapter)
        denom = nominal if nominal else max(int(n), 1)
        return min(1.0, float(self.budget) / denom)  # type: ignore[operator]

    def schedule_layers(self, facts: ModelFacts, fraction: float | None = None) -> tuple[int, ...]:
        """Stage layers in the schedule's numbering: ``layer_list``, the table's, or the default."""
        if self.layer_list is not None:
            return tuple(self.layer_list)
        row = self._table_row(facts)
        if row is not None:
            return row[0]
        if fraction is None:
            fraction = self._config_fraction(facts)
        return DEFAULT_LAYERS if fraction > DEFAULT_LAYERS[0] / facts.schedule_depth else EARLY_LAYERS

    def _config_fraction(self, facts: ModelFacts) -> float:
        """``f`` on the model's largest input (the hardest case for int budgets)."""
        return self.target_fraction(facts, facts.max_visual_tokens or 1)

    def model_layers(self, facts: ModelFacts) -> tuple[int, ...]:
        """Stage layers on the model itself (scaled on tiny models)."""
        return scale_layers(self.schedule_layers(facts), facts.schedule_depth, facts.num_layers)

    def sample_lambda(self, facts: ModelFacts, n: int, adapter: Any = None) -> float:
        """λ for a sample of ``n`` visual tokens: ``lam``, the table's (its N), or solved [derived]."""
        if self.lam is not None:
            return float(self.lam)
        layers = self.schedule_layers(facts)
        row = self._table_row(facts)
        if row is not None and self.layer_list in (None, list(row[0])) and (row[2] is None or row[2] == int(n)):
            return row[1]
        return solve_lambda(self.target_fraction(facts, n, adapter), layers, facts.schedule_depth)

    def check_model_config(self, model_cfg: dict[str, Any]) -> None:
        """Refuse, before loading: a stage layer outside ``1 <= ℓ < D`` (or not fitting a tiny model), a
        ``layer_list`` that cannot reach the budget, an explicit ``lam`` whose schedule misses the budget
        by more than :data:`PDROP_BUDGET_TOLERANCE` (one line each).

        Raises
        ------
        ValueError
            (``BudgetError`` for the budget) one line.
        """
        facts = model_facts(model_cfg)
        d = facts.schedule_depth
        layers = self.schedule_layers(facts)
        bad = [x for x in layers if not 1 <= x < d]
        if bad:
            where = f" (the {d}-layer 7B model tiny model {facts.name!r} stands for)" if d != facts.num_layers else ""
            raise ValueError(
                f"method 'pdrop': layer_list {list(layers)} has layer {bad[0]}, not usable on model {facts.name!r} "
                f"with {d} decoder layers{where}; stages need 1 <= layer < {d}"
            )
        self.model_layers(facts)
        f = self._config_fraction(facts)
        if self.lam is None:
            solve_lambda(f, layers, d)  # raises when the layers cannot reach f
            return
        avg = schedule_average(layers, self.lam, d)
        if abs(avg - f) > PDROP_BUDGET_TOLERANCE * f:
            raise BudgetError(
                f"pdrop: layer_list {list(layers)} with lam {self.lam} averages {100 * avg:.1f} % of the visual tokens "
                f"per layer, not the budget {self.budget} ({100 * f:.1f} %); set lam: null to solve it"
            )

    def llm_layers(self) -> tuple[int, ...]:
        """Stage layers on the attached model (``()`` outside a context)."""
        if self._adapter is None:
            return ()
        return self.model_layers(model_facts(self._adapter))

    def attention_request(self, layer_idx: int) -> AttentionRequest:
        """The last prompt token's row of layer ``ℓ_s``'s own attention on its pre-drop input."""
        return AttentionRequest(layer=int(layer_idx), rows="last", pre_drop=True, numerics=self.numerics)

    def counts(self, facts: ModelFacts, n: int, adapter: Any = None) -> list[int]:
        """Visual tokens after each stage for a sample of ``n``: ``int(n · λ^s)``."""
        lam = self.sample_lambda(facts, n, adapter)
        return stage_counts(n, lam, len(self.schedule_layers(facts)))

    def llm_keep_count(self, num_visual_tokens: int, *, layer_idx: int) -> int:
        """``int(N · λ^s)`` at stage ``s`` (``layer_idx`` = the model's ``ℓ_s``), N the sample's original count.

        At the first stage ``num_visual_tokens`` is N; later stages use the N recorded there.
        """
        if self._adapter is None:
            raise RuntimeError("pdrop: llm_keep_count needs the method attached to a model (or use plan)")
        facts = model_facts(self._adapter)
        layers = self.model_layers(facts)
        if layer_idx not in layers:
            raise ValueError(f"pdrop: layer {layer_idx} is not a stage layer {list(layers)}")
        s = layers.index(layer_idx)
        if s == 0 or self._n_original is None:
            self._n_original = int(num_visual_tokens)
            self._lam_sample = self.sample_lambda(facts, self._n_original, self._adapter)
        assert self._lam_sample is not None
        return min(int(num_visual_tokens), int(self._n_original * self._lam_sample ** (s + 1)))

    def plan(self, adapter: Any, num_visual_tokens: int) -> list[int]:
        """``N`` before the first stage layer, then ``int(N · λ^s)`` from stage layer ``s`` on (model layers).

        E.g. LLaVA-1.5 budget 64: ``[576]*2 + [109]*6 + [20]*8 + [3]*16``; the tiny model ``[576, 109, 20, 3]``.
        """
        facts = model_facts(adapter)
        n = int(num_visual_tokens)
        layers = self.model_layers(facts)
        after = self.counts(facts, n, adapter) if n > 0 else [0] * len(layers)
        out, cur = [], n
        for i in range(facts.num_layers):
            if i in layers:
                cur = min(cur, after[layers.index(i)])
            out.append(cur)
        return out

    # ------------------------------------------------------------------ selection
    def flops_overhead(self, ctx: OverheadContext) -> dict[str, int]:
        """At each stage layer ``ℓ`` the probe (``AttentionRowCapture.probe``, as the official
        ``pdrop_rank_drop`` in ``Cooperx521/PyramidDrop`` ``llava/model/modeling_llama_pdrop.py``) runs
        ``ℓ``'s q/k/v/o projections over the pre-drop sequence ``seq`` (``2·seq·d·(2d + 2·d_kv)``; the
        official code projects q/k/v only) and the last instruction token's row ``2·seq·d`` (softmax
        element-wise). Terms ``last_instruction_row_L<ℓ>`` and ``probe_projections_L<ℓ>``."""
        d, d_kv = ctx.hidden_size, ctx.kv_hidden_size
        out: dict[str, int] = {}
        for drop in ctx.drops:
            seq = drop.before + ctx.text_tokens
            out[f"last_instruction_row_L{drop.layer}"] = 2 * seq * d
            out[f"probe_projections_L{drop.layer}"] = 2 * seq * d * (2 * d + 2 * d_kv)
        return out

    def select_llm_tokens(
        self,
        hidden_states: torch.Tensor,
        visual_positions: list[torch.Tensor],
        *,
        layer_idx: int,
        attention: torch.Tensor | None = None,
    ) -> LLMSelection:
        """Keep the top ``int(N·λ^s)`` visual tokens by the head-mean last-row attention of layer ``ℓ_s``.

        Parameters
        ----------
        hidden_states : torch.Tensor
            ``(batch, seq_len, hidden)`` input of stage layer ``ℓ_s`` before the drop (unused here; the
            surgery probed the row from it).
        visual_positions : list of torch.Tensor
            Per row, ``(n_cur,)`` sorted positions of the visual tokens still present.
        layer_idx : int
            ``ℓ_s`` on the model.
        attention : torch.Tensor
            ``(batch, heads, rows, seq_len)`` float32 probabilities of layer ``ℓ_s`` on its pre-drop
            input; the last row (the last instruction token) is used.

        Returns
        -------
        LLMSelection
            ``keep_positions`` ``(batch, n_next)`` sorted per row.

        Raises
        ------
        ValueError
            Without attention rows of length ``seq_len``.
        """
        if attention is None or attention.ndim != 4 or attention.shape[-1] != hidden_states.shape[1]:
            shape = None if attention is None else tuple(attention.shape)
            raise ValueError(f"pdrop needs (batch, heads, rows, {hidden_states.shape[1]}) attention rows, got {shape}")
        row = attention[:, :, -1, :]  # (B, H, L)
        scores = row.mean(dim=1) if self.numerics == "official" else row.float().mean(dim=1)  # (B, L)
        rows = []
        for b, pos in enumerate(visual_positions):
            keep = self.llm_keep_count(int(pos.numel()), layer_idx=layer_idx)
            top = scores[b, pos.to(scores.device)].topk(keep).indices.sort().values
            rows.append(pos.index_select(0, top.to(pos.device)))
        if len({int(r.numel()) for r in rows}) > 1:
            raise ValueError("pdrop: rows keep different numbers of visual tokens; use batch size 1")
        return LLMSelection(torch.stack(rows))
