"""Token maps on a real demo photograph with the tiny LLaVA-1.5: what is highlighted is what was kept."""

import json

import numpy as np
import pytest
from PIL import Image

from apet_bench.methods import UnknownMethodError, available_methods
from apet_bench.pipeline import generate
from apet_bench.viz import KEPT, main, token_maps

#: Methods under test: apet and random always; every other registered method too (baselines land
#: concurrently), except none (nothing to highlight: covered separately).
METHODS = sorted({"apet", "random"} | (set(available_methods()) - {"none"}))
#: ToMe's r schedule (at most 50 % per layer) cannot reach 64 over the tiny model's 2 vision layers.
BUDGET = {"tome": 320}


@pytest.fixture(scope="module")
def photo():
    from apet_bench.data.demo import scan_demo

    img = next(i for i in scan_demo().images if i.name == "astronaut")  # skimage.data.astronaut(), 512 x 512 RGB
    return Image.fromarray(img.array).convert("RGB")


@pytest.mark.parametrize("method", METHODS)
def test_highlighted_tokens_are_the_kept_tokens(method, photo, tiny_llava15, tmp_path):
    from apet_bench.budget import BudgetError

    budget = BUDGET.get(method, 64)
    try:
        result = token_maps(photo, tiny_llava15, [method], budget, tmp_path, seed=0)
    except BudgetError as exc:
        assert method not in ("apet", "random")
        pytest.skip(f"{method} cannot reach budget {budget} on the tiny model: {exc}")
    mm = result.methods[0]
    png = tmp_path / f"image__tiny_llava15__{budget}__token_maps.png"
    assert png.stat().st_size > 10_000 and png.with_suffix(".svg").is_file()
    assert (tmp_path / f"image__tiny_llava15__{budget}__{method}.png").is_file()
    if mm.kept_indices is None:
        pytest.skip(f"{method} reports no kept indices (new / pooled tokens)")
    # The drawn grid state: cells drawn as kept, counted from the array the overlay was drawn from.
    drawn = int((mm.grid_state == KEPT).sum())
    # The method's kept count, measured independently: visual tokens at the input of the last layer.
    assert mm.kept_source == "GenerationOutput.kept_indices"
    if method == "visionzip":  # its [CLS] row also enters the LLM but is none of the 576 visual tokens
        assert drawn == len(mm.kept_indices) == mm.layer_visual_tokens[-1] - 1
    else:
        assert drawn == len(mm.kept_indices) == mm.layer_visual_tokens[-1] < 576
    # The JSON beside the PNG: kept indices the figure was drawn from, and the cells they map to
    # (LLaVA-1.5: 24 x 24 raster order).
    rec = json.loads((tmp_path / f"image__tiny_llava15__{budget}__token_maps.json").read_text())
    m = rec["methods"][method]
    assert m["num_kept"] == drawn and m["kept_indices"] == mm.kept_indices
    assert sorted(map(tuple, m["highlighted_cells"])) == sorted(divmod(i, 24) for i in m["kept_indices"])
    assert rec["grid"] == [24, 24] and rec["random_weights"] is True


def test_apet_stages_merges_and_heat_maps(photo, tiny_llava15, tmp_path):
    result = token_maps(photo, tiny_llava15, ["apet"], 64, tmp_path, seed=0)
    mm = result.methods[0]
    assert len(mm.kept_indices) == 32 and len(mm.stage1_kept) == 96  # 1.5 x 64 -> 0.5 x 64 from layer 2
    assert set(mm.kept_indices) <= set(mm.stage1_kept)
    roots = mm.merge_roots
    kept = set(mm.kept_indices)
    assert all(roots[i] == i for i in kept)
    assert {int(r) for r in roots if r >= 0} <= kept  # every token's features end in a finally kept token
    assert (mm.merge_colour_index >= 0).sum() > len(kept)  # dropped tokens tinted with their group
    for name in ("cls_attention", "llm_attention", "approx_error"):
        heat = getattr(result, name)
        assert heat.shape == (24, 24) and np.isfinite(heat).all(), name
    assert result.cls_attention.sum() == pytest.approx(1.0, abs=0.05)  # [CLS] row minus its self-attention
    # the error heat map is exactly the error ApET's vision stage ranks by (same features, seed, FPS basis)
    from apet_bench.methods import build_method

    method = build_method("apet", budget=64, seed=0)
    generate(tiny_llava15, [photo], "Describe the image.", {"max_new_tokens": 1}, method)
    calls = method.last_compressions  # (kept, ApETInfo) of each compression call, recorded by the method
    np.testing.assert_allclose(result.approx_error, calls[0][1].error[0].numpy().reshape(24, 24), rtol=1e-6)
    assert result.llm_attention.min() >= 0 and result.llm_attention.sum() <= 1.0 + 1e-5
    assert (tmp_path / "image__tiny_llava15__64__error_vs_attention.png").stat().st_size > 10_000


def test_none_keeps_everything(photo, tiny_llava15, tmp_path):
    mm = token_maps(photo, tiny_llava15, ["none"], 64, tmp_path).methods[0]
    assert int((mm.grid_state == KEPT).sum()) == 576


def test_unknown_method_is_one_line(tmp_path, capsys):
    with pytest.raises(UnknownMethodError, match="unknown method 'nosuch'"):
        token_maps(Image.new("RGB", (64, 64)), "tiny_llava15", ["nosuch"], 64, tmp_path)
    img = tmp_path / "x.png"
    Image.new("RGB", (64, 64)).save(img)
    assert main([f"image={img}", "model=tiny_llava15", "methods=[random,nosuch]", f"out={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "nosuch" in err and len(err.splitlines()) == 1
    assert main([f"image={tmp_path / 'missing.png'}", "methods=[random]"]) == 2
    assert main(["image=x.png", "model=nosuchmodel"]) == 2
    assert not list(tmp_path.glob("*.svg"))


def test_command_writes_png_svg_json(tmp_path, capsys):
    from apet_bench.data.demo import scan_demo

    arr = next(i for i in scan_demo().images if i.name == "chelsea").array  # 300 x 451 photograph
    img = tmp_path / "chelsea.jpg"
    Image.fromarray(arr).save(img)
    out = tmp_path / "out"
    assert main([f"image={img}", "model=tiny_llava15", "methods=[random]", "budget=32", f"out={out}"]) == 0
    names = {p.name for p in out.iterdir()}
    stem = "chelsea__tiny_llava15__32"
    assert {f"{stem}__token_maps.png", f"{stem}__token_maps.svg", f"{stem}__random.png",
            f"{stem}__error_vs_attention.png", f"{stem}__error_vs_attention.svg", f"{stem}__token_maps.json"} <= names
    rec = json.loads((out / f"{stem}__token_maps.json").read_text())
    assert rec["methods"]["random"]["num_kept"] == 32 == len(rec["methods"]["random"]["highlighted_cells"])
    assert "random: 32 of 576 visual tokens kept" in capsys.readouterr().out


def test_vision_cls_attention_matches_eager_output_attentions(photo, tiny_llava15_cfg):
    """The [CLS] row recomputed from the layer input equals CLIP's eager ``output_attentions``."""
    import torch

    from apet_bench.models import load_model
    from apet_bench.viz import _vision_cls_attention

    adapter = load_model({**tiny_llava15_cfg, "attn_implementation": "eager"})
    inputs = adapter.prepare_inputs([photo], adapter.build_prompt("x"))
    mine = _vision_cls_attention(adapter, inputs, 576)
    with torch.inference_mode():
        eager = adapter.vision_tower(inputs["pixel_values"], output_attentions=True).attentions
    layer = adapter.model.config.vision_feature_layer  # -2: the layer whose output feeds the projector
    np.testing.assert_allclose(mine, eager[layer][0, :, 0, 1:].mean(0).numpy(), atol=1e-6)
