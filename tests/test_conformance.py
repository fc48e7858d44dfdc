"""Every registered method passes the conformance kit (``apet_bench.testing.check_method``) on every tiny
model it supports; a method registered later is picked up with no edit here. The kit itself is tested on
deliberately broken methods: each must fail, naming the broken check.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

from apet_bench.methods import TokenCompressor, VisualSelection, available_methods
from apet_bench.methods.base import LLMSelection
from apet_bench.testing import CHECKS, check_method, tiny_models, unsupported_reason


# ---------------------------------------------------------------------- every registered method
@pytest.mark.parametrize("model", tiny_models())
@pytest.mark.parametrize("method", available_methods())
def test_registered_method_conforms(method, model, tmp_path):
    why = unsupported_reason(method, model)
    if why is not None:
        pytest.skip(f"{method} does not support {model}: {why}")
    report = check_method(method, models=[model], work_dir=tmp_path)
    assert report.models == [model]
    ran = report.passed_checks(model) | report.passed_checks(None)
    # every check ran; a stage-'none' method has no budget to check, a method may refuse use_cache=False
    optional = {"budget", "cached_decoding"}
    assert set(CHECKS) - optional <= ran, sorted(set(CHECKS) - ran)
    skipped = {r.check for r in report.results if r.status == "skipped"}
    assert set(CHECKS) <= ran | (skipped & optional)


def test_every_tiny_model_is_found():
    assert {"tiny_llava15", "tiny_llava_next", "tiny_qwen25vl", "tiny_video_llava"} <= set(tiny_models())


# ---------------------------------------------------------------------- the kit catches broken methods
@dataclass
class KeepFirst(TokenCompressor):
    """A correct stage-1 method: the first ``budget`` visual tokens (the base of the broken ones)."""

    stage: ClassVar[str] = "vision"

    def compress_visual(self, features, *, image_index):
        k = self.num_tokens_to_keep(int(features.shape[0]))
        return VisualSelection(features[:k], torch.arange(k, device=features.device))


@dataclass
class PlanDisagrees(KeepFirst):
    """Its plan says nothing is dropped, yet it keeps ``budget`` tokens."""

    def plan(self, adapter, num_visual_tokens):
        return [int(num_visual_tokens) + 1] * adapter.num_layers


@dataclass
class IgnoresSeed(KeepFirst):
    """Draws its kept set from the process-global RNG, whatever the seed."""

    def compress_visual(self, features, *, image_index):
        k = self.num_tokens_to_keep(int(features.shape[0]))
        idx = torch.randperm(int(features.shape[0]))[:k].sort().values
        return VisualSelection(features[idx], idx)


@dataclass
class RepeatsIndices(KeepFirst):
    """Keeps the same original token twice (the harness refuses it while generating)."""

    def compress_visual(self, features, *, image_index):
        k = self.num_tokens_to_keep(int(features.shape[0]))
        return VisualSelection(features[:k], torch.zeros(k, dtype=torch.long))


@dataclass
class ReportsOutOfRange(KeepFirst):
    """Pools tokens and reports indices past the visual's tokens (only recorded, so only the kit sees it)."""

    def compress_visual(self, features, *, image_index):
        n = int(features.shape[0])
        k = self.num_tokens_to_keep(n)
        return VisualSelection(features[:k], None, torch.arange(k) + n)


@dataclass
class OverBudget(KeepFirst):
    """Keeps twice its budget (and plans it, so only the budget check can see it)."""

    def compress_visual(self, features, *, image_index):
        k = min(2 * self.num_tokens_to_keep(int(features.shape[0])), int(features.shape[0]) - 1)
        return VisualSelection(features[:k], torch.arange(k))


@dataclass
class AcceptsAnyBudget(KeepFirst):
    """Skips the budget validation."""

    def __post_init__(self):
        pass


@dataclass
class SwitchesToEager(KeepFirst):
    """Puts the LLM on eager attention while attached."""

    def attach(self, adapter):
        cfg = adapter.decoder_layers[0].self_attn.config
        self._was = cfg._attn_implementation
        cfg._attn_implementation = "eager"

    def detach(self, adapter):
        adapter.decoder_layers[0].self_attn.config._attn_implementation = self._was


@dataclass
class LeavesHook(KeepFirst):
    """Registers a hook outside ``register_hook``, so it stays after the method's context."""

    handles: ClassVar[list] = []

    def attach(self, adapter):
        self.handles.append(adapter.decoder_layers[0].register_forward_pre_hook(lambda *a: None))


@dataclass
class CacheUnaware(TokenCompressor):
    """Stage 2 at layer 1, keeping the first half of the visual tokens; its own hook doubles the hidden
    states of every forward after the first, so a cached decode step differs from an uncached one."""

    stage: ClassVar[str] = "llm"
    layer: ClassVar[int] = 1

    def llm_keep_count(self, num_visual_tokens, *, layer_idx):
        return self.num_tokens_to_keep(num_visual_tokens)

    def select_llm_tokens(self, hidden_states, visual_positions, *, layer_idx, attention=None):
        k = self.llm_keep_count(int(visual_positions[0].numel()), layer_idx=layer_idx)
        return LLMSelection(torch.stack([v[:k] for v in visual_positions]))

    def attach(self, adapter):
        def hook(module, args, output):
            hidden = output if isinstance(output, torch.Tensor) else output[0]
            if hidden.shape[1] == 1:  # a cached decode step (one new token): corrupt it
                return hidden * 0 if isinstance(output, torch.Tensor) else (hidden * 0, *output[1:])
            return None

        self.register_hook(adapter.decoder_layers[2], hook)


BROKEN = [
    (PlanDisagrees, "plan"),
    (IgnoresSeed, "seed"),
    (RepeatsIndices, "generate"),
    (ReportsOutOfRange, "kept_indices"),
    (OverBudget, "budget"),
    (AcceptsAnyBudget, "bad_budget"),
    (SwitchesToEager, "attention_backends"),
    (LeavesHook, "restored"),
    (CacheUnaware, "cached_decoding"),
]


def test_correct_user_method_passes():
    report = check_method(KeepFirst, models=["tiny_llava15"])  # runner: skipped, not registered
    assert report.method == "KeepFirst"
    assert {"bad_budget", "plan", "budget", "kept_indices", "attention_backends", "seed", "restored",
            "cached_decoding"} <= report.passed_checks()
    assert [r.status for r in report.results if r.check == "runner"] == ["skipped"]  # not registered


@pytest.mark.parametrize("cls,check", BROKEN, ids=[c.__name__ for c, _ in BROKEN])
def test_broken_method_fails_naming_the_check(cls, check):
    try:
        with pytest.raises(AssertionError) as err:
            check_method(cls, models=["tiny_llava15"], runner=False)
    finally:
        while LeavesHook.handles:  # the shared tiny model must not keep what LeavesHook left
            LeavesHook.handles.pop().remove()
    first = str(err.value).splitlines()[0]
    assert first.startswith(f"conformance: method {cls.__name__!r}")
    assert f"check {check!r} failed" in first, first
    if check != "bad_budget":
        assert "model 'tiny_llava15' budget 64" in first, first


def test_unknown_model_and_unsupported_only():
    with pytest.raises(ValueError, match="model 'llava15' is not a tiny model"):
        check_method(KeepFirst, models=["llava15"], runner=False)

    @dataclass
    class RefusesAll(KeepFirst):
        def check_model_config(self, model_cfg):
            raise ValueError(f"no model {model_cfg['name']!r}")

    assert unsupported_reason(RefusesAll, "tiny_llava15") == "no model 'tiny_llava15'"
    with pytest.raises(AssertionError, match="supports none of the models.*no model 'tiny_llava15'"):
        check_method(RefusesAll, models=["tiny_llava15"], runner=False)

