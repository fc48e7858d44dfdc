"""``random``: a seeded uniform subset of the visual tokens at the projector output (stage 1).

A sanity baseline for every budget: any method worth its name must beat it. It follows the random
selection used as a reference in the visual-token pruning literature (e.g. the "random" rows of the
VisionZip and FastV ablations); the subset is uniform without replacement and kept in original order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from apet_bench.budget import BudgetError
from apet_bench.methods.base import TokenCompressor, VisualSelection, register_method

__all__ = ["RandomCompressor"]


@register_method("random")
@dataclass
class RandomCompressor(TokenCompressor):
    """Keep a seeded uniform random subset of exactly ``budget_to_tokens(budget, N)`` visual tokens per image.

    Parameters
    ----------
    budget : int or float
        Visual tokens kept per image (``int``) or retention ratio (``float`` in (0, 1]); required.
    seed : int
        Seed of a CPU ``torch.Generator`` created when the context is entered (:meth:`reset`): a run
        over the same samples in the same order draws the same subsets; the same seed gives the same
        kept indices, a different seed different ones.

    Raises
    ------
    BudgetError
        If ``budget`` is missing or invalid.

    Notes
    -----
    The generator is re-seeded at each (outermost) ``with method(adapter):``. Wrap a whole run in one
    context to get a different subset per sample; ``ModelAdapter.generate`` called outside such a
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
    """

    stage: ClassVar[str] = "vision"

    _generator: torch.Generator | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.budget is None:
            raise BudgetError(f"method {self.name!r} needs a budget (an int token count or a float in (0, 1])")

    def reset(self) -> None:
        """Create the CPU generator seeded with :attr:`seed`."""
        self._generator = torch.Generator(device="cpu").manual_seed(self.seed)

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
