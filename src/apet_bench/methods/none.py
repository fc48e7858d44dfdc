"""``none``: no compression, the uncompressed model (every visual token enters every LLM layer)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from apet_bench.methods.base import TokenCompressor, register_method
from apet_bench.methods.records import OverheadContext

__all__ = ["NoCompression"]


@register_method("none")
@dataclass
class NoCompression(TokenCompressor):
    """The baseline without compression: the adapter runs plain ``model.generate`` on the processor outputs.

    With stage ``"none"`` the adapter takes the plain Hugging Face path (no surgery, no hooks), so
    the output equals ``model.generate(**processor(...))`` token for token and logit for logit
    (``tests/test_models.py``). ``budget`` is accepted (and validated when given) but ignored.

    Examples
    --------
    >>> from apet_bench.methods import build_method
    >>> build_method("none").stage
    'none'
    """

    stage: ClassVar[str] = "none"

    def flops_overhead(self, ctx: OverheadContext) -> dict[str, int]:
        """No computation besides the model: ``{}`` (0 FLOPs)."""
        return {}
