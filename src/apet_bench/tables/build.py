"""Build one of the paper's Tables 1-6 from the runs DataFrame, beside the published numbers.

Layout (as the paper): rows = method x budget (vanilla first), columns = benchmarks, then "Avg.".
Each row appears three times: ``ours`` (from ``results/runs``), ``paper`` (``paper_numbers.yaml``) and
``Δ`` (ours - paper, in the paper's unit; Avg. in percentage points).

"Avg." = mean over the row's benchmarks of ``100 * value / vanilla value`` (see
``paper_numbers.yaml``; it reproduces every printed Avg. of Tables 1-4). For our rows the mean is
taken over the benchmarks where both the row and our vanilla row have a value; when that is fewer than
all columns the cell says how many (``97.3% (2/9)``).

A cell without a value shows ``n/a`` with a footnote giving the reason: the one-line error recorded for
that run (data absent, method not available, evaluation failed) or "not run".
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .runs import METRIC_PREFIX

__all__ = ["TableResult", "build_table", "load_paper_numbers", "relative_average", "paper_avg"]

PAPER_FILE = Path(__file__).with_name("paper_numbers.yaml")


def load_paper_numbers(path: str | Path | None = None) -> dict[str, Any]:
    """The transcribed tables (``paper_numbers.yaml``)."""
    import yaml

    return yaml.safe_load(Path(path or PAPER_FILE).read_text(encoding="utf-8"))


def relative_average(values: list[float | None], vanilla: list[float | None]) -> tuple[float | None, int]:
    """The paper's "Avg.": mean of ``100 * v / vanilla`` over positions where both are given.

    Returns ``(average or None, number of benchmarks used)``. A vanilla value of 0 is skipped.

    >>> relative_average([50.0, None, 900.0], [100.0, 80.0, 1000.0])
    (70.0, 2)
    """
    ratios = [100.0 * v / b for v, b in zip(values, vanilla) if v is not None and b not in (None, 0)]
    return (sum(ratios) / len(ratios), len(ratios)) if ratios else (None, 0)


def paper_avg(spec: dict[str, Any], row: dict[str, Any]) -> list[float | None]:
    """Recompute a paper row's Avg. values from its published numbers (for checking the transcription)."""
    labels = [c["label"] for c in spec["columns"]]
    van = next(r for r in spec["rows"] if r["method"] == spec["vanilla"])
    out = []
    for group in spec.get("avg") or []:
        cols = labels if group["columns"] == "all" else group["columns"]
        idx = [labels.index(c) for c in cols]
        out.append(relative_average([row["values"][i] for i in idx], [van["values"][i] for i in idx])[0])
    return out


@dataclass
class TableResult:
    """A built table: ``display`` (strings, the paper's layout), ``cells`` (one row per cell, numbers),
    footnotes (reasons and data notes) and the header lines."""

    name: str
    title: str
    display: Any  # pandas.DataFrame
    cells: Any  # pandas.DataFrame
    footnotes: list[str] = field(default_factory=list)
    header: list[str] = field(default_factory=list)

    def to_markdown(self) -> str:
        lines = [f"### {self.title}", ""] + [f"{h}  " for h in self.header] + [""]
        lines.append(self.display.to_markdown(index=False))
        if self.footnotes:
            lines.append("")
            lines += [f"{note}  " for note in self.footnotes]
        return "\n".join(lines) + "\n"

    def to_latex(self) -> str:
        body = self.display.to_latex(index=False, escape=True)
        notes = "\n".join(f"% {n}" for n in self.header + self.footnotes)
        return f"% {self.title}\n{notes}\n{body}"

    def write(self, out_dir: str | Path) -> list[Path]:
        """Write ``<name>.md``, ``<name>.csv`` (the display table), ``<name>_cells.csv`` (tidy, numbers)
        and ``<name>.tex`` atomically under ``out_dir``."""
        import os
        import secrets

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        files = {
            f"{self.name}.md": self.to_markdown(),
            f"{self.name}.csv": self.display.to_csv(index=False),
            f"{self.name}_cells.csv": self.cells.to_csv(index=False),
            f"{self.name}.tex": self.to_latex(),
        }
        written = []
        for fname, text in files.items():
            p = out / fname
            tmp = out / f".{fname}.{secrets.token_hex(4)}.part"
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, p)
            written.append(p)
        return written


def _budget_key(b: Any) -> str:
    if b in (None, "full"):
        return "full"
    if isinstance(b, float):
        return repr(b)
    return str(b)


def _decimals(values: list[Any]) -> int:
    best = 0
    for v in values:
        if v is None:
            continue
        s = repr(float(v))
        frac = s.split(".")[1].rstrip("0") if "." in s else ""
        best = max(best, len(frac))
    return min(best, 2)


def _given(v: Any) -> bool:
    """False for None / NaN (pandas fills absent values with NaN)."""
    if v is None:
        return False
    try:
        return not math.isnan(float(v))
    except (TypeError, ValueError):
        return True


def _metric_value(run: Any, metric: str, scale: float) -> tuple[float | None, str | None, list[str]]:
    """``(value in the paper's unit, reason when None, notes)``; a ``a+b`` metric sums the parts present
    (MME perception + cognition: a run whose data or limit reaches no cognition subtask gives
    perception alone, with a note)."""
    total, absent, present = 0.0, [], 0
    for part in metric.split("+"):
        v = run.get(METRIC_PREFIX + part)
        if not _given(v):
            absent.append(part)
            continue
        total += float(v)
        present += 1
    if not present:
        return None, f"run {run['name']} has no metric {' / '.join(absent)}", []
    notes = [f"without {', '.join(absent)} (no such samples in the run)"] if absent else []
    return total * scale, None, notes


def protocol_notes(benchmarks: list[str], protocol: str) -> list[str]:
    """One line per benchmark naming the evaluation protocol its column shows (from its config's
    ``protocols`` block: the task variant, question text, scorer and official source)."""
    from apet_bench.config import group_options, load_group
    from apet_bench.protocol import resolve

    lines = []
    for bench in dict.fromkeys(benchmarks):
        if bench not in group_options("benchmark"):
            continue
        cfg = load_group("benchmark", bench, resolve=False)
        block = (cfg.get("protocols") or {}).get(protocol)
        if not block:
            lines.append(f"{bench}: protocol {protocol} not described for this benchmark")
            continue
        res = resolve({**cfg, "protocol": protocol})
        if (res.get("source") or "local") == "local":
            task = f"local converter {res.get('converter')}"
        else:
            task = f"lmms-eval {res.get('lmms_eval_submission_task') if res.get('submission') else res.get('lmms_eval_task')}"
        if res.get("custom"):
            task += f" with our {res['custom']} functions"
        split = ", server-scored split: submission file" if res.get("submission") else ""
        lines.append(f"{bench}: protocol {protocol} [{task}{split}]: question {block.get('question')}; "
                     f"post-prompt {block.get('post_prompt')}; scorer {block.get('scorer')}; source {block.get('source')}")
    return lines


def build_table(name: str, runs: Any, *, failures: Any = None, model: str | list[str] | None = None,
                spec: dict[str, Any] | None = None, protocol: str = "llava") -> TableResult:
    """Build table ``name`` (``table1`` ... ``table6``).

    Parameters
    ----------
    name : str
        Key in ``paper_numbers.yaml``.
    runs : pandas.DataFrame
        :func:`apet_bench.tables.load_runs` output (complete runs only are used for values).
    failures : pandas.DataFrame, optional
        Recorded failures (``load_runs(..., include_failed=True)`` rows whose status is not complete);
        their ``error`` becomes the missing cell's reason.
    model : str or list of str, optional
        Our model(s) in place of the paper's (e.g. ``tiny_llava15``); a list maps onto the table's
        models in order, one name replaces them all. Paper numbers stay the paper's.
    spec : dict, optional
        A table spec (default: from ``paper_numbers.yaml``).

    Raises
    ------
    ValueError
        Unknown table name.
    """
    import pandas as pd

    papers = load_paper_numbers() if spec is None else {name: spec}
    if name not in papers:
        raise ValueError(f"unknown table {name!r} (available: {', '.join(sorted(papers))})")
    spec = papers[name]
    labels = [c["label"] for c in spec["columns"]]
    dec = {c["label"]: _decimals([r["values"][i] for r in spec["rows"]]) for i, c in enumerate(spec["columns"])}
    paper_models = list(spec["models"])
    if model is None:
        our_models = paper_models
    else:
        given = [m for m in ([model] if isinstance(model, str) else list(model)) if m]
        our_models = [given[min(i, len(given) - 1)] for i in range(len(paper_models))]
    model_map = dict(zip(paper_models, our_models))

    from apet_bench.protocol import PROTOCOLS

    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol {protocol!r} is invalid (use {' or '.join(PROTOCOLS)})")

    def _of_protocol(df):  # runs of the chosen evaluation protocol (apet_bench.protocol) or recorded without one
        if df is None or not len(df) or "protocol" not in df.columns:
            return df
        return df[df["protocol"].isna() | (df["protocol"] == protocol)]

    runs = _of_protocol(runs)
    failures = _of_protocol(failures)
    complete = runs[runs["status"] == "complete"] if len(runs) else runs
    fails = failures if failures is not None and len(failures) else None
    notes: dict[str, int] = {}

    def note(text: str) -> str:
        if text not in notes:
            notes[text] = len(notes) + 1
        return f"[{notes[text]}]"

    def lookup(m: str, method: str, budget: str, bench: str):
        if not len(complete):
            return None
        sel = complete[(complete["model"] == m) & (complete["method_label"] == method)
                       & (complete["budget_label"] == budget) & (complete["benchmark"] == bench)]
        return None if sel.empty else sel.iloc[0]

    def failure(m: str, method: str, budget: str, bench: str) -> str | None:
        if fails is None:
            return None
        sel = fails[(fails["model"] == m) & (fails["method_label"] == method)
                    & (fails["budget_label"] == budget) & (fails["benchmark"] == bench)]
        return None if sel.empty else str(sel.iloc[0]["error"] or sel.iloc[0]["status"])

    # Row plan: the paper's rows, then runs of our model(s) outside the paper's grid.
    plan = []
    for r in spec["rows"]:
        pm = r.get("model", paper_models[0])
        plan.append({"paper_model": pm, "model": model_map[pm], "method": r["method"], "budget": _budget_key(r["budget"]),
                     "label": r.get("label"), "paper": r})
    if len(complete):
        seen = {(p["model"], p["method"], p["budget"]) for p in plan}
        benches = {c["benchmark"] for c in spec["columns"]}
        extra = complete[complete["model"].isin(our_models) & complete["benchmark"].isin(benches)]
        for _, run in extra.sort_values(["model", "method_label", "budget_label"]).iterrows():
            key = (run["model"], run["method_label"], run["budget_label"])
            if key not in seen:
                seen.add(key)
                pm = paper_models[our_models.index(run["model"])]
                plan.append({"paper_model": pm, "model": run["model"], "method": run["method_label"],
                             "budget": run["budget_label"], "label": None, "paper": None})

    cells = []
    ours_vals: dict[tuple, list[float | None]] = {}
    flags: dict[tuple, list[str]] = {}
    limits: dict[tuple, list] = {}  # per cell: the run's limit (None = full benchmark)
    for p in plan:
        vals: list[float | None] = []
        marks: list[str] = []
        for col in spec["columns"]:
            run = lookup(p["model"], p["method"], p["budget"], col["benchmark"])
            value, reason, cell_notes = None, None, []
            if run is not None:
                value, reason, cell_notes = _metric_value(run, col["metric"], float(col.get("scale", 1)))
                if value is None and isinstance(run.get("note"), str) and run["note"].startswith("submission file"):
                    reason = run["note"]
                if _given(run.get("limit")):
                    cell_notes.append(f"limit={int(run['limit'])}: first {int(run['limit'])} samples only, not the full benchmark")
                if _given(run.get("random_weights")) and bool(run.get("random_weights")):
                    cell_notes.append("random weights (tiny model): a pipeline check, not an accuracy number")
                miss = run.get("missing_subtasks")
                if isinstance(miss, list) and miss and col["benchmark"] == "mme":
                    cell_notes.append(f"MME without subtasks {', '.join(miss)} (no local images): sums over fewer subtasks")
                if run.get("source") == "imported":
                    cell_notes.append(f"imported predictions: {run.get('weights')}")
            else:
                reason = failure(p["model"], p["method"], p["budget"], col["benchmark"]) or "not run"
            vals.append(value)
            marks.append("".join(note(n) for n in cell_notes) if value is not None else note(reason))
            paper_v = p["paper"]["values"][labels.index(col["label"])] if p["paper"] else None
            cells.append({
                "model": p["model"], "paper_model": p["paper_model"], "method": p["method"], "budget": p["budget"],
                "column": col["label"], "benchmark": col["benchmark"], "metric": col["metric"],
                "ours": value, "paper": paper_v,
                "delta": (value - paper_v) if value is not None and paper_v is not None else None,
                "status": "ok" if value is not None else "missing",
                "reason": reason if value is None else None, "notes": "; ".join(cell_notes) or None,
                "run": run["name"] if run is not None else None,
                "limit": int(run["limit"]) if run is not None and _given(run.get("limit")) else None,
            })
        ours_vals[(p["model"], p["method"], p["budget"])] = vals
        limits[(p["model"], p["method"], p["budget"])] = [c["limit"] for c in cells[-len(vals):]]
        flags[(p["model"], p["method"], p["budget"])] = marks

    avg_groups = spec.get("avg") or []
    rows_out = []
    for p in plan:
        key = (p["model"], p["method"], p["budget"])
        vals, marks = ours_vals[key], flags[key]
        van = ours_vals.get((p["model"], spec.get("vanilla"), "full")) if spec.get("vanilla") else None
        setting = "full" if p["budget"] == "full" else p["budget"]
        base = {"Model": p["model"], "Budget": setting, "Method": p["label"] or p["method"]}
        ours = {**base, "": "ours"}
        paper = {**base, "": "paper"}
        delta = {**base, "": "Δ"}
        for i, lab in enumerate(labels):
            d = dec[lab]
            v = vals[i]
            ours[lab] = f"{v:.{d}f}{marks[i]}" if v is not None else f"n/a{marks[i]}"
            pv = p["paper"]["values"][i] if p["paper"] else None
            paper[lab] = "-" if pv is None else f"{pv:.{d}f}"
            delta[lab] = f"{v - pv:+.{d}f}" if v is not None and pv is not None else ""
        for gi, group in enumerate(avg_groups):
            cols = labels if group["columns"] == "all" else group["columns"]
            idx = [labels.index(c) for c in cols]
            avg, n = (None, 0)
            if van is not None:
                avg, n = relative_average([vals[i] for i in idx], [van[i] for i in idx])
            txt = "n/a" if avg is None else f"{avg:.1f}%" + ("" if n == len(idx) else f" ({n}/{len(idx)})")
            vlim = limits.get((p["model"], spec.get("vanilla"), "full"))
            rlim = limits[key]
            if avg is not None and vlim is not None and any(
                    vals[i] is not None and van[i] is not None and rlim[i] != vlim[i] for i in idx):
                txt += note("Avg. compares runs over different samples (limit differs from the vanilla row's)")
            ours[group["label"]] = txt
            pav = (p["paper"].get("avg") or [None] * len(avg_groups))[gi] if p["paper"] else None
            paper[group["label"]] = "" if pav is None else f"{pav:.1f}%"
            delta[group["label"]] = f"{avg - pav:+.1f}" if avg is not None and pav is not None and n == len(idx) else ""
        rows_out += [ours, paper, delta] if p["paper"] else [ours]

    display = pd.DataFrame(rows_out)
    if display["Model"].nunique() == 1:
        display = display.drop(columns=["Model"])
    cells_df = pd.DataFrame(cells)
    used = complete[complete["model"].isin(our_models)] if len(complete) else complete
    header = [
        f"ours: {len(used)} finished run(s) of {', '.join(dict.fromkeys(our_models))} read from results/runs/ "
        "(scored by each benchmark's evaluation protocol, see the [P] footnotes; apet_bench.tables)",
        f"paper: {', '.join(paper_models)} numbers from the ApET paper, {spec['title'].split(':')[0]} "
        "(src/apet_bench/tables/paper_numbers.yaml); Δ = ours - paper",
    ]
    if our_models != paper_models:
        header.append(f"NOTE: our rows are model {', '.join(dict.fromkeys(our_models))}, the paper's are "
                      f"{', '.join(paper_models)}: Δ compares different models")
    if len(used):
        if used["random_weights"].map(lambda v: _given(v) and bool(v)).any():
            header.append("NOTE: random-weight runs are pipeline checks; their scores are not accuracy numbers")
        if used["limit"].notna().any():
            header.append("NOTE: built from limited runs (limit=N: first N samples), not full benchmarks")
        devices = sorted({f"{d} / {a}" for d, a in zip(used["device"].fillna("?"), used["attn_implementation"].fillna("?"))})
        header.append(f"device / attention: {'; '.join(devices)}")
    header.append(f"evaluation protocol: {protocol} (benchmark.protocol; llava = the official LLaVA-family "
                  "evaluation, lmms_eval = lmms-eval's stock tasks; docs/protocol.md); each benchmark's variant in the [P] footnotes")
    footnotes = [f"[{i}] {t}" for t, i in notes.items()]
    footnotes += [f"[P] {line}" for line in protocol_notes([c["benchmark"] for c in spec["columns"]], protocol)]
    return TableResult(name=name, title=spec["title"], display=display, cells=cells_df, footnotes=footnotes, header=header)
