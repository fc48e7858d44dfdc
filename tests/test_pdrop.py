"""``pdrop``: official and per-budget schedules (counts at the stage layers) on 32-/28-layer fake
adapters, plan == measured on the four tiny models, the selection rule on crafted attention, the probed
row against eager ``output_attentions``, sdpa == eager selection, positions, bad configurations (the generic
end-to-end checks, through the runner included, are the conformance kit's: tests/test_conformance.py).
"""

from __future__ import annotations

import pytest
import torch
from conftest import make_image
from omegaconf import OmegaConf

# Shared with the FastV tests: tiny models loaded once per session, fake 32-/28-layer adapters, a clip.
from test_fastv import GEN, MODELS, REPO, SHARED, Q, adapter_for, clip, fake_adapter  # noqa: E402,F401
from test_stage2 import count_hooks

from apet_bench.baselines.fastv import model_facts
from apet_bench.baselines.pdrop import (
    OFFICIAL_LAMBDA,
    OFFICIAL_LAYERS,
    PDROP_TABLE,
    PyramidDrop,
    schedule_average,
    solve_lambda,
    stage_counts,
)
from apet_bench.budget import BudgetError
from apet_bench.config import compose
from apet_bench.methods import build_method
from apet_bench.models import load_model
from apet_bench.pipeline import generate


def expand(n, layers, counts, depth):
    """Per-layer counts of a schedule: ``n`` before ``layers[0]``, ``counts[s]`` from ``layers[s]`` on."""
    out, cur = [], n
    for i in range(depth):
        if i in layers:
            cur = counts[layers.index(i)]
        out.append(cur)
    return out


# ---------------------------------------------------------------------- config and schedules
def test_registered_with_yaml_defaults():
    cfg = OmegaConf.to_container(compose(["method=pdrop", "budget=64"]), resolve=True)
    assert cfg["method"]["available"] is True
    m = build_method("pdrop", budget=64, **cfg["method"]["params"])
    assert isinstance(m, PyramidDrop) and m.stage == "llm" and m.needs_attention_weights
    assert (m.layer_list, m.lam, m.positions) == (None, None, "renumber")
    req = m.attention_request(8)
    assert (req.layer, req.rows, req.pre_drop) == (8, "last", True)


def test_table_lambdas_solve_their_budgets():
    """Every [derived]/[issue] λ of the table is the solution of its budget's equation (±0.005) and its
    schedule averages the budget within 1 %."""
    for (family, budget), (layers, lam, ref_n, _src) in PDROP_TABLE.items():
        depth = 28 if family == "qwen25vl" else 32
        f = budget if isinstance(budget, float) else budget / (2880 if family == "llava_next" else ref_n)
        assert abs(solve_lambda(f, layers, depth) - lam) < 0.005, (family, budget)
        assert abs(schedule_average(layers, lam, depth) - f) < 0.01 * f, (family, budget)


def test_official_default_schedule_counts_at_official_layers():
    """[8, 16, 24] with ratios 0.5 / 0.25 / 0.125 of N: 576 -> 288 -> 144 -> 72 (average 270)."""
    a = fake_adapter()
    m = PyramidDrop(budget=270, layer_list=list(OFFICIAL_LAYERS), lam=OFFICIAL_LAMBDA)
    m.check_model_config(OmegaConf.to_container(compose(["model=llava15"]).model, resolve=True))
    assert m.model_layers(model_facts(a)) == (8, 16, 24)
    plan = m.plan(a, 576)
    assert plan == [576] * 8 + [288] * 8 + [144] * 8 + [72] * 8
    assert sum(plan) / 32 == 270


@pytest.mark.parametrize(
    "family,layers,budget,n,depth,expected",
    [
        ("llava15", [2, 8, 16], 192, 576, 32, [322, 180, 101]),
        ("llava15", [2, 8, 16], 128, 576, 32, [241, 101, 42]),
        ("llava15", [2, 8, 16], 64, 576, 32, [109, 20, 3]),  # author λ = 0.19
        ("llava_next", [2, 8, 16], 640, 2928, 32, stage_counts(2928, 0.42, 3)),
        ("llava_next", [1, 4, 8], 160, 2928, 32, [512, 89, 15]),
        ("qwen25vl", [2, 8, 16], 0.1, 1000, 28, [113, 12, 1]),
        ("video_llava", [2, 8, 16], 256, 2056, 32, [472, 108, 25]),
    ],
)
def test_per_budget_schedules_on_7b_depth(family, layers, budget, n, depth, expected):
    """The 32-/28-layer plans: all N before the first stage layer, then ``int(N·λ^s)`` from each stage layer."""
    a = fake_adapter(family, depth, max_tokens=n)
    m = PyramidDrop(budget=budget)
    assert list(m.model_layers(model_facts(a))) == layers
    assert m.plan(a, n) == expand(n, layers, expected, depth)


def test_other_budgets_get_solved_lambda_and_default_layers():
    a = fake_adapter()
    m = PyramidDrop(budget=96)  # no table row
    lam = m.sample_lambda(model_facts(a), 576)
    assert abs(schedule_average((2, 8, 16), lam, 32) - 96 / 576) < 1e-9
    plan = m.plan(a, 576)
    assert abs(sum(plan) / 32 - 96) < 2  # int() truncation only
    nxt = fake_adapter("llava_next", max_tokens=2928)
    assert PyramidDrop(budget=150).model_layers(model_facts(nxt)) == (1, 4, 8)  # layer 2 too late for 5.2 %


def test_tiny_models_scale_the_stage_layers():
    tiny = fake_adapter(num_layers=4, tiny=True)
    m = PyramidDrop(budget=64)
    assert m.model_layers(model_facts(tiny)) == (1, 2, 3)
    assert m.plan(tiny, 576) == [576, 109, 20, 3]  # the 7B counts
    assert PyramidDrop(budget=270, layer_list=[8, 16, 24], lam=0.5).plan(tiny, 576) == [576, 288, 144, 72]


# ---------------------------------------------------------------------- the rule on crafted attention
def test_each_stage_keeps_the_top_last_row_head_mean_attention():
    g = torch.Generator().manual_seed(1)
    seq, heads = 120, 4
    vis = torch.arange(20, 100)  # N = 80
    m = PyramidDrop(budget=270, layer_list=[8, 16, 24], lam=0.5)
    with m(fake_adapter(max_tokens=80)):
        att = torch.rand(1, heads, 1, seq, generator=g)
        att[0, :, 0, :20] = 10.0  # text tokens are never candidates
        sel = m.select_llm_tokens(torch.zeros(1, seq, 8), [vis], layer_idx=8, attention=att)
        mean = att[0, :, 0].mean(0)
        expected = vis[mean[vis].argsort(descending=True)[:40]].sort().values
        assert sel.keep_positions.tolist() == [expected.tolist()]
        # stage 2 (after the drop the sequence is shorter): int(80 · 0.25) = 20 of the 40 present
        vis2 = torch.arange(20, 60)
        att2 = torch.rand(1, heads, 1, 80, generator=g)
        sel2 = m.select_llm_tokens(torch.zeros(1, 80, 8), [vis2], layer_idx=16, attention=att2)
        mean2 = att2[0, :, 0].mean(0)
        assert sel2.keep_positions.tolist() == [vis2[mean2[vis2].argsort(descending=True)[:20]].sort().values.tolist()]
        assert m.llm_keep_count(20, layer_idx=24) == 10


# ---------------------------------------------------------------------- probed rows vs eager, sdpa vs eager
def _spy(method):
    seen = []
    real = method.select_llm_tokens

    def spy(hidden_states, visual_positions, *, layer_idx, attention=None):
        sel = real(hidden_states, visual_positions, layer_idx=layer_idx, attention=attention)
        seen.append((layer_idx, attention.clone(), [v.clone() for v in visual_positions], sel.keep_positions.clone()))
        return sel

    method.select_llm_tokens = spy
    return seen


@pytest.mark.parametrize("model", MODELS)
def test_first_stage_row_is_layer_l1_eager_attention_on_the_full_input(model):
    """Stage 1 (no earlier drop): the probed row of layer ℓ_1 (its own norm, q/k, RoPE or mRoPE) equals
    eager ``output_attentions[ℓ_1]``'s last row of an unmodified forward, and the kept tokens are its
    head-mean top ``int(N·λ)``."""
    sdpa, eager = adapter_for(model), adapter_for(model, "eager")
    image = make_image(21, (64, 48) if model == "tiny_llava15" else (224, 224))
    budget = {"tiny_llava15": 128, "tiny_llava_next": 320, "tiny_qwen25vl": 0.2, "tiny_video_llava": 128}[model]
    m = PyramidDrop(budget=budget)
    seen = _spy(m)
    out = generate(sdpa, [image], Q, GEN, m)
    assert out.layer_visual_tokens == out.planned_layer_visual_tokens
    if model == "tiny_llava15":
        assert out.layer_visual_tokens == [576, 241, 101, 42]
    inputs = eager.prepare_inputs([image], eager.build_prompt(Q))
    with torch.inference_mode():
        ref = eager.model(**inputs, output_attentions=True).attentions[1][:, :, -1:, :].float()
    layer, rows, vis, kept = seen[0]
    assert layer == 1 and [s[0] for s in seen] == [1, 2, 3]
    torch.testing.assert_close(rows, ref, atol=1e-5, rtol=1e-4)
    top = ref[0, :, -1].mean(0)[vis[0]].topk(out.layer_visual_tokens[1]).indices.sort().values
    assert kept[0].tolist() == vis[0][top].tolist()
    backends = out.attention_backends["llm_layers"]
    assert backends[0] == "sdpa" and all("pre-drop input recomputed" in b for b in backends[1:])


@pytest.mark.parametrize("model", MODELS)
def test_sdpa_selects_what_eager_selects(model):
    visuals = [make_image(22, (224, 224))]
    budget = {"tiny_llava15": 192, "tiny_llava_next": 320, "tiny_qwen25vl": 0.2, "tiny_video_llava": 128}[model]
    outs, seen = [], []
    for attn in ("sdpa", "eager"):
        m = PyramidDrop(budget=budget)
        seen.append(_spy(m))
        outs.append(generate(adapter_for(model, attn), visuals, Q, GEN, m))
    assert len(seen[0]) == len(seen[1]) == 3
    for (la, ra, _, ka), (lb, rb, _, kb) in zip(*seen):
        assert torch.equal(ka, kb)
        assert la == lb
        torch.testing.assert_close(ra, rb, atol=1e-5, rtol=1e-4)
    assert outs[0].kept_indices == outs[1].kept_indices
    assert outs[0].layer_visual_tokens == outs[0].planned_layer_visual_tokens == outs[1].layer_visual_tokens


# ---------------------------------------------------------------------- all four tiny models
BUDGETS = {
    "tiny_llava15": [192, 128, 64],
    "tiny_llava_next": [320, 160],  # 640 exceeds the tiny NeXT's largest span (336)
    "tiny_qwen25vl": [0.2, 0.1],
    "tiny_video_llava": [256],
}


#: Per-layer visual tokens of the per-budget schedules on the tiny models (stage layers scaled to 1, 2, 3).
EXACT = {("tiny_llava15", 192): [576, 322, 180, 101], ("tiny_llava15", 128): [576, 241, 101, 42],
         ("tiny_llava15", 64): [576, 109, 20, 3], ("tiny_video_llava", 256): [2056, 472, 108, 25]}


@pytest.mark.parametrize("model", MODELS)
def test_every_paper_budget_plan_equals_measured_hooks_removed_deterministic(model):
    adapter = adapter_for(model)
    visuals = [clip()] if model == "tiny_video_llava" else [make_image(23, (224, 224))]
    base = generate(adapter, visuals, Q, {**GEN, "output_logits": True})
    before = count_hooks(adapter.model)
    facts = model_facts(adapter)
    for budget in BUDGETS[model]:
        m = PyramidDrop(budget=budget)
        out = generate(adapter, visuals, Q, GEN, m)
        n = out.visual_tokens_llm
        lam = m.sample_lambda(facts, n, adapter)
        assert m.model_layers(facts) == (1, 2, 3)
        assert out.layer_visual_tokens == out.planned_layer_visual_tokens == [n, *stage_counts(n, lam, 3)], budget
        if (model, budget) in EXACT:
            assert out.layer_visual_tokens == EXACT[model, budget]
        again = generate(adapter, visuals, Q, GEN, PyramidDrop(budget=budget))
        assert (again.output_ids, again.kept_indices) == (out.output_ids, out.kept_indices)
        assert count_hooks(adapter.model) == before and not m.is_active
    after = generate(adapter, visuals, Q, {**GEN, "output_logits": True})
    assert after.output_ids == base.output_ids
    assert all(torch.equal(x, y) for x, y in zip(after.logits, base.logits))


def test_positions_renumbered_or_original():
    """Official renumbering vs original positions: same kept tokens at stage 1, different logits; the
    KV cache holds the planned tokens either way; Qwen2.5-VL keeps its mRoPE positions."""
    adapter = adapter_for("tiny_llava15")
    image = [make_image(24, (64, 48))]
    gen = {"max_new_tokens": 3, "output_logits": True}
    outs = {}
    for pos in ("renumber", "original"):
        m = PyramidDrop(budget=192, positions=pos)
        seen = _spy(m)
        outs[pos] = (generate(adapter, image, Q, gen, m), seen)
        with m(adapter):
            assert m.renumber_positions == (pos == "renumber")
    (a, sa), (b, sb) = outs["renumber"], outs["original"]
    torch.testing.assert_close(sa[0][1], sb[0][1])  # stage 1 sees the unmodified sequence
    assert not torch.allclose(a.logits[0], b.logits[0], atol=1e-5)
    for o in (a, b):
        text = o.prompt_tokens - o.visual_tokens_llm
        assert o.kv_cache_tokens == [text + v + len(o.output_ids) - 1 for v in o.planned_layer_visual_tokens]
    with PyramidDrop(budget=0.2)(adapter_for("tiny_qwen25vl")) as q:
        assert q.renumber_positions is False


# ---------------------------------------------------------------------- bad configurations
@pytest.mark.parametrize(
    "overrides,match",
    [
        (["model=llava15", "method.params.layer_list=[8,16,24]", "budget=64"], r"layer_list \[8, 16, 24\] cannot reach 11.1 %"),
        (["model=llava15", "method.params.layer_list=[8,16,24]", "method.params.lam=0.5", "budget=64"],
         r"averages 46.9 % .* not the budget 64"),
        (["model=llava15", "method.params.layer_list=[2,8,32]", "budget=64"], r"has layer 32, not usable on model 'llava15'"),
        (["model=tiny_llava15", "method.params.layer_list=[2,8,40]", "budget=64"], r"has layer 40, .*32-layer 7B model"),
        (["model=tiny_llava15", "method.params.lam=0", "budget=64"], r"lam 0 is outside \(0, 1\]"),
        (["model=tiny_llava15", "method.params.lam=1.5", "budget=64"], r"lam 1.5 is outside \(0, 1\]"),
        (["model=tiny_llava15", "method.params.layer_list=[8,2]", "budget=64"], r"must be increasing"),
        (["model=tiny_llava15", "method.params.positions=shifted", "budget=64"], r"positions 'shifted'"),
        (["model=qwen25vl", "method.params.layer_list=[4,8,16]", "budget=0.1"], r"cannot reach 10.0 %.*4 of 28"),
    ],
)
def test_bad_configuration_refused_before_loading(tmp_path, monkeypatch, overrides, match):
    import apet_bench.runner as runner

    def no_load(*a, **k):  # pragma: no cover - must not be reached
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(runner, "_load_adapter", no_load)
    cfg = compose(["method=pdrop", "benchmark=demo", f"results_dir={tmp_path / 'results'}",
                   f"cache_dir={tmp_path / 'cache'}", *overrides])
    with pytest.raises(ValueError, match=match) as err:
        runner.execute(cfg)
    assert "\n" not in str(err.value)


def test_budget_error_type_for_unreachable_schedule():
    with pytest.raises(BudgetError):
        solve_lambda(0.05, (2, 8, 16), 32)


@pytest.mark.parametrize("method_name", ["pdrop", "fastv"])
def test_no_extra_full_attention_is_run(monkeypatch, method_name):
    """A one-token generate (prefill only): each decoder layer calls sdpa exactly once and eager never;
    the rows come from the row capture (PDrop's probe skips the backend), not from a second attention pass."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.llama import modeling_llama

    adapter = adapter_for("tiny_llava15")
    llm_attn = {id(layer.self_attn) for layer in adapter.decoder_layers}
    calls = {"sdpa": 0, "eager": 0}
    sdpa, eager = ALL_ATTENTION_FUNCTIONS["sdpa"], modeling_llama.eager_attention_forward

    def counting(name, fn):
        def wrapped(module, *args, **kwargs):
            calls[name] += id(module) in llm_attn
            return fn(module, *args, **kwargs)

        return wrapped

    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS, "sdpa", counting("sdpa", sdpa))
    monkeypatch.setattr(modeling_llama, "eager_attention_forward", counting("eager", eager))
    out = generate(adapter, [make_image(25)], Q, {"max_new_tokens": 1}, build_method(method_name, budget=64))
    assert out.layer_visual_tokens == out.planned_layer_visual_tokens and out.layer_visual_tokens[-1] < 576
    assert calls == {"sdpa": 4, "eager": 0}


@pytest.mark.parametrize("positions", ["renumber", "original"])
def test_three_stage_positions_cached_equals_uncached(positions):
    """PDrop's schedule with a deterministic selection (every stage keeps the first ``int(N·λ^s)`` visual
    tokens): cached decoding (renumbered: positions shifted by the removed tokens at each stage) equals
    ``use_cache=False`` generation, where every step re-runs the renumbered prefill."""
    from dataclasses import dataclass

    from test_stage2 import assert_logits_close

    from apet_bench.methods.base import LLMSelection

    @dataclass
    class FirstK(PyramidDrop):
        def select_llm_tokens(self, hidden_states, visual_positions, *, layer_idx, attention=None):
            k = self.llm_keep_count(int(visual_positions[0].numel()), layer_idx=layer_idx)
            return LLMSelection(torch.stack([v[:k] for v in visual_positions]))

    adapter = adapter_for("tiny_llava15")
    gen = {"max_new_tokens": 3, "output_logits": True}
    m = FirstK(budget=128, positions=positions)
    cached = generate(adapter, [make_image(26)], Q, gen, m)
    uncached = generate(adapter, [make_image(26)], Q, {**gen, "use_cache": False}, m)
    assert cached.layer_visual_tokens == [576, 241, 101, 42]
    assert cached.output_ids == uncached.output_ids
    assert_logits_close(cached.logits, uncached.logits)


def test_llava_next_real_geometry_paper_budgets_fastv_and_pdrop():
    """Tiny NeXT with the real 336 px / 14 geometry (672 x 672 -> 2928 tokens, the paper's budgets fit):
    FastV K=2 for 640/320 and K=1 for 160 (equivalent average on the whole span), PDrop's NeXT table."""
    from apet_bench.baselines.fastv import FastV, fastv_keep_count

    cfg = compose(["model=tiny_llava_next", "+model.tiny_config.image_size=336", "model.visual_tokens=2928"])
    adapter = load_model(OmegaConf.to_container(cfg.model, resolve=True))
    image = [make_image(27, (672, 672))]
    facts = model_facts(adapter)
    for budget, k_ref, keep in ((640, 2, round((32 * 640 - 2 * 2928) / 30)), (320, 2, round((32 * 320 - 2 * 2928) / 30)),
                                (160, 1, round((32 * 160 - 2928) / 31))):
        m = FastV(budget=budget)
        assert m.schedule_layer(facts) == k_ref
        out = generate(adapter, image, Q, GEN, m)
        assert out.visual_tokens_in == 2928 and keep == fastv_keep_count(budget, 2928, k_ref, 32, "equivalent_average")
        assert out.layer_visual_tokens == out.planned_layer_visual_tokens == [2928, keep, keep, keep]
    for budget, lam in ((640, 0.42), (320, 0.19), (160, 0.175)):
        out = generate(adapter, image, Q, GEN, PyramidDrop(budget=budget))
        assert out.layer_visual_tokens == out.planned_layer_visual_tokens == [2928, *stage_counts(2928, lam, 3)]
