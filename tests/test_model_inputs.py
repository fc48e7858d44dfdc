"""Golden tests: what each model receives equals what the official evaluation feeds it, on real samples.

The references below are written from the official code (MaQianKun0/ApET @ 70cc01b, which forks
haotian-liu/LLaVA, Video-LLaVA and Qwen2.5-VL's eval scripts), using only sentencepiece, PIL, numpy and
torch, never the functions under test:

* LLaVA prompt: ``conv_vicuna_v1`` / ``conv_llava_v1`` (``llava/conversation.py``) ``get_prompt()``;
* token ids: ``llava/mm_utils.py::tokenizer_image_token`` over the slow (SentencePiece) Llama tokenizer;
* LLaVA-1.5 pixels: ``expand2square`` + transformers-4.3x ``CLIPImageProcessor`` (PIL bicubic resize of
  the short side to 336, centre crop, ``x * (1/255)`` in float64 -> float32, ``(x - mean) / std``);
* LLaVA-NeXT pixels: ``process_anyres_image`` (``select_best_resolution``, ``resize_and_pad_image``,
  ``divide_to_patches``, base view ``image.resize((336, 336))``), each through the same CLIP step;
* Qwen2.5-VL pixels: ``qwen_vl_utils.fetch_image`` (``smart_resize`` 4·28²..16384·28², PIL resize),
  then the Qwen2-VL image processor (``smart_resize`` under min/max pixels, bicubic, rescale,
  normalise, 14 px patches with the frame repeated to ``temporal_patch_size``);
* Video-LLaVA: decord branch of ``load_and_transform_video`` (``np.linspace(0, T-1, 8, dtype=int)``)
  and ``get_video_transform`` (x/255, ``NormalizeVideo``, ``ShortSideScale(224)``, ``CenterCropVideo``).
"""

from __future__ import annotations

import glob
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("APET_BENCH_TEST_DATA_ROOT", REPO.parent / "shared" / "benchmarks"))
SPM = SHARED / "tokenizers" / "llama2" / "tokenizer.model"
pytestmark = pytest.mark.skipif(not SPM.is_file(), reason=f"real data not found under {SHARED}")

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
VICUNA_V1 = ("A chat between a curious user and an artificial intelligence assistant. "
             "The assistant gives helpful, detailed, and polite answers to the user's questions.")
LLAVA_V1 = ("A chat between a curious human and an artificial intelligence assistant. "
            "The assistant gives helpful, detailed, and polite answers to the human's questions.")


# ---------------------------------------------------------------------- references (official code, re-read)
def ref_conv_prompt(system: str, first_message: str) -> str:
    """``Conversation.get_prompt()`` with SeparatorStyle.TWO, sep " ", after USER: message, ASSISTANT: None."""
    return system + " " + "USER" + ": " + first_message + " " + "ASSISTANT" + ":"


def ref_tokenizer_image_token(prompt: str, sp) -> list[int]:
    """``tokenizer_image_token`` with the slow Llama tokenizer: ``tokenizer(chunk).input_ids`` = [1] + sp.encode."""
    chunks = [[1] + sp.encode(c) for c in prompt.split("<image>")]
    out, offset = [], 0
    if chunks and chunks[0] and chunks[0][0] == 1:
        offset = 1
        out.append(chunks[0][0])
    seps = [[-200] * (offset + 1)] * len(chunks)
    for x in [e for pair in zip(chunks, seps) for e in pair][:-1]:
        out.extend(x[offset:])
    return out


def ref_clip(img: Image.Image, size: int = 336) -> np.ndarray:
    """transformers-4.3x CLIPImageProcessor.preprocess of one PIL image -> (3, size, size) float32."""
    w, h = img.size
    short, long_ = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long_ / short)
    img = img.resize((new_short, new_long) if w <= h else (new_long, new_short), Image.BICUBIC, reducing_gap=None)
    a = np.asarray(img)
    top, left = (a.shape[0] - size) // 2, (a.shape[1] - size) // 2
    a = a[top: top + size, left: left + size]
    a = (a.astype(np.float64) * (1 / 255)).astype(np.float32)
    a = (a - np.array(MEAN, np.float32)) / np.array(STD, np.float32)
    return a.transpose(2, 0, 1)


def ref_expand2square(img: Image.Image) -> Image.Image:
    bg = tuple(int(x * 255) for x in MEAN)
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    out = Image.new(img.mode, (side, side), bg)
    out.paste(img, (0, (w - h) // 2) if w > h else ((h - w) // 2, 0))
    return out


def ref_anyres(img: Image.Image, pinpoints_wh: list[tuple[int, int]]) -> np.ndarray:
    """``process_anyres_image`` -> (1 + crops, 3, 336, 336)."""
    ow, oh = img.size
    best, best_eff, best_waste = None, 0, float("inf")
    for w, h in pinpoints_wh:
        scale = min(w / ow, h / oh)
        dw, dh = int(ow * scale), int(oh * scale)
        eff = min(dw * dh, ow * oh)
        waste = w * h - eff
        if eff > best_eff or (eff == best_eff and waste < best_waste):
            best, best_eff, best_waste = (w, h), eff, waste
    tw, th = best
    sw, sh = tw / ow, th / oh
    if sw < sh:
        nw, nh = tw, min(math.ceil(oh * sw), th)
    else:
        nh, nw = th, min(math.ceil(ow * sh), tw)
    padded = Image.new("RGB", (tw, th), (0, 0, 0))
    padded.paste(img.resize((nw, nh)), ((tw - nw) // 2, (th - nh) // 2))
    patches = [padded.crop((j, i, j + 336, i + 336)) for i in range(0, th, 336) for j in range(0, tw, 336)]
    return np.stack([ref_clip(p) for p in [img.resize((336, 336))] + patches])


def ref_smart_resize(h: int, w: int, factor: int, lo: int, hi: int) -> tuple[int, int]:
    hb, wb = max(factor, round(h / factor) * factor), max(factor, round(w / factor) * factor)
    if hb * wb > hi:
        beta = math.sqrt((h * w) / hi)
        hb, wb = math.floor(h / beta / factor) * factor, math.floor(w / beta / factor) * factor
    elif hb * wb < lo:
        beta = math.sqrt(lo / (h * w))
        hb, wb = math.ceil(h * beta / factor) * factor, math.ceil(w * beta / factor) * factor
    return hb, wb


def ref_qwen(img: Image.Image, lo: int, hi: int) -> tuple[np.ndarray, list[int]]:
    """fetch_image then the Qwen2-VL image processor -> (patches, 3·2·14·14), grid_thw."""
    h, w = ref_smart_resize(img.height, img.width, 28, 4 * 28 * 28, 16384 * 28 * 28)
    img = img.resize((w, h))
    h2, w2 = ref_smart_resize(img.height, img.width, 28, lo, hi)
    img = img.resize((w2, h2), Image.BICUBIC)
    a = (np.asarray(img).astype(np.float64) * (1 / 255)).astype(np.float32)
    a = ((a - np.array(MEAN, np.float32)) / np.array(STD, np.float32)).transpose(2, 0, 1)  # (3, H, W)
    a = np.stack([a, a])  # temporal_patch_size 2: the image repeated
    gh, gw = h2 // 14, w2 // 14
    x = a.reshape(1, 2, 3, gh // 2, 2, 14, gw // 2, 2, 14)
    x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(gh * gw, 3 * 2 * 14 * 14), [1, gh, gw]


def ref_video_frames(path: str, n: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """All decoded frames of ``path`` (PyAV), then the official sampler's indices and frames."""
    import av

    with av.open(path) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(c.streams.video[0])]
    idx = np.linspace(0, len(frames) - 1, n, dtype=int)
    return idx, np.stack([frames[i] for i in idx])


def ref_video_transform(frames: np.ndarray) -> np.ndarray:
    """get_video_transform (decord): per frame /255, normalise, bilinear short side 224, centre crop 224."""
    out = []
    for f in frames:
        x = torch.from_numpy(f).permute(2, 0, 1).float() / 255.0
        x = (x - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]
        h, w = x.shape[1:]
        nh, nw = (int(math.floor(h / w * 224)), 224) if w < h else (224, int(math.floor(w / h * 224)))
        x = torch.nn.functional.interpolate(x[None], size=(nh, nw), mode="bilinear", align_corners=False)[0]
        i, j = int(round((nh - 224) / 2.0)), int(round((nw - 224) / 2.0))
        out.append(x[:, i: i + 224, j: j + 224].numpy())
    return np.stack(out)


# ---------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def sp():
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(SPM))


@pytest.fixture(scope="module", params=[True, False], ids=["legacy", "non-legacy"])
def llama_tok(request):
    from apet_bench.models.inputs import llama_tokenizer_from_sentencepiece

    return llama_tokenizer_from_sentencepiece(str(SPM), legacy=request.param)


def model_opts(name: str) -> dict:
    import yaml

    from apet_bench.models.processors import processor_options

    cfg = yaml.safe_load((REPO / "configs" / "model" / f"{name}.yaml").read_text())
    return processor_options(cfg["family"], cfg)


def mme_images(step: int = 1) -> list[str]:
    files = sorted(glob.glob(str(SHARED / "mme" / "*" / "*.jpg")) + glob.glob(str(SHARED / "mme" / "*" / "*.png")))
    return files[::step]


def llava_questions() -> list[str]:
    """The question text LLaVA-1.5 fed (its released POPE, MME and MMBench answer files)."""
    out = []
    for sub, key in (("pope/llava-v1.5-13b.jsonl", "prompt"), ("mme/llava_mme.jsonl", "text"),
                     ("mmbench/llava-v1.5-13b.jsonl", "prompt")):
        with open(SHARED / "llava_eval_answers" / sub, encoding="utf-8") as fh:
            rows = [json.loads(line) for line in fh]
        out += [r[key] for r in rows[::7]]
    return out


# ---------------------------------------------------------------------- prompts and token ids
def test_vicuna_v1_prompt_equals_official():
    from apet_bench.models.llava15 import vicuna_v1_prompt
    from apet_bench.models.video_llava import video_llava_prompt

    q = "Is there a snowboard in the image?\nAnswer the question using a single word or phrase."
    assert vicuna_v1_prompt(q) == ref_conv_prompt(VICUNA_V1, "<image>\n" + q)
    assert "curious user" in vicuna_v1_prompt(q) and "human" not in vicuna_v1_prompt(q)
    assert video_llava_prompt(q, 1, "image") == ref_conv_prompt(VICUNA_V1, "<image>\n" + q)
    assert video_llava_prompt("what is it ?", 1, "video", 8) == ref_conv_prompt(LLAVA_V1, "<image>" * 8 + "\nwhat is it ?")


def test_token_ids_equal_tokenizer_image_token_on_llava_questions(sp, llama_tok):
    from apet_bench.models.inputs import tokenizer_image_token
    from apet_bench.models.llava15 import vicuna_v1_prompt

    questions = llava_questions()
    assert len(questions) > 1000 and any("  " in q for q in questions)
    for q in questions:
        prompt = vicuna_v1_prompt(q)
        assert tokenizer_image_token(prompt, llama_tok) == ref_tokenizer_image_token(prompt, sp), q[:60]
    ids = tokenizer_image_token(vicuna_v1_prompt(questions[0]), llama_tok)
    k = ids.index(-200)
    assert ids[k - 2: k + 3] == [29901, 29871, -200, 29871, 13]  # ": ▁ <image> ▁ \n"


def test_fast_bpe_chunks_differ_on_runs_of_spaces(sp):
    """Why the SentencePiece model is attached: the fast BPE tokenizer splits double spaces differently."""
    from apet_bench.models.inputs import llama_tokenizer_from_sentencepiece, tokenizer_image_token
    from apet_bench.models.llava15 import vicuna_v1_prompt

    fast = llama_tokenizer_from_sentencepiece(str(SPM), slow_chunks=False)
    with open(SHARED / "llava_eval_answers" / "mmbench" / "llava-v1.5-13b.jsonl", encoding="utf-8") as fh:
        prompts = [vicuna_v1_prompt(json.loads(line)["prompt"]) for line in fh]
    spaced = [p for p in prompts if "  " in p]
    assert spaced
    bad = [p for p in spaced if tokenizer_image_token(p, fast) != ref_tokenizer_image_token(p, sp)]
    assert bad  # the fast tokenizer alone would change these prompts' ids
    single = [p for p in prompts if "  " not in p][:300]
    assert all(tokenizer_image_token(p, fast) == ref_tokenizer_image_token(p, sp) for p in single)


def test_whole_prompt_tokenization_differs_without_legacy(sp):
    """The failure mode this guards against: one call over the whole prompt, non-legacy tokenizer."""
    from apet_bench.models.inputs import IMAGE_TOKEN_INDEX, llama_tokenizer_from_sentencepiece
    from apet_bench.models.llava15 import vicuna_v1_prompt

    tok = llama_tokenizer_from_sentencepiece(str(SPM), legacy=False)
    prompt = vicuna_v1_prompt("Is there a dog?")
    naive = [IMAGE_TOKEN_INDEX if t == 32000 else t for t in tok(prompt).input_ids]
    assert naive != ref_tokenizer_image_token(prompt, sp)
    assert len(naive) == len(ref_tokenizer_image_token(prompt, sp)) - 1


def test_llava15_processor_path_ids_and_pixels(sp, llama_tok):
    """What the LLaVA-1.5 adapter feeds (processor + official ids) on MME images, equal to the official."""
    from apet_bench.models.inputs import collapse_placeholder_runs, with_official_ids
    from apet_bench.models.llava15 import vicuna_v1_prompt
    from apet_bench.models.processors import build_processor

    proc = build_processor("llava15", model_opts("llava15"), llama_tok)
    assert proc.patch_size == 14 and proc.num_additional_image_tokens == 1
    q = "Is there a train in this image?\nAnswer the question using a single word or phrase."
    for path in mme_images(step=97):
        img = Image.open(path).convert("RGB")
        prompt = vicuna_v1_prompt(q)
        inputs = with_official_ids(proc(images=[img], text=prompt, return_tensors="pt"), prompt, llama_tok, 32000,
                                   "<image>", proc)
        ids = inputs["input_ids"][0].tolist()
        assert ids.count(32000) == 576
        assert collapse_placeholder_runs(ids, 32000) == ref_tokenizer_image_token(prompt, sp)
        ref = ref_clip(ref_expand2square(img))
        assert np.abs(inputs["pixel_values"][0].numpy() - ref).max() <= 1e-6, path


def test_llava15_pixels_pad_to_square_on_mme_and_mmbench():
    from apet_bench.models.processors import build_image_processor

    ip = build_image_processor("llava15", model_opts("llava15"))
    files = mme_images(step=9) + sorted(glob.glob(str(SHARED / "mmbench" / "MMBench" / "*.jpg")))
    non_square = 0
    for path in files:
        img = Image.open(path).convert("RGB")
        non_square += img.width != img.height
        ours = ip(images=[img], return_tensors="np")["pixel_values"][0]
        ref = ref_clip(ref_expand2square(img))
        assert ours.shape == (3, 336, 336) and np.abs(ours - ref).max() <= 1e-6, path
    assert non_square > 20
    # Without padding (the llava-hf default) a non-square photo is cropped: far from the official pixels.
    crop = build_image_processor("llava15", {**model_opts("llava15"), "pad_to_square": False})
    img = next(im for im in (Image.open(f).convert("RGB") for f in files) if im.width != im.height)
    assert np.abs(crop(images=[img], return_tensors="np")["pixel_values"][0] - ref_clip(ref_expand2square(img))).max() > 0.5


def test_llava_next_anyres_pixels_equal_official():
    from apet_bench.models.processors import build_image_processor

    opts = model_opts("llava_next")
    ip = build_image_processor("llava_next", opts)
    pinpoints_wh = [(w, h) for h, w in opts["image_grid_pinpoints"]]
    for path in mme_images(step=123):
        img = Image.open(path).convert("RGB")
        ref = ref_anyres(img, pinpoints_wh)
        ours = ip(images=[img], return_tensors="np")["pixel_values"][0]
        assert ours.shape == ref.shape, path
        assert np.abs(ours - ref).max() <= 1e-6, path


def test_qwen_double_resize_pixels_equal_official():
    from apet_bench.models.inputs import qwen_fetch_image
    from apet_bench.models.processors import build_image_processor

    opts = model_opts("qwen25vl")
    assert opts["fetch_image_resize"] is True
    ip = build_image_processor("qwen25vl", opts)
    differs_from_single = 0
    for path in mme_images(step=61):
        img = Image.open(path).convert("RGB")
        ref, thw = ref_qwen(img, opts["min_pixels"], opts["max_pixels"])
        out = ip(images=[qwen_fetch_image(img)], return_tensors="np")
        assert out["image_grid_thw"][0].tolist() == thw, path
        assert np.abs(out["pixel_values"] - ref).max() <= 1e-6, path
        single = ip(images=[img], return_tensors="np")["pixel_values"]
        differs_from_single += single.shape != ref.shape or float(np.abs(single - ref).max()) > 1e-3
    assert differs_from_single > 0  # one resize instead of two changes pixels


def video_files() -> list[str]:
    return sorted(glob.glob(str(SHARED / "tgif_qa" / "*.gif")) + glob.glob(str(SHARED / "videos" / "*.mp4")))


def test_video_frame_indices_and_transform_equal_official():
    from apet_bench.data.video import load_video, uniform_frame_indices
    from apet_bench.models.inputs import video_llava_video_transform
    from apet_bench.models.processors import build_image_processor
    from apet_bench.models.video_llava import video_clip_pixels

    files = video_files()
    assert any(f.endswith(".gif") for f in files) and any(f.endswith(".mp4") for f in files)
    ip = build_image_processor("video_llava", model_opts("video_llava"))
    for path in files:
        idx, frames = ref_video_frames(path)
        assert uniform_frame_indices(int(idx[-1]) + 1).tolist() == idx.tolist()
        ours = load_video(path, 8)
        assert np.array_equal(ours, frames), path
        ref = ref_video_transform(frames)
        pix = video_clip_pixels(list(ours), ip, "official", False, path).numpy()
        assert pix.shape == (8, 3, 224, 224) and np.abs(pix - ref).max() <= 1e-6, path
        hf = video_clip_pixels(list(ours), ip, "hf").numpy()
        assert np.abs(hf - ref).max() > 1e-2  # the HF per-frame processor is not the official transform
    # The flip option: seeded, reproducible, off by default.
    flipped = [video_clip_pixels(list(ours), ip, "official", s, path) for s in range(6)]
    plain = torch.from_numpy(ref_video_transform(frames))

    def same(a, b):
        return torch.allclose(a, b, rtol=0, atol=1e-6)

    assert all(same(f, plain) or same(f, plain.flip(-1)) for f in flipped)
    assert any(same(f, plain.flip(-1)) for f in flipped) and any(same(f, plain) for f in flipped)
    assert torch.equal(video_clip_pixels(list(ours), ip, "official", 3, path), flipped[3])
    assert same(video_llava_video_transform(ours), plain)


def test_video_llava_video_ids_equal_official(sp, llama_tok):
    from apet_bench.models.inputs import collapse_placeholder_runs, official_input_ids
    from apet_bench.models.video_llava import video_llava_prompt

    llama_tok.add_tokens(["<video>"], special_tokens=True)
    vid = llama_tok.convert_tokens_to_ids("<video>")
    q = "what is this being squirted in the mouth by a water gun ?"
    prompt = video_llava_prompt(q, 1, "video", 8)
    ids = official_input_ids(prompt, llama_tok, [257] * 8, vid)[0].tolist()
    assert ids.count(vid) == 2056
    run = [i for i, t in enumerate(ids) if t == vid]
    assert run == list(range(run[0], run[0] + 2056))  # one contiguous <video> run, as the HF model expects
    assert collapse_placeholder_runs(ids, vid, [8]) == ref_tokenizer_image_token(prompt, sp)


def test_real_configs_build_processors_offline(llama_tok):
    """Every real model's processor from its config alone (no checkpoint files), with the values the
    harness depends on."""
    from apet_bench.models.processors import build_processor
    from apet_bench.models.qwen25vl import QWEN_SPECIAL_TOKENS
    from apet_bench.models.tiny import build_tiny_tokenizer

    img = Image.open(mme_images()[0]).convert("RGB")
    for name, tokens in (("llava15", [576]), ("llava_next", None), ("video_llava", [256])):
        proc = build_processor(name, model_opts(name), llama_tok)
        assert proc.patch_size == 14 and proc.vision_feature_select_strategy == "default"
        assert proc.num_additional_image_tokens == 1
        kw = {"return_legacy_image_output": False} if name == "video_llava" else {}
        out = proc(images=[img], text="USER: <image>\nWhy? ASSISTANT:", return_tensors="pt", **kw)
        n = int((out["input_ids"] == 32000).sum())
        assert (n == tokens[0]) if tokens else 576 < n <= 2928
    qtok = build_tiny_tokenizer(extra_special_tokens=QWEN_SPECIAL_TOKENS)
    proc = build_processor("qwen25vl", model_opts("qwen25vl"), qtok)
    out = proc(images=[img], text="<|vision_start|><|image_pad|><|vision_end|>Why?", return_tensors="pt")
    t, h, w = out["image_grid_thw"][0].tolist()
    n = int((out["input_ids"] == qtok.convert_tokens_to_ids("<|image_pad|>")).sum())
    assert n == t * h * w // 4 and 256 <= n <= 2048


def test_processor_block_errors_are_one_line():
    from apet_bench.models.base import ModelConfigError
    from apet_bench.models.processors import processor_options

    with pytest.raises(ModelConfigError, match="patch_size 0") as e:
        processor_options("llava15", {"processor": {**model_opts("llava15"), "patch_size": 0}})
    assert "\n" not in str(e.value)
    with pytest.raises(ModelConfigError, match="unknown processor key"):
        processor_options("llava15", {"processor": {**model_opts("llava15"), "foo": 1}})
    with pytest.raises(ModelConfigError, match="needs a 'processor' block"):
        processor_options("llava_next", {})


# ---------------------------------------------------------------------- checkpoints without processor files
def test_checkpoint_without_processor_files_loads_from_config(tiny_llava15, tmp_path):
    """A save_pretrained checkpoint with only weights + tokenizer (like the pinned llava-hf revision, whose
    processor_config.json is missing): the processor comes from the config's processor block."""
    import yaml

    from apet_bench.models import load_model

    tiny_llava15.model.save_pretrained(tmp_path)
    tiny_llava15.processor.tokenizer.save_pretrained(tmp_path)
    assert not (tmp_path / "processor_config.json").exists() and not (tmp_path / "preprocessor_config.json").exists()
    real = yaml.safe_load((REPO / "configs" / "model" / "llava15.yaml").read_text())
    cfg = {**real, "local_path": str(tmp_path), "dtype": "float32", "device": "cpu", "num_layers": 4}
    adapter = load_model(cfg)
    proc = adapter.processor
    assert proc.patch_size == 14 and proc.vision_feature_select_strategy == "default"
    assert proc.image_processor.do_pad is True and proc.image_processor.crop_size["height"] == 336
    img = Image.open(mme_images()[0]).convert("RGB")
    inputs = adapter.prepare_inputs([img], adapter.build_prompt("Is it?"))
    assert int((inputs["input_ids"] == adapter.visual_token_id).sum()) == 576
    np.testing.assert_allclose(inputs["pixel_values"][0].numpy(), ref_clip(ref_expand2square(img)), atol=1e-6)
    # A processor block that disagrees with the model is refused before any sample runs.
    bad = {**cfg, "processor": {**real["processor"], "patch_size": 16}}
    from apet_bench.models.base import ModelConfigError

    with pytest.raises(ModelConfigError, match="patch_size 16 differs"):
        load_model(bad)


# ---------------------------------------------------------------------- decoding settings
def _cfg(model: str, bench: str, *over: str) -> dict:
    from omegaconf import OmegaConf

    from apet_bench.config import compose

    return OmegaConf.to_container(compose([f"model={model}", f"benchmark={bench}", *over]), resolve=True)


def test_generation_settings_per_benchmark_and_model():
    from apet_bench.generation import config_gen_kwargs, gen_kwargs_arg, resolve_generation

    task = {"max_new_tokens": 16, "temperature": 0, "top_p": 1.0, "num_beams": 1, "do_sample": False}
    hf, src = resolve_generation(task, _cfg("llava15", "mme"), "apet_mme_local")
    assert hf["max_new_tokens"] == 128 and hf["do_sample"] is False and hf["num_beams"] == 1
    assert "configs/benchmark/mme.yaml" in src["max_new_tokens"]
    assert resolve_generation(task, _cfg("llava15", "mmbench_en"))[0]["max_new_tokens"] == 1024
    assert resolve_generation(task, _cfg("llava15", "scienceqa_img"))[0]["max_new_tokens"] == 1024
    assert resolve_generation(task, _cfg("video_llava", "msvd_qa"))[0]["max_new_tokens"] == 1024
    q, qsrc = resolve_generation(task, _cfg("qwen25vl", "mmbench_en"))
    assert q["max_new_tokens"] == 128 and "configs/model/qwen25vl.yaml" in qsrc["max_new_tokens"]
    greedy = resolve_generation(task, _cfg("llava_next", "gqa"))[0]
    assert greedy["do_sample"] is False and "temperature" not in greedy
    sampled = resolve_generation(task, _cfg("llava_next", "gqa", "model.official_sampling=true"))[0]
    assert sampled["do_sample"] is True and sampled["temperature"] == 0.2
    assert resolve_generation(task, _cfg("tiny_llava15", "mmbench_en"))[0]["max_new_tokens"] == 16
    user = _cfg("llava15", "mme", "+gen_kwargs.max_new_tokens=3")
    assert resolve_generation(task, user)[0]["max_new_tokens"] == 3
    assert config_gen_kwargs(user)[1]["max_new_tokens"].startswith("gen_kwargs")
    assert gen_kwargs_arg(_cfg("llava15", "pope")) == "max_new_tokens=128,temperature=0,num_beams=1"


# ---------------------------------------------------------------------- python -m apet_bench.inspect
class _Result:
    def __init__(self, returncode: int, stdout: str, stderr: str):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def _inspect(*args: str, tmp_path: Path, capsys=None, monkeypatch=None):
    """``python -m apet_bench.inspect`` in process (``main``), its exit code and output."""
    from apet_bench.inspect import main

    monkeypatch.setenv("APET_BENCH_CACHE_DIR", str(tmp_path / "cache"))
    capsys.readouterr()
    code = main(list(args))
    out = capsys.readouterr()
    return _Result(code, out.out, out.err)


def test_inspect_llava15_mme_equals_official(sp, tmp_path, capsys, monkeypatch):
    out_dir = tmp_path / "x"
    res = _inspect("model=llava15", "benchmark=mme", f"data_root={SHARED}", "index=0", f"tokenizer={SPM}",
                   f"out={out_dir}", tmp_path=tmp_path, capsys=capsys, monkeypatch=monkeypatch)
    assert res.returncode == 0, res.stderr[-2000:]
    rec = json.loads(res.stdout.strip().splitlines()[-1])
    assert set(rec) >= {"prompt", "input_ids", "input_ids_collapsed", "pixel_values_shape", "pixel_values_sha256",
                        "generation_kwargs", "question", "images"}
    assert rec["prompt"] == ref_conv_prompt(VICUNA_V1, "<image>\n" + rec["question"])
    assert rec["input_ids_collapsed"] == ref_tokenizer_image_token(rec["prompt"], sp)
    assert rec["input_ids"].count(32000) == 576
    img = Image.open(rec["images"][0]).convert("RGB")
    pix = np.load(out_dir / "pixel_values.npy")
    assert pix.dtype == np.float32 and list(pix.shape) == rec["pixel_values_shape"] == [1, 3, 336, 336]
    assert np.abs(pix[0] - ref_clip(ref_expand2square(img))).max() <= 1e-6
    import hashlib

    assert hashlib.sha256(pix.tobytes()).hexdigest() == rec["pixel_values_sha256"]
    assert json.loads((out_dir / "inputs.json").read_text())["input_ids_collapsed"] == rec["input_ids_collapsed"]
    assert rec["generation_kwargs"]["max_new_tokens"] == 128 and rec["generation_kwargs"]["num_beams"] == 1
    assert "curious user" in res.stdout and "max_new_tokens = 128" in res.stdout


def test_inspect_qwen_without_tokenizer_and_video_llava_mp4(sp, tmp_path, capsys, monkeypatch):
    res = _inspect("model=qwen25vl", "benchmark=mme", f"data_root={SHARED}", "index=1", tmp_path=tmp_path, capsys=capsys, monkeypatch=monkeypatch)
    assert res.returncode == 0, res.stderr[-2000:]
    rec = json.loads(res.stdout.strip().splitlines()[-1])
    assert rec["input_ids"] is None and "tokenizer" in rec["input_ids_absent"]
    img = Image.open(rec["images"][0]).convert("RGB")
    ref, thw = ref_qwen(img, 256 * 28 * 28, 2048 * 28 * 28)
    assert rec["pixel_values_shape"] == list(ref.shape) and rec["image_sizes"][0]["grid_thw"] == thw
    assert rec["prompt"].startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>")
    mp4 = sorted(glob.glob(str(SHARED / "videos" / "*.mp4")))[0]
    res = _inspect("model=video_llava", "benchmark=tgif_qa_judged", f"data_root={SHARED}", f"tokenizer={SPM}",
                   f"visual={mp4}", tmp_path=tmp_path, capsys=capsys, monkeypatch=monkeypatch)
    assert res.returncode == 0, res.stderr[-2000:]
    rec = json.loads(res.stdout.strip().splitlines()[-1])
    assert [str(Path(v).resolve()) for v in rec["images"]] == [str(Path(mp4).resolve())]  # the data root may be a link
    assert rec["pixel_values_shape"] == [1, 8, 3, 224, 224]
    assert rec["prompt"] == ref_conv_prompt(LLAVA_V1, "<image>" * 8 + "\n" + rec["question"])
    assert "Answer the question" not in rec["prompt"]
    assert rec["input_ids_collapsed"] == ref_tokenizer_image_token(rec["prompt"], sp)
    assert rec["generation_kwargs"]["max_new_tokens"] == 1024


def test_inspect_bad_input_is_one_line(tmp_path, capsys, monkeypatch):
    res = _inspect("model=llava15", "benchmark=mme", f"data_root={SHARED}", "index=99999", tmp_path=tmp_path, capsys=capsys, monkeypatch=monkeypatch)
    assert res.returncode == 2 and res.stderr.strip().count("\n") == 0 and "99999" in res.stderr
    res = _inspect("model=llava15", "benchmark=mme", f"data_root={SHARED}", "tokenizer=/no/such", tmp_path=tmp_path, capsys=capsys, monkeypatch=monkeypatch)
    assert res.returncode == 2 and "/no/such" in res.stderr
