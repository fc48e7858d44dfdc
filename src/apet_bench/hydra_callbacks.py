"""Hydra callback: print one results table at the end of a run or a sweep; fail the sweep's exit code
when any job failed (Hydra's multirun would otherwise exit 0 after a job returned a failure)."""

from __future__ import annotations

import sys
from typing import Any

from hydra.experimental.callback import Callback

from apet_bench.report import print_results_table


class ResultsTableCallback(Callback):
    def __init__(self) -> None:
        self.outcomes: list[Any] = []

    def on_job_end(self, config: Any, job_return: Any, **kwargs: Any) -> None:
        try:
            value = job_return.return_value
        except Exception:  # a job that raised: Hydra re-raises it after the sweep
            return
        if value is not None:
            self.outcomes.append(value)

    def _finish(self) -> None:
        print_results_table(self.outcomes)
        failed = [o for o in self.outcomes if getattr(o, "status", None) == "failed"]
        self.outcomes = []
        if failed:
            print(f"apet-bench: {len(failed)} run(s) failed: {', '.join(o.name for o in failed)}", file=sys.stderr)
            sys.exit(1)

    def on_run_end(self, config: Any, **kwargs: Any) -> None:
        self._finish()

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        self._finish()
