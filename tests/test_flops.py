"""Prefill TFLOPs on meta-device full-size models (apet_bench.flops).

Pinned at a stated prompt length: LLaVA-1.5-7B with 576 visual tokens and 62 text tokens (the POPE
prompt's median length under the real Llama-2 tokenizer; the figure needs no file from ../shared).
"""

from __future__ import annotations

import json

import pytest
import torch

from apet_bench import flops
from apet_bench.config import ConfigError

LLAVA_TEXT = 62  # stated prompt length (POPE prompt, Llama-2 tokenizer, median over coco_pope_random)


@pytest.fixture(scope="module")
def llava_none():
    return flops.count_flops("llava15", "none", text_tokens=LLAVA_TEXT)


@pytest.fixture(scope="module")
def llava_apet64():
    return flops.count_flops("llava15", "apet", 64, text_tokens=LLAVA_TEXT)


def test_llava_vanilla_pinned_and_within_1pct_of_paper(llava_none):
    # 8.883 TFLOPs at 576 + 62 tokens (vision 0.406, LLM 8.477); paper Table 7: 8.82
    assert llava_none.total_tflops == pytest.approx(8.8831, abs=5e-4)
    assert abs(llava_none.total_tflops - 8.82) / 8.82 < 0.01
    assert llava_none.vision_tflops == pytest.approx(0.4061, abs=5e-4)
    assert llava_none.layer_visual_tokens == [576] * 32
    assert llava_none.text_tokens == LLAVA_TEXT


def test_llava_apet64_pinned_and_within_5pct_of_paper(llava_apet64):
    r = llava_apet64
    # the method's own code gives the official split: 96 visual tokens in layers 0-15, 32 from layer 16
    assert r.layer_visual_tokens == [96] * 16 + [32] * 16
    assert r.mean_layer_visual_tokens == 64
    assert r.total_tflops == pytest.approx(2.051, abs=2e-3)
    assert abs(r.total_tflops - 2.09) / 2.09 < 0.05
    assert "vision_stage_fps" in r.method_breakdown and any(k.startswith("llm_stage_L16") for k in r.method_breakdown)
    assert 0 < r.method_tflops < 0.01  # ApET's overhead is tiny next to the prefill


def test_visionzip64_within_5pct_of_paper():
    r = flops.count_flops("llava15", "visionzip", 64, text_tokens=LLAVA_TEXT)
    assert r.layer_visual_tokens == [64] * 32
    assert abs(r.total_tflops - 2.03) / 2.03 < 0.05


def test_pdrop64_overhead_counts_the_probe_projections():
    """PDrop's probe projects q/k/v/o of the pre-drop sequence at each stage layer (baselines/pdrop.py)."""
    r = flops.count_flops("llava15", "pdrop", 64, text_tokens=LLAVA_TEXT)
    d = 4096  # Vicuna-7B: hidden 4096, 32 heads, no GQA (d_kv = d)
    stages = [i for i in range(1, 32) if r.layer_visual_tokens[i] < r.layer_visual_tokens[i - 1]]
    assert stages == [2, 8, 16]
    for layer in stages:
        seq = r.layer_visual_tokens[layer - 1] + LLAVA_TEXT
        assert r.method_breakdown[f"probe_projections_L{layer}"] * 1e12 == pytest.approx(2 * seq * d * 4 * d)
    assert abs(r.total_tflops - 2.16) / 2.16 < 0.02  # the paper's PDrop row (Table 7)


def test_additivity(llava_none, llava_apet64):
    for r in (llava_none, llava_apet64):
        assert r.total_tflops == pytest.approx(r.vision_tflops + r.llm_tflops + r.method_tflops, rel=1e-12)
        assert r.vision_tflops == pytest.approx(sum(r.vision_breakdown.values()), rel=1e-12)
        assert r.llm_tflops == pytest.approx(sum(r.llm_breakdown.values()), rel=1e-12)
        assert r.method_tflops == pytest.approx(sum(r.method_breakdown.values()), rel=1e-12)


def test_monotone_in_budget(llava_none, llava_apet64):
    t = [llava_apet64.total_tflops] + [flops.count_flops("llava15", "apet", b, text_tokens=LLAVA_TEXT).total_tflops
                                       for b in (128, 192)]
    assert t[0] < t[1] < t[2] < llava_none.total_tflops
    # and in the text length
    assert flops.count_flops("llava15", "none", text_tokens=LLAVA_TEXT + 10).total_tflops > llava_none.total_tflops


def test_counter_matches_analytic_layer_formula():
    lengths = [638] * 16 + [158] * 16
    got = flops.count_llm_flops("llava15", lengths)
    want = sum(flops.llm_flops_formula(n, hidden=4096, kv_hidden=4096, intermediate=11008) for n in lengths)
    assert got["decoder"] == want
    assert got["lm_head"] == 2 * 4096 * 32064  # last token only


def test_apet_stage_formula_covers_counted_matmuls():
    """The formula's matmul terms are at least what FlopCounterMode sees in the real primitive."""
    from torch.utils.flop_counter import FlopCounterMode

    from apet_bench.apet import apet_compress
    from apet_bench.methods.apet import apet_stage_flops

    x = torch.randn(1, 576, 1024)
    with FlopCounterMode(display=False) as c:
        apet_compress(x, 96, num_basis=10, basis="fps", variant="official", generator=torch.Generator().manual_seed(0))
    counted = c.get_total_flops()
    terms = apet_stage_flops(576, 1024, 96, 10)
    assert counted > 0
    assert sum(terms.values()) >= counted
    assert apet_stage_flops(96, 4096, 96, 10) == {"fps": 0, "solve": 0, "error": 0, "merge": 0}


def test_qwen_vanilla_and_apet_variants():
    none = flops.count_flops("qwen25vl", "none")  # 729 visual + 60 text tokens by default
    assert none.visual_tokens_in == 729 and none.text_tokens == 60
    assert abs(none.total_tflops - 14.52) / 14.52 < 0.01
    paper = flops.count_flops("qwen25vl", "apet", 0.1, params={"variant": "paper", "basis": "fps", "num_basis": 10})
    assert paper.layer_visual_tokens == [109] * 14 + [36] * 14
    assert abs(paper.total_tflops - 5.70) / 5.70 < 0.05
    assert "variant=paper" in paper.variant
    official = flops.count_flops("qwen25vl", "apet", 0.1)
    assert official.layer_visual_tokens == [109] * 28  # layer-14 stage commented out (docs/methods/apet.md)
    assert "official" in official.variant and official.total_tflops > paper.total_tflops
    assert official.vision_tflops == pytest.approx(none.vision_tflops)


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["model=nope"], "unknown model 'nope'"),
        (["model=llava15", "method=apet", "budget=0"], "budget"),
        (["model=llava15", "method=apet", "budget=1000"], "1000"),
        (["model=llava15", "method=apet"], "needs budget"),
        (["model=llava15", "visual_tokens=300"], "visual_tokens 300"),
        (["model=qwen25vl", "visual_tokens=100"], "visual_tokens 100"),
        (["model=llava15", "text_tokens=-3"], "text_tokens -3"),
        (["model=llava15", "method=nosuch", "budget=64"], "nosuch"),
        (["model=llava15", "colour=red"], "unknown key 'colour'"),
        (["llava15"], "not key=value"),
        ([], "model=<name> is required"),
    ],
)
def test_cli_bad_input_one_line(capsys, argv, needle):
    assert flops.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("apet-bench: error: ")
    assert needle in err


def test_cli_last_line_is_json(capsys):
    assert flops.main(["model=llava15", "method=apet", "budget=64", "text_tokens=62"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    d = json.loads(last)
    for key in ("vision_tflops", "llm_tflops", "method_tflops", "total_tflops", "visual_tokens_in",
                "layer_visual_tokens", "text_tokens", "convention", "variant", "plan_source"):
        assert key in d
    assert d["total_tflops"] == pytest.approx(2.051, abs=2e-3)


def test_overheads_of_attention_based_methods_follow_their_code():
    """VisionZip on Qwen2.5-VL recomputes the last ViT block's full attention (docs/methods/visionzip.md), so its own
    overhead dwarfs ApET's; on LLaVA only the [CLS] row is recomputed."""
    vz_qwen = flops.count_flops("qwen25vl", "visionzip", 0.1, visual_tokens=256)  # 256: a smaller proxy run
    apet_qwen = flops.count_flops("qwen25vl", "apet", 0.1, visual_tokens=256)
    S = 4 * 256
    assert vz_qwen.method_breakdown["vit_attention_recompute"] == pytest.approx(2 * S * S * 1280 / 1e12)
    assert vz_qwen.method_tflops > 10 * apet_qwen.method_tflops
    vz_llava = flops.count_flops("llava15", "visionzip", 64, text_tokens=LLAVA_TEXT)
    assert "cls_row_recompute" in vz_llava.method_breakdown and vz_llava.method_tflops < 0.01


def test_video_llava_image_and_next_geometry():
    r = flops.count_flops("video_llava", "none", text_tokens=LLAVA_TEXT)
    # CLIP ViT-L/14-224 image tower: 257 tokens through 24 layers, projector on 256
    assert r.visual_tokens_in == 256 and r.layer_visual_tokens == [256] * 32
    assert r.vision_breakdown["projector"] * 1e12 == 256 * 2 * (1024 * 4096 + 4096 * 4096)
    assert r.total_tflops < flops.count_flops("llava15", "none", text_tokens=LLAVA_TEXT).total_tflops
    with pytest.raises(ConfigError, match="672x672"):
        flops.count_flops("llava_next", "none", visual_tokens=1000)


SHARED = __import__("pathlib").Path(__file__).resolve().parents[2] / "shared" / "benchmarks"


@pytest.mark.skipif(not (SHARED / "tokenizers" / "llama2" / "tokenizer.model").is_file()
                    or not (SHARED / "pope" / "coco_pope_random.json").is_file(),
                    reason=f"Llama-2 tokenizer / POPE questions not found under {SHARED}")
def test_pope_prompt_length_with_the_real_llama2_tokenizer():
    pytest.importorskip("sentencepiece")
    stats = flops.pope_text_tokens(SHARED / "tokenizers" / "llama2" / "tokenizer.model",
                                   SHARED / "pope" / "coco_pope_random.json")
    assert stats["n"] == 3000 and stats["median"] == flops.POPE_TEXT_TOKENS == LLAVA_TEXT
    assert 61 <= stats["min"] <= stats["max"] <= 64


def test_pope_text_tokens_missing_file():
    with pytest.raises(ConfigError, match="does not exist"):
        flops.pope_text_tokens("/nonexistent/tokenizer.model", "/nonexistent/pope.json")


def test_method_without_overhead_formula_is_a_one_line_error(monkeypatch):
    """A registered method whose class defines no ``flops_overhead`` is refused, never counted as 0."""
    from dataclasses import dataclass
    from typing import ClassVar

    from apet_bench.methods import base

    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))

    @base.register_method("no_formula_probe")
    @dataclass
    class NoFormula(base.TokenCompressor):
        stage: ClassVar[str] = "vision"  # base compress_visual: keeps every token

    with pytest.raises(ConfigError) as ei:
        flops.count_flops("llava15", "no_formula_probe", 64, text_tokens=LLAVA_TEXT)
    msg = str(ei.value)
    assert "no_formula_probe" in msg and "overhead" in msg and len(msg.splitlines()) == 1


def test_reference_rows_state_their_overhead():
    """``random`` selects without arithmetic (an explicit 0); ``downsample`` counts its area pooling."""
    r = flops.count_flops("llava15", "random", 64, text_tokens=LLAVA_TEXT)
    assert r.method_breakdown == {} and r.method_tflops == 0
    assert r.layer_visual_tokens == [64] * 32
    d = flops.count_flops("llava15", "downsample", 64, text_tokens=LLAVA_TEXT)
    assert d.layer_visual_tokens == [64] * 32
    assert d.method_breakdown["pooling"] * 1e12 == pytest.approx((576 + 64) * 4096)
