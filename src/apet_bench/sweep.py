"""Fault-tolerant sweep entry point for the paper tables: ``python -m apet_bench.sweep experiment=table1 ...``.

Same Hydra config, overrides and run directories as ``run.py``, with one difference that a table sweep
needs: a cell that cannot run never stops the sweep. ``run.py`` ends a job with ``sys.exit(2)`` on
bad input (a method not available yet, a benchmark whose data is absent), which Hydra's launcher does
not catch, so the rest of a multirun would be lost. Here every job returns a
:class:`~apet_bench.runner.RunOutcome`:

* ``finished`` / ``skipped``: as ``run.py``;
* ``missing``: bad input or absent data (``ConfigError``, ``BudgetError``, ``DataError``, other
  ``ValueError``): the reason is recorded as ``results/runs/<name>/run.json`` with ``"status":
  "missing"`` and the one-line ``error``, so the table shows the cell as missing with that reason;
* ``failed``: the evaluation raised (``EvaluationError`` or anything else): recorded the same way
  with ``"status": "failed"``.

A recorded failure is never a finished run: the next sweep retries it and replaces the record when it
succeeds; a finished run is never overwritten by a failure record. The Hydra callback
(:mod:`apet_bench.hydra_callbacks`) prints progress and the failure summary.
"""

from __future__ import annotations

import os
import sys
import traceback

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from apet_bench.config import GROUPS, ConfigError, check_group_overrides, config_dir  # noqa: E402

__all__ = ["expand_seeds", "run_cell", "record_failure"]


def _cell_name(cfg: dict) -> str | None:
    """The run name a config would get, or None when it cannot be formed (e.g. a malformed budget)."""
    try:
        from apet_bench.budget import validate_budget
        from apet_bench.runner import run_dir_name

        budget = None if cfg["method"]["name"] == "none" else validate_budget(cfg.get("budget"))
        return run_dir_name(cfg, budget)
    except Exception:
        return None


def _protocol(cfg: dict) -> str | None:
    try:
        from apet_bench.protocol import resolve

        return resolve(cfg["benchmark"])["protocol"]
    except Exception:  # a bad protocol is itself the recorded failure
        return None


def record_failure(cfg: dict, status: str, error: str) -> str | None:
    """Write ``runs/<name>/run.json`` with ``status`` (``missing`` | ``failed``) and ``error``; returns the
    run name, or None when nothing was written (no name, or the run is already finished)."""
    from apet_bench.results import RUN_MARKER, RunStore

    name = _cell_name(cfg)
    if name is None:
        return None
    store = RunStore(cfg.get("results_dir") or "results")
    if store.is_finished(name):
        return None
    budget = None if cfg["method"]["name"] == "none" else cfg.get("budget")
    summary = {
        "status": status, "name": name, "error": error,
        "groups": {g: cfg[g]["name"] for g in ("model", "method", "benchmark")},
        "model": cfg["model"]["name"], "method": cfg["method"]["name"],
        "method_params": cfg["method"].get("params") or {}, "budget": budget,
        "benchmark": cfg["benchmark"]["name"], "protocol": _protocol(cfg), "metrics": {},
        "note": "not a result: why this cell could not run (python -m apet_bench.sweep); rerun retries it",
    }
    try:
        with store.open_run(name, force=False) as w:
            w.write_json(RUN_MARKER, summary)
    except Exception as exc:  # recording is best effort; the outcome still carries the reason
        print(f"apet-bench: could not record the failure of {name}: {exc}", file=sys.stderr)
        return None
    return name


def apply_tiny_limit(cfg: DictConfig | dict):
    """``limit = tiny_limit`` for a tiny random-weight model when no ``limit`` was given.

    The table experiments set ``tiny_limit`` (a pipeline check on CPU need not score every sample); the
    limit is recorded in the run's ``config.yaml`` and the table says it was built from limited runs.
    ``tiny_limit=null`` runs the full benchmark. Real models are never limited this way.
    """
    from omegaconf import open_dict

    get = cfg.get
    model = get("model") or {}
    if model.get("tiny") and get("limit") is None and get("tiny_limit"):
        if isinstance(cfg, DictConfig):
            with open_dict(cfg):
                cfg.limit = int(cfg.tiny_limit)
        else:
            cfg = {**cfg, "limit": int(cfg["tiny_limit"])}
    return cfg


def run_cell(cfg: DictConfig | dict, choices: dict | None = None):
    """Run one cell like ``run.py`` but return a failed/missing :class:`RunOutcome` instead of exiting."""
    from apet_bench.budget import BudgetError
    from apet_bench.data import DataError
    from apet_bench.runner import EvaluationError, RunOutcome, execute

    cfg = apply_tiny_limit(cfg)
    plain = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    plain = {k: v for k, v in plain.items() if k != "hydra"}
    label = _cell_name(plain) or "/".join(str((plain.get(g) or {}).get("name")) for g in ("model", "method", "benchmark"))
    try:
        outcome = execute(cfg, choices=choices)
    except (ConfigError, BudgetError, DataError, ValueError) as exc:
        msg = " ".join(str(exc).split())
        record_failure(plain, "missing", msg)
        print(f"apet-bench: {label}: missing ({msg})", file=sys.stderr, flush=True)
        return RunOutcome(label, "missing", "", {}, error=msg)
    except EvaluationError as exc:
        msg = " ".join(str(exc).split())
        record_failure(plain, "failed", msg)
        print(f"apet-bench: {label}: evaluation failed ({msg})", file=sys.stderr, flush=True)
        return RunOutcome(label, "failed", "", {}, error=msg)
    except Exception as exc:  # a bug or a crash inside one cell must not end the sweep
        msg = f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
        traceback.print_exc()
        record_failure(plain, "failed", msg)
        return RunOutcome(label, "failed", "", {}, error=msg)
    verb = "skipped (already finished; force=true redoes it)" if outcome.status == "skipped" else "finished"
    if outcome.status != "worker":  # a data-parallel worker rank: rank 0 reports the run
        print(f"apet-bench: {outcome.name}: {verb} -> {outcome.run_dir}", flush=True)
    return outcome


def expand_seeds(args: list[str]) -> list[str]:
    """Rewrite ``seeds=N`` (seeds 0 .. N-1) or ``seeds=a,b,c`` into the Hydra sweep override ``seed=...``.

    Every cell of the sweep then runs once per seed (narrow the sweep to the methods with randomness,
    e.g. ``method=<name>,<name>``); the tables report mean ± sd over the seeds found.

    Raises
    ------
    ConfigError
        ``seeds`` given together with ``seed``, or a value that is not a positive count / a list of
        non-negative integers.
    """
    given = [a for a in args if a.split("=", 1)[0] == "seeds"]
    if not given:
        return list(args)
    if any(a.split("=", 1)[0].lstrip("+~") == "seed" for a in args):
        raise ConfigError("give either seeds=... or seed=..., not both")
    value = given[-1].split("=", 1)[1].strip()
    parts = [v.strip() for v in value.split(",") if v.strip()]
    if not parts or not all(v.isdigit() for v in parts) or (len(parts) == 1 and int(parts[0]) < 1):
        raise ConfigError(f"seeds {value!r} is invalid (use a count N >= 1, or a list of seeds like 0,1,2)")
    seeds = list(range(int(parts[0]))) if len(parts) == 1 else [int(v) for v in parts]
    return [a for a in args if a.split("=", 1)[0] != "seeds"] + [f"seed={','.join(map(str, seeds))}"]


def sweep_args(args: list[str]) -> list[str]:
    """The command line with ``seeds=...`` expanded (:func:`expand_seeds`) and, when it was, ``--multirun``
    added if missing: a seed list is a sweep whether or not the rest of the command is one.

    Raises
    ------
    ConfigError
        As :func:`expand_seeds`.
    """
    expanded = expand_seeds(args)
    if expanded != list(args) and not {"-m", "--multirun"} & set(expanded):
        expanded.append("--multirun")
    return expanded


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="config")
def main(cfg: DictConfig):
    hc = HydraConfig.get()
    choices = {k: v for k, v in hc.runtime.choices.items() if not k.startswith("hydra")}
    return run_cell(cfg, choices)


if __name__ == "__main__":
    from apet_bench.cli import fail, run_hydra

    try:
        sys.argv[1:] = sweep_args(sys.argv[1:])
    except ConfigError as exc:
        fail(str(exc))
    chosen = {a.split("=", 1)[0].lstrip("+~") for a in sys.argv[1:] if "=" in a and not a.startswith("-")}
    if not chosen & set(GROUPS):
        fail("choose an experiment (e.g. experiment=table1) or model/method/benchmark")
    try:
        check_group_overrides([a for a in sys.argv[1:] if not a.startswith("-")])
    except ConfigError as exc:
        fail(exc)
    run_hydra(main)
