"""ApET tensor primitives: basis selection, approximation error, top-K selection and similarity merge.

ApET (Approximation-Error guided Token compression, CVPR 2026; paper §3.3, Eq. 4–5, Fig. 3) scores
every visual token by how badly a small set of *basis* tokens reconstructs it with a linear
combination, keeps the K tokens with the largest error and merges every dropped token into its most
cosine-similar kept token. This module holds the pure tensor parts, batched over a leading dimension
``B`` (images, sub-images, frames or samples), with no model or config knowledge, in the manner of
ToMe's ``tome/merge.py``. The method class that places them in the models lives elsewhere.

Spec: ``docs/methods/apet.md`` (core primitive, and where the released code differs from the
paper). Official files (MaQianKun0/ApET @ 70cc01b): ``llava/model/utils.py`` (``fps``,
``cluster_and_merge``), ``llava/model/llava_arch.py`` (``encode_images``, ``token_merging``; vision
stage), ``llava/model/modeling_llama_x.py`` (``layer_prune``; LLM stage),
``qwen/model/qwen2_5_vl_custom.py`` (Qwen vision stage), ``video-llava/videollava/model/llava_arch.py``
(``encode_videos``). The code here is written from the spec, not copied.

Shapes: ``B`` batch, ``N`` tokens, ``D`` feature width, ``M`` basis tokens (``num_basis``; 10 in the
paper), ``K`` kept tokens (``keep``), ``T`` merge targets (``K - M`` official, ``K`` paper).

Numerics (``numerics=``, every public function that has a dtype-sensitive step):

* ``"fp32"`` (the library default): everything is computed in fp32 (FPS on centred features, the ridge
  solve, the error, the cosine similarity and the merge) and the returned tokens are cast back to the
  input dtype.
* ``"official"``: the dtype and order of operations of the official code (MaQianKun0/ApET @ 70cc01b,
  ``llava/model/utils.py`` ``fps``; ``llava/model/llava_arch.py`` ``encode_images`` /
  ``token_merging``): FPS in the input dtype (``((x - c) ** 2).sum(-1)``, so fp16 squared distances
  above 65504 become ``inf``; the running distance starts at 1e10 in fp32, so every token whose distance
  overflowed ties at 1e10 and the lowest index wins), the ridge solve and the error in fp32 from the
  input values, the basis write and the merge (``F.cosine_similarity``, ``scatter_add_``, division by
  the group size) in ``merge_dtype`` (default: the input dtype; the LLaVA LLM stage merges in fp32).

The approximation error is always fp32. NaN or inf features raise ``ValueError``.

Composition (``apet_compress``), per sample::

    basis  = select_basis(x, M)                        # FPS from a seeded random start (default)
    error  = ||x - A·basis||₂,  A = (basis·basisᵀ + εI)⁻¹ basis·xᵀ     (ridge normal equations, ε=1e-5)
    order  = the K highest-error tokens, descending    (official) / basis tokens + K-M highest (paper)
    merge  : every dropped token joins its most cosine-similar target; a target becomes the plain mean
             of itself and its dropped tokens
    official: the M lowest-ranked of the K slots are overwritten with the basis vectors
    output = the K kept tokens in ascending position order

Other official layouts are composed from the same primitives by the caller: Video-LLaVA keeps the 22
highest-error tokens per frame, all of them merge targets, in descending-error order, and appends the
10 basis vectors (``rank_by_error`` + ``merge_dropped`` + ``torch.cat``).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

__all__ = [
    "NUMERICS",
    "ApETInfo",
    "Basis",
    "apet_compress",
    "approximation_error",
    "approximation_error_from_basis",
    "check_features",
    "complement_index",
    "dpc_basis",
    "fps",
    "fps_start_index",
    "merge_dropped",
    "random_basis",
    "rank_by_error",
    "ridge_coefficients",
    "select_basis",
]

#: Ridge ε of the official code (every stage except Qwen's disabled LLM stage, which uses 1e-1).
DEFAULT_RIDGE = 1e-5
BASIS_METHODS = ("fps", "dpc", "random")
VARIANTS = ("official", "paper")
SLOT_ORDERS = ("position", "rank")
#: ``"official"``: the official code's dtypes and order of operations; ``"fp32"``: fp32 throughout.
NUMERICS = ("official", "fp32")
#: Initial running distance of the official ``fps`` (``torch.full((B, N), 1e10)``, default dtype fp32).
OFFICIAL_FPS_INIT = 1e10
#: Elements of one ``F.cosine_similarity`` broadcast block in the official merge (memory bound, no effect
#: on the result: every (dropped, target) pair is computed independently).
_COS_BLOCK_ELEMENTS = 1 << 25


# --------------------------------------------------------------------------------------------------
# validation helpers
# --------------------------------------------------------------------------------------------------


def _check_int(value: object, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _check_tokens(x: torch.Tensor, name: str = "x") -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 3:
        raise ValueError(f"{name} must have shape (B, N, D), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")


def _raise_non_finite(x: torch.Tensor, name: str) -> None:
    """Raise the ValueError that names what is wrong with ``x`` (called once a check has failed)."""
    if torch.isnan(x).any():
        raise ValueError(f"{name} contains NaN features; ApET cannot rank tokens with NaN inputs")
    if torch.isinf(x).any():
        raise ValueError(f"{name} contains inf features; ApET cannot rank tokens with infinite inputs")
    raise ValueError(
        f"{name} has features too large for fp32: a squared token norm overflows to inf "
        f"(max |x| = {x.abs().max().item():.3g})"
    )


def check_features(x: torch.Tensor, name: str = "x") -> torch.Tensor:
    """Validate visual-token features and return their squared L2 norms in fp32.

    The norms double as the finiteness check (a NaN or inf element makes its token's squared norm
    non-finite), so the full-size ``isfinite`` pass is only run to name the problem.

    Parameters
    ----------
    x : torch.Tensor
        ``(B, N, D)`` floating-point features, any float dtype.
    name : str
        Name used in error messages.

    Returns
    -------
    torch.Tensor
        ``(B, N)`` fp32 squared norms ``||x_n||²``.

    Raises
    ------
    TypeError
        ``x`` is not a floating-point tensor.
    ValueError
        ``x`` is not 3-D, or contains NaN or inf, or a squared norm overflows fp32.
    """
    _check_tokens(x, name)
    sq = torch.linalg.vector_norm(x, dim=-1, dtype=torch.float32).square()
    if not bool(torch.isfinite(sq).all()):
        _raise_non_finite(x, name)
    return sq


def _check_numerics(numerics: object) -> str:
    if numerics not in NUMERICS:
        raise ValueError(f"numerics must be one of {NUMERICS}, got {numerics!r}")
    return str(numerics)


def _check_index(index: torch.Tensor, batch: int, num_tokens: int, name: str) -> None:
    if not isinstance(index, torch.Tensor) or index.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name} must be an int64 (or int32) tensor")
    if index.ndim != 2 or index.shape[0] != batch:
        raise ValueError(f"{name} must have shape (B={batch}, M), got {tuple(index.shape)}")
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= num_tokens):
        raise IndexError(f"{name} has values outside [0, {num_tokens})")


def _flat_index(index: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Row indices into the (B * N) flattened token axis: (B, J) -> (B * J,)."""
    offsets = torch.arange(index.shape[0], device=index.device).unsqueeze(1) * num_tokens
    return (index + offsets).reshape(-1)


def _gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[b, index[b, j]]`` for every b, j: (B, N, D), (B, J) -> (B, J, D).

    ``index_select`` on the flattened token axis copies whole rows; it is several times faster on CPU
    than ``gather`` with an expanded index or advanced indexing.
    """
    B, N, D = x.shape
    rows = x.reshape(B * N, D).index_select(0, _flat_index(index, N))
    return rows.view(B, index.shape[1], D)


# --------------------------------------------------------------------------------------------------
# 1. basis selection
# --------------------------------------------------------------------------------------------------


def fps_start_index(
    batch: int,
    num_tokens: int,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Draw the FPS start token of every sample, uniformly in ``[0, num_tokens)``.

    The official ``fps`` draws ``torch.randint(0, N, (B,))`` from the global RNG (unseeded, so its runs
    are not reproducible; docs/methods/apet.md). Here the draw comes from ``generator`` when given, on
    the generator's own device, so a CPU generator gives the same starts on CPU and GPU.

    Parameters
    ----------
    batch, num_tokens : int
        ``B`` and ``N`` (``N >= 1``).
    generator : torch.Generator, optional
        Seeded generator; ``None`` uses torch's global RNG (the official behaviour).
    device : torch.device or str, optional
        Device of the returned tensor (default: the generator's device, else CPU).

    Returns
    -------
    torch.Tensor
        ``(B,)`` int64 start indices.
    """
    _check_int(batch, "batch", 0)
    _check_int(num_tokens, "num_tokens", 1)
    draw_device = generator.device if generator is not None else (device or "cpu")
    start = torch.randint(0, num_tokens, (batch,), generator=generator, device=draw_device)
    return start if device is None else start.to(device)


def fps(
    x: torch.Tensor, num_samples: int, start_index: torch.Tensor, *, numerics: str = "fp32"
) -> torch.Tensor:
    """Farthest point sampling of ``num_samples`` tokens per sample, from a given start token.

    Step i picks the token with the largest squared Euclidean distance to the set picked so far
    (the running minimum over picked tokens), on the raw features (no normalisation), as the official
    ``fps`` (``llava/model/utils.py``; docs/methods/apet.md). Ties go to the lowest index (``argmax``).

    ``numerics="official"`` runs the official loop as written, in the input dtype
    (:func:`_fps_official`); the rest of this paragraph and the list below describe ``"fp32"``.

    Implementation: vectorised over B; the features are centred once (per sample; distances do not
    change, but a large common offset, as LLM hidden states have, would otherwise cost the expansion
    its digits), then one ``(B, N, D) @ (B, D)`` product per step, with
    ``||x - c||² = ||x||² - 2 x·c + ||c||²`` instead of materialising ``x - c``. Differences from the
    official code (the last one is at fp32 rounding level):

    * the official code runs in the input dtype (fp16 at the LLaVA vision stage, where the squared
      distances of LLM hidden states can overflow); ``"fp32"`` computes in fp32;
    * the official running distance starts at 1e10; here at +inf (differs only for squared distances
      above 1e10);
    * a squared distance below the rounding level of the expansion,
      ``4·sqrt(D)·eps_fp32·(||x||² + ||c||²)``, counts as 0, and a picked token's own distance is 0
      exactly, so duplicates of picked tokens are never "farther" than genuinely new points.

    Parameters
    ----------
    x : torch.Tensor
        ``(B, N, D)`` features, any float dtype (computed in fp32).
    num_samples : int
        ``M``, with ``0 <= M <= N``.
    start_index : torch.Tensor
        ``(B,)`` int64 index of the first pick of every sample (see ``fps_start_index``).
    numerics : {"fp32", "official"}
        See the module docstring.

    Returns
    -------
    torch.Tensor
        ``(B, M)`` int64 token indices in pick order (``index[:, 0] == start_index``). When the
        features have fewer than M distinct points, later picks repeat (all remaining distances are 0
        and the lowest index wins), as in the official code.

    Raises
    ------
    ValueError
        ``M > N``, bad shapes, NaN / inf features, or an unknown ``numerics``.
    IndexError
        ``start_index`` outside ``[0, N)``.
    """
    numerics = _check_numerics(numerics)
    sq = check_features(x)
    B, N, D = x.shape
    M = _check_int(num_samples, "num_samples", 0)
    if M > N:
        raise ValueError(f"fps cannot pick num_samples={M} tokens from N={N}")
    if not isinstance(start_index, torch.Tensor) or start_index.shape != (B,):
        raise ValueError(f"start_index must be a tensor of shape (B={B},)")
    start = start_index.to(device=x.device, dtype=torch.long)
    if B and (int(start.min()) < 0 or int(start.max()) >= N):
        raise IndexError(f"start_index has values outside [0, {N})")
    if numerics == "official":
        return _fps_official(x, M, start)
    return _fps_core(x.float(), sq, M, start)


def _fps_official(x: torch.Tensor, M: int, start: torch.Tensor) -> torch.Tensor:
    """The official ``fps`` (``llava/model/utils.py`` @ 70cc01b; same in the Qwen and Video-LLaVA forks).

    ``x`` (B, N, D) in its own dtype; per step ``((x - c) ** 2).sum(-1)`` in that dtype (elementwise
    rounding, fp32 accumulation of the sum rounded once to the dtype, as torch's CUDA and CPU kernels
    do; an fp16 sum above 65504 is ``inf``), ``torch.min`` with the fp32 running distance that starts at
    1e10 (type promotion: the minimum is fp32, so an ``inf`` leaves the token at 1e10), next pick
    ``dist.max(1).indices`` (the first maximum). Only the start comes from ``start`` instead of the
    global RNG. Returns ``(B, M)`` int64 picks.
    """
    B, N, _ = x.shape
    index = torch.empty(B, M, dtype=torch.long, device=x.device)
    if M == 0 or B == 0:
        return index
    batch = torch.arange(B, device=x.device)
    dist = torch.full((B, N), OFFICIAL_FPS_INIT, dtype=torch.float32, device=x.device)
    farthest = start
    for i in range(M):
        index[:, i] = farthest
        centroid = x[batch, farthest].unsqueeze(1)  # (B, 1, D), x's dtype
        dist_cur = ((x - centroid) ** 2).sum(-1)  # (B, N), x's dtype (fp16: inf above 65504)
        dist = torch.min(dist, dist_cur)  # promoted to fp32
        farthest = dist.max(dim=1).indices
    return index


def _fps_core(xf: torch.Tensor, sq: torch.Tensor, M: int, start: torch.Tensor) -> torch.Tensor:
    """FPS on validated fp32 features ``xf`` (B, N, D) with squared norms ``sq`` (B, N)."""
    B, N, D = xf.shape
    index = torch.empty(B, M, dtype=torch.long, device=xf.device)
    if M == 0 or B == 0:
        return index
    if M > 1:  # centre first: distances are shift-invariant, and the expansion below is not
        xf = xf - xf.mean(dim=1, keepdim=True)
        sq = torch.linalg.vector_norm(xf, dim=-1).square()
    offsets = torch.arange(B, device=xf.device) * N
    x_rows, sq_flat = xf.reshape(B * N, D), sq.reshape(B * N)
    tol = 4.0 * math.sqrt(D) * torch.finfo(torch.float32).eps
    dist = torch.full((B, N), math.inf, device=xf.device)
    current = start
    for i in range(M):
        index[:, i] = current
        flat = current + offsets  # (B,)
        centre = x_rows.index_select(0, flat)  # (B, D)
        centre_sq = sq_flat.index_select(0, flat).unsqueeze(1)  # (B, 1)
        d = torch.bmm(xf, centre.unsqueeze(-1)).squeeze(-1)  # (B, N)  x·c
        d = (sq + centre_sq).sub_(d, alpha=2.0)  # ||x - c||²
        d.masked_fill_(d <= tol * (sq + centre_sq), 0.0)
        d.view(-1).index_fill_(0, flat, 0.0)  # a picked token is at distance 0 exactly
        dist = torch.minimum(dist, d)
        current = dist.argmax(dim=1)
    return index


def random_basis(
    x: torch.Tensor,
    num_basis: int,
    generator: torch.Generator | None = None,
    replacement: bool = True,
) -> torch.Tensor:
    """Random basis tokens (the "Random" row of the paper's Table 5).

    Official (``encode_images`` / ``layer_prune``, ``selection_method='random'``):
    ``torch.randint(0, N, (B, M))``, i.e. **with replacement** (a token can be drawn twice). The
    paper's text ("M visual tokens are randomly selected", a subset B ⊂ V) reads as without
    replacement; ``replacement=False`` draws M distinct tokens (``torch.randperm`` per sample).

    Parameters
    ----------
    x : torch.Tensor
        ``(B, N, D)`` features (only the shape and device are used).
    num_basis : int
        ``M >= 0``; with ``replacement=False``, ``M <= N``.
    generator : torch.Generator, optional
        Seeded generator (draws on its own device); ``None`` uses the global RNG.
    replacement : bool
        True: official (independent uniform draws). False: M distinct tokens.

    Returns
    -------
    torch.Tensor
        ``(B, M)`` int64 token indices.

    Raises
    ------
    ValueError
        ``M > N`` without replacement, or ``N == 0``.
    """
    _check_tokens(x)
    B, N, _ = x.shape
    M = _check_int(num_basis, "num_basis", 0)
    if N == 0 and M > 0:
        raise ValueError("random_basis needs at least one token")
    draw_device = generator.device if generator is not None else x.device
    if replacement:
        index = torch.randint(0, max(N, 1), (B, M), generator=generator, device=draw_device)
    else:
        if M > N:
            raise ValueError(f"random_basis cannot draw num_basis={M} distinct tokens from N={N}")
        keys = torch.rand(B, N, generator=generator, device=draw_device)
        index = keys.argsort(dim=1)[:, :M]  # a uniform random M-subset per sample, in random order
    return index.to(x.device)


def _pairwise_distance(xf: torch.Tensor, sq: torch.Tensor) -> torch.Tensor:
    """Euclidean distances (B, N, N) from fp32 features (B, N, D) and their squared norms (B, N)."""
    d2 = sq.unsqueeze(2) + sq.unsqueeze(1) - 2.0 * torch.bmm(xf, xf.transpose(1, 2))
    d2 = d2.clamp_min_(0.0)
    d2.diagonal(dim1=1, dim2=2).zero_()
    return d2.sqrt_()


def dpc_basis(
    x: torch.Tensor,
    num_basis: int,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Density-peak clustering (DPC-KNN) basis: M cluster centres, their clusters and cluster means.

    Follows the official ``cluster_and_merge`` (``llava/model/utils.py``, the TCFormer DPC-KNN; the
    "DPC" row of the paper's Table 5), per sample:

    1. ``dist = ||x_i - x_j||₂ / sqrt(D)`` on raw features;
    2. local density ``rho_i = exp(-mean_k dist(i, k)²)`` over its M nearest tokens (itself
       included), plus uniform noise × 1e-6 to break ties (drawn from ``generator``; official: the
       global RNG). For features with large distances every ``rho`` underflows to 0 and the noise
       decides, as in the official code;
    3. ``delta_i`` = distance to the nearest token of higher density (the global max distance for the
       densest token);
    4. centres = the M tokens with the largest ``rho · delta``, in descending score order;
    5. every token joins its nearest centre (a centre always joins itself);
    6. cluster mean = sum / (size + 1e-6) (the official ``+ 1e-6`` guard is kept).

    The official code returns only the cluster means, which are the basis vectors of its DPC path
    (they are not tokens). Differences: computed in fp32 with a matrix-product distance on centred
    features (the official code broadcasts an (N, N, D) difference, in fp16 at the vision stage);
    score ties are broken by
    the lowest index (official ``topk``: implementation-defined). Note: the official ``utils.py`` uses
    ``einops`` without importing it, so its DPC path raises ``NameError`` as shipped in the LLaVA code
    (the Qwen utils import it). Cost is O(B·N²·D) time and O(B·N²) memory.

    Parameters
    ----------
    x : torch.Tensor
        ``(B, N, D)`` features, any float dtype (computed in fp32).
    num_basis : int
        ``M``, with ``0 <= M <= N`` (also the k of the k-nearest-neighbour density).
    generator : torch.Generator, optional
        Seeded generator for the tie-breaking noise; ``None`` uses the global RNG.

    Returns
    -------
    centre_index : torch.Tensor
        ``(B, M)`` int64 centre tokens, in descending ``rho · delta`` order.
    cluster_mean : torch.Tensor
        ``(B, M, D)`` fp32 mean of cluster j (``cluster_mean[:, j]`` belongs to ``centre_index[:, j]``).
    assignment : torch.Tensor
        ``(B, N)`` int64 cluster (0..M-1) of every token.

    Raises
    ------
    ValueError
        ``M > N``, bad shapes, NaN / inf features.
    """
    check_features(x)
    B, N, D = x.shape
    M = _check_int(num_basis, "num_basis", 0)
    if M > N:
        raise ValueError(f"dpc_basis cannot form num_basis={M} clusters from N={N} tokens")
    return _dpc_core(x.float(), M, generator)


def _dpc_core(
    xf: torch.Tensor, M: int, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPC-KNN on validated fp32 features (see ``dpc_basis``)."""
    B, N, D = xf.shape
    dev = xf.device
    if M == 0:
        return (
            torch.empty(B, 0, dtype=torch.long, device=dev),
            xf.new_empty(B, 0, D),
            torch.zeros(B, N, dtype=torch.long, device=dev),
        )
    xc = xf - xf.mean(dim=1, keepdim=True)  # shift-invariant; keeps the expansion's digits
    dist = _pairwise_distance(xc, torch.linalg.vector_norm(xc, dim=-1).square()) / math.sqrt(D)  # (B, N, N)
    del xc
    knn = dist.topk(M, dim=-1, largest=False).values  # (B, N, M)
    density = torch.exp(-knn.square().mean(dim=-1))  # (B, N)
    noise_device = generator.device if generator is not None else dev
    density = density + torch.rand(B, N, generator=generator, device=noise_device).to(dev) * 1e-6

    higher = density.unsqueeze(1) > density.unsqueeze(2)  # [b, i, j]: rho_j > rho_i
    dist_max = dist.flatten(1).amax(dim=1).view(B, 1, 1)
    delta = torch.where(higher, dist, dist_max).amin(dim=-1)  # (B, N)
    score = delta * density
    centres = score.sort(dim=1, descending=True, stable=True).indices[:, :M]  # (B, M)

    to_centre = _gather_tokens(dist, centres)  # (B, M, N): distance rows of the centres
    assignment = to_centre.argmin(dim=1)  # (B, N)
    assignment.scatter_(1, centres, torch.arange(M, device=dev).expand(B, M))

    sums = xf.new_zeros(B * M, D).index_add_(0, _flat_index(assignment, M), xf.reshape(B * N, D)).view(B, M, D)
    sizes = xf.new_zeros(B, M).scatter_add_(1, assignment, xf.new_ones(B, N))
    cluster_mean = sums / (sizes.unsqueeze(-1) + 1e-6)
    return centres, cluster_mean, assignment


@dataclass(frozen=True)
class Basis:
    """A selected basis.

    Attributes
    ----------
    index : torch.Tensor
        ``(B, M)`` int64 basis tokens (FPS / random: the tokens whose features form the basis; DPC: the
        cluster centres).
    vectors : torch.Tensor
        ``(B, M, D)`` fp32 basis vectors used for the fit (the gathered tokens, or for DPC under the
        official code the cluster means).
    """

    index: torch.Tensor
    vectors: torch.Tensor


def select_basis(
    x: torch.Tensor,
    num_basis: int,
    method: Literal["fps", "dpc", "random"] = "fps",
    generator: torch.Generator | None = None,
    *,
    start_index: torch.Tensor | None = None,
    dpc_vectors: Literal["cluster_mean", "centre"] = "cluster_mean",
    replacement: bool = True,
    numerics: str = "fp32",
) -> Basis:
    """Select ``M`` basis tokens per sample (paper §3.3 "Token Selection", Table 5 ablation).

    Parameters
    ----------
    x : torch.Tensor
        ``(B, N, D)`` features, any float dtype.
    num_basis : int
        ``M`` (10 in the paper; Table 6 varies it), ``0 <= M <= N``.
    method : {"fps", "dpc", "random"}
        ``fps`` (default, official): farthest point sampling from a random start; ``dpc``: density-peak
        clustering (``dpc_basis``); ``random``: uniform draws (``random_basis``).
    generator : torch.Generator, optional
        Source of the FPS start, the DPC tie noise and the random draws; the same seed gives the same
        basis. ``None`` uses the global RNG (official, unseeded).
    start_index : torch.Tensor, optional
        ``(B,)`` FPS start tokens; overrides the draw from ``generator`` (fps only).
    dpc_vectors : {"cluster_mean", "centre"}
        DPC basis vectors: the cluster means (official) or the centre tokens themselves (the paper's
        "basis token subset B ⊂ V").
    replacement : bool
        Random draws with replacement (official) or M distinct tokens.
    numerics : {"fp32", "official"}
        ``"official"`` runs FPS in the input dtype (:func:`fps`). DPC always runs in fp32 (the official
        LLaVA DPC path raises ``NameError``, see :func:`dpc_basis`); random draws have no arithmetic.

    Returns
    -------
    Basis
        ``index`` ``(B, M)`` int64 and ``vectors`` ``(B, M, D)`` fp32.

    Raises
    ------
    ValueError
        Unknown method, ``dpc_vectors`` or ``numerics``, ``M > N`` (fps, dpc, random without
        replacement), NaN / inf features.
    """
    numerics = _check_numerics(numerics)
    if method not in BASIS_METHODS:
        raise ValueError(f"unknown basis method {method!r}; expected one of {BASIS_METHODS}")
    if dpc_vectors not in ("cluster_mean", "centre"):
        raise ValueError(f"dpc_vectors must be 'cluster_mean' or 'centre', got {dpc_vectors!r}")
    sq = check_features(x)
    M = _check_int(num_basis, "num_basis", 0)
    return _select_basis_core(
        x.float(), sq, M, method, generator, start_index, dpc_vectors, replacement,
        x if numerics == "official" else None,
    )


def _select_basis_core(
    xf: torch.Tensor,
    sq: torch.Tensor,
    M: int,
    method: str,
    generator: torch.Generator | None,
    start_index: torch.Tensor | None,
    dpc_vectors: str,
    replacement: bool,
    x_official: torch.Tensor | None = None,
) -> Basis:
    """``select_basis`` on validated fp32 features ``xf`` (B, N, D) with squared norms ``sq``.

    ``x_official``: the features in their own dtype for the official FPS (``None``: fp32 FPS).
    """
    B, N, _ = xf.shape
    if method == "fps":
        if M > N:
            raise ValueError(f"fps cannot pick num_samples={M} tokens from N={N}")
        if start_index is None:
            start_index = fps_start_index(B, max(N, 1), generator, device=xf.device)
        elif not isinstance(start_index, torch.Tensor) or start_index.shape != (B,):
            raise ValueError(f"start_index must be a tensor of shape (B={B},)")
        start = start_index.to(device=xf.device, dtype=torch.long)
        if B and N and (int(start.min()) < 0 or int(start.max()) >= N):
            raise IndexError(f"start_index has values outside [0, {N})")
        if x_official is not None:
            index = _fps_official(x_official, M, start)
        else:
            index = _fps_core(xf, sq, M, start)
        return Basis(index, _gather_tokens(xf, index))
    if method == "random":
        index = random_basis(xf, M, generator, replacement=replacement)
        return Basis(index, _gather_tokens(xf, index))
    if M > N:
        raise ValueError(f"dpc_basis cannot form num_basis={M} clusters from N={N} tokens")
    centres, means, _ = _dpc_core(xf, M, generator)
    return Basis(centres, means if dpc_vectors == "cluster_mean" else _gather_tokens(xf, centres))


# --------------------------------------------------------------------------------------------------
# 2. approximation error
# --------------------------------------------------------------------------------------------------


def ridge_coefficients(
    x: torch.Tensor, basis: torch.Tensor, ridge: float = DEFAULT_RIDGE
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ridge least-squares coefficients of every token on the basis, via the normal equations.

    Solves ``(S Sᵀ + ε I) a_n = S x_n`` for all N tokens at once (one batched ``linalg.solve`` of an
    M × M system with N right-hand sides), in fp32, as the official code (docs/methods/apet.md: LU
    ``linalg.solve``, not ``lstsq`` or a pseudo-inverse). Paper Eq. 4: ``v ≈ Σ_i α_i b_i``.

    When ε is below fp32 resolution of the Gram matrix's diagonal (e.g. a basis of identical tokens with
    large norms) the LU solve meets an exactly singular matrix and would give NaN; for those samples
    the minimum-norm solution ``pinv(S Sᵀ + ε I) S x`` (the ε → 0 limit of the ridge solution) is used
    instead and flagged.

    Parameters
    ----------
    x : torch.Tensor
        ``(B, N, D)`` tokens, any float dtype (computed in fp32).
    basis : torch.Tensor
        ``(B, M, D)`` basis vectors ``S``.
    ridge : float
        ``ε >= 0`` added to the Gram diagonal (official: 1e-5).

    Returns
    -------
    coefficients : torch.Tensor
        ``(B, N, M)`` fp32 coefficients ``A`` (``x̂ = A S``).
    fallback : torch.Tensor
        ``(B,)`` bool, True where the pseudo-inverse fallback was used.

    Raises
    ------
    ValueError
        Mismatched shapes, negative or non-finite ``ridge``.
    """
    _check_tokens(x)
    _check_tokens(basis, "basis")
    _check_basis_shape(x, basis)
    _check_ridge(ridge)
    return _ridge_core(x.float(), basis.float(), float(ridge))


def _check_basis_shape(x: torch.Tensor, basis: torch.Tensor) -> None:
    if basis.shape[0] != x.shape[0] or basis.shape[2] != x.shape[2]:
        raise ValueError(f"basis {tuple(basis.shape)} does not match x {tuple(x.shape)} as (B, M, D)")


def _check_ridge(ridge: object) -> None:
    if isinstance(ridge, bool) or not (isinstance(ridge, numbers.Real) and math.isfinite(ridge) and ridge >= 0):
        raise ValueError(f"ridge must be a finite number >= 0, got {ridge!r}")


def _ridge_core(xf: torch.Tensor, s: torch.Tensor, ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Ridge coefficients (B, N, M) and fallback flags (B,) from fp32 tokens and basis."""
    B, N, _ = xf.shape
    M = s.shape[1]
    fallback = torch.zeros(B, dtype=torch.bool, device=xf.device)
    if M == 0:
        return xf.new_zeros(B, N, 0), fallback
    gram = torch.bmm(s, s.transpose(1, 2))  # (B, M, M)
    gram.diagonal(dim1=1, dim2=2).add_(ridge)
    rhs = torch.bmm(s, xf.transpose(1, 2))  # (B, M, N)
    coef, info = torch.linalg.solve_ex(gram, rhs)  # (B, M, N)
    bad = (info != 0) | ~torch.isfinite(coef).flatten(1).all(dim=1)
    if bool(bad.any()):
        fallback = bad
        coef = coef.clone()
        coef[bad] = torch.linalg.pinv(gram[bad], hermitian=True) @ rhs[bad]
    return coef.transpose(1, 2), fallback


def _error_core(xf: torch.Tensor, s: torch.Tensor, ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Approximation error (B, N) and fallback flags (B,) from fp32 tokens and basis."""
    coef, fallback = _ridge_core(xf, s, ridge)
    if s.shape[1] == 0:
        return torch.linalg.vector_norm(xf, dim=-1), fallback
    residual = torch.baddbmm(xf, coef, s, alpha=-1.0)  # x - A S, (B, N, D)
    return torch.linalg.vector_norm(residual, dim=-1), fallback


def _error_official(xf: torch.Tensor, s: torch.Tensor, ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The official error, operation for operation (``encode_images`` @ 70cc01b), in fp32.

    ``G = S Sᵀ + εI``, ``A = solve(G, S Xᵀ)ᵀ``, ``X̂ = A S``, ``error = ||X - X̂||`` (explicit ``matmul``
    then subtraction; ``"fp32"`` fuses the last two steps in ``baddbmm``). A singular ``G`` takes the
    pseudo-inverse fallback of :func:`ridge_coefficients` (the official ``linalg.solve`` raises).
    """
    coef, fallback = _ridge_core(xf, s, ridge)
    if s.shape[1] == 0:
        return torch.linalg.vector_norm(xf, dim=-1), fallback
    return torch.norm(xf - torch.matmul(coef, s), dim=-1), fallback


def approximation_error_from_basis(
    x: torch.Tensor, basis: torch.Tensor, ridge: float = DEFAULT_RIDGE, *, numerics: str = "fp32"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Approximation error of every token from arbitrary basis vectors (paper Eq. 5).

    ``error_n = ||x_n - Σ_m a_nm s_m||₂`` with ``a`` from ``ridge_coefficients``; the residual is formed
    explicitly (as the official code does), so a token in the span of the basis gets an error at fp32
    rounding level rather than the cancellation noise of an expanded quadratic form. With ``M == 0``
    the error is ``||x_n||``.

    Parameters
    ----------
    x : torch.Tensor
        ``(B, N, D)`` tokens, any float dtype.
    basis : torch.Tensor
        ``(B, M, D)`` basis vectors (tokens, or DPC cluster means).
    ridge : float
        Ridge ε (official 1e-5).
    numerics : {"fp32", "official"}
        Both solve in fp32 from the input values (as the official code, which calls ``.float()``
        first); ``"official"`` forms ``X̂`` with a separate ``matmul`` as the official code does.

    Returns
    -------
    error : torch.Tensor
        ``(B, N)`` fp32 L2 norm of each token's residual.
    fallback : torch.Tensor
        ``(B,)`` bool, samples solved with the pseudo-inverse fallback (see ``ridge_coefficients``).

    Raises
    ------
    ValueError
        Shapes, ridge, NaN / inf in ``x`` or ``basis``.
    """
    numerics = _check_numerics(numerics)
    check_features(x)
    check_features(basis, "basis")
    _check_basis_shape(x, basis)
    _check_ridge(ridge)
    core = _error_official if numerics == "official" else _error_core
    return core(x.float(), basis.float(), float(ridge))


def approximation_error(
    x: torch.Tensor, basis_index: torch.Tensor, ridge: float = DEFAULT_RIDGE
) -> torch.Tensor:
    """Approximation error of every token from the basis tokens ``x[b, basis_index[b]]``.

    Paper §3.3 Eq. 4–5 (``ξ = ||v - v'||₂``); official: ``encode_images`` / ``layer_prune``. Ridge
    least squares on the normal equations in fp32, ``(S Sᵀ + ε I) a = S x`` for every token at once,
    then the L2 norm of the residual. The input dtype does not matter: the result is fp32.

    Parameters
    ----------
    x : torch.Tensor
        ``(B, N, D)`` tokens, any float dtype.
    basis_index : torch.Tensor
        ``(B, M)`` int64 basis tokens (repeats allowed).
    ridge : float
        Ridge ε, default 1e-5 (official; Qwen's disabled LLM stage used 1e-1).

    Returns
    -------
    torch.Tensor
        ``(B, N)`` fp32 errors; ≈ 0 for tokens in the span of the basis (the basis tokens included),
        and the distance to the span otherwise (up to the ridge bias).

    Raises
    ------
    ValueError
        Shapes, ridge, NaN / inf features.
    IndexError
        ``basis_index`` outside ``[0, N)``.

    Examples
    --------
    >>> x = torch.randn(2, 576, 1024)
    >>> idx = fps(x, 10, torch.zeros(2, dtype=torch.long))
    >>> approximation_error(x, idx).shape
    torch.Size([2, 576])
    """
    _check_tokens(x)
    _check_index(basis_index, x.shape[0], x.shape[1], "basis_index")
    error, _ = approximation_error_from_basis(x, _gather_tokens(x, basis_index.long()), ridge)
    return error


# --------------------------------------------------------------------------------------------------
# 3. selection and merge
# --------------------------------------------------------------------------------------------------


def rank_by_error(error: torch.Tensor, keep: int) -> torch.Tensor:
    """The ``keep`` tokens with the largest approximation error, in descending error order.

    Official: ``torch.topk(errors, K).indices`` (sorted, descending). Here a stable descending sort,
    so equal errors are ranked by ascending index (``topk`` leaves that order implementation-defined;
    for distinct errors the result is the same).

    Parameters
    ----------
    error : torch.Tensor
        ``(B, N)`` errors (``+inf`` forces a token to the front).
    keep : int
        ``K``, ``0 <= K <= N``.

    Returns
    -------
    torch.Tensor
        ``(B, K)`` int64 token indices, highest error first.

    Raises
    ------
    ValueError
        ``K > N``, ``error`` not 2-D or containing NaN.
    """
    if error.ndim != 2:
        raise ValueError(f"error must have shape (B, N), got {tuple(error.shape)}")
    K = _check_int(keep, "keep", 0)
    if K > error.shape[1]:
        raise ValueError(f"cannot keep K={K} of N={error.shape[1]} tokens")
    if bool(torch.isnan(error).any()):
        raise ValueError("error contains NaN; cannot rank tokens")
    return error.sort(dim=1, descending=True, stable=True).indices[:, :K]


def complement_index(index: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Tokens not in ``index``, in ascending order: (B, K) distinct indices -> (B, N - K).

    Raises
    ------
    ValueError
        When a row of ``index`` has repeated entries (rows would have different lengths).
    """
    B, K = index.shape
    mask = torch.zeros(B, num_tokens, dtype=torch.bool, device=index.device)
    mask.scatter_(1, index, True)
    if int(mask.sum()) != B * K:
        raise ValueError("index rows must hold distinct token indices")
    return torch.argsort(mask.to(torch.uint8), dim=1, stable=True)[:, : num_tokens - K]


def merge_dropped(
    x: torch.Tensor,
    target_index: torch.Tensor,
    dropped_index: torch.Tensor,
    *,
    numerics: str = "fp32",
    dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Merge every dropped token into its most cosine-similar target; plain mean with the target.

    Official ``token_merging`` (``llava_arch.py``, ``modeling_llama_x.py``, Qwen and Video-LLaVA alike;
    paper §3.3 "Token Merging", average merging): ``a(d) = argmax_t cos(x_d, x_t)`` (ties: first target
    in ``target_index`` order), then ``x_t ← (x_t + Σ_{d: a(d)=t} x_d) / (1 + |{d: a(d)=t}|)``: an
    unweighted mean of the target and its group (``scaling = 1``), with no size tracking across calls.
    The argmax of ``cos`` is computed as the argmax of ``x_d · x_t / ||x_t||`` (dividing by
    ``||x_d||`` does not change it), in fp32 (the official vision stage merges in fp16, Qwen in bf16).

    ``numerics="official"`` runs the official operations in ``dtype`` (default: ``x``'s dtype): targets
    and dropped tokens gathered in that dtype, ``F.cosine_similarity`` of every (dropped, target) pair
    (broadcast in blocks of dropped tokens; identical values), ``argmax`` (first maximum),
    ``scatter_add_`` of the dropped tokens into their targets (one rounding to ``dtype`` per addition,
    in ascending dropped-token order on CPU; CUDA's atomic additions have no fixed order), and an
    in-place division by ``1 + count``.

    Parameters
    ----------
    x : torch.Tensor
        ``(B, N, D)`` features, any float dtype.
    target_index : torch.Tensor
        ``(B, T)`` int64 merge targets.
    dropped_index : torch.Tensor
        ``(B, R)`` int64 dropped tokens (disjoint from the targets).
    numerics : {"fp32", "official"}
        See above.
    dtype : torch.dtype, optional
        Compute dtype of ``"official"`` (default ``x.dtype``); ignored by ``"fp32"``.

    Returns
    -------
    merged : torch.Tensor
        ``(B, T, D)`` merged targets (row j is target ``target_index[:, j]``), fp32 (``"fp32"``) or
        ``dtype`` (``"official"``).
    assignment : torch.Tensor
        ``(B, R)`` int64 position in ``target_index`` that each dropped token joined.
    group_size : torch.Tensor
        ``(B, T)`` int64 ``1 +`` the number of dropped tokens merged into each target.

    Raises
    ------
    ValueError
        ``T == 0`` while ``R > 0`` (nothing to merge into); NaN / inf features; bad index shapes;
        unknown ``numerics``.
    IndexError
        Indices outside ``[0, N)``.
    """
    numerics = _check_numerics(numerics)
    check_features(x)
    _check_index(target_index, x.shape[0], x.shape[1], "target_index")
    _check_index(dropped_index, x.shape[0], x.shape[1], "dropped_index")
    if numerics == "official":
        return _merge_official(x.to(dtype or x.dtype), target_index.long(), dropped_index.long())
    return _merge_core(x.float(), target_index.long(), dropped_index.long())


def _merge_official(
    x: torch.Tensor, target_index: torch.Tensor, dropped_index: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The official ``token_merging`` (``llava_arch.py`` @ 70cc01b) in ``x``'s dtype (see ``merge_dropped``)."""
    B, T = target_index.shape
    R = dropped_index.shape[1]
    D = x.shape[-1]
    merged = _gather_tokens(x, target_index).clone()  # (B, T, D): retained_tokens * scaling (1)
    group_size = torch.ones(B, T, dtype=torch.long, device=x.device)
    if R == 0:
        return merged, dropped_index.new_empty(B, 0), group_size
    if T == 0:
        raise ValueError(f"cannot merge {R} dropped tokens into 0 targets")
    dropped = _gather_tokens(x, dropped_index)  # (B, R, D)
    assignment = torch.empty(B, R, dtype=torch.long, device=x.device)
    block = max(1, _COS_BLOCK_ELEMENTS // max(1, B * T * D))
    for lo in range(0, R, block):
        cos = F.cosine_similarity(dropped[:, lo : lo + block].unsqueeze(2), merged.unsqueeze(1), dim=3)  # (B, r, T)
        assignment[:, lo : lo + block] = cos.argmax(dim=2)
    merged.scatter_add_(1, assignment.unsqueeze(-1).expand(-1, -1, D), dropped)
    count = torch.zeros(B, T, dtype=torch.int, device=x.device)
    count.scatter_add_(1, assignment, torch.ones_like(assignment, dtype=count.dtype))
    merged /= 1 + count.unsqueeze(2)
    group_size += count.long()
    return merged, assignment, group_size


def _merge_core(
    xf: torch.Tensor, target_index: torch.Tensor, dropped_index: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``merge_dropped`` on validated fp32 features."""
    B, T = target_index.shape
    R = dropped_index.shape[1]
    targets = _gather_tokens(xf, target_index)  # (B, T, D)
    group_size = torch.ones(B, T, dtype=torch.long, device=xf.device)
    if R == 0:
        return targets, dropped_index.new_empty(B, 0), group_size
    if T == 0:
        raise ValueError(f"cannot merge {R} dropped tokens into 0 targets")
    dropped = _gather_tokens(xf, dropped_index)  # (B, R, D)
    t_norm = torch.linalg.vector_norm(targets, dim=-1).clamp_min(1e-8)  # (B, T)
    sim = torch.bmm(dropped, (targets / t_norm.unsqueeze(-1)).transpose(1, 2))  # (B, R, T)
    assignment = sim.argmax(dim=-1)  # (B, R)
    D = xf.shape[-1]
    merged = targets.reshape(B * T, D).index_add_(0, _flat_index(assignment, T), dropped.reshape(B * R, D))
    merged = merged.view(B, T, D)
    group_size.scatter_add_(1, assignment, torch.ones_like(assignment))
    merged.div_(group_size.unsqueeze(-1).to(merged.dtype))
    return merged, assignment, group_size


# --------------------------------------------------------------------------------------------------
# 4. composition
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ApETInfo:
    """What ``apet_compress`` did, per sample (all tensors batched over B).

    Attributes
    ----------
    variant : str
        ``"official"`` or ``"paper"``.
    num_basis : int
        ``M`` actually used (``min(num_basis, K - 1)`` official, ``min(num_basis, K)`` paper; 0 for a
        no-op).
    basis_index : torch.Tensor
        ``(B, M)`` basis tokens (DPC: cluster centres).
    basis : torch.Tensor
        ``(B, M, D)`` fp32 basis vectors used for the fit.
    error : torch.Tensor or None
        ``(B, N)`` fp32 approximation errors; None for a no-op (budget >= N).
    order : torch.Tensor
        ``(B, K)`` kept tokens by rank: descending error (official); basis tokens first, then by
        descending error (paper).
    target_index : torch.Tensor
        ``(B, T)`` merge targets (``order[:, :K-M]`` official, ``order`` paper).
    slot_index : torch.Tensor
        ``(B, M)`` official: the positions overwritten with ``basis[:, j]`` (row j); paper: ``(B, 0)``.
    dropped_index : torch.Tensor
        ``(B, N - K)`` dropped tokens, ascending.
    assignment : torch.Tensor
        ``(B, N - K)`` position in ``target_index`` that each dropped token joined.
    group_size : torch.Tensor
        ``(B, T)`` tokens averaged into each target (itself included).
    solver_fallback : torch.Tensor
        ``(B,)`` bool, samples whose ridge solve needed the pseudo-inverse fallback.
    """

    variant: str
    num_basis: int
    basis_index: torch.Tensor
    basis: torch.Tensor
    error: torch.Tensor | None
    order: torch.Tensor
    target_index: torch.Tensor
    slot_index: torch.Tensor
    dropped_index: torch.Tensor
    assignment: torch.Tensor
    group_size: torch.Tensor
    solver_fallback: torch.Tensor


def apet_compress(
    x: torch.Tensor,
    keep: int,
    num_basis: int = 10,
    basis: Literal["fps", "dpc", "random"] = "fps",
    variant: Literal["official", "paper"] = "official",
    generator: torch.Generator | None = None,
    *,
    ridge: float = DEFAULT_RIDGE,
    start_index: torch.Tensor | None = None,
    basis_slot_order: Literal["position", "rank"] = "position",
    basis_blend: float = 1.0,
    numerics: Literal["fp32", "official"] = "fp32",
    merge_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor, ApETInfo]:
    """Compress ``N`` tokens to ``K = keep`` with ApET (one stage; paper §3.3, docs/methods/apet.md).

    Steps: basis selection (``select_basis``), approximation error (``approximation_error_from_basis``),
    top-K selection, similarity merge (``merge_dropped``), basis placement, and output in ascending
    position order.

    ``variant="official"`` (what the released code does; docs/methods/apet.md):
        rank the K highest-error tokens; the ``K - M`` highest are merge targets kept at their own
        positions; the ``M`` lowest-ranked kept slots are overwritten with the basis vectors (the
        basis tokens' own positions usually have error ≈ 0 and are dropped and merged like any other
        token). ``basis_slot_order="position"`` pairs slots in ascending position with the basis in
        selection order (LLaVA and Qwen vision stages, boolean-mask assignment);
        ``"rank"`` gives ``order[:, K-M+j]`` the basis vector j (LLaVA LLM stage). A slot becomes
        ``basis_blend · basis + (1 - basis_blend) · x_slot`` (1.0 LLaVA; 0.5 Qwen vision stage). DPC
        basis vectors are the cluster means; random draws are with replacement.
    ``variant="paper"`` (what the paper describes, §3.3):
        the basis tokens are kept at their own positions and the ``K - M`` highest-error other tokens
        join them; every kept token (basis included) is a merge target. DPC uses the centre tokens
        as the basis; random draws are without replacement. ``basis_slot_order`` / ``basis_blend`` do
        not apply.

    ``M`` is clamped to ``K - 1`` (official: at least one merge target must remain; the official code
    would fail) or ``K`` (paper); ``info.num_basis`` reports the value used. A budget ``K >= N`` is a
    no-op: the input is returned as is, with indices ``arange(N)``.

    Parameters
    ----------
    x : torch.Tensor
        ``(B, N, D)`` visual tokens of B independent images / sub-images / frames / samples, any float
        dtype (computed in fp32).
    keep : int
        ``K >= 1`` tokens kept per sample (the stage's budget, e.g. 1.5 × B at the vision stage).
    num_basis : int
        ``M >= 0``, default 10.
    basis : {"fps", "dpc", "random"}
        Basis selection (Table 5).
    variant : {"official", "paper"}
        See above.
    generator : torch.Generator, optional
        Seeded source of the FPS start / DPC noise / random basis; the same seed gives the same output.
        ``None`` uses the global RNG (official, unseeded).
    ridge : float
        Ridge ε (1e-5).
    start_index : torch.Tensor, optional
        ``(B,)`` FPS start tokens (overrides ``generator`` for the start).
    basis_slot_order : {"position", "rank"}
        Official only; see above.
    basis_blend : float
        Official only, in [0, 1]; see above.
    numerics : {"fp32", "official"}
        ``"fp32"``: fp32 throughout. ``"official"``: FPS in ``x``'s dtype, solve and error in fp32
        (official form), basis write / blend and merge in ``merge_dtype`` (module docstring). DPC
        runs in fp32 under both.
    merge_dtype : torch.dtype, optional
        ``"official"`` only: dtype of the basis write, blend and merge (default ``x.dtype``; fp32 at the
        official LLaVA LLM stage, ``modeling_llama_x.py`` ``layer_prune``).

    Returns
    -------
    tokens : torch.Tensor
        ``(B, K, D)`` compressed tokens in the input dtype, in ascending original position.
    kept_index : torch.Tensor
        ``(B, K)`` int64 original positions of ``tokens`` (sorted ascending, distinct).
    info : ApETInfo
        Basis, errors, ranking, merge groups (see ``ApETInfo``).

    Raises
    ------
    ValueError
        NaN / inf features, ``keep < 1``, ``num_basis < 0``, unknown ``basis`` / ``variant`` /
        ``basis_slot_order`` / ``numerics``, ``basis_blend`` outside [0, 1], bad ``ridge``.
    TypeError
        Non-float ``x``, non-int ``keep`` / ``num_basis``.

    Examples
    --------
    >>> g = torch.Generator().manual_seed(0)
    >>> x = torch.randn(1, 576, 1024)
    >>> tokens, kept, info = apet_compress(x, keep=288, generator=g)
    >>> tokens.shape, kept.shape
    (torch.Size([1, 288, 1024]), torch.Size([1, 288]))
    """
    sq = check_features(x)
    B, N, D = x.shape
    K = _check_int(keep, "keep", 1)
    M = _check_int(num_basis, "num_basis", 0)
    if basis not in BASIS_METHODS:
        raise ValueError(f"unknown basis method {basis!r}; expected one of {BASIS_METHODS}")
    if variant not in VARIANTS:
        raise ValueError(f"unknown ApET variant {variant!r}; expected one of {VARIANTS}")
    if basis_slot_order not in SLOT_ORDERS:
        raise ValueError(f"basis_slot_order must be one of {SLOT_ORDERS}, got {basis_slot_order!r}")
    if not (isinstance(basis_blend, numbers.Real) and 0.0 <= basis_blend <= 1.0):
        raise ValueError(f"basis_blend must be in [0, 1], got {basis_blend!r}")
    numerics = _check_numerics(numerics)
    dev = x.device
    empty = torch.empty(B, 0, dtype=torch.long, device=dev)

    if K >= N:  # no-op
        arange = torch.arange(N, device=dev).expand(B, N)
        info = ApETInfo(
            variant, 0, empty, x.new_empty(B, 0, D, dtype=torch.float32), None, arange, arange, empty,
            empty, empty, torch.ones(B, N, dtype=torch.long, device=dev),
            torch.zeros(B, dtype=torch.bool, device=dev),
        )
        return x, arange, info

    _check_ridge(ridge)
    official = variant == "official"
    M = min(M, K - 1 if official else K)
    xf = x.float()  # the one fp32 copy (a no-op for fp32 input)
    exact = numerics == "official"
    sel = _select_basis_core(
        xf, sq, M, basis, generator, start_index,
        "cluster_mean" if official else "centre", official, x if exact else None,
    )
    error, fallback = (_error_official if exact else _error_core)(xf, sel.vectors, float(ridge))
    if not bool(torch.isfinite(error).all()):  # cannot happen for finite x; never return silent NaN
        raise RuntimeError("ApET approximation error is not finite")

    if official:
        order = rank_by_error(error, K)
        targets = order[:, : K - M]
        slots = order[:, K - M :]
        if basis_slot_order == "position":
            slots = slots.sort(dim=1).values
    else:
        forced = error.scatter(1, sel.index, math.inf)  # basis tokens first (ties: ascending index)
        order = rank_by_error(forced, K)
        targets, slots = order, empty
    dropped = complement_index(order, N)
    if exact:  # official dtype: basis write / blend and merge in merge_dtype
        xm = x.to(merge_dtype or x.dtype)
        merged, assignment, group_size = _merge_official(xm, targets, dropped)
        basis_m = sel.vectors.to(xm.dtype)
    else:
        xm, basis_m = xf, sel.vectors
        merged, assignment, group_size = _merge_core(xf, targets, dropped)

    if official and M > 0:
        slot_values = basis_m
        if basis_blend != 1.0:
            slot_values = basis_blend * basis_m + (1.0 - basis_blend) * _gather_tokens(xm, slots)
        values = torch.cat([merged, slot_values], dim=1)  # (B, K, D)
        positions = torch.cat([targets, slots], dim=1)  # (B, K)
    else:
        values, positions = merged, targets
    kept_index, perm = positions.sort(dim=1)
    tokens = _gather_tokens(values, perm).to(x.dtype)
    info = ApETInfo(
        variant, M, sel.index, sel.vectors, error, order, targets, slots, dropped, assignment,
        group_size, fallback,
    )
    return tokens, kept_index, info
