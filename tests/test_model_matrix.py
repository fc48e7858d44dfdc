"""The issue-3 matrix: every tiny model x {eager, sdpa} x {stage 1, stage 2}.

For each cell: keeping every visual token reproduces the unmodified model exactly (same tokens,
logits equal); with 25 % kept, cached generation equals uncached generation with the same selection
(logits within 1e-4) and each layer's KV cache length equals the plan; hooks are gone after the
context exits, also after an exception (the model again equals the unmodified one). Stage-2 checks
are the reusable helpers of ``test_stage2``; stage-1 checks are below.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pytest
import torch
from conftest import make_image
from omegaconf import OmegaConf
from test_stage2 import (
    GEN,
    QUESTION,
    assert_logits_close,
    assert_logits_equal,
    check_attention_rows_match_eager,
    check_cached_equals_uncached,
    check_hooks_gone,
    check_keep_all_equals_baseline,
    check_left_padded_batch,
    count_hooks,
    expected_kv,
)

from apet_bench.config import compose
from apet_bench.methods.base import TokenCompressor, VisualSelection
from apet_bench.models import load_model
from apet_bench.pipeline import generate

MODELS = ["tiny_llava15", "tiny_llava_next", "tiny_qwen25vl", "tiny_video_llava"]
BACKENDS = ["eager", "sdpa"]


@dataclass
class KeepAllVision(TokenCompressor):
    """Stage 1 returning every visual token (exercises the whole stage-1 path, drops nothing)."""

    stage: ClassVar[str] = "vision"

    def compress_visual(self, features, *, image_index):
        return VisualSelection(features, torch.arange(features.shape[0], device=features.device))


@dataclass
class EveryFourthVision(TokenCompressor):
    """Deterministic stage 1 keeping visual tokens 0, 4, 8, ... (25 %)."""

    stage: ClassVar[str] = "vision"

    def compress_visual(self, features, *, image_index):
        idx = torch.arange(0, features.shape[0], 4, device=features.device)
        return VisualSelection(features[idx], idx)


@dataclass
class RaisingVision(EveryFourthVision):
    def compress_visual(self, features, *, image_index):
        raise RuntimeError("boom")


_CACHE: dict[tuple[str, str], object] = {}


def get_adapter(model: str, attn: str):
    key = (model, attn)
    if key not in _CACHE:
        cfg = compose([f"model={model}", f"model.attn_implementation={attn}"])
        _CACHE[key] = load_model(OmegaConf.to_container(cfg.model, resolve=True))
    return _CACHE[key]


def visuals_for(model: str) -> list[list]:
    """Inputs per model: one image (all); Video-LLaVA also an 8-frame clip."""
    out = [[make_image(7, (64, 48))]]
    if model == "tiny_video_llava":
        rng = np.random.default_rng(3)
        out.append([(rng.random((8, 48, 64, 3)) * 255).astype("uint8")])
    return out


CELLS = [(m, a) for m in MODELS for a in BACKENDS]


@pytest.fixture(params=CELLS, ids=[f"{m}-{a}" for m, a in CELLS])
def cell(request):
    model, attn = request.param
    adapter = get_adapter(model, attn)
    assert adapter.attn_implementation == attn
    return model, adapter


def test_stage1_keep_all_equals_unmodified(cell):
    model, adapter = cell
    for visuals in visuals_for(model):
        base = generate(adapter, visuals, QUESTION, GEN)
        same = generate(adapter, visuals, QUESTION, GEN, KeepAllVision())
        assert same.output_ids == base.output_ids
        assert_logits_equal(same.logits, base.logits)
        assert same.visual_tokens_llm == base.visual_tokens_llm == base.visual_tokens_in
        assert same.kv_cache_tokens == base.kv_cache_tokens


def test_stage1_quarter_cached_equals_uncached_and_kv_follows_plan(cell):
    model, adapter = cell
    for visuals in visuals_for(model):
        method = EveryFourthVision()
        cached = generate(adapter, visuals, QUESTION, GEN, method)
        uncached = generate(adapter, visuals, QUESTION, {**GEN, "use_cache": False}, method)
        assert cached.output_ids == uncached.output_ids
        assert_logits_close(cached.logits, uncached.logits)
        n = cached.visual_tokens_in
        assert cached.visual_tokens_llm == -(-n // 4)
        assert cached.layer_visual_tokens == [cached.visual_tokens_llm] * adapter.num_layers
        assert cached.planned_layer_visual_tokens == cached.layer_visual_tokens
        assert cached.kv_cache_tokens == expected_kv(cached)


def test_stage1_hooks_gone_after_exit_and_exception(cell):
    model, adapter = cell
    visuals = visuals_for(model)[0]
    before = count_hooks(adapter.model)
    base = generate(adapter, visuals, QUESTION, GEN)
    generate(adapter, visuals, QUESTION, GEN, EveryFourthVision())
    with pytest.raises(RuntimeError, match="boom"):
        generate(adapter, visuals, QUESTION, GEN, RaisingVision())
    assert count_hooks(adapter.model) == before
    after = generate(adapter, visuals, QUESTION, GEN)
    assert after.output_ids == base.output_ids
    assert_logits_equal(after.logits, base.logits)


def test_stage2_keep_all_equals_unmodified(cell):
    model, adapter = cell
    for visuals in visuals_for(model):
        check_keep_all_equals_baseline(adapter, visuals)


def test_stage2_quarter_cached_equals_uncached_and_kv_follows_plan(cell):
    model, adapter = cell
    for visuals in visuals_for(model):
        check_cached_equals_uncached(adapter, visuals)


def test_stage2_hooks_gone_after_exit_and_exception(cell):
    model, adapter = cell
    check_hooks_gone(adapter, visuals_for(model)[0])


@pytest.mark.parametrize("model", MODELS)
def test_stage2_left_padded_batch(model):
    adapter = get_adapter(model, "sdpa")
    images = [make_image(11, (64, 48)), make_image(12, (64, 48))]
    check_left_padded_batch(adapter, images, ["What is it?", "What color is the large car on the left?"])


@pytest.mark.parametrize("model", MODELS)
def test_attention_rows_match_eager_with_sdpa_kept(model):
    sdpa, eager = get_adapter(model, "sdpa"), get_adapter(model, "eager")
    image = make_image(5, (64, 48))
    inputs = sdpa.prepare_inputs([image], sdpa.build_prompt(QUESTION, 1))
    check_attention_rows_match_eager(sdpa, eager, inputs, layer=1)
