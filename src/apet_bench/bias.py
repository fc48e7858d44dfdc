"""Positional bias of a compression method, measured from the visual tokens it keeps.

The paper (§1, Figure 2) argues that attention-guided methods keep visual tokens by *where* they sit
(late positions, next to the text, get more attention) rather than by *what* they show. This module
measures that from the kept sets a method actually chose over a dataset (``kept_indices`` of every
sample in ``results/runs/<run>/samples.jsonl``, indices into the image's original visual tokens).

For one run with ``S`` samples of ``N`` visual tokens each, ``p_i`` = fraction of samples in which
token ``i`` (sequence index ``0..N-1``) was kept, ``r`` = mean keep ratio:

``index_trend`` (the positional-bias score, in [-1, 1])
    Spearman's rank correlation between ``p_i`` and ``i``, divided by the largest correlation any
    arrangement of the same values ``p`` along the positions can reach (``p`` sorted ascending):
    ``+1`` = the kept probability never decreases along the sequence (a selector keeping the last
    tokens: the LLM-attention bias of Figure 2), ``-1`` = never increases (keeps the first tokens),
    ``0`` = no monotone trend with position. ``0`` when ``p`` is constant (e.g. nothing dropped).
``position_determinism`` (in [0, 1])
    The share of the variance of the keep indicator explained by position alone, the correlation
    ratio ``η² = Var_i(p_i) / (r (1 - r))``, with the finite-sample term removed
    (``Var_i(p_i) - mean_i p_i (1 - p_i) / (S - 1)``, clipped at 0): ``1`` = the same positions are
    kept on every input whatever it shows (any fixed pattern: last tokens, a pooling grid), ``0`` =
    every position is equally likely to be kept (a content-only selector on content that is not tied
    to position).
``row_trend`` (in [-1, 1], square token grids only)
    ``index_trend`` of the kept-token density per image row (``N = side²`` tokens in raster order,
    e.g. 24 × 24 for LLaVA-1.5): ``+1`` = density grows towards the bottom rows.
``index_trend_p``, ``row_trend_p``
    Two-sided permutation p-values of the two trends (2000 seeded shuffles of the positions): with
    few samples or rows (24 rows) a sizeable trend can be noise; a small p-value says it is not.

Both scores are computed over samples with a single visual of the run's most common token count
(others are left out and counted).

Command (reads finished runs, writes a CSV + markdown table and the kept-probability-by-position
figure, PNG and SVG)::

    python -m apet_bench.bias [results_dir=results] [out=results/plots/bias] [model=...] [benchmark=...]
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "PositionalBias",
    "bias_table",
    "index_trend",
    "kept_probability",
    "plot_bias",
    "positional_bias",
    "position_determinism",
    "row_density",
    "run_kept_sets",
]


def kept_probability(kept_sets: Iterable[Sequence[int]], num_tokens: int) -> tuple[np.ndarray, int]:
    """Per-position keep frequency over samples.

    Parameters
    ----------
    kept_sets : iterable of sequences of int
        Per sample, the kept token indices (``0 <= i < num_tokens``; repeats count once).
    num_tokens : int
        ``N`` visual tokens per sample.

    Returns
    -------
    p : numpy.ndarray
        ``(N,)`` float64, ``p[i]`` = fraction of samples keeping token ``i``.
    num_samples : int
        ``S``.

    Raises
    ------
    ValueError
        ``num_tokens < 1``, no samples, or an index outside ``[0, num_tokens)``.
    """
    if num_tokens < 1:
        raise ValueError(f"num_tokens {num_tokens} must be >= 1")
    counts = np.zeros(num_tokens, dtype=np.float64)
    s = 0
    for kept in kept_sets:
        idx = np.unique(np.asarray(list(kept), dtype=np.int64))
        if idx.size and (idx[0] < 0 or idx[-1] >= num_tokens):
            raise ValueError(f"kept index {int(idx[0] if idx[0] < 0 else idx[-1])} is outside 0..{num_tokens - 1}")
        counts[idx] += 1
        s += 1
    if s == 0:
        raise ValueError("no samples with kept indices")
    return counts / s, s


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rho (``scipy.stats.spearmanr``, average ranks for ties); 0 when either side is constant."""
    from scipy.stats import spearmanr

    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return 0.0
    return float(spearmanr(a, b).statistic)


def trend_p_value(values: np.ndarray, permutations: int = 2000, seed: int = 0) -> float:
    """Two-sided permutation p-value of :func:`index_trend` (positions shuffled, seeded).

    The chance that ``values`` placed at random positions show a trend at least as strong; small values
    mean the trend is not noise. ``1.0`` for constant values. ``scipy.stats.permutation_test``
    (``permutation_type="pairings"``) on Spearman's rho between the values and their positions
    (exact when ``N!`` does not exceed ``permutations``).

    Parameters
    ----------
    values : numpy.ndarray
        ``(N,)``.
    permutations : int
        Random shuffles (the p-value resolution is ``1 / (permutations + 1)``).
    seed : int
        Seed of the shuffles (the same inputs give the same p-value).
    """
    from scipy.stats import permutation_test, rankdata

    v = np.asarray(values, dtype=np.float64)
    if v.size < 2 or np.ptp(v) == 0:
        return 1.0
    ranks = rankdata(v)
    r = (ranks - ranks.mean()) / np.linalg.norm(ranks - ranks.mean())
    idx = np.arange(v.size, dtype=np.float64)
    idx = (idx - idx.mean()) / np.linalg.norm(idx - idx.mean())

    def abs_rho(x, axis=-1):  # |Pearson of the fixed centred ranks with the permuted positions| = |Spearman's rho|
        return np.abs(np.sum(r * x, axis=axis))

    # two-sided as "|rho| at least as large": p = (1 + #{|rho_perm| >= |rho_obs|}) / (permutations + 1)
    res = permutation_test((idx,), abs_rho, permutation_type="pairings", n_resamples=permutations,
                           vectorized=True, alternative="greater", rng=np.random.default_rng(seed))
    return float(min(1.0, res.pvalue))


def index_trend(values: np.ndarray) -> float:
    """Normalised Spearman trend of ``values`` along their index, in [-1, 1] (see the module docstring).

    Parameters
    ----------
    values : numpy.ndarray
        ``(N,)`` e.g. kept probability per position or kept density per row.

    Returns
    -------
    float
        ``rho(values, index) / rho(sorted(values), index)``; 0 for constant values.
    """
    v = np.asarray(values, dtype=np.float64)
    idx = np.arange(v.size, dtype=np.float64)
    best = _spearman(np.sort(v), idx)
    if best <= 0:
        return 0.0
    return float(np.clip(_spearman(v, idx) / best, -1.0, 1.0))


def position_determinism(p: np.ndarray, num_samples: int) -> float:
    """Share of the keep indicator's variance explained by position (bias-corrected η², in [0, 1]).

    Parameters
    ----------
    p : numpy.ndarray
        ``(N,)`` keep frequencies from :func:`kept_probability`.
    num_samples : int
        ``S`` samples behind ``p``.

    Returns
    -------
    float
        ``(Var_i p_i - mean_i p_i(1 - p_i) / (S - 1)) / (r (1 - r))`` clipped to [0, 1], ``r = mean p``;
        0 when ``r`` is 0 or 1 (nothing or everything kept).
    """
    p = np.asarray(p, dtype=np.float64)
    r = float(p.mean())
    total = r * (1.0 - r)
    if total <= 0:
        return 0.0
    between = float(p.var())
    if num_samples > 1:
        between -= float((p * (1.0 - p)).mean()) / (num_samples - 1)
    return float(np.clip(between / total, 0.0, 1.0))


def row_density(p: np.ndarray) -> np.ndarray | None:
    """Mean kept probability per image row for ``N = side²`` tokens in raster order, else ``None``.

    Returns
    -------
    numpy.ndarray or None
        ``(side,)``: row ``y``'s mean of ``p`` (expected share of that row's tokens kept).
    """
    n = int(np.asarray(p).size)
    side = int(round(n ** 0.5))
    if side * side != n:
        return None
    return np.asarray(p, dtype=np.float64).reshape(side, side).mean(axis=1)


@dataclass
class PositionalBias:
    """Positional bias of one set of kept-token samples.

    Attributes
    ----------
    num_tokens : int
        ``N`` visual tokens per sample.
    num_samples : int
        ``S`` samples used.
    keep_ratio : float
        Mean share of tokens kept.
    index_trend : float
        In [-1, 1]; +1 = keeps later positions (the positional-bias score).
    position_determinism : float
        In [0, 1]; 1 = the same positions whatever the input.
    row_trend : float or None
        In [-1, 1]; +1 = denser towards bottom rows; ``None`` for non-square token counts.
    index_trend_p, row_trend_p : float or None
        Permutation p-values of the two trends (:func:`trend_p_value`).
    kept_probability : numpy.ndarray
        ``(N,)`` ``p_i``.
    row_density : numpy.ndarray or None
        ``(side,)``.
    """

    num_tokens: int
    num_samples: int
    keep_ratio: float
    index_trend: float
    position_determinism: float
    row_trend: float | None
    kept_probability: np.ndarray
    row_density: np.ndarray | None
    index_trend_p: float | None = None
    row_trend_p: float | None = None

    def as_row(self) -> dict[str, Any]:
        """The scalar fields, for tables."""
        return {
            "num_tokens": self.num_tokens,
            "samples": self.num_samples,
            "keep_ratio": round(self.keep_ratio, 4),
            "index_trend": round(self.index_trend, 4),
            "position_determinism": round(self.position_determinism, 4),
            "row_trend": None if self.row_trend is None else round(self.row_trend, 4),
            "index_trend_p": self.index_trend_p,
            "row_trend_p": self.row_trend_p,
        }


def positional_bias(kept_sets: Iterable[Sequence[int]], num_tokens: int) -> PositionalBias:
    """All positional-bias measures of kept sets over ``num_tokens`` visual tokens.

    Raises
    ------
    ValueError
        As :func:`kept_probability`.

    Examples
    --------
    >>> b = positional_bias([range(500, 576)] * 10, 576)
    >>> b.index_trend, b.position_determinism
    (1.0, 1.0)
    """
    p, s = kept_probability(kept_sets, num_tokens)
    rows = row_density(p)
    return PositionalBias(
        num_tokens=num_tokens,
        num_samples=s,
        keep_ratio=float(p.mean()),
        index_trend=index_trend(p),
        position_determinism=position_determinism(p, s),
        row_trend=None if rows is None else index_trend(rows),
        kept_probability=p,
        row_density=rows,
        index_trend_p=round(trend_p_value(p), 4),
        row_trend_p=None if rows is None else round(trend_p_value(rows), 4),
    )


def run_kept_sets(run_dir: str | Path) -> tuple[list[list[int]], int, int]:
    """Kept sets of a run's single-visual samples with the run's most common visual-token count.

    Parameters
    ----------
    run_dir : str or Path
        ``results/runs/<name>/`` with ``samples.jsonl`` (``kept_indices``, ``visual_tokens_in``).

    Returns
    -------
    kept_sets : list of list of int
    num_tokens : int
        ``N`` (0 when no sample reports kept indices).
    left_out : int
        Samples without kept indices, with several visuals, or with another token count.
    """
    path = Path(run_dir) / "samples.jsonl"
    rows = [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()] if path.is_file() else []
    usable = [
        (r["kept_indices"][0], int(r["visual_tokens_in"]))
        for r in rows
        if isinstance(r.get("kept_indices"), list) and len(r["kept_indices"]) == 1 and r.get("visual_tokens_in")
    ]
    if not usable:
        return [], 0, len(rows)
    n = Counter(n for _, n in usable).most_common(1)[0][0]
    kept = [k for k, m in usable if m == n]
    return kept, n, len(rows) - len(kept)


def _runs(results_dir: Path) -> list[tuple[Path, dict[str, Any]]]:
    out = []
    for run_json in sorted((results_dir / "runs").glob("*/run.json")):
        try:
            run = json.loads(run_json.read_text(encoding="utf-8"))
        except ValueError:
            continue
        if run.get("status") == "complete":
            out.append((run_json.parent, run))
    return out


def bias_table(results_dir: str | Path, *, model: str | None = None, benchmark: str | None = None):
    """Positional bias of every finished run under ``results_dir/runs`` that reports kept indices.

    ``model`` / ``benchmark``: only these (comma-separated names).

    Returns
    -------
    table : pandas.DataFrame
        One row per run: ``run, model, method, budget, benchmark, num_tokens, samples, left_out,
        keep_ratio, index_trend, position_determinism, row_trend, random_weights``.
    biases : dict
        ``run name -> PositionalBias`` (for :func:`plot_bias`).
    """
    import pandas as pd

    rows, biases = [], {}
    models = set(model.split(",")) if model else None
    benches = set(benchmark.split(",")) if benchmark else None
    for run_dir, run in _runs(Path(results_dir)):
        if (models and run.get("model") not in models) or (benches and run.get("benchmark") not in benches):
            continue
        kept, n, left_out = run_kept_sets(run_dir)
        if not kept:
            continue
        b = positional_bias(kept, n)
        biases[run["name"]] = b
        label = run["name"].split("__")[1] if run["name"].count("__") == 3 else run.get("method")
        rows.append({"run": run["name"], "model": run.get("model"), "method": label, "budget": run.get("budget"),
                     "benchmark": run.get("benchmark"), **b.as_row(), "left_out": left_out,
                     "random_weights": run.get("random_weights")})
    cols = ["run", "model", "method", "budget", "benchmark", "num_tokens", "samples", "left_out", "keep_ratio",
            "index_trend", "index_trend_p", "position_determinism", "row_trend", "row_trend_p", "random_weights"]
    return pd.DataFrame(rows, columns=cols), biases


def plot_bias(biases: dict[str, PositionalBias], out_stem: str | Path, *, title: str = "") -> list[Path]:
    """Kept probability by position (one line per run, smoothed over one image row) and, for square
    grids, kept-token density by image row; saved as ``<out_stem>.png`` and ``.svg``.

    Returns
    -------
    list of Path
        The two files written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    if not biases:
        raise ValueError("no runs with kept indices to plot")
    out_stem = Path(out_stem)
    out_stem.parent.mkdir(parents=True, exist_ok=True)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [2, 1]})
    for name, b in biases.items():
        side = int(round(b.num_tokens ** 0.5))
        win = max(1, side if side * side == b.num_tokens else b.num_tokens // 24)
        smooth = pd.Series(b.kept_probability).rolling(win, center=True, min_periods=1).mean().to_numpy()
        label = f"{name.split('__')[1] if name.count('__') == 3 else name} (trend {b.index_trend:+.2f}, det. {b.position_determinism:.2f})"
        ax1.plot(np.arange(b.num_tokens), smooth, label=label, lw=1.2)
        if b.row_density is not None:
            ax2.plot(np.arange(b.row_density.size), b.row_density, marker="o", ms=3, label=label.split(" (")[0])
    ax1.set_xlabel("visual-token index in the sequence (raster order; text follows the last one)")
    ax1.set_ylabel("kept probability over samples")
    ax1.set_ylim(-0.02, 1.02)
    ax1.legend(fontsize=7, loc="upper left")
    ax2.set_xlabel("image row (top = 0)")
    ax2.set_ylabel("kept-token density")
    ax2.set_ylim(-0.02, 1.02)
    if not any(b.row_density is not None for b in biases.values()):
        ax2.text(0.5, 0.5, "token counts are not square grids", ha="center", transform=ax2.transAxes)
    fig.suptitle(title or "Positional bias: kept probability by position", fontsize=10)
    fig.tight_layout()
    paths = [out_stem.with_suffix(".png"), out_stem.with_suffix(".svg")]
    for p in paths:
        fig.savefig(p, dpi=130)
    plt.close(fig)
    return paths


def _command() -> Any:
    from apet_bench.cli import Command, Key

    return Command(
        "python -m apet_bench.bias",
        "Positional bias of the kept visual tokens of finished runs (samples.jsonl kept_indices): a table and "
        "kept-probability-by-position figures.",
        (
            Key("results_dir", "results", help="results directory (reads <results_dir>/runs)"),
            Key("out", None, help="output directory (default <results_dir>/plots/bias)"),
            Key("model", None, help="only runs of these models (comma-separated)"),
            Key("benchmark", None, help="only runs of these benchmarks (comma-separated)"),
        ),
    )


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m apet_bench.bias [results_dir=results] [out=<results_dir>/plots/bias] [model=] [benchmark=]``.

    Prints one row per run and writes ``bias.csv``, ``bias.md`` and, per (model, benchmark, budget),
    ``kept_by_position__<model>__<benchmark>__<budget>.png/.svg`` under ``out``. Exit 2 on a bad
    argument, 0 otherwise (also when no run reports kept indices).
    """

    def body(args: dict[str, Any]) -> int:
        results_dir = Path(args["results_dir"])
        out = Path(args["out"] or results_dir / "plots" / "bias")
        table, biases = bias_table(results_dir, model=args["model"], benchmark=args["benchmark"])
        if table.empty:
            print(f"no finished run under {results_dir / 'runs'} reports kept indices; nothing to measure")
            return 0
        out.mkdir(parents=True, exist_ok=True)
        table.to_csv(out / "bias.csv", index=False)
        try:
            md = table.to_markdown(index=False)  # needs tabulate (an lmms-eval dependency)
        except ImportError:  # pragma: no cover
            md = "```\n" + table.to_string(index=False) + "\n```"
        (out / "bias.md").write_text(md + "\n", encoding="utf-8")
        for (model, bench, budget), grp in table.groupby(["model", "benchmark", "budget"], dropna=False):
            plot_bias({r: biases[r] for r in grp["run"]}, out / f"kept_by_position__{model}__{bench}__{budget}",
                      title=f"{model} on {bench}, budget {budget}: kept probability by position"
                      + (" (random weights: pipeline check)" if grp["random_weights"].any() else ""))
        print("Positional bias of the kept visual tokens (apet_bench.bias, from results/runs samples.jsonl kept_indices):")
        print(table.drop(columns=["run"]).to_string(index=False))
        print(f"written: {out}/bias.csv, bias.md, kept_by_position__*.png/.svg")
        return 0

    return _command().run(argv, body)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
