"""Token budgets: the one place where a configured ``budget`` becomes a number of visual tokens.

Convention (docs/methods/index.md, "Budget convention"): an ``int`` is a token count under the
paper's convention (the average number of visual tokens per LLM layer); a ``float`` in (0, 1] is a
fraction (retention ratio) of the input's visual tokens, as in the Qwen2.5-VL rows of the paper.
"""

from __future__ import annotations

import math
import numbers

__all__ = ["BudgetError", "budget_label", "budget_to_tokens", "validate_budget"]


class BudgetError(ValueError):
    """A budget that cannot be applied; the message is one line and names the bad value."""


def validate_budget(budget: object, num_visual_tokens: int | None = None) -> int | float:
    """Check a configured budget and return it as ``int`` (tokens) or ``float`` (fraction).

    Parameters
    ----------
    budget : int | float
        Tokens (int >= 1) or a retention ratio (float in (0, 1]). Strings such as ``"64"`` or ``"0.1"``
        (from a command line) are parsed.
    num_visual_tokens : int, optional
        The model's visual tokens per image without compression (e.g. 576 for LLaVA-1.5); when given,
        an integer budget above it is rejected.

    Returns
    -------
    int | float
        The budget, typed.

    Raises
    ------
    BudgetError
        For 0, a negative number, a float above 1, NaN, a bool, a non-number, or a token count above
        ``num_visual_tokens``.
    """
    raw = budget
    if isinstance(budget, str):
        text = budget.strip()
        try:
            budget = int(text)
        except ValueError:
            try:
                budget = float(text)
            except ValueError:
                raise BudgetError(f"budget {raw!r} is not a number (use an int token count or a float in (0, 1])") from None
    if isinstance(budget, bool) or not isinstance(budget, numbers.Real):
        raise BudgetError(f"budget {raw!r} is not a number (use an int token count or a float in (0, 1])")
    if isinstance(budget, numbers.Integral):
        budget = int(budget)
        if budget <= 0:
            raise BudgetError(f"budget {budget} is invalid: a token budget must be >= 1")
        if num_visual_tokens is not None and budget > num_visual_tokens:
            raise BudgetError(
                f"budget {budget} is above the model's {num_visual_tokens} visual tokens per input (image or video)"
            )
        return budget
    budget = float(budget)
    if math.isnan(budget) or budget <= 0.0 or budget > 1.0:
        raise BudgetError(f"budget {raw!r} is invalid: a fractional budget must lie in (0, 1]")
    return budget


def budget_to_tokens(budget: int | float, num_visual_tokens: int) -> int:
    """Number of visual tokens to keep out of ``num_visual_tokens``.

    ``int`` budgets are returned as they are; ``float`` budgets give ``round(budget * N)``, at least 1.

    Raises
    ------
    BudgetError
        As :func:`validate_budget`.
    """
    if num_visual_tokens <= 0:
        raise BudgetError(f"num_visual_tokens {num_visual_tokens} is invalid: must be >= 1")
    b = validate_budget(budget, num_visual_tokens)
    if isinstance(b, int):
        return b
    return max(1, min(num_visual_tokens, int(round(b * num_visual_tokens))))


def budget_label(budget: int | float | None) -> str:
    """Label used in run names: ``64``, ``0.1``, or ``full`` for no budget (``method=none``)."""
    if budget is None:
        return "full"
    b = validate_budget(budget)
    return str(b) if isinstance(b, int) else repr(float(b))
