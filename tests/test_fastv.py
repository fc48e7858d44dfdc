"""``fastv``: keep counts and plans per model/budget, the selection rule on crafted attention,
the row against eager ``output_attentions``, sdpa == eager selection on the four tiny models, exact keep
counts, hooks removed, determinism, bad configurations refused before loading (the generic end-to-end
checks, through the runner included, are the conformance kit's: tests/test_conformance.py).
"""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import make_image
from omegaconf import OmegaConf
from test_model_matrix import get_adapter
from test_stage2 import count_hooks

from apet_bench.baselines.fastv import (
    FastV,
    ModelFacts,
    fastv_keep_count,
    model_facts,
    scale_layers,
)
from apet_bench.budget import BudgetError
from apet_bench.config import compose
from apet_bench.methods import build_method
from apet_bench.models.video_llava import VideoClip
from apet_bench.pipeline import generate

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("APET_BENCH_TEST_DATA_ROOT", REPO.parent / "shared" / "benchmarks"))
GEN = {"max_new_tokens": 2}
Q = "What is in the image?"
MODELS = ["tiny_llava15", "tiny_llava_next", "tiny_qwen25vl", "tiny_video_llava"]

def adapter_for(model: str, attn: str = "sdpa"):
    """Each tiny model (and backend) loaded once per session (shared with the model matrix)."""
    return get_adapter(model, attn)


def fake_adapter(family="llava15", num_layers=32, max_tokens=576, tiny=False):
    """Just what the schedule code reads (no weights): for the 7B plans and crafted selections."""
    spec = SimpleNamespace(tiny=tiny, options={}, visual_tokens=max_tokens)
    return SimpleNamespace(name=f"fake_{family}", family=family, num_layers=num_layers, spec=spec,
                           position_encoding="mrope-3d" if family == "qwen25vl" else "rope-1d")


def clip(seed: int = 3) -> VideoClip:
    import numpy as np

    rng = np.random.default_rng(seed)
    return VideoClip((rng.random((8, 48, 64, 3)) * 255).astype("uint8"))


# ---------------------------------------------------------------------- config, keep counts, 7B plans
def test_registered_with_yaml_defaults():
    cfg = OmegaConf.to_container(compose(["method=fastv", "budget=64"]), resolve=True)
    assert cfg["method"]["available"] is True
    m = build_method("fastv", budget=64, **cfg["method"]["params"])
    assert isinstance(m, FastV) and m.stage == "llm" and m.needs_attention_weights
    assert (m.layer, m.budget_convention) == (None, "equivalent_average")


def test_keep_counts_per_model_and_convention():
    """docs/methods/fastv.md numbers: equivalent average (K=2 of 32 / 28) and keep-after-K."""
    ea = "equivalent_average"
    assert [fastv_keep_count(b, 576, 2, 32, ea) for b in (192, 128, 64)] == [166, 98, 30]
    assert [fastv_keep_count(b, 2880, 2, 32, ea) for b in (640, 320)] == [491, 149]
    assert fastv_keep_count(160, 2880, 1, 32, ea) == 72  # NeXT 160 needs K=1
    assert fastv_keep_count(256, 2056, 2, 32, ea) == 136  # Video-LLaVA, 8 x 257
    n = 1000  # Qwen2.5-VL ratios: (28 r - 2) / 26 of N
    assert [fastv_keep_count(r, n, 2, 28, ea) for r in (0.2, 0.1)] == [138, 31]
    for b, keep in ((192, 166), (128, 98), (64, 30)):  # the average over 32 layers is the budget (±0.5)
        assert abs((2 * 576 + 30 * keep) / 32 - b) <= 0.5
    kk = "keep_after_k"
    assert [fastv_keep_count(b, 576, 2, 32, kk) for b in (192, 64, 999)] == [192, 64, 576]
    assert fastv_keep_count(0.25, 576, 2, 32, kk) == 144
    assert fastv_keep_count(700, 576, 2, 32, ea) == 576  # budget above N: nothing to drop
    with pytest.raises(BudgetError, match="unreachable"):
        fastv_keep_count(160, 2928, 2, 32, ea)


def test_seven_b_plans_with_fake_adapters():
    """The 32-/28-layer plans themselves (no weights needed)."""
    llava = fake_adapter()
    assert FastV(budget=64).plan(llava, 576) == [576] * 2 + [30] * 30
    assert FastV(budget=64, budget_convention="keep_after_k").plan(llava, 576) == [576] * 2 + [64] * 30
    assert FastV(budget=128, layer=3).plan(llava, 576) == [576] * 3 + [round((32 * 128 - 3 * 576) / 29)] * 29
    nxt = fake_adapter("llava_next", max_tokens=2928)
    assert FastV(budget=160).schedule_layer(model_facts(nxt)) == 1  # table: K=1 for NeXT 160
    assert FastV(budget=320).schedule_layer(model_facts(nxt)) == 2
    assert FastV(budget=160).plan(nxt, 2880) == [2880] + [72] * 31
    qwen = fake_adapter("qwen25vl", 28, 2048)
    plan = FastV(budget=0.1).plan(qwen, 1000)
    assert plan == [1000] * 2 + [31] * 26 and abs(sum(plan) / 28 - 100) < 1
    video = fake_adapter("video_llava", max_tokens=2056)
    assert FastV(budget=256).plan(video, 2056) == [2056] * 2 + [136] * 30


def test_tiny_models_run_the_7b_schedule_with_scaled_k():
    assert scale_layers([2], 32, 4) == (1,) and scale_layers([2], 28, 4) == (1,) and scale_layers([16], 32, 4) == (2,)
    assert scale_layers([2, 8, 16], 32, 32) == (2, 8, 16)
    tiny = fake_adapter(num_layers=4, tiny=True)
    assert model_facts(tiny).schedule_depth == 32
    assert FastV(budget=64).plan(tiny, 576) == [576, 30, 30, 30]  # 7B keep count, K=2 of 32 -> 1 of 4


# ---------------------------------------------------------------------- the rule on crafted attention
def test_keeps_exactly_the_top_last_row_head_mean_attention():
    """Hand-made rows: the kept visual tokens are the top-k of the head-mean LAST row over the visual
    span, whatever the other rows, a single head's maximum, or the text tokens' scores say."""
    g = torch.Generator().manual_seed(0)
    heads, seq = 4, 60
    vis = torch.arange(10, 42)  # 32 visual tokens at 10..41
    att = torch.rand(1, heads, 2, seq, generator=g)
    att[0, :, -1, vis[-1]] = 0.0
    att[0, 0, -1, vis[-1]] = 3.0  # one head's spike: head mean 0.75 -> in the top
    att[0, 1:, -1, vis[0]] = 0.9  # three heads high: head mean 0.675 (+ head 0 draw) -> likely in the top
    att[0, :, 0, vis[5]] = 100.0  # a huge score on the FIRST row must not matter
    att[0, :, -1, 0:10] = 50.0  # text tokens are never candidates
    att = att / att.sum(-1, keepdim=True)
    method = FastV(budget=8, budget_convention="keep_after_k")
    with method(fake_adapter()):
        sel = method.select_llm_tokens(torch.zeros(1, seq, 8), [vis], layer_idx=2, attention=att)
    mean = att[0, :, -1].mean(0)
    expected = vis[mean[vis].argsort(descending=True)[:8]].sort().values
    assert sel.keep_positions.tolist() == [expected.tolist()]
    assert int(vis[-1]) in expected.tolist() and int(vis[5]) not in sel.keep_positions[0].tolist()
    per_head_max = vis[att[0, :, -1][:, vis].max(0).values.argsort(descending=True)[:8]].sort().values
    assert not torch.equal(per_head_max, expected)  # the rule is the head MEAN, not any head's max
    with pytest.raises(ValueError, match="attention rows"):
        with method(fake_adapter()):
            method.select_llm_tokens(torch.zeros(1, seq, 8), [vis], layer_idx=2, attention=None)


def _spy(method):
    """Record the attention rows the surgery hands to ``select_llm_tokens``."""
    seen = []
    real = method.select_llm_tokens

    def spy(hidden_states, visual_positions, *, layer_idx, attention=None):
        seen.append((layer_idx, attention.clone(), [v.clone() for v in visual_positions]))
        return real(hidden_states, visual_positions, layer_idx=layer_idx, attention=attention)

    method.select_llm_tokens = spy
    return seen


@pytest.mark.parametrize("model", MODELS)
def test_end_to_end_matches_eager_output_attentions_of_layer_k_minus_1(model):
    """sdpa tiny models: the kept tokens are the top ``keep`` of the eager layer-(K-1) last row."""
    sdpa, eager = adapter_for(model), adapter_for(model, "eager")
    image = make_image(11, (64, 48) if model == "tiny_llava15" else (224, 224))
    budget = {"tiny_llava15": 64, "tiny_llava_next": 160, "tiny_qwen25vl": 0.2, "tiny_video_llava": 64}[model]
    method = FastV(budget=budget)
    seen = _spy(method)
    out = generate(sdpa, [image], Q, GEN, method)
    k = 1  # K=2 of 32 -> layer 1 of 4
    keep = out.layer_visual_tokens[1]
    assert out.layer_visual_tokens == out.planned_layer_visual_tokens
    if model == "tiny_llava15":
        assert out.layer_visual_tokens == [576, 30, 30, 30]
    inputs = eager.prepare_inputs([image], eager.build_prompt(Q))
    with torch.inference_mode():
        ref = eager.model(**inputs, output_attentions=True).attentions[k - 1][:, :, -1:, :].float()
    layer, rows, vis = seen[0]
    assert layer == k
    torch.testing.assert_close(rows, ref, atol=1e-5, rtol=1e-4)
    v = vis[0]
    top = ref[0, :, -1].mean(0)[v].topk(keep).indices.sort().values
    assert out.kept_indices == [top.tolist()]  # indices into the sample's visual tokens


@pytest.mark.parametrize("model", MODELS)
def test_sdpa_selects_what_eager_selects(model):
    """The single recomputed row under sdpa equals eager's within 1e-5 and the kept tokens agree."""
    visuals = [make_image(12, (224, 224))]
    budget = {"tiny_llava15": 128, "tiny_llava_next": 160, "tiny_qwen25vl": 0.2, "tiny_video_llava": 128}[model]
    outs, rows = [], []
    for attn in ("sdpa", "eager"):
        m = FastV(budget=budget)
        seen = _spy(m)
        outs.append(generate(adapter_for(model, attn), visuals, Q, GEN, m))
        rows.append(seen[0][1])
    torch.testing.assert_close(rows[0], rows[1], atol=1e-5, rtol=1e-4)
    assert outs[0].kept_indices == outs[1].kept_indices
    assert outs[0].layer_visual_tokens == outs[0].planned_layer_visual_tokens == outs[1].layer_visual_tokens
    backends = outs[0].attention_backends["llm_layers"]
    assert backends[0].startswith("sdpa + rows 'last'") and backends[1:] == ["sdpa"] * 3


# ---------------------------------------------------------------------- all four tiny models: plan, hooks, seed
BUDGETS = {
    "tiny_llava15": [192, 128, 64],
    "tiny_llava_next": [320, 160],  # 640 exceeds the tiny NeXT's largest span (336)
    "tiny_qwen25vl": [0.2, 0.1],
    "tiny_video_llava": [256],  # a video (8 x 257)
}


#: (visual tokens, kept from K on) of the 7B schedule on the tiny models: LLaVA-1.5 166/98/30, Video-LLaVA 136.
EXACT_KEEP = {("tiny_llava15", 192): (576, 166), ("tiny_llava15", 128): (576, 98), ("tiny_llava15", 64): (576, 30),
              ("tiny_video_llava", 256): (2056, 136)}


@pytest.mark.parametrize("model", MODELS)
def test_every_paper_budget_plan_equals_measured_hooks_removed_deterministic(model):
    adapter = adapter_for(model)
    visuals = [clip()] if model == "tiny_video_llava" else [make_image(13, (224, 224))]
    base = generate(adapter, visuals, Q, {**GEN, "output_logits": True})
    before = count_hooks(adapter.model)
    facts = model_facts(adapter)
    for budget in BUDGETS[model]:
        for convention in ("equivalent_average", "keep_after_k"):
            m = FastV(budget=budget, budget_convention=convention)
            out = generate(adapter, visuals, Q, GEN, m)
            n = out.visual_tokens_llm
            keep = fastv_keep_count(budget, n, m.schedule_layer(facts), facts.schedule_depth, convention)
            assert out.layer_visual_tokens == out.planned_layer_visual_tokens == [n] + [keep] * 3, (budget, convention)
            assert keep < n and len(out.kept_indices[0]) == keep
            if convention == "equivalent_average" and (model, budget) in EXACT_KEEP:  # the 7B table's numbers
                assert (n, keep) == EXACT_KEEP[model, budget]
            again = generate(adapter, visuals, Q, GEN, FastV(budget=budget, budget_convention=convention))
            assert (again.output_ids, again.kept_indices) == (out.output_ids, out.kept_indices)
            assert count_hooks(adapter.model) == before and not m.is_active
    after = generate(adapter, visuals, Q, {**GEN, "output_logits": True})
    assert after.output_ids == base.output_ids
    assert all(torch.equal(x, y) for x, y in zip(after.logits, base.logits))


# ---------------------------------------------------------------------- bad configurations
@pytest.mark.parametrize(
    "overrides,match",
    [
        (["model=tiny_llava15", "method.params.layer=32", "budget=64"], r"layer K=32 is not usable.*32 decoder layers"),
        (["model=llava15", "method.params.layer=40", "budget=64"], r"layer K=40 is not usable on model 'llava15'"),
        (["model=llava_next", "method.params.layer=2", "budget=160"], r"budget 160 is unreachable .*K=2 of 32"),
        (["model=qwen25vl", "method.params.layer=2", "budget=0.05"], r"unreachable as an equivalent average with K=2 of 28"),
        (["model=tiny_llava15", "method.params.budget_convention=average", "budget=64"], r"budget_convention 'average'"),
        (["model=tiny_llava15", "method.params.layer=0", "budget=64"], r"layer 0 is not an int >= 1"),
    ],
)
def test_bad_configuration_refused_before_loading(tmp_path, monkeypatch, overrides, match):
    import apet_bench.runner as runner

    def no_load(*a, **k):  # pragma: no cover - must not be reached
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(runner, "_load_adapter", no_load)
    cfg = compose(["method=fastv", "benchmark=demo", f"results_dir={tmp_path / 'results'}",
                   f"cache_dir={tmp_path / 'cache'}", *overrides])
    with pytest.raises(ValueError, match=match) as err:
        runner.execute(cfg)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "results" / "runs").exists() or not any((tmp_path / "results" / "runs").iterdir())


def test_keep_after_k_makes_next_160_feasible_at_k2():
    m = FastV(budget=160, layer=2, budget_convention="keep_after_k")
    cfg = OmegaConf.to_container(compose(["model=llava_next"]).model, resolve=True)
    m.check_model_config(cfg)  # no error
    assert m.plan(fake_adapter("llava_next", max_tokens=2928), 2928) == [2928] * 2 + [160] * 30
    assert ModelFacts("x", "llava15", 4, True, 576).schedule_depth == 32


def test_kv_cache_holds_each_token_once():
    """FastV's lmms-eval variant duplicates layer K-1's KV entries (docs/methods/index.md, FastV issues #18/#46);
    here every layer's cache holds text + planned visual tokens + generated - 1, each once."""
    from test_stage2 import expected_kv

    adapter = adapter_for("tiny_llava15")
    out = generate(adapter, [make_image(14)], Q, {"max_new_tokens": 4}, FastV(budget=128))
    assert out.kv_cache_tokens == expected_kv(out)
    text = out.prompt_tokens - out.visual_tokens_llm
    assert out.kv_cache_tokens[0] == text + 576 + len(out.output_ids) - 1
    assert out.kv_cache_tokens[1:] == [text + 98 + len(out.output_ids) - 1] * 3
