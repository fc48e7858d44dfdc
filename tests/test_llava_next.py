"""LLaVA-NeXT adapter on the tiny random-weight model: anyres layout, the ``none`` path against plain
Hugging Face, stage-1 surgery on the packed features (newline tokens included), eager and sdpa."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from conftest import make_image

from apet_bench.budget import budget_to_tokens
from apet_bench.methods import TokenCompressor, build_method
from apet_bench.methods.base import LLMSelection, VisualSelection
from apet_bench.models import ModelConfigError, load_model
from apet_bench.models.llava15 import VICUNA_V1_SYSTEM
from apet_bench.models.llava_next import LlavaNextAdapter, TinyLlavaNextConfig
from apet_bench.pipeline import generate

TINY_LLAVA_NEXT_CFG: dict = {
    "name": "tiny_llava_next",
    "family": "llava_next",
    "tiny": True,
    "dtype": "float32",
    "attn_implementation": "sdpa",
    "device": "cpu",
    "seed": 0,
    "visual_tokens": 336,
    "num_layers": 4,
    "tiny_config": {},
}
GEN = {"max_new_tokens": 5, "output_logits": True}
#: (width, height): 4:3 (rows unpadded), square (no unpadding), portrait 1:3, wide 3:1.
SIZES = [(200, 150), (224, 224), (100, 300), (300, 100)]


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def next_adapter(request):
    return load_model({**TINY_LLAVA_NEXT_CFG, "attn_implementation": request.param})


@pytest.fixture(scope="module")
def next_sdpa():
    return load_model(dict(TINY_LLAVA_NEXT_CFG))


@pytest.fixture(scope="module")
def next_images():
    return [make_image(10 + i, size) for i, size in enumerate(SIZES)]


class KeepAllAtProjector(TokenCompressor):
    """Test-only stage-1 method that keeps every visual token (exercises the surgery path)."""

    stage = "vision"


def assert_same_logits(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x, y), (x - y).abs().max()


def test_attributes_and_config_file(next_sdpa):
    a = next_sdpa
    assert isinstance(a, LlavaNextAdapter) and a.family == "llava_next"
    assert a.num_layers == 4 and a.tokens_per_crop == 64 and a.patches_per_side == 8
    assert a.num_visual_tokens == 64 + 16 * 17  # 2x2 grid of 8x8 crops, one newline per row
    pins = a.model.config.image_grid_pinpoints
    assert [list(p) for p in a.processor.image_processor.image_grid_pinpoints] == [list(p) for p in pins]
    assert a.is_random_weights and a.describe()["family"] == "llava_next"
    prompt = a.build_prompt("What is it?")
    assert prompt == f"{VICUNA_V1_SYSTEM} USER: <image>\nWhat is it? ASSISTANT:"


@pytest.mark.parametrize("size_index", range(len(SIZES)))
def test_visual_layout_matches_placeholders_and_features(next_sdpa, next_images, size_index):
    a = next_sdpa
    image = next_images[size_index]
    inputs = a.prepare_inputs([image], a.build_prompt("What is it?"))
    (layout,) = a.visual_layout(inputs)
    placeholders = (inputs["input_ids"][0] == a.visual_token_id).nonzero().flatten()
    assert layout.num_tokens == placeholders.numel() <= a.num_visual_tokens
    assert layout.start == int(placeholders[0])
    (features,) = a.encode_images(inputs)
    assert features.shape[0] == layout.num_tokens
    h, w = layout.feature_grid
    assert layout.num_tokens == 64 + h * (w + 1)
    assert torch.equal(layout.base_positions, torch.arange(64))
    newlines = layout.newline_positions
    assert newlines.numel() == h
    assert torch.equal(newlines, 64 + torch.arange(1, h + 1) * (w + 1) - 1)  # one after each grid row
    assert torch.equal(features[newlines], a.model.model.image_newline.expand(h, -1))
    segs = layout.segments
    assert len(segs) == layout.num_sub_images == 1 + layout.crop_grid[0] * layout.crop_grid[1]
    covered = torch.cat([*segs, newlines]).sort().values
    assert torch.equal(covered, torch.arange(layout.num_tokens))  # a partition of the span
    assert all(s.numel() <= 64 for s in segs)


def test_square_image_is_not_unpadded(next_sdpa, next_images):
    inputs = next_sdpa.prepare_inputs([next_images[1]], next_sdpa.build_prompt("q"))
    (layout,) = next_sdpa.visual_layout(inputs)
    assert layout.crop_grid == (2, 2) and layout.feature_grid == (16, 16)
    assert layout.num_tokens == next_sdpa.num_visual_tokens == 336
    assert [s.numel() for s in layout.segments] == [64] * 5


def test_none_equals_plain_hf_generate(next_adapter, next_images):
    a = next_adapter
    question = "What color is the car?"
    out = generate(a, [next_images[0]], question, GEN, build_method("none"))
    inputs = a.processor(images=[next_images[0]], text=a.build_prompt(question), return_tensors="pt")
    with torch.inference_mode():
        ref = a.model.generate(
            **inputs, max_new_tokens=5, do_sample=False, output_logits=True, return_dict_in_generate=True
        )
    prompt_len = inputs["input_ids"].shape[1]
    assert out.output_ids == ref.sequences[0, prompt_len:].tolist()
    assert_same_logits(out.logits, ref.logits)
    n = a.visual_layout(inputs)[0].num_tokens
    assert out.visual_tokens_in == out.visual_tokens_llm == n
    assert out.layer_visual_tokens == [n] * a.num_layers
    assert out.kv_cache_tokens == [prompt_len + len(out.output_ids) - 1] * a.num_layers


def test_outputs_depend_on_the_image(next_sdpa, next_images):
    outs = [generate(next_sdpa, [img], "What is in the image?", GEN) for img in next_images[:2]]
    assert not torch.allclose(outs[0].logits[0], outs[1].logits[0])


def test_stage1_keep_all_equals_baseline(next_adapter, next_images):
    a = next_adapter
    base = generate(a, [next_images[2]], "What color is it?", GEN)
    same = generate(a, [next_images[2]], "What color is it?", GEN, KeepAllAtProjector())
    assert same.output_ids == base.output_ids
    assert_same_logits(same.logits, base.logits)
    assert same.kept_indices == [list(range(base.visual_tokens_in))]
    assert same.prompt_tokens == base.prompt_tokens


def test_random_stage1_keeps_budget_and_cache_matches_no_cache(next_adapter, next_images):
    a = next_adapter
    question = "Is there a dog?"
    cached = generate(a, [next_images[0]], question, GEN, build_method("random", budget=0.25, seed=0))
    n = cached.visual_tokens_in
    k = budget_to_tokens(0.25, n)
    assert cached.visual_tokens_llm == k and cached.layer_visual_tokens == [k] * a.num_layers
    assert len(cached.kept_indices[0]) == k
    assert cached.kv_cache_tokens == [cached.prompt_tokens + len(cached.output_ids) - 1] * a.num_layers
    nocache = generate(a,
        [next_images[0]], question, {**GEN, "use_cache": False}, build_method("random", budget=0.25, seed=0)
    )
    assert nocache.kept_indices == cached.kept_indices
    assert nocache.output_ids == cached.output_ids
    for x, y in zip(cached.logits, nocache.logits):
        torch.testing.assert_close(x, y, atol=1e-4, rtol=0)
    full = generate(a, [next_images[0]], question, GEN)
    assert not torch.allclose(full.logits[0], cached.logits[0])  # dropping 75% changes the answer logits


def test_random_int_budget_and_two_images(next_sdpa, next_images):
    a = next_sdpa
    out = generate(a, next_images[:2], "Are they the same?", GEN, build_method("random", budget=40, seed=1))
    assert out.num_images == 2 and out.visual_tokens_llm == 80
    assert [len(k) for k in out.kept_indices] == [40, 40]
    inputs = a.prepare_inputs(next_images[:2], a.build_prompt("Are they the same?", 2))
    layouts = a.visual_layout(inputs)
    assert out.visual_tokens_in == sum(lay.num_tokens for lay in layouts)
    assert layouts[1].start >= layouts[0].start + layouts[0].num_tokens


def test_prompt_without_placeholder_raises_one_line(next_sdpa, next_images):
    with pytest.raises(ValueError, match=r"0 <image> placeholder\(s\) for 1 image") as exc:
        next_sdpa.prepare_inputs([next_images[0]], f"{VICUNA_V1_SYSTEM} USER: hi ASSISTANT:")
    assert "\n" not in str(exc.value)
    with pytest.raises(ValueError, match="placeholder"):
        generate(next_sdpa, [next_images[0]], "<image> <image> two?", GEN)


def test_image_smaller_than_a_patch_raises_one_line(next_sdpa):
    with pytest.raises(ValueError, match=r"image 0 is 13x40 px, smaller than one 14x14 px patch") as exc:
        generate(next_sdpa, [make_image(0, (13, 40))], "What is it?", GEN)
    assert "\n" not in str(exc.value)


def test_tiny_config_grid_shapes_and_errors():
    tc = TinyLlavaNextConfig.from_mapping({"grid_shapes": [[1, 1], [2, 2]], "image_size": 56})
    assert tc.image_grid_pinpoints == [[56, 56], [112, 112]] and tc.num_visual_tokens == 16
    assert TinyLlavaNextConfig.from_mapping({"image_size": 336}).image_grid_pinpoints[2] == [672, 672]
    with pytest.raises(ValueError, match="grid_shapes"):
        TinyLlavaNextConfig.from_mapping({"grid_shapes": [[0, 1]]})
    with pytest.raises(ValueError, match="unknown tiny_config key"):
        TinyLlavaNextConfig.from_mapping({"pinpoints": []})


def test_visual_tokens_mismatch_raises():
    with pytest.raises(ModelConfigError, match="visual_tokens 2928"):
        load_model({**TINY_LLAVA_NEXT_CFG, "visual_tokens": 2928})


def test_bad_sample_error_names_the_sample(next_sdpa):
    """Through the lmms-eval model wrapper, the one-line error names task and doc_id."""
    from types import SimpleNamespace

    from apet_bench.eval.lmms_model import ApetBenchLMM

    lmm = ApetBenchLMM(adapter=next_sdpa, compressor=build_method("none"))
    lmm.task_dict = {"mme": {"test": {7: {"image": make_image(0, (5, 5))}}}}
    req = SimpleNamespace(args=("What is it?", {"max_new_tokens": 2}, lambda doc: [doc["image"]], 7, "mme", "test"))
    with pytest.raises(ValueError, match=r"^mme doc_id=7: image 0 is 5x5 px, smaller than one 14x14 px patch$"):
        lmm.generate_until([req])


# ---------------------------------------------------------------------- stage 2 (layer-K drop) on NeXT
@dataclass
class EveryFourthAtLayer1(TokenCompressor):
    """Test-only deterministic stage-2 method: keep every 4th visual position at decoder layer 1."""

    stage: ClassVar[str] = "llm"
    layer: ClassVar[int] = 1

    def llm_keep_count(self, num_visual_tokens, *, layer_idx):
        return (num_visual_tokens + 3) // 4

    def select_llm_tokens(self, hidden_states, visual_positions, *, layer_idx, attention=None):
        return LLMSelection(torch.stack([v[::4] for v in visual_positions]))


def test_visual_positions_cover_the_packed_span(next_sdpa, next_images):
    a = next_sdpa
    inputs = a.prepare_inputs([next_images[0]], a.build_prompt("q"))
    (layout,) = a.visual_layout(inputs)
    (pos,) = a.visual_positions(inputs["input_ids"], inputs["attention_mask"])
    assert torch.equal(pos, layout.start + torch.arange(layout.num_tokens))  # newline tokens included


def test_random_stage_llm_drops_at_layer_k(next_adapter, next_images):
    a = next_adapter
    question = "What is it?"
    base = generate(a, [next_images[0]], question, GEN)
    n, p = base.visual_tokens_in, base.prompt_tokens
    out = generate(a, [next_images[0]], question, GEN, build_method("random", budget=0.25, seed=0, stage="llm", layer=2))
    k = budget_to_tokens(0.25, n)
    assert out.layer_visual_tokens == [n, n, k, k]
    assert out.visual_tokens_llm == n and out.prompt_tokens == p
    t = len(out.output_ids) - 1
    assert out.kv_cache_tokens == [p + t, p + t, p - n + k + t, p - n + k + t]
    nocache = generate(a,
        [next_images[0]], question, {**GEN, "use_cache": False},
        build_method("random", budget=0.25, seed=0, stage="llm", layer=2),
    )
    torch.testing.assert_close(out.logits[0], nocache.logits[0], atol=1e-4, rtol=0)  # same first draw
    keep_all = generate(a, [next_images[0]], question, GEN, build_method("random", budget=1.0, stage="llm", layer=2))
    assert keep_all.output_ids == base.output_ids
    assert_same_logits(keep_all.logits, base.logits)


def test_stage_llm_cached_equals_uncached(next_adapter, next_images):
    a = next_adapter
    cached = generate(a, [next_images[3]], "Is there a dog?", GEN, EveryFourthAtLayer1())
    nocache = generate(a, [next_images[3]], "Is there a dog?", {**GEN, "use_cache": False}, EveryFourthAtLayer1())
    n = cached.visual_tokens_in
    assert cached.layer_visual_tokens == [n] + [len(range(0, n, 4))] * 3
    assert cached.output_ids == nocache.output_ids
    for x, y in zip(cached.logits, nocache.logits):
        torch.testing.assert_close(x, y, atol=1e-4, rtol=0)


@dataclass
class RecordsLayouts(TokenCompressor):
    """Test-only stage-1 method that keeps the base view only, reading the adapter's current layout."""

    stage: ClassVar[str] = "vision"
    adapter: object = None
    seen: list = None

    def attach(self, adapter):
        self.adapter, self.seen = adapter, []

    def compress_visual(self, features, *, image_index):
        layout = self.adapter.current_layouts[image_index]
        self.seen.append((layout.num_tokens, int(features.shape[0])))
        kept = layout.base_positions.to(features.device)
        return VisualSelection(features.index_select(0, kept), kept)


def test_methods_read_the_current_layout_per_image(next_sdpa, next_images):
    m = RecordsLayouts()
    out = generate(next_sdpa, next_images[:2], "Same?", {"max_new_tokens": 2}, m)
    assert [a == b for a, b in m.seen] == [True, True]
    assert out.visual_tokens_llm == 2 * 64 and out.kept_indices == [list(range(64))] * 2


def test_config_files_load_and_match_the_llava15_keys():
    from pathlib import Path

    import yaml

    root = Path(__file__).resolve().parents[1] / "configs" / "model"
    cfg = {n: yaml.safe_load((root / f"{n}.yaml").read_text()) for n in
           ("llava15", "tiny_llava15", "llava_next", "tiny_llava_next")}
    # LLaVA-NeXT adds the named GQA sampling option of its official script (off by default).
    assert set(cfg["llava_next"]) - {"official_sampling", "official_sampling_kwargs"} == set(cfg["llava15"])
    assert set(cfg["tiny_llava_next"]) == set(cfg["tiny_llava15"])
    assert cfg["llava_next"]["official_sampling"] is False
    assert cfg["llava_next"]["hf_id"] == "llava-hf/llava-v1.6-vicuna-7b-hf"
    assert cfg["llava_next"]["visual_tokens"] == 2928 and cfg["llava_next"]["num_layers"] == 32
    adapter = load_model(cfg["tiny_llava_next"])
    assert adapter.num_visual_tokens == cfg["tiny_llava_next"]["visual_tokens"]


def test_uncached_real_checkpoint_offline_raises_one_line():
    cfg = {**TINY_LLAVA_NEXT_CFG, "name": "llava_next", "tiny": False, "hf_id": "llava-hf/llava-v1.6-vicuna-7b-hf",
           "visual_tokens": 2928, "num_layers": 32}
    with pytest.raises(ModelConfigError, match=r"cannot load llava-hf/llava-v1.6-vicuna-7b-hf@main: offline") as exc:
        load_model(cfg)
    assert "\n" not in str(exc.value)
