"""Schedule arithmetic several methods share: model facts, layer scaling, rounding, video budgets.

A method's own schedule (its layers and counts per model and budget) is written once, in its own file;
what lives here is the arithmetic several methods apply to theirs (``docs/methods/index.md``, budget
convention and per-model conventions), so that no method file imports another.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from apet_bench.budget import BudgetError

__all__ = ["SCHEDULE_DEPTH", "ModelFacts", "check_video_budget", "model_facts", "round_half_up", "scale_layers"]

#: Decoder layers of the 7B models whose schedules the methods follow (docs/methods/index.md):
#: LLaVA-1.5 / LLaVA-NeXT / Video-LLaVA (Vicuna-7B) 32, Qwen2.5-VL-7B 28. A tiny model runs the
#: schedule of the 7B model of its family, its layers scaled (:func:`scale_layers`).
SCHEDULE_DEPTH: dict[str, int] = {"llava15": 32, "llava_next": 32, "video_llava": 32, "qwen25vl": 28}


def round_half_up(x: float) -> int:
    """Nearest integer, halves up (``floor(x + 0.5)``; Python's ``round`` rounds halves to even)."""
    return int(math.floor(x + 0.5))


@dataclass(frozen=True)
class ModelFacts:
    """What a method needs to know about a model, from a loaded adapter or from a model config group.

    Attributes
    ----------
    name, family : str
        Config name (``tiny_llava15``) and family (``llava15``).
    num_layers : int
        Decoder layers of the model itself (4 for the tiny models).
    tiny : bool
        A tiny random-weight model (its schedules are the 7B model's, layers scaled).
    max_visual_tokens : int or None
        Largest visual span of one input (``max_visual_tokens`` or ``visual_tokens`` of the config).
    """

    name: str
    family: str
    num_layers: int
    tiny: bool
    max_visual_tokens: int | None

    @property
    def schedule_depth(self) -> int:
        """Depth ``D`` the schedule's layer numbers and averages refer to: the 7B depth on tiny
        models (:data:`SCHEDULE_DEPTH`), the model's own depth otherwise."""
        if self.tiny and self.family in SCHEDULE_DEPTH:
            return SCHEDULE_DEPTH[self.family]
        return int(self.num_layers)


def model_facts(source: Any) -> ModelFacts:
    """:class:`ModelFacts` of a loaded :class:`~apet_bench.models.base.ModelAdapter` or of a ``model``
    config mapping (``family``, ``num_layers``, ``tiny``, ``visual_tokens``, ``max_visual_tokens``).

    Raises
    ------
    ValueError
        For a config without ``num_layers``.
    """
    if isinstance(source, Mapping):
        n = source.get("num_layers")
        if n is None:
            raise ValueError(f"model {source.get('name')!r}: its config has no num_layers")
        mx = source.get("max_visual_tokens") or source.get("visual_tokens")
        return ModelFacts(str(source.get("name")), str(source.get("family")), int(n), bool(source.get("tiny")),
                          int(mx) if mx else None)
    spec = getattr(source, "spec", None)
    options = getattr(spec, "options", None) or {}
    mx = options.get("max_visual_tokens") or getattr(spec, "visual_tokens", None)
    if not mx:
        mx = getattr(source, "num_visual_tokens", None)
    return ModelFacts(str(getattr(source, "name", "")), str(source.family), int(source.num_layers),
                      bool(getattr(spec, "tiny", False)), int(mx) if mx else None)


def scale_layers(layers: Sequence[int], depth: int, num_layers: int) -> tuple[int, ...]:
    """Map schedule layers written for a ``depth``-layer model onto a ``num_layers``-layer model.

    Identity when ``depth == num_layers``. Otherwise ``round_half_up(l · num_layers / depth)``, at least
    1, then pushed up to stay strictly increasing (FastV K=2 of 32 -> 1 of 4; PDrop [2, 8, 16] of 32 ->
    [1, 2, 3] of 4).

    Raises
    ------
    ValueError
        When the scaled layers do not fit ``1 <= l < num_layers``.
    """
    layers = [int(x) for x in layers]
    if depth == num_layers:
        return tuple(layers)
    out: list[int] = []
    for x in layers:
        y = max(1, round_half_up(x * num_layers / depth))
        if out and y <= out[-1]:
            y = out[-1] + 1
        out.append(y)
    if out and out[-1] >= num_layers:
        raise ValueError(
            f"layers {layers} of a {depth}-layer schedule do not fit a {num_layers}-layer model "
            f"(scaled: {out}; stage 2 needs 1 <= layer < {num_layers})"
        )
    return tuple(out)


def check_video_budget(name: str, budget: Any, model_cfg: dict[str, Any]) -> None:
    """Refuse, before loading, a Video-LLaVA video budget (an int above ``visual_tokens`` per image) that is
    not a multiple of the frames (``tiny_config.num_frames``, else 8 as Video-LLaVA-7B-hf); one line."""
    if "video" not in (model_cfg.get("visual_kinds") or ()) or isinstance(budget, bool) or not isinstance(budget, int):
        return
    if budget <= int(model_cfg.get("visual_tokens") or 0):
        return  # an image budget (videos then get budget / frames per frame, checked per sample)
    frames = int(model_cfg.get("num_frames") or 8)
    if budget % frames:
        raise BudgetError(
            f"method {name!r}: video budget {budget} on model {model_cfg.get('name')!r} is not a multiple of its {frames} frames"
        )
