"""Model adapters: tiny LLaVA-1.5 build, loading from a local snapshot, config errors, and the
``none`` path against the plain Hugging Face model."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from apet_bench.methods import TokenCompressor, build_method
from apet_bench.models import GenerationOutput, ModelConfigError, load_model
from apet_bench.models.llava15 import VICUNA_V1_SYSTEM
from apet_bench.models.tiny import TinyLlavaConfig, build_tiny_llava15
from apet_bench.pipeline import generate

GEN = {"max_new_tokens": 6, "output_logits": True}


def plain_hf_generate(adapter, images, question, max_new_tokens=6):
    """Reference: the processor and ``model.generate`` as a Hugging Face user would call them."""
    inputs = adapter.processor(
        images=images, text=adapter.build_prompt(question, len(images)), return_tensors="pt"
    )
    with torch.inference_mode():
        out = adapter.model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
    return inputs, out


def assert_same_logits(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x, y), (x - y).abs().max()


# ---------------------------------------------------------------------- the none path == plain HF
def test_none_equals_plain_hf_generate(tiny_llava15, images):
    adapter = tiny_llava15
    question = "What color is the car?"
    out = generate(adapter, [images[0]], question, GEN, build_method("none"))
    inputs, ref = plain_hf_generate(adapter, [images[0]], question)
    prompt_len = inputs["input_ids"].shape[1]
    assert out.output_ids == ref.sequences[0, prompt_len:].tolist()
    assert out.logits is not None
    assert_same_logits(out.logits, ref.logits)
    assert out.text == adapter.tokenizer.decode(out.output_ids, skip_special_tokens=True).strip()
    assert out.prompt_tokens == prompt_len
    assert out.visual_tokens_in == out.visual_tokens_llm == 576
    assert out.layer_visual_tokens == [576] * adapter.num_layers
    assert out.kept_indices is None
    # every prompt token plus every generated token but the last is in each layer's KV cache
    assert out.kv_cache_tokens == [prompt_len + len(out.output_ids) - 1] * adapter.num_layers


def test_default_method_is_none(tiny_llava15, images):
    a = generate(tiny_llava15, [images[1]], "Is there a dog?", GEN)
    b = generate(tiny_llava15, [images[1]], "Is there a dog?", GEN, build_method("none"))
    assert a.output_ids == b.output_ids
    assert_same_logits(a.logits, b.logits)


def test_tiny_outputs_depend_on_the_image(tiny_llava15, images):
    """Without this (HF default init std 0.02) every comparison between methods would be vacuous."""
    outs = [generate(tiny_llava15, [img], "What is in the image?", GEN) for img in images]
    assert len({tuple(o.output_ids) for o in outs}) > 1
    assert not torch.allclose(outs[0].logits[0], outs[1].logits[0])
    assert all(o.text for o in outs)  # word-level vocabulary: answers decode to words


class KeepAllAtProjector(TokenCompressor):
    """Test-only stage-1 method that keeps every visual token (exercises the surgery path)."""

    stage = "vision"


def test_stage1_keep_all_equals_baseline(tiny_llava15, images):
    """The projector-stage surgery with nothing removed reproduces the baseline exactly (hooks.md §3.2)."""
    base = generate(tiny_llava15, [images[0]], "What color is it?", GEN)
    same = generate(tiny_llava15, [images[0]], "What color is it?", GEN, KeepAllAtProjector())
    assert same.output_ids == base.output_ids
    assert_same_logits(same.logits, base.logits)
    assert same.kept_indices == [list(range(576))]
    assert same.prompt_tokens == base.prompt_tokens


def test_text_only_prompt(tiny_llava15):
    out = generate(tiny_llava15, [], "Is the sky blue?", {"max_new_tokens": 3}, build_method("random", budget=8))
    assert out.num_images == 0 and out.visual_tokens_in == out.visual_tokens_llm == 0
    assert len(out.output_ids) <= 3


def test_generation_output_to_dict_is_json(tiny_llava15, images):
    out = generate(tiny_llava15, [images[0]], "How many people?", GEN, build_method("random", budget=32))
    assert isinstance(out, GenerationOutput)
    d = out.to_dict()
    assert "logits" not in d and d["mean_layer_visual_tokens"] == 32.0
    json.dumps(d)
    assert out.prefill_ms > 0 and out.total_ms >= out.prefill_ms and out.preprocess_ms > 0


# ---------------------------------------------------------------------- adapter attributes and prompt
def test_adapter_attributes(tiny_llava15):
    a = tiny_llava15
    assert a.name == "tiny_llava15" and a.family == "llava15"
    assert a.attn_implementation == "sdpa" == a.model.config._attn_implementation
    assert a.dtype == torch.float32 and a.device == torch.device("cpu")
    assert a.num_visual_tokens == 576 and a.num_layers == 4
    assert a.is_random_weights
    assert a.weights.startswith("random-init tiny LlavaForConditionalGeneration (seed 0)")
    assert "not an accuracy number" in a.weights
    assert a.visual_token_id == a.tokenizer.convert_tokens_to_ids("<image>")
    assert a.describe()["num_layers"] == 4


def test_build_prompt_vicuna_v1(tiny_llava15):
    expected = (
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives "
        "helpful, detailed, and polite answers to the user's questions. USER: <image>\nWhat is it? ASSISTANT:"
    )
    assert tiny_llava15.build_prompt("What is it?") == expected
    assert tiny_llava15.build_prompt("Q", num_images=2) == f"{VICUNA_V1_SYSTEM} USER: <image>\n<image>\nQ ASSISTANT:"
    assert tiny_llava15.build_prompt("Q", num_images=0) == f"{VICUNA_V1_SYSTEM} USER: Q ASSISTANT:"
    # placeholders already in the question (some lmms-eval contexts) are used as they are
    assert tiny_llava15.build_prompt("<image>\nQ") == tiny_llava15.build_prompt("Q")
    with pytest.raises(ValueError, match="placeholder"):
        tiny_llava15.build_prompt("<image> <image> Q", num_images=1)


def test_tokenizer_handles_placeholders_and_unknown_words(tiny_llava15):
    tok = tiny_llava15.tokenizer
    ids = tok("USER: <image><image>\nyes qwertyuiop", add_special_tokens=False)["input_ids"]
    image_id = tok.convert_tokens_to_ids("<image>")
    assert ids.count(image_id) == 2
    assert ids[-1] == tok.unk_token_id
    assert tok.decode([tok.convert_tokens_to_ids("yes"), tok.convert_tokens_to_ids("no")]) == "yes no"
    assert len(tok) == tiny_llava15.model.config.text_config.vocab_size


# ---------------------------------------------------------------------- tiny build
def test_tiny_build_is_deterministic_and_leaves_global_rng():
    state = torch.get_rng_state()
    m1, _ = build_tiny_llava15(seed=0)
    m2, _ = build_tiny_llava15(seed=0)
    m3, _ = build_tiny_llava15(seed=1)
    assert torch.equal(torch.get_rng_state(), state)
    sd1, sd2, sd3 = m1.state_dict(), m2.state_dict(), m3.state_dict()
    assert sd1.keys() == sd2.keys()
    assert all(torch.equal(sd1[k], sd2[k]) for k in sd1)
    assert not all(torch.equal(sd1[k], sd3[k]) for k in sd1)


def test_tiny_config_fields_and_errors():
    tc = TinyLlavaConfig.from_mapping({"text_layers": 2})
    assert tc.text_layers == 2 and tc.num_visual_tokens == 576
    with pytest.raises(ValueError, match="bogus"):
        TinyLlavaConfig.from_mapping({"bogus": 1})
    with pytest.raises(ValueError, match="vision_layers"):
        TinyLlavaConfig.from_mapping({"vision_layers": 1})


def test_tiny_config_changes_the_model(tiny_llava15_cfg):
    tiny_llava15_cfg["tiny_config"] = {"text_layers": 2, "image_size": 112}
    tiny_llava15_cfg["visual_tokens"] = 64
    tiny_llava15_cfg["num_layers"] = 2
    a = load_model(tiny_llava15_cfg)
    assert a.num_layers == 2 and a.num_visual_tokens == 64


def test_eager_attention_is_really_used(tiny_llava15_cfg):
    tiny_llava15_cfg["attn_implementation"] = "eager"
    a = load_model(tiny_llava15_cfg)
    assert a.attn_implementation == "eager"


# ---------------------------------------------------------------------- real-loading path, offline
def test_load_from_local_path_gives_same_logits(tiny_llava15, images, tiny_llava15_cfg, tmp_path):
    tiny_llava15.model.save_pretrained(tmp_path)
    tiny_llava15.processor.save_pretrained(tmp_path)
    cfg = {**tiny_llava15_cfg, "tiny": False, "local_path": str(tmp_path), "hf_id": "llava-hf/llava-1.5-7b-hf"}
    loaded = load_model(cfg)
    assert not loaded.is_random_weights
    assert loaded.weights == f"local:{tmp_path.resolve()}"
    assert loaded.attn_implementation == "sdpa" and loaded.dtype == torch.float32
    sd0, sd1 = tiny_llava15.model.state_dict(), loaded.model.state_dict()
    assert sd0.keys() == sd1.keys() and all(torch.equal(sd0[k], sd1[k]) for k in sd0)
    a = generate(tiny_llava15, [images[2]], "What is on the table?", GEN)
    b = generate(loaded, [images[2]], "What is on the table?", GEN)
    assert a.output_ids == b.output_ids and a.text == b.text
    assert_same_logits(a.logits, b.logits)


# ---------------------------------------------------------------------- config errors
@pytest.mark.parametrize(
    ("key", "value", "needle"),
    [
        ("dtype", "fp8", "fp8"),
        ("attn_implementation", "flash", "flash"),
        ("device", "tpu", "tpu"),
        ("family", "llava99", "llava99"),
        ("visual_tokens", 577, "577"),
        ("num_layers", 32, "32"),
        ("seed", "zero", "zero"),
    ],
)
def test_bad_config_values_raise_one_line(tiny_llava15_cfg, key, value, needle):
    tiny_llava15_cfg[key] = value
    with pytest.raises(ModelConfigError, match=needle) as info:
        load_model(tiny_llava15_cfg)
    assert isinstance(info.value, ValueError)
    assert "\n" not in str(info.value)


def test_missing_local_path_raises_one_line(tiny_llava15_cfg, tmp_path):
    missing = tmp_path / "no_such_snapshot"
    cfg = {**tiny_llava15_cfg, "tiny": False, "local_path": str(missing)}
    with pytest.raises(ValueError, match="no_such_snapshot") as info:
        load_model(cfg)
    assert "\n" not in str(info.value)


def test_flash_attention_without_flash_attn(tiny_llava15_cfg):
    if importlib.util.find_spec("flash_attn") is not None:  # pragma: no cover - CUDA + flash extra
        pytest.skip("flash_attn is installed")
    tiny_llava15_cfg["attn_implementation"] = "flash_attention_2"
    with pytest.raises(ValueError, match="flash") as info:
        load_model(tiny_llava15_cfg)
    msg = str(info.value)
    assert "\n" not in msg and "`flash` extra" in msg and "CUDA" in msg


def test_uncached_hub_checkpoint_offline_raises_one_line(tiny_llava15_cfg):
    cfg = {**tiny_llava15_cfg, "tiny": False, "hf_id": "apet-bench/no-such-model", "revision": "0" * 40}
    with pytest.raises(ModelConfigError, match="apet-bench/no-such-model") as info:
        load_model(cfg)
    assert "\n" not in str(info.value)


def test_real_model_needs_a_source(tiny_llava15_cfg):
    with pytest.raises(ModelConfigError, match="hf_id or local_path"):
        load_model({**tiny_llava15_cfg, "tiny": False})
