"""Video-LLaVA adapter: tiny build, image and video paths against plain HF generate, stage-1 surgery."""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch
from conftest import make_image

from apet_bench.data.video import VideoDecodeError, load_video
from apet_bench.methods import TokenCompressor, build_method
from apet_bench.methods.base import LLMSelection
from apet_bench.models import load_model
from apet_bench.models.video_llava import VideoClip, VideoLlavaAdapter
from apet_bench.pipeline import generate

BENCH = Path(os.environ.get("APET_SHARED_BENCHMARKS", "/work/shared/benchmarks"))
GIFS = sorted(glob.glob(str(BENCH / "tgif_qa" / "*.gif")))
MP4S = sorted(glob.glob(str(BENCH / "videos" / "*.mp4")))
needs_data = pytest.mark.skipif(not (GIFS and MP4S), reason=f"real videos not found under {BENCH}")

GEN = {"max_new_tokens": 4, "output_logits": True}
TINY_VIDEO_LLAVA_CFG = {
    "name": "tiny_video_llava",
    "family": "video_llava",
    "tiny": True,
    "dtype": "float32",
    "attn_implementation": "sdpa",
    "device": "cpu",
    "seed": 0,
    "visual_tokens": 256,
    "num_layers": 4,
    "tiny_config": {},
}


@pytest.fixture(scope="module")
def vl() -> VideoLlavaAdapter:
    return load_model(dict(TINY_VIDEO_LLAVA_CFG))


@pytest.fixture(scope="module")
def vl_eager() -> VideoLlavaAdapter:
    return load_model({**TINY_VIDEO_LLAVA_CFG, "attn_implementation": "eager"})


@pytest.fixture(scope="module")
def clip():
    """8 decoded frames of a real GIF (or random frames without the shared data)."""
    if GIFS:
        return VideoClip(load_video(GIFS[0]), source=GIFS[0])
    import numpy as np

    return VideoClip((np.random.default_rng(0).random((8, 96, 128, 3)) * 255).astype("uint8"))


def same_logits(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x, y), (x - y).abs().max()


def hf_video_generate(adapter, frames, question):
    """Reference: the official prompt's ids (one image index per frame, each 257 ``<video>``), the official
    video transform, plain ``model.generate``."""
    from apet_bench.models.inputs import LLAVA_V1_SYSTEM, official_input_ids, video_llava_video_transform

    prompt = f"{LLAVA_V1_SYSTEM} USER: {'<image>' * 8}\n{question} ASSISTANT:"
    ip = adapter.processor.image_processor
    pv = video_llava_video_transform(np.stack([np.asarray(f) for f in frames]), mean=ip.image_mean, std=ip.image_std)
    ids = official_input_ids(prompt, adapter.tokenizer, [257] * 8, adapter.video_token_id)
    enc = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.inference_mode():
        out = adapter.model.generate(
            input_ids=enc["input_ids"],
            attention_mask=enc["attention_mask"],
            pixel_values_videos=pv[None],
            max_new_tokens=GEN["max_new_tokens"],
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
    return enc["input_ids"].shape[1], out


class KeepAll(TokenCompressor):
    """Test-only stage-1 method keeping every visual token (exercises the surgery path)."""

    stage = "vision"


# ---------------------------------------------------------------------- geometry and prompts
def test_tiny_geometry_and_prompts(vl):
    assert vl.family == "video_llava" and vl.is_random_weights
    assert (vl.num_visual_tokens, vl.num_frames, vl.tokens_per_frame, vl.num_video_tokens) == (256, 8, 257, 2056)
    assert vl.num_layers == 4 and vl.model.config.video_seq_length == 2056
    ranges = vl.frame_token_ranges()
    assert len(ranges) == 8 and ranges[0] == range(0, 257) and ranges[7] == range(1799, 2056)
    assert vl.visual_token_id == vl.image_token_id != vl.video_token_id
    from apet_bench.models.inputs import LLAVA_V1_SYSTEM, VICUNA_V1_SYSTEM

    assert vl.build_prompt("Why?") == f"{VICUNA_V1_SYSTEM} USER: <image>\nWhy? ASSISTANT:"
    assert vl.build_prompt("Why?", kind="video") == f"{LLAVA_V1_SYSTEM} USER: {'<image>' * 8}\nWhy? ASSISTANT:"
    assert vl.describe()["num_video_tokens"] == 2056
    # separate towers
    assert vl.model.model.image_tower is not vl.model.model.video_tower


# ---------------------------------------------------------------------- none == plain HF
def test_none_image_equals_plain_hf_generate(vl):
    img = make_image(0)
    q = "What color is the car?"
    out = generate(vl, img, q, GEN, build_method("none"))
    inputs = vl.processor(images=[img], text=vl.build_prompt(q), return_tensors="pt", return_legacy_image_output=False)
    with torch.inference_mode():
        ref = vl.model.generate(**inputs, max_new_tokens=4, do_sample=False, output_logits=True,
                                return_dict_in_generate=True)
    n = inputs["input_ids"].shape[1]
    assert out.output_ids == ref.sequences[0, n:].tolist()
    same_logits(out.logits, ref.logits)
    assert out.visual_tokens_in == out.visual_tokens_llm == 256 and out.prompt_tokens == n
    assert out.layer_visual_tokens == [256] * 4


def test_none_video_equals_plain_hf_generate(vl, clip):
    q = "what is the color of the dog ?"
    out = generate(vl, clip, q, GEN, build_method("none"))
    n, ref = hf_video_generate(vl, clip.frames, q)
    assert out.output_ids == ref.sequences[0, n:].tolist()
    same_logits(out.logits, ref.logits)
    assert out.visual_tokens_in == out.visual_tokens_llm == 2056 and out.prompt_tokens == n
    assert out.layer_visual_tokens == [2056] * 4
    assert out.kv_cache_tokens == [n + len(out.output_ids) - 1] * 4
    assert vl.visual_token_id == vl.image_token_id  # the per-sample kind is reset after generate


@needs_data
def test_video_path_is_decoded(vl):
    """lmms-eval video tasks pass ``[path]``; a path, a list of one path and the decoded clip agree."""
    gen = {"max_new_tokens": 1, "output_logits": True}
    a = generate(vl, [GIFS[0]], "what is it ?", gen)
    b = generate(vl, VideoClip(load_video(GIFS[0])), "what is it ?", gen)
    same_logits(a.logits, b.logits)
    assert a.visual_tokens_in == 2056 and a.num_images == 1
    d = generate(vl, MP4S[0], "what is it ?", gen)
    assert not torch.allclose(a.logits[0], d.logits[0])  # outputs depend on the video


def test_bad_visuals_raise(vl, clip, tmp_path):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"nope" * 100)
    with pytest.raises(VideoDecodeError, match="bad.mp4"):
        generate(vl, [str(bad)], "what ?", {"max_new_tokens": 1})
    with pytest.raises(ValueError, match="either images or videos"):
        generate(vl, [make_image(1), clip], "what ?", {"max_new_tokens": 1})
    with pytest.raises(TypeError, match="unsupported visual"):
        generate(vl, [3], "what ?", {"max_new_tokens": 1})
    assert vl.visual_kind == "image"


# ---------------------------------------------------------------------- stage 1
@pytest.mark.parametrize("kind", ["image", "video"])
def test_stage1_keep_all_equals_baseline(vl, clip, kind):
    visual = make_image(2) if kind == "image" else clip
    n = 256 if kind == "image" else 2056
    base = generate(vl, visual, "What is happening?", GEN)
    same = generate(vl, visual, "What is happening?", GEN, KeepAll())
    assert same.output_ids == base.output_ids
    same_logits(same.logits, base.logits)
    assert same.kept_indices == [list(range(n))] and same.prompt_tokens == base.prompt_tokens


def test_stage1_random_video_keeps_exactly_the_budget(vl, clip):
    base = generate(vl, clip, "How many times does the man flip ?", {"max_new_tokens": 2})
    out = generate(vl, clip, "How many times does the man flip ?", {"max_new_tokens": 2}, build_method("random", budget=256, seed=0))
    assert out.visual_tokens_in == 2056 and out.visual_tokens_llm == 256
    assert out.layer_visual_tokens == [256] * 4
    assert len(out.kept_indices[0]) == 256 and max(out.kept_indices[0]) < 2056
    assert out.prompt_tokens == base.prompt_tokens - (2056 - 256)
    assert out.kv_cache_tokens == [out.prompt_tokens + len(out.output_ids) - 1] * 4
    img = generate(vl, make_image(3), "What is it?", {"max_new_tokens": 2}, build_method("random", budget=64, seed=0))
    assert img.visual_tokens_in == 256 and img.visual_tokens_llm == 64


def test_stage1_cached_equals_uncached_video(vl, clip):
    gen = {"max_new_tokens": 4, "output_logits": True, "min_new_tokens": 4}
    q = "what is the dog receiving in his mouth ?"
    cached = generate(vl, clip, q, gen, build_method("random", budget=0.25, seed=3))
    uncached = generate(vl, clip, q, {**gen, "use_cache": False}, build_method("random", budget=0.25, seed=3))
    assert cached.visual_tokens_llm == uncached.visual_tokens_llm == 514
    assert cached.kept_indices == uncached.kept_indices
    assert cached.output_ids == uncached.output_ids
    for a, b in zip(cached.logits, uncached.logits):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_eager_and_sdpa_agree_on_video(vl, vl_eager, clip):
    eager = vl_eager
    assert eager.attn_implementation == "eager"
    q = "what are the boys playing ?"
    a = generate(eager, clip, q, GEN, build_method("random", budget=256, seed=0))
    b = generate(vl, clip, q, GEN, build_method("random", budget=256, seed=0))
    assert a.kept_indices == b.kept_indices and a.visual_tokens_llm == b.visual_tokens_llm == 256
    torch.testing.assert_close(a.logits[0], b.logits[0], atol=1e-3, rtol=1e-4)


# ---------------------------------------------------------------------- stage 2 (layer-K drop)
@dataclass
class EveryFourthLLM(TokenCompressor):
    """Deterministic stage 2 at ``layer``: keep visual tokens 0, 4, 8, ... (25 %) of each row, so a
    ``use_cache=False`` run (one prefill per generated token) selects what the cached run selected."""

    stage: ClassVar[str] = "llm"
    layer: int = 1  # type: ignore[misc]

    def llm_keep_count(self, num_visual_tokens, *, layer_idx):
        return -(-num_visual_tokens // 4)

    def select_llm_tokens(self, hidden_states, visual_positions, *, layer_idx, attention=None):
        return LLMSelection(torch.stack([v[::4] for v in visual_positions]))


def test_stage2_random_video_drops_at_layer_k(vl, clip):
    q = "How many times does the dog bite ?"
    gen = {"max_new_tokens": 3, "output_logits": True, "min_new_tokens": 3}
    base = generate(vl, clip, q, gen)
    out = generate(vl, clip, q, gen, build_method("random", budget=256, seed=0, stage="llm", layer=2))
    p, t = base.prompt_tokens, len(out.output_ids) - 1
    assert out.visual_tokens_in == out.visual_tokens_llm == 2056 and out.prompt_tokens == p
    assert out.layer_visual_tokens == [2056, 2056, 256, 256]
    assert out.kv_cache_tokens == [p + t, p + t, p - 1800 + t, p - 1800 + t]
    nocache = generate(vl,
        clip, q, {**gen, "use_cache": False}, build_method("random", budget=256, seed=0, stage="llm", layer=2)
    )
    torch.testing.assert_close(out.logits[0], nocache.logits[0], atol=1e-4, rtol=0)  # same first draw
    keep_all = generate(vl, clip, q, gen, build_method("random", budget=2056, seed=0, stage="llm", layer=1))
    assert keep_all.output_ids == base.output_ids
    same_logits(keep_all.logits, base.logits)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_stage2_video_cached_equals_uncached(vl, vl_eager, clip, attn):
    a = vl if attn == "sdpa" else vl_eager
    gen = {"max_new_tokens": 2, "output_logits": True, "min_new_tokens": 2}
    cached = generate(a, clip, "what is the dog doing ?", gen, EveryFourthLLM())
    nocache = generate(a, clip, "what is the dog doing ?", {**gen, "use_cache": False}, EveryFourthLLM())
    assert cached.layer_visual_tokens == [2056, 514, 514, 514]
    assert cached.output_ids == nocache.output_ids
    for x, y in zip(cached.logits, nocache.logits):
        torch.testing.assert_close(x, y, atol=1e-4, rtol=0)
