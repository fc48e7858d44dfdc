"""Read ``results/runs/*/`` into a pandas DataFrame (the only input of the table aggregators and plots).

A run directory counts when its ``run.json`` parses and says ``"status": "complete"``. Everything else
under ``runs/`` is reported as a :class:`RunProblem` and left out, never raised:

* hidden staging / trash directories (``.tmp-*``, ``.trash-*``: a run being written, or killed mid-write),
* a directory without ``run.json`` (half-written by hand or by an old tool), an unparsable or non-object
  ``run.json``, one lacking ``name``/``model``/``method``/``benchmark``,
* a recorded failure (``"status": "failed"`` or ``"missing"``, written by ``python -m apet_bench.sweep``
  for a cell that could not run): returned separately (``include_failed=True``) so a table can show
  the reason in the missing cell.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["RunProblem", "load_runs", "load_runs_report", "METRIC_PREFIX", "RUN_COLUMNS"]

METRIC_PREFIX = "metric."
#: Columns of :func:`load_runs` besides one ``metric.<key>`` column per metric in any run.
RUN_COLUMNS = [
    "name", "status", "model", "method", "method_label", "budget", "budget_label", "benchmark", "protocol",
    "num_samples", "limit", "random_weights", "source", "weights", "device", "attn_implementation",
    "visual_tokens_llm_mean", "layer_average_visual_tokens", "eval_s", "wall_s", "missing_subtasks",
    "skipped_samples", "note", "error", "run_dir",
]  # fmt: skip
_RECORDED_FAILURES = ("failed", "missing")


@dataclass
class RunProblem:
    """A directory under ``runs/`` that was left out, and why (one line)."""

    path: str
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


def _budget_label(budget: Any, method: str) -> str:
    if method == "none" or budget is None:
        return "full"
    if isinstance(budget, bool):
        return str(budget)
    if isinstance(budget, int):
        return str(budget)
    if isinstance(budget, float):
        return repr(budget)
    return str(budget)


def _read_limit(run_dir: Path) -> int | None:
    cfg = run_dir / "config.yaml"
    if not cfg.is_file():
        return None
    try:
        import yaml

        data = yaml.safe_load(cfg.read_text(encoding="utf-8"))
    except Exception:  # config.yaml is informative here; a bad one does not void the run
        return None
    lim = data.get("limit") if isinstance(data, dict) else None
    return lim if isinstance(lim, int) and not isinstance(lim, bool) else None


def _read_missing_subtasks(run_dir: Path) -> list[str]:
    try:
        data = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    miss = data.get("missing_subtasks") if isinstance(data, dict) else None
    return list(miss) if isinstance(miss, list) else []


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(float(v))


def _read_submission_files(run_dir: Path) -> list[str]:
    """Submission files a server-scored split wrote (``lmms_eval/results.json: submission_files``)."""
    try:
        data = json.loads((run_dir / "lmms_eval" / "results.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    files = data.get("submission_files") if isinstance(data, dict) else None
    return [str(f) for f in files] if isinstance(files, list) else []


def _row(run_dir: Path, summary: dict[str, Any]) -> dict[str, Any]:
    name = summary["name"]
    parts = name.split("__")
    method = summary.get("method")
    row: dict[str, Any] = {
        "name": name,
        "status": summary.get("status"),
        # the run name's model part: the model plus any setting that differs from its config file
        # (runner.model_label), so a variant (eager attention, a deeper tiny tower) is its own model row
        "model": parts[0] if len(parts) == 4 else summary.get("model"),
        "method": method,
        "method_label": parts[1] if len(parts) == 4 else method,
        "budget": summary.get("budget"),
        "budget_label": parts[2] if len(parts) == 4 else _budget_label(summary.get("budget"), method),
        "benchmark": summary.get("benchmark"),
        # evaluation protocol (apet_bench.protocol); None for runs recorded without one
        "protocol": summary.get("protocol"),
        "num_samples": summary.get("num_samples"),
        "limit": _read_limit(run_dir),
        "random_weights": summary.get("random_weights"),
        "source": summary.get("source", "run"),
        "weights": summary.get("weights"),
        "device": summary.get("device"),
        "attn_implementation": summary.get("attn_implementation"),
        "visual_tokens_llm_mean": summary.get("visual_tokens_llm_mean"),
        "layer_average_visual_tokens": summary.get("layer_average_visual_tokens"),
        "eval_s": summary.get("eval_s"),
        "wall_s": summary.get("wall_s"),
        "missing_subtasks": _read_missing_subtasks(run_dir),
        "skipped_samples": summary.get("skipped_samples"),
        "note": summary.get("note"),
        "error": summary.get("error"),
        "run_dir": str(run_dir),
    }
    if summary.get("status") == "complete" and not any(_num(v) for v in (summary.get("metrics") or {}).values()):
        subs = _read_submission_files(run_dir)
        if subs:
            row["note"] = f"submission file written, score on the evaluation server: {', '.join(subs)}"
    for k, v in (summary.get("metrics") or {}).items():
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(float(v))
        row[METRIC_PREFIX + str(k)] = float(v) if ok else None
    return row


def load_runs_report(results_dir: str | Path = "results", *, include_failed: bool = False):
    """Like :func:`load_runs`, returning ``(DataFrame, problems: list[RunProblem])``."""
    import pandas as pd

    runs_dir = Path(results_dir) / "runs"
    rows: list[dict[str, Any]] = []
    problems: list[RunProblem] = []
    if runs_dir.is_dir():
        for d in sorted(runs_dir.iterdir()):
            if not d.is_dir():
                continue
            if d.name.startswith("."):
                what = "half-written run (staging directory of a run in progress or killed)" if d.name.startswith(".tmp-") \
                    else "hidden directory (not a run)"
                problems.append(RunProblem(str(d), what))
                continue
            marker = d / "run.json"
            if not marker.is_file():
                problems.append(RunProblem(str(d), "no run.json (half-written or not a run directory)"))
                continue
            try:
                summary = json.loads(marker.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                problems.append(RunProblem(str(d), f"run.json unreadable: {' '.join(str(exc).split())}"))
                continue
            if not isinstance(summary, dict):
                problems.append(RunProblem(str(d), "run.json is not a JSON object"))
                continue
            lacking = [k for k in ("name", "model", "method", "benchmark") if not summary.get(k)]
            if lacking:
                problems.append(RunProblem(str(d), f"run.json lacks {', '.join(lacking)}"))
                continue
            status = summary.get("status")
            if status != "complete":
                if status in _RECORDED_FAILURES:
                    if include_failed:
                        rows.append(_row(d, summary))
                    continue
                problems.append(RunProblem(str(d), f"status {status!r} (not complete)"))
                continue
            rows.append(_row(d, summary))
    df = pd.DataFrame(rows)
    for col in RUN_COLUMNS:
        if col not in df.columns:
            df[col] = pd.Series(dtype="object")
    metric_cols = sorted(c for c in df.columns if c.startswith(METRIC_PREFIX))
    return df[RUN_COLUMNS + metric_cols], problems


def load_runs(results_dir: str | Path = "results", *, include_failed: bool = False):
    """One row per finished run under ``<results_dir>/runs/`` (``pandas.DataFrame``).

    Parameters
    ----------
    results_dir : str or Path
        The results root (runs are read from ``<results_dir>/runs/*/run.json`` + ``config.yaml`` for
        ``limit`` + ``metrics.json`` for ``missing_subtasks``).
    include_failed : bool
        Also return recorded failures (``status`` ``failed`` / ``missing`` with the one-line ``error``).

    Returns
    -------
    pandas.DataFrame
        Columns :data:`RUN_COLUMNS` (``model``, ``method``, ``method_label`` = the run name's method
        part with variant parameters, ``budget`` (int tokens / float ratio / None), ``budget_label``
        (``"64"``, ``"0.1"``, ``"full"``), ``benchmark``, ``num_samples``, ``limit``,
        ``random_weights``, ``source`` (``run`` | ``imported``), ``visual_tokens_llm_mean``,
        ``layer_average_visual_tokens``, timing in s, ...) plus one float column ``metric.<key>`` per
        metric (lmms-eval units: POPE/GQA/SQA/VQA fractions, MME sums, MMBench percent). Empty
        (with those columns) when there are no runs. Half-written or corrupt directories are left
        out; :func:`load_runs_report` lists them.
    """
    return load_runs_report(results_dir, include_failed=include_failed)[0]
