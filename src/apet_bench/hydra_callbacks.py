"""Hydra callback: progress of a sweep (runs done / left, samples per second, ETA), one results table at
the end of a run or a sweep, and a summary of the cells that could not run (missing: data absent /
not available, with the reason; failed: the evaluation raised). The exit code is 1 when any job failed
(Hydra's multirun would otherwise exit 0 after a job returned a failure); missing cells alone keep 0,
unless no cell of the sweep could run at all (bad input shared by every cell): exit code 2."""

from __future__ import annotations

import sys
import time
from typing import Any

from hydra.experimental.callback import Callback

from apet_bench.report import print_failure_summary, print_results_table

__all__ = ["ResultsTableCallback", "count_sweep_jobs"]


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

    # ----------------------------------------------------------------------------------- progress
    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        self.multirun = True
        self.total = count_sweep_jobs(config)
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
        self._finish()
