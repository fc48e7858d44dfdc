"""Per-layer attention-backend record: read from the modules during generation."""

from __future__ import annotations

from test_stage2 import GEN, QUESTION, AttentionTopK, EveryNthLLM

from apet_bench.attention import attention_backends
from apet_bench.methods import build_method
from apet_bench.pipeline import generate


def test_plain_sdpa_everywhere(tiny_llava15, images):
    out = generate(tiny_llava15, [images[0]], QUESTION, GEN, build_method("none"))
    rec = out.attention_backends
    assert rec["llm_layers"] == ["sdpa"] * tiny_llava15.num_layers
    assert rec["vision_layers"] and set(rec["vision_layers"]) == {"sdpa"}
    assert rec["method_computed"] == []


def test_row_capture_shows_on_its_layer_only(tiny_llava15, images):
    method = AttentionTopK(budget=64, layer=2)
    out = generate(tiny_llava15, [images[0]], QUESTION, GEN, method)
    llm = out.attention_backends["llm_layers"]
    assert llm[1].startswith("sdpa + rows 'last' recomputed")
    assert [llm[i] for i in (0, 2, 3)] == ["sdpa"] * 3
    # the capture is gone after generation: the modules read plain sdpa again
    assert attention_backends(tiny_llava15)["llm_layers"] == ["sdpa"] * tiny_llava15.num_layers


def test_method_notes_are_recorded(tiny_llava15, images):
    method = EveryNthLLM(layer=2)
    method.note_attention("vision", -2, "[CLS]", "one row recomputed")
    method.note_attention("vision", -2, "[CLS]", "one row recomputed")  # duplicates kept once
    out = generate(tiny_llava15, [images[0]], QUESTION, GEN, method)
    assert out.attention_backends["method_computed"] == [
        {"component": "vision", "layer": -2, "rows": "[CLS]", "how": "one row recomputed"}
    ]


def test_bad_component_is_refused():
    import pytest

    with pytest.raises(ValueError, match="'decoder'"):
        build_method("random", budget=8).note_attention("decoder", 0, "last", "x")
