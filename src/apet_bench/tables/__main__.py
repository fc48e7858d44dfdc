"""``python -m apet_bench.tables table1|...|table6|all [model=<name>[,<name>]] [results_dir=results] [out_dir=...]
[benchmark.protocol=llava|lmms_eval] [stats=true [ref=<method>] [n_resamples=9999] [confidence=0.95]]``

Prints each table (markdown) with the paper's numbers beside ours, writes markdown/CSV/LaTeX under
``<results_dir>/tables/``, and lists run directories that were left out (half-written / corrupt).
Other ``key=value`` arguments (the sweep's Hydra overrides, e.g. ``data_root=...``, ``limit=...``)
are accepted and ignored, so ``make table1 ARGS=...`` can pass the same overrides to both steps.
Only runs of the chosen evaluation protocol (default ``llava``) fill the cells; the footnotes ``[P]``
name each benchmark's protocol variant. ``stats=true`` also prints (and writes ``<name>_ci.md``) the
paired Δ of every cell against the vanilla row and against ``ref`` at the same budget, with bootstrap
intervals and Holm-marked cells (:mod:`apet_bench.tables.paired`). Exit 2 on an unknown table name, an
unknown key (neither the table's nor a ``run.py`` override) or a bad stats option.
"""

from __future__ import annotations

import sys
from pathlib import Path

from . import TABLES
from .build import build_table
from .runs import load_runs_report


def _command():
    from apet_bench.cli import Command, Key

    return Command(
        "python -m apet_bench.tables",
        f"Paper tables from the finished runs, the paper's numbers beside ours; name tables: "
        f"{', '.join(TABLES)} or all.",
        (
            Key("model", None, help="only these models (comma-separated)"),
            Key("results_dir", "results", help="results directory (reads <results_dir>/runs)"),
            Key("out_dir", None, help="output directory (default <results_dir>/tables)"),
            Key("benchmark.protocol", "llava", help="evaluation protocol of the runs that fill the cells: llava or lmms_eval"),
            Key("stats", False, "bool", help="also the paired deltas with bootstrap intervals (<name>_ci.md)"),
            Key("ref", None, help="stats=true: the method compared at the same budget"),
            Key("n_resamples", 9999, "any", help="stats=true: bootstrap resamples"),
            Key("confidence", 0.95, "any", help="stats=true: interval confidence level"),
        ),
        positional="table",
        extra="overrides",  # the sweep's own overrides (`make table1 ARGS=...`) are accepted and ignored
    )


def main(argv: list[str] | None = None) -> int:
    from apet_bench.cli import error

    def body(opts) -> int:
        names = opts.words
        if not names:
            return error(f"name a table (usage: python -m apet_bench.tables {{{'|'.join(TABLES)}|all}} [model=...] "
                         f"[results_dir=...])")
        wanted: list[str] = []
        for n in names:
            if n == "all":
                wanted += [t for t in TABLES if t not in wanted]
            elif n in TABLES:
                wanted.append(n)
            else:
                return error(f"unknown table {n!r} (available: {', '.join(TABLES)}, all)")
        results_dir = Path(opts["results_dir"])
        out_dir = Path(opts["out_dir"] or results_dir / "tables")
        model = opts["model"]
        model_list = [m for m in model.split(",") if m] if model else None
        paired_opts = None
        if opts["stats"]:
            from .paired import PairedOptions

            try:
                paired_opts = PairedOptions.from_opts({k: opts[k] for k in ("ref", "n_resamples", "confidence")})
            except ValueError as exc:
                return error(exc)
        df, problems = load_runs_report(results_dir, include_failed=True)
        runs = df[df["status"] == "complete"]
        failures = df[df["status"] != "complete"]
        for name in wanted:
            table = build_table(name, runs, failures=failures, model=model_list, protocol=opts["benchmark.protocol"])
            written = table.write(out_dir)
            print(table.to_markdown())
            if paired_opts is not None:
                from .build import load_paper_numbers
                from .paired import paired_section

                section = paired_section(table, runs, load_paper_numbers()[name], paired_opts)
                ci_file = out_dir / f"{name}_ci.md"
                ci_file.write_text(section, encoding="utf-8")
                written.append(ci_file)
                print(section)
            print(f"written: {', '.join(str(p) for p in written)}\n", flush=True)
        if problems:
            print(f"left out {len(problems)} run director{'y' if len(problems) == 1 else 'ies'} under "
                  f"{results_dir / 'runs'}:")
            for p in problems:
                print(f"  {p}")
        return 0

    return _command().run(argv, body)


if __name__ == "__main__":
    sys.exit(main())
