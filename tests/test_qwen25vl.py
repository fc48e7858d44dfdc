"""Qwen2.5-VL adapter on the tiny random-weight model: prompt, per-image token counts, stage 1 with
3-D mRoPE positions (docs/models.md), the 1-D fallback guard, exactness checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from apet_bench.methods import build_method
from apet_bench.methods.base import TokenCompressor, VisualSelection
from apet_bench.models import ModelSpec, load_model
from apet_bench.models.qwen25vl import PAPER_MAX_PIXELS, PAPER_MIN_PIXELS, Qwen25VLAdapter
from apet_bench.pipeline import generate, generate_kwargs_for

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "model"
QUESTION = "Is there a dog in the picture?"
GEN = {"max_new_tokens": 4, "min_new_tokens": 4, "output_logits": True}


def _tiny(attn: str = "sdpa") -> Qwen25VLAdapter:
    cfg = yaml.safe_load((CONFIGS / "tiny_qwen25vl.yaml").read_text())
    cfg["attn_implementation"] = attn
    return load_model(cfg)  # type: ignore[return-value]


@pytest.fixture(scope="module")
def adapters() -> dict[str, Qwen25VLAdapter]:
    return {"sdpa": _tiny("sdpa"), "eager": _tiny("eager")}


@pytest.fixture(scope="module")
def image() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (200, 260, 3), dtype=np.uint8))  # -> 80 visual tokens


def _max_diff(a, b) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def _capture_positions(adapter: Qwen25VLAdapter):
    """Pre-hook on the LLM recording the ``position_ids`` of every forward (prefill first)."""
    seen: list[torch.Tensor] = []

    def hook(module, args, kwargs):
        seen.append(kwargs["position_ids"].clone())

    return seen, adapter.model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)


def test_configs_and_spec():
    real = yaml.safe_load((CONFIGS / "qwen25vl.yaml").read_text())
    tiny = yaml.safe_load((CONFIGS / "tiny_qwen25vl.yaml").read_text())
    llava = yaml.safe_load((CONFIGS / "llava15.yaml").read_text())
    assert set(llava) | {"min_pixels", "max_pixels", "gen_kwargs"} == set(real)
    assert real["available"] and tiny["available"]
    assert len(real["revision"]) == 40 and int(real["revision"], 16) >= 0
    assert (real["min_pixels"], real["max_pixels"]) == (PAPER_MIN_PIXELS, PAPER_MAX_PIXELS)
    assert real["visual_tokens"] == real["max_pixels"] // 28**2 == 2048
    assert tiny["visual_tokens"] == tiny["max_pixels"] // 28**2
    spec = ModelSpec.from_mapping(real)
    assert spec.options["min_pixels"] == PAPER_MIN_PIXELS and spec.family == "qwen25vl"


def test_prompt_and_per_image_tokens(adapters, image):
    a = adapters["sdpa"]
    assert a.max_visual_tokens == a.num_visual_tokens == 256 and a.num_layers == 4
    prompt = a.build_prompt(QUESTION)
    assert prompt == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        f"<|vision_start|><|image_pad|><|vision_end|>{QUESTION}<|im_end|>\n<|im_start|>assistant\n"
    )
    inputs = a.prepare_inputs([image], prompt)
    t, h, w = inputs["image_grid_thw"][0].tolist()
    n = int((inputs["input_ids"] == a.visual_token_id).sum())
    assert n == t * h * w // 4 == a.visual_tokens_for(image) == 80 and a.visual_token_counts(inputs) == [80]
    assert int(inputs["mm_token_type_ids"].sum()) == n
    big = Image.new("RGB", (1000, 800))
    small = Image.new("RGB", (40, 40))
    assert a.visual_tokens_for(big) <= 256 and a.visual_tokens_for(small) >= 64
    assert a.visual_tokens_for(big) != a.visual_tokens_for(image)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_none_equals_hf_generate(adapters, image, attn):
    a = adapters[attn]
    assert a.attn_implementation == attn
    out = generate(a, [image], QUESTION, GEN)
    inputs = a.prepare_inputs([image], a.build_prompt(QUESTION))
    ref = a.model.generate(**inputs, **generate_kwargs_for(a, GEN))
    assert ref.sequences[0, inputs["input_ids"].shape[1] :].tolist() == out.output_ids
    assert _max_diff(ref.logits, out.logits) == 0.0
    assert out.visual_tokens_in == out.visual_tokens_llm == 80
    # keeping every token at stage 1 (explicit positions, mm_encoder_outputs) is the unmodified model
    full = generate(a, [image], QUESTION, GEN, build_method("random", budget=1.0, seed=0))
    assert full.output_ids == out.output_ids and _max_diff(full.logits, out.logits) == 0.0
    assert full.prompt_tokens == out.prompt_tokens


@pytest.mark.parametrize("budget,expected", [(16, 16), (0.1, round(0.1 * 80)), (0.25, 20)])
def test_random_keeps_exactly_the_budget(adapters, image, budget, expected):
    a = adapters["sdpa"]
    base = generate(a, [image], QUESTION, {"max_new_tokens": 1})
    out = generate(a, [image], QUESTION, GEN, build_method("random", budget=budget, seed=3))
    assert out.visual_tokens_in == 80 and out.visual_tokens_llm == expected
    assert out.layer_visual_tokens == [expected] * 4
    assert out.prompt_tokens == base.prompt_tokens - (80 - expected)
    assert out.kv_cache_tokens == [out.prompt_tokens + len(out.output_ids) - 1] * 4
    assert len(out.kept_indices[0]) == expected


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_cached_equals_uncached_at_25_percent(adapters, image, attn):
    a = adapters[attn]
    cached = generate(a, [image], QUESTION, GEN, build_method("random", budget=0.25, seed=1))
    uncached = generate(a, [image], QUESTION, {**GEN, "use_cache": False}, build_method("random", budget=0.25, seed=1))
    assert cached.output_ids == uncached.output_ids
    assert _max_diff(cached.logits, uncached.logits) < 1e-4
    none = generate(a, [image], QUESTION, GEN)
    assert _max_diff(cached.logits, none.logits) > 1e-2  # compression changes the answer's logits


def test_kept_tokens_keep_original_3d_positions(adapters, image):
    """Reference by hand: before the image, t = h = w = column; the image's token i (raster order over
    the merged H x W grid) is (s, s + i // W, s + i % W) with s its run's first column; text after the
    image continues at s + max(H, W). A 1-D fallback would fail this test."""
    a = adapters["sdpa"]
    inputs = a.prepare_inputs([image], a.build_prompt(QUESTION))
    ids = inputs["input_ids"][0]
    _, gh, gw = inputs["image_grid_thw"][0].tolist()
    H, W = gh // 2, gw // 2
    s = int((ids == a.visual_token_id).nonzero()[0])
    n_after = int(ids.numel()) - s - H * W
    method = build_method("random", budget=0.25, seed=5)
    seen, handle = _capture_positions(a)
    try:
        out = generate(a, [image], QUESTION, {"max_new_tokens": 2, "min_new_tokens": 2}, method)
    finally:
        handle.remove()
    pos = seen[0]
    kept = torch.tensor(out.kept_indices[0])
    k = kept.numel()
    assert pos.shape == (4, 1, s + k + n_after)
    ref = torch.cat(
        [
            torch.arange(s).expand(3, -1),
            torch.stack([torch.full((k,), s), s + kept // W, s + kept % W]),
            (s + max(H, W) + torch.arange(n_after)).expand(3, -1),
        ],
        dim=1,
    )
    assert torch.equal(pos[1:, 0], ref)
    assert torch.equal(pos[0, 0], torch.arange(s + k + n_after))  # text row: cumsum of the new mask - 1
    # decode continues after the original last position, as without compression (rope_deltas agree)
    assert seen[1].shape == (4, 1, 1) and torch.equal(seen[1][1:, 0, 0], torch.full((3,), int(ref.max()) + 1))
    assert int(a.model.model.rope_deltas) == int(ref.max()) + 1 - (s + k + n_after)
    unshrunk, handle = _capture_positions(a)
    try:
        generate(a, [image], QUESTION, {"max_new_tokens": 2, "min_new_tokens": 2})
    finally:
        handle.remove()
    assert torch.equal(unshrunk[1][1:], seen[1][1:])


def test_one_d_positions_are_refused(adapters, image, monkeypatch):
    a = adapters["sdpa"]
    original = Qwen25VLAdapter.stage_one_inputs

    def without_positions(self, inputs, selections, shrunk):
        gen_inputs = original(self, inputs, selections, shrunk)
        gen_inputs.pop("position_ids")  # what a naive stage 1 would do: HF then builds 1-D positions
        return gen_inputs

    monkeypatch.setattr(Qwen25VLAdapter, "stage_one_inputs", without_positions)
    with pytest.raises(RuntimeError, match="1-D fallback refused"):
        generate(a, [image], QUESTION, {"max_new_tokens": 2}, build_method("random", budget=0.25, seed=0))
    monkeypatch.undo()
    a.model.generate(**a.prepare_inputs([image], a.build_prompt(QUESTION)), max_new_tokens=1)  # guard disarmed


class _Pool(TokenCompressor):
    """Average pairs of tokens; no kept_indices (a method making new tokens)."""

    name = "test_pool"
    stage = "vision"

    def compress_visual(self, features, *, image_index):
        n = features.shape[0] // 2 * 2
        return VisualSelection(features[:n].view(n // 2, 2, -1).mean(1), None)


def test_new_tokens_without_indices_get_positions_inside_the_image(adapters, image):
    a = adapters["sdpa"]
    inputs = a.prepare_inputs([image], a.build_prompt(QUESTION))
    s = int((inputs["input_ids"][0] == a.visual_token_id).nonzero()[0])
    _, gh, gw = inputs["image_grid_thw"][0].tolist()
    H, W = gh // 2, gw // 2
    seen, handle = _capture_positions(a)
    try:
        out = generate(a, [image], QUESTION, {"max_new_tokens": 2}, _Pool())
    finally:
        handle.remove()
    assert out.visual_tokens_llm == 40 and out.kept_indices is None
    vis = seen[0][1:, 0, s : s + 40]
    assert (vis[0] == s).all() and vis[1].min() == s and vis[1].max() == s + H - 1 and vis[2].max() <= s + W - 1


@pytest.mark.parametrize("size", [(10, 10), (27, 300)])
def test_image_smaller_than_a_patch_is_a_one_line_error(adapters, size):
    a = adapters["sdpa"]
    with pytest.raises(ValueError) as ei:
        generate(a, [Image.new("RGB", size)], QUESTION, {"max_new_tokens": 1})
    msg = str(ei.value)
    assert "\n" not in msg and f"{size[0]}x{size[1]} px" in msg and "image 0" in msg


def test_bad_pixels_and_offline_real_model_are_one_line_errors(monkeypatch):
    from apet_bench.models import ModelConfigError

    with pytest.raises(ModelConfigError, match="max_pixels"):
        load_model({"name": "q", "family": "qwen25vl", "tiny": True, "min_pixels": 50176, "max_pixels": 700})
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = yaml.safe_load((CONFIGS / "qwen25vl.yaml").read_text())
    cfg["hf_id"] = "apet-bench-test/not-a-model"
    cfg["device"] = "cpu"
    with pytest.raises(ModelConfigError) as ei:
        load_model(cfg)
    assert "\n" not in str(ei.value) and "not-a-model" in str(ei.value)


def test_saved_checkpoint_loads_through_the_real_model_path(tmp_path, image):
    """The non-tiny path (model + tokenizer + Qwen2VLImageProcessorPil, no video processor) on a saved
    tiny model whose preprocessor_config.json carries its own min/max_pixels, as the hub checkpoint
    does (3136 / 12845056): the configured bounds must win."""
    import json

    from apet_bench.models.qwen25vl import build_tiny_qwen25vl

    model, processor = build_tiny_qwen25vl()
    model.save_pretrained(tmp_path)
    processor.tokenizer.save_pretrained(tmp_path)
    processor.image_processor.save_pretrained(tmp_path)
    cfg_path = tmp_path / "preprocessor_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(min_pixels=3136, max_pixels=12845056)
    cfg_path.write_text(json.dumps(cfg))
    a = load_model(
        {"name": "saved", "family": "qwen25vl", "local_path": str(tmp_path), "device": "cpu", "dtype": "float32",
         "min_pixels": 64 * 784, "max_pixels": 256 * 784, "visual_tokens": 256}
    )
    assert not a.is_random_weights and a.weights.startswith("local:")
    assert (a.min_pixels, a.max_pixels) == (64 * 784, 256 * 784)
    ref = _tiny()
    out, want = (generate(x, [image], QUESTION, {"max_new_tokens": 3}) for x in (a, ref))
    assert out.output_ids == want.output_ids and out.visual_tokens_in == 80


# ---------------------------------------------------------------------- stage 2 (layer-K drop) on Qwen
def _stage2():
    return pytest.importorskip("test_stage2", reason="stage-2 helpers (tests/test_stage2.py) not available")


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_stage2_matrix(adapters, image, attn):
    """Decoder layers get mRoPE cos/sin already folded, so the generic layer-K gather holds on Qwen:
    keep-all == baseline exactly; 25 % kept: cached == uncached, per-layer KV lengths per plan;
    left-padded batch of 2 == its batch-1 rows; hooks gone afterwards."""
    s2 = _stage2()
    a = adapters[attn]
    base = s2.check_keep_all_equals_baseline(a, [image])
    assert base.layer_visual_tokens == [80] * 4
    out = s2.check_cached_equals_uncached(a, [image])
    assert out.layer_visual_tokens == [80, 80, 20, 20] and out.kv_cache_tokens[0] - out.kv_cache_tokens[2] == 60
    other = Image.fromarray(np.random.default_rng(1).integers(0, 255, (200, 260, 3), dtype=np.uint8))
    s2.check_left_padded_batch(a, [image, other], ["What is it?", "How many people are in the picture?"])
    s2.check_hooks_gone(a, [image])


def test_random_at_stage2(adapters, image):
    a = adapters["sdpa"]
    out = generate(a, [image], QUESTION, GEN, build_method("random", budget=20, seed=3, stage="llm", layer=2))
    assert out.visual_tokens_llm == 80 and out.layer_visual_tokens == [80, 80, 20, 20]
    assert out.kv_cache_tokens == [out.prompt_tokens + 3] * 2 + [out.prompt_tokens - 60 + 3] * 2
    assert len(out.kept_indices[0]) == 20
    frac = generate(a, [image], QUESTION, GEN, build_method("random", budget=0.1, seed=3, stage="llm", layer=1))
    assert frac.layer_visual_tokens == [80, 8, 8, 8]


def test_bad_sample_error_names_the_sample(adapters):
    """Through the lmms-eval model wrapper, the one-line error names task, doc_id and the image size."""
    from types import SimpleNamespace

    from apet_bench.eval.lmms_model import ApetBenchLMM

    lmm = ApetBenchLMM(adapter=adapters["sdpa"], compressor=build_method("random", budget=0.1))
    lmm.task_dict = {"mme": {"test": {7: {"image": Image.new("RGB", (10, 10))}}}}
    req = SimpleNamespace(args=("What is it?", {"max_new_tokens": 2}, lambda doc: [doc["image"]], 7, "mme", "test"))
    with pytest.raises(ValueError, match=r"^mme doc_id=7: image 0 is 10x10 px, smaller than one 28x28 px merged patch"):
        lmm.generate_until([req])


def test_stage_both_on_qwen(adapters, image):
    """Stage 1 (explicit mRoPE positions) then stage 2 at layer 2: cached == uncached, KV per plan."""
    s2 = _stage2()
    a = adapters["sdpa"]
    out = s2.check_cached_equals_uncached(a, [image], method=s2.HalfThenQuarter(layer=2))
    assert (out.visual_tokens_in, out.visual_tokens_llm) == (80, 40) and out.layer_visual_tokens == [40, 40, 10, 10]
