"""Paired Δ with confidence intervals for a built table (``python -m apet_bench.tables tableN stats=true``).

For every cell of our rows: ``Δ = ours - vanilla`` (and ``ours - <ref>`` at the same budget with
``ref=<method>``) in the table's unit, with the 95 % paired bootstrap interval and the paired test
p-value of :func:`apet_bench.stats.compare` (the runs' shared samples, resampled in each benchmark's
unit). Marking rule, stated in the output: a cell gets ``*`` when its paired-test p-value, Holm-adjusted
across the cells of its row (one family per row and reference), is below 0.05 **and** its interval
excludes 0. Cells that cannot be paired say why.

Also: a per model x benchmark x budget "indistinguishable from the best" summary (every method compared
with the best-scoring method at that budget) and, where runs of several seeds exist, mean ± sd over
seeds next to the benchmark's own sampling interval.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from apet_bench.stats import Comparison, RunUnits, StatsUnavailable, compare, holm, load_units, seed_spread

__all__ = ["PairedOptions", "paired_section", "run_seed"]

ALPHA = 0.05
RULE = ("`*` = the paired-test p-value, Holm-adjusted across the cells of the row (one family per row and "
        "reference), is below 0.05 and the 95 % interval excludes 0")


@dataclass
class PairedOptions:
    """``stats=true`` options: ``ref`` (a method label to compare with at the same budget), the
    bootstrap size and confidence, and the seed of the resampling."""

    ref: str | None = None
    n_resamples: int = 9999
    confidence: float = 0.95
    seed: int = 0

    @classmethod
    def from_opts(cls, opts: dict[str, str]) -> PairedOptions:
        try:
            n = int(opts.get("n_resamples", 9999))
            conf = float(opts.get("confidence", 0.95))
        except ValueError as exc:
            raise ValueError(f"bad stats option ({exc})") from None
        if n < 1:
            raise ValueError(f"n_resamples {n!r} must be >= 1")
        if not 0 < conf < 1:
            raise ValueError(f"confidence {conf!r} must be in (0, 1)")
        return cls(ref=opts.get("ref") or None, n_resamples=n, confidence=conf)


_SEED_RE = re.compile(r"[-_]?seed=\d+")


def run_seed(run_dir: str | Path) -> int | None:
    """The ``seed`` of a run: ``run.json`` ``seed`` when recorded there, else ``config.yaml`` ``seed``."""
    d = Path(run_dir)
    try:
        s = json.loads((d / "run.json").read_text(encoding="utf-8")).get("seed")
        if isinstance(s, int) and not isinstance(s, bool):
            return s
    except (OSError, ValueError):
        pass
    try:
        import yaml

        s = (yaml.safe_load((d / "config.yaml").read_text(encoding="utf-8")) or {}).get("seed")
        return s if isinstance(s, int) and not isinstance(s, bool) else None
    except Exception:  # informative only
        return None


@dataclass
class _Cell:
    model: str
    method: str
    budget: str
    column: str
    benchmark: str
    metric: str
    scale: float
    run_dir: str | None
    value: float | None
    comparisons: dict[str, Comparison | str] = field(default_factory=dict)


def _fmt(c: Comparison, scale: float, dec: int) -> str:
    d, lo, hi = (c.delta * scale, c.low * scale, c.high * scale)
    return f"{d:+.{dec}f} [{lo:+.{dec}f}, {hi:+.{dec}f}]"


def paired_section(table: Any, runs: Any, spec: dict[str, Any], opts: PairedOptions) -> str:
    """Markdown: the paired Δ tables (vs vanilla, and vs ``opts.ref``), the rule, the summary, seeds.

    Parameters
    ----------
    table : TableResult
        From :func:`apet_bench.tables.build.build_table` (its ``cells`` name each cell's run).
    runs : pandas.DataFrame
        :func:`apet_bench.tables.load_runs` of the complete runs (``run_dir`` per run name).
    spec : dict
        The table's spec (columns with ``scale``; ``vanilla``).
    """
    cells_df = table.cells
    run_dir = dict(zip(runs["name"], runs["run_dir"])) if len(runs) else {}
    scale = {c["label"]: float(c.get("scale", 1)) for c in spec["columns"]}
    from .build import _decimals

    # one decimal more than the paper prints, at least one (MME 1714 -> 1714.0 +- intervals of a few points)
    dec = {c["label"]: max(1, _decimals([r["values"][i] for r in spec["rows"]]) + 1) if spec.get("rows") else 1
           for i, c in enumerate(spec["columns"])}
    labels = [c["label"] for c in spec["columns"]]
    vanilla = spec.get("vanilla")
    units_cache: dict[tuple, RunUnits | str] = {}

    def units(rd: str | None, metric: str) -> RunUnits | str:
        if rd is None:
            return "not run"
        key = (rd, metric)
        if key not in units_cache:
            try:
                units_cache[key] = load_units(rd, metric)
            except StatsUnavailable as exc:
                units_cache[key] = str(exc)
        return units_cache[key]

    cells: dict[tuple, _Cell] = {}
    for r in cells_df.itertuples():
        rd = run_dir.get(r.run) if isinstance(r.run, str) else None
        cells[(r.model, r.method, r.budget, r.column)] = _Cell(
            r.model, r.method, r.budget, r.column, r.benchmark, r.metric, scale[r.column], rd,
            None if r.ours is None or (isinstance(r.ours, float) and math.isnan(r.ours)) else float(r.ours))

    def pair(ref_cell: _Cell | None, cell: _Cell) -> Comparison | str:
        if cell.run_dir is None:
            return "no run"
        if ref_cell is None or ref_cell.run_dir is None:
            return "no reference run"
        a, b = units(ref_cell.run_dir, cell.metric), units(cell.run_dir, cell.metric)
        if isinstance(a, str):
            return a
        if isinstance(b, str):
            return b
        c = compare(a, b, confidence=opts.confidence, n_resamples=opts.n_resamples, seed=opts.seed)
        return c if c.paired else str(c.reason)

    refs = [("vanilla", vanilla)] + ([(opts.ref, opts.ref)] if opts.ref else [])
    for cell in cells.values():
        for ref_name, ref_method in refs:
            if ref_method is None or cell.method == ref_method or (ref_name != "vanilla" and cell.method == vanilla):
                continue
            ref_budget = "full" if ref_name == "vanilla" else cell.budget
            cell.comparisons[ref_name] = pair(cells.get((cell.model, ref_method, ref_budget, cell.column)), cell)

    notes: dict[str, int] = {}

    def note(text: str) -> str:
        text = " ".join(str(text).split())
        if text not in notes:
            notes[text] = len(notes) + 1
        return f"n/a[{notes[text]}]"

    out = [f"#### Paired Δ with {opts.confidence:.0%} bootstrap intervals", ""]
    out.append(f"Δ = ours − reference on the samples both runs answered, in the table's unit; [lo, hi] = paired "
               f"bootstrap interval ({opts.n_resamples} resamples of the benchmark's unit: image pairs within "
               "subtask for MME, questions within category for POPE, CircularEval groups for MMBench, questions "
               "otherwise); test = exact McNemar for per-question right/wrong scores, paired permutation test "
               "otherwise. " + RULE + ".")
    used = runs[runs["name"].isin(cells_df["run"].dropna())] if len(runs) else runs
    if len(used) and used["random_weights"].map(lambda v: isinstance(v, bool) and v).any():
        out.append("")
        out.append("NOTE: random-weight runs (pipeline checks): the tiny model's answers are almost all unparsable or "
                   "wrong, so scores sit near 0 and most Δ are 0; where a few answers differ the interval is wide "
                   "against its Δ because so few units carry the difference. The intervals measure the sampling "
                   "noise of these runs, not accuracy differences between methods.")
    if len(used) and used["limit"].notna().any():
        out.append("")
        out.append("NOTE: limited runs (limit=N): few units, so the intervals are wide; only runs with the same "
                   "limit share their samples and can be paired.")
    import pandas as pd

    for ref_name, ref_method in refs:
        if ref_method is None:
            continue
        rows = []
        for key in dict.fromkeys((c.model, c.method, c.budget) for c in cells.values()):
            model, method, budget = key
            if method == ref_method or (ref_name != "vanilla" and method == vanilla):
                continue
            row_cells = [cells.get((model, method, budget, lab)) for lab in labels]
            if all(c is None or c.run_dir is None for c in row_cells):
                continue
            comps = [c.comparisons.get(ref_name) if c else None for c in row_cells]
            pvals = [x.p_value if isinstance(x, Comparison) else None for x in comps]
            adj = holm(pvals)
            row = {"Model": model, "Budget": budget, "Method": method}
            for lab, c, comp, p_adj in zip(labels, row_cells, comps, adj):
                if isinstance(comp, Comparison):
                    mark = "*" if p_adj is not None and p_adj < ALPHA and comp.excludes_zero else ""
                    row[lab] = _fmt(comp, c.scale, dec[lab]) + mark
                elif c is None or c.run_dir is None:
                    row[lab] = ""
                else:
                    row[lab] = note(comp or "not compared")
            rows.append(row)
        if not rows:
            continue
        df = pd.DataFrame(rows)
        if df["Model"].nunique() == 1:
            df = df.drop(columns=["Model"])
        df = df[[c for c in df.columns if c in ("Model", "Budget", "Method") or (df[c] != "").any()]]
        title = "vs vanilla (full visual tokens)" if ref_name == "vanilla" else f"vs {ref_method} at the same budget"
        out += ["", f"Δ {title}:", "", df.to_markdown(index=False)]

    out += ["", "#### Which methods are indistinguishable at each budget", ""]
    out.append("Per model × benchmark × budget: the best-scoring method, and the others compared with it "
               f"(paired, Holm across the methods of that budget): '≈' = not distinguishable (adjusted p ≥ {ALPHA} "
               "or interval contains 0), '<' = significantly below.")
    summary_lines = []
    groups: dict[tuple, list[_Cell]] = {}
    for c in cells.values():
        if c.method != vanilla and c.value is not None and c.run_dir is not None:
            groups.setdefault((c.model, c.column, c.budget), []).append(c)
    for (model, col, budget), members in groups.items():
        if len(members) < 2:
            continue
        best = max(members, key=lambda c: c.value)
        comps = [(c, pair(best, c)) for c in members if c is not best]
        adj = holm([x.p_value if isinstance(x, Comparison) else None for _, x in comps])
        parts = []
        for (c, comp), p_adj in zip(comps, adj):
            if not isinstance(comp, Comparison):
                parts.append(f"{c.method} ({note(comp)})")
            elif p_adj is not None and p_adj < ALPHA and comp.excludes_zero:
                parts.append(f"< {c.method}")
            else:
                parts.append(f"≈ {c.method}")
        summary_lines.append(f"* {model} · {col} · {budget}: best {best.method} ({best.value:.{dec[col]}f}); "
                             + ", ".join(parts))
    out += [""] + (summary_lines or ["(fewer than two compressed methods with runs at any budget)"])

    seed_lines = _seed_lines(runs, cells, labels, dec)
    if seed_lines:
        out += ["", "#### Seeds", "", "Runs that differ only by `seed` (methods with randomness): mean ± sd "
                "(sample sd) over seeds and the seed range, beside the width of one seed's paired interval vs "
                "vanilla (the benchmark's own sampling noise).", ""] + seed_lines
    if notes:
        out += [""] + [f"[{i}] {t}  " for t, i in notes.items()]
    return "\n".join(out) + "\n"


def _seed_lines(runs: Any, cells: dict[tuple, _Cell], labels: list[str], dec: dict[str, int]) -> list[str]:
    """Mean ± sd over seeds for (model, method, budget, benchmark) groups with runs of several seeds."""
    if not len(runs):
        return []
    lines = []
    df = runs.copy()
    df["seed"] = [run_seed(d) for d in df["run_dir"]]
    df["group_method"] = [_SEED_RE.sub("", str(m)) for m in df["method_label"]]
    df["group_model"] = [_SEED_RE.sub("", str(m)) for m in df["model"]]
    for (model, method, budget, bench), sub in df.groupby(["group_model", "group_method", "budget_label", "benchmark"]):
        seeds = sub.dropna(subset=["seed"]).drop_duplicates("seed").sort_values("seed")
        if len(seeds) < 2:
            continue
        for cell in (c for c in cells.values() if c.model == model and c.method == method and c.budget == budget
                     and c.benchmark == bench):
            vals = []
            for _, run in seeds.iterrows():
                v = 0.0
                ok = False
                for part in cell.metric.split("+"):
                    x = run.get(f"metric.{part}")
                    if x is not None and not (isinstance(x, float) and math.isnan(x)):
                        v += float(x)
                        ok = True
                if ok:
                    vals.append(v * cell.scale)
            if len(vals) < 2:
                continue
            mean, sd, rng = seed_spread(vals)
            comp = cell.comparisons.get("vanilla")
            width = (f"; one seed's paired interval vs vanilla is {(comp.high - comp.low) * cell.scale:.{dec[cell.column]}f} wide"
                     if isinstance(comp, Comparison) else "")
            lines.append(f"* {model} · {method} · {budget} · {cell.column}: {mean:.{dec[cell.column]}f} ± "
                         f"{sd:.{dec[cell.column]}f} over {len(vals)} seeds ({', '.join(str(int(s)) for s in seeds['seed'])}), "
                         f"range {rng:.{dec[cell.column]}f}{width}")
    return lines
