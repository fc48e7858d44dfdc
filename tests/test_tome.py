"""The ``tome`` baseline (docs/methods/tome.md): pure ToMe functions on crafted inputs, exact r schedules,
[CLS] protection, the patched CLIP tower against an independent reference, every tiny model per model, and
the conformance kit on the deep-tower tiny models (the generic end-to-end checks are tests/test_conformance.py's).

The tiny CLIP towers have 2 layers (one merging layer, at most 50 %), so LLaVA-1.5 / Video-LLaVA tests use
the tiny model with the real tower depth (``vision_layers=24``: 23 merging layers, the official count);
the stock tiny models are refused before loading (tested).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import make_image
from omegaconf import OmegaConf

from apet_bench.baselines.tome import (
    ToMeCompressor,
    TowerGeometry,
    bipartite_soft_matching,
    kept_slots,
    merge_tokens,
    merge_wavg,
    pass_schedule,
    r_schedule,
    slot_map,
)
from apet_bench.budget import BudgetError
from apet_bench.config import compose
from apet_bench.methods import build_method, get_method_class
from apet_bench.models import config_facts, load_model
from apet_bench.models.base import VisualContext
from apet_bench.models.video_llava import VideoClip
from apet_bench.pipeline import generate

GEN = {"max_new_tokens": 2}
Q = "What is in the image?"
DEEP = "+model.tiny_config.vision_layers=24"  # the real ViT-L depth: 23 merging layers before hidden_states[-2]
#: tiny LLaVA-NeXT with the real 336 px crops (576 patches; up to 2928 tokens, so 640 fits) and tower depth
NEXT336 = ["+model.tiny_config.image_size=336", DEEP, "model.visual_tokens=2928"]

#: docs/methods/tome.md [derived] r lists for LLaVA-1.5 (576 patches + CLS over CLIP layers 0..22).
DOC_SCHEDULES = {
    192: [17] * 16 + [16] * 7,
    128: [20] * 11 + [19] * 12,
    64: [23] * 6 + [22] * 17,
}


def _load(overrides: list[str]):
    return load_model(OmegaConf.to_container(compose(overrides).model, resolve=True))


@pytest.fixture(scope="module")
def llava():
    return _load(["model=tiny_llava15", DEEP])


@pytest.fixture(scope="module")
def video_llava():
    return _load(["model=tiny_video_llava", DEEP])


def _clip(seed: int = 3) -> VideoClip:
    rng = np.random.default_rng(seed)
    return VideoClip((rng.random((8, 48, 64, 3)) * 255).astype("uint8"))


def _hooks(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


# ====================================================================== pure functions on crafted inputs
def _unit(v):
    v = torch.tensor(v, dtype=torch.float32)
    return v / v.norm()


def _crafted():
    """9 tokens: 0 = CLS, A = 0,2,4,6,8, B = 1,3,5,7. Known best edges: 2->5 (cos 1), 6->1 (cos .99),
    4->3 (cos .6), 8->7 (cos .3). The CLS is an exact copy of B token 3 (would be the best edge)."""
    e = torch.eye(4)
    b1, b3, b5, b7 = e[0], e[1], e[2], e[3]
    m = torch.zeros(9, 4)
    m[1], m[3], m[5], m[7] = b1, b3, b5, b7
    m[0] = b3  # CLS: identical to token 3
    m[2] = b5  # cos 1 with 5
    m[6] = _unit([0.99, 0, 0, math.sqrt(1 - 0.99**2)])  # cos .99 with 1
    m[4] = _unit([0, 0.6, 0, 0.8])  # cos .6 with 3 (.8 with 7)
    m[8] = _unit([0.3, 0, math.sqrt(1 - 0.09 - 0.01), 0.1])  # best: 5 (.95)
    return m.unsqueeze(0)


def test_bipartite_merges_exactly_the_most_similar_pairs():
    metric = _crafted()
    # A-token best edges: 2->5 (1.0), 8->5 (.95), 6->1 (.99), 4->7 (.8); CLS row masked
    match = bipartite_soft_matching(metric, 2, protect_first=True)
    assert match.num_out == 7
    # A indices (token // 2): token 2 = A1 -> B2 (token 5), token 6 = A3 -> B0 (token 1)
    assert match.src_idx.tolist() == [[1, 3]] and match.dst_idx.tolist() == [[2, 0]]
    assert match.unm_idx.tolist() == [[0, 2, 4]]  # CLS first (sorted), tokens 4 and 8 unmerged
    match3 = bipartite_soft_matching(metric, 3, protect_first=True)
    assert match3.src_idx.tolist() == [[1, 3, 4]] and match3.dst_idx.tolist() == [[2, 0, 2]]  # 8 -> 5 too
    # without protection, the CLS (identical to token 3) is the best edge
    free = bipartite_soft_matching(metric, 1, protect_first=False)
    assert free.src_idx.tolist() == [[0]] and free.dst_idx.tolist() == [[1]]


def test_merge_wavg_is_size_weighted_and_tracks_groups():
    metric = _crafted()
    match = bipartite_soft_matching(metric, 3, protect_first=True)  # 2->5, 6->1, 8->5
    x = torch.arange(9, dtype=torch.float32).view(1, 9, 1) * 10 + 1  # token i has value 10 i + 1
    size = torch.tensor([1, 1, 2, 1, 1, 1, 3, 1, 4], dtype=torch.float32).view(1, 9, 1)
    out, new_size = merge_wavg(match, x, size)
    # order: unmerged A (CLS 0, token 4), then B tokens 1, 3, 5, 7
    assert out.shape == (1, 6, 1)
    v = {i: 10 * i + 1 for i in range(9)}
    s = {i: float(size[0, i, 0]) for i in range(9)}
    expect = [v[0], v[4], (v[1] * s[1] + v[6] * s[6]) / (s[1] + s[6]), v[3],
              (v[5] * s[5] + v[2] * s[2] + v[8] * s[8]) / (s[5] + s[2] + s[8]), v[7]]
    assert torch.allclose(out[0, :, 0], torch.tensor(expect))
    assert new_size[0, :, 0].tolist() == [1, 1, 4, 1, 7, 1]
    assert float(new_size.sum()) == float(size.sum())  # every original token counted once
    # where each old token went, and which old token each new slot is
    assert slot_map(match).tolist() == [[0, 2, 4, 3, 1, 4, 2, 5, 4]]
    assert kept_slots(match).tolist() == [[0, 4, 1, 3, 5, 7]]
    # plain sum of one-hots == merge_source: slot_map is the argmax of the source matrix
    src = merge_tokens(match, torch.eye(9).unsqueeze(0), mode="amax")
    assert src.argmax(dim=1).tolist() == slot_map(match).tolist()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bipartite_matches_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    metric = torch.randn(2, 41, 8, generator=g)
    r = 13
    match = bipartite_soft_matching(metric, r, protect_first=True)
    m = metric / metric.norm(dim=-1, keepdim=True)
    for b in range(2):
        best = []
        for i in range(2, 41, 2):  # A tokens but the CLS
            sims = [(float(m[b, i] @ m[b, j]), j) for j in range(1, 41, 2)]
            val, j = max(sims)
            best.append((val, i, j))
        best.sort(reverse=True)
        want = sorted((i // 2, (j - 1) // 2) for _, i, j in best[:r])
        got = sorted(zip(match.src_idx[b].tolist(), match.dst_idx[b].tolist()))
        assert got == want
        assert 0 in match.unm_idx[b].tolist() and match.unm_idx[b, 0] == 0  # CLS unmerged and first


def test_cls_never_merged_even_when_most_similar_and_r_capped():
    metric = torch.ones(1, 7, 3)  # every token identical: all edges tie
    match = bipartite_soft_matching(metric, 100, protect_first=True)
    assert match.r == 3  # (t - 1) // 2: at most 50 %
    assert 0 not in match.src_idx.tolist()[0] and match.unm_idx[0, 0] == 0
    assert slot_map(match)[0, 0] == 0


# ====================================================================== schedules
@pytest.mark.parametrize("budget", [192, 128, 64])
def test_r_schedule_lands_exactly_on_the_budget(budget):
    sched = r_schedule(577, budget + 1, 23)
    assert sched == DOC_SCHEDULES[budget]  # docs/methods/tome.md lists
    assert sum(sched) == 576 - budget and len(sched) == 23
    last = r_schedule(577, budget + 1, 23, remainder="last")
    assert sorted(last) == sorted(sched) and last[-1] >= last[0] and sum(last) == 576 - budget
    t = 577
    for r in sched:  # never above 50 % of a layer's tokens
        assert r <= (t - 1) // 2
        t -= r
    assert t == budget + 1


def test_r_schedule_refuses_unreachable_budgets():
    with pytest.raises(BudgetError, match="cannot reach 65 of 577 tokens over 1 merging layer") as e:
        r_schedule(577, 65, 1)
    assert "\n" not in str(e.value)
    with pytest.raises(BudgetError, match="cannot reach"):
        r_schedule(577, 65, 7)  # 73/layer: the 7th layer has only 138 tokens (cap 68)
    assert sum(r_schedule(577, 65, 11)) == 512
    assert r_schedule(577, 600, 3) == [0, 0, 0]


@pytest.mark.parametrize("n,ratio,passes", [(640, 0.2, [320, 160, 32]), (640, 0.1, [320, 160, 80, 16]), (7, 0.5, [3])])
def test_pass_schedule(n, ratio, passes):
    target = int(round(n * ratio)) if ratio != 0.5 else 4
    assert pass_schedule(n, target) == passes
    assert n - sum(passes) == target


def test_tower_geometry_merge_layers():
    assert TowerGeometry(24, -2, 576).merge_layers == 23
    assert TowerGeometry(2, -2, 576).merge_layers == 1
    assert TowerGeometry(24, 23, 576).merge_layers == 23


# ====================================================================== config and refusals
def test_registered_and_config_defaults():
    cfg = OmegaConf.to_container(compose(["method=tome", "budget=64"]), resolve=True)
    assert cfg["method"]["available"] is True
    m = build_method("tome", budget=64, **cfg["method"]["params"])
    assert isinstance(m, ToMeCompressor) and get_method_class("tome") is ToMeCompressor
    assert (m.stage, m.prop_attn, m.remainder, m.order, m.needs_attention_weights) == ("vision", True, "first", None, False)


@pytest.mark.parametrize(
    "params,err",
    [({"budget": None}, BudgetError), ({"budget": 64, "remainder": "middle"}, ValueError),
     ({"budget": 64, "order": "random"}, ValueError), ({"budget": 64, "prop_attn": "yes"}, ValueError)],
)
def test_bad_params(params, err):
    with pytest.raises(err):
        build_method("tome", **params)


def _prepare(overrides, monkeypatch):
    import apet_bench.runner as runner

    def boom(*a, **k):
        raise AssertionError("model loaded")

    monkeypatch.setattr(runner, "_load_adapter", boom)
    cfg = compose([*overrides, "benchmark=demo", "limit=2"])
    return runner.execute(cfg)


@pytest.mark.parametrize("model,budget", [("tiny_llava15", 64), ("tiny_llava15", 192), ("tiny_video_llava", 256)])
def test_unreachable_schedule_refused_before_loading(model, budget, monkeypatch):
    """The stock tiny towers have 1 merging layer (<= 50 %): the budget cannot be reached."""
    with pytest.raises(BudgetError, match="r schedule cannot reach") as e:
        _prepare([f"model={model}", "method=tome", f"budget={budget}"], monkeypatch)
    assert "\n" not in str(e.value) and model in str(e.value)


def test_reachable_schedule_accepted_and_flash_refused():
    m = build_method("tome", budget=64)
    m.check_model_config(config_facts({"name": "llava15", "family": "llava15", "tiny": False, "num_layers": 32}))
    m.check_model_config(config_facts({"name": "t", "family": "llava15", "tiny": True, "tiny_config": {"vision_layers": 12}}))
    build_method("tome", budget=160).check_model_config(config_facts(  # 32 per crop of 64: one layer suffices
        {"name": "t", "family": "llava_next", "tiny": True, "tiny_config": {}}))
    with pytest.raises(BudgetError, match="cannot reach 14 of 65"):  # 64 -> 13 per crop: not in one layer
        m.check_model_config(config_facts({"name": "t", "family": "llava_next", "tiny": True, "tiny_config": {}}))
    with pytest.raises(ValueError, match="flash_attention_2"):
        m.check_model_config(config_facts({"name": "llava15", "family": "llava15", "attn_implementation": "flash_attention_2"}))
    build_method("tome", budget=64, prop_attn=False).check_model_config(config_facts(
        {"name": "llava15", "family": "llava15", "attn_implementation": "flash_attention_2"}))
    with pytest.raises(BudgetError, match="multiple of its 8 frames"):
        build_method("tome", budget=100).check_model_config(config_facts({"name": "v", "family": "video_llava", "tiny": False}))


# ====================================================================== the patched tower
def _tower_run(adapter, images, method):
    """Stage-1 features and selection of image 0 inside the method's context; returns (sel, state)."""
    inputs = adapter.prepare_inputs(images, adapter.build_prompt(Q, len(images)))
    with torch.inference_mode(), method(adapter):
        adapter.visual_context = VisualContext(adapter, inputs)
        feats = adapter.stage_one_features(inputs, method)
        sel = method.compress_visual(feats[0], image_index=0)
        state = next(iter(method._states.values()))
        return sel, state, feats[0], inputs


@pytest.mark.parametrize("budget", [192, 128, 64])
def test_llava_schedule_cls_and_groups(llava, budget):
    method = build_method("tome", budget=budget)
    sel, state, feats, _ = _tower_run(llava, [make_image(1, (64, 48))], method)
    assert state.schedule == DOC_SCHEDULES[budget]  # 23 merging layers of the 24
    assert sel.num_tokens == budget
    assert int(state.rep[0, 0]) == 0 and int((state.group[0] == 0).sum()) == 1  # CLS alone in its slot
    groups = method.last_groups[0][0]  # (576,) output row of every patch
    kept = sel.kept_indices
    assert torch.equal(groups[kept], torch.arange(budget))  # each group holds its representative
    assert torch.bincount(groups, minlength=budget).min() >= 1 and groups.numel() == 576
    # the unmerged projector output: every member of a group carries the group's row
    assert torch.equal(feats[kept][groups], feats)
    assert feats.shape[0] == 576


def _reference_tower(adapter, pixel_values, schedule, prop_attn=True):
    """Independent ToMe CLIP tower (eager softmax with + log size, metric = head-mean keys)."""
    tower = adapter.vision_tower
    inner = getattr(tower, "vision_model", tower)
    x = inner.embeddings(pixel_values)
    x = inner.pre_layrnorm(x)
    size = None
    layers = inner.encoder.layers
    for i, layer in enumerate(layers[: len(schedule)]):
        att = layer.self_attn
        h = layer.layer_norm1(x)
        b, t, d = h.shape
        heads = att.num_heads
        q = att.q_proj(h).view(b, t, heads, -1).transpose(1, 2)
        k = att.k_proj(h).view(b, t, heads, -1).transpose(1, 2)
        v = att.v_proj(h).view(b, t, heads, -1).transpose(1, 2)
        logits = q @ k.transpose(-1, -2) * att.scale
        if size is not None and prop_attn:
            logits = logits + size.log()[:, None, None, :, 0]
        a = logits.softmax(-1) @ v
        x = x + att.out_proj(a.transpose(1, 2).reshape(b, t, d))
        if schedule[i]:
            match = bipartite_soft_matching(k.mean(1), schedule[i], protect_first=True)
            x, size = merge_wavg(match, x, size)
        x = x + layer.mlp(layer.layer_norm2(x))
    return x  # = hidden_states[-2] (output of the last merging layer)


@pytest.mark.parametrize("prop_attn", [True, False])
def test_patched_tower_equals_reference(llava, prop_attn):
    """Merge between attention and MLP, keys head-mean metric, sizes carried, proportional attention as
    an sdpa float mask: the tower's hidden_states[-2] equals an eager re-implementation."""
    method = build_method("tome", budget=64, prop_attn=prop_attn)
    inputs = llava.prepare_inputs([make_image(4, (80, 60))], llava.build_prompt(Q))
    pv = inputs["pixel_values"]
    with torch.inference_mode(), method(llava):
        out = llava.vision_tower(pv, output_hidden_states=True)
        sched = next(iter(method._states.values())).schedule
    with torch.inference_mode():
        ref = _reference_tower(llava, pv, sched, prop_attn)
    got = out.hidden_states[-2]
    assert got.shape == (1, 65, got.shape[-1])
    assert torch.allclose(got, ref, atol=1e-4), (got - ref).abs().max()
    assert llava.vision_tower.config._attn_implementation == "sdpa"


def test_eager_and_sdpa_towers_merge_the_same_tokens():
    eager = _load(["model=tiny_llava15", DEEP, "model.attn_implementation=eager"])
    img = [make_image(5, (70, 50))]
    a = generate(eager, img, Q, GEN, build_method("tome", budget=64))
    sdpa = _load(["model=tiny_llava15", DEEP])
    b = generate(sdpa, img, Q, GEN, build_method("tome", budget=64))
    assert a.kept_indices == b.kept_indices
    assert a.layer_visual_tokens == b.layer_visual_tokens == [64] * 4


# ====================================================================== per model through generate
def test_hooks_removed_model_equals_none_and_deterministic(llava):
    img = [make_image(6, (64, 48))]
    gen = {"max_new_tokens": 3, "output_logits": True}
    none_before = generate(llava, img, Q, gen)
    before = _hooks(llava.model)
    m1 = build_method("tome", budget=64, seed=0)
    a = generate(llava, img, Q, gen, m1)
    b = generate(llava, img, Q, gen, build_method("tome", budget=64, seed=0))
    assert a.kept_indices == b.kept_indices and a.output_ids == b.output_ids
    assert all(torch.equal(x, y) for x, y in zip(a.logits, b.logits))
    assert _hooks(llava.model) == before and not m1.is_active
    from apet_bench.baselines.tome import _encoder_layers

    assert not any("forward" in layer.__dict__ for layer in _encoder_layers(llava.vision_tower))
    none_after = generate(llava, img, Q, gen)
    assert none_after.output_ids == none_before.output_ids
    assert all(torch.equal(x, y) for x, y in zip(none_after.logits, none_before.logits))
    assert not any(torch.equal(x, y) for x, y in zip(a.logits[:1], none_before.logits[:1]))  # tome changed something
    assert a.attention_backends["method_computed"], a.attention_backends  # prop attn recorded


def test_video_llava_per_frame_and_image(video_llava):
    out = generate(video_llava, [_clip()], Q, GEN, m := build_method("tome", budget=256))
    assert out.visual_tokens_in == 2056 and out.layer_visual_tokens == [256] * 4 == out.planned_layer_visual_tokens
    kept = torch.tensor(out.kept_indices[0]).view(8, 32)
    assert torch.equal(kept[:, 0], torch.arange(8) * 257)  # each frame's CLS kept, first
    assert ((kept // 257) == torch.arange(8).unsqueeze(1)).all()  # 32 tokens of each frame
    assert m.last_groups[0].shape == (8, 257)
    img = generate(video_llava, [make_image(2, (64, 48))], Q, GEN, build_method("tome", budget=64))
    assert img.visual_tokens_in == 256 and img.layer_visual_tokens == [64] * 4


def test_llava_next_per_crop_with_unpadding():
    adapter = _load(["model=tiny_llava_next"])
    img = [make_image(3, (300, 100))]  # 1x3 grid, unpadding removes rows of every grid crop
    full = generate(adapter, img, Q, GEN)
    m = build_method("tome", budget=160)
    out = generate(adapter, img, Q, GEN, m)
    segs = adapter.visual_segments(adapter.prepare_inputs(img, adapter.build_prompt(Q)))[0]
    n_new = int(segs.newline_positions.numel())
    crops = len(segs.segments)
    assert out.layer_visual_tokens == out.planned_layer_visual_tokens
    assert n_new + crops * 0 < out.visual_tokens_llm <= crops * 32 + n_new < full.visual_tokens_llm
    kept = set(out.kept_indices[0])
    assert set(segs.newline_positions.tolist()) <= kept
    base = set(segs.segments[0].positions.tolist())
    assert len(kept & base) == 32  # the base view is never unpadded: exactly 32 groups
    groups = m.last_groups[0]  # (crops, 64): kept row or -1 (group wholly unpadded)
    assert groups.shape == (crops, 64) and int(groups.max()) < out.visual_tokens_llm


def test_llava_next_real_geometry_exact():
    """336 px crops (576 patches), 24-layer tower: 672 x 672 -> 5 crops x b + 48 newlines, no unpadding."""
    adapter = _load(["model=tiny_llava_next", *NEXT336])
    for budget, b in ((640, 128), (160, 32)):
        out = generate(adapter, [make_image(2, (672, 672))], Q, GEN, build_method("tome", budget=budget))
        assert out.visual_tokens_in == 2928
        assert out.layer_visual_tokens == [5 * b + 48] * 4 == out.planned_layer_visual_tokens


@pytest.mark.parametrize("budget", [0.2, 0.1])
def test_qwen_post_merger_passes(budget):
    adapter = _load(["model=tiny_qwen25vl"])
    m = build_method("tome", budget=budget)
    out = generate(adapter, [make_image(3, (224, 224))], Q, GEN, m)
    n = out.visual_tokens_in
    assert out.layer_visual_tokens == [round(budget * n)] * 4 == out.planned_layer_visual_tokens
    kept = out.kept_indices[0]
    assert kept == sorted(kept)  # spatial order; each keeps its representative's (t, h, w) position
    groups = m.last_groups[0][0]
    assert torch.equal(groups[torch.tensor(kept)], torch.arange(len(kept)))


# ====================================================================== the conformance kit on the deep towers
def test_deep_tower_and_real_next_geometry_conform(tmp_path):
    """The stock tiny LLaVA-1.5 / Video-LLaVA towers are too shallow for the paper budgets (refused, so the
    conformance suite skips them): the kit's checks, one run through ``execute`` each included, on the
    24-layer towers and the real NeXT geometry at the paper budgets."""
    from apet_bench.testing import check_method

    models = {"tiny_llava15": [DEEP], "tiny_llava_next": NEXT336, "tiny_video_llava": [DEEP]}
    budgets = {"tiny_llava15": [192, 128, 64], "tiny_llava_next": [640, 320, 160], "tiny_video_llava": [256]}
    report = check_method("tome", models=models, budgets=budgets, work_dir=tmp_path)
    assert report.models == list(models) and not report.unsupported
    for model in models:
        assert {"plan", "budget", "kept_indices", "attention_backends", "seed", "restored", "runner"} <= (
            report.passed_checks(model))


# ====================================================================== options, several images, dtypes
def test_two_images_each_get_the_budget(llava):
    imgs = [make_image(1, (64, 48)), make_image(2, (48, 64))]
    m = build_method("tome", budget=64)
    out = generate(llava, imgs, Q, GEN, m)
    assert out.visual_tokens_in == 1152 and out.layer_visual_tokens == [128] * 4 == out.planned_layer_visual_tokens
    assert [len(k) for k in out.kept_indices] == [64, 64] and out.kept_indices[0] != out.kept_indices[1]
    single = generate(llava, imgs[1:], Q, GEN, build_method("tome", budget=64))
    assert out.kept_indices[1] == single.kept_indices[0]  # image 1 merged on its own batch row


def test_spatial_order_is_a_permutation_of_merged_order(llava):
    img = [make_image(7, (64, 48))]
    merged, state, _, _ = _tower_run(llava, img, build_method("tome", budget=128))
    spatial, _, _, _ = _tower_run(llava, img, build_method("tome", budget=128, order="spatial"))
    assert spatial.kept_indices.tolist() == sorted(merged.kept_indices.tolist())
    perm = merged.kept_indices.argsort()
    assert torch.equal(spatial.features, merged.features[perm])
    assert merged.kept_indices.tolist() != spatial.kept_indices.tolist()  # the tower's order is scrambled


def test_remainder_last_schedule_in_the_tower(llava):
    _, state, _, _ = _tower_run(llava, [make_image(1, (64, 48))], build_method("tome", budget=64, remainder="last"))
    assert state.schedule == [22] * 17 + [23] * 6


def test_bfloat16_tower():
    adapter = _load(["model=tiny_llava15", DEEP, "model.dtype=bfloat16"])
    out = generate(adapter, [make_image(1, (64, 48))], Q, GEN, build_method("tome", budget=64))
    assert out.layer_visual_tokens == [64] * 4 and len(set(out.kept_indices[0])) == 64
