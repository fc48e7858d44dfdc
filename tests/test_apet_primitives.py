"""Property tests of the ApET tensor primitives (``apet_bench.apet``; docs/methods/apet.md)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from apet_bench.apet import (
    apet_compress,
    approximation_error,
    approximation_error_from_basis,
    complement_index,
    dpc_basis,
    fps,
    fps_start_index,
    merge_dropped,
    random_basis,
    rank_by_error,
    ridge_coefficients,
    select_basis,
)

VARIANTS = ["official", "paper"]
BASES = ["fps", "dpc", "random"]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=gen(seed)).to(dtype)


# --------------------------------------------------------------------------------------------------
# approximation error
# --------------------------------------------------------------------------------------------------


def test_token_in_span_has_zero_error_and_outside_token_has_distance_to_span():
    B, N, D, M = 2, 40, 64, 10
    x = randn(B, N, D, seed=1)
    basis_index = torch.arange(M).expand(B, M)
    coeff = randn(B, M, seed=2)
    x[:, 20] = torch.einsum("bm,bmd->bd", coeff, x[:, :M])  # in the span of the basis
    err = approximation_error(x, basis_index)
    assert err.dtype == torch.float32 and err.shape == (B, N)
    scale = x.norm(dim=-1).max()
    assert torch.all(err[:, :M] < 1e-4 * scale)  # the basis tokens themselves
    assert torch.all(err[:, 20] < 1e-4 * scale)
    # every other token: its distance to the span, from a float64 least-squares solve
    for b in range(B):
        S = x[b, :M].double()
        sol = torch.linalg.lstsq(S.T, x[b].double().T).solution  # (M, N)
        dist = (x[b].double() - (S.T @ sol).T).norm(dim=-1)
        torch.testing.assert_close(err[b].double(), dist, rtol=1e-4, atol=1e-4 * float(scale))
    assert torch.all(err[:, 30:] > 1.0)  # random 64-d tokens are far from a 10-d span


def test_error_matches_ridge_normal_equations_and_reports_no_fallback():
    x = randn(3, 50, 32, seed=3)
    s = x[:, :7]
    coef, fallback = ridge_coefficients(x, s, ridge=1e-5)
    assert coef.shape == (3, 50, 7) and not fallback.any()
    g = s.double() @ s.double().transpose(1, 2) + 1e-5 * torch.eye(7, dtype=torch.float64)
    expected = torch.linalg.solve(g, s.double() @ x.double().transpose(1, 2)).transpose(1, 2)
    torch.testing.assert_close(coef.double(), expected, rtol=1e-3, atol=1e-4)
    err, _ = approximation_error_from_basis(x, s)
    torch.testing.assert_close(err, approximation_error(x, torch.arange(7).expand(3, 7)))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_error_is_fp32_for_half_inputs(dtype):
    x = randn(2, 30, 16, seed=4, dtype=dtype)
    idx = torch.tensor([[0, 3, 5], [1, 2, 9]])
    err = approximation_error(x, idx)
    assert err.dtype == torch.float32
    torch.testing.assert_close(err, approximation_error(x.float(), idx))


def test_ridge_shifts_the_solution():
    x = randn(1, 20, 8, seed=5)
    idx = torch.arange(4).view(1, 4)
    small = approximation_error(x, idx, ridge=1e-5)
    large = approximation_error(x, idx, ridge=1e3)
    assert not torch.allclose(small, large)
    assert torch.all(large[:, :4] > small[:, :4])  # a heavy ridge no longer reproduces the basis


def test_approximation_error_rejects_bad_index():
    x = randn(2, 10, 4)
    with pytest.raises(IndexError):
        approximation_error(x, torch.tensor([[0, 10], [1, 2]]))
    with pytest.raises(ValueError, match="shape"):
        approximation_error(x, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="ridge"):
        approximation_error(x, torch.tensor([[0], [1]]), ridge=-1.0)


# --------------------------------------------------------------------------------------------------
# basis selection
# --------------------------------------------------------------------------------------------------


def brute_force_fps(x: torch.Tensor, m: int, start: int) -> list[int]:
    """The definition: each step, the token farthest (squared Euclidean, float64) from the picked set."""
    x = x.double()
    picked = [start]
    while len(picked) < m:
        best, best_d = -1, -1.0
        for n in range(x.shape[0]):
            d = min(float(((x[n] - x[p]) ** 2).sum()) for p in picked)
            if d > best_d:
                best, best_d = n, d
        picked.append(best)
    return picked


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fps_picks_the_farthest_point_each_step(seed):
    x = randn(3, 60, 12, seed=seed) * (1 + seed)
    start = torch.tensor([0, 17, 59])
    idx = fps(x, 8, start)
    assert idx.shape == (3, 8) and idx.dtype == torch.long
    for b in range(3):
        assert idx[b].tolist() == brute_force_fps(x[b], 8, int(start[b]))


def test_fps_matches_subtraction_form_on_large_shifted_features():
    # A large common offset makes the ||x||² - 2x·c + ||c||² expansion lose digits; the picks must not
    # change (hidden states of an LLM have such offsets).
    x = randn(1, 200, 256, seed=7) + 50.0
    idx = fps(x, 10, torch.tensor([3]))
    assert idx[0].tolist() == brute_force_fps(x[0], 10, 3)


def test_fps_half_input_is_computed_in_fp32():
    x = randn(2, 50, 16, seed=8, dtype=torch.bfloat16)
    start = torch.tensor([4, 9])
    assert torch.equal(fps(x, 6, start), fps(x.float(), 6, start))


def test_fps_start_from_seed_is_reproducible_and_seed_dependent():
    a = fps_start_index(4, 576, gen(0))
    b = fps_start_index(4, 576, gen(0))
    c = fps_start_index(4, 576, gen(1))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.dtype == torch.long and int(a.min()) >= 0 and int(a.max()) < 576


def test_select_basis_same_seed_same_result_different_seed_different_start():
    x = randn(2, 100, 16, seed=9)
    for method in BASES:
        b1 = select_basis(x, 10, method, gen(5))
        b2 = select_basis(x, 10, method, gen(5))
        assert torch.equal(b1.index, b2.index) and torch.equal(b1.vectors, b2.vectors)
    s1 = select_basis(x, 10, "fps", gen(5)).index
    s2 = select_basis(x, 10, "fps", gen(6)).index
    assert not torch.equal(s1[:, 0], s2[:, 0])
    torch.testing.assert_close(s1[:, 0], fps_start_index(2, 100, gen(5)))


def test_select_basis_fps_vectors_are_the_tokens():
    x = randn(2, 50, 8, seed=10)
    basis = select_basis(x, 5, "fps", start_index=torch.tensor([0, 1]))
    assert basis.vectors.dtype == torch.float32
    torch.testing.assert_close(basis.vectors, torch.stack([x[b, basis.index[b]] for b in range(2)]))


def test_dpc_finds_one_centre_per_blob_and_means_are_cluster_means():
    g = gen(11)
    centres = torch.tensor([[0.0, 0.0, 0.0, 0.0], [20.0, 0, 0, 0], [0, 20.0, 0, 0]])
    labels = torch.arange(3).repeat_interleave(15)
    x = (centres[labels] + 0.5 * torch.randn(45, 4, generator=g)).unsqueeze(0)
    idx, means, assignment = dpc_basis(x, 3, gen(0))
    assert idx.shape == (1, 3) and means.shape == (1, 3, 4) and assignment.shape == (1, 45)
    assert sorted(labels[idx[0]].tolist()) == [0, 1, 2]  # one density peak per blob
    for j in range(3):
        members = assignment[0] == j
        assert assignment[0, idx[0, j]] == j  # a centre joins its own cluster
        assert torch.equal(labels[members], labels[idx[0, j]].expand(int(members.sum())))
        torch.testing.assert_close(means[0, j], x[0, members].mean(0), rtol=1e-5, atol=1e-5)


def test_dpc_is_shift_invariant_and_selects_means_or_centres():
    x = randn(1, 80, 16, seed=30)
    a = dpc_basis(x, 6, gen(1))
    b = dpc_basis(x + 300.0, 6, gen(1))  # a large common offset, as LLM hidden states have
    assert torch.equal(a[0], b[0]) and torch.equal(a[2], b[2])
    official = select_basis(x, 6, "dpc", gen(1))
    paper = select_basis(x, 6, "dpc", gen(1), dpc_vectors="centre")
    assert torch.equal(official.index, a[0]) and torch.equal(official.vectors, a[1])
    torch.testing.assert_close(paper.vectors, x[0, a[0][0]].unsqueeze(0))


def test_dpc_and_random_are_seeded():
    x = randn(2, 64, 8, seed=12)
    a, b = dpc_basis(x, 5, gen(3)), dpc_basis(x, 5, gen(3))
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    r1, r2, r3 = (random_basis(x, 10, gen(s)) for s in (3, 3, 4))
    assert torch.equal(r1, r2) and not torch.equal(r1, r3)
    distinct = random_basis(x, 64, gen(3), replacement=False)
    assert all(len(set(row.tolist())) == 64 for row in distinct)


# --------------------------------------------------------------------------------------------------
# selection and merge
# --------------------------------------------------------------------------------------------------


def test_rank_by_error_is_descending_with_ties_to_the_lowest_index():
    err = torch.tensor([[1.0, 3.0, 3.0, 0.5, 3.0, 2.0]])
    assert rank_by_error(err, 4).tolist() == [[1, 2, 4, 5]]
    with pytest.raises(ValueError, match="NaN"):
        rank_by_error(torch.tensor([[1.0, math.nan]]), 1)
    assert complement_index(torch.tensor([[4, 1]]), 6).tolist() == [[0, 2, 3, 5]]


def test_merge_assigns_to_most_cosine_similar_target_and_averages():
    x = randn(2, 30, 8, seed=13)
    targets = torch.tensor([[0, 5, 9], [29, 1, 2]])
    dropped = complement_index(targets, 30)
    merged, assignment, size = merge_dropped(x, targets, dropped)
    for b in range(2):
        cos = F.cosine_similarity(x[b, dropped[b]].double().unsqueeze(1), x[b, targets[b]].double().unsqueeze(0), dim=-1)
        assert torch.equal(assignment[b], cos.argmax(dim=1))
        for j in range(3):
            group = torch.cat([targets[b, j : j + 1], dropped[b][assignment[b] == j]])
            assert size[b, j] == len(group)
            torch.testing.assert_close(merged[b, j], x[b, group].mean(0))


# --------------------------------------------------------------------------------------------------
# apet_compress
# --------------------------------------------------------------------------------------------------


def group_means_hold(x, tokens, kept, info) -> None:
    """Each merge target's output equals the mean of its group, rebuilt from the assignment."""
    for b in range(x.shape[0]):
        pos = {int(p): i for i, p in enumerate(kept[b])}
        for j, t in enumerate(info.target_index[b].tolist()):
            group = [t] + info.dropped_index[b][info.assignment[b] == j].tolist()
            assert info.group_size[b, j] == len(group)
            torch.testing.assert_close(tokens[b, pos[t]].float(), x[b, group].float().mean(0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("basis", BASES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_compress_shapes_partition_and_group_means(variant, basis):
    B, N, D, K = 3, 120, 16, 40
    x = randn(B, N, D, seed=14)
    tokens, kept, info = apet_compress(x, K, basis=basis, variant=variant, generator=gen(0))
    assert tokens.shape == (B, K, D) and kept.shape == (B, K) and tokens.dtype == x.dtype
    assert torch.equal(kept, kept.sort(dim=1).values)
    for b in range(B):
        assert len(set(kept[b].tolist())) == K
        assert set(kept[b].tolist()) | set(info.dropped_index[b].tolist()) == set(range(N))
        assert not set(kept[b].tolist()) & set(info.dropped_index[b].tolist())
    assert info.num_basis == 10 and info.error.dtype == torch.float32
    group_means_hold(x, tokens, kept, info)
    assert info.target_index.shape[1] == (K - 10 if variant == "official" else K)


def test_official_writes_basis_vectors_into_the_lowest_ranked_slots():
    x = randn(2, 100, 16, seed=15)
    tokens, kept, info = apet_compress(x, 30, generator=gen(1))
    lowest = info.order[:, 20:]
    assert torch.equal(info.slot_index, lowest.sort(dim=1).values)  # position pairing (vision stage)
    torch.testing.assert_close(info.order, rank_by_error(info.error, 30))
    for b in range(2):
        pos = {int(p): i for i, p in enumerate(kept[b])}
        for j, slot in enumerate(info.slot_index[b].tolist()):
            torch.testing.assert_close(tokens[b, pos[slot]], x[b, info.basis_index[b, j]])
    # the basis tokens' own positions have error ≈ 0 and are dropped (merged elsewhere)
    for b in range(2):
        assert not set(info.basis_index[b].tolist()) & set(kept[b].tolist())


def test_official_rank_pairing_and_blend():
    x = randn(1, 80, 8, seed=16)
    tokens, kept, info = apet_compress(x, 25, generator=gen(2), basis_slot_order="rank", basis_blend=0.5)
    assert torch.equal(info.slot_index, info.order[:, 15:])
    pos = {int(p): i for i, p in enumerate(kept[0])}
    for j, slot in enumerate(info.slot_index[0].tolist()):
        expected = 0.5 * x[0, info.basis_index[0, j]] + 0.5 * x[0, slot]
        torch.testing.assert_close(tokens[0, pos[slot]], expected)


@pytest.mark.parametrize("basis", BASES)
def test_paper_keeps_basis_tokens_at_their_own_positions(basis):
    x = randn(2, 100, 16, seed=17)
    tokens, kept, info = apet_compress(x, 30, basis=basis, variant="paper", generator=gen(3))
    for b in range(2):
        assert set(info.basis_index[b].tolist()) <= set(kept[b].tolist())
        rest = [i for i in info.order[b].tolist() if i not in set(info.basis_index[b].tolist())]
        err = info.error[b]
        dropped = info.dropped_index[b]
        assert float(err[rest].min()) >= float(err[dropped].max())  # the others are the top errors
    group_means_hold(x, tokens, kept, info)  # basis tokens are merge targets too


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize(
    "n, keep, batch",
    [
        # LLaVA-1.5 (docs/methods/apet.md): vision stage 1.5 B of 576, LLM stage 0.5 B of 1.5 B
        (576, 288, 1), (576, 192, 1), (576, 96, 1), (288, 96, 1), (192, 64, 1), (96, 32, 1),
        # LLaVA-NeXT 640/320/160: per sub-image (base + 4 crops batched), then the LLM stage
        (576, 192, 5), (576, 96, 5), (576, 48, 5), (192, 64, 5), (96, 32, 5), (48, 16, 5),
        # Qwen2.5-VL 20% / 10% of 729: int(0.30 N), int(0.15 N), then x0.333 at layer 14
        (729, int(0.30 * 729), 1), (729, int(0.15 * 729), 1), (218, int(0.333 * 218), 1), (109, int(0.333 * 109), 1),
        # Video-LLaVA per frame: 22 + 10 basis of 256, 8 frames
        (256, 32, 8),
    ],
)
def test_kept_count_equals_the_plan(n, keep, batch, variant):
    x = randn(batch, n, 16, seed=n + keep)
    tokens, kept, info = apet_compress(x, keep, variant=variant, generator=gen(0))
    assert tokens.shape == (batch, keep, 16) and kept.shape == (batch, keep)
    assert all(len(set(row.tolist())) == keep for row in kept)
    assert info.dropped_index.shape == (batch, n - keep)


@pytest.mark.parametrize("basis", BASES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_same_seed_same_output(variant, basis):
    x = randn(2, 90, 12, seed=18)
    a = apet_compress(x, 30, basis=basis, variant=variant, generator=gen(7))
    b = apet_compress(x, 30, basis=basis, variant=variant, generator=gen(7))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_different_seed_different_fps_start():
    x = randn(1, 576, 16, seed=19)
    a = apet_compress(x, 96, generator=gen(0))[2].basis_index[:, 0]
    b = apet_compress(x, 96, generator=gen(1))[2].basis_index[:, 0]
    assert not torch.equal(a, b)


@pytest.mark.parametrize("basis", ["fps", "dpc"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_batched_equals_per_sample(variant, basis):
    x = randn(4, 70, 12, seed=20)
    start = torch.tensor([3, 0, 69, 31])  # FPS: the same starts; DPC: its 1e-6 tie noise is immaterial
    tb, kb, ib = apet_compress(x, 20, basis=basis, variant=variant, start_index=start, generator=gen(0))
    for b in range(4):
        t, k, i = apet_compress(
            x[b : b + 1], 20, basis=basis, variant=variant, start_index=start[b : b + 1], generator=gen(b)
        )
        assert torch.equal(k, kb[b : b + 1]) and torch.equal(i.basis_index, ib.basis_index[b : b + 1])
        torch.testing.assert_close(t, tb[b : b + 1])
        torch.testing.assert_close(i.error, ib.error[b : b + 1])


def test_primitives_batched_equal_per_sample():
    x = randn(3, 50, 10, seed=21)
    start = torch.tensor([1, 2, 3])
    idx = fps(x, 7, start)
    err = approximation_error(x, idx)
    for b in range(3):
        assert torch.equal(fps(x[b : b + 1], 7, start[b : b + 1]), idx[b : b + 1])
        torch.testing.assert_close(approximation_error(x[b : b + 1], idx[b : b + 1]), err[b : b + 1])


# --------------------------------------------------------------------------------------------------
# degenerate input
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("basis", BASES)
@pytest.mark.parametrize("scale", [1.0, 100.0, 1e4])
def test_all_tokens_identical(variant, basis, scale):
    v = randn(1, 1, 64, seed=22) * scale
    x = v.expand(2, 50, 64).clone()
    tokens, kept, info = apet_compress(x, 12, basis=basis, variant=variant, generator=gen(0))
    assert torch.isfinite(tokens).all() and torch.isfinite(info.error).all()
    assert tokens.shape == (2, 12, 64)
    torch.testing.assert_close(tokens, v.expand(2, 12, 64), rtol=1e-5, atol=1e-5 * scale)
    assert torch.all(info.error < 1e-3 * scale)


def test_identical_tokens_use_the_pinv_fallback_instead_of_nan():
    x = (randn(1, 1, 32, seed=23) * 100).expand(1, 20, 32).clone()
    err = approximation_error(x, torch.zeros(1, 10, dtype=torch.long))
    assert torch.isfinite(err).all() and float(err.max()) < 1e-2
    _, fallback = ridge_coefficients(x, x[:, :10])
    assert fallback.all()  # the LU solve is exactly singular in fp32 here


def test_all_zero_tokens():
    x = torch.zeros(1, 30, 8)
    tokens, kept, info = apet_compress(x, 10, generator=gen(0))
    assert torch.equal(tokens, torch.zeros(1, 10, 8)) and torch.isfinite(info.error).all()


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("scale", [1.0, 1e3])
def test_rank_below_num_basis(variant, scale):
    # 3-dimensional data, M = 10: the Gram matrix has rank 3; every token lies in the span
    x = randn(2, 60, 3, seed=24) @ randn(2, 3, 32, seed=25) * scale
    tokens, kept, info = apet_compress(x, 20, variant=variant, generator=gen(0))
    assert torch.isfinite(tokens).all() and torch.isfinite(info.error).all()
    assert torch.all(info.error <= 1e-3 * x.norm(dim=-1).max())
    group_means_hold(x, tokens, kept, info)


@pytest.mark.parametrize("variant", VARIANTS)
def test_few_tokens_clamps_num_basis(variant):
    x = randn(2, 8, 16, seed=26)  # N = 8 <= M = 10
    tokens, kept, info = apet_compress(x, 5, num_basis=10, variant=variant, generator=gen(0))
    assert tokens.shape == (2, 5, 16) and torch.isfinite(tokens).all()
    assert info.num_basis == (4 if variant == "official" else 5)
    with pytest.raises(ValueError, match="num_samples=10 tokens from N=8"):
        fps(x, 10, torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="N=8"):
        dpc_basis(x, 10)
    # keep = 1 (official): no basis slot can be spared, so M = 0 and the top token by norm is kept
    t1, k1, i1 = apet_compress(x, 1, generator=gen(0))
    assert i1.num_basis == 0 and torch.equal(k1[:, 0], x.norm(dim=-1).argmax(dim=1))
    torch.testing.assert_close(t1[:, 0], x.mean(dim=1))


@pytest.mark.parametrize("bad, word", [(math.nan, "NaN"), (math.inf, "inf"), (-math.inf, "inf")])
def test_non_finite_features_raise(bad, word):
    x = randn(2, 20, 8, seed=27)
    x[1, 7, 3] = bad
    for call in (
        lambda: apet_compress(x, 5),
        lambda: fps(x, 3, torch.zeros(2, dtype=torch.long)),
        lambda: approximation_error(x, torch.zeros(2, 3, dtype=torch.long)),
        lambda: select_basis(x, 3, "dpc"),
        lambda: select_basis(x, 3, "random"),
    ):
        with pytest.raises(ValueError, match=word):
            call()


def test_fp32_overflowing_norm_raises():
    x = torch.full((1, 4, 8), 1e30)
    with pytest.raises(ValueError, match="too large for fp32"):
        apet_compress(x, 2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("variant", VARIANTS)
def test_half_input_computed_in_fp32_returned_in_input_dtype(dtype, variant):
    x = randn(2, 100, 32, seed=28, dtype=dtype)
    t, k, i = apet_compress(x, 30, variant=variant, generator=gen(4))
    t32, k32, i32 = apet_compress(x.float(), 30, variant=variant, generator=gen(4))
    assert t.dtype == dtype and i.error.dtype == torch.float32
    assert torch.equal(k, k32) and torch.equal(t, t32.to(dtype))


def test_budget_at_or_above_n_is_identity():
    x = randn(2, 16, 8, seed=29, dtype=torch.bfloat16)
    for keep in (16, 40):
        tokens, kept, info = apet_compress(x, keep)
        assert tokens is x and torch.equal(kept, torch.arange(16).expand(2, 16))
        assert info.error is None and info.num_basis == 0


def test_invalid_arguments():
    x = randn(1, 20, 4)
    with pytest.raises(ValueError, match="keep"):
        apet_compress(x, 0)
    with pytest.raises(TypeError, match="keep"):
        apet_compress(x, 2.5)
    with pytest.raises(ValueError, match="basis method"):
        apet_compress(x, 5, basis="kmeans")
    with pytest.raises(ValueError, match="variant"):
        apet_compress(x, 5, variant="faithful")
    with pytest.raises(ValueError, match="basis_blend"):
        apet_compress(x, 5, basis_blend=2.0)
    with pytest.raises(ValueError, match=r"\(B, N, D\)"):
        apet_compress(x[0], 5)
    with pytest.raises(TypeError, match="floating"):
        apet_compress(torch.ones(1, 20, 4, dtype=torch.long), 5)
