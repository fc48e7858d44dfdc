"""``random``: a seeded uniform subset of the visual tokens, at the projector output (stage 1, default)
or at decoder layer K inside the LLM (stage 2, ``stage="llm"``).

A sanity baseline for every budget: any method worth its name must beat it. It follows the random
selection used as a reference in the visual-token pruning literature (e.g. the "random" rows of the
VisionZip and FastV ablations); the subset is uniform without replacement and kept in original order.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from apet_bench.budget import BudgetError
from apet_bench.methods.base import LLMSelection, TokenCompressor, VisualSelection, register_method
from apet_bench.methods.records import OverheadContext

__all__ = ["RandomCompressor"]


@register_method("random")
@dataclass
class RandomCompressor(TokenCompressor):
    """Keep a seeded uniform random subset of exactly ``budget_to_tokens(budget, N)`` visual tokens.

    Parameters
    ----------
    budget : int or float
        Stage ``"vision"``: visual tokens kept per image (``int``) or retention ratio (``float`` in
        (0, 1]). Stage ``"llm"``: visual tokens kept from decoder layer ``layer`` on, out of the
        sample's visual tokens (``int``), or that fraction of them (``float``); layers before ``layer``
        carry all of them, so the per-layer average (recorded with the plan) is higher (docs/methods/index.md, "tokens kept after the pruning layer" convention). Required.
    stage : {"vision", "llm"}
        Where to drop: after the projector (default) or at the input of decoder layer ``layer``
        during prefill (``apet_bench.llm_surgery``).
    layer : int
        Stage ``"llm"`` only: the drop layer K, ``1 <= K < num_layers`` (default 2, FastV's K).
    seed : int
        Seed of a CPU ``torch.Generator`` created when the context is entered (:meth:`reset`): a run
        over the same samples in the same order draws the same subsets; the same seed gives the same
        kept indices, a different seed different ones.

    Raises
    ------
    BudgetError
        If ``budget`` is missing or invalid.
    ValueError
        For a ``stage`` other than ``vision`` / ``llm`` or a ``layer`` that is not an int >= 1 (the
        upper bound is checked against the model when the surgery starts).

    Notes
    -----
    The generator is re-seeded at each (outermost) ``with method(adapter):``. Wrap a whole run in one
    context to get a different subset per sample; ``apet_bench.pipeline.generate`` called outside such a
    context enters it itself, so every call then draws the first subset of the stream. Subsets depend
    on the order samples are processed in (data-parallel shards draw their own streams).

    Examples
    --------
    >>> import torch
    >>> m = RandomCompressor(budget=64, seed=0)
    >>> m.reset()
    >>> sel = m.compress_visual(torch.randn(576, 8), image_index=0)
    >>> sel.features.shape, sel.kept_indices.shape
    (torch.Size([64, 8]), torch.Size([64]))
    >>> RandomCompressor(budget=144, stage="llm", layer=2).llm_layers()
    (2,)
    """

    stage: str = "vision"  # type: ignore[misc]  # an instance field here (ClassVar in the base class)
    layer: int = 2  # type: ignore[misc]

    _generator: torch.Generator | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.budget is None:
            raise BudgetError(f"method {self.name!r} needs a budget (an int token count or a float in (0, 1])")
        if self.stage not in ("vision", "llm"):
            raise ValueError(f"method {self.name!r}: stage {self.stage!r} is not one of ['vision', 'llm']")
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 1:
            raise ValueError(f"method {self.name!r}: layer {self.layer!r} is not an int >= 1")

    def config_dict(self) -> dict:
        """As the base class; ``layer`` only with ``stage="llm"`` (it has no meaning at the projector)."""
        out = super().config_dict()
        if self.stage != "llm":
            out.pop("layer", None)
        return out

    def reset(self) -> None:
        """Create the CPU generator seeded with :attr:`seed`."""
        self._generator = torch.Generator(device="cpu").manual_seed(self.seed)

    def flops_overhead(self, ctx: OverheadContext) -> dict[str, int]:
        """A seeded random permutation and a gather: no multiply-add, no element-wise arithmetic on
        features, so ``{}`` (0 FLOPs)."""
        return {}

    def compress_visual(self, features: torch.Tensor, *, image_index: int) -> VisualSelection:
        """Keep a uniform random subset of the image's visual tokens, in original order.

        Parameters
        ----------
        features : torch.Tensor
            ``(num_visual_tokens, hidden_size)`` projector output of one image.
        image_index : int
            Index of the image in the sample (unused: the generator stream orders the draws).

        Returns
        -------
        VisualSelection
            ``features[kept_indices]`` ``(k, hidden_size)`` and ``kept_indices`` ``(k,)`` (sorted,
            unique, on ``features.device``), ``k = budget_to_tokens(budget, num_visual_tokens)``.
        """
        if self._generator is None:
            self.reset()
        n = int(features.shape[0])
        k = self.num_tokens_to_keep(n)
        perm = torch.randperm(n, generator=self._generator)  # CPU draw: identical on every device
        kept = perm[:k].sort().values.to(features.device)
        return VisualSelection(features.index_select(0, kept), kept)

    def select_llm_tokens(
        self,
        hidden_states: torch.Tensor,
        visual_positions: list[torch.Tensor],
        *,
        layer_idx: int,
        attention: torch.Tensor | None = None,
    ) -> LLMSelection:
        """Stage ``"llm"``: keep a uniform random subset of each row's visual positions at ``layer_idx``.

        Parameters
        ----------
        hidden_states : torch.Tensor
            ``(batch_size, seq_len, hidden_size)`` input of the drop layer (unused: the draw is blind).
        visual_positions : list of torch.Tensor
            Per row, ``(num_visual,)`` positions of the visual tokens.
        layer_idx : int
            The drop layer.
        attention : None
            Unused.

        Returns
        -------
        LLMSelection
            ``keep_positions`` ``(batch_size, k)``, sorted per row, ``k = llm_keep_count(num_visual)``;
            one CPU draw per row from the method's generator.
        """
        if self._generator is None:
            self.reset()
        rows = []
        for pos in visual_positions:
            n = int(pos.numel())
            k = self.llm_keep_count(n, layer_idx=layer_idx)
            perm = torch.randperm(n, generator=self._generator)[:k].sort().values
            rows.append(pos.index_select(0, perm.to(pos.device)))
        if len({int(r.numel()) for r in rows}) > 1:
            raise ValueError(f"method {self.name!r}: rows hold different numbers of visual tokens; use batch size 1")
        return LLMSelection(torch.stack(rows))
