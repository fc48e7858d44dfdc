"""Stage 2 (drop / merge visual tokens at decoder layer K during prefill) and attention-row access.

The ``check_*`` helpers take any :class:`~apet_bench.models.ModelAdapter` (plus images and questions)
so the same matrix runs on LLaVA-NeXT, Qwen2.5-VL and Video-LLaVA adapters: call them from a test
parametrized over those fixtures. docs/models.md / §3.4 describe what is checked.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

from apet_bench.attention import ROWS_ATTN_IMPLEMENTATION, AttentionRowCapture, attention_rows, resolve_rows
from apet_bench.llm_surgery import LLMStageSurgery, build_keep_index
from apet_bench.methods import TokenCompressor, VisualSelection, build_method
from apet_bench.methods.base import LLMSelection
from apet_bench.models import load_model
from apet_bench.pipeline import generate

GEN = {"max_new_tokens": 3, "output_logits": True}
QUESTION = "What color is the car?"


# ---------------------------------------------------------------------- test methods (reusable)
@dataclass
class KeepAllLLM(TokenCompressor):
    """Stage 2 at ``layer`` keeping every visual token (exercises every gather, drops nothing)."""

    stage: ClassVar[str] = "llm"
    layer: int = 2  # type: ignore[misc]


@dataclass
class EveryNthLLM(TokenCompressor):
    """Deterministic stage 2: keep visual tokens ``0, n, 2n, ...`` of each row (25 % for n=4).

    The same positions at every prefill, so ``generate(use_cache=False)`` (one prefill per token)
    selects what the cached run selected: the reference of hooks.md §3.3. With ``merge`` the kept
    tokens get the mean of their group of ``n`` (exercises replacement hidden states).
    """

    stage: ClassVar[str] = "llm"
    layer: int = 2  # type: ignore[misc]
    n: int = 4
    merge: bool = False

    def llm_keep_count(self, num_visual_tokens, *, layer_idx):
        return -(-num_visual_tokens // self.n)

    def select_llm_tokens(self, hidden_states, visual_positions, *, layer_idx, attention=None):
        keep = torch.stack([v[:: self.n] for v in visual_positions])
        if not self.merge:
            return LLMSelection(keep)
        merged = []
        for b, v in enumerate(visual_positions):
            groups = hidden_states[b, v].split(self.n)
            merged.append(torch.stack([g.mean(0) for g in groups]))
        return LLMSelection(keep, torch.stack(merged))


@dataclass
class AttentionTopK(TokenCompressor):
    """FastV-like test method: keep the ``k`` visual tokens the last prompt token attends to most at K-1."""

    stage: ClassVar[str] = "llm"
    needs_attention_weights: ClassVar[bool] = True
    layer: int = 2  # type: ignore[misc]
    seen: list = None  # type: ignore[assignment]

    def llm_keep_count(self, num_visual_tokens, *, layer_idx):
        return self.num_tokens_to_keep(num_visual_tokens)

    def select_llm_tokens(self, hidden_states, visual_positions, *, layer_idx, attention=None):
        assert attention is not None and attention.shape[-1] == hidden_states.shape[1]
        if self.seen is not None:
            self.seen.append(attention.clone())
        scores = attention[:, :, -1, :].mean(1)  # (B, L)
        rows = []
        for b, v in enumerate(visual_positions):
            k = self.llm_keep_count(int(v.numel()), layer_idx=layer_idx)
            top = scores[b, v].topk(k).indices.sort().values
            rows.append(v[top])
        return LLMSelection(torch.stack(rows))


@dataclass
class HalfThenQuarter(EveryNthLLM):
    """Stage ``both``: the first half of the visual tokens at the projector, then every 4th at layer K."""

    stage: ClassVar[str] = "both"

    def compress_visual(self, features, *, image_index):
        n = features.shape[0] // 2
        return VisualSelection(features[:n], torch.arange(n))


@dataclass
class RaisingLLM(EveryNthLLM):
    """Raises inside the prefill, after the hooks are live."""

    def select_llm_tokens(self, hidden_states, visual_positions, *, layer_idx, attention=None):
        raise RuntimeError("boom")


# ---------------------------------------------------------------------- helpers (reusable on any adapter)
def count_hooks(model: torch.nn.Module) -> int:
    """Forward (pre-)hooks on every submodule, kwargs variants included."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def attn_impls(adapter) -> list[str]:
    return [layer.self_attn.config._attn_implementation for layer in adapter.decoder_layers]


def assert_logits_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x, y), (x - y).abs().max()


def assert_logits_close(a, b, atol=1e-4):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=atol, rtol=0)


def expected_kv(out) -> list[int]:
    """KV length per layer from the plan: text tokens + planned visual tokens + generated - 1."""
    text = out.prompt_tokens - out.visual_tokens_llm
    return [text + v + len(out.output_ids) - 1 for v in out.planned_layer_visual_tokens]


def check_keep_all_equals_baseline(adapter, images, question=QUESTION, layer=2):
    """Stage 2 keeping every visual token reproduces the unmodified model exactly."""
    base = generate(adapter, images, question, GEN)
    same = generate(adapter, images, question, GEN, KeepAllLLM(layer=layer))
    assert same.output_ids == base.output_ids
    assert_logits_equal(same.logits, base.logits)
    assert same.layer_visual_tokens == base.layer_visual_tokens == same.planned_layer_visual_tokens
    assert same.kv_cache_tokens == base.kv_cache_tokens
    return base


def check_cached_equals_uncached(adapter, images, question=QUESTION, layer=2, method=None):
    """25 % kept at ``layer``: cached generate == generate(use_cache=False) with the same selection,
    the measured per-layer visual tokens equal the plan, and each layer's KV cache length equals it."""
    method = method or EveryNthLLM(layer=layer)
    cached = generate(adapter, images, question, GEN, method)
    uncached = generate(adapter, images, question, {**GEN, "use_cache": False}, method)
    assert cached.output_ids == uncached.output_ids
    assert_logits_close(cached.logits, uncached.logits)
    n = cached.visual_tokens_llm
    k = method.llm_keep_count(n, layer_idx=layer)
    assert k < n
    assert cached.planned_layer_visual_tokens == [n] * layer + [k] * (adapter.num_layers - layer)
    assert cached.layer_visual_tokens == cached.planned_layer_visual_tokens
    assert cached.kv_cache_tokens == expected_kv(cached)
    return cached


def batch_inputs(adapter, images, questions):
    """Left-padded processor batch, one image per row, on the model's device and dtype."""
    prompts = [adapter.build_prompt(q, 1) for q in questions]
    inputs = adapter.processor(images=list(images), text=prompts, padding=True, return_tensors="pt")
    return inputs.to(adapter.device, dtype=adapter.dtype)


def run_stage2(adapter, method, inputs, **gen):
    """``model.generate`` under ``method``'s stage 2 (the surgery used directly, any batch size)."""
    kwargs = {"max_new_tokens": GEN["max_new_tokens"], "do_sample": False, "output_logits": True}
    kwargs["return_dict_in_generate"] = True
    kwargs.update(gen)
    with torch.inference_mode(), method(adapter), LLMStageSurgery(adapter, method) as surgery:
        out = adapter.model.generate(**inputs, **kwargs)
    return out, surgery


def check_left_padded_batch(adapter, images, questions, layer=2):
    """A left-padded batch of rows with the same visual count: cached == uncached, KV lengths per plan,
    and each row equals its batch-1 run (within 1e-4)."""
    inputs = batch_inputs(adapter, images, questions)
    mask = inputs["attention_mask"]
    assert bool((mask[:, 0] == 0).any()), "the batch must be left-padded"
    method = EveryNthLLM(layer=layer)
    cached, surgery = run_stage2(adapter, method, inputs)
    uncached, _ = run_stage2(adapter, method, inputs, use_cache=False)
    assert torch.equal(cached.sequences, uncached.sequences)
    assert_logits_close(cached.logits, uncached.logits)
    full = inputs["input_ids"].shape[1]
    vis = adapter.visual_positions(inputs["input_ids"], mask)
    n = int(vis[0].numel())
    k = method.llm_keep_count(n, layer_idx=layer)
    new = cached.sequences.shape[1] - full
    kv = [int(x.get_seq_length()) for x in cached.past_key_values.layers]
    assert kv == [full + new - 1] * layer + [full - n + k + new - 1] * (adapter.num_layers - layer)
    assert surgery.kept_positions[layer].shape == (len(questions), k)
    for b in range(len(questions)):
        assert torch.equal(surgery.kept_positions[layer][b], vis[b][::4])
        single = generate(adapter, [images[b]], questions[b], GEN, method)
        assert single.output_ids == cached.sequences[b, full:].tolist()
        assert_logits_close(single.logits, tuple(x[b : b + 1] for x in cached.logits))
    return cached


def check_hooks_gone(adapter, images, question=QUESTION, layer=2):
    """After the context exits (normally or by an exception) no hook, no wrapped attention is left and
    the model equals the unmodified one again."""
    before = count_hooks(adapter.model)
    impls = attn_impls(adapter)
    base = generate(adapter, images, question, GEN)
    generate(adapter, images, question, GEN, EveryNthLLM(layer=layer))
    generate(adapter, images, question, GEN, AttentionTopK(budget=0.25, layer=layer))
    with pytest.raises(RuntimeError, match="boom"):
        generate(adapter, images, question, GEN, RaisingLLM(layer=layer))
    with pytest.raises(RuntimeError, match="boom"):
        with AttentionTopK(budget=0.25, layer=layer)(adapter) as m, LLMStageSurgery(adapter, m):
            assert count_hooks(adapter.model) > before
            assert attn_impls(adapter)[layer - 1] == ROWS_ATTN_IMPLEMENTATION
            raise RuntimeError("boom")
    assert count_hooks(adapter.model) == before
    assert attn_impls(adapter) == impls
    assert not any(hasattr(layer_.self_attn, "_apet_bench_row_capture") for layer_ in adapter.decoder_layers)
    after = generate(adapter, images, question, GEN)
    assert after.output_ids == base.output_ids
    assert_logits_equal(after.logits, base.logits)


def check_attention_rows_match_eager(adapter, eager_adapter, inputs, layer, rows="last"):
    """Rows recomputed at one layer of ``adapter`` (sdpa / flash) == eager ``output_attentions`` of the
    same weights; every layer of ``adapter`` stays on its backend."""
    impl = adapter.attn_implementation
    with torch.inference_mode():
        ref = eager_adapter.model(**inputs, output_attentions=True).attentions[layer]
        with AttentionRowCapture(adapter, layer, rows) as cap:
            impls = attn_impls(adapter)
            adapter.model(**inputs)
    assert impls == [impl if i != layer else ROWS_ATTN_IMPLEMENTATION for i in range(adapter.num_layers)]
    assert attn_impls(adapter) == [impl] * adapter.num_layers
    assert adapter.model.config._attn_implementation == impl
    idx = resolve_rows(rows, ref.shape[2])
    torch.testing.assert_close(cap.probs, ref[:, :, idx, :].float(), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(cap.probs.sum(-1), torch.ones_like(cap.probs.sum(-1)))
    return cap.probs


# ---------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def tiny_llava15_eager():
    from conftest import TINY_LLAVA15_CFG

    return load_model({**TINY_LLAVA15_CFG, "attn_implementation": "eager"})


@pytest.fixture(params=["eager", "sdpa"])
def adapter(request, tiny_llava15, tiny_llava15_eager):
    a = tiny_llava15 if request.param == "sdpa" else tiny_llava15_eager
    assert a.attn_implementation == request.param
    return a


# ---------------------------------------------------------------------- the matrix on tiny LLaVA-1.5
def test_keep_all_at_stage2_equals_baseline(adapter, images):
    base = check_keep_all_equals_baseline(adapter, [images[0]])
    assert base.layer_visual_tokens == [576] * 4


def test_cached_equals_uncached_at_quarter(adapter, images):
    out = check_cached_equals_uncached(adapter, [images[1]])
    assert out.layer_visual_tokens == [576, 576, 144, 144]
    assert out.kv_cache_tokens[0] - out.kv_cache_tokens[2] == 576 - 144
    assert out.kept_indices == [list(range(0, 576, 4))]
    assert out.mean_layer_visual_tokens == 360.0


def test_merging_replaces_hidden_states(adapter, images):
    out = check_cached_equals_uncached(adapter, [images[1]], layer=1, method=EveryNthLLM(layer=1, merge=True))
    plain = generate(adapter, [images[1]], QUESTION, GEN, EveryNthLLM(layer=1))
    assert out.layer_visual_tokens == plain.layer_visual_tokens == [576, 144, 144, 144]
    assert not torch.allclose(out.logits[0], plain.logits[0])


def test_left_padded_batch(adapter, images):
    check_left_padded_batch(adapter, images[:2], ["What is it?", "How many people are in the picture?"])


def test_hooks_gone_after_exit_and_exception(adapter, images):
    check_hooks_gone(adapter, [images[2]])


def test_attention_rows_match_eager_weights(tiny_llava15, tiny_llava15_eager, images, monkeypatch):
    """sdpa model + one recomputed row set == eager weights; every layer still calls sdpa, none eager."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.llama import modeling_llama

    calls = {"sdpa": 0, "eager": 0}
    sdpa, eager = ALL_ATTENTION_FUNCTIONS["sdpa"], modeling_llama.eager_attention_forward
    llm_attn = {id(layer.self_attn) for a in (tiny_llava15, tiny_llava15_eager) for layer in a.decoder_layers}

    def counting(name, fn):
        def wrapped(module, *args, **kwargs):
            calls[name] += id(module) in llm_attn  # the vision tower's attention is not counted
            return fn(module, *args, **kwargs)

        return wrapped

    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS, "sdpa", counting("sdpa", sdpa))
    monkeypatch.setattr(modeling_llama, "eager_attention_forward", counting("eager", eager))
    one = tiny_llava15.prepare_inputs([images[0]], tiny_llava15.build_prompt(QUESTION))
    check_attention_rows_match_eager(tiny_llava15, tiny_llava15_eager, one, layer=1)
    assert calls == {"sdpa": 4, "eager": 4}  # sdpa model: 4 sdpa layers; the eager reference: 4 eager
    batch = batch_inputs(tiny_llava15, images[:2], ["What is it?", "How many people are in the picture?"])
    check_attention_rows_match_eager(tiny_llava15, tiny_llava15_eager, batch, layer=2, rows=[-1, -3, 50])
    check_attention_rows_match_eager(tiny_llava15_eager, tiny_llava15_eager, batch, layer=0, rows="last")


def test_attention_rows_with_flash_style_masks():
    """2-D padding masks (flash_attention_2) and ``None`` (causal) give the eager probabilities."""
    torch.manual_seed(0)
    b, h, kv_h, L, d = 2, 4, 2, 7, 8
    q, k = torch.randn(b, h, L, d), torch.randn(b, kv_h, L, d)
    pad = torch.ones(b, L, dtype=torch.long)
    pad[1, :3] = 0
    causal = torch.tril(torch.ones(L, L, dtype=torch.bool))
    full = causal[None, None] & pad.bool()[:, None, None, :]
    rows = torch.tensor([L - 1, 4])
    ref = attention_rows(q, k, full, rows, scaling=d**-0.5)
    torch.testing.assert_close(attention_rows(q, k, pad, rows, scaling=d**-0.5), ref)
    torch.testing.assert_close(
        attention_rows(q, k, None, rows, scaling=d**-0.5)[0], attention_rows(q, k, full[:1], rows, scaling=d**-0.5)[0]
    )
    kk = k.repeat_interleave(2, dim=1)
    manual = torch.softmax((q[:, :, rows] @ kk.transpose(2, 3)) * d**-0.5 + torch.where(full[:, :, rows], 0.0, float("-inf")), -1)
    torch.testing.assert_close(ref, manual)


def test_attention_method_same_selection_on_sdpa_and_eager(tiny_llava15, tiny_llava15_eager, images):
    """A FastV-like method gets layer K-1's rows under sdpa exactly as eager computes them."""
    outs, seen = [], []
    for a in (tiny_llava15, tiny_llava15_eager):
        m = AttentionTopK(budget=0.25, layer=2, seen=[])
        # no use_cache=False reference here: without a cache every step is a prefill whose last row is
        # the newest token, not the last prompt token, so the selection legitimately changes
        out = generate(a, [images[0]], QUESTION, GEN, m)
        assert out.kv_cache_tokens == expected_kv(out)
        outs.append(out)
        seen.append(m.seen[0])
    assert outs[0].kept_indices == outs[1].kept_indices
    assert outs[0].layer_visual_tokens == [576, 576, 144, 144]
    torch.testing.assert_close(seen[0], seen[1], atol=1e-5, rtol=1e-4)
    assert seen[0].shape == (1, 4, 1, outs[0].prompt_tokens)


# ---------------------------------------------------------------------- random, both, plan, errors
def test_random_at_stage2(tiny_llava15, images):
    """``random`` with ``stage="llm"`` (the surgery itself is checked on eager and sdpa above)."""
    adapter = tiny_llava15
    m = build_method("random", budget=144, seed=3, stage="llm", layer=2)
    assert m.stage == "llm" and m.llm_layers() == (2,) and m.config_dict()["stage"] == "llm"
    out = generate(adapter, [images[0]], QUESTION, GEN, m)
    assert out.visual_tokens_llm == 576 and out.prompt_tokens == out.kv_cache_tokens[0] - len(out.output_ids) + 1
    assert out.layer_visual_tokens == out.planned_layer_visual_tokens == [576, 576, 144, 144]
    assert out.kv_cache_tokens == expected_kv(out)
    short = {"max_new_tokens": 1}
    again = generate(adapter, [images[0]], QUESTION, short, build_method("random", budget=144, seed=3, stage="llm"))
    other = generate(adapter, [images[0]], QUESTION, short, build_method("random", budget=144, seed=4, stage="llm"))
    assert out.kept_indices == again.kept_indices != other.kept_indices
    assert len(out.kept_indices[0]) == 144 and out.kept_indices[0] == sorted(out.kept_indices[0])
    frac = generate(adapter, [images[0]], QUESTION, short, build_method("random", budget=0.5, stage="llm", layer=1))
    assert frac.layer_visual_tokens == [576, 288, 288, 288]
    vision = generate(adapter, [images[0]], QUESTION, short, build_method("random", budget=144, seed=3))
    assert vision.layer_visual_tokens == vision.planned_layer_visual_tokens == [144] * 4


def test_random_stage_params_validated():
    with pytest.raises(ValueError, match="stage 'both'"):
        build_method("random", budget=8, stage="both")
    with pytest.raises(ValueError, match="layer 0"):
        build_method("random", budget=8, stage="llm", layer=0)
    assert build_method("random", budget=8).stage == "vision"


def test_random_yaml_params_build(tmp_path):
    from pathlib import Path

    import yaml

    cfg = yaml.safe_load((Path(__file__).parents[1] / "configs/method/random.yaml").read_text())
    m = build_method("random", budget=64, **cfg["params"])
    assert m.stage == "vision" and m.layer == 2


def test_stage_both_gets_both_calls(tiny_llava15, images):
    m = HalfThenQuarter(layer=2)
    out = generate(tiny_llava15, [images[0]], QUESTION, GEN, m)
    assert out.visual_tokens_llm == 288
    assert out.layer_visual_tokens == out.planned_layer_visual_tokens == [288, 288, 72, 72]
    assert out.kept_indices == [list(range(0, 288, 4))]
    uncached = generate(tiny_llava15, [images[0]], QUESTION, {**GEN, "use_cache": False}, m)
    assert_logits_close(out.logits, uncached.logits)


def test_multiple_drop_layers_compose(tiny_llava15, images):
    @dataclass
    class TwoStep(EveryNthLLM):
        def llm_layers(self):
            return (1, 3)

        def llm_keep_count(self, num_visual_tokens, *, layer_idx):
            return -(-num_visual_tokens // 2)

        def select_llm_tokens(self, hidden_states, visual_positions, *, layer_idx, attention=None):
            return LLMSelection(torch.stack([v[::2] for v in visual_positions]))

    m = TwoStep()
    out = generate(tiny_llava15, [images[0]], QUESTION, GEN, m)
    assert out.layer_visual_tokens == out.planned_layer_visual_tokens == [576, 288, 288, 144]
    assert out.kv_cache_tokens == expected_kv(out)
    uncached = generate(tiny_llava15, [images[0]], QUESTION, {**GEN, "use_cache": False}, m)
    assert_logits_close(out.logits, uncached.logits)


def test_stage2_errors(tiny_llava15, images):
    before = count_hooks(tiny_llava15.model)
    with pytest.raises(ValueError, match="1 <= layer < 4"):
        generate(tiny_llava15, [images[0]], QUESTION, GEN, build_method("random", budget=8, stage="llm", layer=4))
    with pytest.raises(ValueError, match="DynamicCache"):
        generate(tiny_llava15, [images[0]], QUESTION, {**GEN, "cache_implementation": "static"}, EveryNthLLM())
    with pytest.raises(ValueError, match=r"must be in \[0, 2\)"):

        @dataclass
        class LateAttention(AttentionTopK):
            def attention_request(self, layer_idx):
                from apet_bench.attention import AttentionRequest

                return AttentionRequest(layer=layer_idx)

        LLMStageSurgery(tiny_llava15, LateAttention(budget=8))
    assert count_hooks(tiny_llava15.model) == before


def test_build_keep_index_checks_selections():
    vis = [torch.tensor([2, 3, 4, 5]), torch.tensor([3, 4, 5, 6])]
    index, new_vis, at = build_keep_index(LLMSelection(torch.tensor([[5, 2], [4, 6]])), vis, 8)
    assert index.tolist() == [[0, 1, 2, 5, 6, 7], [0, 1, 2, 4, 6, 7]]
    assert [v.tolist() for v in new_vis] == [[2, 3], [3, 4]] and at.tolist() == [[3, 2], [3, 4]]
    with pytest.raises(ValueError, match="not a visual token"):
        build_keep_index(LLMSelection(torch.tensor([[1], [4]])), vis, 8)
    with pytest.raises(ValueError, match="repeat"):
        build_keep_index(LLMSelection(torch.tensor([[2, 2], [3, 4]])), vis, 8)
    with pytest.raises(ValueError, match="same count"):
        build_keep_index(LLMSelection(torch.tensor([[2, 3], [3, 4]])), [vis[0], torch.tensor([3, 4, 5])], 8)
    with pytest.raises(ValueError, match="batch=2"):
        build_keep_index(LLMSelection(torch.tensor([2, 3])), vis, 8)


# ---------------------------------------------------------------------- flash_attention_2's 2-D masks
FAKE_FLASH = "apet_bench_test_flash_like"


def _fake_flash_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """CPU stand-in for flash_attention_2's contract: a 2-D ``(batch, kv_len)`` padding mask or ``None``."""
    from transformers.integrations.sdpa_attention import repeat_kv

    assert attention_mask is None or attention_mask.ndim == 2, attention_mask.shape
    b, h, q_len, _ = query.shape
    kv_len = key.shape[2]
    if attention_mask is not None:
        assert attention_mask.shape[-1] == kv_len, (attention_mask.shape, kv_len)
        _fake_flash_attention.masks.append(tuple(attention_mask.shape))
    allowed = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device).tril(kv_len - q_len)
    allowed = allowed[None, None].expand(b, 1, q_len, kv_len)
    if attention_mask is not None:
        allowed = allowed & attention_mask[:, None, None, :].bool()
    allowed = allowed | ~allowed.any(-1, keepdim=True)  # padding queries: finite garbage, as unpadded FA leaves
    n_rep = h // key.shape[1]
    out = torch.nn.functional.scaled_dot_product_attention(
        query, repeat_kv(key, n_rep), repeat_kv(value, n_rep), attn_mask=allowed, scale=scaling
    )
    return out.transpose(1, 2).contiguous(), None


_fake_flash_attention.masks = []


@pytest.fixture
def flash_like(tiny_llava15_eager):
    """The module's eager tiny model switched to a flash-style backend (2-D masks) for one test."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    AttentionInterface.register(FAKE_FLASH, _fake_flash_attention)
    AttentionMaskInterface.register(FAKE_FLASH, flash_attention_mask)
    a = tiny_llava15_eager
    configs = {id(c): c for c in [a.model.config.text_config, *(x.self_attn.config for x in a.decoder_layers)]}
    saved = {k: c._attn_implementation_internal for k, c in configs.items()}
    for c in configs.values():
        c._attn_implementation_internal = FAKE_FLASH
    _fake_flash_attention.masks.clear()
    try:
        yield a
    finally:
        for k, c in configs.items():
            c._attn_implementation_internal = saved[k]


def test_flash_style_2d_masks(flash_like, images):
    """The 2-D padding-mask path (flash_attention_2): exactness, cached == uncached, left-padded batch."""
    a = flash_like
    check_keep_all_equals_baseline(a, [images[0]])
    out = check_cached_equals_uncached(a, [images[1]])
    assert out.layer_visual_tokens == [576, 576, 144, 144]
    _fake_flash_attention.masks.clear()
    check_left_padded_batch(a, images[:2], ["What is it?", "How many people are in the picture?"])
    assert _fake_flash_attention.masks, "the batch must have produced 2-D padding masks"
    with AttentionRowCapture(a, 1) as cap:
        batch = batch_inputs(a, images[:2], ["What is it?", "How many people are in the picture?"])
        with torch.inference_mode():
            a.model(**batch)
    configs = {id(c): c for c in [a.model.config.text_config, *(x.self_attn.config for x in a.decoder_layers)]}
    for c in configs.values():
        c._attn_implementation_internal = "eager"
    try:
        with torch.inference_mode():
            ref = a.model(**batch, output_attentions=True).attentions[1][:, :, -1:, :]
    finally:
        for c in configs.values():
            c._attn_implementation_internal = FAKE_FLASH
    torch.testing.assert_close(cap.probs, ref, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------- position renumbering (official ApET)
@dataclass
class EveryNthRenumbered(EveryNthLLM):
    renumber_positions: ClassVar[bool] = True


@dataclass
class KeepAllRenumbered(KeepAllLLM):
    renumber_positions: ClassVar[bool] = True


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_renumbered_positions_cached_equals_uncached(tiny_llava15, tiny_llava15_eager, images, attn):
    """docs/methods/apet.md: layers >= K see positions 0..L'-1 at prefill and decode positions shifted down by
    the removed count. Uncached generation renumbers every step's prefill, so it must agree with the
    cached run; keeping everything changes nothing; dropping changes the logits vs original positions."""
    adapter = tiny_llava15 if attn == "sdpa" else tiny_llava15_eager
    image = images[:1]
    base = generate(adapter, image, QUESTION, GEN)
    same = generate(adapter, image, QUESTION, GEN, KeepAllRenumbered(layer=2))
    assert same.output_ids == base.output_ids
    assert_logits_equal(same.logits, base.logits)
    cached = generate(adapter, image, QUESTION, GEN, EveryNthRenumbered(layer=2))
    uncached = generate(adapter, image, QUESTION, {**GEN, "use_cache": False}, EveryNthRenumbered(layer=2))
    assert cached.output_ids == uncached.output_ids
    assert_logits_close(cached.logits, uncached.logits)
    assert cached.kv_cache_tokens == expected_kv(cached)
    original = generate(adapter, image, QUESTION, GEN, EveryNthLLM(layer=2))
    assert not torch.allclose(original.logits[0], cached.logits[0], atol=1e-4)


def test_renumbering_rejected_for_mrope():
    from omegaconf import OmegaConf

    from apet_bench.config import compose
    from apet_bench.llm_surgery import LLMStageSurgery

    cfg = compose(["model=tiny_qwen25vl"])
    qwen = load_model(OmegaConf.to_container(cfg.model, resolve=True))
    with pytest.raises(ValueError, match="1-D RoPE"):
        LLMStageSurgery(qwen, EveryNthRenumbered(layer=2))
