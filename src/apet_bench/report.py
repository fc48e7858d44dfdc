"""Console results table for finished/skipped/failed runs (pandas)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

__all__ = ["results_table", "print_results_table", "print_failure_summary"]


def results_table(outcomes: Iterable[Any]):
    """One row per run: choices, status, headline metrics, visual tokens entering the LLM, weights, device.

    ``outcomes`` are :class:`apet_bench.runner.RunOutcome` objects (or dicts with the same fields).
    Returns a ``pandas.DataFrame``.
    """
    import pandas as pd

    rows = []
    for o in outcomes:
        o = o if isinstance(o, dict) else vars(o)
        s = o.get("summary") or {}
        row: dict[str, Any] = {
            "run": o.get("name"),
            "status": o.get("status"),
            "method": (o.get("name") or "").split("__")[1] if o.get("name") and "__" in o.get("name") else s.get("method"),
            "budget": "full" if s.get("method") == "none" else s.get("budget"),
        }
        for k, v in (s.get("metrics") or {}).items():
            row[k] = round(v, 2) if isinstance(v, float) else v
        row["visual tokens -> LLM (mean)"] = s.get("visual_tokens_llm_mean")
        row["layer avg visual tokens"] = s.get("layer_average_visual_tokens")
        row["samples"] = s.get("num_samples")
        row["eval s"] = s.get("eval_s")
        row["device / attn"] = f"{s.get('device')} / {s.get('attn_implementation')}" if s else None
        if o.get("error"):
            row["error"] = o["error"]
        rows.append(row)
    return pd.DataFrame(rows)


def print_results_table(outcomes: Iterable[Any]) -> str:
    """Print :func:`results_table` with what the numbers are (weights, scoring) under it; returns the text."""
    outcomes = list(outcomes)
    df = results_table(outcomes)
    if df.empty:
        return ""
    lines = ["", df.to_markdown(index=False)]
    weights = sorted({(o if isinstance(o, dict) else vars(o)).get("summary", {}).get("weights") or "?" for o in outcomes})
    lines.append(f"weights: {'; '.join(weights)}")
    if any((o if isinstance(o, dict) else vars(o)).get("summary", {}).get("random_weights") for o in outcomes):
        lines.append("NOTE: random-weight pipeline check - scores come from lmms-eval's scoring of a randomly "
                     "initialised model and are not accuracy numbers.")
    lines.append("scores: lmms-eval task scoring (run dirs under results/runs/ hold metrics, samples, provenance)")
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def print_failure_summary(outcomes: Iterable[Any]) -> str:
    """Print the cells that could not run, grouped by reason (``missing``: absent data / not available /
    bad input; ``failed``: the evaluation raised); returns the text ("" when every run finished)."""
    bad = []
    for o in outcomes:
        o = o if isinstance(o, dict) else vars(o)
        if o.get("status") in ("missing", "failed"):
            bad.append((o.get("status"), o.get("error") or "?", o.get("name")))
    if not bad:
        return ""
    groups: dict[tuple[str, str], list[str]] = {}
    for status, err, name in bad:
        groups.setdefault((status, err), []).append(str(name))
    lines = ["", f"apet-bench: {len(bad)} run(s) could not run "
             f"({sum(s == 'missing' for s, _, _ in bad)} missing, {sum(s == 'failed' for s, _, _ in bad)} failed):"]
    for (status, err), names in sorted(groups.items(), key=lambda kv: (kv[0][0], -len(kv[1]))):
        names = list(dict.fromkeys(names))  # method=none repeats one run name across the budgets swept
        shown = ", ".join(names[:3]) + (f", ... ({len(names)} runs)" if len(names) > 3 else "")
        lines.append(f"  {status}: {err}\n      {shown}")
    lines.append("  (recorded under results/runs/ with the reason; the tables show these cells as missing)")
    text = "\n".join(lines)
    print(text, flush=True)
    return text
