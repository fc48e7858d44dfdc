"""Hydra callback: progress of a sweep (runs done / left, samples per second, ETA), one results table at
the end of a run or a sweep, and a summary of the cells that could not run (missing: data absent /
not available, with the reason; failed: the evaluation raised). The exit code is 1 when any job failed
(Hydra's multirun would otherwise exit 0 after a job returned a failure); missing cells alone keep 0,
unless no cell of the sweep could run at all (bad input shared by every cell): exit code 2.

Every job also writes its outcome to ``<job output dir>/apet_outcome.json``; at the end of a multirun the
summary is built from those files (:func:`read_sweep_outcomes`), so it is complete when the jobs ran in
other processes or on other machines (hydra-submitit-launcher: ``hydra/launcher=slurm`` or
``submitit_local``), where the job callbacks never run in the driver."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

from apet_bench.report import print_failure_summary, print_results_table

__all__ = ["ResultsTableCallback", "count_sweep_jobs", "read_sweep_outcomes", "OUTCOME_FILE"]

#: A job's outcome (``RunOutcome`` as JSON) in its Hydra output directory (``<sweep dir>/<job num>/``).
OUTCOME_FILE = "apet_outcome.json"


def _write_outcome(output_dir: str | os.PathLike, value: Any) -> None:
    """Write ``value`` (a ``RunOutcome`` or a dict) as ``<output_dir>/apet_outcome.json`` (atomic rename)."""
    data = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else dict(value)
    path = Path(output_dir) / OUTCOME_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{OUTCOME_FILE}.{os.getpid()}.part")
    tmp.write_text(json.dumps(data, default=str, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, path)


def read_sweep_outcomes(sweep_dir: str | os.PathLike) -> list[dict[str, Any]] | None:
    """The outcomes the jobs of a sweep wrote under ``sweep_dir`` (``<sweep_dir>/<job num>/apet_outcome.json``),
    in job order. A job directory without the file (the job died before returning, e.g. killed by the
    scheduler) counts as ``failed`` with that reason. None when no job wrote one (nothing on disk to read).
    """
    root = Path(sweep_dir)
    if not root.is_dir():
        return None
    jobs = sorted((d for d in root.iterdir() if d.is_dir() and d.name.isdigit()), key=lambda d: int(d.name))
    outcomes: list[dict[str, Any]] = []
    found = False
    for d in jobs:
        f = d / OUTCOME_FILE
        try:
            outcomes.append(json.loads(f.read_text(encoding="utf-8")))
            found = True
        except (OSError, ValueError):
            outcomes.append({"name": f"job {d.name}", "status": "failed", "run_dir": "", "summary": {},
                             "error": f"the job ended without an outcome (see its log under {d})"})
    return outcomes if found else None


def count_sweep_jobs(config: Any) -> int | None:
    """Number of jobs a basic-sweeper multirun will launch: the product of the value counts of every
    sweep key, ``hydra.sweeper.params`` first and command-line overrides of the same key winning (as
    Hydra's ``BasicSweeper.split_arguments`` keeps the last override per key). None if unknown."""
    try:
        from hydra.core.override_parser.overrides_parser import OverridesParser

        params = [f"{k}={v}" for k, v in (config.hydra.sweeper.get("params") or {}).items()]
        params += list(config.hydra.overrides.task)
        final: dict[str, int] = {}
        for ov in OverridesParser.create().parse_overrides(params):
            key = ov.get_key_element()
            final[key] = len(list(ov.sweep_string_iterator())) if ov.is_sweep_override() else 1
        n = 1
        for v in final.values():
            n *= v
        return n
    except Exception:  # progress is cosmetic
        return None


def _get(o: Any, key: str, default: Any = None) -> Any:
    return o.get(key, default) if isinstance(o, dict) else getattr(o, key, default)


class ResultsTableCallback(Callback):
    def __init__(self) -> None:
        self.outcomes: list[Any] = []
        self.total: int | None = None
        self.t0: float | None = None
        self.job_t0: float | None = None
        self.multirun = False
        self.durations: list[tuple[str, float]] = []  # (status, seconds) per job, for the ETA
        self.sweep_dir: str | None = None

    # ----------------------------------------------------------------------------------- progress
    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        self.multirun = True
        self.total = count_sweep_jobs(config)
        try:
            self.sweep_dir = str(config.hydra.sweep.dir)
        except Exception:  # a config without a sweep dir: only the in-process outcomes are summarised
            self.sweep_dir = None
        self.t0 = time.perf_counter()
        if self.total:
            print(f"apet-bench: sweep of {self.total} run(s); finished runs are skipped", flush=True)

    def on_job_start(self, config: Any, **kwargs: Any) -> None:
        self.job_t0 = time.perf_counter()
        if self.multirun:
            try:
                num = int(config.hydra.job.num) + 1
            except Exception:
                num = len(self.outcomes) + 1
            of = f"/{self.total}" if self.total else ""
            print(f"apet-bench: [{num}{of}] {' '.join(config.hydra.overrides.task)}", flush=True)

    def _progress_line(self, value: Any) -> str:
        done = len(self.outcomes)
        counts: dict[str, int] = {}
        for o in self.outcomes:
            counts[_get(o, "status", "?")] = counts.get(_get(o, "status", "?"), 0) + 1
        parts = [f"{done}" + (f"/{self.total} done, {self.total - done} left" if self.total else " done")]
        parts.append(", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
        summ = _get(value, "summary") or {}
        if _get(value, "status") == "finished" and summ.get("num_samples") and summ.get("eval_s"):
            parts.append(f"this run {summ['num_samples']} samples in {summ['eval_s']:.1f} s "
                         f"({summ['num_samples'] / max(summ['eval_s'], 1e-9):.2f} samples/s)")
        if self.t0 is not None:
            el = time.perf_counter() - self.t0
            parts.append(f"elapsed {el / 60:.1f} min")
            if self.total and done < self.total and self.durations:
                # ETA: jobs left x (share of evaluating jobs x their mean time + the rest x theirs);
                # skipped and missing cells take seconds, evaluations minutes.
                ev = [d for st, d in self.durations if st == "finished"]
                other = [d for st, d in self.durations if st != "finished"]
                frac = len(ev) / len(self.durations)
                mean_ev = sum(ev) / len(ev) if ev else 0.0
                mean_other = sum(other) / len(other) if other else 0.0
                eta = (self.total - done) * (frac * mean_ev + (1 - frac) * mean_other)
                parts.append(f"ETA ~{eta / 60:.1f} min")
        return "apet-bench: progress " + "; ".join(p for p in parts if p)

    def on_job_end(self, config: Any, job_return: Any, **kwargs: Any) -> None:
        try:
            value = job_return.return_value
        except Exception:  # a job that raised: Hydra re-raises it after the sweep
            return
        if value is not None and _get(value, "status") != "worker":  # worker ranks: rank 0 reports the run
            try:
                if config.hydra.mode is not None and str(config.hydra.mode).endswith("MULTIRUN"):
                    _write_outcome(config.hydra.runtime.output_dir, value)
            except Exception as exc:  # the summary then lists this job as ended without an outcome
                print(f"apet-bench: could not record the job's outcome: {exc}", file=sys.stderr)
            self.outcomes.append(value)
            if self.job_t0 is not None:
                self.durations.append((_get(value, "status"), time.perf_counter() - self.job_t0))
            if self.multirun:
                print(self._progress_line(value), flush=True)

    # -------------------------------------------------------------------------------------- end
    def _finish(self) -> None:
        print_results_table([o for o in self.outcomes if _get(o, "status") in ("finished", "skipped")]
                            if self.multirun else self.outcomes)
        failed = [o for o in self.outcomes if _get(o, "status") == "failed"]
        ran = [o for o in self.outcomes if _get(o, "status") in ("finished", "skipped")]
        missing = [o for o in self.outcomes if _get(o, "status") == "missing"]
        print_failure_summary(self.outcomes)
        self.outcomes = []
        if failed:
            print(f"apet-bench: {len(failed)} run(s) failed: {', '.join(_get(o, 'name') for o in failed)}", file=sys.stderr)
            sys.exit(1)
        if self.multirun and missing and not ran:  # nothing could run: bad input, not a sweep with gaps
            print(f"apet-bench: error: none of the {len(missing)} cell(s) of the sweep could run "
                  f"(first reason: {_get(missing[0], 'error')})", file=sys.stderr)
            sys.exit(2)

    def on_run_end(self, config: Any, **kwargs: Any) -> None:
        self._finish()

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        # What the jobs wrote, wherever they ran (a submitit launcher runs them in other processes, so
        # self.outcomes is empty here); the in-process list when nothing is on disk.
        on_disk = read_sweep_outcomes(self.sweep_dir) if self.sweep_dir else None
        if on_disk is not None:
            self.outcomes = on_disk
        self._finish()
