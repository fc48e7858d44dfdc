"""Compression methods: registry, ``none``, ``random`` (exact budgets, seeding), hook lifecycle."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

from apet_bench.budget import BudgetError
from apet_bench.methods import (
    NoCompression,
    RandomCompressor,
    TokenCompressor,
    UnknownMethodError,
    VisualSelection,
    available_methods,
    build_method,
    get_method_class,
)
from apet_bench.models import load_model
from apet_bench.pipeline import generate
from apet_bench.surgery import shrink_placeholder_runs

N, D = 576, 16


def count_hooks(model: torch.nn.Module) -> int:
    """Forward (pre-)hooks on ``model``, not counting transformers' own output-capturing hooks (it installs
    them once, lazily, the first time a tower is asked for hidden states, and never removes them)."""
    def ours(hooks) -> int:
        return sum("output_capturing_hook" not in getattr(h, "__qualname__", "") for h in hooks.values())

    return sum(ours(m._forward_hooks) + ours(m._forward_pre_hooks) for m in model.modules())


def fresh_indices(budget, seed, n=N, calls=1):
    m = RandomCompressor(budget=budget, seed=seed)
    m.reset()
    feats = torch.randn(n, D)
    return [m.compress_visual(feats, image_index=0).kept_indices.tolist() for _ in range(calls)]


# ---------------------------------------------------------------------- registry
def test_registry_lists_builtins():
    names = available_methods()
    assert {"none", "random"} <= set(names) and names == sorted(names)
    assert get_method_class("none") is NoCompression and get_method_class("random") is RandomCompressor
    assert NoCompression.stage == "none" and RandomCompressor.stage == "vision"
    assert not RandomCompressor.needs_attention_weights


def test_unknown_method_names_it_and_lists_available():
    with pytest.raises(UnknownMethodError) as info:
        get_method_class("fastvv")
    assert isinstance(info.value, KeyError) and isinstance(info.value, ValueError)
    msg = str(info.value)
    assert "'fastvv'" in msg and "none" in msg and "random" in msg and "\n" not in msg
    with pytest.raises(KeyError):
        build_method("fastvv")


def test_build_method_rejects_unknown_parameters():
    with pytest.raises(ValueError, match="ratio") as info:
        build_method("random", budget=64, ratio=0.5)
    assert "budget" in str(info.value)  # lists the accepted ones


@pytest.mark.parametrize("bad", [0, -3, 1.5, float("nan"), "many", True])
def test_invalid_budgets_raise(bad):
    with pytest.raises(BudgetError):
        build_method("random", budget=bad)


def test_random_needs_a_budget_none_does_not():
    with pytest.raises(BudgetError, match="random"):
        build_method("random")
    assert build_method("none").budget is None
    assert build_method("none", budget=64).budget == 64  # accepted, ignored
    assert build_method("random", budget="0.25").budget == 0.25  # command-line strings are parsed


def test_config_dict():
    d = build_method("random", budget=64, seed=3).config_dict()
    assert d == {"name": "random", "stage": "vision", "needs_attention_weights": False, "budget": 64, "seed": 3,
                 "numerics": "official"}


# ---------------------------------------------------------------------- random: tensors only
@pytest.mark.parametrize(("budget", "expected"), [(64, 64), (1, 1), (576, 576), (0.25, 144), (0.1, 58), (1.0, 576)])
def test_random_keeps_exactly_the_budget(budget, expected):
    feats = torch.randn(N, D)
    m = RandomCompressor(budget=budget, seed=0)
    m.reset()
    sel = m.compress_visual(feats, image_index=0)
    assert isinstance(sel, VisualSelection)
    idx = sel.kept_indices
    assert sel.features.shape == (expected, D) and idx.shape == (expected,) and idx.dtype == torch.long
    assert torch.equal(idx, idx.sort().values) and idx.unique().numel() == expected
    assert int(idx.min()) >= 0 and int(idx.max()) < N
    assert torch.equal(sel.features, feats[idx])


def test_random_budget_above_visual_tokens_raises():
    m = RandomCompressor(budget=600)
    with pytest.raises(BudgetError, match="600"):
        m.compress_visual(torch.randn(N, D), image_index=0)


def test_random_seeding():
    assert fresh_indices(64, 0) == fresh_indices(64, 0)
    assert fresh_indices(64, 0) != fresh_indices(64, 1)
    two = fresh_indices(64, 0, calls=2)
    assert two[0] != two[1]  # a run draws a new subset per image
    assert two[0] == fresh_indices(64, 0)[0]


# ---------------------------------------------------------------------- random on the tiny model
def test_random_on_tiny_model_int_budget(tiny_llava15, images):
    gen = {"max_new_tokens": 5, "output_logits": True}
    base = generate(tiny_llava15, [images[0]], "What is in the image?", gen)
    out = generate(tiny_llava15, [images[0]], "What is in the image?", gen, build_method("random", budget=64, seed=0))
    assert out.visual_tokens_in == 576 and out.visual_tokens_llm == 64
    assert out.prompt_tokens == base.prompt_tokens - (576 - 64)
    assert out.layer_visual_tokens == [64] * tiny_llava15.num_layers
    assert out.kv_cache_tokens == [out.prompt_tokens + len(out.output_ids) - 1] * tiny_llava15.num_layers
    assert out.kept_indices == fresh_indices(64, 0)  # generator seeded when generate entered the context
    assert len(out.output_ids) >= 1 and out.text
    assert not torch.allclose(out.logits[0], base.logits[0])  # compression changes the model's output


def test_random_on_tiny_model_float_budget_and_two_images(tiny_llava15, images):
    out = generate(tiny_llava15,
        images[:2], "Compare the images.", {"max_new_tokens": 2}, build_method("random", budget=0.1, seed=5)
    )
    assert out.num_images == 2
    assert out.visual_tokens_in == 2 * 576 and out.visual_tokens_llm == 2 * 58
    assert [len(k) for k in out.kept_indices] == [58, 58]
    assert out.kept_indices[0] != out.kept_indices[1]
    assert out.kept_indices == fresh_indices(0.1, 5, calls=2)


def test_random_run_level_context_gives_reproducible_runs(tiny_llava15, images):
    def run(seed):
        m = build_method("random", budget=32, seed=seed)
        with m(tiny_llava15):
            return [generate(tiny_llava15, [img], "Is there a cat?", {"max_new_tokens": 1}, m).kept_indices
                    for img in images[:2]]

    first, again, other = run(0), run(0), run(1)
    assert first == again and first != other
    assert first[0] != first[1]  # one generator stream over the run


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_random_with_eager_and_sdpa(tiny_llava15, tiny_llava15_cfg, images, attn):
    tiny_llava15_cfg["attn_implementation"] = attn
    adapter = tiny_llava15 if attn == "sdpa" else load_model(tiny_llava15_cfg)
    assert adapter.attn_implementation == attn
    gen = {"max_new_tokens": 4, "output_logits": True}
    out = generate(adapter, [images[1]], "What color is the bus?", gen, build_method("random", budget=64, seed=0))
    assert out.visual_tokens_llm == 64 and out.layer_visual_tokens == [64] * adapter.num_layers
    ref = generate(tiny_llava15, [images[1]], "What color is the bus?", gen, build_method("random", budget=64, seed=0))
    assert out.kept_indices == ref.kept_indices
    torch.testing.assert_close(out.logits[0], ref.logits[0], atol=1e-3, rtol=1e-4)


# ---------------------------------------------------------------------- hook lifecycle
@dataclass
class HookingMethod(TokenCompressor):
    """Test-only stage-2 method: no-op pre-hooks on every decoder layer and a forward hook on the model."""

    stage: ClassVar[str] = "llm"
    calls: int = 0

    def attach(self, adapter):
        for layer in adapter.decoder_layers:
            self.register_hook(layer, self._pre, pre=True, with_kwargs=True)
        self.register_hook(adapter.model, self._post)

    def _pre(self, module, args, kwargs):
        self.calls += 1

    def _post(self, module, args, output):
        pass


def test_hooks_removed_on_exit(tiny_llava15):
    model = tiny_llava15.model
    before = count_hooks(model)
    m = HookingMethod()
    with m(tiny_llava15):
        assert m.is_active
        assert count_hooks(model) == before + tiny_llava15.num_layers + 1
    assert count_hooks(model) == before and not m.is_active


def test_hooks_removed_when_the_block_raises(tiny_llava15):
    model = tiny_llava15.model
    before = count_hooks(model)
    m = HookingMethod()
    with pytest.raises(RuntimeError, match="boom"):
        with m(tiny_llava15):
            assert count_hooks(model) > before
            raise RuntimeError("boom")
    assert count_hooks(model) == before and not m.is_active


def test_hooks_removed_after_generate_and_hooks_run(tiny_llava15, images):
    model = tiny_llava15.model
    before = count_hooks(model)
    m = HookingMethod()
    out = generate(tiny_llava15, [images[0]], "Is it red?", {"max_new_tokens": 2}, m)
    assert m.calls >= tiny_llava15.num_layers  # the hooks were live during generation
    assert out.layer_visual_tokens == [576] * tiny_llava15.num_layers  # no-op hooks drop nothing
    assert count_hooks(model) == before


@dataclass
class BrokenStage1(TokenCompressor):
    """Test-only stage-1 method returning features of the wrong hidden size."""

    stage: ClassVar[str] = "vision"

    def compress_visual(self, features, *, image_index):
        return VisualSelection(features[:8, :3], None)


def test_bad_stage1_output_raises_and_leaves_no_hooks(tiny_llava15, images):
    before = count_hooks(tiny_llava15.model)
    with pytest.raises(ValueError, match="hidden size"):
        generate(tiny_llava15, [images[0]], "Is it red?", {"max_new_tokens": 2}, BrokenStage1())
    assert count_hooks(tiny_llava15.model) == before


def test_context_is_reentrant_for_one_adapter_only(tiny_llava15):
    m = build_method("random", budget=16)
    with m(tiny_llava15):
        with m(tiny_llava15):  # nested, as adapter.generate inside a run-level context
            assert m.is_active
        assert m.is_active
        with pytest.raises(RuntimeError, match="another model"):
            with m(object()):
                pass
    assert not m.is_active


# ---------------------------------------------------------------------- every registered method
#: ToMe merges inside the vision tower: the tiny tower's 2 CLIP layers leave one merging layer, which
#: removes at most half the tokens (577 -> 289 with [CLS]); 64 is refused there (tests/test_tome.py runs
#: the paper budgets on a 24-layer tiny tower).
BUDGET_ON_TINY = {"tome": 288}


@pytest.mark.parametrize("name", available_methods())
def test_every_method_runs_on_tiny_llava15(tiny_llava15, images, name):
    before = count_hooks(tiny_llava15.model)
    method = build_method(name, budget=BUDGET_ON_TINY.get(name, 64), seed=0)
    out = generate(tiny_llava15, [images[2]], "What is shown?", {"max_new_tokens": 2}, method)
    assert out.visual_tokens_in == 576 and 1 <= out.visual_tokens_llm <= 576
    assert len(out.layer_visual_tokens) == tiny_llava15.num_layers
    assert all(0 <= v <= out.visual_tokens_llm for v in out.layer_visual_tokens)
    assert out.layer_visual_tokens == out.planned_layer_visual_tokens  # every method keeps its own plan
    assert len(out.attention_backends["llm_layers"]) == tiny_llava15.num_layers
    assert 1 <= len(out.output_ids) <= 2
    assert count_hooks(tiny_llava15.model) == before


# ---------------------------------------------------------------------- surgery
def test_shrink_placeholder_runs_keeps_text_and_left_pads():
    P, PAD = 9, 0
    ids = torch.tensor([[5, P, P, P, 6, P, P, P, 7], [PAD, PAD, PAD, 4, P, P, P, 8, 8]])
    mask = (ids != PAD).long()
    sels = [
        VisualSelection(torch.zeros(1, 2), torch.tensor([2])),
        VisualSelection(torch.zeros(3, 2), None),
        VisualSelection(torch.zeros(2, 2), torch.tensor([0, 2])),
    ]
    out = shrink_placeholder_runs(ids, mask, P, [3, 3, 3], sels, PAD)
    assert out.input_ids.tolist() == [[5, P, 6, P, P, P, 7], [PAD, PAD, 4, P, P, 8, 8]]
    assert out.attention_mask.tolist() == [[1] * 7, [0, 0, 1, 1, 1, 1, 1]]
    assert out.source_positions.tolist() == [[0, 3, 4, -1, -1, -1, 8], [-1, -1, 3, 4, 6, 7, 8]]
    with pytest.raises(ValueError, match="placeholder"):
        shrink_placeholder_runs(ids, mask, P, [3, 3], sels[:2], PAD)


def test_register_method_rejects_a_taken_name_and_bad_stage():
    from apet_bench.methods import register_method

    @dataclass
    class Impostor(TokenCompressor):
        stage: ClassVar[str] = "vision"

    with pytest.raises(ValueError, match="already registered"):
        register_method("random")(Impostor)

    @dataclass
    class BadStage(TokenCompressor):
        stage: ClassVar[str] = "decoder"

    with pytest.raises(ValueError, match="decoder"):
        register_method("bad_stage_method")(BadStage)
    assert "bad_stage_method" not in available_methods()
    assert get_method_class("random") is RandomCompressor
