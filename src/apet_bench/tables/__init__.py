"""Aggregators: the paper's Tables 1-6 from ``results/runs/``; Table 7 is ``table7.py``.

Public API
----------
``load_runs(results_dir="results") -> pandas.DataFrame``
    One row per run directory with a readable ``run.json`` (complete or a recorded failure), see
    :func:`apet_bench.tables.runs.load_runs`. ``load_runs_report`` also returns the problems found
    (half-written / corrupt directories, which are left out).
``build_table(name, runs, model=None) -> TableResult`` and ``python -m apet_bench.tables table1|...|table6|all``.
"""

from __future__ import annotations

from .runs import RunProblem, load_runs, load_runs_report

__all__ = ["RunProblem", "load_runs", "load_runs_report", "build_table", "TABLES"]

TABLES = ("table1", "table2", "table3", "table4", "table5", "table6")


def build_table(*args, **kwargs):
    """See :func:`apet_bench.tables.build.build_table` (imported lazily)."""
    from .build import build_table as _build

    return _build(*args, **kwargs)
