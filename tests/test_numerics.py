"""``numerics: official | fp32``: the official dtypes reproduced on CPU against references written here.

The references below are written from the official code (MaQianKun0/ApET @ 70cc01b:
``llava/model/utils.py`` ``fps``, ``llava/model/llava_arch.py`` ``encode_images`` / ``token_merging``,
``llava/model/modeling_llama_x.py`` ``layer_prune`` / ``token_merging``, ``qwen/model/qwen2_5_vl_custom.py``
vision stage, ``video-llava/videollava/model/llava_arch.py`` ``encode_videos``; FastV / PyramidDrop /
SparseVLM head means of fp16 eager attention; VisionZip's ``cls_attention.sum(dim=1)`` of eager CLIP), kept
in the official shape (per-sample loops, boolean-mask writes, broadcast ``F.cosine_similarity``) and only
the FPS start made explicit (the official one is an unseeded ``torch.randint``). torch 2.13 has CPU
kernels for every op they use in fp16 and bf16 (elementwise ops, sums, ``matmul``, ``softmax``,
``cosine_similarity``, ``scatter_add_``), accumulating reductions in fp32 and rounding once, as the
CUDA kernels do, so no op needs emulating.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from apet_bench.apet import apet_compress, fps, merge_dropped, select_basis
from apet_bench.attention import attention_rows
from apet_bench.baselines.fastv import FastV
from apet_bench.baselines.pdrop import PyramidDrop
from apet_bench.baselines.sparsevlm import rater_scores
from apet_bench.baselines.visionzip import cls_attention_row
from apet_bench.config import compose
from apet_bench.methods import available_methods, build_method

HALF = [torch.float16, torch.bfloat16]


# ---------------------------------------------------------------------- references (official code)
def ref_fps(x: torch.Tensor, K: int, farthest: torch.Tensor) -> torch.Tensor:
    """``utils.fps`` with the start given."""
    B, N, D = x.shape
    centroids = torch.zeros(B, K, dtype=torch.long)
    dist = torch.full((B, N), 1e10)
    for i in range(K):
        centroids[:, i] = farthest
        centroid = x[torch.arange(B), farthest].unsqueeze(1)
        dist_cur = ((x - centroid) ** 2).sum(-1)
        dist = torch.min(dist, dist_cur)
        farthest = dist.max(1)[1]
    return centroids


def ref_token_merging_batched(image_features, errors_indices, k, scaling=1):
    """``llava_arch.token_merging`` (vision stage; k = 0 means every kept token is a target, Video-LLaVA)."""
    B, N, D = image_features.shape
    index_mask = torch.zeros(B, N, dtype=torch.bool)
    index_mask.scatter_(1, errors_indices, True)
    merged, non_retained = [], []
    for b in range(B):
        merged.append(image_features[b][errors_indices[b][: errors_indices.shape[1] - k]])
        non_retained.append(image_features[b][~index_mask[b]])
    non_retained = torch.stack(non_retained, 0)
    merged = torch.stack(merged, 0)
    T = merged.shape[1]
    cos = F.cosine_similarity(non_retained.unsqueeze(2), merged.unsqueeze(1), dim=3)
    nearest = cos.argmax(dim=2)
    count = torch.zeros(B, T, dtype=torch.int)
    merged.scatter_add_(1, nearest.unsqueeze(-1).expand(-1, -1, D), non_retained)
    count.scatter_add_(1, nearest, torch.ones_like(nearest, dtype=count.dtype))
    merged /= scaling + count.unsqueeze(2)
    for b in range(B):
        image_features[b, errors_indices[b][: errors_indices.shape[1] - k]] = merged[b]
    return image_features, nearest


def ref_token_merging_flat(x, errors_indices, k, scaling=1):
    """``modeling_llama_x.token_merging`` / ``qwen2_5_vl_utils.token_merging`` (one sample, (N, D))."""
    N, D = x.shape
    index_mask = torch.zeros(N, dtype=torch.bool)
    index_mask.scatter_(0, errors_indices, True)
    retained = x[errors_indices[:-k]]
    non_retained = x[~index_mask]
    T = retained.shape[0]
    cos = F.cosine_similarity(non_retained.unsqueeze(1), retained.unsqueeze(0), dim=2)
    nearest = cos.argmax(dim=1)
    count = torch.zeros(T, dtype=torch.int)
    merged = torch.zeros_like(retained)
    merged += retained * scaling
    merged.scatter_add_(0, nearest.unsqueeze(-1).expand(-1, D), non_retained)
    count.scatter_add_(0, nearest, torch.ones_like(nearest, dtype=count.dtype))
    merged /= scaling + count.unsqueeze(1)
    x[errors_indices[:-k]] = merged
    return x


def ref_solve(seed, feats):
    """The fp32 ridge solve and error of every official stage."""
    seed, feats = seed.float(), feats.float()
    G = torch.matmul(seed, seed.transpose(-1, -2))
    G.diagonal(dim1=-2, dim2=-1).add_(1e-5)
    A = torch.linalg.solve(G, torch.matmul(seed, feats.transpose(-1, -2))).transpose(-1, -2)
    return torch.norm(feats - torch.matmul(A, seed), dim=-1)


def ref_encode_images(feats: torch.Tensor, keep: int, k: int, start: torch.Tensor):
    """``encode_images`` (LLaVA vision stage, before the projector): (kept tokens in position order, kept)."""
    B, N, D = feats.shape
    idx = ref_fps(feats, k, start)
    seed = feats.gather(1, idx.unsqueeze(-1).expand(-1, -1, D))
    errors = ref_solve(seed, feats)
    order = torch.topk(errors, k=keep, dim=1)[1]
    x = feats.float().to(feats.dtype)  # .float() then .half(): lossless
    seed = seed.to(feats.dtype)
    mask = torch.zeros(B, N, dtype=torch.bool)
    mask.scatter_(1, order[:, -k:], True)
    for b in range(B):
        x[b][mask[b]] = seed[b]
    x, _ = ref_token_merging_batched(x, order, k)
    kept = order.sort(dim=1).values
    return torch.stack([x[b, kept[b]] for b in range(B)]), kept, idx


def ref_qwen_vision(feats: torch.Tensor, keep: int, k: int, start: torch.Tensor):
    """Qwen2.5-VL vision stage (one image, (N, D) bf16): 0.5/0.5 blend, then merge, in bf16."""
    idx = ref_fps(feats.unsqueeze(0), k, start)[0]
    seed = feats[idx]
    errors = ref_solve(seed, feats)
    order = torch.topk(errors, k=keep, dim=0)[1]
    x, seed = feats.float().bfloat16(), seed.float().bfloat16()
    mask = torch.zeros(feats.shape[0], dtype=torch.bool)
    mask.scatter_(0, order[-k:], True)
    x[mask] = 0.5 * seed + 0.5 * x[mask]
    x = ref_token_merging_flat(x, order, k)
    kept = order.sort().values
    return x[kept], kept


def ref_layer_prune(hidden: torch.Tensor, keep: int, k: int, start: torch.Tensor):
    """LLaVA ``layer_prune`` on one visual span (N, D) fp16: FPS in fp16, basis by rank, merge in fp32."""
    x = hidden.unsqueeze(0)
    idx = ref_fps(x, k, start)
    seed = x.gather(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1])).squeeze(0)
    emb, seed = hidden.float(), seed.float()
    errors = ref_solve(seed, emb)
    order = torch.topk(errors, k=keep, dim=0)[1]
    emb[order[-k:]] = seed
    emb = ref_token_merging_flat(emb, order, k)
    emb = emb.half()
    kept = order.sort().values
    return emb[kept], kept


def realistic(n=576, d=1024, outliers=4, seed=0, dtype=torch.float16):
    """CLIP-like features: N(0, 1.5²) per channel plus a few high-norm outlier tokens (large-norm
    tokens of ViT-L's penultimate layer); fp16 squared distances to the outliers exceed 65504."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, n, d, generator=g) * 1.5
    rows = torch.randperm(n, generator=g)[:outliers]
    x[0, rows] += torch.randn(outliers, d, generator=g) * 12.0
    return x.to(dtype)


# ---------------------------------------------------------------------- the parameter itself
def test_every_method_has_numerics_official_by_default():
    for name in available_methods():
        cfg = compose([f"method={name}", "budget=64"])
        assert cfg.method.params.numerics == "official", name
        m = build_method(name, budget=64 if name != "none" else None, **dict(cfg.method.params))
        assert m.numerics == "official" and m.config_dict()["numerics"] == "official"
        assert build_method(name, budget=64 if name != "none" else None,
                            **{**dict(cfg.method.params), "numerics": "fp32"}).numerics == "fp32"
    with pytest.raises(ValueError, match="numerics 'fp16'"):
        build_method("random", budget=64, numerics="fp16")


def test_run_name_and_run_json_say_which_numerics(tmp_path):
    import json

    from omegaconf import OmegaConf

    from apet_bench.runner import execute, method_label

    base = ["model=tiny_llava15", "method=none", "benchmark=demo", "limit=2",
            f"results_dir={tmp_path / 'r'}", f"cache_dir={tmp_path / 'c'}"]
    label = method_label(OmegaConf.to_container(compose(base).method))
    assert label == "none"  # the default is not in the name ...
    fp32 = method_label(OmegaConf.to_container(compose(base + ["method.params.numerics=fp32"]).method))
    assert fp32 == "none-numerics=fp32"
    out = execute(compose(base + ["method.params.numerics=fp32"]))
    assert out.name.startswith("tiny_llava15__none-numerics=fp32__")
    run = json.loads((tmp_path / "r" / "runs" / out.name / "run.json").read_text())
    assert run["method_params"]["numerics"] == "fp32"
    out = execute(compose(base))  # ... but run.json records it
    run = json.loads((tmp_path / "r" / "runs" / out.name / "run.json").read_text())
    assert run["method_params"]["numerics"] == "official"


# ---------------------------------------------------------------------- ApET: FPS
@pytest.mark.parametrize("dtype", HALF)
def test_official_fps_reproduces_reference(dtype):
    x = realistic(dtype=dtype)
    start = torch.tensor([17])
    assert fps(x, 10, start, numerics="official").tolist() == ref_fps(x, 10, start).tolist()
    assert select_basis(x, 10, "fps", start_index=start, numerics="official").index.tolist() == \
        ref_fps(x, 10, start).tolist()


def test_fp16_overflow_changes_the_basis():
    """All pairwise fp16 squared distances overflow: every token ties at 1e10 and the official FPS
    walks the lowest indices; fp32 picks genuinely far tokens."""
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(1, 64, 256, generator=g) * 20.0).half()  # ||x - y||² ≈ 2·400·256 = 204800 > 65504
    start = torch.tensor([40])
    d = ((x[0, 40] - x[0]) ** 2).sum(-1)
    assert bool(torch.isinf(d[torch.arange(64) != 40]).all())  # the overflow really happens
    official = fps(x, 10, start, numerics="official")
    assert official.tolist() == ref_fps(x, 10, start).tolist()
    assert official[0, 1:].tolist() == list(range(9))  # lowest indices: the ties at 1e10
    clean = fps(x, 10, start)
    assert clean.tolist() != official.tolist()
    assert clean.tolist() == fps(x.float(), 10, start).tolist()  # fp32 numerics ignore the input dtype


def test_partial_overflow_on_outlier_tokens():
    x = realistic(outliers=6, seed=3)
    start = torch.tensor([0])
    official, clean = fps(x, 10, start, numerics="official"), fps(x, 10, start)
    assert official.tolist() == ref_fps(x, 10, start).tolist()
    assert official.tolist() != clean.tolist()


def test_fp32_input_official_equals_fp32():
    x = realistic(dtype=torch.float32, seed=5)
    start = torch.tensor([3])
    assert fps(x, 10, start, numerics="official").tolist() == fps(x, 10, start).tolist()
    t1, k1, _ = apet_compress(x, 288, start_index=start, numerics="official")
    t2, k2, _ = apet_compress(x, 288, start_index=start)
    assert torch.equal(k1, k2) and torch.allclose(t1, t2, atol=1e-5)


# ---------------------------------------------------------------------- ApET: the whole stages
@pytest.mark.parametrize("seed", [0, 2])
def test_llava_vision_stage_official_fp16(seed):
    x = torch.cat([realistic(n=144, d=64, outliers=3, seed=seed), realistic(n=144, d=64, outliers=0, seed=seed + 9)])
    x = (x.float() * 6).half()  # norms large enough that some fp16 distances overflow
    start = torch.tensor([5, 77])
    tokens, kept, info = apet_compress(x, 72, num_basis=10, start_index=start, numerics="official")
    ref_tokens, ref_kept, ref_idx = ref_encode_images(x, 72, 10, start)
    assert info.basis_index.tolist() == ref_idx.tolist()
    assert kept.tolist() == ref_kept.tolist()
    assert tokens.dtype == torch.float16 and torch.equal(tokens, ref_tokens)
    _, kept32, info32 = apet_compress(x, 72, num_basis=10, start_index=start)
    assert info32.basis_index.tolist() != info.basis_index.tolist()  # the overflow changed the basis


def test_qwen_vision_stage_official_bf16():
    x = realistic(n=196, d=96, outliers=2, seed=4, dtype=torch.bfloat16)
    start = torch.tensor([9])
    tokens, kept, _ = apet_compress(x, 58, num_basis=10, start_index=start, basis_blend=0.5, numerics="official")
    ref_tokens, ref_kept = ref_qwen_vision(x[0], 58, 10, start)
    assert kept[0].tolist() == ref_kept.tolist()
    assert tokens.dtype == torch.bfloat16 and torch.equal(tokens[0], ref_tokens)


def test_llava_llm_stage_official_merges_in_fp32():
    g = torch.Generator().manual_seed(6)
    h = (torch.randn(1, 96, 128, generator=g) * 30).half()  # hidden states: fp16 distances overflow
    start = torch.tensor([11])
    tokens, kept, _ = apet_compress(h, 32, num_basis=10, start_index=start, basis_slot_order="rank",
                                    numerics="official", merge_dtype=torch.float32)
    ref_tokens, ref_kept = ref_layer_prune(h[0], 32, 10, start)
    assert kept[0].tolist() == ref_kept.tolist()
    assert torch.equal(tokens[0], ref_tokens)


@pytest.mark.parametrize("dtype", HALF)
def test_merge_official_reproduces_token_merging(dtype):
    """Video-LLaVA layout: every kept token is a merge target (``encode_videos``)."""
    x = realistic(n=256, d=128, outliers=0, seed=8, dtype=dtype).expand(2, -1, -1).clone()
    x[1] = x[1].flip(0)
    targets = torch.stack([torch.randperm(256, generator=torch.Generator().manual_seed(s))[:22] for s in (0, 1)])
    mask = torch.ones(2, 256, dtype=torch.bool)
    mask.scatter_(1, targets, False)
    dropped = torch.stack([mask[b].nonzero().flatten() for b in range(2)])
    merged, assignment, sizes = merge_dropped(x, targets, dropped, numerics="official")
    ref_x, ref_nearest = ref_token_merging_batched(x.clone(), targets, 0)
    assert merged.dtype == dtype
    assert assignment.tolist() == ref_nearest.tolist()
    assert torch.equal(merged, torch.stack([ref_x[b, targets[b]] for b in range(2)]))
    assert sizes.sum().item() == 256 * 2


# ---------------------------------------------------------------------- attention-based baselines
def fake_adapter():
    spec = SimpleNamespace(tiny=False, options={}, visual_tokens=576)
    return SimpleNamespace(name="fake_llava15", family="llava15", num_layers=32, spec=spec, position_encoding="rope-1d")


def rounding_flip(heads: int = 32, n: int = 64, keep: int = 16):
    """Last-row attention rows (1, heads, 1, L) where the fp16 head mean of the fp16 probabilities and
    the fp32 head mean keep different top-``keep`` sets (searched over seeds, attention-sink-like rows:
    most mass on token 0). Rounding is monotone, so the fp16 mean mostly turns close fp32 scores into
    ties, which ``topk`` then breaks its own way; the official code gets the same ties."""
    for seed in range(200):
        g = torch.Generator().manual_seed(seed)
        logits = torch.randn(1, heads, 1, n, generator=g) * 0.5
        logits[..., 0] += 9.0  # the sink
        p32 = torch.softmax(logits, dim=-1)
        p16 = p32.half()
        vis = torch.arange(4, n)
        s16 = p16[0, :, -1].mean(0)[vis]
        s32 = p32[0, :, -1].mean(0)[vis]
        top16 = set(s16.topk(keep).indices.tolist())
        top32 = set(s32.topk(keep).indices.tolist())
        if top16 != top32:  # mostly fp16 ties at the boundary that fp32 tells apart, broken by topk
            return p32, p16, vis
    raise AssertionError("no rounding flip found")


@pytest.mark.parametrize("cls", [FastV, PyramidDrop])
def test_head_mean_official_fp16_flips_a_boundary_token(cls):
    kw = {"budget_convention": "keep_after_k"} if cls is FastV else {"layer_list": [2, 8, 16], "lam": 0.5}
    layer, budget = 2, 16 if cls is FastV else 270
    m = cls(budget=budget, **kw)
    with m(fake_adapter()):
        keep = m.llm_keep_count(60, layer_idx=layer)  # FastV: 16; PDrop: int(60 * 0.5) = 30
    p32, p16, vis = rounding_flip(keep=keep)
    kept = {}
    for numerics, att in (("official", p16), ("fp32", p32)):
        m = cls(budget=budget, numerics=numerics, **kw)
        with m(fake_adapter()):
            sel = m.select_llm_tokens(torch.zeros(1, p16.shape[-1], 8), [vis], layer_idx=layer, attention=att)
        ref = torch.mean(att, dim=1)[0][-1][vis]  # official: mean over heads in the weights' dtype
        if numerics == "fp32":
            ref = att.float().mean(dim=1)[0][-1][vis]
        assert sel.keep_positions[0].tolist() == vis[ref.topk(keep).indices].sort().values.tolist()
        kept[numerics] = sel.keep_positions[0].tolist()
    assert kept["official"] != kept["fp32"]


def test_sparsevlm_rater_scores_official_dtype():
    p32, p16, vis = rounding_flip()
    raters = torch.tensor([0])
    official = rater_scores(p16[0], raters, vis, numerics="official")
    assert official.dtype == torch.float16
    ref = p16.mean(1)[:, raters][:, :, vis].mean(1)[0]  # self_attn_weights.mean(1); relation.mean(1)
    assert torch.equal(official, ref)
    assert not torch.equal(official.float(), rater_scores(p32[0], raters, vis))


def test_attention_rows_official_is_eager_in_the_model_dtype():
    g = torch.Generator().manual_seed(0)
    q = (torch.randn(1, 4, 12, 16, generator=g) * 2).half()
    k = (torch.randn(1, 4, 12, 16, generator=g) * 2).half()
    rows = torch.tensor([11])
    got = attention_rows(q, k, None, rows, scaling=0.25, numerics="official")
    scores = torch.matmul(q[:, :, 11:], k.transpose(2, 3)) * 0.25  # fp16 matmul (fp32 accumulation)
    ref = torch.softmax(scores, dim=-1, dtype=torch.float32).to(torch.float16)
    assert got.dtype == torch.float16 and torch.equal(got, ref)
    fp32 = attention_rows(q, k, None, rows, scaling=0.25)
    assert fp32.dtype == torch.float32 and not torch.equal(fp32, got.float())


def test_visionzip_cls_row_official_is_eager_clip_in_the_model_dtype():
    from transformers import CLIPVisionConfig
    from transformers.models.clip.modeling_clip import CLIPEncoderLayer

    cfg = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4)
    torch.manual_seed(0)
    layer = CLIPEncoderLayer(cfg).half().eval()
    h = (torch.randn(1, 50, 64) * 3).half()
    with torch.no_grad():
        attn, keys = cls_attention_row(layer, h, numerics="official")
        x = layer.layer_norm1(h)
        att = layer.self_attn
        q = (att.q_proj(x) * att.scale).view(1, 50, 4, 16).transpose(1, 2)  # 4.37 CLIPAttention
        kk = att.k_proj(x).view(1, 50, 4, 16).transpose(1, 2)
        ref = torch.softmax(torch.matmul(q, kk.transpose(2, 3)), dim=-1)[:, :, 0]  # softmax in fp16
    assert attn.dtype == torch.float16 and torch.equal(attn, ref)
    assert torch.equal(keys, kk.mean(dim=1))


def ref_tome_bipartite(metric: torch.Tensor, r: int):
    """``tome/merge.py`` ``bipartite_soft_matching`` (class_token=True) in the metric's dtype; the edge
    argsort made stable so ties have one answer."""
    metric = metric / metric.norm(dim=-1, keepdim=True)
    a, b = metric[..., ::2, :], metric[..., 1::2, :]
    scores = a @ b.transpose(-1, -2)
    scores[..., 0, :] = -float("inf")
    node_max, node_idx = scores.max(dim=-1)
    edge_idx = node_max.argsort(dim=-1, descending=True, stable=True)[..., None]
    src_idx = edge_idx[..., :r, :]
    dst_idx = node_idx[..., None].gather(dim=-2, index=src_idx)
    return src_idx[..., 0], dst_idx[..., 0]


def test_tome_matching_official_fp16():
    from apet_bench.baselines.tome import bipartite_soft_matching, merge_wavg

    differs = False
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        base = torch.randn(1, 8, 16, generator=g)
        metric = (base.repeat(1, 13, 1) + 0.02 * torch.randn(1, 104, 16, generator=g)).half()  # near-duplicates
        match = bipartite_soft_matching(metric, 30, protect_first=True, numerics="official")
        src, dst = ref_tome_bipartite(metric, 30)
        assert match.src_idx.tolist() == src.tolist() and match.dst_idx.tolist() == dst.tolist()
        clean = bipartite_soft_matching(metric, 30, protect_first=True)
        differs |= clean.src_idx.tolist() != match.src_idx.tolist()
        x, size = merge_wavg(match, metric, numerics="official")
        assert x.dtype == torch.float16 and size.dtype == torch.float16 and int(size.sum()) == 104
    assert differs  # fp16 similarities tie or reorder where fp32 ones do not
