"""Accuracy-efficiency plots from ``results/runs/``: per model and benchmark, every method across budgets.

``python -m apet_bench.plots [results_dir=results] [out_dir=<results_dir>/plots] [model=a,b] [benchmark=x] [stats=true]``
(run by ``make tables`` after the table aggregators) writes, per (model, benchmark),
``<out_dir>/acc_eff__<model>__<benchmark>.png`` and ``.svg``: one row per headline metric of the
benchmark (MME: perception and cognition), with

* left: the metric against **prefill TFLOPs** of the full-size model under that method and budget
  (:func:`apet_bench.flops.count_flops`: vision encoder + projector + LLM prefill + the method's own
  overhead, counted on the meta device; the convention is in ``apet_bench.flops.CONVENTION``). For a
  tiny random-weight run it is the FLOPs of the full-size model with the same token plan (the tiny
  model itself is not counted); the axis label says so. Where ``apet_bench.flops`` cannot count a
  run (an unknown model, a method it has no plan for), that figure falls back to the run's
  **layer-average visual tokens** (the paper's budget convention) and labels its x axis accordingly.
* right (where the runs measured it): the metric against **prefill ms** (mean per sample,
  ``metrics.json`` ``tokens.prefill_ms_mean``, wall clock as measured in the run on its device and
  attention backend, both named in the panel title).

Each method is one line over its budgets; ``none`` (no compression) is a single marked point with a
dashed horizontal reference. Runs are read with :func:`apet_bench.tables.load_runs` (the aggregators'
reader). TFLOPs per (model, method, params, budget) are cached in ``<out_dir>/.flops_cache.json``
(a count runs the method once on a shape proxy: seconds per cell), keyed also by the hash of
``apet_bench/flops.py`` so a changed counter recounts. An ``index.md`` lists the figures.
With ``stats=true`` every compressed run gets an error bar: the vanilla score plus the 95 % paired bootstrap
interval of its difference to vanilla (:func:`add_intervals`, :mod:`apet_bench.stats`).
Scores of random-weight runs are a pipeline check, never accuracy, and the figure title says so.
The positional-bias report of the same runs (:mod:`apet_bench.bias`) goes to ``<out_dir>/bias/``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["add_efficiency", "add_intervals", "main", "plot_accuracy_efficiency", "tflops_of"]

METRIC_PREFIX = "metric."


def _load_runs(results_dir: Path):
    """``apet_bench.tables.load_runs`` (the aggregators' reader), else a minimal reader of run.json."""
    try:
        from apet_bench.tables import load_runs
    except ImportError:  # pragma: no cover - the tables package predates this module
        load_runs = None
    if load_runs is not None:
        return load_runs(results_dir)
    import pandas as pd  # pragma: no cover

    rows = []  # pragma: no cover
    for p in sorted((results_dir / "runs").glob("*/run.json")):  # pragma: no cover
        run = json.loads(p.read_text(encoding="utf-8"))
        if run.get("status") != "complete":
            continue
        parts = run["name"].split("__")
        row = {k: run.get(k) for k in ("name", "model", "method", "budget", "benchmark", "random_weights",
                                       "device", "attn_implementation", "layer_average_visual_tokens")}
        row.update(method_label=parts[1] if len(parts) == 4 else run.get("method"), run_dir=str(p.parent))
        row.update({METRIC_PREFIX + k: v for k, v in (run.get("metrics") or {}).items()})
        rows.append(row)
    return pd.DataFrame(rows)  # pragma: no cover


def tflops_of(model: str, method: str, budget: Any, params: dict[str, Any] | None,
              cache: dict[str, Any] | None = None) -> float | None:
    """Prefill TFLOPs of the full-size ``model`` under ``method`` / ``budget`` / ``params`` (``None``
    when :mod:`apet_bench.flops` is absent or cannot count it).

    Parameters
    ----------
    cache : dict, optional
        Memo keyed by the JSON of the arguments; updated in place (``None`` results are cached too).
    """
    try:
        from apet_bench import flops as flops_module
    except ImportError:  # pragma: no cover - apet_bench.flops predates this module
        return None
    count_flops = flops_module.count_flops
    key = json.dumps([model, method, budget, params or {}, _source_hash(flops_module)], sort_keys=True, default=str)
    if cache is not None and key in cache:
        return cache[key]
    try:
        value: float | None = float(count_flops(model, method, None if method == "none" else budget, params=params).total_tflops)
    except Exception:  # noqa: BLE001 - unknown model / method without a plan: the caller falls back
        value = None
    if cache is not None:
        cache[key] = value
    return value


def _source_hash(module: Any) -> str:
    """First 12 hex digits of the SHA-1 of a module's source file: cached counts expire when it changes."""
    import hashlib

    try:
        return hashlib.sha1(Path(module.__file__).read_bytes()).hexdigest()[:12]
    except (OSError, TypeError, AttributeError):
        return "unknown"


def _run_extras(run_dir: str) -> dict[str, Any]:
    d = Path(run_dir)
    out: dict[str, Any] = {"method_params": {}, "prefill_ms_mean": None}
    try:
        out["method_params"] = json.loads((d / "run.json").read_text(encoding="utf-8")).get("method_params") or {}
    except (OSError, ValueError):
        pass
    try:
        tokens = json.loads((d / "metrics.json").read_text(encoding="utf-8")).get("tokens") or {}
        ms = tokens.get("prefill_ms_mean")
        out["prefill_ms_mean"] = float(ms) if isinstance(ms, (int, float)) and not isinstance(ms, bool) else None
    except (OSError, ValueError):
        pass
    return out


def add_efficiency(df, *, flops: Callable[..., float | None] = tflops_of, cache: dict[str, Any] | None = None):
    """Add ``tflops``, ``prefill_ms`` and ``method_params`` columns to a :func:`load_runs` frame (copy)."""
    df = df.copy()
    extras = [_run_extras(d) for d in df["run_dir"]] if len(df) else []
    df["method_params"] = [e["method_params"] for e in extras]
    df["prefill_ms"] = [e["prefill_ms_mean"] for e in extras]
    df["tflops"] = [
        flops(r.model, r.method, None if r.method == "none" else _budget(r), r.method_params, cache)
        for r in df.itertuples()
    ]
    return df


CI_LOW, CI_HIGH = "ci_low.", "ci_high."


def add_intervals(df, *, n_resamples: int = 9999, confidence: float = 0.95):
    """Add ``ci_low.<metric>`` / ``ci_high.<metric>`` columns (copy): the run's score interval implied by
    its paired bootstrap interval of Δ against the vanilla run (``method == "none"``) of the same model and
    benchmark, i.e. ``vanilla + [lo, hi]`` (:func:`apet_bench.stats.compare`). NaN where there is no
    vanilla run, the runs do not share their samples, or the samples carry no per-unit scores."""
    import math

    from apet_bench.stats import StatsUnavailable, compare, load_units

    df = df.copy()
    metrics = [c[len(METRIC_PREFIX):] for c in df.columns if c.startswith(METRIC_PREFIX)]
    for m in metrics:
        df[CI_LOW + m] = math.nan
        df[CI_HIGH + m] = math.nan
    for _, sub in df.groupby(["model", "benchmark"]):
        van = sub[sub["method"] == "none"]
        if van.empty:
            continue
        van = van.iloc[0]
        for idx, run in sub.iterrows():
            if run["name"] == van["name"]:
                continue
            for m in metrics:
                base = van.get(METRIC_PREFIX + m)
                if base is None or (isinstance(base, float) and math.isnan(base)):
                    continue
                try:
                    c = compare(load_units(van["run_dir"], m), load_units(run["run_dir"], m),
                                n_resamples=n_resamples, confidence=confidence)
                except StatsUnavailable:
                    continue
                if c.paired:
                    df.loc[idx, CI_LOW + m] = float(base) + c.low
                    df.loc[idx, CI_HIGH + m] = float(base) + c.high
    return df


def _budget(row: Any) -> int | float | None:
    """The run's budget as recorded (int tokens / float ratio): pandas turns an int column holding a
    ``None`` into floats, so it is read back from the run name's label (``64``, ``0.1``, ``full``)."""
    label = str(getattr(row, "budget_label", "") or "")
    if label == "full":
        return None
    if label.isdigit():
        return int(label)
    try:
        return float(label)
    except ValueError:
        b = row.budget
        return int(b) if isinstance(b, float) and b.is_integer() and b > 1 else b


def plot_accuracy_efficiency(df, model: str, benchmark: str, out_dir: str | Path) -> list[Path]:
    """Draw one (model, benchmark) figure from a frame with :func:`add_efficiency`'s columns.

    Returns
    -------
    list of Path
        ``acc_eff__<model>__<benchmark>.png`` and ``.svg``.

    Raises
    ------
    ValueError
        No run of that model and benchmark has a numeric metric.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    plt.rcParams["svg.fonttype"] = "none"  # SVG text stays text (searchable, editable)
    sub = df[(df["model"] == model) & (df["benchmark"] == benchmark)]
    metrics = [c for c in sub.columns if c.startswith(METRIC_PREFIX) and sub[c].notna().any()]
    if sub.empty or not metrics:
        raise ValueError(f"no run of model {model!r} on {benchmark!r} has a numeric metric")
    use_flops = bool(sub["tflops"].notna().all())
    xcol = "tflops" if use_flops else "layer_average_visual_tokens"
    xlabel = ("prefill TFLOPs of the full-size model (apet_bench.flops, meta-device count)" if use_flops
              else "layer-average visual tokens (TFLOPs not countable for these runs)")
    has_ms = bool(sub["prefill_ms"].notna().any())
    ncols = 2 if has_ms else 1
    fig, axes = plt.subplots(len(metrics), ncols, figsize=(6.2 * ncols, 3.8 * len(metrics)), squeeze=False)
    labels = sorted(sub["method_label"].unique(), key=lambda m: (m != "none", m))
    colours = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(labels)}
    has_ci = False
    for r, metric in enumerate(metrics):
        for c, (x, xl) in enumerate([(xcol, xlabel), ("prefill_ms", None)][:ncols]):
            ax = axes[r, c]
            for label in labels:
                pts = sub[(sub["method_label"] == label) & sub[metric].notna() & sub[x].notna()].sort_values(x)
                if pts.empty:
                    continue
                xs, ys = pts[x].astype(float).to_numpy(), pts[metric].astype(float).to_numpy()
                if label == "none":
                    ax.axhline(ys.mean(), color=colours[label], ls="--", lw=0.8)
                    ax.plot(xs, ys, "*", ms=11, color=colours[label], label="none (no compression)")
                    continue
                ax.plot(xs, ys, "o-", color=colours[label], label=label, ms=4)
                lo_col, hi_col = CI_LOW + metric[len(METRIC_PREFIX):], CI_HIGH + metric[len(METRIC_PREFIX):]
                if lo_col in pts and pts[lo_col].notna().any():
                    lo, hi = pts[lo_col].astype(float).to_numpy(), pts[hi_col].astype(float).to_numpy()
                    ok = np.isfinite(lo) & np.isfinite(hi)
                    ax.errorbar(xs[ok], ys[ok], yerr=[np.maximum(ys[ok] - lo[ok], 0), np.maximum(hi[ok] - ys[ok], 0)],
                                fmt="none", ecolor=colours[label], elinewidth=0.8, capsize=2)
                    has_ci = True
                budgets = pts["budget_label"] if "budget_label" in pts else pts["budget"]
                for xv, yv, b in zip(xs, ys, budgets):
                    ax.annotate(str(b), (xv, yv), textcoords="offset points", xytext=(3, 3), fontsize=6,
                                color=colours[label])
            if xl is None:
                devices = sorted({f"{d}, {a}" for d, a in zip(sub["device"], sub["attn_implementation"])})
                xl = f"prefill ms (mean per sample, measured in the run; {'; '.join(map(str, devices))})"
            ax.set_xlabel(xl, fontsize=8)
            ax.set_ylabel(metric[len(METRIC_PREFIX):], fontsize=8)
            ax.grid(alpha=0.3)
            if not np.isfinite(ax.dataLim.x0):
                ax.text(0.5, 0.5, "not measured", ha="center", transform=ax.transAxes)
        axes[r, 0].legend(fontsize=7)
    random = bool(sub["random_weights"].fillna(False).astype(bool).any())
    title = f"{model} on {benchmark}: accuracy vs efficiency, every method across budgets"
    if has_ci:
        title += "\nerror bars: vanilla score + 95% paired bootstrap interval of the difference to vanilla"
    if random:
        title += "\n(random-weight runs: a pipeline check, these scores are not accuracy numbers)"
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"acc_eff__{model}__{benchmark}.{ext}" for ext in ("png", "svg")]
    for p in paths:
        fig.savefig(p, dpi=130)
    plt.close(fig)
    return paths


def _command() -> Any:
    from apet_bench.cli import Command, Key

    return Command(
        "python -m apet_bench.plots",
        "Accuracy-efficiency plots (score against prefill TFLOPs) of the finished runs, per model and benchmark, "
        "plus the positional-bias table (apet_bench.bias).",
        (
            Key("results_dir", "results", help="results directory (reads <results_dir>/runs)"),
            Key("out_dir", None, help="output directory (default <results_dir>/plots)"),
            Key("model", None, help="only these models (comma-separated)"),
            Key("benchmark", None, help="only these benchmarks (comma-separated)"),
            Key("stats", False, "bool", help="error bars: paired bootstrap intervals against the vanilla run"),
            Key("n_resamples", 9999, "int", help="bootstrap resamples (stats=true)"),
            Key("confidence", 0.95, "float", help="interval confidence level (stats=true)"),
        ),
        extra="ignore",  # `make tables TABLE_ARGS=...` passes the tables' options here too
    )


def main(argv: Sequence[str] | None = None) -> int:
    """CLI (see the module docstring). Keys other than the declared ones are table-only options
    (``make tables TABLE_ARGS=...`` passes the same ones to both) and are ignored with a note. Exit 0
    (also with no runs: nothing to plot); a malformed argument or a bad value: one line, exit 2."""

    def body(opts: Any) -> int:
        if opts.extra:
            print(f"apet_bench.plots: ignoring option(s) it does not use: {' '.join(opts.extra)}", file=sys.stderr)
        results_dir = Path(opts["results_dir"])
        out_dir = Path(opts["out_dir"] or results_dir / "plots")
        df = _load_runs(results_dir)
        if opts["model"]:
            df = df[df["model"].isin(opts["model"].split(","))]
        if opts["benchmark"]:
            df = df[df["benchmark"].isin(opts["benchmark"].split(","))]
        if df.empty:
            print(f"apet_bench.plots: no finished runs under {results_dir / 'runs'}; nothing to plot")
            return 0
        out_dir.mkdir(parents=True, exist_ok=True)
        cache_file = out_dir / ".flops_cache.json"
        try:
            cache = json.loads(cache_file.read_text(encoding="utf-8")) if cache_file.is_file() else {}
        except ValueError:
            cache = {}
        df = add_efficiency(df, cache=cache)
        if opts["stats"]:  # error bars: paired intervals vs vanilla
            df = add_intervals(df, n_resamples=opts["n_resamples"],
                               confidence=opts["confidence"])
        cache_file.write_text(json.dumps(cache, indent=0, sort_keys=True), encoding="utf-8")
        written = []
        for (model, bench), _ in df.groupby(["model", "benchmark"]):
            try:
                paths = plot_accuracy_efficiency(df, model, bench, out_dir)
            except ValueError as exc:
                print(f"apet_bench.plots: skipped {model} / {bench}: {exc}")
                continue
            sub = df[(df["model"] == model) & (df["benchmark"] == bench)]
            x = "prefill TFLOPs (full-size model)" if sub["tflops"].notna().all() else "layer-average visual tokens"
            written.append((model, bench, paths[0], x, len(sub)))
            print(f"wrote {paths[0]} (+ .svg): {len(sub)} runs, x = {x}")
        lines = ["# Accuracy-efficiency plots", "", "Generated by `python -m apet_bench.plots` (`make tables`) from "
                 f"`{results_dir / 'runs'}`.", "", "| model | benchmark | runs | x axis | figure |", "|---|---|---|---|---|"]
        lines += [f"| {m} | {b} | {n} | {x} | [{p.name}]({p.name}) ([svg]({p.with_suffix('.svg').name})) |"
                  for m, b, p, x, n in written]
        from apet_bench import bias

        bias_args = [f"results_dir={results_dir}", f"out={out_dir / 'bias'}"]
        bias_args += [f"{k}={opts[k]}" for k in ("model", "benchmark") if opts.get(k)]
        bias.main(bias_args)  # the positional-bias table and kept-probability-by-position figures
        if (out_dir / "bias" / "bias.md").is_file():
            lines += ["", "Positional bias of the kept visual tokens (`python -m apet_bench.bias`): "
                      "[bias.md](bias/bias.md), figures `bias/kept_by_position__*.png`."]
        (out_dir / "index.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
        return 0

    return _command().run(argv, body)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
