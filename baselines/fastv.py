"""``fastv``: FastV (Chen et al., ECCV 2024; ``pkunlp-icler/FastV`` @ d1659729) on all four models.

At the input of decoder layer ``K`` during prefill, the visual tokens are ranked by the attention the
**last prompt token** pays them in layer ``K - 1`` (probabilities averaged over heads) and the top
``keep`` are kept from layer ``K`` on, at their **original** positions (no renumbering; decode positions
continue the full-length numbering, as the official HF variant with KV cache does). docs/methods/fastv.md:

* source: ``src/FastV/llava-hf/transformers/src/transformers/models/llama/modeling_llama.py``
  ``fastv_forward`` [code]: ``mean(attn[K-1], heads)[0][-1][start:start+N].topk(keep)``, ``keep_indexs``
  sorted, ``position_ids = keep_indexs``;
* the attention row comes from :class:`apet_bench.attention.AttentionRowCapture` at layer ``K - 1``
  (that row only, recomputed from the layer's own q/k; every layer stays on sdpa / flash), where the
  official code switches layer ``K - 1`` to eager ``output_attentions``;
* the visual span is every visual token of the sample (LLaVA-NeXT: the whole packed span with its
  ``image_newline`` tokens, globally; Video-LLaVA: the 8 × 257 video tokens; Qwen2.5-VL: the merged
  tokens, kept tokens keep their (t, h, w) mRoPE positions and ``rope_deltas`` come from the full
  sequence), docs/methods/fastv.md;
* FastV's duplicated layer-(K-1) KV cache of the lmms-eval variant (docs/methods/index.md, FastV issues #18 /
  #46) is **not** reproduced: every layer's cache holds each token once (the shared surgery).

Budget conventions (docs/methods/index.md), ``budget_convention``:

* ``equivalent_average`` (default): the budget ``B`` is the average number of visual tokens per decoder
  layer, as the paper's tables define "Retain B tokens" (docs/methods/index.md): ``keep = round((D·B − K·N) / (D − K))``
  (``D`` decoder layers, ``N`` visual tokens of the sample); a ratio ``r`` gives
  ``keep = round(N·(D·r − K) / (D − K))``. This is the convention that reproduces the paper's FastV
  rows (copied from SparseVLM's tables, which count the equivalent average, SparseVLM issue #12: the
  official code keeping B after K=2 scores far above those rows), so it is the default.
* ``keep_after_k``: ``B`` tokens (or ``round(r·N)``) kept from layer ``K`` on; the layers before ``K``
  carry all ``N`` (the official scripts' ``attention_rank`` / ``fastv_r``).

Tiny models: schedules are written for the 7B model a tiny model stands for (``SCHEDULE_DEPTH``: 32
decoder layers for the LLaVA family, 28 for Qwen2.5-VL). Keep counts are computed on that depth and
the layers are scaled proportionally to the tiny model's depth (:func:`scale_layers`: ``K = 2`` of 32
-> layer 1 of 4), so a tiny run executes the 7B schedule's counts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from apet_bench.budget import BudgetError
from apet_bench.methods.base import LLMSelection, TokenCompressor, register_method
from apet_bench.methods.records import OverheadContext
from apet_bench.methods.schedules import SCHEDULE_DEPTH, ModelFacts, model_facts, round_half_up, scale_layers

__all__ = [
    "BUDGET_CONVENTIONS",
    "FASTV_DEFAULT_LAYER",
    "SCHEDULE_DEPTH",
    "FastV",
    "ModelFacts",
    "fastv_keep_count",
    "model_facts",
    "round_half_up",
    "scale_layers",
]

#: FastV's K: the paper default K=2 (R=50 %) and the ablation scripts' K [paper, code].
FASTV_DEFAULT_LAYER = 2
#: ``budget_convention`` values (docs/methods/fastv.md).
BUDGET_CONVENTIONS: tuple[str, ...] = ("equivalent_average", "keep_after_k")


def fastv_keep_count(budget: int | float, n: int, layer: int, depth: int, convention: str) -> int:
    """Visual tokens FastV keeps from layer ``K`` on (docs/methods/fastv.md).

    Parameters
    ----------
    budget : int or float
        Tokens ``B`` or retention ratio ``r``.
    n : int
        Visual tokens of the sample entering the LLM.
    layer : int
        ``K`` in the schedule's numbering (layers ``0 .. K-1`` carry all ``n``).
    depth : int
        Decoder layers ``D`` of the schedule.
    convention : {"equivalent_average", "keep_after_k"}
        See the module docstring.

    Returns
    -------
    int
        ``keep`` in ``[1, n]`` (``n`` when the budget is at least ``n``: nothing to drop).

    Raises
    ------
    BudgetError
        When the equivalent average cannot reach the budget: the ``K`` full layers alone exceed it.

    Examples
    --------
    >>> [fastv_keep_count(b, 576, 2, 32, "equivalent_average") for b in (192, 128, 64)]
    [166, 98, 30]
    >>> fastv_keep_count(256, 2056, 2, 32, "equivalent_average")
    136
    """
    n = int(n)
    if n <= 0:
        return 0
    if convention == "keep_after_k":
        if isinstance(budget, int):
            return min(int(budget), n)
        return max(1, min(n, round_half_up(float(budget) * n)))
    if convention != "equivalent_average":
        raise ValueError(f"budget_convention {convention!r} is not one of {list(BUDGET_CONVENTIONS)}")
    target = float(min(budget, n)) if isinstance(budget, int) else float(budget) * n
    if target >= n:
        return n
    raw = (depth * target - layer * n) / (depth - layer)
    keep = round_half_up(raw)
    if keep < 1:
        label = f"{budget}" if isinstance(budget, int) else f"{budget} ({target:.1f} tokens)"
        raise BudgetError(
            f"fastv: budget {label} is unreachable as an equivalent average with K={layer} of {depth} layers on "
            f"{n} visual tokens (the {layer} full layers alone average {layer * n / depth:.1f}); lower K or use "
            "budget_convention=keep_after_k"
        )
    return min(n, keep)


@register_method("fastv")
@dataclass
class FastV(TokenCompressor):
    """FastV: keep the visual tokens the last prompt token attends to most in layer ``K - 1``.

    Parameters
    ----------
    budget : int or float
        Visual tokens (``int``) or retention ratio (``float`` in (0, 1]); read per
        ``budget_convention``. Required.
    layer : int or None
        ``K`` (drop at the input of decoder layer ``K``, attention of layer ``K - 1``), numbered on the
        7B model's depth (:data:`SCHEDULE_DEPTH`; scaled on tiny models). ``None`` (default): the
        per-model table, :meth:`default_layer`: 2 [paper §4, code], or 1 when the equivalent average
        cannot reach the budget with K=2 on the model's largest input (LLaVA-NeXT 160: 2 × 2928 > 32 ×
        160; docs/methods/fastv.md [derived]).
    budget_convention : {"equivalent_average", "keep_after_k"}
        Default ``equivalent_average`` (reproduces the paper's FastV rows; module docstring).
    seed : int
        Unused (FastV is deterministic); kept for the common interface.

    Raises
    ------
    BudgetError
        Without a budget.
    ValueError
        For a ``layer`` that is not an int >= 1 or an unknown ``budget_convention``.

    Notes
    -----
    Keep counts per model (``equivalent_average``, K=2, [derived] from docs/methods/fastv.md):
    LLaVA-1.5 192/128/64 -> 166/98/30; LLaVA-NeXT 640/320 -> ``round((32·B − 2·N)/30)`` on the sample's
    span (491/149 at N = 2880), 160 -> K=1, ``round((32·160 − N)/31)`` (72 at 2880); Qwen2.5-VL 20 %/10 %
    -> ``round(N·(28·r − 2)/26)`` (13.8 %/3.1 % of N); Video-LLaVA 256 of 2056 -> 136.
    The selection is FastV's: head-mean of the last row, ``topk`` over the visual span in position
    order, kept positions sorted. ``numerics="official"`` (default) computes the row as eager attention
    in the model's dtype and averages the heads in that dtype, as the official fp16 code does;
    ``"fp32"`` computes both in float32 (identical on fp32 models).
    """

    stage: ClassVar[str] = "llm"
    needs_attention_weights: ClassVar[bool] = True

    layer: int | None = None  # type: ignore[assignment]
    budget_convention: str = "equivalent_average"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.budget is None:
            raise BudgetError(f"method {self.name!r} needs a budget (an int token count or a float in (0, 1])")
        if self.layer is not None and (isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 1):
            raise ValueError(f"method {self.name!r}: layer {self.layer!r} is not an int >= 1 (or null for the per-model table)")
        if self.budget_convention not in BUDGET_CONVENTIONS:
            raise ValueError(
                f"method {self.name!r}: budget_convention {self.budget_convention!r} is not one of {list(BUDGET_CONVENTIONS)}"
            )

    # ------------------------------------------------------------------ schedule
    def default_layer(self, facts: ModelFacts) -> int:
        """``K`` when ``layer`` is null: 2, or 1 when the equivalent average needs it (see the class doc)."""
        k = FASTV_DEFAULT_LAYER
        if self.budget_convention != "equivalent_average":
            return k
        d = facts.schedule_depth
        if isinstance(self.budget, float):
            feasible = d * self.budget > k
        else:
            n = facts.max_visual_tokens or 0
            feasible = n == 0 or self.budget >= n or round_half_up((d * self.budget - k * n) / (d - k)) >= 1
        return k if feasible else 1

    def schedule_layer(self, facts: ModelFacts) -> int:
        """``K`` in the schedule's numbering (``layer`` or :meth:`default_layer`)."""
        return int(self.layer) if self.layer is not None else self.default_layer(facts)

    def model_layer(self, facts: ModelFacts) -> int:
        """``K`` on the model itself (scaled on tiny models, :func:`scale_layers`)."""
        return scale_layers([self.schedule_layer(facts)], facts.schedule_depth, facts.num_layers)[0]

    def check_model_config(self, model_cfg: dict[str, Any]) -> None:
        """Refuse, before loading: ``K`` outside ``1 <= K < D``, or a budget the equivalent average
        cannot reach on the model's largest input (one line, naming the values).

        Raises
        ------
        ValueError
            (``BudgetError`` for the budget) one line.
        """
        facts = model_facts(model_cfg)
        d = facts.schedule_depth
        k = self.schedule_layer(facts)
        if not 1 <= k < d:
            where = f" (the {d}-layer 7B model tiny model {facts.name!r} stands for)" if d != facts.num_layers else ""
            raise ValueError(
                f"method 'fastv': layer K={k} is not usable on model {facts.name!r} with {d} decoder layers{where}; "
                f"FastV needs 1 <= K < {d}"
            )
        self.model_layer(facts)
        if facts.max_visual_tokens:
            fastv_keep_count(self.budget, facts.max_visual_tokens, k, d, self.budget_convention)  # type: ignore[arg-type]

    def llm_layers(self) -> tuple[int, ...]:
        """``(K,)`` on the attached model (``()`` outside a context)."""
        if self._adapter is None:
            return ()
        return (self.model_layer(model_facts(self._adapter)),)

    def llm_keep_count(self, num_visual_tokens: int, *, layer_idx: int) -> int:
        """:func:`fastv_keep_count` on the attached model's schedule (``num_visual_tokens`` = N).

        Raises
        ------
        BudgetError
            When the equivalent average cannot reach the budget for this sample.
        """
        if self._adapter is None:
            raise RuntimeError("fastv: llm_keep_count needs the method attached to a model (or use plan)")
        return self._keep(model_facts(self._adapter), num_visual_tokens)

    def _keep(self, facts: ModelFacts, n: int) -> int:
        return fastv_keep_count(self.budget, n, self.schedule_layer(facts), facts.schedule_depth,  # type: ignore[arg-type]
                                self.budget_convention)

    def plan(self, adapter: Any, num_visual_tokens: int) -> list[int]:
        """``N`` in layers ``0 .. K-1`` of the model, then ``keep`` (e.g. ``[576] * 2 + [30] * 30`` for
        LLaVA-1.5 budget 64; ``[576, 30, 30, 30]`` on the tiny model)."""
        facts = model_facts(adapter)
        n = int(num_visual_tokens)
        k = self.model_layer(facts)
        keep = self._keep(facts, n) if n > 0 else 0
        return [n if i < k else keep for i in range(facts.num_layers)]

    # ------------------------------------------------------------------ selection
    def flops_overhead(self, ctx: OverheadContext) -> dict[str, int]:
        """The last prompt token's attention row at layer ``K - 1``, the only row recomputed
        (``apet_bench.attention.AttentionRowCapture``; ``pkunlp-icler/FastV`` ``fastv_forward`` reads
        the same row): ``QKᵀ`` of one query over the ``seq`` tokens there, ``2 · seq · d`` (softmax
        element-wise, not counted). One term per drop layer: ``{"attention_row_L<K-1>": ...}``."""
        return {f"attention_row_L{drop.layer - 1}": 2 * (drop.before + ctx.text_tokens) * ctx.hidden_size
                for drop in ctx.drops}

    def select_llm_tokens(
        self,
        hidden_states: torch.Tensor,
        visual_positions: list[torch.Tensor],
        *,
        layer_idx: int,
        attention: torch.Tensor | None = None,
    ) -> LLMSelection:
        """Keep the ``keep`` visual tokens with the highest head-mean last-row attention of layer ``K - 1``.

        Parameters
        ----------
        hidden_states : torch.Tensor
            ``(batch, seq_len, hidden)`` input of layer ``K`` (unused: FastV ranks by attention only).
        visual_positions : list of torch.Tensor
            Per row, ``(N,)`` sorted positions of the visual tokens.
        layer_idx : int
            ``K`` on the model.
        attention : torch.Tensor
            ``(batch, heads, rows, seq_len)`` probabilities of layer ``K - 1`` (float32, or the model's
            dtype under ``numerics="official"``); the last row (the last prompt token) is used.

        Returns
        -------
        LLMSelection
            ``keep_positions`` ``(batch, keep)`` sorted per row.

        Raises
        ------
        ValueError
            Without attention rows or with rows of another length than ``seq_len``.
        """
        if attention is None or attention.ndim != 4 or attention.shape[-1] != hidden_states.shape[1]:
            shape = None if attention is None else tuple(attention.shape)
            raise ValueError(f"fastv needs (batch, heads, rows, {hidden_states.shape[1]}) attention rows, got {shape}")
        row = attention[:, :, -1, :]  # (B, H, L): the last prompt token's row
        # head mean: official in the probabilities' (model) dtype, as torch.mean of the fp16 eager weights
        scores = row.mean(dim=1) if self.numerics == "official" else row.float().mean(dim=1)  # (B, L)
        rows = []
        for b, pos in enumerate(visual_positions):
            n = int(pos.numel())
            keep = self.llm_keep_count(n, layer_idx=layer_idx)
            top = scores[b, pos.to(scores.device)].topk(keep).indices.sort().values
            rows.append(pos.index_select(0, top.to(pos.device)))
        if len({int(r.numel()) for r in rows}) > 1:
            raise ValueError("fastv: rows keep different numbers of visual tokens; use batch size 1")
        return LLMSelection(torch.stack(rows))
