"""Weights & Biases logging of finished runs (``logger=wandb``), offline by default.

One W&B run per results run (``results/runs/<model>__<method>__<budget>__<benchmark>/``), opened
after the run directory is complete and filled from its files, so what W&B shows is exactly what the
results store holds:

* ``config``: the resolved config (``config.yaml``) plus ``groups`` (the chosen config-group names),
  ``run_name``, ``budget`` and ``provenance`` (``provenance.json``);
* ``summary``: ``metrics/<name>`` (headline metrics of ``run.json`` and every lmms-eval metric of
  ``metrics.json``), ``tokens/<key>`` (the visual-token accounting of ``metrics.json["tokens"]``:
  tokens in / entering the LLM / per-layer average, prompt tokens), ``timing/<key>`` (``eval_s``,
  ``wall_s`` of the run; ``prefill_ms_mean`` / ``total_ms_mean`` per sample, wall-clock ms);
* lmms-eval's own :class:`lmms_eval.loggers.WandbLogger` then logs its results table and artifact
  **into the same run**: it attaches to ``wandb.run`` when one is open (``wandb_logger.py``,
  ``if wandb.run is None: wandb.init(...) else: self.run = wandb.run``), which ours always is at that
  point. ``simple_evaluate`` itself never starts W&B (only lmms-eval's CLI does, with
  ``--wandb_args``), so no second run is opened;
* optionally (``wandb.log_samples=true``) a per-sample ``wandb.Table`` (``samples``) with answers,
  scores, visual-token counts and ms.

Runs are grouped by experiment (``wandb.group``; default: the ``experiment`` preset's name, else
``<model>__<benchmark>``) and tagged ``model:<m>``, ``method:<method>``, ``budget:<b>``,
``benchmark:<bench>``, so a sweep is one dashboard with filters. Offline mode (the default,
``wandb.mode: offline`` or ``WANDB_MODE``) needs no account and no network; upload later with
``wandb sync <results_dir>/wandb/offline-run-*``.

:func:`read_offline_run` parses an offline run's transaction log (``run-<id>.wandb``) with wandb's own
reader (``wandb.sdk.internal.datastore`` + the ``Record`` protobuf), so tests and users can check what
was logged without network.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from apet_bench.config import ConfigError

__all__ = [
    "LOGGERS",
    "WANDB_MODES",
    "log_finished_run",
    "log_run_dir",
    "read_offline_run",
    "run_tags",
    "wandb_group",
]

#: Values of the ``logger`` config key.
LOGGERS: tuple[str, ...] = ("none", "wandb")
#: Values of ``wandb.mode``.
WANDB_MODES: tuple[str, ...] = ("offline", "online", "disabled")

_DEFAULTS: dict[str, Any] = {
    "project": "apet-bench",
    "entity": None,
    "mode": "offline",
    "group": None,
    "dir": None,
    "log_samples": False,
    "tags": [],
    "timeout_s": 30,
}


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _wandb_settings(wcfg: Mapping[str, Any] | None) -> dict[str, Any]:
    """``wcfg`` over :data:`_DEFAULTS`, validated.

    Raises
    ------
    ConfigError
        For a ``mode`` outside :data:`WANDB_MODES` or ``tags`` that is not a list.
    """
    out = dict(_DEFAULTS)
    out.update({k: v for k, v in dict(wcfg or {}).items() if v is not None or k in ("entity", "group", "dir")})
    mode = str(out.get("mode") or "offline").lower()
    if mode not in WANDB_MODES:
        raise ConfigError(f"wandb.mode {out.get('mode')!r} is invalid (use {' | '.join(WANDB_MODES)})")
    out["mode"] = mode
    tags = out.get("tags") or []
    if isinstance(tags, str) or not isinstance(tags, (list, tuple)):
        raise ConfigError(f"wandb.tags {tags!r} is invalid (use a list of strings)")
    out["tags"] = [str(t) for t in tags]
    try:
        out["timeout_s"] = float(out.get("timeout_s"))
    except (TypeError, ValueError):
        out["timeout_s"] = -1.0
    if not out["timeout_s"] > 0:
        raise ConfigError(f"wandb.timeout_s {wcfg.get('timeout_s')!r} is invalid (use seconds > 0)")
    return out


def wandb_group(run: Mapping[str, Any], group: str | None = None) -> str:
    """The W&B group of a run: ``group`` if given, else the experiment preset, else ``<model>__<benchmark>``.

    Parameters
    ----------
    run : mapping
        ``run.json`` (needs ``groups``, ``model``, ``benchmark``).
    group : str, optional
        ``wandb.group`` from the config.
    """
    if group:
        return str(group)
    experiment = (run.get("groups") or {}).get("experiment")
    if experiment:
        return str(experiment)
    sweep = _hydra_sweep_id()
    if sweep:
        return sweep
    return f"{run.get('model')}__{run.get('benchmark')}"


def _hydra_sweep_id() -> str | None:
    """``sweep-<date>-<time>`` of the Hydra multirun this process is a job of (from ``hydra.sweep.dir``),
    so every cell of one ``-m`` sweep lands in one W&B group; None outside a multirun."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
        if hc.mode != RunMode.MULTIRUN:
            return None
        d = Path(str(hc.sweep.dir))
        return f"sweep-{d.parent.name}-{d.name}".replace("multirun-", "")
    except Exception:  # not inside a Hydra job
        return None


def plot_budget(run: Mapping[str, Any], metrics: Mapping[str, Any] | None = None) -> float | None:
    """The budget as a number every run has, for accuracy-vs-budget panels: the requested budget, or for
    ``method=none`` (no budget) its full visual-token count (mean visual tokens entering the LLM), so the
    vanilla row sits on the same axis."""
    b = run.get("budget")
    if isinstance(b, (int, float)) and not isinstance(b, bool):
        return b
    tokens = (metrics or {}).get("tokens") or {}
    for v in (tokens.get("visual_tokens_in_mean"), run.get("visual_tokens_llm_mean")):
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return v
    return None


def _layer_series(samples_path: Path) -> list[float]:
    """Mean visual tokens per decoder layer over the run's samples (``samples.jsonl: layer_visual_tokens``)."""
    rows = []
    if samples_path.is_file():
        for line in samples_path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                layers = json.loads(line).get("layer_visual_tokens")
                if layers:
                    rows.append(layers)
    if not rows:
        return []
    n = min(len(r) for r in rows)
    return [sum(r[i] for r in rows) / len(rows) for i in range(n)]


def run_tags(run: Mapping[str, Any], extra: list[str] | tuple[str, ...] = ()) -> list[str]:
    """Tags ``model:<m>``, ``method:<label>``, ``budget:<b>`` (``full`` without one), ``benchmark:<bench>``.

    The method tag is the run name's method part (``random-stage=llm`` for a variant), so variants
    filter apart; W&B caps a tag at 64 characters, longer ones are cut.
    """
    parts = str(run.get("name", "")).split("__")
    label = parts[1] if len(parts) == 4 else run.get("method")
    budget = run.get("budget")
    tags = [
        f"model:{run.get('model')}",
        f"method:{label}",
        f"budget:{'full' if budget is None else budget}",
        f"benchmark:{run.get('benchmark')}",
        *extra,
    ]
    return [t[:64] for t in tags]


def _number_or_str(v: Any) -> Any:
    if isinstance(v, bool) or v is None or isinstance(v, str):
        return v
    if isinstance(v, (int, float)):
        return None if isinstance(v, float) and math.isnan(v) else v
    return json.dumps(v, default=str)


def _summary(run: Mapping[str, Any], metrics: Mapping[str, Any] | None) -> dict[str, Any]:
    """The W&B summary of a run: ``metrics/*``, ``tokens/*``, ``timing/*`` and run facts."""
    out: dict[str, Any] = {}
    metrics = metrics or {}
    for k, v in (metrics.get("metrics") or {}).items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[f"metrics/{k}"] = v
    for k, v in (run.get("metrics") or {}).items():  # headline metrics (None when not scored)
        out[f"metrics/{k}"] = v
    tokens = {k: v for k, v in (metrics.get("tokens") or {}).items() if not isinstance(v, (list, dict))}
    for k in ("prefill_ms_mean", "total_ms_mean"):
        if k in tokens:
            out[f"timing/{k}"] = tokens.pop(k)
    for k, v in tokens.items():
        out[f"tokens/{k}"] = v
    out["tokens/visual_tokens_llm_mean"] = run.get("visual_tokens_llm_mean", out.get("tokens/visual_tokens_llm_mean"))
    out["tokens/layer_average_visual_tokens"] = run.get("layer_average_visual_tokens")
    for k in ("eval_s", "wall_s"):
        out[f"timing/{k}"] = run.get(k)
    for k in ("num_samples", "skipped_samples", "random_weights", "device", "attn_implementation", "weights", "note"):
        out[f"run/{k}"] = run.get(k)
    return {k: _number_or_str(v) for k, v in out.items()}


def _samples_table(samples_path: Path):
    """``wandb.Table`` of ``samples.jsonl``: scalars as they are, lists / dicts as JSON text."""
    import wandb

    rows = [json.loads(line) for line in samples_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    columns: list[str] = []
    for r in rows:
        for k in r:
            if k not in columns:
                columns.append(k)
    table = wandb.Table(columns=columns)
    for r in rows:
        table.add_data(*[_cell(r.get(c)) for c in columns])
    return table


def _cell(v: Any) -> Any:
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    return json.dumps(v, default=str)


def log_run_dir(
    run_dir: str | Path,
    wandb_cfg: Mapping[str, Any] | None = None,
    *,
    results_dir: str | Path | None = None,
) -> Path | None:
    """Log one finished run directory to W&B as one run; returns the W&B run directory (``None`` when
    ``wandb.mode=disabled``).

    Parameters
    ----------
    run_dir : str or Path
        ``results/runs/<name>/`` with ``run.json``, ``config.yaml``, ``metrics.json``,
        ``provenance.json``, ``samples.jsonl`` and ``lmms_eval/results.json``.
    wandb_cfg : mapping, optional
        The ``wandb:`` config block: ``project``, ``entity``, ``mode`` (offline | online | disabled),
        ``group``, ``dir`` (W&B writes ``<dir>/wandb/offline-run-*``; default ``results_dir``, else the
        parent of ``runs/``), ``log_samples``, ``tags``.
    results_dir : str or Path, optional
        Fallback for ``dir``.

    Returns
    -------
    Path or None
        ``<dir>/wandb/offline-run-<time>-<id>`` (offline) or ``run-...`` (online).

    Raises
    ------
    ConfigError
        Bad ``wandb.mode`` / ``wandb.tags``; a run directory without ``run.json``.
    """
    import wandb
    from omegaconf import OmegaConf

    run_dir = Path(run_dir)
    settings = _wandb_settings(wandb_cfg)
    run = _read_json(run_dir / "run.json")
    if not isinstance(run, dict):
        raise ConfigError(f"{run_dir} is not a finished run directory (no run.json)")
    cfg_file = run_dir / "config.yaml"
    cfg = OmegaConf.to_container(OmegaConf.load(cfg_file), resolve=False) if cfg_file.is_file() else {}
    metrics = _read_json(run_dir / "metrics.json") or {}
    provenance = _read_json(run_dir / "provenance.json") or {}
    lmms_results = _read_json(run_dir / "lmms_eval" / "results.json")

    wdir = settings["dir"] or results_dir or run_dir.parent.parent
    wdir = Path(str(wdir)).expanduser()
    wdir.mkdir(parents=True, exist_ok=True)
    config = {
        **cfg,
        "groups": run.get("groups"),
        "run_name": run.get("name"),
        "budget": plot_budget(run, metrics),
        "budget_label": "full" if run.get("budget") is None else str(run.get("budget")),
        "task": run.get("task"),
        "provenance": provenance,
    }
    if wandb.run is not None:  # never log into someone else's open run
        wandb.run.finish()
    wrun = wandb.init(
        project=settings["project"],
        entity=settings["entity"],
        mode=settings["mode"],
        dir=str(wdir),
        name=run.get("name"),
        group=wandb_group(run, settings["group"]),
        job_type="eval",
        tags=run_tags(run, settings["tags"]),
        config=config,
        reinit="finish_previous",
        settings=wandb.Settings(silent=True, console="off", x_disable_stats=True),
    )
    try:
        summary = _summary(run, metrics)
        # Panels: headline metrics against budget (and TFLOPs when recorded); per-layer visual tokens as a
        # series over the decoder layer index.
        wrun.define_metric("budget")
        wrun.define_metric("tflops")
        wrun.define_metric("layer")
        headline = [f"metrics/{m}" for m in (run.get("metrics") or {})]
        for key in headline:
            wrun.define_metric(key, step_metric="budget", summary="last")
        wrun.define_metric("tokens/layer_visual_tokens", step_metric="layer")
        point = {"budget": plot_budget(run, metrics), **{k: summary[k] for k in headline if k in summary}}
        tflops = run.get("tflops", metrics.get("tflops"))
        if isinstance(tflops, (int, float)):
            point["tflops"] = tflops
        wrun.log(point)
        for i, v in enumerate(_layer_series(run_dir / "samples.jsonl")):
            wrun.log({"layer": i, "tokens/layer_visual_tokens": v})
        wrun.summary.update(summary)
        if lmms_results and lmms_results.get("results"):
            from lmms_eval.loggers import WandbLogger

            lm_logger = WandbLogger()  # attaches to wrun (wandb.run is set): no second run
            if lm_logger.run is not wrun:  # pragma: no cover - lmms-eval changed its attach rule
                raise RuntimeError("lmms-eval's WandbLogger opened its own W&B run")
            lm_logger.post_init(lmms_results)
            lm_logger.log_eval_result()
        samples = run_dir / "samples.jsonl"
        if settings["log_samples"] and samples.is_file():
            wrun.log({"samples": _samples_table(samples)})
        out_dir = Path(wrun.settings.sync_dir) if settings["mode"] != "disabled" else None
    finally:
        wrun.finish()
    return out_dir


def log_finished_run(cfg: Mapping[str, Any], run_dir: str | Path) -> Path | None:
    """The runner's hook: log ``run_dir`` to W&B when ``cfg["logger"] == "wandb"``; no-op for ``none``.

    A W&B failure (e.g. ``mode=online`` without network) does not undo the run, which is already in
    the results store: it prints one line on stderr and returns ``None``.

    Parameters
    ----------
    cfg : mapping
        The run's resolved config (``logger``, ``wandb``, ``results_dir``).
    run_dir : str or Path
        The finished run directory.

    Returns
    -------
    Path or None
        The W&B run directory, or ``None`` (logger none / disabled / failed).

    Raises
    ------
    ConfigError
        ``logger`` not in :data:`LOGGERS`, or a bad ``wandb`` block.
    """
    logger = cfg.get("logger") or "none"
    if logger not in LOGGERS:
        raise ConfigError(f"logger {logger!r} is invalid (use {' | '.join(LOGGERS)})")
    if logger == "none":
        return None
    wcfg = cfg.get("wandb") or {}
    settings = _wandb_settings(wcfg)  # config errors are errors, not warnings
    if settings["mode"] == "online":
        return _log_online_bounded(run_dir, dict(wcfg), cfg.get("results_dir"), settings["timeout_s"])
    try:
        out = log_run_dir(run_dir, wcfg, results_dir=cfg.get("results_dir"))
    except Exception as exc:  # noqa: BLE001 - the results are written; W&B is a view of them
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        print(f"W&B logging of {run_dir} failed ({type(exc).__name__}: {first}); the run itself is saved", file=sys.stderr)
        return None
    if out is not None and _wandb_settings(wcfg)["mode"] == "offline":
        print(f"W&B offline run: {out} (upload: wandb sync {out})", file=sys.stderr)
    return out


_CHILD = (
    "import json, sys\n"
    "from apet_bench.wandb_logger import log_run_dir\n"
    "out = log_run_dir(sys.argv[1], json.loads(sys.argv[2]), results_dir=sys.argv[3] or None)\n"
    "print(json.dumps(str(out) if out else None), flush=True)\n"
)


def _log_online_bounded(run_dir: str | Path, wcfg: dict[str, Any], results_dir: Any, timeout_s: float) -> Path | None:
    """Online logging in a child process (its own process group) that is killed, W&B's service process
    included, after ``timeout_s`` seconds: an unreachable server (W&B retries uploads for hours) costs at
    most ``timeout_s`` and never keeps the evaluation process alive. One line on stderr when it fails."""
    import os
    import signal
    import subprocess
    import tempfile

    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", _CHILD, str(run_dir), json.dumps(wcfg, default=str), str(results_dir or "")],
            stdout=out, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            code = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            code = None
        try:  # the child and anything it started (wandb-core), whether it finished or not
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        proc.wait()
        out.seek(0)
        lines = out.read().strip().splitlines()
    if code is None:
        print(f"W&B logging of {run_dir} did not finish within wandb.timeout_s={timeout_s:g} s (server unreachable?); "
              f"stopped it, the run itself is saved", file=sys.stderr)
        return None
    if code != 0 or not lines:
        print(f"W&B logging of {run_dir} failed (exit {code}); the run itself is saved", file=sys.stderr)
        return None
    got = json.loads(lines[-1])
    return Path(got) if got else None


# --------------------------------------------------------------------------------------------------
# reading offline runs back (no network)
# --------------------------------------------------------------------------------------------------


def _json_value(s: str) -> Any:
    try:
        return json.loads(s)
    except ValueError:
        return s


def _set_nested(d: dict[str, Any], keys: list[str], value: Any) -> None:
    for k in keys[:-1]:
        d = d.setdefault(k, {})
    d[keys[-1]] = value


def read_offline_run(path: str | Path, wait_s: float = 30.0) -> dict[str, Any]:
    """What an offline W&B run recorded (see :func:`_read_offline_run_once`), waiting up to ``wait_s``
    seconds for its ``exit`` record: wandb's service process may still be flushing the log for a
    moment after ``run.finish()`` returns. ``out["complete"]`` says whether the exit record was seen.
    """
    import time

    deadline = time.monotonic() + max(0.0, float(wait_s))
    while True:
        out = _read_offline_run_once(path)
        if out["complete"] or time.monotonic() >= deadline:
            return out
        time.sleep(0.2)


def _read_offline_run_once(path: str | Path) -> dict[str, Any]:
    """What an offline W&B run recorded, read from its ``run-<id>.wandb`` transaction log.

    Uses wandb's own log reader (``wandb.sdk.internal.datastore.DataStore``) and its ``Record``
    protobuf; summary and config updates are folded in order, as the W&B backend does on sync.

    Parameters
    ----------
    path : str or Path
        An ``offline-run-*`` directory or its ``.wandb`` file.

    Returns
    -------
    dict
        ``{"id", "project", "name", "group", "job_type", "tags", "config", "summary", "history",
        "complete"}``; ``history`` is the list of logged rows (``run.log``), table values as their JSON
        descriptors; ``complete``: the log ends with the run's exit record.

    Raises
    ------
    FileNotFoundError
        No ``.wandb`` file at ``path``.
    """
    from wandb.proto import wandb_internal_pb2 as pb
    from wandb.sdk.internal import datastore

    path = Path(path)
    files = [path] if path.is_file() else sorted(path.glob("*.wandb"))
    if not files:
        raise FileNotFoundError(f"no W&B transaction log (*.wandb) in {path}")
    out: dict[str, Any] = {"config": {}, "summary": {}, "history": [], "tags": [], "complete": False}

    def apply_config(cfg_record: Any) -> None:
        for item in cfg_record.update:
            keys = list(item.nested_key) or [item.key]
            _set_nested(out["config"], keys, _json_value(item.value_json))
        for item in cfg_record.remove:
            keys = list(item.nested_key) or [item.key]
            node = out["config"]
            for k in keys[:-1]:
                node = node.get(k, {})
            node.pop(keys[-1], None)

    ds = datastore.DataStore()
    ds.open_for_scan(str(files[0]))
    while True:
        data = ds.scan_data()
        if data is None:
            break
        rec = pb.Record()
        rec.ParseFromString(data)
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            r = rec.run
            out.update(id=r.run_id, project=r.project, name=r.display_name, group=r.run_group,
                       job_type=r.job_type, tags=list(r.tags))
            apply_config(r.config)
        elif kind == "config":
            apply_config(rec.config)
        elif kind == "summary":
            for item in rec.summary.update:
                keys = list(item.nested_key) or [item.key]
                _set_nested(out["summary"], keys, _json_value(item.value_json))
        elif kind == "exit":
            out["complete"] = True
        elif kind == "history":
            row: dict[str, Any] = {}
            for item in rec.history.item:
                keys = list(item.nested_key) or [item.key]
                _set_nested(row, keys, _json_value(item.value_json))
            out["history"].append(row)
    return out


def _command() -> Any:
    from apet_bench.cli import Command, Key

    return Command(
        "python -m apet_bench.wandb_logger",
        "Log finished run directories (results/runs/<name>) to W&B after the fact; the keys override the run's "
        "recorded wandb block.",
        (
            Key("project", _DEFAULTS["project"], help="W&B project"),
            Key("entity", None, help="W&B team or user (null: the account's default)"),
            Key("mode", _DEFAULTS["mode"], help="offline, online or disabled"),
            Key("group", None, help="W&B group (null: the experiment preset's name, else <model>__<benchmark>)"),
            Key("dir", None, help="W&B writes <dir>/wandb/offline-run-* (null: the run's results_dir)"),
            Key("log_samples", False, "bool", help="also log samples.jsonl as a wandb.Table"),
            Key("timeout_s", _DEFAULTS["timeout_s"], "number", help="online: stop logging after this many seconds"),
        ),
        positional="RUN_DIR",
    )


def main(argv: list[str] | None = None) -> int:
    """``python -m apet_bench.wandb_logger RUN_DIR [RUN_DIR ...] [key=value ...]``: log finished run
    directories to W&B after the fact (keys of the ``wandb:`` block, e.g. ``mode=online project=x``).
    Bad input (no run directory, an unknown key, a bad mode): one line, exit 2."""
    from apet_bench.cli import error

    def body(args: Any) -> int:
        if not args.words:
            return error("name a run directory (usage: python -m apet_bench.wandb_logger RUN_DIR [RUN_DIR ...] "
                         "[mode=offline|online project=... group=...])")
        missing = [d for d in args.words if not Path(d).is_dir()]
        if missing:
            return error(f"run directory {missing[0]!r} does not exist")
        overrides = {k: args[k] for k in args.given}
        for d in args.words:
            out = log_run_dir(d, overrides)
            print(f"{d} -> {out}")
        return 0

    return _command().run(argv, body, (ConfigError,))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
