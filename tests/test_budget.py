import pytest

from apet_bench.budget import BudgetError, budget_label, budget_to_tokens, validate_budget


@pytest.mark.parametrize("budget,expected", [(64, 64), (576, 576), (0.1, 58), (1.0, 576), ("64", 64), ("0.25", 144)])
def test_budget_to_tokens(budget, expected):
    assert budget_to_tokens(budget, 576) == expected


@pytest.mark.parametrize("bad", [0, -1, 577, 0.0, -0.5, 1.5, float("nan"), True, "abc", None])
def test_bad_budgets_raise_one_line_naming_value(bad):
    with pytest.raises(BudgetError) as ei:
        budget_to_tokens(bad, 576)
    msg = str(ei.value)
    assert "\n" not in msg
    assert repr(bad) in msg or str(bad) in msg


def test_fraction_never_rounds_to_zero():
    assert budget_to_tokens(0.0001, 576) == 1


def test_labels():
    assert budget_label(64) == "64"
    assert budget_label(0.1) == "0.1"
    assert budget_label(None) == "full"
    assert validate_budget(64) == 64 and isinstance(validate_budget(0.5), float)
