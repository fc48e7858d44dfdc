"""SparseVLM (``method=sparsevlm``, baselines/sparsevlm.py, docs/methods/sparsevlm.md).

Schedules: the official per-budget counts at the official layers (full-size numbers checked against
docs/methods/sparsevlm.md on a fake 32-layer model; plan == measured on the four tiny models). Crafted inputs:
text raters, rater scores, DPC-KNN recycling, one whole pruning step with known scores. Fidelity: a
hand-written loop of the official v1.5 algorithm (full eager attention, physical re-layout of the
sequence, contiguous positions) gives the same first-token logits as the method on the tiny LLaVA-1.5.
sdpa == eager selections; bad configurations refused before loading; the real NeXT geometry through the
conformance kit (the generic end-to-end checks are tests/test_conformance.py's).
"""

from __future__ import annotations

import importlib
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import make_image
from test_model_matrix import get_adapter

from apet_bench.budget import BudgetError
from apet_bench.config import compose
from apet_bench.methods import available_methods, build_method
from apet_bench.pipeline import generate

S = importlib.import_module("apet_bench.baselines.sparsevlm")
GEN = {"max_new_tokens": 2}
Q = "What is in the image?"


def own_hooks(adapter) -> int:
    """Forward (pre-)hooks left on ``adapter.model`` by methods / surgery / captures: every hook defined in
    ``apet_bench`` except the adapter's own permanent ones (e.g. Qwen2.5-VL's ``_check_positions``);
    transformers' lazily installed output-capturing hooks are not counted either."""
    n = 0
    for mod in adapter.model.modules():
        for fn in [*mod._forward_hooks.values(), *mod._forward_pre_hooks.values()]:
            where = getattr(fn, "__module__", "") or ""
            n += where.startswith("apet_bench") and where != type(adapter).__module__
    return n


def fake(family: str, num_layers: int):
    return SimpleNamespace(family=family, num_layers=num_layers, position_encoding="rope-1d")


# ---------------------------------------------------------------------- registration and config
def test_registered_and_yaml_builds():
    from omegaconf import OmegaConf

    assert "sparsevlm" in available_methods()
    cfg = OmegaConf.to_container(compose(["method=sparsevlm", "budget=192"]), resolve=True)
    assert cfg["method"]["available"] is True
    m = build_method("sparsevlm", budget=192, **cfg["method"]["params"])
    assert isinstance(m, S.SparseVLMCompressor)
    assert m.stage == "llm" and m.needs_attention_weights and m.recycling and m.version == "1.5"


# ---------------------------------------------------------------------- official schedules (full size)
@pytest.mark.parametrize("budget,counts", [(192, (300, 200, 110)), (128, (303, 110, 36)),
                                           (96, (238, 48, 26)), (64, (66, 30, 17))])
def test_full_size_llava15_schedule_is_official(budget, counts):
    """docs/methods/sparsevlm.md: layers 2/6/15 of 32; without recycling the counts are the table's exactly."""
    m = build_method("sparsevlm", budget=budget, recycle=False)
    plan = m.plan(fake("llava15", 32), 576)
    assert plan == [576] * 3 + [counts[0]] * 4 + [counts[1]] * 9 + [counts[2]] * 16
    sched = S.resolve_schedule("llava15", 32, budget)
    assert sched.layers == (2, 6, 15) and sched.source == "code"


@pytest.mark.parametrize("budget,counts", [(192, (300, 200, 118)), (128, (238, 108, 60)),
                                           (96, (246, 54, 28)), (64, (66, 34, 20))])
def test_full_size_v20_schedule_is_official(budget, counts):
    """docs/methods/sparsevlm.md, v2.0 column: no recycling, so the plan holds the table's counts exactly."""
    m = build_method("sparsevlm", budget=budget, version="2.0")
    assert not m.recycling and not m.renumber_positions
    assert m.plan(fake("llava15", 32), 576) == [576] * 3 + [counts[0]] * 4 + [counts[1]] * 9 + [counts[2]] * 16


def test_full_size_recycling_counts_and_official_accounting():
    """v1.5 adds int(int(0.3 p) + 1) / 10) + 1 clusters per pruning: 192 -> 309 / 204 / 113 (issue #33's ~204).

    Hand arithmetic: 576-300 = 276 pruned -> 83 recycled -> 9 clusters; 309-200 = 109 -> 33 -> 4;
    204-110 = 94 -> 29 -> 3. Official "Equal Tokens" (output counts) = 192.03, true input mean = 206.5.
    """
    plan = build_method("sparsevlm", budget=192).plan(fake("llava15", 32), 576)
    assert plan == [576] * 3 + [309] * 4 + [204] * 9 + [113] * 16
    assert sum(plan) / 32 == 206.5
    assert S.official_equal_tokens(plan) == pytest.approx(192.03125)
    for budget in (128, 96, 64):  # the official log lands within one token of each budget
        p = build_method("sparsevlm", budget=budget).plan(fake("llava15", 32), 576)
        assert budget <= S.official_equal_tokens(p) < budget + 1 < sum(p) / 32
    assert [S.recycled_clusters(p) for p in (0, 1, 2, 276, 109, 94)] == [0, 1, 1, 9, 4, 3]


def test_full_size_other_models():
    # LLaVA-NeXT 640 / 320 at N = 2880: the LLaVA-1.5 128 / 64 schedules x 5 (docs/methods/sparsevlm.md [derived])
    m = build_method("sparsevlm", budget=640, recycle=False)
    plan = m.plan(fake("llava_next", 32), 2880)
    assert plan == [2880] * 3 + [1515] * 4 + [550] * 9 + [180] * 16
    assert build_method("sparsevlm", budget=320, recycle=False).plan(fake("llava_next", 32), 2880)[-1] == 85
    # Qwen2.5-VL-7B (28 layers): 20 % prunes at 2/5/13, 10 % at 1/5/13; the true mean is the budget
    for ratio, first in ((0.2, 3), (0.1, 2)):
        plan = build_method("sparsevlm", budget=ratio, recycle=False).plan(fake("qwen25vl", 28), 1000)
        assert plan[:first] == [1000] * first and plan[first] < 1000
        assert sum(plan) / 28 == pytest.approx(ratio * 1000, rel=0.01)
    assert S.resolve_schedule("qwen25vl", 28, 0.2).layers == (2, 5, 13)
    assert S.resolve_schedule("qwen25vl", 28, 0.1).layers == (1, 5, 13)
    # Video-LLaVA: one pruning at layer 1 keeping 256 of 2048 (+ recycling of 1792 -> 54 clusters)
    plan = build_method("sparsevlm", budget=256).plan(fake("video_llava", 32), 2048)
    assert plan[:2] == [2048, 2048] and plan[2:] == [256 + 54] * 30


@pytest.mark.parametrize("family,num_layers,n,budget", [
    ("llava15", 32, 576, 192), ("llava15", 32, 576, 128), ("llava15", 32, 576, 64),
    ("llava_next", 32, 2880, 640), ("llava_next", 32, 2880, 320), ("qwen25vl", 28, 1000, 0.2),
    ("qwen25vl", 28, 1000, 0.1), ("video_llava", 32, 2048, 256)])
def test_layer_input_accounting_lands_on_the_budget(family, num_layers, n, budget):
    """accounting=layer_input: the true layer-input mean (recycled included) is the largest <= budget."""
    from dataclasses import replace

    m = build_method("sparsevlm", budget=budget, accounting="layer_input")
    plan = m.plan(fake(family, num_layers), n)
    target = budget if isinstance(budget, int) else budget * n
    assert sum(plan) / num_layers <= target
    fitted = m.fitted(family, num_layers, n)
    bigger = replace(fitted, scale=fitted.scale + 1e-9).plan(num_layers, n, recycle=True)
    assert sum(bigger) / num_layers > target  # any larger schedule of that shape goes over
    official = build_method("sparsevlm", budget=budget).plan(fake(family, num_layers), n)
    assert plan[: fitted.layers[0] + 1] == official[: fitted.layers[0] + 1]  # same layers, same shape
    if family == "llava15" and budget == 192:
        assert sorted(set(plan), reverse=True) == [576, 281, 184, 102]


def test_layer_input_accounting_on_tiny_llava15():
    a = get_adapter("tiny_llava15", "sdpa")
    m = build_method("sparsevlm", budget=192, accounting="layer_input")
    out = generate(a, [make_image(1)], Q, GEN, m)
    assert out.layer_visual_tokens == out.planned_layer_visual_tokens
    assert out.mean_layer_visual_tokens <= 192 < build_method("sparsevlm", budget=192).plan(a, 576)[1]


def test_layer_mapping():
    assert S.scale_layers((2, 6, 15), 32, 32) == (2, 6, 15)
    assert S.scale_layers((2, 6, 15), 28, 32) == (2, 5, 13)
    assert S.scale_layers((2, 6, 15), 4, 32) == (0, 1, 2)
    assert S.scale_layers((1,), 4, 32) == (0,)
    with pytest.raises(ValueError, match="do not fit a model with 3 decoder layers"):
        S.scale_layers((2, 6, 15), 3, 32)


# ---------------------------------------------------------------------- crafted inputs
def test_text_raters_are_the_above_mean_relevant_text_tokens():
    """Text tokens 1 and 3 align with every visual token; 0, 2, 4 are orthogonal -> raters {1, 3}."""
    e = torch.eye(8)
    visual = torch.stack([e[0] * 5 + e[1] * 0.1 * i for i in range(6)])  # all along axis 0
    text = torch.stack([e[2], e[0], e[3], e[0] * 0.9, e[4]])
    assert S.select_text_raters(visual, text).tolist() == [1, 3]
    # swapping the text order moves the raters with it; equal relevance gives no rater
    assert S.select_text_raters(visual, text[[1, 0, 2, 4, 3]]).tolist() == [0, 4]
    assert S.select_text_raters(visual, torch.stack([e[0], e[0]])).numel() == 0


def test_rater_scores_average_heads_then_raters_on_visual_columns():
    att = torch.zeros(2, 3, 10)  # heads, rows, seq
    att[0, 0, 4], att[1, 0, 4] = 1.0, 0.0  # head mean 0.5 on column 4 for row 0
    att[:, 2, 6] = 0.8  # row 2 -> column 6
    att[:, 1, 5] = 1.0  # row 1 is not a rater: ignored
    s = S.rater_scores(att, torch.tensor([0, 2]), torch.tensor([4, 5, 6]))
    torch.testing.assert_close(s, torch.tensor([0.25, 0.0, 0.4]))


def test_dpc_knn_merge_recovers_separated_clusters():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(7, 16, generator=g) * 0.01 + 5.0
    b = torch.randn(5, 16, generator=g) * 0.01 - 5.0
    x = torch.cat([a, b])[torch.randperm(12, generator=g)]
    merged, centres, assign = S.dpc_knn_merge(x, 2, generator=torch.Generator().manual_seed(1))
    groups = [set(torch.nonzero(assign == i).flatten().tolist()) for i in range(2)]
    side = x[:, 0] > 0
    assert {frozenset(gr) for gr in groups} == {frozenset(torch.nonzero(side).flatten().tolist()),
                                                frozenset(torch.nonzero(~side).flatten().tolist())}
    for i in range(2):
        members = x[assign == i]
        torch.testing.assert_close(merged[i], members.sum(0) / (members.shape[0] + 1e-6))
        assert int(assign[centres[i]]) == i
    with pytest.raises(ValueError, match="cluster_num 13"):
        S.dpc_knn_merge(x, 13)


def _attached(budget, family="llava15", num_layers=4, **params):
    m = build_method("sparsevlm", budget=budget, **params)
    m.reset()
    m._adapter = SimpleNamespace(family=family, num_layers=num_layers,
                                 position_encoding="mrope-3d" if family == "qwen25vl" else "rope-1d")
    return m


@pytest.mark.parametrize("placement", ["after_kept", "centre"])
def test_one_pruning_step_keeps_top_scored_and_recycles(placement):
    """A 40-token visual span at columns 3..42 with known scores, schedule [10]: the 10 top-scored stay in
    order, the top int(0.3 * 30) + 1 = 10 pruned ones become int(10 / 10) + 1 = 2 DPC-KNN clusters."""
    n, hid = 40, 8
    pos = torch.arange(3, 3 + n)
    seq = 3 + n + 4  # 3 prefix + visual + 4 text
    hidden = torch.randn(1, seq, hid, generator=torch.Generator().manual_seed(0))
    score = torch.randperm(n, generator=torch.Generator().manual_seed(1)).float()  # distinct scores
    att = torch.zeros(1, 2, 4, seq)
    att[0, :, :, pos] = score / score.sum()  # every text row, every head -> same distribution
    m = _attached(64, layers=[0], schedule=[10], placement=placement)
    m._raters, m._num_text, m._n0 = torch.tensor([1, 3]), 4, n
    sel = m.select_llm_tokens(hidden, [pos], layer_idx=1, attention=att)
    top = pos[torch.topk(score, 10).indices].sort().values
    rec = m.last_record[0]
    assert rec["kept"].tolist() == top.tolist()
    pruned = torch.tensor([p for p in pos.tolist() if p not in set(top.tolist())])
    recycled = pruned[torch.topk(score[pruned - 3], 10).indices]
    assert rec["recycled"].tolist() == recycled.tolist()
    merged, centres, _ = S.dpc_knn_merge(hidden[0, recycled], 2, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(rec["merged"], merged)
    kp, hs = sel.keep_positions[0], sel.hidden_states[0]
    assert kp.numel() == 12 and hs.shape == (12, hid)
    if placement == "centre":  # kept tokens in their slots, each cluster at its centre's column
        assert kp[:10].tolist() == top.tolist() and kp[10:].tolist() == recycled[centres].tolist()
        torch.testing.assert_close(hs[:10], hidden[0, top])
        torch.testing.assert_close(hs[10:], merged)
    else:  # official order: in slot order, the 10 kept tokens then the 2 clusters
        assert kp.tolist() == sorted(kp.tolist())
        torch.testing.assert_close(hs, torch.cat([hidden[0, top], merged]))
        if int(top.max()) < int(pruned[-2]):  # slots = kept + the last 2 pruned columns
            assert kp[:10].tolist() == top.tolist() and kp[10:].tolist() == pruned[-2:].tolist()


def test_no_recycling_keeps_schedule_only():
    n = 30
    pos = torch.arange(2, 2 + n)
    hidden = torch.randn(1, 2 + n + 3, 4)
    att = torch.rand(1, 2, 3, 2 + n + 3)
    m = _attached(64, layers=[0], schedule=[7], recycle=False)
    m._raters, m._num_text, m._n0 = torch.tensor([0, 2]), 3, n
    sel = m.select_llm_tokens(hidden, [pos], layer_idx=1, attention=att)
    s = att[0][:, [0, 2]][:, :, pos].mean(0).mean(0)
    assert sel.hidden_states is None
    assert sel.keep_positions[0].tolist() == pos[torch.topk(s, 7).indices].sort().values.tolist()


def test_rank_keep_rule_keeps_rank_of_rater_attention():
    """keep_rule=rank (video branch): raters' rows spanning a 2-D space over the visual columns -> keep 2."""
    n = 30
    pos = torch.arange(2, 2 + n)
    seq = 2 + n + 4
    hidden = torch.randn(1, seq, 6, generator=torch.Generator().manual_seed(0))
    a, b = torch.rand(n, generator=torch.Generator().manual_seed(1)), torch.rand(n, generator=torch.Generator().manual_seed(2))
    att = torch.zeros(1, 3, 4, seq)
    for row, (x, y) in enumerate([(1.0, 0.0), (0.0, 1.0), (0.5, 0.5), (0.2, 0.8)]):  # rank 2
        att[0, :, row, pos] = x * a + y * b
    m = _attached(256, family="video_llava", keep_rule="rank")
    m._raters, m._num_text, m._n0 = torch.tensor([0, 1, 2, 3]), 4, n
    sel = m.select_llm_tokens(hidden, [pos], layer_idx=1, attention=att)
    scores = (a + b + 0.5 * (a + b) + 0.2 * a + 0.8 * b) / 4
    assert m.last_record[0]["kept"].tolist() == pos[torch.topk(scores, 2).indices].sort().values.tolist()
    assert sel.num_tokens == 2 + S.recycled_clusters(n - 2)
    assert m.plan(fake("video_llava", 4), n) == [n, 2 + S.recycled_clusters(n - 2)] + [2 + S.recycled_clusters(n - 2)] * 2
    # full rank (>= n) keeps everything, nothing recycled
    m2 = _attached(256, family="video_llava", keep_rule="rank")
    m2._raters, m2._num_text, m2._n0 = torch.arange(4), 4, 3
    att2 = torch.zeros(1, 1, 4, 9)
    att2[0, 0, :3, 2:5] = torch.eye(3)
    sel2 = m2.select_llm_tokens(torch.randn(1, 9, 6), [torch.arange(2, 5)], layer_idx=1, attention=att2)
    assert sel2.keep_positions[0].tolist() == [2, 3, 4] and sel2.hidden_states is None


def test_rank_keep_rule_on_tiny_video_llava():
    a = get_adapter("tiny_video_llava", "sdpa")
    m = build_method("sparsevlm", budget=256, keep_rule="rank")
    out = generate(a, TINY["tiny_video_llava"][1](), Q, GEN, m)
    assert out.layer_visual_tokens == out.planned_layer_visual_tokens
    k = len(m.last_record[0]["kept"])
    assert 1 <= k <= int(m._raters.numel()) and out.layer_visual_tokens[1] == k + S.recycled_clusters(2056 - k)


# ---------------------------------------------------------------------- fidelity to the official loop
def _official_reference_logits(adapter, image, question, budget, seed, version="1.5"):
    """The official prefill re-written as a plain loop (modelling_sparse_llama.py, main): full eager attention
    in every layer, raters on the input embeddings, each pruning layer's output physically re-laid out.
    v1.5: recycled clusters inserted after the kept visual tokens, positions 0..L'-1. v2.0: attention divided
    by q kᵀ/√d of RoPE-rotated all-ones q, k (as the official code builds it), the round(14 H / 32) heads with
    the largest rater->visual sum, no recycling, original position ids. Returns the last token's logits."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    lm = adapter.model.model.language_model
    inputs = adapter.prepare_inputs([image], adapter.build_prompt(question, num_images=1))
    grab = {}

    def pre(mod, args, kwargs):
        grab.setdefault("x", (args[0] if args else kwargs["hidden_states"]).clone())

    h = adapter.decoder_layers[0].register_forward_pre_hook(pre, with_kwargs=True)
    with torch.inference_mode():
        adapter.model(**inputs)
    h.remove()
    x = grab["x"]
    vis = adapter.visual_positions(inputs["input_ids"])[0]
    v0, nv = int(vis[0]), int(vis.numel())
    t0 = v0 + nv
    r = torch.softmax(x[0, v0:t0].float() @ x[0, t0:].float().T, dim=1).mean(0)
    raters = torch.nonzero(r > r.mean()).flatten() + t0  # fixed offset from the end of the visual span
    from_end = raters - x.shape[1]
    table = S.V20_SCHEDULES if version == "2.0" else S.V15_SCHEDULES
    sched, prune = table[budget], (0, 1, 2)
    gen = torch.Generator().manual_seed(seed)
    hidden = x
    positions = torch.arange(x.shape[1])[None]
    with torch.inference_mode():
        for i, layer in enumerate(adapter.decoder_layers):
            L = hidden.shape[1]
            pos_ids = positions if version == "2.0" else torch.arange(L)[None]
            pe = lm.rotary_emb(hidden, pos_ids)
            mask = torch.full((L, L), torch.finfo(torch.float32).min).triu(1)[None, None]
            seen = {}

            def grab_weights(mod, a, o, seen=seen):
                seen["w"] = o[1]  # eager returns the probabilities; returning None keeps the output

            hk = layer.self_attn.register_forward_hook(grab_weights)
            out = layer(hidden, attention_mask=mask, position_ids=pos_ids, position_embeddings=pe)
            hk.remove()
            hidden = out[0] if isinstance(out, tuple) else out
            if i not in prune:
                continue
            w = seen["w"][0].float()  # (H, L, L)
            rows = from_end + L
            if version == "2.0":
                n_heads, hd = w.shape[0], layer.self_attn.head_dim
                ones = torch.ones(1, n_heads, L, hd)
                cos, sin = lm.rotary_emb(ones, pos_ids)
                q, k_ = apply_rotary_pos_emb(ones, ones, cos, sin)
                w = w / (q @ k_.transpose(2, 3) / hd**0.5)[0]
                mass = w[:, rows][:, :, v0:v0 + nv].sum((1, 2))
                w = w[torch.topk(mass, max(1, round(14 * n_heads / 32))).indices]
            rel = w.mean(0)[rows][:, v0:v0 + nv].mean(0)
            k = min(sched[prune.index(i)], nv - 1)
            keep = torch.zeros(nv, dtype=torch.bool)
            keep[torch.topk(rel, k).indices] = True
            kept = torch.nonzero(keep).flatten() + v0
            if version == "2.0":
                cols = torch.cat([torch.arange(v0), kept, torch.arange(v0 + nv, L)])
                hidden, positions, nv = hidden[:, cols], positions[:, cols], k
                continue
            pruned = torch.nonzero(~keep).flatten()
            m = int(pruned.numel() * 0.3) + 1
            rec = pruned[torch.topk(rel[pruned], m).indices]
            c = int(m / 10) + 1
            merged, _, _ = S.dpc_knn_merge(hidden[0, v0 + rec], c, generator=gen)
            hidden = torch.cat([hidden[:, :v0], hidden[:, kept], merged[None], hidden[:, v0 + nv:]], dim=1)
            nv = k + c
        return adapter.model.lm_head(lm.norm(hidden)[:, -1]).float()


@pytest.mark.parametrize("version,budget", [("1.5", 192), ("1.5", 64), ("2.0", 128)])
def test_matches_official_loop_on_tiny_llava15(version, budget):
    """Prefill of the method (row capture + stage-2 surgery + replacement hidden states + renumbering) ==
    the official algorithm run naively; first-token logits within 1e-4 (eager weights, fp32)."""
    adapter = get_adapter("tiny_llava15", "eager")
    image = make_image(5)
    ref = _official_reference_logits(adapter, image, Q, budget, seed=3, version=version)
    m = build_method("sparsevlm", budget=budget, seed=3, version=version)
    out = generate(adapter, [image], Q, {"max_new_tokens": 1, "output_logits": True}, m)
    torch.testing.assert_close(out.logits[0].float(), ref, atol=1e-4, rtol=1e-4)
    # the check can fail: the other version's choices give other logits
    other = generate(adapter, [image], Q, {"max_new_tokens": 1, "output_logits": True},
                             build_method("sparsevlm", budget=budget, seed=3,
                                          version="2.0" if version == "1.5" else "1.5"))
    assert not torch.allclose(other.logits[0].float(), ref, atol=1e-4)


def test_rope_gravity_closed_form_equals_rotated_ones():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    adapter = get_adapter("tiny_llava15", "sdpa")
    rot = adapter.model.model.language_model.rotary_emb
    pos = torch.tensor([[0, 3, 4, 9, 40, 41, 700]])
    hd = 2 * rot.inv_freq.numel()
    ones = torch.ones(1, 1, pos.shape[1], hd)
    cos, sin = rot(ones, pos)
    q, k = apply_rotary_pos_emb(ones, ones, cos, sin)
    ref = (q @ k.transpose(2, 3))[0, 0] / hd**0.5
    torch.testing.assert_close(S.rope_gravity(pos[0], pos[0], rot.inv_freq), ref, atol=1e-4, rtol=1e-4)
    assert S.select_heads_by_mass(torch.tensor([[[0.1, 0.2]], [[0.9, 0.0]], [[0.3, 0.3]]]),
                                  torch.tensor([0]), torch.tensor([0, 1]), 2).tolist() == [1, 2]


# ---------------------------------------------------------------------- tiny models: plan == measured, sdpa == eager
TINY = {
    "tiny_llava15": ([192, 128, 64], lambda: [make_image(1, (64, 48))]),
    "tiny_qwen25vl": ([0.2, 0.1], lambda: [make_image(3, (224, 224))]),
    "tiny_video_llava": ([256], lambda: [(np.random.default_rng(3).random((8, 48, 64, 3)) * 255).astype("uint8")]),
    # 640/320/160 need the real geometry (end to end below); here the 128 schedule's ratio on <= 336 tokens
    "tiny_llava_next": ([128 / 576], lambda: [make_image(2, (224, 224))]),
}


@pytest.mark.parametrize("model", list(TINY))
def test_tiny_plan_equals_measured_and_sdpa_equals_eager(model):
    """Per paper budget: plan == measured, rows only at the pruning layers, hooks gone, sdpa and eager keep the
    same tokens (scores within 1e-5), the same seed repeats the output, and `none` is unchanged afterwards."""
    budgets, visuals = TINY[model]
    base = generate(get_adapter(model, "sdpa"), visuals(), Q, {**GEN, "output_logits": True})
    for budget in budgets:
        outs, recs = [], []
        for attn in ("sdpa", "eager"):
            a = get_adapter(model, attn)
            m = build_method("sparsevlm", budget=budget, seed=0)
            out = generate(a, visuals(), Q, GEN, m)
            assert own_hooks(a) == 0
            assert out.layer_visual_tokens == out.planned_layer_visual_tokens, (model, attn, budget)
            n = out.visual_tokens_llm
            assert out.layer_visual_tokens[0] == n and out.layer_visual_tokens[1] < n
            assert len(out.kept_indices[0]) == out.layer_visual_tokens[-1]  # one index per token kept at the end
            backends = out.attention_backends["llm_layers"]
            pruning = set(S.resolve_schedule(a.family, a.num_layers, budget).layers)
            for i, b in enumerate(backends):  # rows recomputed at the pruning layers only, the rest untouched
                assert b.startswith(attn) and (("rows" in b) == (i in pruning)), (i, b)
            outs.append(out)
            recs.append(m.last_record)
        assert outs[0].kept_indices == outs[1].kept_indices
        a = get_adapter(model, "sdpa")  # same seed -> same output; the model equals `none` afterwards
        again = generate(a, visuals(), Q, GEN, build_method("sparsevlm", budget=budget, seed=0))
        assert (again.output_ids, again.kept_indices) == (outs[0].output_ids, outs[0].kept_indices)
        after = generate(a, visuals(), Q, {**GEN, "output_logits": True})
        for x, y in zip(base.logits, after.logits):
            assert torch.equal(x, y)
        for r_s, r_e in zip(*recs):
            assert r_s["kept"].tolist() == r_e["kept"].tolist()
            torch.testing.assert_close(r_s["scores"], r_e["scores"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("model", ["tiny_llava15", "tiny_qwen25vl"])
def test_rater_rows_equal_eager_attention(model):
    """The recomputed rows at the first pruning layer equal eager ``output_attentions`` within 1e-5."""
    from test_stage2 import check_attention_rows_match_eager

    sdpa, eager = get_adapter(model, "sdpa"), get_adapter(model, "eager")
    image = TINY[model][1]()
    inputs = sdpa.prepare_inputs(image, sdpa.build_prompt(Q, num_images=1))
    m = build_method("sparsevlm", budget=TINY[model][0][0])
    with m(sdpa):
        sdpa.visual_context = __import__("apet_bench.models.base", fromlist=["VisualContext"]).VisualContext(sdpa, inputs)
        req = m.attention_request(1)
    assert req.layer == 0 and isinstance(req.rows, tuple) and req.rows[-1] == -1
    vis = sdpa.visual_positions(inputs["input_ids"])[0]
    assert len(req.rows) == inputs["input_ids"].shape[1] - 1 - int(vis[-1])
    check_attention_rows_match_eager(sdpa, eager, inputs, 0, req.rows)


def test_same_seed_same_output_and_model_restored():
    a = get_adapter("tiny_llava15", "sdpa")
    img = [make_image(4)]
    base = generate(a, img, Q, {"max_new_tokens": 3, "output_logits": True})
    outs = [generate(a, img, Q, {"max_new_tokens": 3}, build_method("sparsevlm", budget=128, seed=7)) for _ in range(2)]
    assert outs[0].output_ids == outs[1].output_ids and outs[0].kept_indices == outs[1].kept_indices
    after = generate(a, img, Q, {"max_new_tokens": 3, "output_logits": True})
    assert after.output_ids == base.output_ids
    for x, y in zip(base.logits, after.logits):
        assert torch.equal(x, y)


def test_batch_size_above_one_refused():
    m = _attached(64)
    with pytest.raises(ValueError, match="batch size 1"):
        m.select_llm_tokens(torch.zeros(2, 5, 4), [torch.arange(2), torch.arange(2)], layer_idx=1,
                            attention=torch.zeros(2, 1, 1, 5))


# ---------------------------------------------------------------------- bad configuration, before loading
@pytest.mark.parametrize(
    "overrides,match",
    [
        (["model=tiny_llava15", "budget=100"], r"no schedule for budget 100 \(schedules exist for 192, 128, 96, 64, 32"),
        (["model=tiny_llava_next", "budget=200"], r"no schedule for budget 200 .*960, 640, 480, 320, 160 tokens"),
        (["model=tiny_qwen25vl", "budget=0.3"], r"no schedule for budget 0.3 .*retention ratios 0.2, 0.1"),
        (["model=tiny_llava15", "budget=64", "method.params.layers=[2,6,15]"], r"layers \[2, 6, 15\] must be .* \[0, 2\]"),
        (["model=tiny_llava15", "budget=64", "method.params.schedule=[30,40,10]"], r"schedule \[30, 40, 10\] must be"),
        (["model=tiny_llava15", "budget=64", "method.params.schedule=[30,10]"], r"schedule \[30, 10\] has 2 counts"),
        (["model=tiny_llava15", "budget=64", "method.params.positions=sideways"], r"positions 'sideways'"),
        (["model=tiny_llava15", "budget=64", "method.params.recycle=maybe"], r"recycle 'maybe'"),
        (["model=tiny_llava15", "budget=64", "method.params.version=3.0"], r"version '3.0' is not one of"),
        (["model=tiny_qwen25vl", "budget=0.2", "method.params.version=2.0"], r"version 2.0 .* no mRoPE port"),
        (["model=llava_next", "budget=160", "method.params.accounting=layer_input"],
         r"cannot reach 160 visual tokens per layer: the first 3 of 32 layers carry all 2928 tokens"),
        (["model=tiny_llava15", "budget=64", "method.params.accounting=layer_input"],
         r"cannot reach 64 visual tokens per layer: the first 1 of 4 layers"),
        (["model=tiny_llava15", "budget=64", "method.params.accounting=equal"], r"accounting 'equal'"),
        (["model=tiny_llava15", "budget=64", "method.params.keep_rule=adaptive"], r"keep_rule 'adaptive'"),
    ],
)
def test_bad_configuration_refused_before_loading(tmp_path, monkeypatch, overrides, match):
    import apet_bench.runner as runner

    def no_load(*a, **k):  # pragma: no cover - must not be reached
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(runner, "_load_adapter", no_load)
    cfg = compose(["method=sparsevlm", "benchmark=demo", f"results_dir={tmp_path}", *overrides])
    with pytest.raises(ValueError, match=match) as err:
        runner.execute(cfg)
    assert "\n" not in str(err.value)


def test_full_size_bad_layers_refused():
    with pytest.raises(ValueError, match="layers \\[2, 6, 31\\] must be"):
        build_method("sparsevlm", budget=192, layers=[2, 6, 31]).check_model_config(
            {"name": "llava15", "family": "llava15", "num_layers": 32})
    with pytest.raises(BudgetError):
        build_method("sparsevlm", budget=None)
    build_method("sparsevlm", budget=192).check_model_config({"name": "llava15", "family": "llava15", "num_layers": 32})


# ---------------------------------------------------------------------- real NeXT geometry through the kit
def test_real_geometry_next_paper_budgets_conform(tmp_path):
    """Tiny NeXT with the real 336 px crops (up to 2928 tokens) at the paper budgets 640/320/160: the
    conformance kit's checks, one run through ``execute`` included (the suite runs the stock tiny NeXT)."""
    from apet_bench.testing import check_method

    over = ["+model.tiny_config.image_size=336", "model.visual_tokens=2928"]
    report = check_method("sparsevlm", models={"tiny_llava_next": over}, budgets=[640, 320, 160], work_dir=tmp_path)
    assert report.models == ["tiny_llava_next"]
    assert {"plan", "budget", "kept_indices", "attention_backends", "runner"} <= report.passed_checks()
    assert sorted({r.budget for r in report.results if r.check == "plan"}) == [160, 320, 640]


def test_plan_table_documents_both_accountings():
    t = S.plan_table()
    row = t[(t.model.str.startswith("llava15")) & (t.budget == 192) & (t.accounting == "official")].iloc[0]
    assert row["true mean"] == 206.5 and row["official Equal Tokens"] == 192.03
    refused = t[(t.model.str.startswith("llava_next")) & (t.budget == 160) & (t.accounting == "layer_input")].iloc[0]
    assert refused["counts"].startswith("refused: ") and "cannot reach 160" in refused["counts"]
    assert len(t) == 2 * (3 + 3 + 2 + 1)


def test_positions_and_placement_by_model_and_version():
    """v1.5 renumbers on 1-D RoPE (official v1.x) with clusters after the kept tokens; Qwen2.5-VL's mRoPE and
    v2.0 keep original positions (clusters in their centres' slots)."""
    assert _attached(192).renumber_positions and _attached(192)._placement() == "after_kept"
    q = _attached(0.2, family="qwen25vl", num_layers=28)
    assert not q.renumber_positions and q._placement() == "centre"
    assert not _attached(192, version="2.0").renumber_positions
    assert _attached(192, positions="original")._placement() == "centre"


def test_without_kv_cache_refused_in_one_line():
    """Without a cache every decode step is a new prefill with one more text token than the rows requested."""
    a = get_adapter("tiny_llava15", "sdpa")
    with pytest.raises(ValueError, match="use a KV cache") as err:
        generate(a, [make_image(1)], Q, {"max_new_tokens": 2, "use_cache": False}, build_method("sparsevlm", budget=192))
    assert "\n" not in str(err.value)
    assert own_hooks(a) == 0
