#!/usr/bin/env python
"""apet-bench entry point (Hydra).

    python run.py                                   # experiment=demo: the embedded default
                                                    # (used whenever no model/method/benchmark/experiment is chosen)
    python run.py model=tiny_llava15 method=random budget=64 benchmark=mme data_root=../shared/benchmarks
    python run.py -m method=none,random budget=64,128          # a sweep; finished runs are skipped

Bad input (unknown group option, a model/method not available yet, a bad budget, a bad data_root)
ends with one line on stderr and exit code 2; a failed evaluation with exit code 1. In a sweep
(``-m`` / an experiment in MULTIRUN mode) a cell that cannot run is recorded as missing/failed with
its reason (``apet_bench.sweep.run_cell``) and the sweep goes on; the exit code is then 1. Nothing
half-written is left under results/runs/.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from apet_bench.config import GROUPS, ConfigError, check_group_overrides, config_dir  # noqa: E402


def _fail(prefix: str, exc: BaseException, code: int) -> None:
    from apet_bench.cli import fail

    if prefix == "error":
        _drop_hydra_output_dir()
        fail(exc, code)
    print(f"apet-bench: {prefix}: {' '.join(str(exc).split())}", file=sys.stderr, flush=True)
    sys.exit(code)


def _drop_hydra_output_dir() -> None:
    """Remove the ``results_dir/hydra/<date>/<time>/`` directory Hydra made for a job ended by bad input
    (it holds only Hydra's copy of the config and an empty log), and its date directory when empty."""
    import shutil
    from pathlib import Path

    try:
        out = Path(HydraConfig.get().runtime.output_dir)
    except Exception:  # no Hydra job (bad input found before Hydra ran)
        return
    if out.is_dir() and out.parent.parent.name == "hydra":
        shutil.rmtree(out, ignore_errors=True)
        for d in (out.parent, out.parent.parent):
            try:
                d.rmdir()  # only when empty
            except OSError:
                break


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="config")
def main(cfg: DictConfig):
    from hydra.types import RunMode

    from apet_bench.budget import BudgetError
    from apet_bench.data import DataError
    from apet_bench.runner import EvaluationError, execute

    hc = HydraConfig.get()
    choices = {k: v for k, v in hc.runtime.choices.items() if not k.startswith("hydra")}
    if hc.mode == RunMode.MULTIRUN:
        # A sweep goes on past a cell that cannot run (recorded as missing/failed with its reason;
        # the callback's summary lists them and makes the exit code 1).
        from apet_bench.sweep import run_cell

        return run_cell(cfg, choices)
    try:
        outcome = execute(cfg, choices=choices)
    except (ConfigError, BudgetError, DataError, ValueError) as exc:
        # Bad input: our ValueErrors (model/method config, data, budget) carry one-line messages;
        # anything raised inside an evaluation comes wrapped as EvaluationError instead.
        _fail("error", exc, 2)
    except EvaluationError as exc:
        name = f"{choices.get('model')}/{choices.get('method')}/{cfg.get('budget')}/{choices.get('benchmark')}"
        _fail(f"evaluation failed ({name})", exc, 1)
    verb = "skipped (already finished; force=true redoes it)" if outcome.status == "skipped" else "finished"
    if outcome.status != "worker":  # a data-parallel worker rank: rank 0 reports the run
        print(f"apet-bench: {outcome.name}: {verb} -> {outcome.run_dir}", flush=True)
    return outcome


def with_default_experiment(argv: list[str]) -> list[str]:
    """``argv`` with ``experiment=demo`` added when no model/method/benchmark/experiment is chosen.

    The override goes right before the first override already given (Hydra's parser takes the
    overrides as one run of positional arguments, so one added after ``--cfg job`` would be
    rejected), or at the end when there is none. ``argv[0]`` is the program.
    """
    args = argv[1:]
    overrides = [i for i, a in enumerate(args) if "=" in a and not a.startswith("-")]
    chosen = {args[i].split("=", 1)[0].lstrip("+~") for i in overrides}
    if chosen & set(GROUPS):
        return list(argv)
    at = overrides[0] if overrides else len(args)
    return [argv[0], *args[:at], "experiment=demo", *args[at:]]


if __name__ == "__main__":
    sys.argv = with_default_experiment(sys.argv)  # no model/method/benchmark/experiment chosen: the embedded default
    flags = set(sys.argv[1:])
    if flags & {"-m", "--multirun"} and flags & {"-c", "--cfg"}:  # Hydra would raise with a traceback
        _fail("error", ConfigError("--cfg cannot be combined with -m/--multirun (Hydra prints one job's config: "
                                   "drop -m, and give one value per swept key)"), 2)
    try:
        check_group_overrides([a for a in sys.argv[1:] if not a.startswith("-")])
    except ConfigError as exc:
        _fail("error", exc, 2)
    from apet_bench.cli import run_hydra

    run_hydra(main)
