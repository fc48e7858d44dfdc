"""The ``apet`` method on the four tiny models: budget split, variants, basis, seeds.

K (the LLM-stage layer) is ``num_layers // 2``: 16 of 32 on LLaVA-7B, 14 of 28 on Qwen2.5-VL-7B, 2 on the
4-layer tiny models, so a tiny model's per-layer counts are ``[1.5b, 1.5b, 0.5b, 0.5b]``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_image
from omegaconf import OmegaConf
from test_model_matrix import MODELS, get_adapter
from test_stage2 import count_hooks

from apet_bench.apet import select_basis
from apet_bench.budget import BudgetError
from apet_bench.config import compose
from apet_bench.core import SampleContext
from apet_bench.methods import build_method
from apet_bench.methods.apet import ApETCompressor, default_drop_layer
from apet_bench.models import load_model
from apet_bench.models.base import VisualContext
from apet_bench.models.video_llava import VideoClip
from apet_bench.pipeline import generate

GEN = {"max_new_tokens": 2}
Q = "What is in the image?"


def _clip(seed: int = 3) -> VideoClip:
    rng = np.random.default_rng(seed)
    return VideoClip((rng.random((8, 48, 64, 3)) * 255).astype("uint8"))


_NEXT336: dict = {}


def next336():
    """Tiny LLaVA-NeXT with the real 336 px / 14 geometry (576 tokens per crop, up to 2928)."""
    if "a" not in _NEXT336:
        cfg = compose(["model=tiny_llava_next", "+model.tiny_config.image_size=336", "model.visual_tokens=2928"])
        _NEXT336["a"] = load_model(OmegaConf.to_container(cfg.model, resolve=True))
    return _NEXT336["a"]


def run(adapter, visuals, budget, **params):
    method = build_method("apet", budget=budget, seed=params.pop("seed", 0), **params)
    out = generate(adapter, visuals, Q, GEN, method)
    assert out.layer_visual_tokens == out.planned_layer_visual_tokens
    return out, method


# ---------------------------------------------------------------------- config and validation
def test_registered_and_config_defaults():
    cfg = OmegaConf.to_container(compose(["method=apet", "budget=64"]), resolve=True)
    assert cfg["method"]["available"] is True
    m = build_method("apet", budget=64, **cfg["method"]["params"])
    assert isinstance(m, ApETCompressor) and m.stage == "both"
    assert (m.variant, m.basis, m.num_basis, m.layer) == ("official", "fps", 10, None)
    assert not m.needs_attention_weights
    assert [default_drop_layer(n) for n in (32, 28, 4)] == [16, 14, 2]  # paper's L16 / L14


@pytest.mark.parametrize(
    "params,err",
    [({"budget": None}, BudgetError), ({"budget": 64, "variant": "nope"}, ValueError),
     ({"budget": 64, "basis": "kmeans"}, ValueError), ({"budget": 64, "num_basis": -1}, ValueError),
     ({"budget": 64, "layer": 0}, ValueError)],
)
def test_bad_params(params, err):
    with pytest.raises(err):
        build_method("apet", **params)


# ---------------------------------------------------------------------- kept count == plan, per paper budget
@pytest.mark.parametrize("variant", ["official", "paper"])
@pytest.mark.parametrize("budget", [192, 128, 64])
def test_llava15_budget_split(budget, variant):
    out, _ = run(get_adapter("tiny_llava15", "sdpa"), [make_image(1, (64, 48))], budget, variant=variant)
    v, llm = budget * 3 // 2, budget // 2
    assert out.visual_tokens_in == 576
    assert out.layer_visual_tokens == [v, v, llm, llm]  # 288/192/96 then 96/64/32
    assert out.mean_layer_visual_tokens == budget
    assert out.kv_cache_tokens[0] - out.kv_cache_tokens[-1] == v - llm


@pytest.mark.parametrize("variant", ["official", "paper"])
@pytest.mark.parametrize("budget", [640, 320, 160])
def test_llava_next_budget_split_real_geometry(budget, variant):
    """672 x 672 -> 2x2 grid, no unpadding: 5 sub-images of 576 + 48 newlines (2928)."""
    out, _ = run(next336(), [make_image(2, (672, 672))], budget, variant=variant)
    b = budget // 5  # 128 / 64 / 32 per sub-image
    v, llm = 3 * b // 2, b // 2  # 192/96/48, 64/32/16
    assert out.visual_tokens_in == 2928
    first = 5 * v + 48  # newline tokens always kept
    # official: only the base view's span (the first v tokens) is re-compressed (docs/methods/apet.md bug)
    after = first - v + llm if variant == "official" else 5 * llm
    assert out.layer_visual_tokens == [first, first, after, after]


@pytest.mark.parametrize("variant", ["official", "paper"])
@pytest.mark.parametrize("budget", [0.2, 0.1])
def test_qwen_budget_split(budget, variant):
    out, _ = run(get_adapter("tiny_qwen25vl", "sdpa"), [make_image(3, (224, 224))], budget, variant=variant)
    n = out.visual_tokens_in
    assert n == 64
    v = int(1.5 * budget * n)  # 30 % / 15 %, int() as the official image_token_ratio code
    llm = v if variant == "official" else int(0.5 * budget * n)  # official: the L14 stage is disabled
    assert out.layer_visual_tokens == [v, v, llm, llm]


@pytest.mark.parametrize("variant,per_frame", [("official", 33), ("paper", 32)])
def test_video_llava_256(variant, per_frame):
    out, _ = run(get_adapter("tiny_video_llava", "sdpa"), [_clip()], 256, variant=variant)
    assert out.visual_tokens_in == 2056
    assert out.layer_visual_tokens == [8 * per_frame] * 4  # 264 (CLS + 22 + 10 per frame) / 256


def test_video_llava_budget_must_split_over_frames():
    with pytest.raises(BudgetError, match="frames"):
        run(get_adapter("tiny_video_llava", "sdpa"), [_clip()], 100)


# ---------------------------------------------------------------------- basis tokens kept, each variant its way
def _stage1(adapter, images, method):
    """compress_visual on image 0 inside the method's context; returns (selection, vision features, inputs)."""
    inputs = adapter.prepare_inputs(images, adapter.build_prompt(Q, len(images)))
    with torch.inference_mode(), method(adapter):
        adapter.visual_context = VisualContext(adapter, inputs)
        feats = adapter.stage_one_features(inputs, method)
        sel = method.compress_visual(feats[0], image_index=0)
        vf = adapter.visual_context.vision_features[0] if method.needs_vision_features else None
    return sel, feats[0], vf


@pytest.mark.parametrize("variant", ["official", "paper"])
@pytest.mark.parametrize("seed", [0, 5])
def test_llava15_basis_tokens_kept(variant, seed):
    adapter = get_adapter("tiny_llava15", "sdpa")
    method = build_method("apet", budget=64, seed=seed, variant=variant)
    sel, _, vf = _stage1(adapter, [make_image(4, (64, 48))], method)
    basis = select_basis(vf.unsqueeze(0), 10, "fps", torch.Generator().manual_seed(seed))
    kept = sel.kept_indices.tolist()
    assert len(kept) == 96
    if variant == "paper":  # at their own positions
        assert set(basis.index[0].tolist()) <= set(kept)
    else:  # written into the lowest-ranked slots: the projected basis vectors are among the kept tokens
        with torch.inference_mode():
            proj = adapter.project_visual(basis.vectors[0].to(vf.dtype))
        d = torch.cdist(proj.float(), sel.features.float(), compute_mode="donot_use_mm_for_euclid_dist")
        assert bool((d.min(dim=1).values < 1e-4 * proj.norm(dim=1)).all())
        assert len(set(d.argmin(dim=1).tolist())) == 10  # ten distinct slots


@pytest.mark.parametrize("variant", ["official", "paper"])
def test_video_basis_tokens_kept(variant):
    adapter = get_adapter("tiny_video_llava", "sdpa")
    method = build_method("apet", budget=256, seed=1, variant=variant)
    adapter.visual_context = SampleContext(adapter, kind="video")
    try:
        sel, feats, _ = _stage1(adapter, [_clip()], method)
    finally:
        adapter.visual_context = None
    frames = feats.view(8, 257, -1)
    if variant == "official":  # [CLS, 22 targets, 10 basis] per frame; basis = FPS over the 256 patches
        out = sel.features.view(8, 33, -1)
        basis = select_basis(frames[:, 1:], 10, "fps", torch.Generator().manual_seed(1))
        assert torch.allclose(out[:, 23:].float(), basis.vectors, atol=1e-5)
        assert torch.equal(out[:, 0], frames[:, 0])  # CLS first, untouched
    else:
        basis = select_basis(frames, 10, "fps", torch.Generator().manual_seed(1))
        kept = sel.kept_indices.view(8, 32)
        for f in range(8):
            assert set((basis.index[f] + f * 257).tolist()) <= set(kept[f].tolist())


# ---------------------------------------------------------------------- determinism, backends, hooks
def test_same_seed_same_output_different_seed_different_indices():
    adapter = get_adapter("tiny_llava15", "sdpa")
    img = [make_image(6, (64, 48))]
    a, _ = run(adapter, img, 64, seed=0)
    b, _ = run(adapter, img, 64, seed=0)
    c, _ = run(adapter, img, 64, seed=1)
    assert a.kept_indices == b.kept_indices and a.output_ids == b.output_ids
    assert a.kept_indices != c.kept_indices


@pytest.mark.parametrize("basis", ["fps", "dpc", "random"])
def test_basis_options_run(basis):
    out, _ = run(get_adapter("tiny_llava15", "sdpa"), [make_image(6, (64, 48))], 64, basis=basis, num_basis=6)
    assert out.layer_visual_tokens == [96, 96, 32, 32]


BUDGETS = {"tiny_llava15": 64, "tiny_llava_next": 160, "tiny_qwen25vl": 0.2, "tiny_video_llava": 64}


@pytest.mark.parametrize("variant", ["official", "paper"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("model", MODELS)
def test_backends_run_and_hooks_removed(model, attn, variant):
    adapter = get_adapter(model, attn)
    visuals = [make_image(8, (224, 224))]
    generate(adapter, visuals, Q, GEN)  # transformers installs its own output-recording hooks on first use
    video = model == "tiny_video_llava" and variant == "official"  # the 8-frame clip once per backend
    if video:
        generate(adapter, [_clip()], Q, GEN)  # (on the video tower too)
    before = count_hooks(adapter.model)
    out, method = run(adapter, visuals, BUDGETS[model], variant=variant)
    assert out.visual_tokens_llm < out.visual_tokens_in
    layers = out.layer_visual_tokens
    if model == "tiny_llava_next" and variant == "official":  # 48 per 64-token crop + newlines; base 48 -> 16
        assert layers[0] == layers[1] and layers[2] == layers[3] == layers[0] - 32
    assert count_hooks(adapter.model) == before and not method.is_active
    if video:
        out, _ = run(adapter, [_clip()], 256, variant=variant)
        assert out.layer_visual_tokens[0] == 264
        assert count_hooks(adapter.model) == before


def test_official_llm_stage_always_uses_fps(monkeypatch):
    """docs/methods/apet.md: the official LLM stage hard-wires FPS whatever ``basis`` says; paper follows it."""
    from conftest import make_image
    from omegaconf import OmegaConf

    import apet_bench.methods.apet as apet_mod
    from apet_bench.config import compose
    from apet_bench.methods import build_method
    from apet_bench.models import load_model

    seen = []
    real = apet_mod.apet_compress

    def spy(x, keep, **kw):
        seen.append((kw.get("basis"), kw.get("basis_slot_order")))
        return real(x, keep, **kw)

    monkeypatch.setattr(apet_mod, "apet_compress", spy)
    adapter = load_model(OmegaConf.to_container(compose(["model=tiny_llava15"]).model, resolve=True))
    for variant, llm_basis in (("official", "fps"), ("paper", "random")):
        seen.clear()
        method = build_method("apet", budget=64, variant=variant, basis="random")
        generate(adapter, [make_image(1)], "What is it?", {"max_new_tokens": 2}, method)
        assert seen[0][0] == "random"  # vision stage follows `basis` in both variants
        assert seen[-1][0] == llm_basis, (variant, seen)
