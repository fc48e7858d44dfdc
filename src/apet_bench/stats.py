"""Paired uncertainty for differences between two runs on the same benchmark.

Every method in the harness answers the *same* questions with the same model, so the difference
between two runs is best judged on the questions they share (paired statistics), not from the two
headline numbers alone.

Per-sample scores, in the unit each benchmark's metric aggregates (:func:`load_units`):

=====================  ==================================================  ==========================
benchmark (metric)     unit (what is resampled)                            metric over units
=====================  ==================================================  ==========================
MME (perception /      image pair (the two yes/no questions of one image);  sum over subtasks of the
cognition score)       value = acc + acc+ of the pair in points (0/50/200)  mean pair value (lmms-eval
                       ; resampled within each subtask                      ``mme_aggregate_results``)
POPE (mean F1)         question (prediction, ground truth); resampled       mean over categories of F1
                       within each category (adversarial/popular/random)    (lmms-eval's POPE F1)
MMBench (CircularEval) CircularEval group (``index % 1e6``): 1 when every   mean x 100
                       circular variant is answered right (lmms-eval's
                       ``MMBench_Evaluator.eval_sub_data``, static parser)
GQA, ScienceQA, VQAv2, question: lmms-eval's per-sample ``exact_match``    mean
TextVQA, VizWiz        (VQA soft accuracy min(#humans/3, 1))
TGIF-QA exact match    question: ``correct``                                mean x 100
judged video QA        answer: judge verdict yes/no (x 100) or score 0-5    mean
=====================  ==================================================  ==========================

Samples are keyed by ``sample_id`` (written by the runner: a hash of the document's text fields, see
:func:`doc_sample_id`); two runs are paired only when they hold exactly the same sample ids.

:func:`compare` gives the paired difference ``Δ = metric(B) - metric(A)``, its bootstrap confidence
interval (``scipy.stats.bootstrap``: the shared units are resampled with replacement, separately
within each stratum, the same indices for both runs) and a paired test p-value: the exact McNemar
test (``scipy.stats.binomtest`` on the discordant units) when every unit scores 0 or its maximum in
both runs and the metric is their mean, otherwise a paired permutation test
(``scipy.stats.permutation_test`` with ``permutation_type="samples"``: each unit's two scores are
swapped at random). :func:`holm` adjusts a family of p-values (Holm 1979).

``python -m apet_bench.stats mdd`` prints the minimum detectable difference table of
``docs/statistics.md``; ``python -m apet_bench.stats compare RUN_A RUN_B`` compares two run directories.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "StatsUnavailable", "RunUnits", "Comparison", "doc_sample_id", "load_units", "compare", "holm",
    "mcnemar_exact_p", "minimum_detectable_difference", "seed_spread",
]


class StatsUnavailable(ValueError):
    """A run's samples cannot give per-unit scores for the asked metric (the message says why)."""


# ----------------------------------------------------------------------------- sample ids


def doc_sample_id(doc: Mapping[str, Any] | None) -> str | None:
    """A stable id of one benchmark document: the first 16 hex digits of the SHA-1 of its text fields.

    Only string / number / boolean / null fields enter (images, bytes and nested media are left
    out), as sorted-key JSON, so the same question of the same data gets the same id in every run,
    whatever order or ``limit`` the run used. ``None`` when ``doc`` has no such field.
    """
    if not isinstance(doc, Mapping):
        return None
    text = {str(k): v for k, v in doc.items()
            if v is None or (isinstance(v, (str, int, float, bool)) and not (isinstance(v, float) and math.isnan(v)))}
    if not text:
        return None
    blob = json.dumps(text, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha1(blob.encode("utf-8")).hexdigest()[:16]


def unique_ids(ids: Sequence[str | None]) -> list[str | None]:
    """Make repeated ids unique by appending ``#2``, ``#3`` ... in order (identical documents)."""
    seen: dict[str, int] = {}
    out: list[str | None] = []
    for i in ids:
        if i is None:
            out.append(None)
            continue
        seen[i] = seen.get(i, 0) + 1
        out.append(i if seen[i] == 1 else f"{i}#{seen[i]}")
    return out


# ----------------------------------------------------------------------------- per-unit scores


@dataclass
class RunUnits:
    """Per-unit scores of one run for one metric.

    ``kind``: ``mean`` (metric = mean of ``value`` over units), ``strata_sum`` / ``strata_mean``
    (sum / mean over strata of the per-stratum mean of ``value``: MME, POPE accuracy) or
    ``pope_f1`` (mean over strata of F1 from ``pred_yes`` / ``gt_yes``). ``units`` is a DataFrame
    indexed by unit id with ``stratum`` and ``value`` (or ``pred_yes`` / ``gt_yes``) columns.
    ``sample_ids``: the samples behind the units (pairing checks them). ``point``: the metric over all
    units, in the run's metric unit (lmms-eval's).
    """

    benchmark: str
    metric: str
    kind: str
    unit: str
    units: Any
    sample_ids: frozenset
    id_source: str
    binary: bool
    top: float
    point: float
    run: str = ""


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        raise StatsUnavailable(f"{path} does not exist (a run directory holds samples.jsonl)")
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except ValueError as exc:
                raise StatsUnavailable(f"{path}:{n} is not JSON ({exc})") from None
    return rows


def _sample_keys(rows: list[dict]) -> tuple[list[str], str]:
    ids = [r.get("sample_id") for r in rows]
    if all(isinstance(i, str) and i for i in ids):
        return list(ids), "sample_id"
    # Older runs: lmms-eval's doc_id (the document's position in the task) stands in.
    return [f"doc{r.get('doc_id')}" for r in rows], "doc_id (runs older than sample_id; same data and order assumed)"


def _field(rows: list[dict], key: str) -> list[Any]:
    return [r.get(key) for r in rows]


def _mmbench_hits(recs: list[dict]) -> dict[int, float]:
    """CircularEval group hits (1/0) per ``index % 1e6``, lmms-eval's static (no GPT) parser."""
    import pandas as pd
    from lmms_eval.tasks.mmbench.mmbench_evals import MMBench_Evaluator

    ev = MMBench_Evaluator(sys_prompt="There are several options:")
    data = pd.DataFrame(recs)
    data["prediction"] = [str(x) for x in data["prediction"]]
    data["index"] = data["index"].astype(int)
    answer_map = dict(zip(data["index"], data["answer"]))
    hits = {}
    for group, sub in data.groupby(data["index"] % int(1e6)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            hits[int(group)] = float(ev.eval_sub_data(sub.sort_values("index"), answer_map, static_only=True))
    return hits


def _finish(frame, *, benchmark, metric, kind, unit, sample_ids, id_source, run) -> RunUnits:
    if frame.empty:
        raise StatsUnavailable(f"run {run}: no sample scored for metric {metric!r}")
    frame = frame.sort_index()
    top, binary = 1.0, False
    if "value" in frame:
        vals = frame["value"].to_numpy(dtype=float)
        top = float(vals.max()) if vals.size and vals.max() > 0 else 1.0
        binary = bool(np.all((vals == 0) | (vals == top)))
    ru = RunUnits(benchmark=benchmark, metric=metric, kind=kind, unit=unit, units=frame,
                  sample_ids=frozenset(sample_ids), id_source=id_source, binary=binary, top=top, point=0.0, run=run)
    ru.point = float(_metric(ru, [np.arange(len(frame))])[()]) if kind != "mean" else float(frame["value"].mean())
    return ru


def load_units(run_dir: str | Path, metric: str | None = None) -> RunUnits:
    """Per-unit scores of a finished run for ``metric`` (default: the run's first headline metric).

    Parameters
    ----------
    run_dir : str or Path
        ``results/runs/<name>/`` (``run.json`` + ``samples.jsonl``).
    metric : str, optional
        A metric key of the run (``exact_match``, ``pope_f1_mean``, ``gpt_eval_score`` ...) or a
        ``+``-joined sum of MME parts (``mme_perception_score+mme_cognition_score``).

    Returns
    -------
    RunUnits
        ``point`` equals the run's own metric (lmms-eval's aggregation) up to rounding.

    Raises
    ------
    StatsUnavailable
        No ``samples.jsonl``, or its rows carry no per-sample record for ``metric`` (e.g. judged video
        QA from runs that did not record the judge's verdicts).
    """
    import pandas as pd

    run_dir = Path(run_dir)
    try:
        summary = json.loads((run_dir / "run.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise StatsUnavailable(f"{run_dir}/run.json unreadable ({exc})") from None
    name = str(summary.get("name") or run_dir.name)
    bench = str(summary.get("benchmark") or "")
    if metric is None:
        metric = next(iter(summary.get("metrics") or {}), None)
        if metric is None:
            raise StatsUnavailable(f"run {name} records no metric")
    rows = _read_jsonl(run_dir / "samples.jsonl")
    keys, id_source = _sample_keys(rows)
    parts = metric.split("+")
    common = dict(benchmark=bench, metric=metric, run=name, id_source=id_source)

    # MME: per image pair, acc + acc+ (lmms-eval mme_aggregate_results), summed over subtasks.
    if any(isinstance(r.get(p), dict) and "question_id" in r[p] and "score" in r[p] for r in rows for p in parts) \
            and all(p.startswith("mme_") for p in parts):
        recs = [(k, r[p]) for k, r in zip(keys, rows) for p in parts if isinstance(r.get(p), dict)]
        by: dict[str, dict] = {}
        for k, rec in recs:
            u = by.setdefault(str(rec["question_id"]), {"stratum": str(rec.get("category")), "scores": [], "ids": []})
            u["scores"].append(float(rec["score"]))
            u["ids"].append(k)
        frame = pd.DataFrame(
            {"stratum": [u["stratum"] for u in by.values()],
             "value": [100.0 * sum(u["scores"]) / len(u["scores"]) + 100.0 * float(all(s == 1.0 for s in u["scores"]))
                       for u in by.values()]},
            index=pd.Index(list(by), name="unit"))
        return _finish(frame, kind="strata_sum", unit="image pair (within subtask)",
                       sample_ids=[k for k, _ in recs], **common)

    # Judged video QA: the judge's verdict per answer (``judge`` field of the sample row).
    judged = [r.get(metric) for r in rows if isinstance(r.get(metric), dict)]
    if metric in ("gpt_eval_accuracy", "gpt_eval_score") and judged and "pred" in judged[0] and "index" not in judged[0]:
        verdicts = [(k, r.get("judge")) for k, r in zip(keys, rows)]
        ok = [(k, v) for k, v in verdicts if isinstance(v, dict) and v.get("ok", True) and v.get("pred") in ("yes", "no")]
        if not ok:
            raise StatsUnavailable(f"run {name}: samples.jsonl records no per-answer judge verdicts")
        vals = [100.0 * (v["pred"] == "yes") if metric == "gpt_eval_accuracy" else float(v["score"]) for _, v in ok]
        frame = pd.DataFrame({"stratum": "all", "value": vals}, index=pd.Index([k for k, _ in ok], name="unit"))
        return _finish(frame, kind="mean", unit="answer (judged)", sample_ids=[k for k, _ in ok], **common)

    recs = _field(rows, metric)
    have = [(k, r) for k, r in zip(keys, recs) if r is not None]
    if not have:
        raise StatsUnavailable(f"run {name}: samples.jsonl has no per-sample record for metric {metric!r}")
    first = have[0][1]

    # POPE: per question, resampled within category; F1 or accuracy per category, then their mean.
    if isinstance(first, dict) and {"prediction", "ground_truth"} <= set(first):
        frame = pd.DataFrame(
            {"stratum": [str(r.get("category", "all")) for _, r in have],
             "pred_yes": [str(r["prediction"]).strip().lower() == "yes" for _, r in have],
             "gt_yes": [str(r["ground_truth"]).strip().lower() == "yes" for _, r in have],
             "value": [float(r.get("score", 0.0)) for _, r in have]},
            index=pd.Index([k for k, _ in have], name="unit"))
        kind = "pope_f1" if "f1" in metric else "strata_mean"
        ru = _finish(frame, kind=kind, unit="question (within category)", sample_ids=[k for k, _ in have], **common)
        if kind == "pope_f1":
            ru.binary = False
        return ru

    # MMBench: one unit per CircularEval group.
    if isinstance(first, dict) and {"index", "answer", "prediction"} <= set(first):
        hits = _mmbench_hits([r for _, r in have])
        frame = pd.DataFrame({"stratum": "all", "value": [100.0 * h for h in hits.values()]},
                             index=pd.Index([str(g) for g in hits], name="unit"))
        return _finish(frame, kind="mean", unit="CircularEval group", sample_ids=[k for k, _ in have], **common)

    # TGIF-QA exact match (percent).
    if isinstance(first, dict) and "correct" in first:
        frame = pd.DataFrame({"stratum": "all", "value": [100.0 * float(r["correct"]) for _, r in have]},
                             index=pd.Index([k for k, _ in have], name="unit"))
        return _finish(frame, kind="mean", unit="question", sample_ids=[k for k, _ in have], **common)

    # Per-question numbers: GQA / ScienceQA exact match, VQA soft accuracy.
    if isinstance(first, (int, float)) and not isinstance(first, bool):
        frame = pd.DataFrame({"stratum": "all", "value": [float(r) for _, r in have]},
                             index=pd.Index([k for k, _ in have], name="unit"))
        return _finish(frame, kind="mean", unit="question", sample_ids=[k for k, _ in have], **common)
    raise StatsUnavailable(f"run {name}: no per-unit scoring known for metric {metric!r} "
                           f"(per-sample record {type(first).__name__} with keys {sorted(first)[:6] if isinstance(first, dict) else '-'})")


# ----------------------------------------------------------------------------- metric over index arrays


@dataclass
class _Arrays:
    kind: str
    value: np.ndarray | None
    pred: np.ndarray | None
    gt: np.ndarray | None


def _arrays(ru: RunUnits, order) -> _Arrays:
    f = ru.units.loc[order]
    return _Arrays(ru.kind, f["value"].to_numpy(float) if "value" in f else None,
                   f["pred_yes"].to_numpy(bool) if "pred_yes" in f else None,
                   f["gt_yes"].to_numpy(bool) if "gt_yes" in f else None)


def _metric_arrays(a: _Arrays, groups: Sequence[np.ndarray]) -> np.ndarray:
    """The metric over the units at ``groups`` (one integer index array ``(..., n_k)`` per stratum)."""
    if a.kind == "mean":
        tot = sum(a.value[g].sum(axis=-1) for g in groups)
        cnt = sum(g.shape[-1] for g in groups)
        return tot / cnt
    if a.kind in ("strata_sum", "strata_mean"):
        per = [a.value[g].mean(axis=-1) for g in groups]
        s = sum(per)
        return s if a.kind == "strata_sum" else s / len(per)
    if a.kind == "pope_f1":
        out = []
        # per-unit confusion codes, gathered once per resample: 1 = TP, 2 = FP, 3 = FN, 0 = TN
        code = (a.pred & a.gt) * 1 + (a.pred & ~a.gt) * 2 + (~a.pred & a.gt) * 3
        for g in groups:
            c = code[g]
            tp = (c == 1).sum(axis=-1).astype(float)
            fp = (c == 2).sum(axis=-1).astype(float)
            fn = (c == 3).sum(axis=-1).astype(float)
            with np.errstate(invalid="ignore", divide="ignore"):
                prec = np.where(tp + fp > 0, tp / (tp + fp), 0.0)
                rec = np.where(tp + fn > 0, tp / (tp + fn), 0.0)
                f1 = np.where(prec + rec > 0, 2 * prec * rec / (prec + rec), 0.0)
            out.append(f1)
        return sum(out) / len(out)
    raise ValueError(f"unknown unit kind {a.kind!r}")


def _metric(ru: RunUnits, groups: Sequence[np.ndarray]) -> np.ndarray:
    # groups index rows of ru.units in its sorted order; strata are taken from the frame itself
    a = _arrays(ru, ru.units.index)
    if ru.kind == "mean":
        return _metric_arrays(a, groups)
    strata = ru.units["stratum"].to_numpy()
    idx = np.concatenate([np.asarray(g).ravel() for g in groups]) if groups else np.array([], int)
    regroup = [idx[strata[idx] == s] for s in dict.fromkeys(strata[idx])]
    return _metric_arrays(a, regroup)


# ----------------------------------------------------------------------------- paired comparison


@dataclass
class Comparison:
    """``Δ = B - A`` with its interval and paired test (metric units of the runs, lmms-eval's).

    ``paired`` False means the runs could not be paired; ``reason`` says why and the numbers are None.
    """

    a: str
    b: str
    benchmark: str
    metric: str
    paired: bool
    reason: str | None = None
    delta: float | None = None
    low: float | None = None
    high: float | None = None
    p_value: float | None = None
    test: str | None = None
    unit: str | None = None
    n_units: int = 0
    discordant: tuple[int, int] | None = None
    confidence: float = 0.95
    notes: list[str] = field(default_factory=list)

    @property
    def excludes_zero(self) -> bool:
        return self.paired and self.low is not None and (self.low > 0 or self.high < 0)

    def as_dict(self) -> dict:
        from dataclasses import asdict

        return asdict(self)


def mcnemar_exact_p(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts ``b`` (A right, B wrong) and ``c``
    (A wrong, B right): ``scipy.stats.binomtest(c, b + c, 0.5)``; 1.0 when there is no discordant unit."""
    from scipy.stats import binomtest

    if b < 0 or c < 0:
        raise ValueError(f"discordant counts must be >= 0, got b={b}, c={c}")
    if b + c == 0:
        return 1.0
    return float(binomtest(int(c), int(b + c), 0.5, alternative="two-sided").pvalue)


def _pairing_problem(a: RunUnits, b: RunUnits) -> str | None:
    if a.benchmark != b.benchmark or a.metric != b.metric:
        return f"different benchmark/metric ({a.benchmark}:{a.metric} vs {b.benchmark}:{b.metric})"
    if a.kind != b.kind:
        return f"different unit kinds ({a.kind} vs {b.kind})"
    if a.sample_ids != b.sample_ids:
        only_a, only_b = len(a.sample_ids - b.sample_ids), len(b.sample_ids - a.sample_ids)
        return (f"runs do not share the same samples ({len(a.sample_ids)} vs {len(b.sample_ids)}, "
                f"{only_a} only in {a.run}, {only_b} only in {b.run}; different limit or skipped images?)")
    if set(a.units.index) != set(b.units.index):
        return "runs group the same samples into different units"
    return None


#: Largest number of units for which :func:`compare` uses the BCa interval (else percentile).
BCA_MAX_UNITS = 2000


def compare(a: RunUnits, b: RunUnits, *, confidence: float = 0.95, n_resamples: int = 9999,
            seed: int = 0, batch: int = 500) -> Comparison:
    """Paired difference ``metric(B) - metric(A)`` over the units both runs share.

    Parameters
    ----------
    a, b : RunUnits
        From :func:`load_units` on the same benchmark and metric (A = reference, e.g. vanilla).
    confidence : float
        Two-sided confidence level of the bootstrap interval, in (0, 1).
    n_resamples : int
        Bootstrap resamples and random permutations (``scipy.stats`` defaults: 9999).
    seed : int
        Seed of the resampling (same inputs and seed give the same interval).
    batch : int
        Resamples evaluated at once (memory: ``batch x units`` integers).

    Returns
    -------
    Comparison
        ``delta``, the bootstrap interval ``[low, high]`` (BCa up to :data:`BCA_MAX_UNITS` units,
        percentile above that or when BCa is undefined; a constant difference gives that constant), ``p_value`` of the
        exact McNemar test (binary per-unit scores, metric = their mean) or of the paired permutation
        test, the unit and the number of units. Unpaired (``paired=False``, ``reason``) when the runs
        do not hold the same samples.

    Raises
    ------
    ValueError
        ``confidence`` outside (0, 1) or ``n_resamples`` < 1.
    """
    from scipy.stats import bootstrap, permutation_test

    if not 0 < confidence < 1:
        raise ValueError(f"confidence {confidence!r} must be in (0, 1)")
    if n_resamples < 1:
        raise ValueError(f"n_resamples {n_resamples!r} must be >= 1")
    out = Comparison(a=a.run, b=b.run, benchmark=a.benchmark, metric=a.metric, paired=False,
                     unit=a.unit, confidence=confidence)
    problem = _pairing_problem(a, b)
    if problem:
        out.reason = problem
        return out
    order = a.units.index
    A, B = _arrays(a, order), _arrays(b, order)
    n = len(order)
    cat = _Arrays(a.kind, None if A.value is None else np.concatenate([A.value, B.value]),
                  None if A.pred is None else np.concatenate([A.pred, B.pred]),
                  None if A.gt is None else np.concatenate([A.gt, B.gt]))
    strata = a.units["stratum"].to_numpy()
    if a.kind == "mean":
        positions = [np.arange(n)]
    else:
        positions = [np.flatnonzero(strata == s) for s in dict.fromkeys(strata)]
    resampled = [p for p in positions if p.size >= 2]
    fixed = [p for p in positions if p.size < 2]
    if fixed:
        out.notes.append(f"{len(fixed)} stratum/strata with a single unit held fixed in the bootstrap")

    def delta_of(groups_a: Sequence[np.ndarray], groups_b: Sequence[np.ndarray]) -> np.ndarray:
        return _metric_arrays(cat, groups_b) - _metric_arrays(cat, groups_a)

    def boot_stat(*samples, axis=-1):
        samples = [np.asarray(s).astype(np.intp) for s in samples]
        shape = samples[0].shape[:-1] if samples else ()
        ga = samples + [np.broadcast_to(f, shape + f.shape) for f in fixed]
        return delta_of(ga, [g + n for g in ga])

    full = positions
    out.delta = float(delta_of(full, [g + n for g in full]))
    out.n_units = n
    out.paired = True
    rng = np.random.default_rng(seed)
    if not resampled:
        out.low = out.high = out.delta
        out.notes.append("too few units to resample")
    else:
        lo = hi = float("nan")
        # BCa's jackknife costs units^2 metric evaluations; above BCA_MAX_UNITS units its correction is
        # negligible and the percentile interval is used directly.
        for method in (("BCa", "percentile") if n <= BCA_MAX_UNITS else ("percentile",)):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                res = bootstrap(tuple(resampled), boot_stat, n_resamples=n_resamples, batch=batch, vectorized=True,
                                paired=False, confidence_level=confidence, method=method, rng=rng)
            lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
            if not (math.isnan(lo) or math.isnan(hi)):
                break
            dist = np.asarray(res.bootstrap_distribution)
            if np.ptp(dist) == 0:  # every resample gives the same Δ (e.g. identical runs)
                lo = hi = float(dist.flat[0])
                break
        out.low, out.high = lo, hi
    both = cat.value if cat.value is not None else np.zeros(0)
    top = float(both.max()) if both.size and both.max() > 0 else 1.0
    if a.kind == "mean" and both.size and bool(np.all((both == 0) | (both == top))):
        ra, rb = A.value == top, B.value == top
        bb, cc = int(np.sum(ra & ~rb)), int(np.sum(~ra & rb))
        out.discordant = (bb, cc)
        out.p_value = mcnemar_exact_p(bb, cc)
        out.test = "exact McNemar"
    else:
        def perm_stat(x, y, axis=-1):
            x, y = np.asarray(x).astype(np.intp), np.asarray(y).astype(np.intp)
            return delta_of([x[..., p] for p in positions], [y[..., p] for p in positions])

        if np.array_equal(A.value if A.value is not None else A.pred, B.value if B.value is not None else B.pred) \
                and (A.gt is None or np.array_equal(A.gt, B.gt)):
            out.p_value = 1.0  # every swap leaves the runs unchanged
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                res = permutation_test((np.arange(n), np.arange(n) + n), perm_stat, permutation_type="samples",
                                       vectorized=True, n_resamples=n_resamples, batch=batch, rng=rng)
            out.p_value = float(min(1.0, res.pvalue))
        out.test = "paired permutation"
    return out


def holm(p_values: Sequence[float | None]) -> list[float | None]:
    """Holm step-down adjusted p-values (family-wise error over the given tests); None stays None.

    ``adjusted_(i) = max_{j <= i} min(1, (m - j + 1) p_(j))`` over the sorted p-values (Holm 1979,
    "A simple sequentially rejective multiple test procedure").
    """
    given = [(i, float(p)) for i, p in enumerate(p_values) if p is not None and not math.isnan(float(p))]
    out: list[float | None] = [None] * len(p_values)
    m = len(given)
    running = 0.0
    for rank, (i, p) in enumerate(sorted(given, key=lambda t: t[1])):
        running = max(running, min(1.0, (m - rank) * p))
        out[i] = running
    return out


# ----------------------------------------------------------------------------- seeds


def seed_spread(values: Sequence[float]) -> tuple[float, float | None, float | None]:
    """``(mean, sd, range)`` of a metric over seeds (sample sd, ddof=1; None with one seed)."""
    v = np.asarray([float(x) for x in values], dtype=float)
    if v.size == 0:
        raise ValueError("seed_spread needs at least one value")
    if v.size == 1:
        return float(v[0]), None, None
    return float(v.mean()), float(v.std(ddof=1)), float(np.ptp(v))


# ----------------------------------------------------------------------------- minimum detectable difference


def minimum_detectable_difference(n: int, discordance: float, *, alpha: float = 0.05, power: float = 0.8) -> float | None:
    """Smallest accuracy difference (fraction) the two-sided exact McNemar test detects with ``power``.

    Model: ``n`` paired binary units of which a fraction ``discordance`` are discordant (one run
    right, the other wrong); a difference ``Δ`` splits the discordant units ``(ψ + Δ) / 2ψ`` in B's
    favour. Power is exact for ``D = round(n ψ)`` discordant units (``scipy.stats.binom`` over the
    test's rejection region). ``None`` when even ``Δ = ψ`` (every discordant unit favours B) is not
    detected.

    Raises
    ------
    ValueError
        ``n`` < 1 or ``discordance`` outside (0, 1].
    """
    from scipy.stats import binom

    if n < 1:
        raise ValueError(f"n {n!r} must be >= 1")
    if not 0 < discordance <= 1:
        raise ValueError(f"discordance {discordance!r} must be in (0, 1]")
    d = max(1, int(round(n * discordance)))
    ks = np.arange(d + 1)
    # exact two-sided binomial rejection region at p = 0.5 (symmetric): min(k, d-k) <= k*
    tail = 2 * binom.cdf(np.minimum(ks, d - ks), d, 0.5)
    reject = tail <= alpha
    if not reject.any():
        return None

    def pw(delta: float) -> float:
        pi = (discordance + delta) / (2 * discordance)
        return float(binom.pmf(ks[reject], d, pi).sum())

    lo, hi = 0.0, discordance
    if pw(hi) < power:
        return None
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if pw(mid) < power else (lo, mid)
    return hi


#: Benchmark sizes for the minimum detectable difference table: (label, units, unit, where the count is from).
BENCHMARK_SIZES = [
    ("MME", 2374, "questions (1,187 image pairs)", "MME release (eval_tool ground truth), 14 subtasks"),
    ("POPE", 8910, "questions", "3 COCO splits: LLaVA-1.5's random 2,910 + popular 3,000 + adversarial 3,000"),
    ("GQA", 12578, "questions", "testdev-balanced (lmms-eval gqa)"),
    ("MMBench-EN dev", 4329, "rows (CircularEval groups are fewer: MDD is larger)", "lmms-eval mmbench_en_dev"),
    ("ScienceQA-IMG", 2017, "questions", "test split with images (lmms-eval scienceqa_img)"),
    ("TextVQA", 5000, "questions", "val (lmms-eval textvqa_val)"),
    ("VizWiz", 4319, "questions", "val (lmms-eval vizwiz_vqa_val)"),
    ("VQAv2", 107394, "questions", "test-dev (server-scored)"),
]


def _local_sizes(data_root: str | None) -> list[tuple[str, int, str, str]]:
    """Question counts of the local MME / POPE data under ``data_root`` (what this machine can run)."""
    out: list[tuple[str, int, str, str]] = []
    if not data_root:
        return out
    root = Path(data_root)
    gt = root / "mme_ground_truth"
    if gt.is_dir():
        n = sum(1 for f in gt.glob("*.txt") for line in f.read_text(encoding="utf-8").splitlines() if line.strip())
        have = {d.name for d in (root / "mme").iterdir() if d.is_dir()} if (root / "mme").is_dir() else set()
        n_local = sum(1 for f in gt.glob("*.txt") if f.stem in have
                      for line in f.read_text(encoding="utf-8").splitlines() if line.strip())
        out.append(("MME (subtasks with images here)", n_local, "questions", f"{root}/mme ({n} in the ground truth)"))
    pope = root / "pope"
    if pope.is_dir():
        n = 0
        names = ("coco_pope_adversarial.json", "coco_pope_popular.json", "coco_pope_random_2910_llava.json")
        for f in (pope / name for name in names if (pope / name).is_file()):
            n += sum(1 for line in f.read_text(encoding="utf-8").splitlines() if line.strip())
        if n:
            out.append(("POPE (question files here)", n, "questions", f"{pope}: adversarial + popular + LLaVA random 2,910"))
    return out


def mdd_markdown(data_root: str | None = None, discordances: Sequence[float] = (0.05, 0.10, 0.20), *,
                 alpha: float = 0.05, power: float = 0.8) -> str:
    """The minimum detectable difference table (markdown), in percentage points of per-unit accuracy."""
    head = "| benchmark | units | " + " | ".join(f"MDD at ψ = {d:.0%}" for d in discordances) + " | count from |"
    lines = [f"Paired exact McNemar test, two-sided α = {alpha}, power {power}; ψ = share of discordant units "
             "(one run right, the other wrong). MDD in percentage points of per-unit accuracy.", "", head,
             "|" + "---|" * (len(discordances) + 3)]
    for label, n, unit, src in BENCHMARK_SIZES + _local_sizes(data_root):
        cells = []
        for d in discordances:
            m = minimum_detectable_difference(n, d, alpha=alpha, power=power)
            cells.append("not detectable" if m is None else f"{100 * m:.2f}")
        lines.append(f"| {label} | {n:,} {unit} | " + " | ".join(cells) + f" | {src} |")
    return "\n".join(lines)


def _command() -> Any:
    from apet_bench.cli import Command, Key

    return Command(
        "python -m apet_bench.stats",
        "compare RUN_A RUN_B: paired comparison of two runs (bootstrap interval, exact McNemar); mdd: the "
        "minimum detectable difference per benchmark.",
        (
            Key("metric", None, help="compare: the per-sample metric (default: the benchmark's)"),
            Key("data_root", None, help="mdd: count the question files found here too"),
        ),
        positional="compare RUN_A RUN_B | mdd",
    )


def _main(argv: Sequence[str]) -> int:
    from apet_bench.cli import error

    def body(args: Any) -> int:
        words = args.words
        if words[:1] == ["compare"] and len(words) == 3:
            a, b = load_units(words[1], args["metric"]), load_units(words[2], args["metric"])
            print(json.dumps(compare(a, b).as_dict(), indent=2))
            return 0
        if words == ["mdd"]:
            print(mdd_markdown(args["data_root"]))
            return 0
        return error(f"arguments {' '.join(map(repr, words)) or '(none)'} are not compare RUN_A RUN_B or mdd "
                     "(usage: python -m apet_bench.stats compare RUN_A RUN_B [metric=...] | mdd [data_root=...])")

    return _command().run(argv, body, (StatsUnavailable,))


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
