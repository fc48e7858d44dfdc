#!/usr/bin/env python
"""Measured prefill speed-up vs the FLOPs ratio (its physical ceiling), and each method's own overhead.

For one model and every method × budget it reports:

* **measured prefill speed-up** = median prefill time of ``none`` / median prefill time of the method,
  timed with the latency protocol (:func:`apet_bench.latency.measure_latency`: warm-up, medians, CUDA
  events on GPU / ``perf_counter`` on CPU, the adapter's own ``generate`` path);
* **FLOPs ratio of the timed model** = prefill FLOPs of ``none`` / of the method, counted with
  ``torch.utils.flop_counter.FlopCounterMode`` around one real ``generate(max_new_tokens=1)`` of the same
  model (same convention as :mod:`apet_bench.flops`: 2 FLOPs per multiply-add, matmuls / attention). A
  speed-up above it would mean time saved elsewhere than in arithmetic; below it, fixed costs
  (Python, kernel launches, the vision tower, memory traffic) that compression does not remove;
* **full-size FLOPs ratio** (``apet_bench.flops.count_flops`` of the full-size model on meta) for reference;
* **the method's own time as a share of prefill**: wall time inside the method's ``compress_visual`` and
  ``select_llm_tokens`` (stage-1 and stage-2 selection: for ApET, FPS + solve + error + merge and the
  re-projection), divided by the method's prefill time. Attention rows computed in hooks (FastV, PDrop)
  are not inside these two calls and are not in this share.

On CPU this runs on tiny (``--size tiny``, 4 layers) or small (``--size small``: real depths, widths
256-512) random-weight models: the numbers show how the protocol behaves, they are **not the paper's
setting** (A100, 7B models, bf16), and the script prints so with the device.

Usage::

    .venv/bin/python scripts/bench_speedup.py                                   # tiny LLaVA-1.5, registered methods
    .venv/bin/python scripts/bench_speedup.py --size small --budgets 64,192 --repeats 5
    .venv/bin/python scripts/bench_speedup.py --model tiny_qwen25vl --budgets 0.1,0.2
    .venv/bin/python scripts/bench_speedup.py --model llava15 --device cuda      # full size, random bf16 (GPU)
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import sys
import time
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src"))

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from apet_bench import latency  # noqa: E402
from apet_bench.config import ConfigError  # noqa: E402
from apet_bench.pipeline import generate

#: ``--size small`` tiny_config: the real depths (32 / 28 decoder layers, 24 CLIP layers) with small widths.
SMALL = {
    "llava15": {"text_hidden_size": 512, "text_intermediate_size": 1376, "text_layers": 32, "heads": 8, "kv_heads": 8,
                "vision_hidden_size": 256, "vision_intermediate_size": 1024, "vision_layers": 24, "vision_heads": 4},
    "qwen25vl": {"text_hidden_size": 512, "text_intermediate_size": 1536, "text_layers": 28, "heads": 8, "kv_heads": 2,
                 "vision_hidden_size": 256, "vision_intermediate_size": 512, "vision_depth": 8, "vision_heads": 4},
}
QWEN_PIXELS = {"min_pixels": 256 * 28 * 28, "max_pixels": 2048 * 28 * 28}


def _adapter(model: str, size: str, device: str, backend: str) -> tuple[Any, str]:
    from apet_bench.models import load_model

    cfg = latency._model_cfg(model)
    if not cfg.get("tiny"):
        return latency.build_latency_adapter(model, backend, device)
    tc = dict(cfg.get("tiny_config") or {})
    if size == "small":
        tc.update(SMALL[cfg["family"]])
        cfg["num_layers"] = tc["text_layers"]
    if cfg["family"] == "qwen25vl":
        tc.update(QWEN_PIXELS)
        cfg["visual_tokens"] = 2048
    cfg.update(tiny_config=tc, device=device, attn_implementation=backend)
    adapter = load_model(cfg)
    label = adapter.weights if size == "tiny" else adapter.weights.replace("tiny", f"small ({size}: real depths, widths 256-512)")
    return adapter, label


class _MethodTimer:
    """Wraps a method's ``compress_visual`` / ``select_llm_tokens`` (instance attributes) to sum their wall time."""

    def __init__(self, method: Any, device: torch.device):
        self.ms = 0.0
        self.device = device
        for name in ("compress_visual", "select_llm_tokens"):
            setattr(method, name, self._wrap(getattr(method, name)))

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _wrap(self, fn: Any) -> Any:
        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            self._sync()
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self._sync()
                self.ms += (time.perf_counter() - t0) * 1e3

        return timed


def _prefill_flops(adapter: Any, method: Any, visual_tokens: int | None) -> int:
    image = latency._image_for(adapter.family, visual_tokens)
    with FlopCounterMode(display=False) as counter:
        generate(adapter, [image], latency.POPE_QUESTION, {"max_new_tokens": 1, "min_new_tokens": 1}, method)
    return int(counter.get_total_flops())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny_llava15", help="tiny_llava15 | tiny_qwen25vl (CPU), llava15 | qwen25vl (CUDA)")
    ap.add_argument("--size", default="tiny", choices=["tiny", "small"], help="tiny models only")
    ap.add_argument("--methods", default=None, help="comma-separated; default every registered method but none/random")
    ap.add_argument("--budgets", default=None, help="comma-separated; default 64,128,192 (LLaVA) or 0.1,0.2 (Qwen)")
    ap.add_argument("--backend", default="sdpa", choices=list(latency.BACKENDS))
    ap.add_argument("--device", default="auto")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--max-new-tokens", type=int, default=1, help="1 = prefill only (default)")
    ap.add_argument("--visual-tokens", type=int, default=None, help="Qwen2.5-VL: visual tokens of the image (default 729)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--out", default=None, help="also write the rows as CSV here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    import pandas as pd

    from apet_bench.flops import count_flops
    from apet_bench.methods import available_methods

    try:
        adapter, weights = _adapter(args.model, args.size, args.device, args.backend)
    except (ConfigError, ValueError) as e:
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    family = adapter.family
    methods = args.methods.split(",") if args.methods else [m for m in available_methods() if m not in ("none", "random")]
    default_budgets = "0.1,0.2" if family == "qwen25vl" else "64,128,192"
    budgets = [float(b) if "." in b else int(b) for b in (args.budgets or default_budgets).split(",")]
    dev = adapter.device
    device_name = latency._device_name(dev)
    print(f"device: {device_name}; model: {adapter.name} ({weights}); backend {adapter.attn_implementation}, "
          f"{str(adapter.dtype).replace('torch.', '')}")
    if dev.type != "cuda" or adapter.is_random_weights:
        print("NOT the paper's setting (A100, 7B models, real weights): "
              + ("CPU times of a random-weight small model; ratios show the protocol, not the paper's speed-ups"
                 if dev.type != "cuda" else "random weights on this GPU"))

    kw = {"warmup": 0, "repeats": 1, "max_new_tokens": args.max_new_tokens,
          "visual_tokens": args.visual_tokens, "weights": weights}
    # configurations, timed round-robin (one sample each per round) so that load changes on a shared
    # machine hit them alike; medians over the rounds
    configs: list[dict[str, Any]] = [{"method": "none", "budget": "full", "m": latency._method_for("none", None)}]
    latency.measure_latency(adapter, configs[0]["m"], **kw)  # untimed, as each method's fail-fast call below
    rows_err: list[dict[str, Any]] = []
    for name in methods:
        for b in budgets:
            try:
                m = latency._method_for(name, b)
                latency.measure_latency(adapter, m, **kw)  # fails fast on a budget the method refuses
            except Exception as e:  # noqa: BLE001 - report and go on
                rows_err.append({"method": name, "budget": b, "error": str(e).splitlines()[0][:100]})
                continue
            configs.append({"method": name, "budget": b, "m": m, "timer": _MethodTimer(m, dev)})
    for c in configs:
        c["prefill"], c["calls"] = [], 0
    for rnd in range(args.warmup + args.repeats):
        for c in configs:
            r = latency.measure_latency(adapter, c["m"], **kw)
            c["calls"] += 1
            c["last"] = r
            if rnd >= args.warmup:
                c["prefill"].append(r.prefill_ms)
    import statistics

    base_flops = _prefill_flops(adapter, latency._method_for("none", None), args.visual_tokens)
    full_model = {"llava15": "llava15", "qwen25vl": "qwen25vl"}.get(family)
    full_base = count_flops(full_model, "none").total_tflops if full_model else None
    base_ms = statistics.median(configs[0]["prefill"])
    rows = []
    for c in configs:
        p = statistics.median(c["prefill"])
        timer = c.get("timer")
        method_ms = timer.ms / (c["calls"] + 1) if timer else 0.0  # +1: the fail-fast call
        if c["method"] == "none":
            ratio, full = 1.0, 1.0
        else:
            ratio = base_flops / _prefill_flops(adapter, latency._method_for(c["method"], c["budget"]), args.visual_tokens)
            full = full_base / count_flops(full_model, c["method"], c["budget"]).total_tflops if full_model else None
        speed = base_ms / p
        rows.append({"method": c["method"], "budget": c["budget"], "prefill_ms": p, "speedup": speed,
                     "flops_ratio": ratio, "ceiling_used": speed / ratio, "full_size_flops_ratio": full,
                     "method_ms": method_ms, "method_share": method_ms / p,
                     "visual_per_layer": c["last"].mean_layer_visual_tokens})
    rows += rows_err
    timer_name = configs[0]["last"].timer
    df = pd.DataFrame(rows)
    print(f"\nprefill: median of {args.repeats} after {args.warmup} warm-up, {args.max_new_tokens} generated token(s), "
          f"{timer_name}, configurations interleaved; FLOPs ratio = FlopCounterMode on this model; full-size ratio = apet_bench.flops (meta, 7B); "
          f"method share = time in compress_visual + select_llm_tokens / prefill\n")
    fmt = {"prefill_ms": "{:.1f}", "speedup": "{:.2f}x", "flops_ratio": "{:.2f}x", "ceiling_used": "{:.0%}",
           "full_size_flops_ratio": "{:.2f}x", "method_ms": "{:.2f}", "method_share": "{:.1%}", "visual_per_layer": "{:.1f}"}
    shown = df.copy()
    for col, f in fmt.items():
        if col in shown:
            shown[col] = [f.format(v) if isinstance(v, (int, float)) and v == v else "" for v in shown[col]]
    print(shown.fillna("").to_markdown(index=False))
    print(f"\n{device_name}; {platform.python_implementation()} {platform.python_version()}, torch {torch.__version__}; "
          f"{'not comparable to the paper (CPU, random small model)' if dev.type != 'cuda' else 'GPU: ' + device_name}")
    if args.out:
        df.to_csv(args.out, index=False)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
