"""``visionzip``: defining rules on crafted inputs, the [CLS] row vs eager, the Qwen recomputation,
the config refusal, and exact counts on the four tiny models at the paper budgets (random weights, CPU); the
generic end-to-end checks, through the runner included, are the conformance kit's (tests/test_conformance.py)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_image
from omegaconf import OmegaConf
from test_stage2 import count_hooks

from apet_bench.baselines.visionzip import (
    VisionZipCompressor,
    _encoder_layers,
    cls_attention_row,
    qwen_attention_received,
    split_budget,
    visionzip_tokens,
)
from apet_bench.budget import BudgetError
from apet_bench.config import compose
from apet_bench.methods import build_method
from apet_bench.models import load_model
from apet_bench.models.video_llava import VideoClip
from apet_bench.pipeline import apply_visual_stage, generate

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("APET_BENCH_TEST_DATA_ROOT", REPO.parent / "shared" / "benchmarks"))
GEN = {"max_new_tokens": 2}
_ADAPTERS: dict = {}


def adapter(model: str, *overrides: str):
    key = (model, overrides)
    if key not in _ADAPTERS:
        cfg = compose([f"model={model}", *overrides])
        _ADAPTERS[key] = load_model(OmegaConf.to_container(cfg.model, resolve=True))
    return _ADAPTERS[key]


# ---------------------------------------------------------------------- defining rules on crafted inputs
def test_split_budget_matches_the_official_and_derived_splits():
    assert [split_budget(b, 10 / 64) for b in (64, 128, 192, 32)] == [(54, 10), (108, 20), (162, 30), (27, 5)]
    m = VisionZipCompressor(budget=0.2)
    assert m.unit_counts(400, 1.0, False) == (60, 20)  # Qwen 20 % -> 15 % + 5 %
    assert VisionZipCompressor(budget=0.1).unit_counts(577, 1.0, True) == split_budget(58, 0.25)  # of 576 patches
    assert VisionZipCompressor(budget=640).unit_counts(65, 0.2, True) == (65, 0)  # NeXT 640 on a 64-patch crop


def test_dominant_tokens_are_cls_plus_top_cls_attention():
    torch.manual_seed(0)
    n = 30
    feats = torch.randn(n, 6)
    scores = torch.rand(n)
    scores[0] = -5.0  # [CLS]'s own entry must not matter
    res = visionzip_tokens(feats, scores, torch.randn(n, 4), num_dominant=6, num_contextual=0)
    expect = torch.cat([torch.tensor([0]), (torch.topk(scores[1:], 5).indices + 1).sort().values])
    assert torch.equal(res.dominant, expect)
    assert torch.equal(res.tokens, feats[expect])


def test_contextual_token_is_target_plus_cluster_mean():
    # 1 [CLS] + 8 patches; dominant = [CLS] + patch 8 (highest score); rest = 1..7, 2 contextual tokens:
    # step = 7 // 2 = 3 -> targets rest[0] = 1 and rest[3] = 4. Metric: tokens 2, 3 point like 1; 5, 6, 7 like 4.
    feats = torch.arange(9 * 2, dtype=torch.float32).view(9, 2) ** 1.5
    scores = torch.tensor([0.0, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.9])
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    metric = torch.stack([a, a, a * 2, a + 0.1 * b, b, b * 3, b + 0.2 * a, b, a])
    res = visionzip_tokens(feats, scores, metric, num_dominant=2, num_contextual=2)
    assert res.dominant.tolist() == [0, 8] and res.targets.tolist() == [1, 4]
    assert [m.tolist() for m in res.members] == [[2, 3], [5, 6, 7]]
    ctx = res.tokens[2:]
    assert torch.allclose(ctx[0], feats[1] + feats[[2, 3]].mean(0))
    assert torch.allclose(ctx[1], feats[4] + feats[[5, 6, 7]].mean(0))
    assert not torch.allclose(ctx[0], feats[[1, 2, 3]].mean(0))  # not the group mean


def test_empty_cluster_adds_nothing_and_no_cls_mode():
    feats = torch.randn(5, 3)
    metric = torch.eye(5)[:, :4] + 0.01  # token 4 is closest to nothing in particular
    res = visionzip_tokens(feats, torch.tensor([5.0, 4, 0, 0, 0]), metric, 2, 3, cls_index=None)
    assert res.dominant.tolist() == [0, 1] and res.targets.tolist() == [2, 3, 4]
    assert torch.allclose(res.tokens[2:], feats[2:])  # nothing left to merge
    with pytest.raises(ValueError, match="do not fit"):
        visionzip_tokens(feats, torch.zeros(5), metric, 4, 2)


# ---------------------------------------------------------------------- attention recomputation
def test_cls_row_equals_eager_output_attentions():
    eager = adapter("tiny_llava15", "model.attn_implementation=eager")
    inputs = eager.prepare_inputs([make_image(1, (80, 60))], eager.build_prompt("q"))
    tower = eager.vision_tower
    with torch.inference_mode():
        out = tower(inputs["pixel_values"], output_attentions=True, output_hidden_states=True)
        layers = _encoder_layers(tower)
        k = len(layers) - 2
        row, keys = cls_attention_row(layers[k], out.hidden_states[k])
    ref = out.attentions[k][:, :, 0].float()
    assert ref.shape == row.shape and (row - ref).abs().max().item() < 1e-5
    assert keys.shape == (1, ref.shape[-1], layers[k].self_attn.head_dim)


def test_sdpa_run_selects_the_eager_top_tokens_and_notes_the_attention():
    sdpa, eager = adapter("tiny_llava15"), adapter("tiny_llava15", "model.attn_implementation=eager")
    assert sdpa.vision_tower.config._attn_implementation == "sdpa"
    img = make_image(2, (70, 50))
    m = build_method("visionzip", budget=64)
    out = generate(sdpa, [img], "What?", GEN, m)
    inputs = eager.prepare_inputs([img], eager.build_prompt("q"))
    with torch.inference_mode():
        att = eager.vision_tower(inputs["pixel_values"], output_attentions=True).attentions[-2][0, :, 0, 1:].sum(0)
    expect = sorted((torch.topk(att, 53).indices + 1).tolist())
    assert m.records[0]["dominant"] == [0, *expect]
    assert {"component": "vision", "layer": -2, "rows": "[CLS]"}.items() <= out.attention_backends["method_computed"][0].items()


def test_dominant_rows_are_the_projected_layer_minus2_tokens():
    a = adapter("tiny_llava15")
    m = build_method("visionzip", budget=64)
    inputs = a.prepare_inputs([make_image(3, (64, 64))], a.build_prompt("q"))
    from apet_bench.models.base import VisualContext

    a.visual_context = VisualContext(a, inputs)
    with torch.inference_mode(), m(a):
        _, sels = apply_visual_stage(a, inputs, m)
        tokens = a.encode_images(inputs)[0]  # 576 projected patches of hidden_states[-2]
    dom = torch.tensor(m.records[0]["dominant"][1:]) - 1
    assert sels[0].num_tokens == 64 and sels[0].kept_indices is None
    assert torch.allclose(sels[0].features[1:54], tokens[dom], atol=1e-5)
    # reported for accounting/figures: [CLS] = -1, dominant patches, contextual targets (visual-token indices)
    targets = torch.tensor(m.records[0]["targets"]) - 1
    assert sels[0].reported_indices.tolist() == [-1, *dom.tolist(), *targets.tolist()]


def test_qwen_recomputed_attention_reproduces_the_block_output():
    a = adapter("tiny_qwen25vl")
    attn = a.vision_tower.blocks[-1].attn
    seen = {}

    def hook(mod, args, kwargs, output):
        seen["args"], seen["kwargs"], seen["out"] = args, kwargs, output

    h = attn.register_forward_hook(hook, with_kwargs=True)
    try:
        inputs = a.prepare_inputs([make_image(4, (120, 90))], a.build_prompt("q"))
        with torch.inference_mode():
            a.encode_images(inputs)
            x = seen["args"][0] if seen["args"] else seen["kwargs"]["hidden_states"]
            received, keys, out = qwen_attention_received(
                attn, x, seen["kwargs"]["cu_seqlens"], seen["kwargs"]["position_embeddings"], chunk=7, with_output=True
            )
    finally:
        h.remove()
    assert (out - seen["out"]).abs().max().item() < 1e-5
    cu = seen["kwargs"]["cu_seqlens"].tolist()
    for s, e in zip(cu[:-1], cu[1:]):  # each query row sums to 1, so the mean received sums to 1 per sequence
        assert abs(received[s:e].sum().item() - 1.0) < 1e-4
    assert keys.shape[0] == x.shape[0]


# ---------------------------------------------------------------------- configuration
def test_config_and_bad_params():
    cfg = OmegaConf.to_container(compose(["method=visionzip", "budget=64"]), resolve=True)
    assert cfg["method"]["available"] is True
    m = build_method("visionzip", budget=64, **cfg["method"]["params"])
    assert m.stage == "vision" and not m.needs_attention_weights and m.qwen_fallback
    with pytest.raises(BudgetError):
        build_method("visionzip")
    with pytest.raises(ValueError, match="dominant"):
        build_method("visionzip", budget=64, dominant=-1)
    with pytest.raises(ValueError, match="contextual_share"):
        build_method("visionzip", budget=64, contextual_share=1.5)


def test_no_cls_tower_without_fallback_refused_before_loading(tmp_path, monkeypatch):
    import apet_bench.runner as runner

    def no_load(*a, **k):  # pragma: no cover - must not be reached
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(runner, "_load_adapter", no_load)
    cfg = compose(["model=tiny_qwen25vl", "method=visionzip", "method.params.qwen_fallback=false", "budget=0.2",
                   "benchmark=demo", f"results_dir={tmp_path}", f"cache_dir={tmp_path / 'c'}"])
    with pytest.raises(ValueError, match=r"without \[CLS\] and qwen_fallback is false") as err:
        runner.execute(cfg)
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------------- exact counts at the paper budgets
NEXT336 = ("+model.tiny_config.image_size=336", "model.visual_tokens=2928")
PAPER = [
    ("tiny_llava15", (), 192), ("tiny_llava15", (), 128), ("tiny_llava15", (), 64),
    ("tiny_llava_next", NEXT336, 640), ("tiny_llava_next", NEXT336, 320),
    ("tiny_llava_next", NEXT336, 160), ("tiny_llava_next", (), 160),
    ("tiny_qwen25vl", (), 0.2), ("tiny_qwen25vl", (), 0.1),
    ("tiny_video_llava", (), 256),
]


@pytest.mark.parametrize("model,over,budget", PAPER, ids=[f"{m}-{len(o)}-{b}" for m, o, b in PAPER])
def test_paper_budget_counts(model, over, budget):
    """Per-model counts (the generic checks, through the runner included, are tests/test_conformance.py's)."""
    a = adapter(model, *over)
    if model == "tiny_video_llava":
        rng = np.random.default_rng(3)
        visual = [VideoClip((rng.random((8, 48, 64, 3)) * 255).astype("uint8"))]
    else:
        visual = [make_image(7, (448, 336))]
    out = generate(a, visual, "What?", GEN, build_method("visionzip", budget=budget))
    layers, kept = out.layer_visual_tokens, out.kept_indices
    assert layers == out.planned_layer_visual_tokens and len(set(layers)) == 1
    n = layers[0]
    if model == "tiny_llava15":
        # recorded: dominant patches + contextual targets; the [CLS] row has no visual-token index
        assert n == budget and len(kept[0]) == budget - 1 and min(kept[0]) >= 0
    elif model == "tiny_llava_next":  # per crop min(b, 1 + 64 or 576 patches); crops = base + grid
        per = min(round(budget / 5), 1 + (576 if over else 64))
        assert n % per == 0 and n // per in (3, 4, 5, 7)  # 1 + rows*cols crops (tiny pinpoints)
    elif model == "tiny_qwen25vl":
        assert n == round(budget * out.visual_tokens_in) and len(kept[0]) == n
    else:
        assert n == budget and len(set(kept[0])) == budget


@pytest.mark.parametrize("model", ["tiny_llava15", "tiny_llava_next", "tiny_qwen25vl", "tiny_video_llava"])
def test_hooks_removed_none_unchanged_and_seed_deterministic(model):
    a = adapter(model)
    if model == "tiny_video_llava":
        rng = np.random.default_rng(3)
        visual = [VideoClip((rng.random((8, 48, 64, 3)) * 255).astype("uint8"))]
        budget = 256
    else:
        visual = [make_image(5, (90, 60))]
        budget = 0.2 if model == "tiny_qwen25vl" else 64
    gen = {"max_new_tokens": 3, "output_logits": True}
    ref = generate(a, visual, "What?", gen, build_method("none"))
    before = count_hooks(a.model)  # after a first forward: transformers adds its own output-capturing hooks lazily
    one = generate(a, visual, "What?", gen, build_method("visionzip", budget=budget))
    two = generate(a, visual, "What?", gen, build_method("visionzip", budget=budget))
    assert count_hooks(a.model) == before
    assert one.output_ids == two.output_ids and all(torch.equal(x, y) for x, y in zip(one.logits, two.logits))
    assert one.visual_tokens_llm < ref.visual_tokens_llm
    after = generate(a, visual, "What?", gen, build_method("none"))
    assert all(torch.equal(x, y) for x, y in zip(ref.logits, after.logits))


# ---------------------------------------------------------------------- per-model layouts
def _stage_one(a, visuals, method, question="q"):
    from apet_bench.models.base import VisualContext

    inputs = a.prepare_inputs(visuals, a.build_prompt(question, num_images=len(visuals)))
    a.visual_context = VisualContext(a, inputs)
    with torch.inference_mode(), method(a):
        _, sels = apply_visual_stage(a, inputs, method)
        vf = a.visual_context.vision_features  # pre-projector features (a second tower pass)
        tokens = a.encode_images(inputs)
    return inputs, sels, vf, tokens


def test_next_official_layout_base_then_grid_raster_cls_contextual():
    a = adapter("tiny_llava_next")
    m = build_method("visionzip", budget=160)  # 32 per crop = 27 + 5 (of 1 + 64)
    inputs, sels, vf, _ = _stage_one(a, [make_image(6, (100, 60))], m)
    vf = vf[0]  # (C, 64, D_v): projector input = layer -2 output without [CLS]
    C = int(vf.shape[0])
    rows, cols = a.visual_layout(inputs)[0].crop_grid
    assert C == 1 + rows * cols and sels[0].num_tokens == 32 * C and sels[0].kept_indices is None
    rec = m.records
    assert len(rec) == C and all(len(r["dominant"]) == 27 and len(r["targets"]) == 5 for r in rec)
    with torch.inference_mode():
        proj = a.project_visual(vf)  # (C, 64, D)
    out = sels[0].features
    base_dom = torch.tensor(rec[0]["dominant"][1:]) - 1
    assert torch.allclose(out[1:27], proj[0][base_dom], atol=1e-5)  # base: [CLS, dominant patches, contextual]
    side = int(a.patches_per_side)
    cells = []
    for c in range(1, C):
        cr, cc = divmod(c - 1, cols)
        for p in (torch.tensor(rec[c]["dominant"][1:]) - 1).tolist():
            cells.append(((cr * side + p // side) * cols * side + cc * side + p % side, c, p))
    cells.sort()
    grid = torch.stack([proj[c][p] for _, c, p in cells])
    assert torch.allclose(out[32 : 32 + len(cells)], grid, atol=1e-5)  # grid crops' dominant patches, full-grid raster
    assert out.shape[0] == 32 + len(cells) + (C - 1) + 5 * (C - 1)  # then the crops' CLS, then their contextual


def test_video_frames_keep_indices_and_rows():
    a = adapter("tiny_video_llava")
    rng = np.random.default_rng(4)
    clip = VideoClip((rng.random((8, 48, 64, 3)) * 255).astype("uint8"))
    m = build_method("visionzip", budget=256)
    out = generate(a, [clip], "What happens?", GEN, m)
    kept = out.kept_indices[0]
    assert len(kept) == 256 and len(set(kept)) == 256
    assert all(kept[f * 32] == f * 257 for f in range(8))  # each frame's [CLS] first
    assert all(len(r["dominant"]) == 27 and len(r["targets"]) == 5 for r in m.records)


def test_two_images_each_get_the_budget():
    a = adapter("tiny_llava15")
    m = build_method("visionzip", budget=64)
    out = generate(a, [make_image(1, (60, 60)), make_image(2, (50, 70))], "Compare.", GEN, m)
    assert out.visual_tokens_llm == 128 and len(m.records) == 2
    assert m.records[0]["dominant"] != m.records[1]["dominant"]


def test_qwen_dominant_tokens_are_top_pooled_eager_attention(monkeypatch):
    """Independent reference: the eager ViT's own attention weights of the last block (captured from its
    ``eager_attention_forward``), mean received per patch, pooled per 2×2 merge unit, window order undone."""
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as mq
    from transformers.vision_utils import get_vision_window_index

    a = adapter("tiny_qwen25vl", "model.attn_implementation=eager")
    last = a.vision_tower.blocks[-1].attn
    assert last.config._attn_implementation == "eager"
    seen: list = []
    real = mq.eager_attention_forward

    def spy(module, *args, **kwargs):
        out = real(module, *args, **kwargs)
        if module is last:
            seen.append(out[1].detach())  # (1, heads, n, n) per cu_seqlens chunk
        return out

    monkeypatch.setattr(mq, "eager_attention_forward", spy)
    img = make_image(8, (150, 100))
    m = build_method("visionzip", budget=0.2)
    generate(a, [img], "What?", GEN, m)
    received = torch.cat([w[0].float().mean(dim=(0, 1)) for w in seen[-1:]])  # one image, one chunk
    grid = a.prepare_inputs([img], a.build_prompt("q"))["image_grid_thw"]
    v = a.vision_tower
    wi, _ = get_vision_window_index(grid, spatial_merge_size=v.spatial_merge_size, window_size=v.window_size,
                                    patch_size=v.patch_size)
    pooled = received.view(-1, 4).mean(-1)[torch.argsort(wi)]
    d = len(m.records[0]["dominant"])
    assert d == round(0.2 * pooled.numel()) - round(round(0.2 * pooled.numel()) * 0.25)
    assert m.records[0]["dominant"] == sorted(torch.topk(pooled, d).indices.tolist())


def test_video_llava_image_uses_the_image_tower():
    a = adapter("tiny_video_llava")
    m = build_method("visionzip", budget=64)
    out = generate(a, [make_image(9, (80, 80))], "What?", GEN, m)
    assert out.visual_tokens_in == 256 and out.visual_tokens_llm == 64 and len(out.kept_indices[0]) == 63
    assert len(m.records) == 1 and len(m.records[0]["dominant"]) == 54 and len(m.records[0]["targets"]) == 10
