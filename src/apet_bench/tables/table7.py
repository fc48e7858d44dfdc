"""Table 7 (efficiency): LLaVA-1.5-7B and Qwen2.5-VL-7B × {vanilla, SparseVLM, PDrop, VisionZip, ApET}.

``python -m apet_bench.tables.table7 [--out results/tables] [--no-timing] [--backend sdpa] [--warmup 3]
[--repeats 10] [--max-new-tokens 16]`` (``make table7``) writes ``table7.md`` and ``table7.csv`` under
``--out`` and prints the markdown.

Columns, in the paper's layout with our numbers beside the paper's:

* **TFLOPs** (everywhere): prefill TFLOPs of the full-size model counted on the ``meta`` device
  (:func:`apet_bench.flops.count_flops`: vision encoder + projector + LLM + the method's own overhead;
  1 multiply-add = 2 FLOPs, full n² attention, lm_head on the last token, prefill only), with the
  per-layer visual-token plan of each method from its own code (``TokenCompressor.plan``).
  ``FLOPs Δ`` = vanilla TFLOPs / method TFLOPs (the physical ceiling of the prefill speed-up).
* **Total time / prefill time** (where CUDA is present): the latency protocol of
  :mod:`apet_bench.latency` (full-size architecture, random bf16 weights unless a checkpoint is
  available, the backend given, CUDA events, warm-up, medians, fixed output length). Per sample, in
  ms; the paper's total time is a whole POPE run (mm:ss), so compare the Δ ratios. On a machine
  without CUDA the timing cells read ``no GPU``.

Paper numbers and rows: Table 7 of the ApET paper (A100, POPE), in ``table7.yaml`` beside this module
(:data:`PAPER_TABLE7`, :data:`ROWS`).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["MODELS", "PAPER_TABLE7", "ROWS", "build_table7", "main"]

#: The paper's Table 7 and the rows built here (``table7.yaml`` beside this module): per model its title,
#: budget, visual tokens counted and rows (label, method, params override, the paper's numbers).
TABLE7_FILE = Path(__file__).with_name("table7.yaml")


def _load_layout(path: Path = TABLE7_FILE) -> dict[str, Any]:
    import yaml

    return yaml.safe_load(path.read_text(encoding="utf-8"))


_LAYOUT = _load_layout()

#: Per model, per method: (token, total time mm:ss, total Δ, prefill ms, prefill Δ, TFLOPs). A100, POPE.
PAPER_TABLE7: dict[str, dict[str, tuple[str, str, float, float, float, float]]] = {
    model: {row["method"]: tuple(row["paper"]) for row in spec["rows"]} for model, spec in _LAYOUT.items()
}

#: Models of Table 7: config name -> (title, budget of the compressed rows, visual tokens counted).
MODELS: dict[str, tuple[str, Any, int]] = {
    model: (spec["title"], spec["budget"], int(spec["visual_tokens"])) for model, spec in _LAYOUT.items()
}

#: Rows per model: (label, method, method params override), in the paper's order.
ROWS: dict[str, list[tuple[str, str, dict[str, Any]]]] = {
    model: [(row["label"], row["method"], dict(row.get("params") or {})) for row in spec["rows"]]
    for model, spec in _LAYOUT.items()
}
#: Per model, the paper's numbers of each row (same order as :data:`ROWS`).
_ROW_PAPER: dict[str, list[tuple]] = {model: [tuple(row["paper"]) for row in spec["rows"]] for model, spec in _LAYOUT.items()}


def _fmt(x: Any, spec: str = ".2f") -> str:
    if x is None or x == "":
        return ""
    if isinstance(x, str):
        return x
    return format(x, spec)


def build_table7(
    *, timing: bool = True, backend: str = "sdpa", warmup: int = 3, repeats: int = 10, max_new_tokens: int = 16,
    models: Sequence[str] = tuple(MODELS),
) -> tuple[Any, dict[str, Any]]:
    """Build Table 7 as a ``pandas.DataFrame`` plus a header dict (device, how each column was obtained).

    Parameters
    ----------
    timing : bool
        Measure times when CUDA is present (otherwise the cells read ``no GPU``).
    backend, warmup, repeats, max_new_tokens :
        Latency protocol settings (:func:`apet_bench.latency.measure_latency`).
    models : sequence of str
        Subset of :data:`MODELS`.

    Returns
    -------
    (pandas.DataFrame, dict)
    """
    import pandas as pd
    import torch

    from apet_bench.flops import count_flops
    from apet_bench.methods import get_method_class

    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name(0) if cuda else "CPU (no GPU)"
    rows: list[dict[str, Any]] = []
    for model in models:
        title, budget, vt = MODELS[model]
        base_flops = None
        base_time: dict[str, float] | None = None
        adapter = None
        for (label, method, override), p in zip(ROWS[model], _ROW_PAPER[model]):
            try:
                reference = get_method_class(method).stage == "none"  # the uncompressed row
            except ValueError as e:  # an unregistered method: the row says so
                rows.append({"model": title, "method": label, "token": p[0], "paper_tflops": p[5],
                             "tflops": None, "variant_plan": "", "plan_source": f"missing: {e}"})
                continue
            row: dict[str, Any] = {
                "model": title, "method": label, "token": p[0],
                "paper_total_time": p[1], "paper_total_speedup": p[2], "paper_prefill_ms": p[3],
                "paper_prefill_speedup": p[4], "paper_tflops": p[5],
            }
            try:
                from apet_bench.flops import _method_params

                params = {**_method_params(method), **override} if not reference else {}
                r = count_flops(model, method, None if reference else budget, visual_tokens=vt, params=params)
                row.update(
                    tflops=r.total_tflops, vision_tflops=r.vision_tflops, llm_tflops=r.llm_tflops,
                    method_tflops=r.method_tflops, visual_tokens_per_layer=r.mean_layer_visual_tokens,
                    text_tokens=r.text_tokens, variant_plan=r.variant,
                    plan_source=("no compression" if reference else
                                 "the method's own plan() on the shape proxy, checked against measured counts"),
                )
                if reference:
                    base_flops = r.total_tflops
                row["flops_speedup"] = base_flops / r.total_tflops if base_flops else None
                row["tflops_vs_paper_pct"] = 100.0 * (r.total_tflops - p[5]) / p[5]
            except Exception as e:  # noqa: BLE001 - one row failing must not sink the table
                row.update(tflops=None, variant_plan="", plan_source=f"missing: {str(e).splitlines()[0]}")
            if not (timing and cuda):
                row.update(prefill_ms="no GPU", total_ms="no GPU", prefill_speedup="", total_speedup="")
            else:
                try:
                    from apet_bench.latency import _method_for, build_latency_adapter, measure_latency

                    if adapter is None:
                        adapter, weights = build_latency_adapter(model, backend, "cuda")
                    m = _method_for(method, None if reference else budget, override)
                    lat = measure_latency(adapter, m, weights=weights, warmup=warmup, repeats=repeats,
                                          max_new_tokens=max_new_tokens, visual_tokens=vt)
                    if reference:
                        base_time = {"prefill": lat.prefill_ms, "total": lat.total_ms}
                    row.update(prefill_ms=lat.prefill_ms, total_ms=lat.total_ms, peak_memory_mib=lat.peak_memory_mib,
                               weights=lat.weights)
                    if base_time:
                        row.update(prefill_speedup=base_time["prefill"] / lat.prefill_ms,
                                   total_speedup=base_time["total"] / lat.total_ms)
                except Exception as e:  # noqa: BLE001
                    row.update(prefill_ms=f"failed: {str(e).splitlines()[0][:80]}", total_ms="", prefill_speedup="",
                               total_speedup="")
            rows.append(row)
        del adapter
        if cuda:  # free the 7B model before the next one
            import gc

            gc.collect()
            torch.cuda.empty_cache()
    header = {
        "device": device,
        "timing": (f"measured: latency protocol, backend {backend}, {warmup} warm-up + median of {repeats}, "
                   f"{max_new_tokens} generated tokens, per sample (ms); full-size architecture with randomly initialised bf16 "
                   "weights unless a checkpoint is available" if (timing and cuda) else
                   "no GPU on this machine: timing cells read 'no GPU' (run make table7 on a CUDA machine)"),
        "flops": ("prefill TFLOPs of the full-size models on the meta device (apet_bench.flops): 1 multiply-add = "
                  "2 FLOPs, full n^2 attention, lm_head on the last token, prefill only, vision + LLM + method "
                  "overhead; LLaVA-1.5: 576 visual + 62 text tokens (POPE prompt, real Llama-2 tokenizer); "
                  "Qwen2.5-VL: 729 visual + 60 text tokens"),
        "paper": "ApET paper Table 7 (A100, POPE); its total time is a whole POPE run (mm:ss)",
    }
    return pd.DataFrame(rows), header


def to_markdown(df: Any, header: dict[str, Any]) -> str:
    """Markdown of Table 7 (one table per model) with the header lines."""
    lines = ["# Table 7: efficiency (prefill TFLOPs, prefill and total time)", ""]
    lines += [f"- **{k}**: {v}" for k, v in header.items()]
    for model in df["model"].unique():
        sub = df[df["model"] == model]
        lines += ["", f"## {model}", "",
                  "| Methods | Token | Total time (paper) | Δ (paper) | Total ms (ours) | Δ (ours) | Prefill ms (paper) "
                  "| Δ (paper) | Prefill ms (ours) | Δ (ours) | TFLOPs (paper) | TFLOPs (ours) | vs paper | of which method "
                  "| FLOPs Δ (ours) | variant / plan counted | plan source |",
                  "|" + "---|" * 17]
        for _, r in sub.iterrows():
            cells = [
                r["method"], r["token"], r["paper_total_time"], f"{r['paper_total_speedup']:.2f}×",
                _fmt(r.get("total_ms"), ".1f"), _fmt(r.get("total_speedup")) + ("×" if isinstance(r.get("total_speedup"), float) else ""),
                f"{r['paper_prefill_ms']:.1f}", f"{r['paper_prefill_speedup']:.2f}×",
                _fmt(r.get("prefill_ms"), ".1f"), _fmt(r.get("prefill_speedup")) + ("×" if isinstance(r.get("prefill_speedup"), float) else ""),
                f"{r['paper_tflops']:.2f}", _fmt(r.get("tflops"), ".3f"),
                (f"{r['tflops_vs_paper_pct']:+.1f} %" if isinstance(r.get("tflops_vs_paper_pct"), float) else ""),
                _fmt(r.get("method_tflops"), ".4f"),
                (f"{r['flops_speedup']:.2f}×" if isinstance(r.get("flops_speedup"), float) else ""),
                str(r.get("variant_plan", "")), str(r.get("plan_source", "")),
            ]
            lines.append("| " + " | ".join(str(c).replace("|", "/") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def _translate(argv: list[str]) -> list[str]:
    """Accept the other tables' ``key=value`` options too (``make table7 TABLE_ARGS=...`` shares them).

    ``results_dir=R`` -> ``--out R/tables``; ``out_dir=D`` -> ``--out D``; ``model=a,b`` -> ``--models``
    (``tiny_`` prefixes dropped: Table 7 counts the full-size models); other ``key=value`` are ignored
    (the sweep's Hydra overrides), as ``python -m apet_bench.tables`` does.
    """
    out: list[str] = []
    kv = dict(a.split("=", 1) for a in argv if "=" in a and not a.startswith("-"))
    out += [a for a in argv if not ("=" in a and not a.startswith("-"))]
    if "out_dir" in kv:
        out += ["--out", kv["out_dir"]]
    elif "results_dir" in kv:
        out += ["--out", str(Path(kv["results_dir"]) / "tables")]
    if "model" in kv:
        names = [m[5:] if m.startswith("tiny_") else m for m in kv["model"].split(",") if m]
        out += ["--models", ",".join(dict.fromkeys(names))]
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """CLI (``make table7``): build, write ``table7.md`` / ``table7.csv``, print the markdown."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    ap = argparse.ArgumentParser(prog="python -m apet_bench.tables.table7", description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="results/tables", help="output directory (default results/tables)")
    ap.add_argument("--no-timing", action="store_true", help="FLOPs only, even where CUDA is present")
    ap.add_argument("--backend", default="sdpa", choices=["eager", "sdpa", "flash_attention_2"])
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of " + ",".join(MODELS))
    args = ap.parse_args(_translate(sys.argv[1:] if argv is None else list(argv)))
    models = [m for m in args.models.split(",") if m]
    bad = [m for m in models if m not in MODELS]
    if bad:
        print(f"error: table7: unknown model {bad[0]!r} (choose from {', '.join(MODELS)})", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    df, header = build_table7(timing=not args.no_timing, backend=args.backend, warmup=args.warmup,
                              repeats=args.repeats, max_new_tokens=args.max_new_tokens, models=models)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    md = to_markdown(df, header)
    (out / "table7.md").write_text(md)
    df.to_csv(out / "table7.csv", index=False)
    print(md)
    print(f"wrote {out / 'table7.md'} and {out / 'table7.csv'} in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
