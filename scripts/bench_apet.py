#!/usr/bin/env python
"""Latency and FLOPs of one ApET compression (``apet_bench.apet.apet_compress``); not a test.

For every (N, D) shape and dtype it times, on random N(0, 1) features (not model activations):

* ``apet_compress`` with ``variant="official"`` and ``variant="paper"`` (FPS basis, M = 10);
* a straightforward reference written from the paper (§3.3): a Python-loop FPS with the subtraction
  form of the distance, ``torch.linalg.lstsq`` for the coefficients, the paper's basis-kept selection
  and a vectorised cosine merge, per sample. It is the denominator of the speed-up ratios
  (ratio = reference / ApET; > 1 means ApET is faster). The reference keeps the same tokens as the
  paper variant up to fp32 near-ties; the "agree" column is the kept-set overlap.

Timings are the median over ``--repeats`` after ``--warmup`` runs, the three functions timed round-robin
so that a change in machine load hits them alike (CUDA: events + synchronize).
FLOPs are matmul FLOPs (2 per multiply-add, the convention of the prefill counts), measured with
``torch.utils.flop_counter.FlopCounterMode``; element-wise work and the M × M solve are not counted
(docs/efficiency.md). The shares divide by full prefills (docs/efficiency.md): LLaVA-1.5-7B
8.856 TFLOPs (576 visual + 60 text tokens) and Qwen2.5-VL-7B 14.495 TFLOPs (729 visual, ViT included).

Usage::

    .venv/bin/python scripts/bench_apet.py                      # all shapes, fp32 + bf16, CPU (+ CUDA)
    .venv/bin/python scripts/bench_apet.py --shapes 576x1024 --dtypes fp32 --repeats 10
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src"))
from apet_bench.apet import apet_compress  # noqa: E402

#: (N, D) -> (keep K, what the shape stands for); K is the vision-stage keep of a paper budget.
SHAPES: dict[tuple[int, int], tuple[int, str]] = {
    (576, 1024): (192, "LLaVA-1.5 CLIP, B=128 -> K=1.5B"),
    (2880, 4096): (960, "LLaVA-NeXT whole span, B=640 -> K=1.5B"),
    (2048, 4096): (256, "Video-LLaVA 8x256, 2048->256"),
    (1024, 3584): (307, "Qwen2.5-VL 1024 tok, 20% -> K=int(0.3N)"),
}
PREFILL_TFLOPS = {"LLaVA-1.5-7B": 8.856, "Qwen2.5-VL-7B": 14.495}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def reference_apet(x: torch.Tensor, keep: int, num_basis: int, start: torch.Tensor) -> torch.Tensor:
    """The paper's ApET (§3.3), written plainly; returns the kept indices (B, K), ascending.

    FPS from ``start`` with a Python loop (squared Euclidean, subtraction form), coefficients by
    ``torch.linalg.lstsq``, the basis tokens kept, the other K - M by largest error, each dropped
    token merged into its most cosine-similar kept token (plain mean). The merged tokens are computed
    (and discarded) so that the work matches.
    """
    kept_all = []
    for b in range(x.shape[0]):
        xb = x[b].float()
        n = xb.shape[0]
        picked = [int(start[b])]
        dist = torch.full((n,), float("inf"), device=xb.device)
        for _ in range(num_basis - 1):
            dist = torch.minimum(dist, ((xb - xb[picked[-1]]) ** 2).sum(-1))
            picked.append(int(dist.argmax()))
        basis = xb[picked]  # (M, D)
        coef = torch.linalg.lstsq(basis.T, xb.T).solution  # (M, N)
        error = (xb - coef.T @ basis).norm(dim=-1)
        error[picked] = float("inf")
        kept = torch.topk(error, keep).indices
        mask = torch.zeros(n, dtype=torch.bool, device=xb.device)
        mask[kept] = True
        dropped = xb[~mask]
        sim = F.normalize(dropped, dim=-1) @ F.normalize(xb[kept], dim=-1).T
        group = sim.argmax(dim=1)
        sums = xb[kept].index_add(0, group, dropped)
        counts = 1 + torch.bincount(group, minlength=keep)
        _merged = sums / counts.unsqueeze(1)
        kept_all.append(kept.sort().values)
    return torch.stack(kept_all)


def _time_once(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def timeit(fns: list[Callable[[], object]], device: torch.device, warmup: int, repeats: int) -> list[float]:
    """Median wall time (ms) of each function, timed interleaved (round robin, rotating the order) so
    that a change in machine load during the run hits every function alike."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for r in range(repeats):
        for k in range(len(fns)):  # rotate who goes first: the first call of a round pays the page faults
            i = (r + k) % len(fns)
            times[i].append(_time_once(fns[i], device))
    return [statistics.median(t) for t in times]


def count_flops(fn: Callable[[], object]) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def parse_shapes(text: str) -> list[tuple[int, int]]:
    shapes = []
    for item in text.split(","):
        n, d = item.lower().split("x")
        shapes.append((int(n), int(d)))
    return shapes


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"CPU ({cpu}, {os.cpu_count()} logical cores visible)"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default=",".join(f"{n}x{d}" for n, d in SHAPES), help="N x D list")
    ap.add_argument("--dtypes", default="fp32,bf16", help=f"comma list of {sorted(DTYPES)}")
    ap.add_argument("--devices", default="cpu,cuda", help="cpu and/or cuda (cuda skipped if absent)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--num-basis", type=int, default=10)
    ap.add_argument("--keep-frac", type=float, default=None, help="override K as a fraction of N")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--no-reference", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = parse_shapes(args.shapes)
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    devices = []
    for name in args.devices.split(","):
        name = name.strip()
        if name == "cuda" and not torch.cuda.is_available():
            continue
        devices.append(torch.device(name))

    print("ApET compression latency (one call, batch 1) -- random N(0,1) features, not model activations")
    print(f"torch {torch.__version__}, torch threads {torch.get_num_threads()}, M = {args.num_basis} (FPS), "
          f"median of {args.repeats} after {args.warmup} warm-up, seed {args.seed}")
    load = " / ".join(f"{v:.2f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    print(f"load average at start (1/5/15 min): {load} -- other processes on the machine inflate CPU timings")
    print("ratio = reference / ApET (>1: ApET faster); agree = kept-set overlap of ApET-paper and reference")
    print("GFLOP = matmul FLOPs of ApET-official (FlopCounterMode, 2/MAC); shares of full prefills: "
          + ", ".join(f"{k} {v} T" for k, v in PREFILL_TFLOPS.items()))
    for device in devices:
        print()
        print(f"device: {device_name(device)}")
        header = ("N x D", "K", "dtype", "official ms", "paper ms", "reference ms", "ratio off.",
                  "ratio paper", "agree", "GFLOP", "% LLaVA", "% Qwen")
        rows = []
        for n, d in shapes:
            keep, what = SHAPES.get((n, d), (max(1, n // 3), "custom"))
            if args.keep_frac is not None:
                keep = max(1, int(args.keep_frac * n))
            for dt in dtypes:
                dtype = DTYPES[dt]
                g = torch.Generator(device="cpu").manual_seed(args.seed)
                x = torch.randn(1, n, d, generator=g).to(device=device, dtype=dtype)
                start = torch.randint(0, n, (1,), generator=g).to(device)

                def run_official(x=x, keep=keep, start=start):
                    return apet_compress(x, keep, args.num_basis, variant="official", start_index=start)

                def run_paper(x=x, keep=keep, start=start):
                    return apet_compress(x, keep, args.num_basis, variant="paper", start_index=start)

                def run_ref(x=x, keep=keep, start=start):
                    return reference_apet(x, keep, args.num_basis, start)

                fns = [run_official, run_paper] + ([] if args.no_reference else [run_ref])
                t_off, t_pap, *t_rest = timeit(fns, device, args.warmup, args.repeats)
                flops = count_flops(run_official)
                if args.no_reference:
                    t_ref, agree = float("nan"), float("nan")
                else:
                    t_ref = t_rest[0]
                    kept_paper = set(run_paper()[1][0].tolist())
                    kept_ref = set(run_ref()[0].tolist())
                    agree = len(kept_paper & kept_ref) / keep
                rows.append((
                    f"{n} x {d}", str(keep), dt, f"{t_off:.1f}", f"{t_pap:.1f}", f"{t_ref:.1f}",
                    f"{t_ref / t_off:.2f}", f"{t_ref / t_pap:.2f}", f"{agree:.3f}", f"{flops / 1e9:.2f}",
                    f"{100 * flops / (PREFILL_TFLOPS['LLaVA-1.5-7B'] * 1e12):.3f}",
                    f"{100 * flops / (PREFILL_TFLOPS['Qwen2.5-VL-7B'] * 1e12):.3f}",
                ))
                print(f"  done {n}x{d} {dt} ({what})", file=sys.stderr, flush=True)
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
        print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |")
        print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
        for r in rows:
            print("| " + " | ".join(c.rjust(w) for c, w in zip(r, widths)) + " |")
        print("shapes: " + "; ".join(f"{n}x{d}: {SHAPES.get((n, d), (0, 'custom'))[1]}" for n, d in shapes))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
