#!/usr/bin/env python
"""How often ``numerics=official`` and ``numerics=fp32`` choose different tokens; not a test.

Synthetic cases of realistic magnitude (no weights needed), seeded, printed as a Markdown table:

* ApET stages (``apet_bench.apet.apet_compress``), the same FPS start for both numerics:
  LLaVA-1.5 vision stage (576 x 1024 CLIP features, fp16, keep 288), Qwen2.5-VL vision stage
  (576 x 3584 post-merger tokens, bf16, keep 172, 0.5/0.5 blend), LLaVA LLM stage (288 x 4096 hidden
  states, fp16, keep 96, merge in fp32), Video-LLaVA frames (8 x 256 x 4096, fp16, basis + merge only).
  Token features: N(0, sigma^2) per channel with a per-token norm of about ``--norm``, plus
  ``--outliers`` high-norm tokens (10 x the norm), the large-norm tokens ViT and LLM hidden states show.
* Attention head mean (FastV / PDrop rule): 32 heads, a 700-token prefill with 576 visual tokens at
  35..610, fp16 query/key rows of an attention-sink-heavy layer; keep 166 visual tokens by the
  head-mean last row: ``official`` = eager attention in fp16 + head mean in fp16
  (``apet_bench.attention.attention_rows(numerics="official")``), ``fp32`` = float32 throughout.

Usage: ``python scripts/measure_numerics.py --cases 10 --threads 1``
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from apet_bench.apet import apet_compress, approximation_error_from_basis, rank_by_error, select_basis  # noqa: E402
from apet_bench.attention import attention_rows  # noqa: E402

#: Sink key = k + SINK * q_last: the sink's logit is ~ SINK * ||q||^2 / sqrt(d) ~ 11 above the others, so
#: it takes almost all of the row and the visual tokens get ~1e-5 each, below fp16's smallest normal
#: number (6.1e-5), where fp16 keeps only a few significant bits.
SINK = 1.0


def features(g: torch.Generator, b: int, n: int, d: int, norm: float, outliers: int, dtype: torch.dtype) -> torch.Tensor:
    x = torch.randn(b, n, d, generator=g) * (norm / math.sqrt(d))
    for i in range(b):
        rows = torch.randperm(n, generator=g)[:outliers]
        x[i, rows] = torch.randn(outliers, d, generator=g) * (10 * norm / math.sqrt(d))
    return x.to(dtype)


def apet_case(x, keep, start, **kw):
    out = {}
    for numerics in ("official", "fp32"):
        _, kept, info = apet_compress(x, keep, start_index=start, numerics=numerics, **kw)
        out[numerics] = (info.basis_index, kept)
    basis_diff = not torch.equal(out["official"][0], out["fp32"][0])
    a, b = out["official"][1], out["fp32"][1]
    kept_diff = sum(len(set(a[i].tolist()) - set(b[i].tolist())) for i in range(a.shape[0]))
    return basis_diff, kept_diff


def video_case(x, start):
    """Video-LLaVA per frame: the 22 merge targets (highest error) and the 10-token basis."""
    out = {}
    for numerics in ("official", "fp32"):
        sel = select_basis(x, 10, "fps", start_index=start, numerics=numerics)
        err, _ = approximation_error_from_basis(x, sel.vectors, numerics=numerics)
        out[numerics] = (sel.index, rank_by_error(err, 22))
    basis_diff = not torch.equal(out["official"][0], out["fp32"][0])
    a, b = out["official"][1], out["fp32"][1]
    return basis_diff, sum(len(set(a[i].tolist()) - set(b[i].tolist())) for i in range(a.shape[0]))


def attention_case(g: torch.Generator, keep: int = 166):
    heads, L, d = 32, 700, 128
    vis = torch.arange(35, 611)
    q = torch.randn(1, heads, L, d, generator=g)
    k = torch.randn(1, heads, L, d, generator=g)
    k[:, :, 0] += q[:, :, -1] * SINK  # attention sink on the first token: visual probabilities ~1e-5
    q, k = q.half(), k.half()
    rows = torch.tensor([L - 1])
    kept = {}
    for numerics in ("official", "fp32"):
        p = attention_rows(q, k, None, rows, scaling=d**-0.5, numerics=numerics)[:, :, -1]  # (1, H, L)
        s = p.mean(dim=1) if numerics == "official" else p.float().mean(dim=1)
        kept[numerics] = set(vis[s[0, vis].topk(keep).indices].tolist())
    return len(kept["official"] - kept["fp32"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--norm", type=float, default=30.0, help="typical token L2 norm")
    ap.add_argument("--outliers", type=int, default=4, help="high-norm tokens per unit")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.cases} cases per row, token norm ~{args.norm:g}, "
          f"{args.outliers} outlier tokens (norm ~{10 * args.norm:g}) per unit\n")
    print("| setting | dtype | basis differs | kept tokens differing (mean per case) | s |")
    print("|---|---|---|---|---|")
    settings = [
        ("LLaVA-1.5 vision stage, 576 x 1024, keep 288", torch.float16, (1, 576, 1024), 288, {}),
        ("Qwen2.5-VL vision stage, 576 x 3584, keep 172", torch.bfloat16, (1, 576, 3584), 172, {"basis_blend": 0.5}),
        ("LLaVA LLM stage, 288 x 4096, keep 96", torch.float16, (1, 288, 4096), 96,
         {"basis_slot_order": "rank", "merge_dtype": torch.float32}),
    ]
    for label, dtype, shape, keep, kw in settings:
        g = torch.Generator().manual_seed(0)
        t0, nb, nk = time.perf_counter(), 0, 0
        for _ in range(args.cases):
            x = features(g, *shape, args.norm, args.outliers, dtype)
            start = torch.randint(0, shape[1], (shape[0],), generator=g)
            bd, kd = apet_case(x, keep, start, **kw)
            nb += bd
            nk += kd
        print(f"| {label} | {str(dtype)[6:]} | {nb}/{args.cases} | {nk / args.cases:.1f} of {keep} | "
              f"{time.perf_counter() - t0:.0f} |")
    g = torch.Generator().manual_seed(0)
    t0, nb, nk = time.perf_counter(), 0, 0
    for _ in range(args.cases):
        x = features(g, 8, 256, 4096, args.norm, args.outliers, torch.float16)
        bd, kd = video_case(x, torch.randint(0, 256, (8,), generator=g))
        nb += bd
        nk += kd
    print(f"| Video-LLaVA frames, 8 x 256 x 4096, 22 targets per frame | float16 | {nb}/{args.cases} | "
          f"{nk / args.cases:.1f} of 176 | {time.perf_counter() - t0:.0f} |")
    g = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    diffs = [attention_case(g) for _ in range(args.cases)]
    print(f"| head-mean last row (FastV / PDrop rule), 32 heads, keep 166 of 576 | float16 | n/a | "
          f"{sum(diffs) / args.cases:.1f} of 166 (cases with a difference: {sum(d > 0 for d in diffs)}/{args.cases}) | "
          f"{time.perf_counter() - t0:.0f} |")


if __name__ == "__main__":
    main()
